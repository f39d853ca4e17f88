"""``weir worker`` and ``/metrics``: what a worker accepts and refuses, and the Prometheus exposition.

The hub with two workers per hot-path stage, under faults, is ``load_tests/chaos.py --smoke``
(``tests/test_load_smoke.py``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from streams.health import HealthServer
from streams.metrics import render
from streams.runtime import RunnerStats
from streams.settings import WeirSettings
from streams.stack import DataDirLock, Endpoints
from streams.worker import WorkerError, parse_stages, worker_endpoints
from tests.conftest import FREE_PORTS

ROOT = Path(__file__).resolve().parent.parent


def test_stages_are_checked_by_name() -> None:
    assert parse_stages("ingest, features,ingest") == ("ingest", "features")
    with pytest.raises(WorkerError, match="unknown cdc, ingets; choose from ingest, features"):
        parse_stages("cdc,ingets")
    with pytest.raises(WorkerError, match="none given"):
        parse_stages(" , ")


def test_endpoints_come_from_settings_else_from_endpoints_json(tmp_path: Path) -> None:
    settings = WeirSettings(data_dir=tmp_path)
    with pytest.raises(WorkerError, match="no kafka_bootstrap: set WEIR_KAFKA_BOOTSTRAP, or start the stack"):
        worker_endpoints(settings, ["ingest"])
    Endpoints("k:9092", "redis://r:6379/0", f"chdb://{tmp_path}/ch", "", "http://reg:8081").write(
        tmp_path / "endpoints.json")
    got = worker_endpoints(WeirSettings(data_dir=tmp_path, redis_url="redis://mine:6379/0"), ["ingest"])
    assert (got.kafka_bootstrap, got.redis_url, got.schema_registry_url, got.clickhouse_dsn) == \
        ("k:9092", "redis://mine:6379/0", "http://reg:8081", "")
    with pytest.raises(WorkerError, match="sinks need ClickHouse.*set WEIR_CLICKHOUSE_URL to a ClickHouse server"):
        worker_endpoints(settings, ["ingest", "sinks"])
    remote = worker_endpoints(WeirSettings(data_dir=tmp_path, clickhouse_url="http://ch:8123"), ["retrain"])
    assert remote.clickhouse_dsn == "http://ch:8123"


def test_a_worker_refuses_unreachable_services_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")} | FREE_PORTS | {
        "WEIR_DATA_DIR": str(tmp_path), "WEIR_KAFKA_BOOTSTRAP": "127.0.0.1:1", "WEIR_REDIS_URL": "redis://127.0.0.1:1/0",
        "WEIR_SCHEMA_REGISTRY_URL": "http://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "--project", "examples.fraud_shop.project:project",
                           "worker", "--stages", "ingest"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert re.fullmatch(r"weir worker: Kafka at 127\.0\.0\.1:1 does not answer \(.*\): check WEIR_KAFKA_BOOTSTRAP\n",
                        done.stderr.split("\n", done.stderr.count("\n") - 1)[-1]), done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_are_prometheus_text() -> None:
    stats = RunnerStats(consumed=7, produced=5, dead_lettered=2, batches=3, busy_s=0.0305,
                        batch_seconds=[0, 1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0], last_commit_ts=1_796_160_000.25,
                        committed={("t", 1): 40}, lag={("t", 1): 3})
    text = render({'in"gest': ("running", 1, stats), "features": ("retrying", 4, RunnerStats())})
    lines = text.splitlines()
    assert 'weir_stage_up{stage="in\\"gest"} 1' in lines and 'weir_stage_up{stage="features"} 0' in lines
    assert 'weir_stage_consumed_total{stage="in\\"gest"} 7' in lines
    assert 'weir_stage_retries_total{stage="features"} 4' in lines
    assert 'weir_stage_batch_seconds_bucket{stage="in\\"gest",le="0.0025"} 1' in lines
    assert 'weir_stage_batch_seconds_bucket{stage="in\\"gest",le="0.025"} 3' in lines  # cumulative
    assert 'weir_stage_batch_seconds_bucket{stage="in\\"gest",le="+Inf"} 3' in lines
    assert 'weir_stage_batch_seconds_count{stage="in\\"gest"} 3' in lines
    assert 'weir_stage_last_commit_timestamp_seconds{stage="in\\"gest"} 1796160000.25' in lines
    assert 'weir_stage_lag_messages{stage="in\\"gest",topic="t",partition="1"} 3' in lines
    assert 'weir_stage_committed_offset{stage="in\\"gest",topic="t",partition="1"} 40' in lines
    # every sample line belongs to a family declared with HELP and TYPE before it
    declared = set()
    for line in lines:
        if line.startswith("# TYPE "):
            declared.add(line.split()[2])
        elif not line.startswith("#"):
            name = re.match(r"[a-z_]+", line).group(0)  # type: ignore[union-attr]
            assert re.sub(r"_(bucket|sum|count)$", "", name) in declared, line


def test_health_server_serves_metrics_beside_healthz() -> None:
    server = HealthServer(lambda: {"ok": True}, metrics=lambda: "weir_x 1\n").start()
    try:
        with urllib.request.urlopen(server.url.replace("/healthz", "/metrics"), timeout=5) as r:
            assert r.read() == b"weir_x 1\n" and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        with urllib.request.urlopen(server.url, timeout=5) as r:
            assert json.loads(r.read()) == {"ok": True}
    finally:
        server.stop()


def _weir(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")} | FREE_PORTS | {
        "WEIR_DATA_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "streams.cli", "--project", "examples.fraud_shop.project:project",
                           *args], cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=120)


def test_settings_errors_name_the_variable_and_typos_are_warned(tmp_path: Path) -> None:
    done = _weir(["up"], {"WEIR_PARTITIONS": "four", "WEIR_PARTITONS": "3"}, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "weir up: warning: WEIR_PARTITONS is not a Weir setting and is ignored (did you mean WEIR_PARTITIONS?)",
        "weir up: WEIR_PARTITIONS='four': Input should be a valid integer, unable to parse string as an integer"]


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("WEIR_CLICKHOUSE_URL", "http://weir:s3cret@127.0.0.1:1", "ClickHouse at http://weir:***@127.0.0.1:1"),
    ("WEIR_POSTGRES_DSN", "postgresql://weir:s3cret@127.0.0.1:1/shop", "PostgreSQL at "
                                                                      "postgresql://weir:***@127.0.0.1:1/shop")])
def test_weir_up_names_an_unreachable_clickhouse_or_postgresql(variable: str, value: str, named: str,
                                                               tmp_path: Path) -> None:
    done = _weir(["up"], {variable: value}, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"weir up: {named} does not answer (") and last.endswith(f"check {variable}"), last
    assert "s3cret" not in done.stderr and "weir is up" not in done.stdout


def test_weir_up_refuses_an_unreachable_service_and_a_data_dir_in_use(tmp_path: Path) -> None:
    done = _weir(["up"], {"WEIR_REDIS_URL": "redis://127.0.0.1:1/0"}, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().endswith("Connection refused.): check WEIR_REDIS_URL"), done.stderr
    assert "weir is up" not in done.stdout

    lock = DataDirLock(tmp_path)
    lock.acquire()  # as a running `weir up` holds it
    try:
        done = _weir(["up"], {}, tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip() == (f"weir up: another Weir process (pid {os.getpid()}) is running on {tmp_path}: "
                                       "stop it first, or set WEIR_DATA_DIR to another directory")
    finally:
        lock.release()
    again = DataDirLock(tmp_path)
    again.acquire()  # released: the next one gets it
    again.release()
