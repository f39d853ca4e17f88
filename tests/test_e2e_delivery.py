"""The second example end to end: a regression (delivery ETA) on other topics, entities, features and labels.

One ``weir demo`` run of ``examples/delivery_eta`` on the session's embedded services, with the slowdown of the
city's traffic injected half way; each test checks one promise against what the run left in Kafka and
ClickHouse. Nothing in Weir was changed for this project: it is declared, and every stage is built from it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from examples.delivery_eta.project import eta
from examples.delivery_eta.project import project as DELIVERY
from sinks.clickhouse import ClickHouse
from streams import schemas
from streams.demo import DemoOptions, pipeline_config, run_demo
from streams.project.contracts import use_project
from streams.settings import WeirSettings
from streams.stack import Endpoints
from tests.conftest import SHOP
from tests.test_e2e import read_topic

pytestmark = pytest.mark.slow

OPTS = DemoOptions(events=30_000, rate=1000, seed=5, shift_at=0.6, progress=False)
# a quicker first model than the shipped one, for a short run
FAST = replace(DELIVERY, models=(replace(eta, trainer=replace(eta.trainer, bootstrap_rows=300, window_rows=3000)),))


@pytest.fixture(scope="module")
def demo(endpoints: Endpoints, weir_dir: Path, chdb_path: Path) -> Iterator[tuple[dict[str, Any], ClickHouse]]:
    settings = WeirSettings(
        data_dir=weir_dir / "delivery", kafka_bootstrap=endpoints.kafka_bootstrap, redis_url=endpoints.redis_url,
        postgres_dsn=endpoints.postgres_dsn, clickhouse_url=f"chdb://{chdb_path}",
        schema_registry_url=endpoints.schema_registry_url,
    )
    previous = schemas.set_catalog(None)
    try:
        summary = run_demo(settings, FAST, replace(OPTS, summary_json=weir_dir / "delivery.json"),
                           replace(pipeline_config(settings), drift_cooldown=300))
    finally:
        use_project(SHOP)
        schemas.set_catalog(previous)
    ch = ClickHouse.for_project(f"chdb://{chdb_path}", DELIVERY.name)  # the project's own database
    yield summary, ch
    ch.close()


def test_every_order_gets_exactly_one_eta(demo: Any, endpoints: Endpoints) -> None:
    """Read as a subscriber would: a plain confluent-kafka AvroDeserializer, the writer schema by id from Weir's
    registry (the prediction schema was generated from the project)."""
    summary, ch = demo
    deserialize = AvroDeserializer(SchemaRegistryClient({"url": endpoints.schema_registry_url}))
    context = SerializationContext(eta.prediction_topic, MessageField.VALUE)
    preds = [deserialize(m.value(), context) for m in read_topic(endpoints.kafka_bootstrap, eta.prediction_topic, 4)]
    per_order = Counter(p["event_id"] for p in preds)
    assert len(per_order) == summary["orders"] == summary["requests"] == summary["predictions"]
    assert set(per_order.values()) == {1}
    assert all(p["decision"] is None and p["threshold"] is None and p["restaurant_id"] and p["zone_id"]
               for p in preds)
    assert all(0 < p["score"] < 600 for p in preds if p["model_version"] != "rules-0")  # minutes, not a probability
    stored = ch.scalar("SELECT uniqExact(event_id) FROM predictions FINAL WHERE model_name = 'eta'")
    assert stored == summary["orders"]


def test_the_online_learner_learns_every_delivery_and_publishes_its_progressive_mae(demo: Any) -> None:
    summary, ch = demo
    assert summary["predictions_online"] == summary["orders"]
    assert summary["labels"] == summary["deliveries"] == summary["orders"]  # every order was delivered
    labels, mae = ch.rows("SELECT max(labels), argMax(value, labels) FROM model_metrics FINAL "
                          "WHERE model_name = 'eta-online' AND metric = 'mae'")[0]
    assert labels >= summary["deliveries"] - 500
    assert 0 < mae < 15  # minutes: deliveries take 10-150 (mean ~50); predicting the mean is ~15 off
    assert summary["mae_online_before_drift"] < summary["mae_online_after_drift"] + 10


def test_a_retrained_model_serves_after_a_hot_swap(demo: Any) -> None:
    summary, ch = demo
    assert summary["models_registered"] >= 1, summary["blocked_by_gates"]
    version, registered_ms = ch.rows(
        "SELECT version, toUnixTimestamp64Milli(ts) FROM model_events FINAL WHERE model_name = 'eta' "
        "AND stage = 'production' ORDER BY ts LIMIT 1")[0]
    first, served = ch.rows("SELECT min(toUnixTimestamp64Milli(predicted_ts)), count() FROM predictions FINAL "
                            "WHERE model_version = {v:String}", {"v": f"eta-v{version}"})[0]
    assert served > 0 and first >= registered_ms - 1000  # swapped in while orders were being scored
    assert ch.scalar("SELECT count() FROM predictions FINAL WHERE model_name = 'eta' AND model_version = 'rules-0'")
    metrics = ch.rows("SELECT metrics FROM model_events FINAL WHERE model_name = 'eta' AND stage = 'candidate' "
                      "AND version = {v:Int32}", {"v": version})[0][0]
    assert {"mae_val", "rmse_val", "p50_ms", "gates_passed", "fp32_mae"} <= set(metrics) and "auc_val" not in metrics
    # its training set: mature, point-in-time (the champion's own MAE on its validation window, in minutes)
    assert 0 < metrics["mae_val"] < 20


def test_the_slowdown_raises_a_drift_alert_and_a_retrain_after_it(demo: Any) -> None:
    summary, ch = demo
    shift = summary["drift_at_event_ms"]
    # the version serving when traffic slowed underestimates more after it than before: the shift is real (its
    # absolute error need not grow: a young version that overestimated before the slowdown can err less after it;
    # one full run saw MAE 14.6 before and 13.8 after)
    (serving,) = ch.rows("SELECT argMax(model_version, event_ts) FROM predictions FINAL WHERE model_name = 'eta' "
                         "AND toUnixTimestamp64Milli(event_ts) < {s:Int64}", {"s": shift})[0]
    before, after = ch.rows(
        "SELECT avgIf(o.label - p.score, p.ts < {s:Int64}), avgIf(o.label - p.score, p.ts >= {s:Int64}) "
        "FROM (SELECT event_id, score, toUnixTimestamp64Milli(event_ts) AS ts FROM predictions FINAL "
        "      WHERE model_version = {v:String}) AS p "
        "INNER JOIN (SELECT event_id, label FROM outcomes FINAL WHERE model_name = 'eta') AS o "
        "ON p.event_id = o.event_id", {"s": shift, "v": serving})[0]
    assert after > before, (serving, before, after)
    # the error detector saw it, and a retrain followed
    assert summary["alerts_after_drift"] >= 1
    detectors = {d for (d,) in ch.rows("SELECT detector FROM alerts FINAL WHERE model_version LIKE 'eta-%'")}
    assert "adwin_error" in detectors
    assert summary["retrains_after_drift"] >= 1
