"""The minimal project of docs/projects.md, run as a user would: its own events in, predictions out.

A project of another shape than the shop (another topic, entity, view and label) runs on the same stages
without any change to Weir: readings are produced with confluent-kafka's own ``SerializingProducer`` against
Weir's schema registry, predictions are read with its ``DeserializingConsumer`` (``examples/minimal/client.py``,
the application docs/projects.md shows). The ClickHouse stages are left out here (the session's embedded
engine belongs to the end-to-end runs).
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from examples.minimal import client
from streams.pipeline import Pipeline, PipelineConfig
from streams.project.spec import Project
from streams.stack import Endpoints

N = 400


def test_a_project_of_its_own_runs_end_to_end(minimal: Project, endpoints: Endpoints, tmp_path: Path) -> None:
    model = minimal.models[0]
    run = uuid.uuid4().hex[:8]
    config = PipelineConfig(data_dir=tmp_path, stages=("ingest", "features", "inference", "learn"),
                            group_prefix=f"minimal-{run}")
    pipeline = Pipeline(minimal, endpoints, config)
    pipeline.start()
    try:
        pipeline.wait_ready(120)
        # the application: confluent-kafka's own serializer and deserializer (examples/minimal/client.py)
        sent = client.readings(N, datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20))
        assert client.produce(endpoints.kafka_bootstrap, endpoints.schema_registry_url, sent) == N
        got = client.predictions(endpoints.kafka_bootstrap, endpoints.schema_registry_url,
                                 {str(r["reading_id"]) for r in sent}, timeout_s=120)
        pipeline.check()
        deadline = time.monotonic() + 60
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
