"""The demo's summary: what went in, what came out, and how well a model did, read from ClickHouse.

Every figure is of one model of the project: its predictions, its online
learner's, and its quality against the labels the learn stage joined
(the ``outcomes`` table): ROC AUC for a binary model, mean absolute error for
a regression.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.metrics import roc_auc
from sinks.clickhouse import ClickHouse
from streams.project.contracts import silver_table
from streams.project.spec import Model, Project

SCORED_LABELLED = """
SELECT p.score, o.label, toUnixTimestamp64Milli(p.event_ts), p.model_version
FROM (SELECT * FROM predictions FINAL WHERE model_name = {scored:String}) AS p
INNER JOIN (SELECT event_id, label FROM outcomes FINAL WHERE model_name = {model:String}) AS o
ON p.event_id = o.event_id
"""


def quality_name(model: Model) -> str:
    """``auc`` or ``mae``: how the summary names the model's quality."""
    return "auc" if model.task == "binary" else "mae"


def quality(ch: ClickHouse, model: Model, scored_by: str, *, after_ms: int | None = None,
            before_ms: int | None = None, exclude_version: str | None = None) -> float | None:
    """The quality of the scores ``scored_by`` (a model name: the champion's or its online learner's) gave
    ``model`` 's labelled events, over an event-time range: ROC AUC (binary) or MAE (regression); None if
    undefined."""
    rows = ch.rows(SCORED_LABELLED, {"scored": scored_by, "model": model.name})
    sel = [(s, y) for s, y, ts, v in rows
           if (after_ms is None or ts >= after_ms) and (before_ms is None or ts < before_ms) and v != exclude_version]
    if not sel:
        return None
    scores, labels = np.array([s for s, _ in sel]), np.array([y for _, y in sel])
    value = roc_auc(labels >= 0.5, scores) if model.task == "binary" else float(np.mean(np.abs(labels - scores)))
    return None if np.isnan(value) else round(float(value), 4)


def latency(ch: ClickHouse, model: Model) -> dict[str, float]:
    p50, p99 = ch.rows(
        "SELECT quantile(0.5)(latency_ms), quantile(0.99)(latency_ms) FROM predictions FINAL "
        "WHERE model_name = {m:String}", {"m": model.name})[0]
    return {"p50": round(float(p50), 1), "p99": round(float(p99), 1)}


def serving(ch: ClickHouse, model: Model) -> dict[str, Any]:
    """How the model's predictions were served (path, route, degraded) and the audit's latency breakdown."""
    m = {"m": model.name}
    paths = dict(ch.rows("SELECT served_by, count() FROM predictions FINAL WHERE model_name = {m:String} "
                         "GROUP BY served_by", m))
    routes = dict(ch.rows("SELECT route, count() FROM prediction_audit FINAL WHERE model_name = {m:String} "
                          "GROUP BY route", m))
    degraded = ch.scalar("SELECT countIf(degraded = 1) FROM predictions FINAL WHERE model_name = {m:String}", m)
    parts = ch.rows("SELECT quantile(0.5)(queue_ms), quantile(0.5)(fetch_ms), quantile(0.5)(inference_ms), "
                    "quantile(0.5)(publish_ms) FROM prediction_audit FINAL WHERE route != 'shadow' "
                    "AND model_name = {m:String}", m)
    breakdown = {f"{k}_p50_ms": round(float(v), 2) for k, v in zip(("queue", "fetch", "inference", "publish"),
                                                                  parts[0] if parts else ()) if not math.isnan(v)}
    return {"served_by": {str(k): int(v) for k, v in paths.items()},
            "routes": {str(k): int(v) for k, v in routes.items()}, "degraded": int(degraded or 0), **breakdown}


def counts(ch: ClickHouse, project: Project, model: Model) -> dict[str, int]:
    """Rows per table: the model's predictions, its online learner's, its labels learnt from, and every
    source's silver events (``silver_<source>``)."""
    m = {"m": model.name, "o": model.online_name}
    q: dict[str, tuple[str, dict[str, str]]] = {
        "predictions": ("SELECT count() FROM predictions FINAL WHERE model_name = {m:String}", m),
        "predictions_online": ("SELECT count() FROM predictions FINAL WHERE model_name = {o:String}", m),
        "labels": ("SELECT count() FROM outcomes FINAL WHERE model_name = {m:String}", m),
        "dlq": ("SELECT count() FROM dlq FINAL", {}),
        "alerts": ("SELECT count() FROM alerts FINAL", {}),
        "models_registered": ("SELECT count() FROM model_events FINAL WHERE stage = 'candidate' "
                              "AND model_name = {m:String}", m),
        "bronze_rows": ("SELECT count() FROM bronze_events FINAL", {}),
        "feature_log_rows": ("SELECT count() FROM feature_log FINAL", {}),
    }
    q |= {silver_table(s): (f"SELECT count() FROM {silver_table(s)} FINAL", {}) for s in project.sources}
    return {k: int(ch.scalar(sql, params) or 0) for k, (sql, params) in q.items()}


def detection(ch: ClickHouse, model: Model, drift_ms: int) -> dict[str, Any]:
    """How late the first drift alert after the event time ``drift_ms`` came: in event time (seconds) and in
    labels (the model's labelled events between the drift and the event the alert was raised at), and which
    detector raised it about which version."""
    found = ch.rows("SELECT toUnixTimestamp64Milli(event_ts), detector, model_version FROM alerts FINAL "
                    "WHERE kind = 'drift' AND model_name = {m:String} AND toUnixTimestamp64Milli(event_ts) >= {d:Int64} "
                    "ORDER BY event_ts LIMIT 1", {"m": model.name, "d": drift_ms})
    if not found:
        return {"detection_delay_s": None, "detection_delay_labels": None, "detected_by": None}
    first, detector, version = found[0]
    labels = ch.scalar("SELECT count() FROM outcomes FINAL WHERE model_name = {m:String} AND "
                       "toUnixTimestamp64Milli(ts) BETWEEN {d:Int64} AND {a:Int64}",
                       {"m": model.name, "d": drift_ms, "a": int(first)})
    return {"detection_delay_s": round((int(first) - drift_ms) / 1000, 1), "detection_delay_labels": int(labels),
            "detected_by": f"{detector} {version}"}


def inputs(ch: ClickHouse, model: Model) -> dict[str, Any]:
    """How the model's inputs were watched: windows tested against a reference, and the alerts they raised
    (``<detector> <version>: <features>``, in event-time order)."""
    m = {"m": model.name}
    return {"input_windows": int(ch.scalar("SELECT count() FROM feature_drift FINAL WHERE model_name = {m:String} "
                                           "AND role = 'prediction'", m) or 0),
            "input_alerts": [f"{d} {v}: {', '.join(f)}" for d, v, f in ch.rows(
                "SELECT detector, model_version, features FROM alerts FINAL WHERE model_name = {m:String} "
                "AND detector IN ('feature_drift', 'data_quality') ORDER BY event_ts", m)]}


def last_third(ch: ClickHouse, model: Model) -> dict[str, Any]:
    """The champion's and the online learner's quality over the last third of the run's labelled event time."""
    name = quality_name(model)
    lo, hi = ch.rows("SELECT toUnixTimestamp64Milli(min(ts)), toUnixTimestamp64Milli(max(ts)) FROM outcomes FINAL "
                     "WHERE model_name = {m:String}", {"m": model.name})[0]
    if not lo:
        return {f"{name}_champion_last_third": None, f"{name}_online_last_third": None}
    since = int(lo) + 2 * (int(hi) - int(lo)) // 3
    return {f"{name}_champion_last_third": quality(ch, model, model.name, after_ms=since),
            f"{name}_online_last_third": quality(ch, model, model.online_name, after_ms=since)}


def drift_summary(ch: ClickHouse, model: Model, drift_ms: int, rules_version: str) -> dict[str, Any]:
    """The champion's and the online learner's quality before and after the event time ``drift_ms``."""
    name = quality_name(model)
    return {
        f"{name}_champion_before_drift": quality(ch, model, model.name, before_ms=drift_ms,
                                                 exclude_version=rules_version),
        f"{name}_champion_after_drift": quality(ch, model, model.name, after_ms=drift_ms),
        f"{name}_online_before_drift": quality(ch, model, model.online_name, before_ms=drift_ms),
        f"{name}_online_after_drift": quality(ch, model, model.online_name, after_ms=drift_ms),
    }
