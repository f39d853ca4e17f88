"""``weir demo``: a project's whole loop on the embedded stack, for a bounded number of its scenario's events.

Starts the stack and every stage, drives the project's scenario (its event
generator: :class:`~streams.project.spec.Scenario`), waits until every scored
event has its prediction and every label has been learnt from, then stops
cleanly and writes a summary. The summary's figures are of the project's first
model.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tqdm import tqdm

from streams import summary as S
from streams.pipeline import Pipeline, PipelineConfig
from streams.project.spec import Model, Project, Scenario, ScenarioRun
from streams.serving.resilience import rules_for
from streams.settings import WeirSettings
from streams.stack import Stack

log = logging.getLogger(__name__)


class DemoError(Exception):
    """A demo that cannot run as asked (a project without a scenario or a model, a bad parameter)."""


@dataclass(frozen=True)
class DemoOptions:
    events: int = 60_000
    rate: float | None = 800.0
    seed: int = 7
    shift_at: float = 0.5
    params: Mapping[str, str] = field(default_factory=dict)
    summary_json: Path | None = None
    settle_timeout_s: float = 180.0
    progress: bool = True


def timeline_start(events: int, events_per_hour: float, tail_s: float = 0.0) -> datetime:
    """Where the scenario's timeline starts so that it ends half an hour before now (its last events, up to
    ``tail_s`` after the timed ones, included).

    A scenario's clock runs far faster than the wall clock, so a timeline that
    started now would soon be in the future, and ingest refuses events from
    the future (``timestamp_in_future``).
    """
    span = timedelta(hours=events / events_per_hour + 0.5, seconds=tail_s)
    return (datetime.now(UTC) - span).replace(microsecond=0)


def forget_previous_run(settings: WeirSettings) -> list[str]:
    """Remove the previous demo's ClickHouse data, model artifacts, journal and Redis data when Kafka is the
    embedded, in-memory one.

    Each run starts with an empty Kafka, so what the last run left in the stores that mirror it would be
    read as this run's (the summary counts rows, the journal would restore the last run's model events, the
    dedup memory would refuse the scenario's event ids as duplicates, and the stages' snapshots would carry
    the last run's windows and models over). Returns what it removed. With an external Kafka nothing is
    removed."""
    if settings.kafka_bootstrap or settings.clickhouse_url:
        return []
    removed = []
    for name in ("clickhouse", "models", "journal", *(() if settings.redis_url else ("redis",))):
        path = settings.data_dir / name
        if path.exists():
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


def run_demo(settings: WeirSettings, project: Project, opts: DemoOptions,
             config: PipelineConfig | None = None) -> dict[str, Any]:
    """Run the project's demo end to end and return (and write) its summary; raises if a stage fails.

    The demo is a fresh run: with the embedded Kafka (in memory), the previous run's ClickHouse data, model
    artifacts and the scenario's own data (its :meth:`~streams.project.spec.Scenario.reset`) are removed
    first."""
    scenario = project.scenario
    if scenario is None:
        raise DemoError(f"project {project.name} declares no scenario: `weir demo` drives a project's event "
                        "generator (Project(scenario=...)); run `weir up` and produce your own events instead")
    if not project.models:
        raise DemoError(f"project {project.name} declares no model: the demo summarizes a model's predictions")
    started = time.time()
    for removed in forget_previous_run(settings):
        log.warning("demo: removed the previous run's %s (Kafka starts empty)", removed)
    with Stack(settings, project) as endpoints:
        endpoints.write(settings.data_dir / "endpoints.json")
        if not settings.kafka_bootstrap:
            scenario.reset(endpoints.postgres_dsn)
        scenario.prepare(endpoints.postgres_dsn, endpoints.kafka_bootstrap, settings.partitions)
        pipeline = Pipeline(project, endpoints, config or pipeline_config(settings))
        pipeline.start()
        try:
            pipeline.wait_ready()
            summary = _drive(pipeline, scenario, opts)
        finally:
            pipeline.stop()
    summary["elapsed_s"] = round(time.time() - started, 1)
    path = opts.summary_json or settings.data_dir / "demo-summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def pipeline_config(settings: WeirSettings) -> PipelineConfig:
    return PipelineConfig(
        data_dir=settings.data_dir.resolve(), partitions=settings.partitions,
        batch_max_size=settings.batch_max_size, batch_max_wait_ms=settings.batch_max_wait_ms,
        fetch_wait_ms=settings.fetch_wait_ms,
        inference_max_batch=settings.inference_max_batch, inference_max_wait_ms=settings.inference_max_wait_ms,
        inference_backend=settings.inference_backend,
        inference_model_timeout_ms=settings.inference_model_timeout_ms,
        inference_model_cooldown_s=settings.inference_model_cooldown_s,
        inference_redis_timeout_ms=settings.inference_redis_timeout_ms,
        inference_cache_ttl_s=settings.inference_cache_ttl_s, canary_fraction=settings.canary_fraction,
        audit_vectors=settings.audit_features == "vector",
        drift_delta=settings.drift_delta, retrain_cron=settings.retrain_cron,
        dedup_horizon_ms=settings.dedup_horizon_s * 1000, max_future_ms=settings.event_max_future_s * 1000,
        max_age_ms=settings.event_max_age_s * 1000, allowed_lateness_ms=settings.allowed_lateness_s * 1000,
        pseudonym_key=settings.pseudonym_key.get_secret_value().encode(),
        features_checkpoint_s=settings.features_checkpoint_s, learn_checkpoint_s=settings.learn_checkpoint_s,
        dlq_max_ratio=settings.dlq_max_ratio, dlq_window=settings.dlq_window, dlq_min_events=settings.dlq_min_events,
        dlq_pause_s=settings.dlq_pause_s,
    )


def _drive(pipeline: Pipeline, scenario: Scenario, opts: DemoOptions) -> dict[str, Any]:
    bar = tqdm(total=opts.events, desc="events", unit="ev", disable=not opts.progress)

    def progress(n: int) -> None:
        bar.total = max(bar.total, n)
        bar.update(n - bar.n)

    runs: list[ScenarioRun] = []
    error: list[BaseException] = []
    e = pipeline.endpoints

    def produce() -> None:
        try:
            runs.append(scenario.run(e.postgres_dsn, e.kafka_bootstrap, events=opts.events, rate=opts.rate,
                                     seed=opts.seed, shift_at=opts.shift_at,
                                     start=timeline_start(opts.events, scenario.events_per_hour,
                                                          scenario.tail_s),
                                     progress=progress, params=opts.params))
        except BaseException as exc:
            error.append(exc)

    feeder = threading.Thread(target=produce, name="scenario", daemon=True)
    t0 = time.time()
    feeder.start()
    while feeder.is_alive():
        pipeline.check()
        feeder.join(0.5)
    bar.close()
    if error:
        if isinstance(error[0], ValueError):
            raise DemoError(f"scenario of project {pipeline.project.name}: {error[0]}") from error[0]
        raise error[0]
    produce_s = time.time() - t0
    run = runs[0]
    model = pipeline.project.models[0]
    _settle(pipeline, model, run, opts)
    assert pipeline.ch is not None
    return summarize(pipeline, model, run, produce_s)


def summarize(pipeline: Pipeline, model: Model, run: ScenarioRun, produce_s: float) -> dict[str, Any]:
    """The demo's summary of ``model`` after ``run`` (see the README's description of its keys)."""
    ch = pipeline.ch
    assert ch is not None
    c = S.counts(ch, pipeline.project, model)
    retrain = pipeline.stages.get("retrain")
    runs = [r for r in (retrain.runs if retrain is not None else []) if r.get("model") == model.name]
    out: dict[str, Any] = {"model": model.name, "events_in": run.events, **run.extra, "requests": run.requests,
                           **{k: c[k] for k in ("labels", "predictions", "predictions_online", "dlq", "alerts")},
                           "drift_alerts": int(ch.scalar(
                               "SELECT count() FROM alerts FINAL WHERE kind = 'drift' AND model_name IN ({m:String}, '')",
                               {"m": model.name}) or 0)}
    if run.shift_wall_s is not None and run.shift_event_ms is not None:
        after = {"since": int(run.shift_wall_s * 1000), "m": model.name, "shift": run.shift_event_ms}
        # an alert is before or after the drift by the event time it was raised at (load does not move it);
        # one without (another producer's) by when it was raised
        after_drift = ("coalesce(toUnixTimestamp64Milli(event_ts) >= {shift:Int64}, "
                       "toUnixTimestamp64Milli(ts) >= {since:Int64})")
        # drift alerts (the data or the errors changed) apart from model alerts (a validation gap, failed gates)
        drift = "kind = 'drift' AND model_name IN ({m:String}, '')"
        out |= {
            "alerts_before_drift": int(ch.scalar(
                f"SELECT countIf(NOT {after_drift}) FROM alerts FINAL WHERE {drift}", after) or 0),
            "alerts_after_drift": int(ch.scalar(
                f"SELECT countIf({after_drift}) FROM alerts FINAL WHERE {drift}", after) or 0),
            "model_alerts": [f"{d} {v}" for d, v in ch.rows(
                "SELECT detector, model_version FROM alerts FINAL WHERE kind = 'model' AND model_name = {m:String} "
                "ORDER BY ts", after)],
            **S.detection(ch, model, run.shift_event_ms),
            "retrains_after_drift": int(ch.scalar(
                "SELECT count() FROM model_events FINAL WHERE stage = 'candidate' AND model_name = {m:String} "
                "AND toUnixTimestamp64Milli(ts) >= {since:Int64}", after) or 0),
            "promotions_after_drift": int(ch.scalar(
                "SELECT count() FROM model_events FINAL WHERE stage = 'production' AND model_name = {m:String} "
                "AND toUnixTimestamp64Milli(ts) >= {since:Int64}", after) or 0),
            "drift_at_event_ms": run.shift_event_ms,
            **S.drift_summary(ch, model, run.shift_event_ms, rules_for(model).version),
        }
    out |= S.inputs(ch, model) | S.last_third(ch, model)
    out |= {
        "retrains": len([r for r in runs if "version" in r]),
        "blocked_by_gates": [r["blocked"] for r in runs if "blocked" in r],
        "models_registered": c["models_registered"],
        "latency_ms": S.latency(ch, model),
        "serving": S.serving(ch, model),
        "events_per_s": round(run.events / produce_s, 1),
        "silver": {k: v for k, v in c.items() if k.startswith("silver_")},
        "stages": {k: {key: v[key] for key in ("consumed", "dead_lettered", "state", "retries")}
                   for k, v in pipeline.health()["stages"].items() if k != "cdc"},
        "ingest": dict(pipeline.stages["ingest"].counts) if "ingest" in pipeline.stages else {},
        "cdc": pipeline.cdc.stats.as_dict() if pipeline.cdc is not None else None,
    }
    return out


def _settle(pipeline: Pipeline, model: Model, run: ScenarioRun, opts: DemoOptions) -> None:
    """Wait until every scored event is predicted and stored, every label learnt from, and then until
    every stage has been idle for 3 s (the drift, retrain and sink stages finish what the last
    labels caused), or time out with a warning."""
    deadline = time.time() + opts.settle_timeout_s
    assert pipeline.ch is not None
    learn = pipeline.stages[f"learn-{model.name}"]
    while time.time() < deadline:
        pipeline.check()
        c = S.counts(pipeline.ch, pipeline.project, model)
        if c["predictions"] >= run.requests and c["predictions_online"] >= run.requests and \
                learn.learned >= run.labels:
            break
        time.sleep(1.0)
    else:
        log.warning("demo did not settle within %.0fs: some events or labels are still in flight",
                    opts.settle_timeout_s)
        return
    last, quiet_since = None, time.time()
    retrain = pipeline.stages.get("retrain")
    while time.time() < deadline and time.time() - quiet_since < 3.0:
        pipeline.check()
        consumed = {name: r.stats.consumed for name, r in pipeline.runners.items()}
        if consumed != last or (retrain is not None and retrain.busy):
            last, quiet_since = consumed, time.time()
        time.sleep(0.25)
