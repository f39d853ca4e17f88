"""The minimal project of docs/projects.md, run as a user would: its own events in, predictions out.

A project of another shape than the shop (another topic, entity, view and label) runs on the same stages
without any change to Weir: readings are produced with confluent-kafka's own ``SerializingProducer`` against
Weir's schema registry, predictions are read with its ``DeserializingConsumer``. The ClickHouse stages are
left out here (the session's embedded engine belongs to the shop's end-to-end run).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import DeserializingConsumer, SerializingProducer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer

from streams import schemas
from streams import topics as T
from streams.kafka import ensure_topics
from streams.pipeline import Pipeline, PipelineConfig
from streams.project.contracts import use_project
from streams.project.load import load
from streams.project.spec import Project
from streams.stack import Endpoints
from tests.conftest import SHOP

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = "docs/examples/minimal/project.py"
N = 400


@pytest.fixture
def minimal(endpoints: Endpoints) -> Iterator[Project]:
    """The minimal project, known to this process's catalog and the session's registry (the shop's back after)."""
    project = load(str(ROOT / MINIMAL))
    ensure_topics(endpoints.kafka_bootstrap, T.all_topics(project), 4)
    previous = schemas.set_catalog(None)
    use_project(project)
    schemas.use_registry(endpoints.schema_registry_url)
    try:
        yield project
    finally:
        use_project(SHOP)
        schemas.set_catalog(previous)


def readings(start: datetime) -> list[dict[str, object]]:
    """N readings of 8 sensors, a second apart; a sensor over 90 °C is faulty."""
    out = []
    for i in range(N):
        temperature = 60.0 + (i * 37) % 45
        out.append({"reading_id": f"r-{uuid.uuid4().hex}", "sensor_id": f"s{i % 8}", "ts": start + timedelta(seconds=i),
                    "temperature": temperature, "vibration": float(i % 11), "faulty": temperature > 90})
    return out


def test_a_project_of_its_own_runs_end_to_end(minimal: Project, endpoints: Endpoints, tmp_path: Path) -> None:
    model = minimal.models[0]
    run = uuid.uuid4().hex[:8]
    config = PipelineConfig(data_dir=tmp_path, stages=("ingest", "features", "inference", "learn"),
                            group_prefix=f"minimal-{run}")
    pipeline = Pipeline(minimal, endpoints, config)
    pipeline.start()
    try:
        pipeline.wait_ready(120)
        registry = SchemaRegistryClient({"url": endpoints.schema_registry_url})
        schema = (minimal.schemas / "sensor.readings" / "v1.avsc").read_text()
        producer = SerializingProducer({"bootstrap.servers": endpoints.kafka_bootstrap,
                                        "value.serializer": AvroSerializer(registry, schema)})
        sent = readings(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20))
        for r in sent:
            producer.produce("sensor.readings", key=str(r["sensor_id"]).encode(), value=r)
        assert producer.flush(30) == 0

        consumer = DeserializingConsumer({"bootstrap.servers": endpoints.kafka_bootstrap,
                                          "group.id": f"subscriber-{run}",
                                          "value.deserializer": AvroDeserializer(registry)})
        consumer.assign([TopicPartition(model.prediction_topic, p, 0) for p in range(4)])
        got: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 120
        while len(got) < N and time.monotonic() < deadline:
            pipeline.check()
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got[msg.value()["event_id"]] = msg.value()
        consumer.close()
        learn = pipeline.stages[f"learn-{model.name}"]
        while learn.learned < N and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        pipeline.stop()

    assert set(got) == {r["reading_id"] for r in sent}  # one prediction per reading, read by a plain client
    by_id = {r["reading_id"]: r for r in sent}
    for event_id, p in got.items():
        assert p["sensor_id"] == by_id[event_id]["sensor_id"] and p["model_name"] == "fault"
        assert 0.0 <= p["score"] <= 1.0 and p["decision"] == (p["score"] >= 0.5)  # type: ignore[operator]
        assert p["model_version"] == "rules-0"  # no batch model yet: the declared rules (none: bias only)
    # the label is a field of each reading: the online learner learnt from every one right after scoring it
    assert learn.learned == N and learn.evaluator.n > 0 and learn.evaluator.value > 0.8
