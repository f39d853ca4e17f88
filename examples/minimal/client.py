"""A user's application for the minimal project, with nothing but confluent-kafka: it produces sensor readings
and reads their predictions.

Run, with ``weir --project examples/minimal/project.py up`` running in another terminal::

    .venv/bin/python examples/minimal/client.py            # endpoints from .weir/endpoints.json

Readings are serialized with ``sensor.readings``' schema by confluent-kafka's
own ``AvroSerializer`` against Weir's schema registry; predictions are read
from ``predictions.fault`` with its ``AvroDeserializer`` (the writer schema
comes from the registry, by id). ``tests/test_minimal_project.py`` runs these
same functions against the test session's stack.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import DeserializingConsumer, SerializingProducer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer

SCHEMA = Path(__file__).parent / "schemas" / "sensor.readings" / "v1.avsc"


def readings(n: int, start: datetime) -> list[dict[str, Any]]:
    """``n`` readings of 8 sensors, a second apart; a reading over 90 °C is faulty."""
    out = []
    for i in range(n):
        temperature = 60.0 + (i * 37) % 45
        out.append({"reading_id": f"r-{uuid.uuid4().hex}", "sensor_id": f"s{i % 8}",
                    "ts": start + timedelta(seconds=i), "temperature": temperature, "vibration": float(i % 11),
                    "faulty": temperature > 90})
    return out


def produce(bootstrap: str, registry: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Produce ``records`` to ``sensor.readings``, keyed by sensor; returns how many, once all are acknowledged."""
    producer = SerializingProducer({"bootstrap.servers": bootstrap, "value.serializer": AvroSerializer(
        SchemaRegistryClient({"url": registry}), SCHEMA.read_text())})
    n = 0
    for n, record in enumerate(records, 1):
        producer.produce("sensor.readings", key=str(record["sensor_id"]).encode(), value=dict(record))
    if producer.flush(30):
        raise RuntimeError("readings not acknowledged within 30 s")
    return n


def predictions(bootstrap: str, registry: str, ids: set[str], timeout_s: float = 60.0,
                topic: str = "predictions.fault") -> dict[str, dict[str, Any]]:
    """The predictions of the readings ``ids`` on ``topic``, by reading id, once all came or ``timeout_s``
    passed."""
    consumer = DeserializingConsumer({"bootstrap.servers": bootstrap, "group.id": f"client-{uuid.uuid4().hex[:8]}",
                                      "auto.offset.reset": "earliest",
                                      "value.deserializer": AvroDeserializer(SchemaRegistryClient({"url": registry}))})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    got: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < len(ids) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            prediction: Any = None if msg is None or msg.error() is not None else msg.value()  # deserialized
            if prediction is not None and prediction["event_id"] in ids:
                got[prediction["event_id"]] = prediction
    finally:
        consumer.close()
    return got


def main() -> int:
    endpoints = json.loads(Path(sys.argv[1] if len(sys.argv) > 1 else ".weir/endpoints.json").read_text())
    boot, registry = endpoints["kafka_bootstrap"], endpoints["schema_registry_url"]
    sent = readings(20, datetime.now(UTC) - timedelta(minutes=1))
    produce(boot, registry, sent)
    ids = {r["reading_id"] for r in sent}
    got = predictions(boot, registry, ids)
    for p in got.values():
        print(f"{p['sensor_id']}: P(fault) {p['score']:.3f} by {p['model_version']} -> "
              f"{'FAULT' if p['decision'] else 'ok'}")
    return 0 if ids <= set(got) else 1


if __name__ == "__main__":
    sys.exit(main())
