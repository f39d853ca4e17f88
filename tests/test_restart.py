"""What a restart of the embedded stack keeps: the schema registry's subjects, versions and ids, the model
registry's transitions and what was applied of the project, journaled by Weir because the broker keeps nothing
(docs/runtime.md, "What a restart keeps")."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from examples.minimal import client
from streams import models_cli
from streams import topics as T
from streams.codec import AvroCodec
from streams.embedded.journal import TopicJournal
from streams.embedded.kafka import EmbeddedKafka
from streams.kafka import ensure_topics, producer_config, read_until_idle
from streams.pipeline import Pipeline, PipelineConfig
from streams.project.load import load
from streams.settings import WeirSettings
from streams.stack import Stack

MINIMAL = str(Path(__file__).resolve().parent.parent / "examples/minimal/project.py")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _registry_state(url: str) -> dict[str, Any]:
    """Every subject's versions with their ids and schemas, as a client reads them."""
    out = {}
    for subject in _get(f"{url}/subjects"):
        for version in _get(f"{url}/subjects/{subject}/versions"):
            v = _get(f"{url}/subjects/{subject}/versions/{version}")
            out[f"{subject}/{version}"] = (v["id"], v["schema"])
    return out


def test_a_restart_keeps_the_registries_and_the_applied_project(tmp_path: Path) -> None:
    """Tried on an earlier Weir: after a restart `weir models list` said no model was registered (the
    registry's files were there, its model.events log was not) and every schema got registered anew."""
    project = load(MINIMAL)
    settings = WeirSettings(data_dir=tmp_path)
    event = {"event_id": uuid.uuid4().hex, "ts": datetime(2026, 11, 30, 12, 0, tzinfo=UTC), "model_name": "m",
             "version": 3, "stage": "production", "artifact_uri": "file:///a.onnx", "sha256": "00" * 32,
             "metrics": {"auc_val": 0.91}, "actor": "alice", "reason": "promoted", "lineage": {"rows": "10"}}
    first = Stack(settings, project)
    try:
        e = first.start()
        before = _registry_state(e.schema_registry_url)
        producer = Producer(producer_config(e.kafka_bootstrap))
        producer.produce(T.MODEL_EVENTS, AvroCodec(T.MODEL_EVENTS).encode(event), b"m")
        producer.flush(10)
        del producer
    finally:
        first.stop()

    again = Stack(settings, project)
    try:
        e = again.start()
        assert again.restored[T.MODEL_EVENTS] == 1 and again.restored["_schemas"] >= len(before)
        assert again.plan is not None and again.plan.compared
        assert {c.action for c in again.plan.changes} == {"unchanged"}, again.plan.lines()
        assert _registry_state(e.schema_registry_url) == before
        (kept,) = models_cli.read_events(e.kafka_bootstrap)
        assert kept == event
    finally:
        again.stop()


def test_the_journal_restores_records_as_they_were(tmp_path: Path) -> None:
    records = [(0, b"k1", b"v1", [("h", b"x")], 1_700_000_000_001), (1, None, b"v2", [], 1_700_000_000_002),
               (0, b"k1", None, [], 1_700_000_000_003), (0, b"k2", b"v3", [("a", b""), ("b", b"2")], 1_700_000_000_004)]

    def seen(bootstrap: str) -> list[tuple[Any, ...]]:
        return [(m.partition(), m.key(), m.value(), m.headers() or [], m.timestamp()[1])
                for m in read_until_idle(bootstrap, ["t"], 2, idle_s=1.5)]

    kafka = EmbeddedKafka(tmp_path / "k1")
    kafka.start()
    try:
        ensure_topics(kafka.bootstrap, ["t"], 2)
        journal = TopicJournal(kafka.bootstrap, tmp_path / "journal", ["t"])
        assert journal.restore() == {"t": 0}
        journal.start()
        producer = Producer(producer_config(kafka.bootstrap))
        for p, k, v, h, ts in records:
            producer.produce("t", v, k, partition=p, headers=h, timestamp=ts)
        producer.flush(10)
        del producer
        journal.stop()
        assert journal.error is None and journal.appended == 4
        expected = sorted(seen(kafka.bootstrap), key=lambda r: (r[0], r[4]))
        assert [r[1:] for r in expected] == [r[1:] for r in sorted(records, key=lambda r: (r[0], r[4]))]
    finally:
        kafka.stop()
    with (tmp_path / "journal" / "t.jsonl").open("ab") as f:
        f.write(b'{"p":0,"k":nu')  # killed mid-write: the torn line is left out
    kafka = EmbeddedKafka(tmp_path / "k2")  # a new broker: empty, as after a restart
    kafka.start()
    try:
        ensure_topics(kafka.bootstrap, ["t"], 2)
        journal = TopicJournal(kafka.bootstrap, tmp_path / "journal", ["t"])
        assert journal.restore() == {"t": 4}
        assert sorted(seen(kafka.bootstrap), key=lambda r: (r[0], r[4])) == expected
        journal.start()  # what comes after the torn line is kept too (the line was cut off the file)
        producer = Producer(producer_config(kafka.bootstrap))
        producer.produce("t", b"v5", b"k5", partition=1, timestamp=1_700_000_000_005)
        producer.flush(10)
        del producer
        journal.stop()  # at once: the stop drains what was acknowledged
        assert journal.appended == 1 and journal.error is None
    finally:
        kafka.stop()
    kafka = EmbeddedKafka(tmp_path / "k3")
    kafka.start()
    try:
        ensure_topics(kafka.bootstrap, ["t"], 2)
        assert TopicJournal(kafka.bootstrap, tmp_path / "journal", ["t"]).restore() == {"t": 5}
    finally:
        kafka.stop()


def _run_readings(pipeline: Pipeline, e: Any, readings: list[dict[str, Any]], learned: int) -> dict[str, Any]:
    """Start ``pipeline``, produce ``readings``, wait for their predictions and for the learner to have learnt
    ``learned`` in all, then stop it cleanly (snapshots are saved on the way out); returns how the features and
    learn stages restored each unit of state."""
    pipeline.start()
    try:
        pipeline.wait_ready(120)
        assert client.produce(e.kafka_bootstrap, e.schema_registry_url, readings) == len(readings)
        got = client.predictions(e.kafka_bootstrap, e.schema_registry_url, {r["reading_id"] for r in readings},
                                 timeout_s=120)
        assert len(got) == len(readings)
        learn = pipeline.stages["learn-fault"]
        deadline = time.monotonic() + 60
        while learn.evaluator.n < learned and time.monotonic() < deadline:
            time.sleep(0.2)
        pipeline.check()
        return {name: dict(pipeline.stages[name].restored) for name in ("features", "learn-fault")}
    finally:
        pipeline.stop()


def test_a_restart_carries_the_feature_windows_and_the_online_learner_over(tmp_path: Path) -> None:
    """Tried on an earlier Weir: after a restart of `weir up` the online learner and every feature window
    started empty (Redis kept nothing, and a snapshot's positions meant nothing in the broker's new log)."""
    project = load(MINIMAL)
    settings = WeirSettings(data_dir=tmp_path)
    config = PipelineConfig(data_dir=tmp_path, stages=("ingest", "features", "inference", "learn"))
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)
    with Stack(settings, project) as e:
        first = Pipeline(project, e, config)
        _run_readings(first, e, client.readings(200, start), learned=200)
        before = first.stages["learn-fault"].evaluator.n
    assert before >= 200

    with Stack(settings, project) as e:
        second = Pipeline(project, e, config)
        restored = _run_readings(second, e, client.readings(40, start + timedelta(seconds=200)),
                                 learned=before + 40)
        learn = second.stages["learn-fault"]
        assert restored["learn-fault"] == {learn.snapshot_name: "earlier log"}, restored
        assert learn.evaluator.n == before + 40  # the metric (and the model) went on from the first run's
        assert "earlier log" in restored["features"].values() and "log" not in restored["features"].values()
