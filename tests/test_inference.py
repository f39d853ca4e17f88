"""The inference stage: micro-batches in input order, routing, degradation, the response cache and the audit record.

Models are real ONNX files (tiny torch modules exported by :func:`models.export.export_onnx`); features come from
the real embedded Redis, cut by a TCP proxy to test degradation.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import redis
import torch
from torch import nn

from examples.fraud_shop.project import card as CARD
from examples.fraud_shop.project import fraud
from examples.fraud_shop.project import user as USER
from models.export import export_onnx
from models.online import RiverLearner
from models.scorer import OnnxScorer
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import Message, StepResult
from streams.codec import AvroCodec
from streams.features.definitions import view_key
from streams.serving.cache import ResponseCache, feature_hash
from streams.serving.resilience import Breaker, OnlineFallback, ScoringChain, rules_for
from streams.serving.routing import ModelSet, ModelSlot, in_canary
from streams.stack import Endpoints
from streams.stages.inference import InferenceStage
from streams.stages.learn import serving_snapshot
from streams.state import SignedSnapshots
from tests.conftest import SHOP
from tests.faults import TcpProxy

T0 = 1_700_000_000_000
FEATURE_NAMES = fraud.feature_names
F = len(FEATURE_NAMES)
SCORING = "weir.fraud_shop.scoring.payments"
SCORED, AUDIT = T.internal(SHOP, T.I_SCORED), T.internal(SHOP, T.I_AUDIT)  # the shop's own internal topics  # the fraud model's scoring topic (its scored source: payments)
PREDICTIONS = fraud.prediction_topic
SHADOW = fraud.shadow_topic
SERVING_SNAPSHOT = serving_snapshot(fraud)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def onnx_model(tmp: Path, seed: int, version: str) -> OnnxScorer:
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(F, 4), nn.Tanh(), nn.Linear(4, 1), nn.Sigmoid(), nn.Flatten(0))
    path = tmp / f"{version}.onnx"
    export_onnx(module.eval(), F, path)
    return OnnxScorer(path, version, prefer_gpu=False)


class Failing:
    """A model whose every run fails (as a corrupt session or a device error would)."""

    def __init__(self, version: str, error: Exception) -> None:
        self.version = version
        self.error = error
        self.calls = 0

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        self.calls += 1
        raise self.error


def payment(i: int, run: str, card: str | None = None) -> dict[str, Any]:
    """A scored event of the fraud model: a silver payment with the card view's values the features stage
    attached (the user view is read from Redis)."""
    card_values = [float(i % 5), float(i % 3), 10.0 + i, 0.0, 1.0, float(i % 2)][:len(CARD.features)]
    card_values += [0.0] * (len(CARD.features) - len(card_values))
    return {"event_id": f"{run}-e{i}", "payment_id": f"{run}-p{i}", "card_id": card or f"{run}-card{i % 50}",
            "customer_id": f"{run}-cust{i % 20}", "merchant_id": "m1", "merchant_category": "digital_goods",
            "amount": 5.0 + i, "device_id": None, "ts_ms": T0 + i, "source_ms": T0 + i,
            "served": {view_key(CARD): card_values}}


def messages(payments: list[dict[str, Any]], partitions: int = 2, per_message: int = 7) -> list[Message]:
    codec = AvroCodec(SCORING)
    out: list[Message] = []
    offsets = [0] * partitions
    for start in range(0, len(payments), per_message):
        part = (start // per_message) % partitions
        out.append(Message(SCORING, part, offsets[part], None,
                           codec.encode({"items": payments[start:start + per_message]}), T0))
        offsets[part] += 1
    return out


def produced(result: StepResult, topic: str) -> list[dict[str, Any]]:
    codec = AvroCodec(topic)
    return [codec.decode(p.value) for p in result.produce if p.topic == topic]


def items(result: StepResult, topic: str) -> list[dict[str, Any]]:
    return [i for r in produced(result, topic) for i in r["items"]]


def audit_rows(result: StepResult) -> list[dict[str, Any]]:
    """The ``weir.audit`` records (columnar per partition) as one dict per answer."""
    rows = []
    for r in produced(result, AUDIT):
        n = r["n_features"]
        for i, event in enumerate(r["event_ids"]):
            rows.append({"event_id": event, "model_name": r["model_name"], "entity_id": r["entity_ids"][i],
                         "score": r["scores"][i], "decision": r["decisions"][i], "threshold": r["threshold"],
                         "model_version": r["model_versions"][i], "route": r["routes"][i],
                         "served_by": r["served_by"][i], "degraded": r["degraded"][i],
                         "feature_hash": r["feature_hashes"][i],
                         "features": r["features"][i * n:(i + 1) * n] if r["features"] else None,
                         "queue_ms": r["queue_ms"][i], "fetch_ms": r["fetch_ms"], "inference_ms": r["inference_ms"],
                         "publish_ms": r["publish_ms"]})
    return rows


def served_matrix(result: StepResult, preds: list[dict[str, Any]]) -> npt.NDArray[np.float32]:
    """The feature vectors the stage served, in the order of ``preds``."""
    scored = {i["event_id"]: i["features"] for i in items(result, SCORED)}
    return np.asarray([scored[p["event_id"]] for p in preds], dtype=np.float32)


def write_users(url: str, run: str, n: int = 20) -> dict[str, list[float]]:
    values = {f"{run}-cust{i}": [float(i + k) for k in range(len(USER.features))] for i in range(n)}
    OnlineStore(url).write(USER, [(c, T0, v) for c, v in values.items()])
    return values


@pytest.fixture
def run() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxScorer, OnnxScorer]:
    tmp = tmp_path_factory.mktemp("models")
    return onnx_model(tmp, 1, "fraud-v1"), onnx_model(tmp, 2, "fraud-v2")


def test_every_payment_is_scored_once_in_input_order_per_partition(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str) -> None:
    v1, _ = models
    write_users(endpoints.redis_url, run)
    pays = [payment(i, run) for i in range(300)]
    msgs = messages(pays, partitions=3)
    stage = InferenceStage(SHOP, replace(fraud, threshold=0.5), OnlineStore(endpoints.redis_url), ModelSlot(v1),
                           max_batch=64)
    result = stage.handle(msgs)
    preds = produced(result, PREDICTIONS)
    assert sorted(p["event_id"] for p in preds) == sorted(p["event_id"] for p in pays)  # none lost, none twice
    expected_order = [p["event_id"] for m in msgs for p in AvroCodec(SCORING).decode(m.value)["items"]]
    assert [p["event_id"] for p in preds] == expected_order  # batches formed across partitions, order kept
    X = served_matrix(result, preds)
    np.testing.assert_allclose([p["score"] for p in preds], v1.predict(X), rtol=0, atol=1e-6)
    user = X[:, len(CARD.features):len(CARD.features) + len(USER.features)]
    assert user.max() > 0  # the user view came from Redis
    for p in preds:
        assert (p["route"], p["served_by"], p["model_version"], p["degraded"]) == ("champion", "model", "fraud-v1",
                                                                                  False)
        assert p["decision"] == (p["score"] >= 0.5) and p["threshold"] == 0.5
    # the scored batches go back to the partition the payments came from
    parts = {p["event_id"]: m.partition for m in msgs for p in AvroCodec(SCORING).decode(m.value)["items"]}
    for rec in result.produce:
        if rec.topic == SCORED:
            assert {parts[i["event_id"]] for i in AvroCodec(SCORED).decode(rec.value)["items"]} == {rec.partition}
    cards = {p["event_id"]: p["card_id"] for p in pays}
    for i in items(result, SCORED):  # named by model and entity (the card); no label at scoring time
        assert (i["model_name"], i["entity_id"], i["label"]) == ("fraud", cards[i["event_id"]], None)


def test_the_canary_takes_its_fraction_of_entities_by_stable_hash_and_shadows_only_shadow(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str, tmp_path: Path) -> None:
    v1, v2 = models
    v3 = onnx_model(tmp_path, 3, "fraud-v3")
    pays = [payment(i, run, card=f"{run}-card{i}") for i in range(2000)]
    slot = ModelSlot(ModelSet(v1, canary=v2, canary_fraction=0.2, shadows=(v3,)))
    stage = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url), slot, max_batch=256)
    result = stage.handle(messages(pays))
    preds = produced(result, PREDICTIONS)
    canary = [p for p in preds if p["route"] == "canary"]
    assert all(p["model_version"] == "fraud-v2" for p in canary)
    assert all(p["model_version"] == "fraud-v1" for p in preds if p["route"] == "champion")
    assert {p["card_id"] for p in canary} == {p["card_id"] for p in preds if in_canary(p["card_id"], 0.2)}
    assert 0.15 < len(canary) / len(preds) < 0.25
    # the same entity takes the same route in another batch, in another stage (process)
    other = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url), slot)
    again = produced(other.handle(messages(pays[:300])), PREDICTIONS)
    assert [p["route"] for p in again] == [p["route"] for p in preds[:300]]
    # the shadow scored every payment, on its own topic only
    shadow = produced(result, SHADOW)
    assert [s["event_id"] for s in shadow] == [p["event_id"] for p in preds]
    assert {(s["route"], s["model_version"]) for s in shadow} == {("shadow", "fraud-v3")}
    assert all(p["model_version"] != "fraud-v3" for p in preds)
    np.testing.assert_allclose([s["score"] for s in shadow], v3.predict(served_matrix(result, shadow)), atol=1e-6)
    audit = audit_rows(result)
    assert len(audit) == 2 * len(preds)  # the served answer and the shadow's
    assert {a["route"] for a in audit} == {"champion", "canary", "shadow"}


def test_redis_down_gives_last_known_or_default_features_flagged_degraded_and_recovers(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str) -> None:
    v1, _ = models
    users = write_users(endpoints.redis_url, run, n=10)
    proxy, url = TcpProxy.to_url(endpoints.redis_url)
    clock = Clock()
    try:
        stage = InferenceStage(SHOP, fraud, OnlineStore(url, timeout_s=0.25), ModelSlot(v1), max_batch=64)
        stage.served.breaker = Breaker("redis", cooldown_s=1.0, clock=clock)
        known = [payment(i, run) for i in range(10)]  # customers cust0..cust9: read while Redis is up
        first = stage.handle(messages(known))
        assert not any(p["degraded"] for p in produced(first, PREDICTIONS))

        proxy.down()
        later = [payment(i, run) for i in range(10, 40)]  # cust10..19 were never read: no last-known values
        result = stage.handle(messages(later))
        preds = produced(result, PREDICTIONS)
        assert len(preds) == 30 and all(p["degraded"] and p["served_by"] == "model" for p in preds)
        lo, hi = len(CARD.features), len(CARD.features) + len(USER.features)
        for item in items(result, SCORED):
            cust = next(p["customer_id"] for p in later if p["event_id"] == item["event_id"])
            want = users[cust] if cust in {f"{run}-cust{i}" for i in range(10)} else USER.defaults
            assert item["features"][lo:hi] == pytest.approx(want)
        assert stage.served.breaker.outages == 1

        proxy.up()
        assert produced(stage.handle(messages(later[:5])), PREDICTIONS)[0]["degraded"]  # still cooling down
        clock.now += 1.5
        recovered = produced(stage.handle(messages(later)), PREDICTIONS)
        assert not any(p["degraded"] for p in recovered)  # automatic, once Redis answers the probe
        assert not stage.served.breaker.is_open
    finally:
        proxy.close()


def test_a_hung_redis_costs_one_timeout_then_the_breaker_skips_it(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str) -> None:
    v1, _ = models
    write_users(endpoints.redis_url, run, n=20)
    proxy, url = TcpProxy.to_url(endpoints.redis_url)
    clock = Clock()
    try:
        stage = InferenceStage(SHOP, fraud, OnlineStore(url, timeout_s=0.2), ModelSlot(v1), max_batch=64)
        stage.served.breaker = Breaker("redis", cooldown_s=1.0, clock=clock)
        assert not any(p["degraded"] for p in produced(stage.handle(messages([payment(0, run)])), PREDICTIONS))
        proxy.hung.set()  # Redis accepts and reads, and never answers
        for _ in range(3):
            preds = produced(stage.handle(messages([payment(i, run) for i in range(30)])), PREDICTIONS)
            assert len(preds) == 30 and all(p["degraded"] for p in preds)
        assert stage.served.breaker.failures == 1  # the first batch paid the timeout; the next two skipped Redis
        proxy.hung.clear()
        proxy.down()  # the hung connection is dropped; a fresh one answers
        proxy.up()
        clock.now += 1.5
        assert not any(p["degraded"] for p in produced(stage.handle(messages([payment(1, run)])), PREDICTIONS))
    finally:
        proxy.close()


def test_a_failing_model_falls_back_to_the_online_learner_then_rules_and_recovers(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str) -> None:
    v1, _ = models
    pays = [payment(i, run) for i in range(40)]
    clock = Clock()
    broken = Failing("fraud-v9", RuntimeError("CUDA error: an illegal memory access"))
    # no online learner snapshot: the rule score
    snaps = SignedSnapshots.from_url(endpoints.redis_url, b"k" * 32, prefix=f"weir:test:{run}")
    chain = ScoringChain(rules_for(fraud),
                         online=OnlineFallback(snaps, SERVING_SNAPSHOT, FEATURE_NAMES, refresh_s=0, clock=clock),
                         cooldown_s=5.0, clock=clock)
    slot = ModelSlot(broken)  # type: ignore[arg-type]
    stage = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url), slot, chain=chain)
    preds = produced(stage.handle(messages(pays)), PREDICTIONS)
    assert {(p["served_by"], p["model_version"]) for p in preds} == {("rules", "rules-0")}
    # the learn stage's serving snapshot appears: the online learner serves, its version named
    learner = RiverLearner("logreg", seed=1)
    for i in range(50):
        learner.learn_one(dict(zip(FEATURE_NAMES, np.random.default_rng(i).normal(size=F).tolist())), i % 3 == 0)
    snaps.save(SERVING_SNAPSHOT, {"version": "river-logreg", "learner": learner})
    result = stage.handle(messages(pays))
    preds = produced(result, PREDICTIONS)
    assert {(p["served_by"], p["model_version"]) for p in preds} == {("online", "river-logreg")}
    X = served_matrix(result, preds)
    want = [learner.predict_proba_one(dict(zip(FEATURE_NAMES, map(float, x)))) for x in X]
    assert [p["score"] for p in preds] == pytest.approx(want)
    assert broken.calls == 1  # the breaker skips the failed version while it cools down
    # a healthy version replaces it: served at once; the failed one is probed again after the cool-down
    slot.swap(v1)
    assert {p["served_by"] for p in produced(stage.handle(messages(pays)), PREDICTIONS)} == {"model"}
    slot.swap(broken)  # type: ignore[arg-type]
    clock.now += 6
    stage.handle(messages(pays[:5]))
    assert broken.calls == 2
    snaps.delete(SERVING_SNAPSHOT)


def test_a_model_that_hangs_is_given_up_on_after_the_timeout(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str) -> None:
    import threading

    release = threading.Event()

    class Hung:
        version = "fraud-v8"

        def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            release.wait(10)
            return np.zeros(X.shape[0])

    stage = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url),
                           ModelSlot(Hung()),  # type: ignore[arg-type]
                           chain=ScoringChain(rules_for(fraud), timeout_s=0.05))
    try:
        preds = produced(stage.handle(messages([payment(i, run) for i in range(10)])), PREDICTIONS)
        assert {p["served_by"] for p in preds} == {"rules"} and len(preds) == 10
    finally:
        release.set()


def test_non_finite_scores_count_as_a_model_failure(endpoints: Endpoints, run: str) -> None:
    class NaNs:
        version = "fraud-v7"

        def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
            return np.full(X.shape[0], np.nan)

    stage = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url),
                           ModelSlot(NaNs()))  # type: ignore[arg-type]
    preds = produced(stage.handle(messages([payment(i, run) for i in range(5)])), PREDICTIONS)
    assert {p["served_by"] for p in preds} == {"rules"} and all(0 <= p["score"] <= 1 for p in preds)


def test_the_response_cache_serves_repeated_vectors_per_model_version(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str) -> None:
    v1, v2 = models
    cache = ResponseCache(redis.Redis.from_url(endpoints.redis_url), ttl_s=60, prefix=f"weir:test-pc:{run}")
    slot = ModelSlot(v1)
    stage = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url), slot, cache=cache)
    pays = [payment(i, run) for i in range(50)]
    first = produced(stage.handle(messages(pays)), PREDICTIONS)
    assert {p["served_by"] for p in first} == {"model"}
    second = produced(stage.handle(messages(pays)), PREDICTIONS)
    assert {p["served_by"] for p in second} == {"cache"}
    assert [p["score"] for p in second] == [p["score"] for p in first]  # exactly what the model returned
    assert cache.hit_rate == pytest.approx(0.5)
    slot.swap(v2)  # another version: its own keys
    third = produced(stage.handle(messages(pays)), PREDICTIONS)
    assert {(p["served_by"], p["model_version"]) for p in third} == {("model", "fraud-v2")}
    metrics = {m["metric"]: m for m in produced(StepResult(stage.metric_records()), T.MODEL_METRICS)}
    assert metrics["cache_hit_rate"]["value"] == pytest.approx(50 / 150)
    assert metrics["served_by_cache"]["value"] == pytest.approx(50 / 150)


def test_the_cache_misses_while_its_redis_is_down(endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer],
                                                  run: str) -> None:
    v1, _ = models
    proxy, url = TcpProxy.to_url(endpoints.redis_url)
    proxy.down()
    try:
        stage = InferenceStage(SHOP, fraud, OnlineStore(endpoints.redis_url), ModelSlot(v1),
                               cache=ResponseCache.from_url(url, ttl_s=60))
        preds = produced(stage.handle(messages([payment(i, run) for i in range(20)])), PREDICTIONS)
        assert {p["served_by"] for p in preds} == {"model"} and not any(p["degraded"] for p in preds)
    finally:
        proxy.close()


@pytest.mark.parametrize("vectors", [True, False])
def test_the_audit_record_has_the_vector_or_its_hash_and_the_latency_breakdown(
        endpoints: Endpoints, models: tuple[OnnxScorer, OnnxScorer], run: str, vectors: bool) -> None:
    v1, _ = models
    stage = InferenceStage(SHOP, replace(fraud, threshold=0.4), OnlineStore(endpoints.redis_url), ModelSlot(v1),
                           audit_vectors=vectors)
    result = stage.handle(messages([payment(i, run) for i in range(30)]))
    preds = {p["event_id"]: p for p in produced(result, PREDICTIONS)}
    scored = {i["event_id"]: i for i in items(result, SCORED)}
    audit = audit_rows(result)
    assert sorted(a["event_id"] for a in audit) == sorted(preds)
    for a in audit:
        p = preds[a["event_id"]]
        assert (a["score"], a["decision"], a["threshold"], a["model_version"], a["route"], a["served_by"],
                a["degraded"], a["entity_id"], a["model_name"]) == (
            p["score"], p["score"] >= 0.4, 0.4, "fraud-v1", "champion", "model", False, p["card_id"], "fraud")
        x = np.asarray(scored[a["event_id"]]["features"], dtype=np.float32)
        assert a["feature_hash"] == feature_hash(x)
        assert (a["features"] is not None) == vectors
        if vectors:
            assert a["features"] == pytest.approx(x.tolist())
        assert min(a["queue_ms"], a["fetch_ms"], a["inference_ms"], a["publish_ms"]) >= 0
