"""Hot swap and routing from ``model.events``: under load, through the real broker, nothing is dropped, duplicated
or scored by a model that is not wholly loaded; and the fold of the events into champion, canary and shadows.

The session's broker is shared with the end-to-end demo, so the stages here read and write topics of this test's
own (the stages' ``rename``); the stage logic is the pipeline's.
"""

from __future__ import annotations

import dataclasses

import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from examples.fraud_shop.project import fraud
from models.base import BatchScorer
from models.export import sha256_file
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import Message
from streams.codec import AvroCodec
from streams.kafka import ensure_topics, producer_config
from streams.runtime import BatchRunner
from streams.serving.resilience import rules_for
from streams.serving.routing import ModelSlot
from streams.stack import Endpoints
from streams.stages.inference import InferenceStage
from streams.stages.model_watch import ModelWatchStage, load_event_artifact
from tests.conftest import SHOP
from tests.test_inference import PREDICTIONS, SCORING, SHADOW, onnx_model, payment

PARTS = 4


def own(run: str, topic: str) -> str:
    return f"{run}.{topic}"


def event(version: int, stage: str, path: Path) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "ts": int(time.time() * 1000), "model_name": fraud.name, "version": version,
            "stage": stage, "artifact_uri": str(path), "sha256": sha256_file(path), "metrics": {},
            "actor": "test", "reason": "test", "lineage": {"model_definition": fraud.definition}}


def read_all(bootstrap: str, topic: str, want: int, timeout: float = 60.0) -> list[Any]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 50})
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTS)])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        out.extend(m for m in c.consume(10_000, 0.5) if m.error() is None)
    time.sleep(1.0)
    out.extend(m for m in c.consume(10_000, 1.0) if m.error() is None)  # anything past `want` is a duplicate
    c.close()
    return out


def test_promotions_under_load_drop_nothing_duplicate_nothing_and_never_mix_versions(
        endpoints: Endpoints, tmp_path: Path) -> None:
    run = "hs" + uuid.uuid4().hex[:8]
    boot = endpoints.kafka_bootstrap
    inference_topics = (SCORING, PREDICTIONS, T.internal(SHOP, T.I_SCORED), T.internal(SHOP, T.I_AUDIT), SHADOW,
                        T.MODEL_METRICS)
    ensure_topics(boot, [own(run, t) for t in (*inference_topics, T.MODEL_EVENTS)], PARTS)
    v1, v2 = onnx_model(tmp_path, 1, "fraud-v1"), onnx_model(tmp_path, 2, "fraud-v2")
    loads: dict[int, tuple[float, float]] = {}

    def slow_loader(ev: dict[str, Any]) -> BatchScorer:
        started = time.time()
        time.sleep(0.6)  # a big model's load: inference must keep serving the old version meanwhile
        scorer = load_event_artifact(ev)
        loads[ev["version"]] = (started, time.time())
        return scorer

    slot = ModelSlot(rules_for(fraud))
    stage = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url), slot, max_batch=64,
                           rename={t: own(run, t) for t in inference_topics})
    assert stage.topics == (own(run, SCORING),)
    inference = BatchRunner(stage, boot, group_id=f"{run}-inference", max_batch=8, max_wait_ms=5)
    watch_stage = ModelWatchStage(fraud, slot, loader=slow_loader, rename={T.MODEL_EVENTS: own(run, T.MODEL_EVENTS)})
    watch = BatchRunner(watch_stage, boot, group_id=f"{run}-watch", max_wait_ms=50)
    for runner in (inference, watch):
        runner.start()
    producer = Producer(producer_config(boot))
    codec, events = AvroCodec(SCORING), AvroCodec(T.MODEL_EVENTS)
    n_msgs, per_msg = 300, 10
    try:
        for runner in (inference, watch):
            assert runner.ready.wait(30)
        for i in range(n_msgs):  # ~1,000 payments/s for 3 s, two promotions on the way
            items = [payment(i * per_msg + j, run) | {"source_ms": int(time.time() * 1000)} for j in range(per_msg)]
            producer.produce(own(run, SCORING), codec.encode({"items": items}), partition=i % PARTS)
            if i == 60:
                producer.produce(own(run, T.MODEL_EVENTS), events.encode(event(1, "production", v1.path)), partition=0)
            if i == 180:
                producer.produce(own(run, T.MODEL_EVENTS), events.encode(event(2, "production", v2.path)), partition=0)
            producer.poll(0)
            time.sleep(0.01)
        producer.flush(10)
        preds = read_all(boot, own(run, PREDICTIONS), n_msgs * per_msg)
        scored = read_all(boot, own(run, T.internal(SHOP, T.I_SCORED)), 1, timeout=5)
    finally:
        for runner in (inference, watch):
            runner.stop()
    assert inference.error is None and watch.error is None
    pred_codec = AvroCodec(PREDICTIONS)
    records = [pred_codec.decode(m.value()) for m in preds]
    ids = [r["event_id"] for r in records]
    assert len(ids) == len(set(ids)) == n_msgs * per_msg  # none dropped, none twice
    features = {i["event_id"]: i["features"] for m in scored for i in AvroCodec(T.I_SCORED).decode(m.value())["items"]}
    models: dict[str, BatchScorer] = {"fraud-v1": v1, "fraud-v2": v2, "rules-0": rules_for(fraud)}
    by_version: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_version[r["model_version"]].append(r)
    assert set(by_version) == set(models)  # both promotions happened mid-stream
    for version, recs in by_version.items():  # every score is exactly its named version's score
        X = np.asarray([features[r["event_id"]] for r in recs], dtype=np.float32)
        np.testing.assert_allclose([r["score"] for r in recs], models[version].predict(X), atol=1e-6)
    # per input partition, in input order, the version only moves forward: each swap fell between two batches
    rank = {"rules-0": 0, "fraud-v1": 1, "fraud-v2": 2}
    source_part = {p: i % PARTS for i in range(n_msgs) for p in (f"{run}-e{i * per_msg + j}" for j in range(per_msg))}
    order = {f"{run}-e{k}": k for k in range(n_msgs * per_msg)}
    for part in range(PARTS):
        seq = [rank[r["model_version"]] for r in sorted(records, key=lambda r: order[r["event_id"]])
               if source_part[r["event_id"]] == part]
        assert seq == sorted(seq)
    # while v2 was loading (in the background), v1 kept serving
    started, finished = loads[2]
    during = [r for r in records if started + 0.05 < r["predicted_ts"].timestamp() < finished - 0.05]
    assert during and {r["model_version"] for r in during} == {"fraud-v1"}


class Named:
    def __init__(self, version: str) -> None:
        self.version = version

    def predict(self, X: Any) -> Any:
        return np.zeros(len(X))


def _events(*evs: dict[str, Any]) -> list[Message]:
    codec = AvroCodec(T.MODEL_EVENTS)
    return [Message(T.MODEL_EVENTS, 0, i, None, codec.encode(e), 0) for i, e in enumerate(evs)]


def test_the_fold_of_model_events_gives_champion_canary_shadows_and_rollback(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a model")
    loaded: list[int] = []

    def loader(ev: dict[str, Any]) -> BatchScorer:
        if ev["version"] == 5:
            raise ValueError("corrupt artifact")
        loaded.append(ev["version"])
        return Named(f"fraud-v{ev['version']}")  # type: ignore[return-value]

    slot = ModelSlot(Named("rules-0"))  # type: ignore[arg-type]
    watch = ModelWatchStage(fraud, slot, canary_fraction=0.25, loader=loader)
    watch.handle(_events(event(1, "production", path), event(2, "canary", path), event(3, "shadow", path),
                         {**event(4, "refused", path), "artifact_uri": ""}))
    m = slot.models
    assert (m.champion.version, m.canary.version if m.canary else None, m.canary_fraction,
            [s.version for s in m.shadows]) == ("fraud-v1", "fraud-v2", 0.25, ["fraud-v3"])
    watch.handle(_events(event(2, "production", path)))  # the canary is promoted: v1 is archived
    m = slot.models
    assert (m.champion.version, m.canary, [s.version for s in m.shadows]) == ("fraud-v2", None, ["fraud-v3"])
    watch.handle(_events(event(1, "production", path), event(3, "archived", path)))  # rollback; shadow retired
    m = slot.models
    assert (m.champion.version, m.shadows) == ("fraud-v1", ())
    assert loaded == [1, 2, 3, 1]  # each loaded when it came to serve; v1 again on the rollback (archived meanwhile)
    swaps = slot.swaps
    watch.handle(_events(event(5, "production", path)))  # an artifact that does not load: left out, v1 serves on
    assert slot.models.champion.version == "fraud-v1" and slot.swaps == swaps


@pytest.mark.parametrize("stage", ["candidate", "archived"])
def test_versions_outside_serving_stages_are_not_loaded(tmp_path: Path, stage: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    slot = ModelSlot(Named("rules-0"))  # type: ignore[arg-type]
    ModelWatchStage(fraud, slot, loader=lambda ev: pytest.fail("loaded")).handle(_events(event(1, stage, path)))
    assert slot.models.champion.version == "rules-0" and slot.swaps == 0


def test_a_version_trained_for_another_definition_never_serves(tmp_path: Path) -> None:
    """The model's features changed (a new definition version): artifacts trained for the old one expect other
    inputs. They do not serve, the rules do, until a version is trained for the new definition."""
    path = tmp_path / "m.onnx"
    path.write_bytes(b"x")
    slot = ModelSlot(Named("rules-0"))  # type: ignore[arg-type]
    changed = dataclasses.replace(fraud, version=fraud.version + 1, features=fraud.features[:-1])
    watch = ModelWatchStage(changed, slot, loader=lambda ev: Named(f"fraud-v{ev['version']}"))  # type: ignore[arg-type,return-value]
    old = event(1, "production", path)  # trained for the shop's declared definition
    watch.handle(_events(old, {**event(2, "canary", path), "lineage": {}}))  # and one of unknown lineage
    assert slot.models.champion.version == "rules-0" and slot.models.canary is None and slot.swaps == 0
    watch.handle(_events({**event(3, "production", path), "lineage": {"model_definition": changed.definition}}))
    assert slot.models.champion.version == "fraud-v3"
