"""Kafka client configuration and topic administration, shared by every stage.

Tuned for low latency on small clusters: short fetch waits (the embedded
broker answers a fetch only when its wait expires), idempotent producer
(librdkafka idempotence works against Tansu; aiokafka's does not).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

log = logging.getLogger(__name__)


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "linger.ms": 2,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "none",
        "queue.buffering.max.messages": 1_000_000,
    }
    conf.update(overrides)
    return conf


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "auto.offset.reset": "earliest",  # LATEST is unreliable on Tansu (docs/runtime.md)
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "fetch.wait.max.ms": 5,
        "fetch.min.bytes": 1,
        # The rebalance timeout librdkafka sends is max.poll.interval.ms; Tansu makes
        # every join wait for it, so keep it short (a batch never takes this long).
        "max.poll.interval.ms": 10_000,
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1_000,
        "partition.assignment.strategy": "cooperative-sticky",
    }
    conf.update(overrides)
    return conf


def cluster_metadata(bootstrap: str, timeout: float = 10.0) -> Any:
    """The cluster's metadata (confluent-kafka's ``ClusterMetadata``: its id, topics and their partitions).
    The id names the log that offsets are positions in: the embedded broker takes a new one at each start,
    when its topics begin again at offset 0."""
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)


def partition_counts(metadata: Any, topics: Iterable[str]) -> dict[str, int]:
    """How many partitions each of ``topics`` has in ``metadata`` (those that exist)."""
    return {t: len(metadata.topics[t].partitions) for t in topics if t in metadata.topics}


def ensure_topics(bootstrap: str, topics: list[str], partitions: int) -> None:
    """Create missing topics with ``partitions`` partitions; existing ones are left as they are."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
    if not missing:
        return
    for topic, fut in admin.create_topics(missing, operation_timeout=10).items():
        try:
            fut.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
        log.info("created topic %s (%d partitions)", topic, partitions)


class DeliveryTracker:
    """Counts delivery failures of a producer between flushes."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed.append(f"{msg.topic()}: {err}")


def flush_or_raise(producer: Producer, tracker: DeliveryTracker, timeout: float = 30.0) -> None:
    """Block until every queued record is acknowledged; raise if any was not."""
    remaining = producer.flush(timeout)
    if remaining:
        raise RuntimeError(f"{remaining} records not acknowledged by Kafka within {timeout:.0f}s")
    if tracker.failed:
        failed, tracker.failed = tracker.failed, []
        raise RuntimeError(f"{len(failed)} records failed delivery, first: {failed[0]}")


def produce_waiting(producer: Producer, topic: str, value: bytes, key: bytes | None,
                    on_delivery: DeliveryTracker | None = None) -> None:
    """Produce one record, waiting for deliveries while the producer's local queue is full (backpressure:
    never drop, never raise ``BufferError``)."""
    while True:
        try:
            producer.produce(topic, value, key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.05)


def read_until_idle(bootstrap: str, topics: list[str], partitions: int, idle_s: float = 3.0) -> list[Any]:
    """Every message of ``partitions`` partitions of each of ``topics``, from the start, read with assign()
    (no group join), until ``idle_s`` passes without one: for tools and tests that read a topic back whole.
    Messages with an error are left out."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "weir-reader", "enable.auto.commit": False,
                         "fetch.wait.max.ms": 50})
    consumer.assign([TopicPartition(t, p, 0) for t in topics for p in range(partitions)])
    out: list[Any] = []
    idle = 0.0
    try:
        while idle < idle_s:
            batch = consumer.consume(10_000, 0.5)
            idle = idle + 0.5 if not batch else 0.0
            out.extend(m for m in batch if m.error() is None)
    finally:
        consumer.close()
    return out
