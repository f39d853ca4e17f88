"""``weir demo``: the whole loop on the embedded stack, for a bounded number of shop events.

Starts the stack and every stage, drives the simulated shop (clickstream to
Kafka, customers/orders/payments/labels into PostgreSQL, streamed back by
CDC), waits until every payment has its prediction and every label has
been learnt from, then stops cleanly and writes a summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from tqdm import tqdm

from models.scorer import RuleScorer
from streams import summary as S
from streams.features.definitions import FEATURE_NAMES
from streams.pipeline import Pipeline, PipelineConfig
from streams.scenario.driver import ShopDriver
from streams.scenario.shop import ShopConfig, ShopEvent, ShopSimulator
from streams.settings import WeirSettings
from streams.stack import Stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    events: int = 60_000
    rate: float | None = 800.0
    seed: int = 7
    drift_at: float = 0.5
    fraud_rate: float = 0.045
    summary_json: Path | None = None
    settle_timeout_s: float = 180.0
    progress: bool = True


class DriftMark:
    """Remembers the event time and the wall time at which the shop's drift began."""

    def __init__(self, sim: ShopSimulator) -> None:
        self.sim = sim
        self.event_ms: int | None = None
        self.wall: float | None = None

    def watch(self, events: Iterable[ShopEvent]) -> Iterator[ShopEvent]:
        for ev in events:
            if self.wall is None and self.sim.drift_started_at is not None:
                self.event_ms = int(self.sim.drift_started_at.timestamp() * 1000)
                self.wall = time.time()
            yield ev


def shop_start(events: int, events_per_hour: float) -> datetime:
    """Where the simulated timeline starts so that it ends half an hour before now.

    The shop's clock runs far faster than the wall clock, so a timeline that
    started now would soon be in the future, and ingest refuses events from
    the future (``timestamp_in_future``).
    """
    span = timedelta(hours=events / events_per_hour + 0.5)
    return (datetime.now(UTC) - span).replace(microsecond=0)


SHOP_TABLES = ("payment_labels", "payments", "orders", "merchants", "customers", "weir_cdc_state")


def forget_previous_run(settings: WeirSettings) -> list[str]:
    """Remove the previous demo's ClickHouse data and model artifacts when Kafka is the embedded, in-memory one.

    Each run starts with an empty Kafka, so what the last run left in the stores that mirror it would be
    read as this run's (the summary counts rows) and would shadow it (a registry whose production model's
    events are gone). Returns what it removed. With an external Kafka nothing is removed."""
    if settings.kafka_bootstrap or settings.clickhouse_url:
        return []
    removed = []
    for name in ("clickhouse", "models"):
        path = settings.data_dir / name
        if path.exists():
            shutil.rmtree(path)
            removed.append(str(path))
    return removed


def reset_shop(dsn: str) -> None:
    """Drop the shop's tables, its CDC slot, publication and snapshot record, so the seed's rows are new again
    (the shop's ids are deterministic: kept rows would make every insert a no-op, and no change would flow)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'weir_cdc'")
        conn.execute("DROP PUBLICATION IF EXISTS weir_cdc")
        conn.execute(f"DROP TABLE IF EXISTS {', '.join(SHOP_TABLES)} CASCADE")


def run_demo(settings: WeirSettings, opts: DemoOptions, config: PipelineConfig | None = None) -> dict[str, Any]:
    """Run the demo end to end and return (and write) its summary; raises if a stage fails.

    The demo is a fresh run: with the embedded Kafka (in memory), the previous run's ClickHouse data, model
    artifacts, shop tables and CDC slot are removed first."""
    started = time.time()
    for removed in forget_previous_run(settings):
        log.warning("demo: removed the previous run's %s (Kafka starts empty)", removed)
    with Stack(settings) as endpoints:
        endpoints.write(settings.data_dir / "endpoints.json")
        if not settings.kafka_bootstrap and endpoints.postgres_dsn:
            reset_shop(endpoints.postgres_dsn)
        driver = ShopDriver(endpoints.postgres_dsn, endpoints.kafka_bootstrap, rate=opts.rate,
                            partitions=settings.partitions)
        driver.prepare()
        pipeline = Pipeline(endpoints, config or pipeline_config(settings))
        pipeline.start()
        try:
            pipeline.wait_ready()
            summary = _drive(pipeline, driver, opts)
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
        decision_threshold=settings.decision_threshold, audit_vectors=settings.audit_features == "vector",
        drift_delta=settings.drift_delta, retrain_cron=settings.retrain_cron,
        dedup_horizon_ms=settings.dedup_horizon_s * 1000, max_future_ms=settings.event_max_future_s * 1000,
        max_age_ms=settings.event_max_age_s * 1000, allowed_lateness_ms=settings.allowed_lateness_s * 1000,
        pseudonym_key=settings.pseudonym_key.get_secret_value().encode(),
        features_checkpoint_s=settings.features_checkpoint_s, learn_checkpoint_s=settings.learn_checkpoint_s,
        online_model=settings.online_model, label_maturity_ms=int(settings.label_maturity_s * 1000),
        online_challengers=tuple(sorted(settings.online_challengers.items())),
        dlq_max_ratio=settings.dlq_max_ratio, dlq_window=settings.dlq_window, dlq_min_events=settings.dlq_min_events,
    )


def _drive(pipeline: Pipeline, driver: ShopDriver, opts: DemoOptions) -> dict[str, Any]:
    shop = ShopConfig(seed=opts.seed, drift_at=opts.drift_at, fraud_rate=opts.fraud_rate,
                      start=shop_start(opts.events, ShopConfig.events_per_hour))
    sim = ShopSimulator(shop)
    mark = DriftMark(sim)
    # reference rows and the labels flushed at the end come on top of the timed events
    bar = tqdm(total=opts.events + shop.n_customers + shop.n_merchants, desc="shop events", unit="ev",
               disable=not opts.progress)

    def progress(n: int) -> None:
        bar.total = max(bar.total, n)
        bar.update(n - bar.n)

    stats: dict[str, Any] = {}
    error: list[BaseException] = []

    def produce() -> None:
        try:
            stats["driver"] = driver.run(mark.watch(sim.events(opts.events)), progress=progress)
        except BaseException as exc:
            error.append(exc)

    feeder = threading.Thread(target=produce, name="shop-driver", daemon=True)
    t0 = time.time()
    feeder.start()
    while feeder.is_alive():
        pipeline.check()
        feeder.join(0.5)
    bar.close()
    if error:
        raise error[0]
    produce_s = time.time() - t0
    d = stats["driver"]
    _settle(pipeline, d.payments, d.labels, opts)
    assert pipeline.ch is not None and mark.event_ms is not None and mark.wall is not None
    ch = pipeline.ch
    c = S.counts(ch)
    after = {"since": int(mark.wall * 1000)}
    return {
        "events_in": d.clicks + d.rows,
        "clicks": d.clicks,
        "payments": d.payments,
        "fraud_payments": d.fraud_payments,
        "labels": c["labels"],
        "predictions": c["predictions"],
        "predictions_online": c["predictions_online"],
        "dlq": c["dlq"],
        "alerts": c["alerts"],
        "alerts_after_drift": int(ch.scalar("SELECT count() FROM alerts FINAL WHERE toUnixTimestamp64Milli(ts) >= "
                                            "{since:Int64}", after) or 0),
        "retrains": len([r for r in pipeline.stages["retrain"].runs if "version" in r]),
        "retrains_after_drift": int(ch.scalar("SELECT count() FROM model_events FINAL WHERE stage = 'candidate' "
                                              "AND toUnixTimestamp64Milli(ts) >= {since:Int64}", after) or 0),
        "promotions_after_drift": int(ch.scalar("SELECT count() FROM model_events FINAL WHERE stage = 'production' "
                                                "AND toUnixTimestamp64Milli(ts) >= {since:Int64}", after) or 0),
        "blocked_by_gates": [r["blocked"] for r in pipeline.stages["retrain"].runs if "blocked" in r],
        "models_registered": c["models_registered"],
        **S.drift_summary(ch, mark.event_ms, RuleScorer(list(FEATURE_NAMES)).version),
        "latency_ms": S.latency(ch),
        "serving": S.serving(ch),
        "events_per_s": round((d.clicks + d.rows) / produce_s, 1),
        "stages": {k: {"consumed": v["consumed"], "dead_lettered": v["dead_lettered"]}
                   for k, v in pipeline.stats().items()},
        "ingest": dict(pipeline.stages["ingest"].counts),
        "cdc": pipeline.cdc.stats.as_dict() if pipeline.cdc is not None else None,
    }


def _settle(pipeline: Pipeline, payments: int, labels: int, opts: DemoOptions) -> None:
    """Wait until every payment is predicted and stored, every label learnt from, and then until
    every stage has been idle for 3 s (the drift, retrain and sink stages finish what the last
    labels caused), or time out with a warning."""
    deadline = time.time() + opts.settle_timeout_s
    assert pipeline.ch is not None
    while time.time() < deadline:
        pipeline.check()
        c = S.counts(pipeline.ch)
        learned = pipeline.stages["learn"].learned
        if c["predictions"] >= payments and c["predictions_online"] >= payments and learned >= labels:
            break
        time.sleep(1.0)
    else:
        log.warning("demo did not settle within %.0fs: some payments or labels are still in flight",
                    opts.settle_timeout_s)
        return
    last, quiet_since = None, time.time()
    while time.time() < deadline and time.time() - quiet_since < 3.0:
        pipeline.check()
        consumed = {name: r.stats.consumed for name, r in pipeline.runners.items()}
        if consumed != last or pipeline.stages["retrain"].busy:
            last, quiet_since = consumed, time.time()
        time.sleep(0.25)
