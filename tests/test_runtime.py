"""BatchRunner against the real embedded broker: pausing never loses a message."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Producer

from streams.base import Message, StepResult
from streams.kafka import ensure_topics, producer_config
from streams.runtime import BatchRunner
from streams.stack import Endpoints


class Collect:
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
    """A stage whose messages each carry ``int(value)`` units of work (see streams.runtime.Batching)."""

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
