"""A second `weir demo` (`make run` twice) starts from fresh stores: the embedded Kafka starts empty each run."""

from __future__ import annotations

from pathlib import Path

import psycopg

from examples.fraud_shop.driver import ShopDriver
from examples.fraud_shop.scenario import ShopScenario
from streams.demo import forget_previous_run
from streams.settings import WeirSettings
from streams.stack import Endpoints


def test_the_previous_runs_shop_tables_slot_and_publication_are_dropped(endpoints: Endpoints) -> None:
    ShopDriver(endpoints.postgres_dsn, endpoints.kafka_bootstrap).prepare()
    with psycopg.connect(endpoints.postgres_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO merchants (merchant_id, name, category, country) VALUES ('m-old', 'x', 'y', 'z') "
                     "ON CONFLICT DO NOTHING")
        conn.execute("SELECT pg_create_logical_replication_slot('weir_cdc', 'pgoutput') "
                     "WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'weir_cdc')")
        conn.execute("DROP PUBLICATION IF EXISTS weir_cdc")
        conn.execute("CREATE PUBLICATION weir_cdc FOR TABLE merchants")
    ShopScenario().reset(endpoints.postgres_dsn)
    with psycopg.connect(endpoints.postgres_dsn, autocommit=True) as conn:
        left = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename IN ('merchants', 'payments', "
                            "'weir_cdc_state')").fetchone()
        slots = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'weir_cdc'").fetchone()
        pubs = conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = 'weir_cdc'").fetchone()
    assert (left, slots, pubs) == ((0,), (0,), (0,))
    ShopDriver(endpoints.postgres_dsn, endpoints.kafka_bootstrap).prepare()  # the next run recreates them, empty


def test_the_previous_runs_clickhouse_and_models_are_removed_only_with_the_embedded_kafka(tmp_path: Path) -> None:
    for name in ("clickhouse", "models", "postgres", "journal", "redis"):
        (tmp_path / name).mkdir()
    external = WeirSettings(data_dir=tmp_path, kafka_bootstrap="kafka:9092")
    assert forget_previous_run(external) == [] and (tmp_path / "clickhouse").exists()
    removed = forget_previous_run(WeirSettings(data_dir=tmp_path, kafka_bootstrap=None, clickhouse_url=None))
    assert sorted(Path(p).name for p in removed) == ["clickhouse", "journal", "models", "redis"]
    assert not (tmp_path / "clickhouse").exists() and (tmp_path / "postgres").exists()  # the cluster is kept
