"""The demo's summary: what went in, what came out, and how well the models did, read from ClickHouse."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.metrics import roc_auc
from sinks.clickhouse import ClickHouse
from streams.stages.inference import MODEL_NAME
from streams.stages.learn import ONLINE_MODEL

SCORED_LABELLED = """
SELECT p.score, l.is_fraud, toUnixTimestamp64Milli(p.event_ts), p.model_version
FROM (SELECT * FROM predictions FINAL WHERE model_name = {model:String}) AS p
INNER JOIN (SELECT payment_id, is_fraud FROM labels FINAL) AS l ON p.payment_id = l.payment_id
"""


def auc(ch: ClickHouse, model: str, *, after_ms: int | None = None, before_ms: int | None = None,
        exclude_version: str | None = None) -> float | None:
    """ROC AUC of one model's scores against labels, over an event-time range; None if undefined."""
    rows = ch.rows(SCORED_LABELLED, {"model": model})
    sel = [
        (s, y) for s, y, ts, v in rows
        if (after_ms is None or ts >= after_ms) and (before_ms is None or ts < before_ms) and v != exclude_version
    ]
    if not sel:
        return None
    value = roc_auc(np.array([y for _, y in sel]), np.array([s for s, _ in sel]))
    return None if np.isnan(value) else round(float(value), 4)


def latency(ch: ClickHouse) -> dict[str, float]:
    p50, p99 = ch.rows(
        "SELECT quantile(0.5)(latency_ms), quantile(0.99)(latency_ms) FROM predictions FINAL "
        "WHERE model_name = {m:String}", {"m": MODEL_NAME})[0]
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1)}


def serving(ch: ClickHouse) -> dict[str, Any]:
    """How the champion's predictions were served (path, route, degraded) and the audit's latency breakdown."""
    paths = dict(ch.rows("SELECT served_by, count() FROM predictions FINAL WHERE model_name = {m:String} "
                         "GROUP BY served_by", {"m": MODEL_NAME}))
    routes = dict(ch.rows("SELECT route, count() FROM prediction_audit FINAL GROUP BY route"))
    degraded = ch.scalar("SELECT countIf(degraded = 1) FROM predictions FINAL WHERE model_name = {m:String}",
                         {"m": MODEL_NAME})
    parts = ch.rows("SELECT quantile(0.5)(queue_ms), quantile(0.5)(fetch_ms), quantile(0.5)(inference_ms), "
                    "quantile(0.5)(publish_ms) FROM prediction_audit FINAL WHERE route != 'shadow'")
    breakdown = {f"{k}_p50_ms": round(float(v), 2) for k, v in zip(("queue", "fetch", "inference", "publish"),
                                                                  parts[0] if parts else ()) if not math.isnan(v)}
    return {"served_by": {str(k): int(v) for k, v in paths.items()},
            "routes": {str(k): int(v) for k, v in routes.items()}, "degraded": int(degraded or 0), **breakdown}


def counts(ch: ClickHouse) -> dict[str, int]:
    q = {
        "predictions": f"SELECT count() FROM predictions FINAL WHERE model_name = '{MODEL_NAME}'",
        "predictions_online": f"SELECT count() FROM predictions FINAL WHERE model_name = '{ONLINE_MODEL}'",
        "labels": "SELECT count() FROM labels FINAL",
        "dlq": "SELECT count() FROM dlq FINAL",
        "alerts": "SELECT count() FROM alerts FINAL",
        "models_registered": "SELECT count() FROM model_events FINAL WHERE stage = 'candidate'",
        "bronze_rows": "SELECT count() FROM bronze_events FINAL",
        "silver_clicks": "SELECT count() FROM silver_clicks FINAL",
        "silver_payments": "SELECT count() FROM silver_payments FINAL",
        "feature_log_rows": "SELECT count() FROM feature_log FINAL",
    }
    return {k: int(ch.scalar(sql) or 0) for k, sql in q.items()}


def drift_summary(ch: ClickHouse, drift_ms: int, rules_version: str) -> dict[str, Any]:
    return {
        "auc_champion_before_drift": auc(ch, MODEL_NAME, before_ms=drift_ms, exclude_version=rules_version),
        "auc_champion_after_drift": auc(ch, MODEL_NAME, after_ms=drift_ms),
        "auc_online_before_drift": auc(ch, ONLINE_MODEL, before_ms=drift_ms),
        "auc_online_after_drift": auc(ch, ONLINE_MODEL, after_ms=drift_ms),
    }
