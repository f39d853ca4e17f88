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
