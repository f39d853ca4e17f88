"""The ``weir`` command: ``weir init|plan|apply`` (a project), ``weir up`` (stack + every stage of a project
until Ctrl-C), ``weir demo``, ``weir schemas check``, ``weir dlq inspect|replay``, ``weir replay``,
``weir models`` and ``weir features list|describe|training-set``.

The project a command runs is ``--project`` (before the command), else ``WEIR_PROJECT``, else
``project.py`` in the current directory (see docs/projects.md)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from streams.project.load import ProjectError, project_of
from streams.project.plan import PlanRefused
from streams.settings import WeirSettings


def _up(settings: WeirSettings, args: argparse.Namespace) -> int:
    from streams.demo import pipeline_config
    from streams.health import HealthServer
    from streams.pipeline import Pipeline
    from streams.stack import Stack

    project = project_of(args)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Stack(settings, project) as endpoints:
        path = settings.data_dir / "endpoints.json"
        endpoints.write(path)
        if project.scenario is not None and endpoints.postgres_dsn:  # the tables its CDC sources stream
            project.scenario.prepare(endpoints.postgres_dsn, endpoints.kafka_bootstrap, settings.partitions)
        pipeline = Pipeline(project, endpoints, pipeline_config(settings))
        pipeline.start()
        health = HealthServer(pipeline.health, port=settings.health_port).start()
        path.write_text(json.dumps({**json.loads(path.read_text()), "health_url": health.url}, indent=2) + "\n")
        print(f"weir is up with project {project.name}; endpoints in {path}:\n{path.read_text()}Ctrl-C to stop.",
              flush=True)
        try:
            while not stop.wait(1.0):
                pipeline.check()  # logs a stage that fails (it is retried) or that the DLQ guard stopped
        except KeyboardInterrupt:
            pass
        finally:
            health.stop()
            pipeline.stop()
    print("weir stopped.")
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
    sub.add_parser("up", help="start the embedded stack and every stage of the project; stay up until Ctrl-C")
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
    from streams import dlq, models_cli, replay
    from streams.features import cli as features
    from streams.features import offline
    from streams.project import cli as project
    from streams.registry import check

    project.add_parser(sub)
    check.add_parser(sub)
    dlq.add_parser(sub)
    replay.add_parser(sub)
    models_cli.add_parser(sub)
    offline.add_training_set_parser(features.add_parser(sub))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = WeirSettings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"up": _up, "demo": _demo}
    try:
        if args.command in handlers:
            return handlers[args.command](settings, args)
        return int(args.handler(args))
    except (ProjectError, PlanRefused) as exc:
        print(f"weir {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
