"""Backfill: recompute feature values from historical events with the streaming code itself.

The silver tables (``silver_clicks``, ``silver_payments``) hold every event
ingest accepted. :func:`recompute` replays them, in event-time order, through
the same :class:`~streams.stages.features.FeatureComputer` the features stage
runs (the views' declared definitions, compiled by :mod:`streams.features.engine`), and returns each entity's values as of its newest event — what the
streaming path leaves in the online store. Card views depend only on payments
and user views only on clicks, so the two streams need no interleaving.
The parity test (``tests/test_e2e.py``) holds the two equal.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sinks.clickhouse import ClickHouse
from streams import topics as T
from streams.features.definitions import VIEWS, FeatureView
from streams.stages.features import FeatureComputer, Touched

PAYMENTS_SQL = """
SELECT event_id, card_id, merchant_id, amount, toUnixTimestamp64Milli(ts) AS ts_ms
FROM silver_payments FINAL {where} ORDER BY ts_ms, event_id"""
CLICKS_SQL = """
SELECT event_id, user_id, toString(event_type), device_id, toUnixTimestamp64Milli(ts) AS ts_ms
FROM silver_clicks FINAL {where} ORDER BY ts_ms, event_id"""


def _rows(ch: ClickHouse, sql: str, until_ms: int | None) -> Iterator[tuple[Any, ...]]:
    where = "" if until_ms is None else "WHERE ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')"
    params = {} if until_ms is None else {"until": until_ms}
    yield from ch.rows(sql.format(where=where), params)


def recompute(ch: ClickHouse, *, until_ms: int | None = None) -> dict[FeatureView, Touched]:
    """Each view's entities → (event time, last event id, values) after replaying the silver tables
    (events with ``ts < until_ms`` when given)."""
    computer = FeatureComputer()
    out: dict[FeatureView, Touched] = {view: {} for view in VIEWS}
    for event_id, card_id, merchant_id, amount, ts_ms in _rows(ch, PAYMENTS_SQL, until_ms):
        computer.latest(computer.add(T.I_PAYMENTS, {"event_id": event_id, "card_id": card_id, "merchant_id": merchant_id,
                                           "amount": float(amount), "ts_ms": int(ts_ms)}), out)
    for event_id, user_id, event_type, device_id, ts_ms in _rows(ch, CLICKS_SQL, until_ms):
        computer.latest(computer.add(T.I_CLICKS, {"event_id": event_id, "user_id": user_id, "event_type": event_type,
                                         "device_id": device_id, "ts_ms": int(ts_ms)}), out)
    return out
