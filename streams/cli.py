"""The ``weir`` command: ``weir init|plan|apply`` (a project), ``weir up`` (stack + every stage of a project
until Ctrl-C; ``--workers N`` puts the hot path in N supervised processes), ``weir worker`` (some stages, beside
it or against external services), ``weir demo``, ``weir schemas check``, ``weir dlq inspect|replay``, ``weir replay``,
``weir drift replay``, ``weir models`` and ``weir features list|describe|training-set``.

The project a command runs is ``--project`` (before the command), else ``WEIR_PROJECT``, else
``project.py`` in the current directory (see docs/projects.md)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pydantic

from streams.embedded._proc import PortInUse, claim_port
from streams.project.load import ProjectError, project_of
from streams.project.plan import PlanRefused
from streams.settings import WeirSettings
from streams.stack import DataDirInUse, ServiceUnreachable, without_password


def _serve(pipeline: Any, settings: WeirSettings, stop: threading.Event, health: Any) -> None:
    """Watch the stages until SIGTERM or Ctrl-C; then stop them (each commits what it processed), within
    ``WEIR_SHUTDOWN_TIMEOUT_S``: past it the process exits anyway (what was not committed is re-delivered)."""
    try:
        ticks = 0
        while not stop.wait(1.0):
            pipeline.check()  # logs a stage that fails (it is retried) or that the DLQ guard paused
            ticks += 1
            if ticks % 5 == 0 and pipeline.log_changed():
                print("weir: the Kafka cluster answering is another one than at start (an embedded broker "
                      "restarted?): this process's offsets and state belong to the old one; exiting without "
                      "committing, to start again on the new one", file=sys.stderr, flush=True)
                os._exit(3)
    except KeyboardInterrupt:
        pass
    finally:
        bound = settings.shutdown_timeout_s

        def overdue() -> None:
            print(f"weir: stages did not stop within {bound:g} s (WEIR_SHUTDOWN_TIMEOUT_S): exiting; what was not "
                  "committed is processed again on the next start", file=sys.stderr, flush=True)
            os._exit(3)

        timer = threading.Timer(bound, overdue)
        timer.daemon = True
        timer.start()
        health.stop()
        pipeline.stop()
        timer.cancel()


def _combined(pipeline: Any, pool: Any) -> Callable[[], dict[str, Any]]:
    """The hub's ``/healthz``: its own stages, and each worker (ok only when every one runs)."""

    def health() -> dict[str, Any]:
        out: dict[str, Any] = pipeline.health()
        if pool is not None:
            out["workers"] = workers = pool.health()
            out["ok"] = out["ok"] and all(w["state"] == "running" for w in workers.values())
        return out

    return health


def _up(settings: WeirSettings, args: argparse.Namespace) -> int:
    from streams.clickhouse_hub import hub_queries
    from streams.demo import pipeline_config
    from streams.health import HealthServer
    from streams.pipeline import ALL_STAGES, Pipeline
    from streams.project.load import project_ref
    from streams.stack import Stack
    from streams.worker import HOT_PATH, WorkerPool

    if args.workers < 0:
        print("weir up: error: --workers must be 0 or more", file=sys.stderr)
        return 2
    if args.workers and args.no_hot_path:
        print("weir up: error: --workers N runs the hot path in workers of this process; --no-hot-path leaves it to "
              "workers started apart: choose one", file=sys.stderr)
        return 2
    project = project_of(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stack = Stack(settings, project)
    with stack as endpoints:
        claim_port(settings.health_port, "/healthz", "WEIR_HEALTH_PORT")  # before any stage starts
        if any(stack.restored.values()):
            print("kept from the last run: " + ", ".join(f"{n} record(s) of {t}" for t, n in stack.restored.items()),
                  flush=True)
        path = settings.data_dir / "endpoints.json"
        endpoints.write(path)
        if project.scenario is not None and endpoints.postgres_dsn:  # the tables its CDC sources stream
            project.scenario.prepare(endpoints.postgres_dsn, endpoints.kafka_bootstrap, settings.partitions)
        stages = tuple(s for s in ALL_STAGES if not ((args.workers or args.no_hot_path) and s in HOT_PATH))
        pipeline = Pipeline(project, endpoints, dataclasses.replace(pipeline_config(settings), stages=stages))
        pipeline.start()
        pool = None
        if args.workers:
            pool = WorkerPool(args.workers, HOT_PATH, project_ref(args.project), endpoints,
                              settings.data_dir / "workers").start()
        health = HealthServer(_combined(pipeline, pool), settings.health_host, settings.health_port,
                              metrics=pipeline.metrics, query=hub_queries(endpoints.clickhouse_dsn)).start()
        info = {**json.loads(path.read_text()), "health_url": health.url}
        if pool is not None:
            info["workers"] = {w.name: f"http://127.0.0.1:{w.health_port}/healthz" for w in pool.workers}
        path.write_text(json.dumps(info, indent=2) + "\n")
        shown = json.dumps({k: without_password(v) if isinstance(v, str) else v for k, v in info.items()}, indent=2)
        shape = f" and {args.workers} worker(s) for {', '.join(HOT_PATH)} (logs in {settings.data_dir / 'workers'})" \
            if pool is not None else f" without {', '.join(HOT_PATH)} (run them with `weir worker`)" \
            if args.no_hot_path else ""
        print(f"weir is up with project {project.name}{shape}; endpoints in {path}:\n{shown}\n"
              "Ctrl-C to stop.", flush=True)
        try:
            _serve(pipeline, settings, stop, health)
        finally:
            if pool is not None:
                pool.stop(settings.shutdown_timeout_s)
    print("weir stopped.")
    return 0


def _worker(settings: WeirSettings, args: argparse.Namespace) -> int:
    from streams.demo import pipeline_config
    from streams.health import HealthServer
    from streams.pipeline import Pipeline
    from streams.stack import check_reachable
    from streams.worker import WorkerError, parse_member, parse_stages, use_services, worker_endpoints

    project = project_of(args)
    try:
        stages = parse_stages(args.stages)
        member = parse_member(args.member)
        endpoints = worker_endpoints(settings, stages)
    except WorkerError as exc:
        print(f"weir worker: {exc}", file=sys.stderr)
        return 2
    check_reachable(endpoints.kafka_bootstrap, endpoints.redis_url, endpoints.schema_registry_url,
                    clickhouse=endpoints.clickhouse_dsn or None)
    # beside `weir up` (which has the default port) and other workers on one machine: a free port unless set
    health_port = settings.health_port if "health_port" in settings.model_fields_set else 0
    claim_port(health_port, "/healthz", "WEIR_HEALTH_PORT")  # before any stage starts
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    use_services(endpoints, project)
    pipeline = Pipeline(project, endpoints, dataclasses.replace(pipeline_config(settings), stages=stages,
                                                                member=member))
    pipeline.start()
    health = HealthServer(pipeline.health, settings.health_host, health_port, metrics=pipeline.metrics).start()
    print(f"weir worker {os.getpid()} is up with project {project.name}: {', '.join(stages)}; health at "
          f"{health.url}, metrics beside it.", flush=True)
    _serve(pipeline, settings, stop, health)
    print(f"weir worker {os.getpid()} stopped.", flush=True)
    return 0


def _params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param {pair!r} is not name=value")
        out[name] = value
    return out


def _demo(settings: WeirSettings, args: argparse.Namespace) -> int:
    from streams.demo import DemoError, DemoOptions, run_demo

    try:
        params = _params(args.param)
    except ValueError as exc:
        print(f"weir demo: error: {exc}", file=sys.stderr)
        return 2
    opts = DemoOptions(events=args.events, rate=args.rate or None, seed=args.seed, shift_at=args.drift_at,
                       params=params, summary_json=args.summary_json, progress=not args.no_progress)
    try:
        summary = run_demo(settings, project_of(args), opts)
    except DemoError as exc:
        print(f"weir demo: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weir", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", default=None,
                   help="the project: package.module:attribute or path/to/project.py (default: WEIR_PROJECT, "
                        "else ./project.py)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the embedded stack and every stage of the project; stay up until Ctrl-C")
    up.add_argument("--workers", type=int, default=0, metavar="N",
                    help="run the hot-path stages (ingest, features, inference) in N worker processes of their own, "
                         "supervised by this one, instead of in it (default 0)")
    up.add_argument("--no-hot-path", action="store_true",
                    help="run no hot-path stage here: `weir worker` processes started apart run them (a deployment "
                         "with a worker service per stage)")
    w = sub.add_parser("worker", help="run some stages of the project in this process, beside a running `weir up` "
                                      "or against external services; any number of workers share a stage's partitions")
    w.add_argument("--member", default=None, metavar="I/N",
                   help="take a fixed share of the hot-path stages' partitions (numbers I-1 modulo N) without a "
                        "consumer group, as `weir up --workers N` starts its workers; default: join the groups")
    w.add_argument("--stages", default="ingest,features,inference",
                   help="comma-separated, from ingest, features, inference, learn, drift, sinks, retrain (sinks and "
                        "retrain need WEIR_CLICKHOUSE_URL); default: ingest,features,inference")
    d = sub.add_parser("demo", help="run the project's scenario through every stage and print a summary")
    d.add_argument("--events", type=int, default=60_000, help="scenario events to produce (default 60000)")
    d.add_argument("--rate", type=float, default=800.0, help="events per second, 0 = unthrottled (default 800)")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--drift-at", type=float, default=0.5,
                   help="fraction of events after which the scenario's injected change begins")
    d.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the project's scenario (repeatable); each example's README lists its own")
    d.add_argument("--summary-json", type=Path, default=None, help="default: <data dir>/demo-summary.json")
    d.add_argument("--no-progress", action="store_true")
    from streams import dlq, drift_replay, models_cli, replay
    from streams.features import cli as features
    from streams.features import offline
    from streams.project import cli as project
    from streams.registry import check

    project.add_parser(sub)
    check.add_parser(sub)
    dlq.add_parser(sub)
    replay.add_parser(sub)
    drift_replay.add_parser(sub)
    models_cli.add_parser(sub)
    offline.add_training_set_parser(features.add_parser(sub))
    return p


def settings_or_exit(program: str = "weir") -> WeirSettings:
    """The settings from the environment; an invalid value ends the process with one line per problem, naming
    the ``WEIR_`` variable (status 2). An unknown ``WEIR_`` variable is warned about (a typo is otherwise
    silently ignored)."""
    for name in unknown_variables(os.environ):
        close = difflib.get_close_matches(name, setting_variables(), n=1)
        print(f"{program}: warning: {name} is not a Weir setting and is ignored"
              + (f" (did you mean {close[0]}?)" if close else ""), file=sys.stderr)
    try:
        return WeirSettings()
    except pydantic.ValidationError as exc:
        for err in exc.errors():
            variable = "WEIR_" + "_".join(str(part) for part in err["loc"]).upper()
            value = os.environ.get(variable, "")
            print(f"{program}: {variable}={value!r}: {err['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def setting_variables() -> list[str]:
    return [f"WEIR_{name.upper()}" for name in WeirSettings.model_fields]


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    known = set(setting_variables())
    return sorted(k for k in environ if k.startswith("WEIR_") and k not in known)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings_or_exit(f"weir {args.command}")
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"up": _up, "worker": _worker, "demo": _demo}
    try:
        if args.command in handlers:
            return handlers[args.command](settings, args)
        return int(args.handler(args))
    except (ProjectError, PlanRefused, DataDirInUse, ServiceUnreachable, PortInUse) as exc:
        print(f"weir {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
