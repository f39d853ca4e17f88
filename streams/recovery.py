"""One recovery protocol for every stage with state: snapshot → replay to the committed offset → resume.

A stateful stage keeps in memory a state built from its input logs (feature
windows, an online model and its pending joins). The state is split into
*units*, each built from a set of input partitions and moved between workers
whole: the features stage has one unit per input partition (an entity's
events are all in one partition), a learn stage one unit for all its
partitions (its joins span two topics). :class:`StatefulStage` implements the
runner's hooks (:class:`streams.base.Stage`) once for all of them:

- **position**: per input partition, the offset of the first message the
  state has not seen. :meth:`StatefulStage.admit` classifies each consumed
  message: ``SEEN`` (already in the state: skip), ``REPLAY`` (below the
  group's committed offset: processed before a crash or a handoff, so update
  the state and produce nothing, dead-letter nothing) or ``LIVE``.
- **snapshot** (:meth:`~StatefulStage.after_commit`, at most every
  ``checkpoint_every_s``): after a successful commit every handled message is
  at or below its committed offset, so each unit's state with its positions
  is a valid snapshot; the changed ones are saved, signed, in
  :class:`~streams.state.SignedSnapshots`, under the stage's *definition*.
  Units leaving cleanly (revoked after the runner committed everything
  handled) are saved first, so the next owner replays nothing.
- **restore and replay** (:meth:`~StatefulStage.on_assign`): a unit whose
  partitions have committed offsets C is restored from its snapshot if every
  snapshot position S ≤ C, and each partition starts at S (or the log's
  beginning if the snapshot does not have it); otherwise (none, another
  definition, altered, or S > C because Redis lost it or the group was reset)
  the unit starts empty at the log's beginning. Messages below C are replayed.
  A unit none of whose partitions has a committed offset starts empty where
  the consumer starts.
- **drop** (:meth:`~StatefulStage.on_revoke`): a unit with no partition left
  here is dropped; its next owner restores it.
- **a new log**: a snapshot names the log its positions are in (``log_id``,
  the Kafka cluster's id). One taken in an *earlier* log (the embedded broker
  keeps nothing across a restart of ``weir up`` and takes a new id at each
  start) is the state after that log, which is gone: it is restored as the
  base of the current log, whose partitions are all read from their beginning
  (``restored`` says ``"earlier log"``). So feature windows and online models
  carry over a restart; what the earlier log held after the snapshot is lost.

Because replay feeds the same messages in the same per-partition order, a
restored unit's state (watermarks included) equals an uninterrupted run's once
the replay reaches C; a unit built from several partitions can differ by the
interleaving of those partitions, and must have all of them in one member:
its stage runs as the only member of its group, which is then given every
partition at once. A Redis failure while saving is logged and retried at the next
checkpoint (the older snapshot stays valid); while loading, the unit relearns
from the log.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import redis

from streams.base import Message, Stage, TopicPartitionKey
from streams.state import SignedSnapshots, StateError

__all__ = ["OFFSET_BEGINNING", "Admit", "StatefulStage"]

log = logging.getLogger(__name__)

OFFSET_BEGINNING = -2  # librdkafka's logical offset: the log's first retained record


class Admit(enum.IntEnum):
    """What the state does with a consumed message (see :meth:`StatefulStage.admit`)."""

    SEEN = 0
    REPLAY = 1
    LIVE = 2


class StatefulStage(Stage):
    """A stage whose state is rebuilt by snapshot and replay (see the module docstring).

    A subclass calls ``__init__`` with its snapshot store (None: no snapshots, every restore replays the
    log from its beginning), sets ``definition`` (bytes that change when the meaning of the state changes),
    calls :meth:`admit` on every message of :meth:`handle`, and implements :meth:`unit_of`,
    :meth:`dump_unit`, :meth:`load_unit` and :meth:`drop_unit`. ``clock`` paces the checkpoints (seconds,
    monotonic).
    """

    definition: bytes = b""
    by_partition = False
    """Whether a unit's state is its partitions' (entities hashed to them): an earlier log's is then a base
    only if every input topic has as many partitions as then (else its entities now hash elsewhere)."""

    def __init__(self, snapshots: SignedSnapshots | None, *, checkpoint_every_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.snapshots = snapshots
        self.checkpoint_every_s = checkpoint_every_s
        self._clock = clock
        self._next_checkpoint = clock() + checkpoint_every_s
        self.positions: dict[TopicPartitionKey, int] = {}
        self.replay_until: dict[TopicPartitionKey, int] = {}  # below: processed and committed before
        self.replayed = 0  # messages applied in replay (state only), for tests and metrics
        self.restored: dict[str, str] = {}  # unit -> "snapshot", "log" (rebuilt from the beginning), "new" or
        # "earlier log" (the state an earlier log left, see the module docstring)
        self.log_id = ""  # the Kafka cluster's id: the log the positions are in (set by the pipeline)
        self.layout: dict[str, int] = {}  # partitions of each input topic (set by the pipeline)
        self._saved: dict[str, dict[TopicPartitionKey, int]] = {}  # unit -> its positions when last saved
        self._all_committed = True  # nothing handled since the last successful commit

    # --- what a subclass provides ---

    def unit_of(self, tp: TopicPartitionKey) -> str:
        """The name of the unit of state ``tp`` feeds (also its snapshot's name in the store)."""
        raise NotImplementedError

    def dump_unit(self, unit: str) -> Any:
        """The unit's state, to pickle (positions are kept apart)."""
        raise NotImplementedError

    def load_unit(self, unit: str, state: Any | None) -> None:
        """Replace the unit's state with ``state`` (what :meth:`dump_unit` gave), or an empty one for None.
        Raises :class:`~streams.state.StateError` if ``state`` is not a state of this unit."""
        raise NotImplementedError

    def drop_unit(self, unit: str) -> None:
        """Forget the unit's state: its partitions went to another member."""
        raise NotImplementedError

    def after_save(self, unit: str) -> None:
        """After the unit's snapshot was saved (e.g. to publish a derived snapshot); by default nothing."""

    # --- the protocol ---

    def admit(self, msg: Message) -> Admit:
        """Where ``msg`` stands against the state; moves its partition's position past it unless ``SEEN``."""
        tp = (msg.topic, msg.partition)
        if msg.offset < self.positions.get(tp, 0):
            return Admit.SEEN
        self.positions[tp] = msg.offset + 1
        self._all_committed = False
        if msg.offset < self.replay_until.get(tp, 0):
            self.replayed += 1
            return Admit.REPLAY
        return Admit.LIVE

    def on_assign(self, assigned: list[TopicPartitionKey],
                  committed: dict[TopicPartitionKey, int | None]) -> dict[TopicPartitionKey, int]:
        """Restore each unit of ``assigned`` (see the module docstring); returns where to start reading."""
        units: dict[str, list[TopicPartitionKey]] = {}
        for tp in assigned:
            units.setdefault(self.unit_of(tp), []).append(tp)
        starts: dict[TopicPartitionKey, int] = {}
        for unit, tps in units.items():
            done = {tp: c for tp in tps if (c := committed.get(tp)) is not None}
            for tp in tps:
                self.positions.pop(tp, None)
                self.replay_until.pop(tp, None)
            snapshot = self._load(unit)
            if snapshot is not None and snapshot.get("log", self.log_id) != self.log_id:
                self._restore_earlier(unit, snapshot)  # the base of this log, read from its beginning
            elif not done:
                self.load_unit(unit, None)
                self.restored[unit] = "new"
                continue
            elif (positions := self._restore(unit, snapshot, done)) is None:
                self.load_unit(unit, None)
                self._saved.pop(unit, None)
                self.restored[unit] = "log"
            else:
                self.positions.update(positions)
                self._saved[unit] = dict(positions)
                self.restored[unit] = "snapshot"
            self.replay_until.update(done)
            for tp, c in done.items():
                starts[tp] = self.positions.get(tp, OFFSET_BEGINNING)
            log.info("%s: %s from %s, replaying %s", self.step_id, unit, self.restored[unit],
                     {f"{t}[{p}]": (starts[(t, p)], c) for (t, p), c in done.items()})
        return starts

    def on_revoke(self, revoked: list[TopicPartitionKey]) -> None:
        """Save the units of ``revoked`` if everything handled is committed (a clean handoff or stop), then
        drop each unit that has no partition left here."""
        units = {self.unit_of(tp) for tp in revoked}
        if self._all_committed:
            self._save(units)
        for tp in revoked:
            self.positions.pop(tp, None)
            self.replay_until.pop(tp, None)
        kept = {self.unit_of(tp) for tp in self.positions}
        for unit in units - kept:
            self.drop_unit(unit)
            self._saved.pop(unit, None)
            self.restored.pop(unit, None)

    def after_commit(self, offsets: dict[TopicPartitionKey, int]) -> None:
        """Every handled message is at or below its committed offset: snapshot the changed units when due."""
        self._all_committed = True
        if self.snapshots is not None and self._clock() >= self._next_checkpoint:
            self.checkpoint()

    def checkpoint(self) -> int:
        """Save every unit that changed since its last snapshot; returns how many were saved. Call only when
        everything handled is committed (:meth:`after_commit`)."""
        self._next_checkpoint = self._clock() + self.checkpoint_every_s
        return self._save({self.unit_of(tp) for tp in self.positions})

    def _save(self, units: set[str]) -> int:
        if self.snapshots is None:
            return 0
        of_unit: dict[str, dict[TopicPartitionKey, int]] = {}
        for tp, position in self.positions.items():
            of_unit.setdefault(self.unit_of(tp), {})[tp] = position
        saved = 0
        for unit in sorted(units):
            positions = of_unit.get(unit)
            if not positions or positions == self._saved.get(unit):
                continue
            try:
                self.snapshots.save(unit, {"positions": positions, "state": self.dump_unit(unit), "log": self.log_id,
                                           "layout": self.layout}, self.definition)
            except redis.RedisError as exc:
                log.warning("%s: snapshot of %s not saved (%s); retried at the next checkpoint",
                            self.step_id, unit, exc)
                return saved
            self._saved[unit] = positions
            self.after_save(unit)
            saved += 1
        return saved

    def _load(self, unit: str) -> dict[str, Any] | None:
        """The unit's snapshot (positions, state, log), None when there is none or it cannot be used."""
        if self.snapshots is None:
            return None
        try:
            snapshot = self.snapshots.load(unit, self.definition)
            if snapshot is not None and (not isinstance(snapshot, dict)
                                         or not isinstance(snapshot.get("positions"), dict)):
                raise StateError("not a snapshot of a stage's state")
        except (StateError, redis.RedisError) as exc:
            log.warning("%s: snapshot of %s not used (%s): rebuilding it from the log", self.step_id, unit, exc)
            return None
        return snapshot

    def _restore(self, unit: str, snapshot: dict[str, Any] | None,
                 done: dict[TopicPartitionKey, int]) -> dict[TopicPartitionKey, int] | None:
        """The unit's state from its snapshot in this log, and the snapshot's positions; None when it must be
        rebuilt."""
        if snapshot is None:
            return None
        positions: dict[TopicPartitionKey, int] = snapshot["positions"]
        try:
            ahead = {tp: p for tp, p in positions.items() if tp in done and p > done[tp]}
            if ahead:  # ahead of the group (offsets reset): not this log's state
                raise StateError(f"positions {ahead} are past the committed offsets")
            self.load_unit(unit, snapshot["state"])
        except StateError as exc:
            log.warning("%s: snapshot of %s not used (%s): rebuilding it from the log", self.step_id, unit, exc)
            return None
        return {tp: p for tp, p in positions.items() if tp in done}

    def _restore_earlier(self, unit: str, snapshot: dict[str, Any]) -> None:
        """Restore the state an earlier log left (its positions mean nothing in this one)."""
        try:
            then = snapshot.get("layout") or {}
            moved = {t: (n, self.layout[t]) for t, n in then.items() if t in self.layout and self.layout[t] != n}
            if self.by_partition and moved:
                raise StateError(f"partitions changed since ({', '.join(f'{t}: {a} -> {b}' for t, (a, b) in moved.items())})")
            self.load_unit(unit, snapshot["state"])
        except StateError as exc:
            log.warning("%s: snapshot of %s from log %s not used (%s): starting empty", self.step_id, unit,
                        snapshot.get("log"), exc)
            self.load_unit(unit, None)
            self.restored[unit] = "new"
            return
        self._saved.pop(unit, None)
        self.restored[unit] = "earlier log"
        log.info("%s: %s restored from the state log %s left; this log is read from its beginning",
                 self.step_id, unit, snapshot.get("log"))
