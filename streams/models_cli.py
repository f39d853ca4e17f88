"""``weir models list|show|runs|promote|rollback``: the model registry, from a running stack.

Reads come from ``model.events``, the registry's audit log (every
registration and stage change, with its metrics, lineage, actor and reason),
so they work while the stack runs (the embedded ClickHouse admits one process).
``promote`` and ``rollback`` send a ``model.commands`` record to the retrain
stage, the registry's one writer, and wait for the ``model.events`` record
that answers it: the transition, or why it was refused (a failed gate blocks
a promotion to canary or production unless ``--force``, which is audited).
"""

from __future__ import annotations

import argparse
import getpass
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from streams import topics as T
from streams.codec import AvroCodec, DecodeError
from streams.kafka import consumer_config, producer_config
from streams.stack import EndpointNotFound, endpoint

OFFSET_BEGINNING = -2


@dataclass
class VersionState:
    """One version as the audit log tells it: its current stage and every event about it."""

    name: str
    version: int
    stage: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def fold(events: list[dict[str, Any]]) -> dict[tuple[str, int], VersionState]:
    """Each (model, version)'s state after ``events`` (in log order). A promotion to production archives the
    previous production version, as the registry does; refusals change nothing."""
    out: dict[tuple[str, int], VersionState] = {}
    for e in events:
        if e["stage"] == "refused":
            continue
        key = (e["model_name"], e["version"])
        v = out.setdefault(key, VersionState(*key))
        if e["stage"] == "production":
            for other in out.values():
                if other.name == v.name and other.stage == "production" and other is not v:
                    other.stage = "archived"
        v.stage = e["stage"]
        v.metrics = e["metrics"] or v.metrics
        v.lineage = e["lineage"] or v.lineage
        v.history.append(e)
    return out


def read_events(bootstrap: str, idle_s: float = 1.5) -> list[dict[str, Any]]:
    """Every ``model.events`` record, in offset order per partition (one partition per model: keyed by name)."""
    consumer = Consumer(consumer_config(bootstrap, f"weir-models-cli-{uuid.uuid4().hex}"))
    meta = consumer.list_topics(T.MODEL_EVENTS, timeout=10).topics[T.MODEL_EVENTS]
    consumer.assign([TopicPartition(T.MODEL_EVENTS, p, OFFSET_BEGINNING) for p in meta.partitions])
    codec = AvroCodec(T.MODEL_EVENTS)
    events: list[dict[str, Any]] = []
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < idle_s:
            msgs = consumer.consume(1000, 0.2)
            if msgs:
                idle_since = time.monotonic()
            for m in msgs:
                if m.error() is None:
                    try:
                        events.append(codec.decode(m.value()))
                    except DecodeError:
                        continue  # a record someone else wrote: the sink dead-letters it
    finally:
        consumer.close()
    return sorted(events, key=lambda e: e["ts"])


def _when(ts: Any) -> str:
    dt = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts / 1000, UTC)
    return f"{dt:%Y-%m-%d %H:%M:%S}Z"


def quality(metrics: dict[str, float]) -> str:
    """A version's validation quality: ``auc 0.9312`` (a binary model), ``mae 4.21`` (a regression), or ``-``."""
    if "auc_val" in metrics:
        return f"auc {metrics['auc_val']:.4f}"
    if "mae_val" in metrics:
        return f"mae {metrics['mae_val']:.4g}"
    return "-"


def list_lines(states: dict[tuple[str, int], VersionState]) -> list[str]:
    lines = [f"{'model':<10} {'ver':>4} {'stage':<11} {'validation':<12} {'gates':<6} {'last change':<21} reason"]
    for v in sorted(states.values(), key=lambda s: (s.name, s.version)):
        last = v.history[-1]
        gates = {1.0: "passed", 0.0: "FAILED"}.get(v.metrics.get("gates_passed", -1.0), "-")
        lines.append(f"{v.name:<10} {v.version:>4} {v.stage:<11} {quality(v.metrics):<12} "
                     f"{gates:<6} {_when(last['ts']):<21} {last['actor']}: {last['reason'][:80]}")
    return lines


def show_lines(v: VersionState) -> list[str]:
    lines = [f"{v.name} v{v.version}: {v.stage}", "  history:"]
    lines += [f"    {_when(e['ts'])} {e['stage']:<11} by {e['actor']}: {e['reason']}" for e in v.history]
    lines.append("  metrics:")
    lines += [f"    {k:<24} {x:.6g}" for k, x in sorted(v.metrics.items())]
    lines.append("  lineage:")
    lines += [f"    {k:<24} {x}" for k, x in sorted(v.lineage.items()) if k != "learning_curve"]
    return lines


def runs_lines(states: dict[tuple[str, int], VersionState], curve_of: int | None = None) -> list[str]:
    """One line per training run (registered candidate); with ``curve_of``, that run's learning curve."""
    lines = [f"{'model':<10} {'ver':>4} {'trained at':<21} {'rows':>6} {'validation':<12} {'epochs':>6} {'best':>4} "
             f"{'secs':>6} gates"]
    for v in sorted(states.values(), key=lambda s: (s.name, s.version)):
        m, first = v.metrics, v.history[0]
        lines.append(f"{v.name:<10} {v.version:>4} {_when(first['ts']):<21} {v.lineage.get('rows', '?'):>6} "
                     f"{quality(m):<12} {m.get('epochs_run', 0):>6.0f} "
                     f"{m.get('best_epoch', 0):>4.0f} {m.get('train_seconds', 0):>6.1f} {v.lineage.get('gates', '-')}")
        if v.version == curve_of:
            lines.append(f"       epoch  train loss  val loss  val {'auc' if 'auc_val' in m else 'mae'}")
            lines += [f"       {e:>5.0f}  {lt:>10.4f}  {lv:>8.4f}  {a:>7.4f}"
                      for e, lt, lv, a in json.loads(v.lineage.get("learning_curve", "[]"))]
    return lines


def send_command(bootstrap: str, command: dict[str, Any], *, timeout_s: float = 120.0,
                 read: Callable[[str], list[dict[str, Any]]] = read_events) -> dict[str, Any]:
    """Send a ``model.commands`` record; return the ``model.events`` record that answers it."""
    producer = Producer(producer_config(bootstrap))
    producer.produce(T.MODEL_COMMANDS, AvroCodec(T.MODEL_COMMANDS).encode(command), command["model_name"].encode())
    if producer.flush(30):
        raise RuntimeError("the broker did not acknowledge the command")
    deadline = time.monotonic() + timeout_s
    tag = f"(command {command['command_id']})"
    while time.monotonic() < deadline:
        answer = [e for e in read(bootstrap) if tag in e["reason"]]
        if answer:
            return answer[-1]
        time.sleep(1.0)
    raise TimeoutError(f"no answer to {tag} within {timeout_s:.0f} s: is the retrain stage running (`weir up`)?")


def _command(args: argparse.Namespace, action: str) -> dict[str, Any]:
    return {"command_id": uuid.uuid4().hex, "ts": datetime.now(UTC), "action": action, "model_name": args.name,
            "version": getattr(args, "version", 0), "stage": getattr(args, "to", "production"),
            "actor": args.actor, "reason": args.reason, "force": getattr(args, "force", False)}


def _run(args: argparse.Namespace) -> int:
    try:
        bootstrap = endpoint("kafka_bootstrap", args.bootstrap, flag="--bootstrap")
    except EndpointNotFound as exc:
        raise SystemExit(f"weir models: {exc}") from None
    if args.models_command in ("promote", "rollback"):
        answer = send_command(bootstrap, _command(args, args.models_command))
        print(f"{answer['model_name']} v{answer['version']}: {answer['stage']} ({answer['reason']})")
        return 1 if answer["stage"] == "refused" else 0
    states = fold(read_events(bootstrap))
    if args.models_command == "list":
        print("\n".join(list_lines(states)) if states else "no model registered yet")
    elif args.models_command == "show":
        state = states.get((args.name, args.version))
        if state is None:
            raise SystemExit(f"weir models: no {args.name} v{args.version} in model.events")
        print("\n".join(show_lines(state)))
    else:
        print("\n".join(runs_lines({k: v for k, v in states.items() if args.name in (None, k[0])}, args.curve)))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("models", help="model versions, stages, lineage and training runs; promote, roll back")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default: .weir/endpoints.json)")
    cmds = p.add_subparsers(dest="models_command", required=True)
    cmds.add_parser("list", help="every version, its stage, validation quality (AUC or MAE) and gate verdict")
    show = cmds.add_parser("show", help="one version's history, metrics and lineage")
    show.add_argument("name")
    show.add_argument("version", type=int)
    runs = cmds.add_parser("runs", help="training runs: rows, validation quality, epochs, time, gates")
    runs.add_argument("name", nargs="?", default=None, help="one model's (default: every model's)")
    runs.add_argument("--curve", type=int, default=None, metavar="VERSION", help="also print that run's curve")
    promote = cmds.add_parser("promote", help="move a version to a stage (gated for canary and production)")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--to", default="production",
                         choices=["candidate", "shadow", "canary", "production", "archived"])
    promote.add_argument("--force", action="store_true", help="promote despite failed gates (audited)")
    rollback = cmds.add_parser("rollback", help="put the previous production version back")
    rollback.add_argument("name")
    for c in (promote, rollback):
        c.add_argument("--reason", required=True, help="why (kept in the audit log)")
        c.add_argument("--actor", default=getpass.getuser(), help="who (default: your user name)")
    p.set_defaults(handler=_run)
