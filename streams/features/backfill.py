"""Backfill: recompute feature values from historical events with the streaming code itself.

The silver tables (``silver_<source>``) hold every event ingest accepted.
:func:`recompute` replays each source's events, in event-time order, through
the same :class:`~streams.stages.features.FeatureComputer` the features stage
runs (the views' declared definitions, compiled by
:mod:`streams.features.engine`), and returns each entity's values as of its
newest event: what the streaming path leaves in the online store. A view
depends on its own source only, so the sources need no interleaving. The
parity test (``tests/test_e2e.py``) holds the two equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sinks.clickhouse import ClickHouse
from streams.features.definitions import FeatureView
from streams.project.contracts import silver_table
from streams.project.spec import Project, Source
from streams.stages.features import FeatureComputer, Touched


def _events(ch: ClickHouse, source: Source, until_ms: int | None) -> Iterator[dict[str, Any]]:
    """The source's silver events (with ``ts < until_ms`` when given), oldest first, as the features stage
    receives them."""
    where = "" if until_ms is None else "WHERE ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')"
    params = {} if until_ms is None else {"until": until_ms}
    cols = "".join(f", `{f}`" for f in source.fields)
    sql = (f"SELECT event_id, toUnixTimestamp64Milli(ts) AS ts_ms{cols} FROM {silver_table(source)} FINAL "
           f"{where} ORDER BY ts_ms, event_id")
    for event_id, ts_ms, *values in ch.rows(sql, params):
        yield {"event_id": event_id, "ts_ms": int(ts_ms), **dict(zip(source.fields, values, strict=True))}


def recompute(ch: ClickHouse, project: Project, *, until_ms: int | None = None) -> dict[FeatureView, Touched]:
    """Each view's entities → (event time, last event id, values) after replaying the silver tables
    (events with ``ts < until_ms`` when given)."""
    computer = FeatureComputer(project.views)
    out: dict[FeatureView, Touched] = {view: {} for view in project.views}
    for name in dict.fromkeys(v.source for v in project.views):
        source = project.source(name)
        for event in _events(ch, source, until_ms):
            computer.latest(computer.add(name, event), out)
    return out
