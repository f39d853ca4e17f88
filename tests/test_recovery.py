"""The runtime's recovery protocol (snapshot → replay to the committed offset → resume) and its signed store.

Pure tests with a toy stage whose state is the sum of the values it has seen per unit: a restored state plus
the replay must equal the sum of everything below the committed offset, whatever went wrong in between.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from streams.base import Message, StepResult
from streams.recovery import OFFSET_BEGINNING, Admit, StatefulStage
from streams.state import SignedSnapshots, StateError

A, B = ("in.a", 0), ("in.b", 0)


class DictRedis:
    """Redis's get/set/delete over a dict; ``down`` makes every call fail as a lost connection does."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise redis.ConnectionError("down")

    def set(self, key: str, value: bytes) -> None:
        self._check()
        self.data[key] = value

    def get(self, key: str) -> bytes | None:
        self._check()
        return self.data.get(key)

    def delete(self, key: str) -> None:
        self._check()
        self.data.pop(key, None)


class Summing(StatefulStage):
    """One unit over both inputs (like a join): the sum of the values seen, and what was produced live."""

    step_id = "summing"
    topics = ("in.a", "in.b")
    definition = b"summing v1"

    def __init__(self, snapshots: SignedSnapshots | None, now: list[float]) -> None:
        super().__init__(snapshots, checkpoint_every_s=10, clock=lambda: now[0])
        self.total = 0
        self.live: list[int] = []

    def handle(self, batch: list[Message]) -> StepResult:
        for msg in batch:
            admitted = self.admit(msg)
            if admitted is not Admit.SEEN:
                self.total += int(msg.value or b"0")
            if admitted is Admit.LIVE:
                self.live.append(msg.offset)
        return StepResult()

    def unit_of(self, tp: tuple[str, int]) -> str:
        return "summing:all"

    def dump_unit(self, unit: str) -> Any:
        return {"total": self.total}

    def load_unit(self, unit: str, state: Any | None) -> None:
        if state is not None and not isinstance(state, dict):
            raise StateError("not a sum")
        self.total = 0 if state is None else state["total"]

    def drop_unit(self, unit: str) -> None:
        self.total = 0


def log(tp: tuple[str, int], n: int) -> list[Message]:
    return [Message(tp[0], tp[1], o, None, str(o + 1).encode(), 0) for o in range(n)]


def from_(msgs: list[Message], starts: dict[tuple[str, int], int]) -> list[Message]:
    """What a consumer seeked to ``starts`` reads (the log's beginning for OFFSET_BEGINNING)."""
    return [m for m in msgs if m.offset >= max(starts.get((m.topic, m.partition), 0), 0)]


def test_a_crash_restores_the_snapshot_and_replays_exactly_to_the_committed_offset() -> None:
    now, memory = [0.0], DictRedis()
    snaps = SignedSnapshots(memory, b"key")  # type: ignore[arg-type]
    msgs = log(A, 30) + log(B, 20)
    first = Summing(snaps, now)
    assert first.on_assign([A, B], {A: None, B: None}) == {}
    first.handle([m for m in msgs if m.offset < 10])
    now[0] = 10
    first.after_commit({})  # due: a snapshot at A 10, B 10
    first.handle([m for m in msgs if 10 <= m.offset < 15])
    first.after_commit({})  # committed at 15, not due: no snapshot
    first.handle([m for m in msgs if m.offset >= 15])  # handled, never committed: then kill -9

    second = Summing(snaps, now)
    starts = second.on_assign([A, B], {A: 15, B: 15})
    assert starts == {A: 10, B: 10} and second.restored == {"summing:all": "snapshot"}
    second.handle(from_(msgs, starts))
    assert second.replayed == 10 and second.total == sum(range(1, 31)) + sum(range(1, 21))
    assert second.live == list(range(15, 30)) + list(range(15, 20))  # nothing below the committed offset again


@pytest.mark.parametrize("case", ["ahead", "other definition", "other key", "altered", "lost", "redis down"])
def test_an_unusable_snapshot_means_rebuilding_from_the_log(case: str) -> None:
    now, memory = [0.0], DictRedis()
    snaps = SignedSnapshots(memory, b"key")  # type: ignore[arg-type]
    msgs = log(A, 30) + log(B, 20)
    first = Summing(snaps, now)
    first.handle([m for m in msgs if m.offset < 12])
    first.after_commit({})
    first.checkpoint()
    committed = {A: 12, B: 12}
    if case == "ahead":  # the group was reset (or Redis is another deployment's): the snapshot is past it
        committed = {A: 5, B: 12}
    elif case == "other definition":
        Summing.definition, old = b"summing v2", Summing.definition
    elif case == "other key":
        snaps = SignedSnapshots(memory, b"another key")  # type: ignore[arg-type]
    elif case == "altered":
        (key, raw), = memory.data.items()
        memory.data[key] = raw[:-1] + bytes([raw[-1] ^ 1])
    elif case == "lost":
        memory.data.clear()
    elif case == "redis down":
        memory.down = True
    try:
        second = Summing(snaps, now)
        starts = second.on_assign([A, B], committed)
    finally:
        if case == "other definition":
            Summing.definition = old
    assert starts == {A: OFFSET_BEGINNING, B: OFFSET_BEGINNING} and second.restored == {"summing:all": "log"}
    second.handle(from_(msgs, starts))
    assert second.total == sum(range(1, 31)) + sum(range(1, 21))
    assert second.replayed == sum(committed.values())


def test_a_failed_save_is_retried_and_a_clean_handoff_replays_nothing() -> None:
    now, memory = [0.0], DictRedis()
    snaps = SignedSnapshots(memory, b"key")  # type: ignore[arg-type]
    msgs = log(A, 10) + log(B, 10)
    first = Summing(snaps, now)
    first.handle([m for m in msgs if m.offset < 4])
    memory.down = True
    now[0] = 10
    first.after_commit({})  # Redis down: logged, the stage goes on
    assert memory.data == {}
    memory.down = False
    first.handle([m for m in msgs if 4 <= m.offset < 6])
    now[0] = 20
    first.after_commit({})  # retried at the next checkpoint
    assert snaps.load("summing:all", Summing.definition) == {"positions": {A: 6, B: 6}, "log": "", "layout": {},
                                                             "state": {"total": 2 * sum(range(1, 7))}}
    first.handle([m for m in msgs if m.offset >= 6])
    first.after_commit({})
    first.on_revoke([A, B])  # a clean handoff: saved at once, then dropped
    assert first.total == 0 and first.positions == {} and first.restored == {}

    second = Summing(snaps, now)
    assert second.on_assign([A, B], {A: 10, B: 10}) == {A: 10, B: 10}  # nothing to replay
    assert second.total == 2 * sum(range(1, 11)) and second.replayed == 0


@pytest.mark.parametrize("committed", [None, 4])
def test_an_earlier_logs_state_is_the_base_of_a_new_log(committed: int | None) -> None:
    """The embedded broker keeps nothing across a restart of `weir up` and starts every topic at offset 0 again
    under a new cluster id: the state the earlier log left is restored and the new log read from its
    beginning (before, the state started empty: positions past a new group's missing commits)."""
    now, memory = [0.0], DictRedis()
    snaps = SignedSnapshots(memory, b"key")  # type: ignore[arg-type]
    first = Summing(snaps, now)
    first.log_id = "weir-run1"
    first.on_assign([A, B], {A: None, B: None})
    first.handle(log(A, 30) + log(B, 20))
    first.after_commit({})
    first.on_revoke([A, B])  # a clean stop: saved at A 30, B 20 of the first log

    second = Summing(snaps, now)
    second.log_id = "weir-run2"
    done = {A: committed, B: committed}  # None: the new log's group has committed nothing yet
    starts = second.on_assign([A, B], done)
    assert second.restored == {"summing:all": "earlier log"}
    assert second.total == sum(range(1, 31)) + sum(range(1, 21))
    assert starts == ({} if committed is None else {A: OFFSET_BEGINNING, B: OFFSET_BEGINNING})
    new = log(A, 6) + log(B, 6)  # the new log, from offset 0
    second.handle(from_(new, starts))
    assert second.total == sum(range(1, 31)) + sum(range(1, 21)) + 2 * sum(range(1, 7))
    assert second.replayed == (0 if committed is None else 2 * committed)
    second.after_commit({})
    second.checkpoint()
    third = Summing(snaps, now)  # a crash in the new log: its own snapshot, positions in this log
    third.log_id = "weir-run2"
    assert third.on_assign([A, B], {A: 6, B: 6}) == {A: 6, B: 6} and third.restored == {"summing:all": "snapshot"}


@pytest.mark.parametrize("by_partition", [True, False])
def test_an_earlier_logs_state_is_no_base_when_its_partitions_changed(by_partition: bool) -> None:
    """Entities hash to other partitions when a topic's partition count changes: a unit's state by partition
    is then another partition's (started empty); a state of all partitions (learn) is still the base."""
    now, memory = [0.0], DictRedis()
    snaps = SignedSnapshots(memory, b"key")  # type: ignore[arg-type]
    first = Summing(snaps, now)
    first.log_id, first.layout = "weir-run1", {"in.a": 4, "in.b": 2}
    first.on_assign([A, B], {A: None, B: None})
    first.handle(log(A, 5) + log(B, 5))
    first.after_commit({})
    first.on_revoke([A, B])
    second = Summing(snaps, now)
    second.by_partition = by_partition
    second.log_id, second.layout = "weir-run2", {"in.a": 2, "in.b": 2}
    second.on_assign([A, B], {A: None, B: None})
    assert second.restored == {"summing:all": "new" if by_partition else "earlier log"}
    assert second.total == (0 if by_partition else 2 * sum(range(1, 6)))


def test_the_store_refuses_what_it_must_not_unpickle() -> None:
    memory = DictRedis()
    snaps = SignedSnapshots(memory, b"key")  # type: ignore[arg-type]
    snaps.save("s", {"x": 1}, b"def")
    assert snaps.load("s", b"def") == {"x": 1} and snaps.load("none", b"def") is None
    raw = memory.data["weir:state:s"]
    with pytest.raises(StateError, match="another definition"):
        snaps.load("s", b"other")
    with pytest.raises(StateError, match="signature"):
        SignedSnapshots(memory, b"other key").load("s", b"def")  # type: ignore[arg-type]
    for broken, why in ((raw[:10], "truncated"), (b"XYZ" + raw[3:], "not a signed"),
                        (raw[:3] + bytes([9]) + raw[4:], "format 9"), (raw[:-1] + b"\x00", "signature")):
        memory.data["weir:state:s"] = broken
        with pytest.raises(StateError, match=why):
            snaps.load("s", b"def")
