"""Stages in processes of their own: ``weir worker --stages …``, and the workers ``weir up --workers N`` supervises.

A worker runs the chosen stages of the project (:data:`WORKER_STAGES`) and
joins their consumer groups, so any number of workers of a stage share its
partitions (the group assigns them; stateful stages move their state with
them, see :mod:`streams.recovery`). With ``--member I/N`` its hot-path stages
instead take, without a group, the partitions whose number is I-1 modulo N of
every input topic: no join, no rebalance, the same partitions after a restart. It starts no service: each endpoint is
its ``WEIR_*`` setting, else what ``weir up`` wrote to
``<data dir>/endpoints.json``; each is checked reachable before the worker
says it is up. Stages that use ClickHouse (``sinks``, ``retrain``) run in a
worker only against a ClickHouse server: the embedded engine (chdb) belongs to
the one process that opened it, the hub. One learn stage per model: its joins
span every partition of its inputs.

The hub (``weir up --workers N``) runs the services, the stages that need
chdb and every stage not on the hot path, and starts N workers for the hot
path (:data:`HOT_PATH`), worker I with ``--member I/N``: the embedded broker's
group coordinator sometimes never completes a new generation after every
member of a group left (measured: 1 in 5 rounds of two members joining and
leaving hung for over 40 s), and a group join costs 5–23 s there, so the
hub's own workers do without groups; it restarts a worker that exits (backoff doubling
from 0.5 s to 30 s), makes each die with it (:mod:`streams.embedded.reaper`),
and reports each in its ``/healthz`` (a worker's own ``/healthz`` answer).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.embedded._proc import free_port
from streams.embedded.reaper import Reaper
from streams.health import read_health
from streams.settings import WeirSettings
from streams.stack import EndpointNotFound, Endpoints, endpoint

log = logging.getLogger(__name__)

HOT_PATH = ("ingest", "features", "inference")
WORKER_STAGES = ("ingest", "features", "inference", "learn", "drift", "sinks", "retrain")
NEEDS_CLICKHOUSE = ("sinks", "retrain")


class WorkerError(ValueError):
    """A worker that cannot start as asked; the message says which setting or option to change."""


def parse_stages(text: str) -> tuple[str, ...]:
    """``ingest,features`` → the stages, checked against :data:`WORKER_STAGES`."""
    stages = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in stages if s not in WORKER_STAGES]
    if unknown or not stages:
        raise WorkerError(f"--stages {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                          f"choose from {', '.join(WORKER_STAGES)}")
    return stages


def parse_member(text: str | None) -> tuple[int, int] | None:
    """``2/3`` → (1, 3): the second of three workers, by partition number modulo 3; None stays None."""
    if text is None:
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise WorkerError(f"--member {text!r}: give I/N with 1 <= I <= N, e.g. 2/3")
    return int(index) - 1, int(count)


def worker_endpoints(settings: WeirSettings, stages: Sequence[str]) -> Endpoints:
    """Where the services are: each ``WEIR_*`` setting, else ``endpoints.json`` of the data dir."""

    def find(name: str, explicit: str | None, variable: str) -> str:
        try:
            return endpoint(name, explicit, flag=variable, data_dir=settings.data_dir)
        except EndpointNotFound as exc:
            raise WorkerError(str(exc)) from None

    kafka = find("kafka_bootstrap", settings.kafka_bootstrap, "WEIR_KAFKA_BOOTSTRAP")
    redis_url = find("redis_url", settings.redis_url, "WEIR_REDIS_URL")
    registry = find("schema_registry_url", settings.schema_registry_url, "WEIR_SCHEMA_REGISTRY_URL")
    clickhouse = ""
    if any(s in NEEDS_CLICKHOUSE for s in stages):
        clickhouse = find("clickhouse_dsn", settings.clickhouse_url, "WEIR_CLICKHOUSE_URL")
        if clickhouse.startswith("chdb://"):
            raise WorkerError(f"stages {', '.join(s for s in stages if s in NEEDS_CLICKHOUSE)} need ClickHouse, "
                              "and the embedded engine (chdb) belongs to the process that opened it (weir up): run "
                              "them there, or set WEIR_CLICKHOUSE_URL to a ClickHouse server")
    return Endpoints(kafka, redis_url, clickhouse, "", registry)


def use_services(endpoints: Endpoints, project: Any) -> None:
    """Point this process's codecs at the registry the hub serves (the project's schemas are registered there)."""
    from streams import schemas
    from streams.project.contracts import use_project

    use_project(project)
    schemas.use_registry(endpoints.schema_registry_url)


@dataclass
class _Worker:
    number: int  # 1..count: its share is the partitions number-1 modulo count
    health_port: int
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    failures: int = 0  # consecutive exits without a healthy run between
    next_start: float = 0.0
    last_exit: str | None = None

    @property
    def name(self) -> str:
        return f"worker-{self.number}"


@dataclass
class WorkerPool:
    """``count`` worker processes of ``stages``, supervised by the hub (see the module docstring)."""

    count: int
    stages: Sequence[str]
    project_ref: str
    endpoints: Endpoints
    log_dir: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    workers: list[_Worker] = field(default_factory=list)
    _reaper: Reaper = field(default_factory=Reaper)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> WorkerPool:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = [_Worker(i + 1, free_port()) for i in range(self.count)]
        for w in self.workers:
            self._spawn(w)
        self._thread = threading.Thread(target=self._supervise, name="workers", daemon=True)
        self._thread.start()
        return self

    def _spawn(self, w: _Worker) -> None:
        e = self.endpoints
        env = {k: v for k, v in self.env.items() if k != "WEIR_HEALTH_PORT"} | {
            "WEIR_KAFKA_BOOTSTRAP": e.kafka_bootstrap, "WEIR_REDIS_URL": e.redis_url,
            "WEIR_SCHEMA_REGISTRY_URL": e.schema_registry_url, "WEIR_HEALTH_PORT": str(w.health_port),
            "WEIR_PROJECT": self.project_ref}
        with (self.log_dir / f"{w.name}.log").open("ab") as out:
            w.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker", "--stages", ",".join(self.stages),
                                       "--member", f"{w.number}/{self.count}"],
                                      env=env, stdout=out, stderr=subprocess.STDOUT)
        self._reaper.watch(w.proc.pid)
        log.info("%s started (pid %d): %s", w.name, w.proc.pid, ", ".join(self.stages))

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    w.last_exit = f"exited with {w.proc.returncode}"
                    w.failures += 1
                    w.next_start = now + min(30.0, 0.5 * 2 ** (w.failures - 1))
                    log.error("%s (pid %d) %s; restarted in %.1f s", w.name, w.proc.pid, w.last_exit,
                              w.next_start - now)
                    w.proc = None
                if w.proc is None and now >= w.next_start and not self._stop.is_set():
                    w.restarts += 1
                    self._spawn(w)
                elif w.failures and w.proc is not None and self._healthy(w):
                    w.failures = 0

    def _answer(self, w: _Worker) -> dict[str, Any] | None:
        return read_health(f"http://127.0.0.1:{w.health_port}/healthz")

    def _healthy(self, w: _Worker) -> bool:
        answer = self._answer(w)
        return bool(answer and answer.get("ok"))

    def health(self) -> dict[str, Any]:
        """Each worker: ``state`` (running, starting, restarting), its pid, restarts, and its own ``/healthz``."""
        out: dict[str, Any] = {}
        for w in self.workers:
            answer = self._answer(w) if w.proc is not None else None
            if w.proc is None:
                state = "restarting"
            elif answer is None or not answer.get("ok"):
                state = "starting" if answer is None else "degraded"
            else:
                state = "running"
            out[w.name] = {"state": state, "pid": w.proc.pid if w.proc else None, "restarts": w.restarts,
                           "last_exit": w.last_exit, "health_url": f"http://127.0.0.1:{w.health_port}/healthz",
                           "stages": answer.get("stages") if answer else None}
        return out

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every worker, wait up to ``timeout_s`` for them, then SIGKILL what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop within %.0f s: killed", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
        self._reaper.close()
