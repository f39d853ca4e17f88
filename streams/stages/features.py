"""Features: per-entity windowed aggregates into the online store, the feature log, and on to scoring.

Inputs: the ``weir.<project>.silver.<source>`` micro-batches of every source a feature
view reads or a model scores; the views are the project's declarations
(:class:`~streams.features.definitions.FeatureView`), compiled by
:mod:`streams.features.engine`. For each batch it feeds the events in
partition order, appends one feature-log row per accepted event (the entity's
values as of that event's time) to ``weir.feature_log`` (the ClickHouse sink
writes it), writes each touched entity's newest values to Redis (one pipelined
round trip), and forwards the events of a scored source to
``weir.<project>.scoring.<source>`` on the same partition, each carrying the values of
the views over its own source (``served``), which inference uses, so serving
and the training set agree per event. Redis is written before the events are
forwarded, so inference's reads of the other views are at least as new as the
batch.

**State and recovery.** Ingest partitions each silver topic by the
source's partition key, the key of every view over it, so every entity's
events are in one partition and the window state is partition-local: one
:class:`FeatureComputer` per input
(topic, partition), a function of that partition's log alone. After a
successful commit, at most every ``checkpoint_every_s``, the stage saves each
changed partition's state with the offset it is the state *after* (a
:mod:`~streams.features.checkpoint` snapshot). When the group assigns it a
partition with committed offset C, it restores the snapshot (offset S ≤ C) and
asks the runner to start at S; without a usable snapshot (none, another
definition, or S > C because Redis lost it or the group was reset) it starts at
the log's beginning. Messages below C are **replayed**: they update the windows
and nothing else (no Redis write, no feature-log or scoring record, no dead
letter), because they were processed and committed before. From C on it
processes normally, so after a crash (kill -9 included) the values equal those
of an uninterrupted run. Replay costs time proportional to the log since S:
without a snapshot that is the whole log (the embedded broker keeps every
record in memory; on a real Kafka, the topic's retention). Memory stays bounded
by the windows (at most 1 h of event time per entity, idle entities evicted
after the view's TTL).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import InvalidEvent, Message, Produce, Reason, Rejected, Stage, StepResult
from streams.codec import AvroCodec, DecodeError
from streams.features.aggregations import SnapshotError, Status
from streams.features.checkpoint import RedisSnapshots, SnapshotCodec
from streams.features.definitions import FeatureView, view_key
from streams.features.engine import ViewState
from streams.project.contracts import scoring_topic, silver_topic
from streams.project.spec import Project

log = logging.getLogger(__name__)

Touched = dict[str, tuple[int, str, list[float]]]  # entity -> (event ts, last event id, values)
LogRow = tuple[FeatureView, str, str, int, list[float]]  # view, entity, event id, as-of ts, values after it
TopicPartition = tuple[str, int]

LOG_BATCH_ROWS = 4000  # feature-log rows per message: ~200 KB, well under the broker's 1 MB limit
OFFSET_BEGINNING = -2  # librdkafka's logical offset: the log's first retained record


class FeatureComputer:
    """The pure part: one :class:`~streams.features.engine.ViewState` per feature view. No I/O.

    ``add`` feeds one source record to every view computed from its topic and
    returns, per view that accepted it, the entity's values right after it, as
    of the record's own event time (an out-of-order record sees nothing later
    than itself): what serving gets for a scored event and what the feature log
    records. ``current`` gives an entity's values as of its newest event, what
    the online store holds. Both depend only on the order of the entity's
    events, never on how they were batched.
    """

    def __init__(self, views: Sequence[FeatureView], states: Sequence[ViewState] | None = None) -> None:
        """Empty states for ``views``, or the given ``states`` (restored ones)."""
        built = states if states is not None else [ViewState(view) for view in views]
        self.states = {state.view.name: state for state in built}
        self._by_source: dict[str, list[ViewState]] = {}
        for state in built:
            self._by_source.setdefault(state.view.source, []).append(state)

    def add(self, source: str, item: Mapping[str, Any], *, values: bool = True) -> list[LogRow]:
        """Feed a record of the source named ``source``; ``values`` False (replay): update the state only."""
        rows: list[LogRow] = []
        for state in self._by_source.get(source, ()):
            if state.add(item) is Status.ACCEPTED and values:
                key = item[state.view.entity]
                got = state.values(key, at=item["ts_ms"])
                if got is not None:
                    rows.append((state.view, key, item["event_id"], got[0], got[1]))
        return rows

    def current(self, view: FeatureView, key: str) -> tuple[int, list[float]] | None:
        """``key`` 's values in ``view`` as of its newest accepted event, with that event's time."""
        return self.states[view.name].values(key)

    def latest(self, rows: list[LogRow], into: dict[FeatureView, Touched] | None = None
               ) -> dict[FeatureView, Touched]:
        """Each entity of ``rows`` → (newest event time, last event id in ``rows``, values as of it), per view."""
        out: dict[FeatureView, Touched] = {} if into is None else into
        last_ids = {(view, key): event_id for view, key, event_id, _, _ in rows}  # one query per entity
        for (view, key), event_id in last_ids.items():
            got = self.current(view, key)
            if got is not None:
                out.setdefault(view, {})[key] = (got[0], event_id, got[1])
        return out

    @property
    def refused(self) -> tuple[int, int]:
        """(late, duplicate) events refused so far, over all views."""
        return (sum(s.late for s in self.states.values()), sum(s.duplicates for s in self.states.values()))

    def state(self) -> list[tuple[str, bytes]]:
        """What a snapshot holds: (view name, :meth:`ViewState.snapshot`) per view."""
        return [(name, s.snapshot()) for name, s in self.states.items()]

    @classmethod
    def from_state(cls, state: Any, views: Sequence[FeatureView]) -> FeatureComputer:
        """The inverse of :meth:`state`; raises :class:`SnapshotError` on anything else."""
        if not (isinstance(state, list) and [n for n, _ in state] == [v.name for v in views]):
            raise SnapshotError("snapshot does not hold these feature views")
        return cls(views, [ViewState.restore(view, blob) for view, (_, blob) in zip(views, state, strict=True)])


@dataclass(slots=True)
class PartitionState:
    """One input partition's windows and how far into its log they are."""

    computer: FeatureComputer
    position: int  # offset of the first message the state has not seen
    replay_until: int = 0  # below this offset: processed and committed before, update the windows only
    saved: int = -1  # position of the last snapshot written


def snapshot_codec(views: Sequence[FeatureView]) -> SnapshotCodec:
    """Snapshots name the feature views' definitions: a changed view invalidates them."""
    return SnapshotCodec(("features:" + ":".join(v.fingerprint for v in views)).encode())


@dataclass(frozen=True, slots=True)
class _Input:
    """One input topic: the source it carries, its decoder, and where its events go on to be scored."""

    source: str
    key: str  # the source's partition key: every view over it is keyed by it
    codec: AvroCodec
    scoring: tuple[str, AvroCodec] | None


class FeaturesStage(Stage):
    """The features stage: see the module docstring for what it writes and how it recovers.

    ``project`` gives the views and the sources; ``rename`` maps one of the project's topic names
    (``weir.<project>.silver.<source>``, ``…scoring.<source>``, ``…feature_log``) to the one
    actually used (tests run on topics of their own).
    ``snapshots`` None: no checkpoints, every assignment of a partition that has a
    committed offset replays its log from the beginning (correct, slower).
    ``clock`` is the wall clock checkpoints are paced by (seconds, monotonic).
    ``after_commit_hook`` runs after every successful commit (the pipeline passes a
    :class:`~streams.gcpolicy.StateFreezer`).
    """

    step_id = "features"

    def __init__(self, project: Project, store: OnlineStore, *, snapshots: RedisSnapshots | None = None,
                 checkpoint_every_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 rename: Mapping[str, str] | None = None,
                 after_commit_hook: Callable[[], None] | None = None) -> None:
        self.store = store
        self.views = project.views
        self._after_commit_hook = after_commit_hook
        self.snapshots = snapshots
        self.checkpoint_every_s = checkpoint_every_s
        self._clock = clock
        self._next_checkpoint = clock() + checkpoint_every_s
        names = dict(rename or {})
        scored = {m.source for m in project.models}
        self._inputs: dict[str, _Input] = {}  # input topic -> what it carries
        for source in project.sources:
            if source.name not in scored and not any(v.source == source.name for v in self.views):
                continue
            out = scoring_topic(project, source)
            scoring = (names.get(out, out), AvroCodec(out)) if source.name in scored else None
            topic = silver_topic(project, source)
            self._inputs[names.get(topic, topic)] = _Input(source.name, source.partition_key, AvroCodec(topic),
                                                           scoring)
        self.topics: tuple[str, ...] = tuple(self._inputs)
        self.partitions: dict[TopicPartition, PartitionState] = {}
        self.replayed = 0  # messages applied in replay (state only), for tests and metrics
        self.late = self.duplicates = 0  # events the views refused (outside replay), for tests and metrics
        self._all_committed = True  # nothing handled since the last successful commit
        self._snapshot = snapshot_codec(self.views)
        log_topic = T.internal(project, T.I_FEATURE_LOG)
        self._log_topic = names.get(log_topic, log_topic)
        self._log = AvroCodec(T.I_FEATURE_LOG)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        self._all_committed = not batch and self._all_committed
        rows_of: dict[TopicPartition, list[LogRow]] = {}  # the rows of each partition's computer
        late, duplicates = self._refused()
        for msg in batch:
            part = self.partitions.get((msg.topic, msg.partition))
            if part is None:  # assigned without on_assign (a runner without the hook): start where it starts
                part = self.partitions[(msg.topic, msg.partition)] = PartitionState(FeatureComputer(self.views),
                                                                                    msg.offset)
            if msg.offset < part.position:
                log.warning("features: %s[%d] offset %d is already in the state (at %d), skipped",
                            msg.topic, msg.partition, msg.offset, part.position)
                continue
            part.position = msg.offset + 1
            replay = msg.offset < part.replay_until
            source = self._inputs[msg.topic]
            try:
                record = source.codec.decode(msg.value)
            except DecodeError as exc:
                if not replay:  # a replayed one was dead-lettered the first time
                    result.rejected.append(Rejected(msg, exc))
                continue
            items = record["items"]
            if any(not item.get(source.key) for item in items):  # not ingest's: it never emits one
                if not replay:
                    result.rejected.append(Rejected(msg, InvalidEvent(
                        Reason.MISSING_FIELD, f"an event without its key {source.key!r}: the views are keyed by it")))
                continue
            if replay:
                for item in items:
                    part.computer.add(source.source, item, values=False)
                self.replayed += 1
                continue
            rows = rows_of.setdefault((msg.topic, msg.partition), [])
            for item in items:
                got = part.computer.add(source.source, item)
                rows.extend(got)
                if source.scoring is not None:  # serving uses the values as of this event, as logged
                    item["served"] = {view_key(view): values for view, _, _, _, values in got} or None
            if source.scoring is not None:
                topic, codec = source.scoring
                result.produce.append(Produce(topic, None, codec.encode({"items": items}), partition=msg.partition))
        last: dict[FeatureView, Touched] = {}
        for tp, rows in rows_of.items():
            self.partitions[tp].computer.latest(rows, last)
        for view, entities in last.items():
            self.store.write(view, ((k, ts, v) for k, (ts, _, v) in entities.items()))
        # Redis first, then forward: the scoring records must come after the writes.
        per_view: dict[FeatureView, list[LogRow]] = {}
        for rows in rows_of.values():
            for row in rows:
                per_view.setdefault(row[0], []).append(row)
        result.produce[:0] = [self._log_batch(view, view_rows[i:i + LOG_BATCH_ROWS])
                              for view, view_rows in per_view.items()
                              for i in range(0, len(view_rows), LOG_BATCH_ROWS)]
        self._report_refused(late, duplicates)
        return result

    def _refused(self) -> tuple[int, int]:
        counts = [p.computer.refused for p in self.partitions.values()]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _report_refused(self, late_before: int, duplicates_before: int) -> None:
        """Count (and log) events the views refused in this batch: they stay in silver and are still scored,
        but do not enter the windows."""
        late, duplicates = self._refused()
        if late > late_before or duplicates > duplicates_before:
            self.late += late - late_before
            self.duplicates += duplicates - duplicates_before
            log.warning("features: %d late and %d duplicate events left out of the windows (totals %d, %d)",
                        late - late_before, duplicates - duplicates_before, self.late, self.duplicates)

    # --- recovery hooks, called by the BatchRunner (see streams.base.Stage) ---

    def on_assign(self, assigned: list[TopicPartition],
                  committed: dict[TopicPartition, int | None]) -> dict[TopicPartition, int]:
        """Restore each assigned partition's state; returns where the runner must start reading it."""
        starts: dict[TopicPartition, int] = {}
        for tp in assigned:
            c = committed.get(tp)
            if c is None:  # the group never committed here: nothing was processed, start as configured
                self.partitions.pop(tp, None)
                continue
            restored = self._restore(tp, c)
            if restored is None:
                self.partitions[tp] = PartitionState(FeatureComputer(self.views), 0, replay_until=c)
                starts[tp] = OFFSET_BEGINNING
                log.info("features: %s[%d] has no usable snapshot, replaying from the beginning to %d", *tp, c)
            else:
                self.partitions[tp] = restored
                starts[tp] = restored.position
                log.info("features: %s[%d] restored at %d, replaying to %d", *tp, restored.position, c)
        return starts

    def on_revoke(self, revoked: list[TopicPartition]) -> None:
        """Drop the state of partitions another member now owns (it restores them itself).

        When the runner's last commit covered everything handled (a clean handoff or
        stop), their state is saved first, so the next owner replays nothing."""
        if self._all_committed:
            self._save([tp for tp in revoked if tp in self.partitions])
        for tp in revoked:
            self.partitions.pop(tp, None)

    def after_commit(self, offsets: dict[TopicPartition, int]) -> None:
        """Every handled message is now at or below its partition's committed offset, so the
        in-memory state of each partition is a valid snapshot: save the changed ones when due."""
        self._all_committed = True
        if self._after_commit_hook is not None:
            self._after_commit_hook()
        if self.snapshots is None or self._clock() < self._next_checkpoint:
            return
        self.checkpoint()

    def checkpoint(self) -> int:
        """Save the state of every partition that changed since its last snapshot; returns how many.

        Call only when everything handled is committed (``after_commit``). A Redis
        failure is logged and retried at the next checkpoint: the older snapshots
        stay valid, recovery just replays more.
        """
        self._next_checkpoint = self._clock() + self.checkpoint_every_s
        return self._save(list(self.partitions))

    def _save(self, partitions: list[TopicPartition]) -> int:
        if self.snapshots is None:
            return 0
        saved = 0
        for topic, partition in partitions:
            part = self.partitions[(topic, partition)]
            if part.position == part.saved:
                continue
            try:
                self.snapshots.save(topic, partition, self._snapshot.encode(part.position, part.computer.state()))
            except redis.RedisError as exc:
                log.warning("features: snapshot of %s[%d] not saved (%s); retried later", topic, partition, exc)
                return saved
            part.saved = part.position
            saved += 1
        return saved

    def _restore(self, tp: TopicPartition, committed: int) -> PartitionState | None:
        if self.snapshots is None:
            return None
        try:
            raw = self.snapshots.load(*tp)
        except redis.RedisError as exc:
            log.warning("features: snapshot of %s[%d] not readable (%s)", *tp, exc)
            return None
        if raw is None:
            return None
        try:
            offset, state = self._snapshot.decode(raw)
            computer = FeatureComputer.from_state(state, self.views)
        except SnapshotError as exc:
            log.warning("features: snapshot of %s[%d] refused: %s", *tp, exc)
            return None
        if offset > committed:  # ahead of the group (offsets reset, another log): not this log's state
            log.warning("features: snapshot of %s[%d] is at %d, past the committed %d: ignored",
                        *tp, offset, committed)
            return None
        return PartitionState(computer, offset, replay_until=committed, saved=offset)

    def _log_batch(self, view: FeatureView, rows: list[LogRow]) -> Produce:
        record = {
            "view": view_key(view), "n_features": len(view.features),
            "entity_ids": [r[1] for r in rows], "event_ids": [r[2] for r in rows], "ts_ms": [r[3] for r in rows],
            "values": [x for r in rows for x in r[4]],
        }
        return Produce(self._log_topic, None, self._log.encode(record))
