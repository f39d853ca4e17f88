"""BatchRunner against the real embedded broker: pausing never loses a message."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition

from streams.base import Message, Produce, Stage, StepResult
from streams.kafka import ensure_topics, producer_config
from streams.runtime import BatchRunner
from streams.stack import Endpoints


class Collect(Stage):
    step_id = "collect"

    def __init__(self, topic: str) -> None:
        self.topics = (topic,)
        self.seen: list[tuple[int, int]] = []

    def handle(self, batch: list[Message]) -> StepResult:
        self.seen.extend((m.partition, m.offset) for m in batch)
        return StepResult()


def test_a_pause_across_the_group_join_loses_nothing(endpoints: Endpoints) -> None:
    """Paused before the group assigned anything: the partitions assigned during the hold stay paused,
    and every message is processed once the runner resumes."""
    topic = f"test.runtime.{uuid.uuid4().hex[:8]}"
    ensure_topics(endpoints.kafka_bootstrap, [topic], 4)
    producer = Producer(producer_config(endpoints.kafka_bootstrap))
    for i in range(80):
        producer.produce(topic, str(i).encode(), str(i).encode())
    assert producer.flush(10) == 0
    stage = Collect(topic)
    runner = BatchRunner(stage, endpoints.kafka_bootstrap, group_id=f"g-{topic}", max_wait_ms=20)
    runner.paused.set()
    runner.start()
    try:
        assert runner.ready.wait(60)
        time.sleep(1.0)
        assert stage.seen == []  # paused means paused, also for partitions assigned during the hold
        runner.paused.clear()
        deadline = time.time() + 30
        while len(stage.seen) < 80 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
    assert runner.error is None
    assert len(stage.seen) == len(set(stage.seen)) == 80


class Units(Collect):
    """A stage whose messages each carry ``int(value)`` units of work (``Stage.max_units``)."""

    max_units = 50

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.batches: list[int] = []

    def units(self, message: Message) -> int:
        return int(message.value or b"0")

    def handle(self, batch: list[Message]) -> StepResult:
        self.batches.append(sum(map(self.units, batch)))
        return super().handle(batch)


def test_a_batching_stage_gets_batches_full_by_units_or_after_the_max_wait(endpoints: Endpoints) -> None:
    topic = f"test.runtime.{uuid.uuid4().hex[:8]}"
    ensure_topics(endpoints.kafka_bootstrap, [topic], 1)
    producer = Producer(producer_config(endpoints.kafka_bootstrap))
    for _ in range(20):  # 100 units waiting: two full batches, although each consume call takes 2 messages
        producer.produce(topic, b"5", partition=0)
    assert producer.flush(10) == 0
    stage = Units(topic)
    runner = BatchRunner(stage, endpoints.kafka_bootstrap, group_id=f"g-{topic}", max_batch=2, max_wait_ms=3000)
    runner.start()
    try:
        assert runner.ready.wait(60)
        deadline = time.time() + 30
        while len(stage.seen) < 20 and time.time() < deadline:
            time.sleep(0.05)
        assert stage.batches == [50, 50]
        for _ in range(3):  # 15 units: the batch goes when the max wait is over, not full
            producer.produce(topic, b"5", partition=0)
        assert producer.flush(10) == 0
        while len(stage.seen) < 23 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        runner.stop()
    assert runner.error is None
    assert stage.batches == [50, 50, 15] and len(stage.seen) == len(set(stage.seen)) == 23


class Flaky(Stage):
    """Keeps a running count of each partition's messages (state derived from its input, rebuilt from the
    committed offset by the rebalance hooks), outputs ``offset:count`` per message, and fails (a dependency
    down) on the calls in ``fail_on``, after it changed its state."""

    step_id = "flaky"

    def __init__(self, topic: str, out: str, fail_on: set[int]) -> None:
        self.topics, self.out, self.fail_on = (topic,), out, fail_on
        self.count: dict[tuple[str, int], int] = {}
        self.calls = 0

    def on_assign(self, assigned: list[tuple[str, int]],
                  committed: dict[tuple[str, int], int | None]) -> dict[tuple[str, int], int]:
        for key in assigned:
            self.count[key] = committed.get(key) or 0  # offsets start at 0: the count before offset n is n
        return {}

    def on_revoke(self, revoked: list[tuple[str, int]]) -> None:
        for key in revoked:
            self.count.pop(key, None)

    def handle(self, batch: list[Message]) -> StepResult:
        self.calls += 1
        out = []
        for m in batch:
            key = (m.topic, m.partition)
            self.count[key] += 1
            out.append(Produce(self.out, None, f"{m.offset}:{self.count[key]}".encode(), partition=m.partition))
        if self.calls in self.fail_on:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return StepResult(produce=out)


def test_a_failing_stage_is_retried_from_its_committed_offsets_with_its_state_rebuilt(endpoints: Endpoints) -> None:
    """A failure (here a dependency down for three attempts) neither ends the runner nor loses or miscounts a
    message: it goes back to the committed offsets, the stage rebuilds its state there, and it retries
    after a backoff, reporting ``retrying`` meanwhile."""
    topic, out = (f"test.runtime.{uuid.uuid4().hex[:8]}{s}" for s in ("", ".out"))
    ensure_topics(endpoints.kafka_bootstrap, [topic, out], 2)
    producer = Producer(producer_config(endpoints.kafka_bootstrap))
    for i in range(200):
        producer.produce(topic, str(i).encode(), partition=i % 2)
        if i % 20 == 19:
            producer.flush(10)
            time.sleep(0.05)  # several batches, so the failures fall between commits
    assert producer.flush(10) == 0
    stage = Flaky(topic, out, fail_on={3, 4, 5})
    runner = BatchRunner(stage, endpoints.kafka_bootstrap, group_id=f"g-{topic}", max_batch=15, max_wait_ms=5,
                         backoff_s=0.3)
    states = set()
    runner.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (stage.count.get((topic, 0)) == stage.count.get((topic, 1)) == 100
                                              and stage.calls > 6 and not runner._uncommitted):
            states.add(runner.health()["state"])
            time.sleep(0.02)
        health = runner.health()
    finally:
        runner.stop()
    assert runner.error is None and "retrying" in states
    assert health["state"] == "running" and health["retries"] == 3 and "Connection refused" in health["error"]

    c = Consumer({"bootstrap.servers": endpoints.kafka_bootstrap, "group.id": f"r-{out}", "enable.auto.commit": False})
    c.assign([TopicPartition(out, p, 0) for p in (0, 1)])
    got: dict[tuple[int, int], set[int]] = {}
    deadline = time.time() + 30
    while time.time() < deadline and len(got) < 200:
        for m in c.consume(1000, 0.5):
            if m.error() is None:
                offset, count = map(int, m.value().split(b":"))
                got.setdefault((m.partition(), offset), set()).add(count)
    c.close()
    assert len(got) == 200  # every input has its output: nothing lost
    assert all(counts == {offset + 1} for (_, offset), counts in got.items())  # re-read with the state rebuilt


class Revoked(Collect):
    """Also records the hooks a member without a group gets: its start offsets' view, and the clean handoff."""

    def __init__(self, topic: str) -> None:
        super().__init__(topic)
        self.assigned: list[tuple[str, int]] = []
        self.revoked: list[tuple[str, int]] = []

    def on_assign(self, assigned: list[tuple[str, int]], committed: dict[tuple[str, int], int | None]
                  ) -> dict[tuple[str, int], int]:
        self.assigned = sorted(assigned)
        return {}

    def on_revoke(self, revoked: list[tuple[str, int]]) -> None:
        self.revoked = sorted(revoked)


def test_members_without_a_group_split_the_partitions_and_resume_from_their_commits(endpoints: Endpoints) -> None:
    """``member=(i, n)``: partitions i mod n of every input, no group join; each commits, and a restarted
    member goes on from its commits (nothing read twice, nothing skipped)."""
    topic = f"test.runtime.{uuid.uuid4().hex[:8]}"
    ensure_topics(endpoints.kafka_bootstrap, [topic], 4)
    producer = Producer(producer_config(endpoints.kafka_bootstrap))

    def produce(start: int) -> None:
        for i in range(start, start + 40):
            producer.produce(topic, str(i).encode(), partition=i % 4)
        assert producer.flush(10) == 0

    def run(index: int, want: int) -> Revoked:
        stage = Revoked(topic)
        runner = BatchRunner(stage, endpoints.kafka_bootstrap, group_id=f"g-{topic}", max_wait_ms=20,
                             member=(index, 2))
        runner.start()
        try:
            assert runner.ready.wait(30)
            deadline = time.time() + 30
            while len(stage.seen) < want and time.time() < deadline:
                time.sleep(0.05)
        finally:
            runner.stop()
        assert runner.error is None
        return stage

    produce(0)
    first = [run(i, 20) for i in range(2)]
    assert [s.assigned for s in first] == [[(topic, 0), (topic, 2)], [(topic, 1), (topic, 3)]]
    assert [s.revoked for s in first] == [s.assigned for s in first]  # a clean stop hands its partitions off
    assert sorted(p for s in first for p, _ in s.seen) == sorted(i % 4 for i in range(40))
    produce(40)
    again = run(1, 10)
    assert sorted(again.seen) == sorted((p, o) for p in (1, 3) for o in range(10, 20))  # only what is new


class Relay(Stage):
    """Upstream of a fused pair: each message on to ``mid``, same key, value and partition. Checks the contract of
    ``after_commit`` a stateful stage snapshots on: everything it handled is committed."""

    step_id = "relay"

    def __init__(self, topic: str, mid: str) -> None:
        self.topics = (topic,)
        self.mid = mid
        self.handled: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, int], int] = {}
        self.broken: list[dict[tuple[str, int], int]] = []  # after_commit calls while handled input was not committed

    def handle(self, batch: list[Message]) -> StepResult:
        self.handled.update({(m.topic, m.partition): m.offset + 1 for m in batch})
        return StepResult([Produce(self.mid, m.key, m.value, partition=m.partition) for m in batch])

    def on_revoke(self, revoked: list[tuple[str, int]]) -> None:
        for tp in revoked:  # a rewind: handled again from the committed offsets
            self.handled.pop(tp, None)

    def after_commit(self, offsets: dict[tuple[str, int], int]) -> None:
        self.committed.update(offsets)
        if any(offset > self.committed.get(tp, 0) for tp, offset in self.handled.items()):
            self.broken.append(dict(self.handled))


class Tail(Stage):
    """Downstream of a fused pair: records what it was handed, answers each message on ``out`` (the calls
    numbered in ``fail_on`` fail, as a bug or a dependency down would)."""

    step_id = "tail"

    def __init__(self, mid: str, out: str, fail_on: set[int]) -> None:
        self.topics = (mid,)
        self.out = out
        self.fail_on = fail_on
        self.calls = 0
        self.handed: list[tuple[str, int, bytes | None]] = []

    def handle(self, batch: list[Message]) -> StepResult:
        self.calls += 1
        if self.calls - 1 in self.fail_on:
            raise ConnectionError("down")
        self.handed.extend((m.topic, m.partition, m.value) for m in batch)
        return StepResult([Produce(self.out, m.key, b"re:" + (m.value or b""), partition=m.partition) for m in batch])


def _read(bootstrap: str, topic: str, partitions: int, n: int) -> list[tuple[int, bytes]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r-{topic}", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[tuple[int, bytes]] = []
    deadline = time.time() + 30
    while time.time() < deadline and len(got) < n:
        got += [(m.partition(), m.value()) for m in c.consume(1000, 0.5) if m.error() is None]
    c.close()
    return got


def test_a_fused_stage_gets_the_records_in_memory_and_the_topic_is_still_written(endpoints: Endpoints) -> None:
    """Fusion (``fused``): the downstream stage gets every record its upstream produces to its topic, in order
    and on the same partition, without reading the broker; the topic still holds them, the downstream's outputs
    are produced, and the upstream's commit covers both; a failure in the downstream stage rewinds the upstream
    to its committed offsets, so nothing is lost, and the commit that rewind makes does not tell the upstream
    that everything it handled is committed (a stateful stage would snapshot state past its commit)."""
    topic, mid, out = (f"test.runtime.{uuid.uuid4().hex[:8]}{s}" for s in ("", ".mid", ".out"))
    ensure_topics(endpoints.kafka_bootstrap, [topic, mid, out], 2)
    producer = Producer(producer_config(endpoints.kafka_bootstrap))
    for i in range(100):
        producer.produce(topic, str(i).encode(), partition=i % 2)
        if i % 20 == 19:
            producer.flush(10)
            time.sleep(0.05)
    assert producer.flush(10) == 0
    tail, relay = Tail(mid, out, fail_on={1, 2}), Relay(topic, mid)  # the first batch goes through, uncommitted
    runner = BatchRunner(relay, endpoints.kafka_bootstrap, group_id=f"g-{topic}", max_batch=15, max_wait_ms=5,
                         backoff_s=0.2, commit_every_ms=2000, fused={mid: [tail]})
    runner.start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (runner.stats.committed.get((topic, 0)) != 50
                                          or runner.stats.committed.get((topic, 1)) != 50):
            time.sleep(0.05)
        health = runner.health()
    finally:
        runner.stop()
    assert runner.error is None and health["fused"] == ["tail"] and health["retries"] == 2
    assert relay.broken == []
    for p in (0, 1):  # per partition, in order, each value once: the failed batches were not handed on
        assert [v for t, q, v in tail.handed if q == p] == [str(i).encode() for i in range(p, 100, 2)]
    assert {t for t, _, _ in tail.handed} == {mid}
    assert runner.fused_stats["tail"].consumed == 100
    assert sorted(_read(endpoints.kafka_bootstrap, mid, 2, 100)) == sorted((i % 2, str(i).encode())
                                                                          for i in range(100))
    assert sorted(_read(endpoints.kafka_bootstrap, out, 2, 100)) == sorted((i % 2, b"re:" + str(i).encode())
                                                                          for i in range(100))
