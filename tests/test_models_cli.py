"""Model lifecycle commands (promote, forced promote, refusal, rollback) and `weir models`' views of the audit log."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from models.registry import ModelRegistry
from sinks.clickhouse import ClickHouse
from sinks.events import MODEL_COLS
from streams import models_cli
from streams import topics as T
from streams.base import Message
from streams.codec import AvroCodec
from streams.kafka import producer_config
from streams.stack import Endpoints
from streams.stages.retrain import RetrainStage
from tests.conftest import SHOP

GATES_OK = {"auc_val": 0.93, "gates_passed": 1.0}
GATES_FAILED = {"auc_val": 0.81, "gates_passed": 0.0}


@pytest.fixture
def lifecycle(tmp_path: Path, clickhouse_client: Any, chdb_path: Path) -> Any:
    ch = ClickHouse(f"chdb://{chdb_path}", database=clickhouse_client.database)
    ch.ensure_schema()
    registry = ModelRegistry(clickhouse_client, tmp_path / "artifacts")
    registry.ensure_schema()
    stage = RetrainStage(ch, registry, SHOP)
    yield ch, registry, stage
    stage.close()


def _register(registry: ModelRegistry, tmp_path: Path, metrics: dict[str, float], gates: str) -> int:
    artifact = tmp_path / f"{uuid.uuid4().hex}.onnx"
    artifact.write_bytes(uuid.uuid4().bytes)
    lineage = {"rows": "100", "gates": gates, "learning_curve": "[[1, 0.5, 0.6, 0.7], [2, 0.4, 0.5, 0.8]]"}
    return registry.register("fraud", artifact, metrics=metrics, lineage=lineage, stage="candidate").version


def _command(action: str, version: int = 0, *, force: bool = False) -> dict[str, Any]:
    return {"command_id": uuid.uuid4().hex, "ts": datetime.now(UTC), "action": action, "model_name": "fraud",
            "version": version, "stage": "production", "actor": "alice", "reason": "test", "force": force}


def _run(stage: RetrainStage, ch: ClickHouse, cmd: dict[str, Any]) -> dict[str, Any]:
    """The stage handles the command; its answer goes to model_events as the sink would write it."""
    msg = Message(T.MODEL_COMMANDS, 0, 0, None, AvroCodec(T.MODEL_COMMANDS).encode(cmd), 0)
    (produced,) = stage.handle([msg]).produce
    answer = AvroCodec(T.MODEL_EVENTS).decode(produced.value)
    ch.insert("model_events", [[answer[c] for c in MODEL_COLS]], MODEL_COLS)
    return answer


def test_promotion_is_gated_forcing_is_audited_and_rollback_restores_the_previous(
        lifecycle: Any, tmp_path: Path) -> None:
    ch, registry, stage = lifecycle
    v1 = _register(registry, tmp_path, GATES_OK, "quality ok")
    v2 = _register(registry, tmp_path, GATES_OK, "quality ok")
    v3 = _register(registry, tmp_path, GATES_FAILED, "quality FAILED: auc_val 0.8100 is 0.1200 below")
    events = [_run(stage, ch, _command("promote", v)) for v in (v1, v2)]
    assert [e["stage"] for e in events] == ["production", "production"]

    refused = _run(stage, ch, _command("promote", v3))
    assert refused["stage"] == "refused" and "did not pass its gates" in refused["reason"]
    assert "quality FAILED" in refused["reason"] and registry.latest("fraud").version == v2  # type: ignore[union-attr]

    forced = _run(stage, ch, _command("promote", v3, force=True))
    assert forced["stage"] == "production" and forced["reason"].startswith("FORCED past failed gates")
    assert forced["actor"] == "alice" and registry.latest("fraud").version == v3  # type: ignore[union-attr]

    back = _run(stage, ch, _command("rollback"))
    assert (back["version"], back["stage"]) == (v2, "production") and back["reason"].startswith("rollback")
    assert registry.latest("fraud").version == v2  # type: ignore[union-attr]
    assert {mv.version: mv.stage for mv in registry.list("fraud")} == {v1: "archived", v2: "production",
                                                                      v3: "archived"}
    unknown = _run(stage, ch, _command("promote", 99))
    assert unknown["stage"] == "refused" and "no version 99" in unknown["reason"]

    # the CLI's view of the audit log agrees with the registry
    states = models_cli.fold([*events, refused, forced, back, unknown])
    assert {v: s.stage for (_, v), s in states.items()} == {v1: "archived", v2: "production", v3: "archived"}
    listing = "\n".join(models_cli.list_lines(states))
    assert "FAILED" in listing and "rollback" in listing
    shown = "\n".join(models_cli.show_lines(states[("fraud", v3)]))
    assert "FORCED" in shown and "gates_passed" in shown and "learning_curve" not in shown
    runs = models_cli.runs_lines(states, curve_of=v1)
    assert len(runs) == 1 + 3 + 1 + 2 and runs[4].split() == ["2", "0.4000", "0.5000", "0.8000"]  # v1's curve


def test_rollback_without_an_earlier_production_version_is_refused(lifecycle: Any, tmp_path: Path) -> None:
    ch, registry, stage = lifecycle
    assert "no production version" in _run(stage, ch, _command("rollback"))["reason"]
    v1 = _register(registry, tmp_path, GATES_OK, "ok")
    _run(stage, ch, _command("promote", v1))
    assert "only version that was ever in production" in _run(stage, ch, _command("rollback"))["reason"]


def test_the_cli_sends_commands_and_reads_answers_through_kafka(endpoints: Endpoints) -> None:
    cmd = _command("rollback")
    answer = {"event_id": "e", "ts": datetime.now(UTC), "model_name": "fraud", "version": 2, "stage": "production",
              "artifact_uri": "/a", "sha256": "0" * 64, "metrics": {}, "actor": "alice", "lineage": {},
              "reason": f"rollback: test (command {cmd['command_id']})"}
    producer = Producer(producer_config(endpoints.kafka_bootstrap))
    producer.produce(T.MODEL_EVENTS, AvroCodec(T.MODEL_EVENTS).encode(answer), b"fraud")
    assert producer.flush(30) == 0
    got = models_cli.send_command(endpoints.kafka_bootstrap, cmd, timeout_s=30)
    assert got["reason"] == answer["reason"] and got["version"] == 2
    args = models_cli.argparse.Namespace(name="fraud", reason="why", actor="bob")
    assert models_cli._command(args, "rollback")["actor"] == "bob"
