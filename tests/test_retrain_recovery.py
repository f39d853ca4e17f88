"""A registration or promotion survives a crash between the registry write and the commit: the redelivered
retrain request is recognised as done, what the crash cut short is finished, and the announcements repeat with
the same event ids (one row each in model_events) instead of another training run."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.registry import ModelRegistry
from sinks.clickhouse import ClickHouse
from streams import topics as T
from streams.base import Message, StepResult
from streams.codec import AvroCodec
from streams.stages.retrain import RetrainStage
from tests.test_threshold import MODEL, PROJECT, training_data
from tests.test_training_set import ch  # noqa: F401 (the fixture)


def request(request_id: str, offset: int) -> Message:
    req = {"request_id": request_id, "model_name": MODEL.name, "ts": datetime(2026, 1, 1, tzinfo=UTC),
           "reason": "bootstrap: no champion yet", "since_ts": None}
    return Message(T.RETRAIN, 0, offset, MODEL.name.encode(), AvroCodec(T.RETRAIN).encode(req), 0)


def announced(result: StepResult) -> list[dict[str, Any]]:
    codec = AvroCodec(T.MODEL_EVENTS)
    return [codec.decode(p.value) for p in result.produce if p.topic == T.MODEL_EVENTS]


def trained_stage(ch: ClickHouse, tmp_path: Path) -> tuple[RetrainStage, ModelRegistry]:  # noqa: F811
    """A retrain stage of the threshold test's project over its labelled payments, and its registry."""
    training_data(ch)
    registry = ModelRegistry(ch.client, tmp_path / "models")
    registry.ensure_schema()
    return RetrainStage(ch, registry, PROJECT, seed=1), registry


def test_a_redelivered_request_is_not_trained_again_and_repeats_the_same_events(
        ch: ClickHouse, tmp_path: Path) -> None:  # noqa: F811
    stage, registry = trained_stage(ch, tmp_path)
    try:
        first = announced(stage.handle([request("req-1", 0)]))  # then the process dies before the commit
        assert [e["stage"] for e in first][:1] == ["candidate"] and len(registry.list(MODEL.name)) == 1
        (v1,) = registry.list(MODEL.name)
        assert v1.lineage["retrain_requests"] == "req-1"
        again = announced(stage.handle([request("req-1", 0)]))
        assert len(registry.list(MODEL.name)) == 1 and len(stage.runs) == 1  # not trained again
        assert [(e["event_id"], e["stage"], e["version"]) for e in again] == \
               [(e["event_id"], e["stage"], e["version"]) for e in first]
        # a new request in the same batch as the redelivered one is trained
        both = announced(stage.handle([request("req-1", 0), request("req-2", 1)]))
        assert len(registry.list(MODEL.name)) == 2 and len(stage.runs) == 2
        assert {e["version"] for e in both} == {1, 2}
    finally:
        stage.close()


def test_a_promotion_cut_short_by_a_crash_is_finished_on_redelivery(
        ch: ClickHouse, tmp_path: Path) -> None:  # noqa: F811
    """The kill 48 ms after the registry write: the candidate, whose gates passed, is in the registry but was
    neither promoted nor announced."""
    registry = ModelRegistry(ch.client, tmp_path / "models")
    registry.ensure_schema()
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"not loaded by this test")
    v = registry.register(MODEL.name, artifact, metrics={"gates_passed": 1.0},
                          lineage={"retrain_requests": "req-7", "reason": "drift", "gates": "auc ok"})
    stage = RetrainStage(ch, registry, PROJECT, seed=1)
    try:
        events = announced(stage.handle([request("req-7", 0)]))
    finally:
        stage.close()
    assert stage.runs == []  # nothing trained
    assert [(e["version"], e["stage"]) for e in events] == [(v.version, "candidate"), (v.version, "production")]
    champion = registry.latest(MODEL.name)
    assert champion is not None and champion.version == v.version
    assert events[1]["reason"] == "gates passed: auc ok"
