"""The retrain policy: when a drift alert becomes a retrain request (mature labels of the new regime, cool-down),
how the run weighs the change, and what a candidate its gates refuse leaves behind (the champion, an alert)."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.base import InvalidModelInput
from models.gates import GatePolicy
from models.metrics import roc_auc
from models.train import train_mlp
from sinks.clickhouse import ClickHouse
from streams import topics as T
from streams.base import Message, StepResult
from streams.codec import AvroCodec
from streams.project.spec import RetrainPolicy
from streams.stages.drift import DriftStage
from tests.conftest import SHOP
from tests.test_retrain_recovery import trained_stage
from tests.test_threshold import MODEL, PROJECT
from tests.test_training_set import ch  # noqa: F401 (the fixture)

T0 = 1_700_000_000_000
MINUTE = 60_000
OUTCOMES = T.internal(SHOP, T.I_OUTCOMES)


def shop(**policy: Any) -> Any:
    """The shop with the fraud model's retrain policy the default one but for ``policy``."""
    return replace(SHOP, models=(replace(SHOP.model("fraud"), retrain=RetrainPolicy(**policy)),))


def outcome(i: int, ts_ms: int, label_ts_ms: int, positive: bool, missed: bool) -> dict[str, Any]:
    score = 0.1 if missed else (0.9 if positive else 0.02)
    return {"event_id": f"e{i}", "model_name": "fraud", "label": float(positive), "ts_ms": ts_ms,
            "label_ts_ms": label_ts_ms, "champion_score": score, "champion_version": "fraud-v1",
            "online_score": score}


def drifting(n_before: int, n_after: int, seed: int = 1) -> list[dict[str, Any]]:
    """One outcome per second of event time, each labelled 5 minutes later; 5% positives, 5% of them missed
    before the change (at ``n_before`` seconds), 90% after it."""
    rng = random.Random(seed)
    out = []
    for i in range(n_before + n_after):
        positive = rng.random() < 0.05
        missed = positive and rng.random() < (0.05 if i < n_before else 0.9)
        out.append(outcome(i, T0 + 1000 * i, T0 + 1000 * i + 5 * MINUTE, positive, missed))
    return out


def feed(stage: DriftStage, outcomes: list[dict[str, Any]], batch: int = 50) -> list[tuple[int, str, Any]]:
    """(index of the batch's last outcome, topic, decoded record) of everything the stage produced."""
    codec, decoders = AvroCodec(T.I_OUTCOMES), {T.ALERTS: AvroCodec(T.ALERTS), T.RETRAIN: AvroCodec(T.RETRAIN)}
    out = []
    for start in range(0, len(outcomes), batch):
        msgs = [Message(OUTCOMES, 0, start + j, None, codec.encode(o), 0)
                for j, o in enumerate(outcomes[start:start + batch])]
        for p in stage.handle(msgs).produce:
            out.append((start + len(msgs) - 1, p.topic, decoders[p.topic].decode(p.value)))
    return out


def requests(produced: list[tuple[int, str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    return [(i, r) for i, topic, r in produced if topic == T.RETRAIN]


def ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def test_a_drift_retrain_waits_for_mature_labels_of_the_new_regime() -> None:
    """The request goes out once min_new_labels events after the change are older than the newest label by the
    label stream's maturity (the shop's: 600 s), and names the change."""
    stage = DriftStage(shop(min_new_labels=400, min_new_positives=0, cooldown_labels=0), 0.002, min_samples=50)
    produced = feed(stage, drifting(2000, 3000))
    alerts = [r for _, topic, r in produced if topic == T.ALERTS and r["kind"] == "drift"]
    assert alerts and all(ms(a["event_ts"]) >= T0 + 2000 * 1000 for a in alerts)
    change = ms(alerts[0]["change_ts"])
    assert change is not None and abs(change - (T0 + 2000 * 1000)) <= 120 * 1000  # the change, within 2 minutes
    (i, req), *_ = requests(produced)
    # the labels seen by then: events up to i - 300 (labelled 5 minutes after); mature: 10 minutes older still
    newest_label = T0 + 1000 * i + 5 * MINUTE
    mature_after_change = (newest_label - 10 * MINUTE - change) // 1000 + 1
    assert 400 <= mature_after_change < 400 + 50 + 1  # sent with the batch that matured the 400th
    assert ms(req["change_ts"]) == change and "mature labels" in req["reason"]


def test_a_drift_retrain_waits_for_positives_of_the_new_regime() -> None:
    few, many = (DriftStage(shop(min_new_labels=100, min_new_positives=p, cooldown_labels=0), 0.002, min_samples=50)
                 for p in (5, 60))
    (first_few, _), *_ = requests(feed(few, drifting(2000, 3000)))
    first_many = requests(feed(many, drifting(2000, 3000)))
    assert first_many and first_many[0][0] > first_few  # 60 positives take longer than 5
    assert "positive) since the change" in first_many[0][1]["reason"]


def test_the_cool_down_delays_a_retrain_and_keeps_one_pending() -> None:
    """A second change during the cool-down is not dropped: its request goes out once cooldown_labels outcomes
    have passed since the first."""
    rng = random.Random(7)
    stream = []
    for i in range(7000):  # misses: 5% of positives, then 50% from 2000, then 95% from 4000
        positive = rng.random() < 0.05
        rate = 0.05 if i < 2000 else 0.5 if i < 4000 else 0.95
        stream.append(outcome(i, T0 + 1000 * i, T0 + 1000 * i + 5 * MINUTE, positive, positive and rng.random() < rate))
    free = requests(feed(DriftStage(shop(min_new_labels=0, min_new_positives=0, cooldown_labels=0), 0.002,
                                    min_samples=50), stream))
    held = requests(feed(DriftStage(shop(min_new_labels=0, min_new_positives=0, cooldown_labels=3000), 0.002,
                                    min_samples=50), stream))
    assert len(free) >= 2 and free[1][0] - free[0][0] < 3000, free  # two changes, less than 3000 apart
    assert held[0][0] == free[0][0] and len(held) == 2, held
    assert 3000 <= held[1][0] - held[0][0] < 3000 + 50  # sent with the batch that ended the cool-down


def test_a_validation_gap_sends_a_waiting_retrain_at_once() -> None:
    stage = DriftStage(shop(min_new_labels=10_000, min_new_positives=0, cooldown_labels=0), 0.002, min_samples=50)
    produced = feed(stage, drifting(2000, 1000))
    assert "fraud" in stage.pending and requests(produced) == []  # 10,000 labels of the new regime: waits
    stage.detectors["fraud"].baselines["fraud-v1"] = 0.05  # its validation split promised 5% missed
    later = [outcome(3000 + i, T0 + 1000 * (3000 + i), T0 + 1000 * (3000 + i) + 5 * MINUTE, True, True)
             for i in range(30)]
    (_, req), = requests(feed(stage, later))
    assert ms(req["change_ts"]) is not None and "fraud" not in stage.pending


def test_late_labels_of_a_replaced_version_inform_but_do_not_retrain() -> None:
    stage = DriftStage(shop(min_new_labels=0, min_new_positives=0, cooldown_labels=0), 0.002, min_samples=50)
    det = stage.detectors["fraud"]
    stream = [{**o, "champion_version": "fraud-v1" if i < 1990 else "fraud-v2", "online_score": 0.02}
              for i, o in enumerate(drifting(2000, 0))]  # v2 takes over; the online learner catches everything
    stream += [{**o, "champion_version": "fraud-v1", "online_score": 0.02} for o in drifting(0, 3000, seed=2)]
    produced = feed(stage, stream)
    assert det.current == "fraud-v2" and not det.serving("fraud-v1")
    assert any(topic == T.ALERTS and r["model_version"] == "fraud-v1" for _, topic, r in produced)
    assert requests(produced) == []
    for v in range(3, 8):  # only the newest versions keep detectors; an older one's outcomes are ignored
        det.state(f"fraud-v{v}")
    assert "fraud-v1" in det.retired and det.state("fraud-v1") is None and len(det.states) == 4


def test_every_labels_retrains_periodically_and_carries_the_latest_change() -> None:
    none = requests(feed(DriftStage(shop(), 0.002, min_samples=50), drifting(3000, 0)))
    stage = DriftStage(shop(every_labels=1000, cooldown_labels=0, min_new_labels=100, min_new_positives=0), 0.002,
                       min_samples=50)
    stationary = requests(feed(stage, drifting(3000, 0)))
    assert none == [] and [i for i, _ in stationary] == [999, 1999, 2999]
    assert all(r["change_ts"] is None and r["reason"] == "every 1000 labels" for _, r in stationary)
    after = requests(feed(stage, drifting(0, 4000, seed=3)))  # the misses jump: a drift request, then periodic
    drift, *periodic = [r for _, r in after]
    assert drift["reason"].startswith("drift alert") and periodic
    assert all(r["reason"] == "every 1000 labels" and r["change_ts"] == drift["change_ts"] for r in periodic)


def test_a_change_before_the_alert_counts_the_labels_already_seen() -> None:
    """Labels of the new regime processed before the alert was raised count toward min_new_labels: counting
    from the alert on, the request would wait for events after it, labelled 5 minutes later, and 200 of them."""
    stage = DriftStage(shop(min_new_labels=200, min_new_positives=0, cooldown_labels=0), 0.002, min_samples=50)
    produced = feed(stage, drifting(2000, 3000))
    first_alert = min(i for i, topic, r in produced if topic == T.ALERTS and r["kind"] == "drift")
    (i, _), *_ = requests(produced)
    assert first_alert > 2000 + 100 and i - first_alert < 300 + 200, (first_alert, i)


def concept_shift(n_old: int, n_new: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose positives are x0 > 1.6 before the shift, x1 > 1.6 after it."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_old + n_new, 4)).astype(np.float32)
    y = np.where(np.arange(len(X)) < n_old, X[:, 0] > 1.6, X[:, 1] > 1.6).astype(np.float32)
    return X, y, np.arange(len(X), dtype=np.int64)


def test_weighing_the_rows_after_a_change_learns_the_new_concept() -> None:
    """600 rows of a new concept after 4000 of the old: held out as the newest quarter of the window, none is
    learnt from; validated on the newest quarter of the new rows and weighed 8 times, they are."""
    X, y, ts = concept_shift(4000, 600)
    weights = np.where(ts >= 4000, 8.0, 1.0)
    X_new, y_new, _ = concept_shift(0, 4000, seed=1)
    auc = {}
    for name, kwargs in (("plain", {}), ("weighted", {"weights": weights, "val_after": 4000})):
        model = train_mlp(X, y, ts, seed=0, **kwargs).module
        with torch.no_grad():
            auc[name] = roc_auc(y_new.astype(bool), model(torch.from_numpy(X_new)).numpy())
    assert auc["weighted"] > auc["plain"] + 0.03 and auc["weighted"] > 0.9, auc


def test_a_change_after_every_row_validates_on_the_whole_window() -> None:
    X, y, ts = concept_shift(1000, 0)
    late = train_mlp(X, y, ts, seed=0, val_after=10**9).metrics
    assert late["n_val"] == 250 == train_mlp(X, y, ts, seed=0).metrics["n_val"]
    assert train_mlp(X, y, ts, seed=0, val_after=600).metrics["n_val"] == 100  # a quarter of the 400 after 600


def test_weights_must_be_positive_and_one_per_row() -> None:
    X, y, ts = concept_shift(300, 0)
    for bad in (np.ones(10), np.r_[np.ones(299), -1.0], np.r_[np.ones(299), np.nan]):
        with pytest.raises(InvalidModelInput, match="weights"):
            train_mlp(X, y, ts, weights=bad)


def request(request_id: str, change_ms: int | None) -> Message:
    req = {"request_id": request_id, "model_name": MODEL.name, "ts": datetime(2026, 1, 1, tzinfo=UTC),
           "reason": "drift alert", "since_ts": None,
           "change_ts": None if change_ms is None else datetime.fromtimestamp(change_ms / 1000, UTC)}
    return Message(T.RETRAIN, 0, 0, MODEL.name.encode(), AvroCodec(T.RETRAIN).encode(req), 0)


def produced(result: StepResult, topic: str) -> list[dict[str, Any]]:
    codec = AvroCodec(topic)
    return [codec.decode(p.value) for p in result.produce if p.topic == topic]


def test_a_candidate_its_gates_refuse_leaves_the_champion_and_raises_an_alert(
        ch: ClickHouse, tmp_path: Path) -> None:  # noqa: F811
    stage, registry = trained_stage(ch, tmp_path)
    try:
        assert [e["stage"] for e in produced(stage.handle([request("r1", None)]), T.MODEL_EVENTS)] == \
               ["candidate", "production"]
        strict = replace(MODEL, gates=GatePolicy(max_p50_ms=1e-9))  # no model scores that fast
        stage.project = replace(PROJECT, models=(strict,))
        ts = sorted(int(t) for (t,) in ch.rows("SELECT toUnixTimestamp64Milli(ts) FROM silver_payments"))
        change = ts[len(ts) // 2]
        result = stage.handle([request("r2", change)])
        assert [e["stage"] for e in produced(result, T.MODEL_EVENTS)] == ["candidate"]
        (alert,) = produced(result, T.ALERTS)
        assert (alert["kind"], alert["detector"], alert["model_name"]) == ("model", "gates", MODEL.name)
        assert "champion keeps serving" in alert["message"] and "latency FAILED" in alert["message"]
        assert " ok: " not in alert["message"]  # the failed gates only
        # delivered again after a crash before the commit: not trained again, the same alert again
        assert [a["alert_id"] for a in produced(stage.handle([request("r2", change)]), T.ALERTS)] == \
               [alert["alert_id"]]
        assert registry.latest(MODEL.name, stage="production").version == 1  # the champion serves on
        v2 = registry.get(MODEL.name, 2)
        assert v2.lineage["change_ts_ms"] == str(change) and float(v2.lineage["recency_weight"]) == \
               MODEL.retrain.recency_weight
        assert 0 < int(v2.lineage["rows_after_change"]) < int(v2.lineage["rows"])
    finally:
        stage.close()


def test_a_retrain_policy_is_checked_when_the_project_loads() -> None:
    from streams.project.load import validate

    bad = replace(SHOP, models=(replace(SHOP.model("fraud"), retrain=RetrainPolicy(recency_weight=0.5)),))
    assert any("recency_weight >= 1" in problem for problem in validate(bad)), validate(bad)
    assert validate(SHOP) == []
