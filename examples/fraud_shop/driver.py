"""Writes the simulated shop into real systems: clicks to Kafka, rows to Postgres.

Clicks go to ``clicks_topic`` as Avro in the Confluent wire format, key = user_id.
Rows go to the shop's tables (``shop.sql``) in small transactions, so a CDC
connector on that database sees a steady stream of ``cdc.<table>`` changes.
Inserts are ``ON CONFLICT DO NOTHING`` (ids are deterministic, so replaying a seed
is idempotent); updates set every non-key column.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer

from examples.fraud_shop.simulator import PRIMARY_KEYS, Click, Row, ShopEvent
from streams.codec import AvroCodec
from streams.kafka import DeliveryTracker, ensure_topics, flush_or_raise, produce_waiting, producer_config

log = logging.getLogger(__name__)

SHOP_SQL = Path(__file__).with_name("shop.sql")

_CHUNK = 256  # events between pacing / stop / progress checks, at most
_CHUNKS_PER_S = 100  # ... and at least this many checks per second when paced

_MAX_ROWS = 200  # rows per Postgres transaction, at most
_MAX_TXN_AGE_S = 0.05  # commit buffered rows at least this often
_OUTAGE_S = 120.0  # how long the driver waits out an unreachable PostgreSQL before it gives up


@dataclass
class DriverStats:
    """What one ``ShopDriver.run`` wrote. ``rows`` counts every Postgres row change."""

    clicks: int = 0
    rows: int = 0
    reference_rows: int = 0
    orders: int = 0
    payments: int = 0
    payment_updates: int = 0
    labels: int = 0
    fraud_payments: int = 0
    transactions: int = 0
    elapsed_s: float = 0.0

    @property
    def events(self) -> int:
        """Clicks plus row changes."""
        return self.clicks + self.rows


@dataclass
class _Pacer:
    """Token bucket: ``rate`` tokens per second, at most ``burst_s`` seconds' worth saved up."""

    rate: float
    burst_s: float = 1.0
    origin: float = field(default_factory=time.monotonic)
    done: int = 0  # events since origin

    def lead(self, n_new: int) -> float:
        """Account for ``n_new`` events; seconds to sleep to stay within the rate (<= 0: none)."""
        self.done += n_new
        now = time.monotonic()
        lead = self.done / self.rate - (now - self.origin)
        if lead < -self.burst_s:  # fell behind (slow sink): do not catch up in one burst
            self.origin, self.done = now - self.burst_s, 0
        return lead


@dataclass
class _RowBuffer:
    """Rows waiting for the next Postgres transaction, in arrival order."""

    rows: list[Row] = field(default_factory=list)
    since: float = 0.0  # monotonic time of the first buffered row


class ShopDriver:
    """Writes ShopEvents into Postgres (``dsn``) and Kafka (``bootstrap``).

    ``rate`` paces the run in events per wall-clock second (``None``: as fast as
    possible); pacing sleeps in chunks, never per event. ``truth`` maps every
    payment_id written so far to ``(is_fraud, pattern)``.
    """

    def __init__(
        self,
        dsn: str,
        bootstrap: str,
        *,
        rate: float | None = None,
        clicks_topic: str = "clickstream.events",
        partitions: int = 4,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 events/s, or None")
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.rate = rate
        self.clicks_topic = clicks_topic
        self.partitions = partitions
        self.truth: dict[str, tuple[bool, str]] = {}
        self._chunk = _CHUNK if rate is None else max(1, min(_CHUNK, int(rate / _CHUNKS_PER_S)))
        self._codec = AvroCodec("clickstream.events")
        self._sql: dict[tuple[str, str, tuple[str, ...]], str] = {}

    # ---- setup ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the shop's tables (idempotent) and the clicks topic if it is missing; blocks."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(SHOP_SQL.read_text())  # trusted file; simple protocol runs many statements
        ensure_topics(self.bootstrap, [self.clicks_topic], self.partitions)

    # ---- run ------------------------------------------------------------------------------
    def run(
        self,
        events: Iterable[ShopEvent],
        progress: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> DriverStats:
        """Write ``events`` in order; blocks until all are durable, then returns the counts.

        Clicks are acknowledged by the broker (flushed) and rows committed before
        this returns; any delivery error raises ``RuntimeError`` at the end. Setting
        ``stop`` ends the run early (after the current chunk), still flushing what
        was written. ``progress(n)`` is called with the number of events written so
        far every chunk (at most 256 events; ~10 ms of a paced run) and once at the end.
        """
        stats = DriverStats()
        tracker = DeliveryTracker()
        producer = Producer(producer_config(self.bootstrap, **{"linger.ms": 5}))
        started = time.monotonic()
        pacer = _Pacer(self.rate) if self.rate is not None else None
        buffer = _RowBuffer()
        self._conn: psycopg.Connection[Any] = psycopg.connect(self.dsn)  # reconnected by _commit
        try:
            for n, event in enumerate(events, 1):
                if isinstance(event, Click):
                    self._produce(producer, event, tracker)
                    stats.clicks += 1
                else:
                    if not buffer.rows:
                        buffer.since = time.monotonic()
                    buffer.rows.append(event)
                    self._count_row(stats, event)
                    if len(buffer.rows) >= _MAX_ROWS:
                        self._commit(buffer, stats)
                if n % self._chunk == 0:
                    producer.poll(0)
                    if buffer.rows and time.monotonic() - buffer.since >= _MAX_TXN_AGE_S:
                        self._commit(buffer, stats)
                    if pacer is not None:
                        self._pace(pacer, buffer, stats)
                    if progress is not None:
                        progress(n)
                    if stop is not None and stop.is_set():
                        break
            self._commit(buffer, stats)
        finally:
            self._conn.close()
        flush_or_raise(producer, tracker, timeout=60.0)
        stats.elapsed_s = time.monotonic() - started
        if progress is not None:
            progress(stats.events)
        return stats

    def _produce(self, producer: Producer, click: Click, on_delivery: DeliveryTracker) -> None:
        produce_waiting(producer, self.clicks_topic, self._codec.encode(click.record),
                        click.record["user_id"].encode(), on_delivery)

    def _pace(self, pacer: _Pacer, buffer: _RowBuffer, stats: DriverStats) -> None:
        """Sleep off any lead over ``rate``, once per chunk."""
        ahead = pacer.lead(self._chunk)
        if ahead > 0.002:
            self._commit(buffer, stats)  # never hold rows back while sleeping
            time.sleep(ahead)

    # ---- Postgres ---------------------------------------------------------------------------
    @staticmethod
    def _count_row(stats: DriverStats, row: Row) -> None:
        stats.rows += 1
        table = row.table
        if table == "payments":
            if row.op == "insert":
                stats.payments += 1
                stats.fraud_payments += bool(row.is_fraud)
            else:
                stats.payment_updates += 1
        elif table == "orders":
            stats.orders += 1
        elif table == "payment_labels":
            stats.labels += 1
        else:
            stats.reference_rows += 1

    def _commit(self, buffer: _RowBuffer, stats: DriverStats) -> None:
        """Write the buffered rows in one transaction; while PostgreSQL is unreachable, reconnect with backoff
        (up to ``_OUTAGE_S``) and write them again: inserts do nothing on conflict and updates set values, so
        a transaction that did commit before the connection broke is written twice harmlessly."""
        delay = 0.5
        deadline = time.monotonic() + _OUTAGE_S
        while True:
            try:
                return self._write(buffer, stats)
            except psycopg.OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("shop: PostgreSQL unreachable (%s); writing %d rows again in %.1f s",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__, len(buffer.rows), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                try:
                    self._conn.close()
                    self._conn = psycopg.connect(self.dsn)
                except psycopg.OperationalError:
                    continue

    def _write(self, buffer: _RowBuffer, stats: DriverStats) -> None:
        """Write the buffered rows in one transaction, grouping consecutive rows of one statement."""
        conn = self._conn
        rows = buffer.rows
        if not rows:
            return
        # One pipeline per transaction: the interleaved tables make groups small, and
        # without it every group would cost a network round trip.
        with conn.pipeline(), conn.cursor() as cur:
            start = 0
            for i in range(1, len(rows) + 1):
                if i == len(rows) or self._shape(rows[i]) != self._shape(rows[start]):
                    group = rows[start:i]
                    sql = self._statement(*self._shape(group[0]))
                    cur.executemany(sql, [self._params(r) for r in group])
                    start = i
        conn.commit()
        stats.transactions += 1
        for row in rows:
            if row.table == "payments" and row.op == "insert":
                self.truth[row.row["payment_id"]] = (bool(row.is_fraud), row.pattern or "legit")
        buffer.rows = []

    @staticmethod
    def _shape(row: Row) -> tuple[str, str, tuple[str, ...]]:
        return row.table, row.op, tuple(row.row)

    @staticmethod
    def _params(row: Row) -> list[Any]:
        if row.op == "insert":
            return list(row.row.values())
        key = PRIMARY_KEYS[row.table]
        return [v for k, v in row.row.items() if k != key] + [row.row[key]]

    def _statement(self, table: str, op: str, columns: tuple[str, ...]) -> str:
        cache_key = (table, op, columns)
        sql = self._sql.get(cache_key)
        if sql is None:
            if table not in PRIMARY_KEYS:
                raise ValueError(f"unknown shop table {table!r}")
            key = PRIMARY_KEYS[table]
            if op == "insert":
                marks = ", ".join(["%s"] * len(columns))
                sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) ON CONFLICT ({key}) DO NOTHING"
            else:
                sets = ", ".join(f"{c} = %s" for c in columns if c != key)
                sql = f"UPDATE {table} SET {sets} WHERE {key} = %s"
            self._sql[cache_key] = sql
        return sql
