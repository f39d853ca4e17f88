"""``weir features list`` and ``weir features describe NAME``: the feature views, their versions and freshness.

Freshness comes from the online store: a sample of the view's Redis keys
(``--sample``, default 2,000), each value carrying the event time it is as
of and the wall time of its write (see :mod:`sinks.redis_store`).
"""

from __future__ import annotations

import argparse
import struct
import time
from datetime import UTC, datetime
from typing import Any

from streams.features.aggregations import Sliding, Tumbling, WindowSpec
from streams.features.definitions import Feature, FeatureView
from streams.project.load import project_of
from streams.stack import EndpointNotFound, endpoint

_HEADER = struct.Struct("<qq")  # event time, write time (ms): the head of every stored value


def view_named(views: tuple[FeatureView, ...], name: str) -> FeatureView:
    for view in views:
        if view.name == name:
            return view
    raise SystemExit(f"weir features: no view named {name!r}; known: {', '.join(v.name for v in views)}")


def _window(w: WindowSpec) -> str:
    if isinstance(w, Sliding):
        return f"sliding {_span(w.span_ms)}"
    if isinstance(w, Tumbling):
        return f"tumbling {_span(w.size_ms)}"
    return f"hopping {_span(w.size_ms)} every {_span(w.hop_ms)}"


def _span(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("min", 60_000), ("s", 1_000)):
        if ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


def _how(f: Feature) -> str:
    of = f"({f.value or f.distinct})" if f.value or f.distinct else ""
    where = " where " + " and ".join(f"{k}={v!r}" for k, v in f.where) if f.where else ""
    return f"{f.agg.value}{of}, {_window(f.window)}{where}"


def describe(view: FeatureView) -> list[str]:
    """The definition of ``view`` as lines of text."""
    lines = [f"{view.name} v{view.version}  (fingerprint {view.fingerprint})",
             f"  entity: {view.entity}   source: {view.source}   ttl: {view.ttl_ms // 1000} s   "
             f"allowed lateness: {view.allowed_lateness_ms // 1000} s   owner: {view.owner}",
             f"  {view.description}", "  features (name, default: how; what):"]
    lines += [f"    {f.name:<28} {f.default:>6g}: {_how(f)}; {f.doc}" for f in view.specs]
    lines += [f"  derived: {d.out} = a {d.field} not seen before" + (
        " where " + " and ".join(f"{k}={v!r}" for k, v in d.where) if d.where else "") for d in view.derive]
    lines.append(f"  redis key: {view.redis_key('<' + view.entity + '>')}")
    return lines


def freshness(client: Any, view: FeatureView, sample: int, now_ms: int) -> str:
    """One line on how fresh the view's online values are, from a sample of its keys."""
    keys: list[bytes] = []
    for key in client.scan_iter(match=view.redis_key("*"), count=1000):
        keys.append(key)
        if len(keys) >= sample:
            break
    if not keys:
        return "  online: no values stored"
    heads = [_HEADER.unpack_from(v) for v in client.mget(keys) if v is not None and len(v) >= _HEADER.size]
    if not heads:
        return "  online: no readable values"
    newest_event = max(h[0] for h in heads)
    newest_write = max(h[1] for h in heads)
    return (f"  online: {len(heads)} entities sampled; newest values as of event time "
            f"{datetime.fromtimestamp(newest_event / 1000, UTC):%Y-%m-%d %H:%M:%S}Z, "
            f"last written {max(0, now_ms - newest_write) / 1000:.1f} s ago")


def _redis_url(args: argparse.Namespace) -> str | None:
    try:
        return endpoint("redis_url", args.redis, flag="--redis URL")
    except EndpointNotFound:
        return None


def _list(args: argparse.Namespace) -> int:
    project = project_of(args)
    print(f"project {project.name}")
    print(f"{'view':<12} {'version':<8} {'fingerprint':<13} {'entity':<14} {'source':<14} features  ttl")
    for v in project.views:
        print(f"{v.name:<12} v{v.version:<7} {v.fingerprint:<13} {v.entity:<14} {v.source:<14} "
              f"{len(v.features):>8}  {v.ttl_ms // 1000} s")
    return 0


def _describe(args: argparse.Namespace) -> int:
    view = view_named(project_of(args).views, args.name)
    print("\n".join(describe(view)))
    url = _redis_url(args)
    if url is None:
        print("  online: unknown (no --redis and no endpoints.json: is `weir up` running?)")
        return 0
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        print(freshness(client, view, args.sample, int(time.time() * 1000)))
    except redis.RedisError as exc:
        print(f"  online: Redis at {url} not reachable ({exc})")
    finally:
        client.close()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    """Add ``weir features`` with ``list`` and ``describe``; returns its subparsers for more commands."""
    features: argparse.ArgumentParser = sub.add_parser("features", help="feature views: definitions, versions, freshness")
    fsub = features.add_subparsers(dest="features_command", required=True)
    fsub.add_parser("list", help="every feature view with its version").set_defaults(handler=_list)
    d = fsub.add_parser("describe", help="one view's definition and the freshness of its online values")
    d.add_argument("name")
    d.add_argument("--redis", default=None, help="Redis URL (default: redis_url in endpoints.json)")
    d.add_argument("--sample", type=int, default=2000, help="keys sampled for freshness")
    d.set_defaults(handler=_describe)
    return fsub
