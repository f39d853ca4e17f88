"""One model's decision threshold, declared once in its project, reaches every stage that uses it: inference's
decisions, the drift stage's missed-positive detector and retraining's validation baseline."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from examples.fraud_shop.project import card as CARD
from examples.fraud_shop.project import fraud
from models.export import sha256_file
from models.registry import ModelRegistry
from models.scorer import OnnxScorer
from sinks.clickhouse import ClickHouse
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import Message
from streams.codec import AvroCodec
from streams.serving.resilience import ScoringChain, rules_for
from streams.serving.routing import ModelSlot
from streams.stack import Endpoints
from streams.stages.drift import DriftStage, load_reference
from streams.stages.inference import InferenceStage
from streams.features import offline
from streams.stages.retrain import MIN_REFERENCE_ROWS, REFERENCE_ROWS, RetrainStage
from tests.conftest import SHOP
from tests.test_training_set import CARD_V, T0, ch, label, log, pay  # noqa: F401 (ch: the fixture)

THRESHOLD = 0.3  # not the default 0.5
MODEL = replace(fraud, threshold=THRESHOLD)
PROJECT = replace(SHOP, models=(MODEL,))


class Constant:
    """A model scoring every event 0.35: above the declared threshold, below the default one."""

    version = "constant-1"

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        return np.full(X.shape[0], 0.35)


def test_inference_decides_with_the_declared_threshold(endpoints: Endpoints) -> None:
    items = [{"event_id": f"t{i}", "ts_ms": T0 + i, "source_ms": T0, "payment_id": f"t{i}", "card_id": "c1",
              "customer_id": "u1", "merchant_id": "m1", "merchant_category": "retail", "amount": 10.0,
              "device_id": None, "served": {CARD_V: [0.0] * len(CARD.features)}} for i in range(5)]
    scoring = "weir.fraud_shop.scoring.payments"
    batch = [Message(scoring, 0, 0, None, AvroCodec(scoring).encode({"items": items}), T0)]
    for model, decided in ((MODEL, True), (fraud, False)):
        project = replace(SHOP, models=(model,))
        stage = InferenceStage(project, model, OnlineStore(endpoints.redis_url), ModelSlot(Constant()),  # type: ignore[arg-type]
                               chain=ScoringChain(rules_for(model)))
        result = stage.handle(batch)
        stage.close()
        preds = [AvroCodec(model.prediction_topic).decode(p.value) for p in result.produce
                 if p.topic == model.prediction_topic]
        assert [(p["decision"], p["threshold"]) for p in preds] == [(decided, model.threshold)] * 5
        audit_topic = T.internal(project, T.I_AUDIT)
        (audit,) = [AvroCodec(audit_topic).decode(p.value) for p in result.produce if p.topic == audit_topic]
        assert audit["threshold"] == model.threshold and audit["decisions"] == [decided] * 5


def test_drift_counts_misses_against_the_declared_threshold() -> None:
    """The same positives, scored 0.35: missed at the default threshold, caught at the declared one."""
    outcomes = [{"event_id": f"o{i}", "model_name": "fraud", "label": 1.0, "ts_ms": T0 + i, "label_ts_ms": T0 + i,
                 "champion_score": 0.35, "champion_version": "fraud-v1", "online_score": 0.5} for i in range(40)]
    for project, missed in ((PROJECT, 0), (SHOP, 40)):
        detector = DriftStage(project, 0.002).detectors["fraud"]
        assert detector.threshold == project.models[0].threshold
        for outcome in outcomes:
            detector.update(outcome)
        assert detector.states["fraud-v1"].missed_count == missed


def training_data(db: ClickHouse, n: int = 800, seed: int = 3) -> None:
    """Labelled payments whose card view and amount make fraud partly learnable (the classes overlap, so some
    positives score between the two thresholds), logged as the pipeline would."""
    rng = random.Random(seed)
    rows, labels, logs = [], [], []
    for i in range(n):
        fraud_ = rng.random() < 0.25
        ts = T0 + i * 60_000
        amount = rng.uniform(100, 700) if fraud_ else rng.uniform(5, 500)
        count = float(rng.randint(1, 6) if fraud_ else rng.randint(1, 4))
        digital = rng.random() < (0.5 if fraud_ else 0.3)
        rows.append((f"p{i}", f"c{i}", f"u{i}", ts, round(amount, 2), "digital_goods" if digital else "retail"))
        labels.append((f"p{i}", int(fraud_), ts, ts + 60_000))
        logs.append((CARD_V, f"c{i}", f"p{i}", ts, [count, amount, count, amount, 1.0]))
    pay(db, rows)
    label(db, labels)
    log(db, logs)


def test_retrains_validation_baseline_uses_the_declared_threshold(ch: ClickHouse, tmp_path: Path) -> None:  # noqa: F811
    training_data(ch)
    registry = ModelRegistry(ch.client, tmp_path / "models")
    registry.ensure_schema()
    stage = RetrainStage(ch, registry, PROJECT, seed=1)
    try:
        transitions = stage.train(MODEL, "a test")
    finally:
        stage.close()
    assert transitions, stage.runs
    version = transitions[0][0]
    assert version.lineage["threshold"] == str(THRESHOLD) and version.lineage["model_definition"] == MODEL.definition
    # the baseline the drift stage holds the model to: its validation positives scored below 0.3, recomputed
    # here from the registered artifact on the same validation rows
    X, y, ts, _ = stage.training_set(MODEL, 0)
    n_val = int(version.metrics["n_val"])
    scores = OnnxScorer(version.path, "v", prefer_gpu=False).predict(X[-n_val:])
    positives = y[-n_val:] == 1
    expected = float((scores[positives] < THRESHOLD).mean())
    assert version.metrics["positives_val"] == positives.sum() > 0
    assert math.isclose(version.metrics["missed_positive_val"], expected, abs_tol=1e-9)
    assert expected != float((scores[positives] < 0.5).mean())  # the data tells the two thresholds apart
    # the reference the drift stage watches the version's inputs against: its newest training rows whose windowed
    # features were complete, and the scores the served artifact gives them, registered next to it with their
    # checksum in the lineage
    reference = load_reference(version.artifact_uri)
    n_ref = int(version.lineage["reference_rows"])
    warm = offline.warm_from_ms(ch, MODEL)
    complete = int((ts >= warm).sum())
    assert reference is not None and reference.rows == n_ref == min(complete, REFERENCE_ROWS) >= MIN_REFERENCE_ROWS
    assert np.array_equal(reference.X, X[-n_ref:].astype(np.float32)) and ts[-n_ref] >= warm > ts[0]
    assert np.allclose(reference.scores, OnnxScorer(version.path, "v", prefer_gpu=False).predict(X[-n_ref:]),
                       atol=1e-4)
    assert version.lineage["reference_sha256"] == sha256_file(version.path.with_suffix(".npz"))
