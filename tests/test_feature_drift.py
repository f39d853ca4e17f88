"""Feature drift and data quality: the column tests, the input monitor's windows and alerts, and the drift
stage publishing both (no broker: the stage's handle on encoded messages)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from examples.fraud_shop.project import fraud
from models.feature_drift import Reference, column_drift, population_stability
from streams import topics as T
from streams.base import Message
from streams.codec import AvroCodec
from streams.monitoring import InputMonitor, WindowReport
from streams.project import Monitor, Project
from streams.stages.drift import DriftStage
from tests.conftest import SHOP

MINUTE = 60_000
WINDOW = 15 * MINUTE
NAMES = fraud.feature_names
AMOUNT, LOG_AMOUNT, CLICKS = NAMES.index("amount"), NAMES.index("log_amount"), NAMES.index("user_clicks_30m")


def rows(n: int, rng: np.random.Generator, *, amount_scale: float = 1.0, clicks_stuck: bool = False) -> np.ndarray:
    """Shop-like feature vectors: small counts, skewed amounts, a 0/1 flag, a default-heavy column."""
    X = np.empty((n, len(NAMES)))
    for j, name in enumerate(NAMES):
        X[:, j] = rng.poisson(3.0 if "count" in name or "distinct" in name else 6.0, n)
    X[:, NAMES.index("card_amount_1m")] = rng.lognormal(4, 1, n)
    X[:, NAMES.index("card_amount_1h")] = rng.lognormal(5, 1, n)
    X[:, AMOUNT] = rng.lognormal(4, 0.8, n) * amount_scale
    X[:, LOG_AMOUNT] = np.log1p(X[:, AMOUNT])
    X[:, NAMES.index("is_digital_goods")] = rng.random(n) < 0.1
    secs = NAMES.index("user_secs_since_login")
    X[:, secs] = np.where(rng.random(n) < 0.5, 3600.0, rng.uniform(0, 3600, n))
    if clicks_stuck:
        X[:, CLICKS] = 0.0  # the feature's default: its store lookups failing, say
    return X


def scores(X: np.ndarray) -> np.ndarray:
    return np.asarray(1 / (1 + np.exp(-(X[:, LOG_AMOUNT] - 4.5))))


def reference(rng: np.random.Generator, n: int = 800) -> Reference:
    X = rows(n, rng)
    return Reference(X, scores(X))


def feed(monitor: InputMonitor, X: np.ndarray, t0: int, span_ms: int, version: str = "fraud-v1") -> list[WindowReport]:
    ts = t0 + np.arange(len(X)) * span_ms // len(X)
    return [r for x, s, t in zip(X.tolist(), scores(X).tolist(), ts.tolist(), strict=True)
            for r in monitor.add(x, s, version, t)]


def test_column_tests_follow_evidentlys_defaults() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(0, 1, 1000), rng.normal(0, 1, 1001)
    assert column_drift(small, rng.normal(0, 1, 300)).test == "ks"
    assert column_drift(rng.integers(0, 4, 500).astype(float), rng.integers(0, 4, 300).astype(float)).test == "chisquare"
    assert column_drift((rng.random(500) < 0.1).astype(float), (rng.random(300) < 0.1).astype(float)).test == "z"
    assert column_drift(large, rng.normal(0, 1, 300)).test == "wasserstein"
    assert column_drift(rng.integers(0, 4, 2000).astype(float), rng.integers(0, 4, 300).astype(float)).test == \
        "jensenshannon"
    # a binary flag whose share goes from 10% to 30% is found; the same share is not
    assert column_drift((rng.random(800) < 0.1).astype(float), (rng.random(300) < 0.3).astype(float)).drifted
    assert not column_drift((rng.random(800) < 0.1).astype(float), (rng.random(300) < 0.1).astype(float)).drifted
    # a shift of half a standard deviation against a large reference: Wasserstein / std = 0.5
    d = column_drift(large, rng.normal(0.5, 1, 3000))
    assert d.drifted and d.statistic == pytest.approx(0.5, abs=0.05)
    assert population_stability(small, small) == pytest.approx(0.0, abs=1e-12)
    assert population_stability(small, rng.normal(1, 1, 500)) > 0.25  # the usual "significant shift" mark


def test_a_stationary_stream_raises_no_alert() -> None:
    rng = np.random.default_rng(1)
    monitor = InputMonitor(fraud)  # the shop's declared monitor
    monitor.reference("fraud-v1", reference(rng))
    reports = feed(monitor, rows(8 * 400 + 10, rng), 0, 8 * WINDOW + 2 * MINUTE)
    assert [r.start_ms for r in reports] == [i * WINDOW for i in range(8)]
    assert all(r.rows in range(390, 406) and r.reference_rows == 800 for r in reports)
    assert [a for r in reports for a in r.alerts] == []
    assert max(r.drifted_share for r in reports) < fraud.monitor.drift_share


def test_a_shifted_feature_is_named_within_two_windows() -> None:
    """The stated delay: a shift is reported when the first window holding at least ``min_rows`` shifted rows
    closes, ``grace_s`` after its end."""
    rng = np.random.default_rng(2)
    model = replace(fraud, monitor=Monitor(drift_share=0.1))  # 2 of its 14 columns
    monitor = InputMonitor(model)
    monitor.reference("fraud-v1", reference(rng))
    before = feed(monitor, rows(4 * 400, rng), 0, 4 * WINDOW + WINDOW // 2)  # the shift: half way in window 4
    after = feed(monitor, rows(4 * 400, rng, amount_scale=3.0), 4 * WINDOW + WINDOW // 2, 4 * WINDOW)
    assert [a for r in before for a in r.alerts] == []
    alerts = [(r.start_ms, a) for r in after for a in r.alerts if a["detector"] == "feature_drift"]
    assert alerts, [r.drifted for r in after]
    start, alert = alerts[0]
    assert start <= 5 * WINDOW and alert["event_ts"] == start + WINDOW and alert["kind"] == "drift"
    assert {"amount", "log_amount"} <= set(alert["features"]) and alert["severity"] == "warning"
    assert alert["value"] >= 0.1 and "amount" in alert["message"]
    assert len(alerts) == 1  # the same features drifting on: no new alert


def test_a_feature_stuck_at_its_default_raises_a_critical_data_quality_alert() -> None:
    rng = np.random.default_rng(3)
    monitor = InputMonitor(fraud)
    monitor.reference("fraud-v1", reference(rng))
    before = feed(monitor, rows(3 * 400, rng), 0, 3 * WINDOW)
    after = feed(monitor, rows(4 * 400, rng, clicks_stuck=True), 3 * WINDOW, 4 * WINDOW + MINUTE * 2)
    assert [a for r in before for a in r.alerts] == []
    quality = [a for r in after for a in r.alerts if a["detector"] == "data_quality"]
    assert len(quality) == 1, quality  # raised when the window crosses, not again while it stays stuck
    (alert,) = quality
    assert alert["features"] == ["user_clicks_30m"] and alert["kind"] == "data_quality"
    assert alert["severity"] == "critical" and alert["metric"] == "default_rate" and alert["value"] == 1.0
    assert alert["change_ts"] == 3 * WINDOW
    stuck = next(r for r in after if r.start_ms == 3 * WINDOW)
    column = next(c for c in stuck.columns if c.name == "user_clicks_30m")
    assert column.quality.default_rate == 1.0 and column.reference_default_rate < 0.01


def test_windows_close_on_event_time_late_rows_are_counted_and_unwatched_versions_skipped() -> None:
    rng = np.random.default_rng(4)
    monitor = InputMonitor(fraud)
    monitor.reference("fraud-v1", reference(rng))
    X = rows(300, rng)
    assert feed(monitor, X[:150], 0, WINDOW) == []  # window 0 open
    assert feed(monitor, X[150:151], WINDOW + MINUTE - 1, 1) == []  # within the grace: still open
    (report,) = feed(monitor, X[151:152], WINDOW + MINUTE, 1)  # a minute past its end: window 0 closes
    assert (report.start_ms, report.rows) == (0, 150)
    feed(monitor, X[152:153], WINDOW - 1, 1)  # an event of the closed window
    assert monitor.late == 1
    feed(monitor, X[153:], WINDOW, WINDOW, version="rules-0")  # no reference: never reported
    assert feed(monitor, X[:1], 3 * WINDOW, 1) == []  # window 1 closes with 2 rows of v1: under min_rows


def encode_scored(items: list[dict[str, Any]], offset: int) -> Message:
    topic = T.internal(SHOP, T.I_SCORED)
    return Message(topic, 0, offset, None, AvroCodec(T.I_SCORED).encode({"items": items}), 0)


def test_the_drift_stage_publishes_reports_and_alerts_of_closed_windows(tmp_path: Any) -> None:
    rng = np.random.default_rng(5)
    ref = reference(rng)
    loaded: list[str] = []

    def load(uri: str) -> Reference | None:
        loaded.append(uri)
        return ref if uri.endswith("v1.onnx") else None

    project: Project = SHOP
    stage = DriftStage(project, delta=0.002, clock=lambda: 1.0, load_reference=load)
    event = {"event_id": "e", "ts": 0, "model_name": "fraud", "version": 1, "stage": "candidate",
             "artifact_uri": "/models/fraud/v1.onnx", "sha256": "", "metrics": {}, "actor": "weir", "reason": "",
             "lineage": {}}
    codec = AvroCodec(T.MODEL_EVENTS)
    events = [Message(T.MODEL_EVENTS, 0, i, b"fraud", codec.encode({**event, "stage": s}), 0)
              for i, s in enumerate(("candidate", "production"))]
    stage.handle(events)
    assert loaded == ["/models/fraud/v1.onnx"]  # once per version
    X = rows(500, rng, clicks_stuck=True)
    ts = np.arange(500) * (WINDOW + 2 * MINUTE) // 500
    items = [{"event_id": str(i), "model_name": "fraud", "entity_id": "c", "ts_ms": int(t), "features": x,
              "score": float(s), "model_version": "fraud-v1", "label": None}
             for i, (x, s, t) in enumerate(zip(X.tolist(), scores(X), ts, strict=True))]
    result = stage.handle([encode_scored(items[:250], 0), encode_scored(items[250:], 1)])
    reports = [AvroCodec(T.I_FEATURE_DRIFT).decode(p.value) for p in result.produce
               if p.topic == T.internal(project, T.I_FEATURE_DRIFT)]
    alerts = [AvroCodec(T.ALERTS).decode(p.value) for p in result.produce if p.topic == T.ALERTS]
    assert len(reports) == 1 and reports[0]["window_start_ms"] == 0 and reports[0]["rows"] > 400
    assert [c["name"] for c in reports[0]["columns"]] == [*NAMES, "score"]
    assert [(a["detector"], a["features"], a["model_name"]) for a in alerts] == \
        [("data_quality", ["user_clicks_30m"], "fraud")]
    # a redelivered window repeats its alert's id (ClickHouse keeps one row)
    again = DriftStage(project, delta=0.002, clock=lambda: 2.0, load_reference=load)
    again.handle(events)
    repeated = again.handle([encode_scored(items, 0)])
    assert [AvroCodec(T.ALERTS).decode(p.value)["alert_id"] for p in repeated.produce if p.topic == T.ALERTS] == \
        [alerts[0]["alert_id"]]
