"""The ``weir`` command: ``weir up`` (stack + every stage until Ctrl-C), ``weir demo``,
``weir schemas check``, ``weir dlq inspect|replay``, ``weir replay``, ``weir models`` and ``weir features list|describe|training-set``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from streams.settings import WeirSettings


def _up(settings: WeirSettings, args: argparse.Namespace) -> int:
    from streams.demo import pipeline_config
    from streams.pipeline import Pipeline
    from streams.scenario.driver import ShopDriver
    from streams.stack import Stack

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Stack(settings) as endpoints:
        path = settings.data_dir / "endpoints.json"
        endpoints.write(path)
        if endpoints.postgres_dsn:
            ShopDriver(endpoints.postgres_dsn, endpoints.kafka_bootstrap, partitions=settings.partitions).prepare()
        pipeline = Pipeline(endpoints, pipeline_config(settings))
        pipeline.start()
        print(f"weir is up; endpoints in {path}:\n{path.read_text()}Ctrl-C to stop.", flush=True)
        try:
            while not stop.wait(1.0):
                pipeline.check()
        except KeyboardInterrupt:
            pass
        finally:
            pipeline.stop()
    print("weir stopped.")
    return 0


def _demo(settings: WeirSettings, args: argparse.Namespace) -> int:
    from streams.demo import DemoOptions, run_demo

    opts = DemoOptions(events=args.events, rate=args.rate or None, seed=args.seed, drift_at=args.drift_at,
                       fraud_rate=args.fraud_rate,
                       summary_json=args.summary_json, progress=not args.no_progress)
    summary = run_demo(settings, opts)
    print(json.dumps(summary, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="weir", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the embedded stack and every stage; stay up until Ctrl-C")
    d = sub.add_parser("demo", help="run the simulated shop through every stage and print a summary")
    d.add_argument("--events", type=int, default=60_000, help="shop events to produce (default 60000)")
    d.add_argument("--rate", type=float, default=800.0, help="events per second, 0 = unthrottled (default 800)")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--drift-at", type=float, default=0.5, help="fraction of events after which fraud drifts")
    d.add_argument("--fraud-rate", type=float, default=0.045, help="share of payments that are fraud")
    d.add_argument("--summary-json", type=Path, default=None, help="default: <data dir>/demo-summary.json")
    d.add_argument("--no-progress", action="store_true")
    from streams import dlq, models_cli, replay
    from streams.features import cli as features
    from streams.features import offline
    from streams.registry import check

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
    if args.command in handlers:
        return handlers[args.command](settings, args)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
