"""CDC connector: PostgreSQL logical replication (``pgoutput``) to Debezium-envelope Avro topics.

Each captured table ``<table>`` is published to ``cdc.<table>`` in the
Debezium envelope (``before``, ``after``, ``source``, ``op``, ``ts_ms``), encoded
with the topic's schema (the project's ``schemas/cdc.<table>/``) in the Confluent wire format, keyed by
the primary key (UTF-8; composite keys joined with ``|``). Values follow
Debezium's ``decimal.handling.mode=double``: numerics (with or without scale,
any precision) are doubles, so ``NaN`` and ``±Infinity`` pass and digits past
a double's 15-17 are rounded; ``timestamptz`` is an ISO-8601 UTC string with
microseconds (``ZonedTimestamp``); booleans are booleans, ``bytea`` is bytes,
NULL is null in every type. Two spellings differ from Debezium's
``time.precision.mode=adaptive_time_microseconds``: ``timestamp`` without time
zone is an ISO-8601 string without offset (Debezium: ``MicroTimestamp``, a
long), and ``date``/``time`` keep PostgreSQL's text (Debezium: ``Date`` int /
``MicroTime`` long). No example project's schema has such a column yet.
A delete is an ``op="d"`` event followed by a tombstone (null value) with the
same key.

Delivery is **at-least-once**. The connector polls the replication slot with
``pg_logical_slot_peek_binary_changes`` (the slot does not move), publishes every
change of the complete transactions it got, waits until Kafka acknowledged every
record, and only then advances the slot with ``pg_replication_slot_advance``.
A crash anywhere before the advance re-sends those transactions on restart.
Order is preserved per key (one key, one partition, idempotent producer).

**Dedup key.** Every envelope carries ``source.lsn`` and ``source.txId``
(snapshot reads too: the slot's consistent LSN and the snapshot transaction's
id). Consumers dedupe on ``(topic, key, op, source.lsn)``, ``source.txId`` as
a check: a re-sent change keeps its LSN and ``txId``, while distinct changes
of one key never share an LSN (the delete and create of a primary-key change
share it but differ in ``key``/``op``; snapshot rows share the snapshot LSN
but differ in key). ``ts_ms`` is when the envelope was built, so it differs
between copies: leave it out of the key. Tombstones carry no value; a re-sent
tombstone deletes what is already deleted. A snapshot redone after a crash
mid-snapshot runs on a new slot, so its ``op="r"`` rows carry a new LSN and
are *not* removed by this key; they are whole-row reads, idempotent as upserts
by key. Debezium itself re-sends with the same ``lsn``/``txId``, so the same
key works for its messages.

**Unchanged TOASTed columns.** ``setup()`` sets ``REPLICA IDENTITY FULL`` on
every captured table (and re-sets it on every start), so updates and deletes
log the whole old row with TOASTed values inlined; the connector fills an
unchanged TOASTed column of the new row from it, and ``before`` is always the
full old row. The cost, on the database: every UPDATE and DELETE of a captured
table writes the entire old row to WAL, including its out-of-line values (a
10 kB text column adds ~10 kB of WAL per update even when untouched), which
means more WAL volume, replication traffic and decoding work; the ALTER takes
a brief ACCESS EXCLUSIVE lock. Should the old row be missing anyway (someone
set the identity back while the connector ran; the next ``setup()`` sets FULL
again), the connector does what Debezium does under ``REPLICA IDENTITY
DEFAULT``: an unchanged TOASTed text-like column gets the placeholder
``__debezium_unavailable_value`` (:data:`UNAVAILABLE_VALUE`; its UTF-8 bytes
for ``bytea``), ``before`` is null, and a warning names the table. Consumers
must then not overwrite the stored value with the placeholder. A TOASTed
column of another type (e.g. a huge ``numeric``) cannot hold the placeholder
and stops the connector with :class:`CdcError`.

**Debezium-produced messages.** The ``cdc.*`` reader schemas resolve what
Debezium's PostgreSQL connector writes through Confluent's AvroConverter
(``decimal.handling.mode=double``): Avro matches records by unqualified name
(``Envelope``, ``Value``, ``Source``), fields by name, and skips writer-only
fields (``transaction``, ``ts_us``, ``ts_ns``, ``source.ts_us``...).
Debezium's message *keys* are Avro/JSON structs, not this connector's UTF-8
strings: dedupe only within one producer.

**Metrics.** :attr:`CdcConnector.stats` (:class:`CdcStats`) counts snapshot
rows, published changes, transactions and records, the last LSN the slot was
advanced to, and the replication slot's lag in bytes, sampled on every poll
from the position query the poll runs anyway.

The initial snapshot (``op="r"``, ``source.snapshot="true"``) reads every row
in a REPEATABLE READ transaction on the snapshot the slot was created with, so
snapshot and stream neither overlap nor leave a gap. Its completion is recorded
in the table ``weir_cdc_state``; a connector killed mid-snapshot drops the slot
and snapshots again on its next ``setup()``.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Message, Producer
from psycopg import sql
from psycopg.abc import Buffer
from psycopg.adapt import Loader

from streams.codec import AvroCodec
from streams.kafka import ensure_topics, producer_config

log = logging.getLogger(__name__)

CONNECTOR_VERSION = "weir-0.1"
STATE_TABLE = "weir_cdc_state"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


class CdcError(RuntimeError):
    """The connector cannot go on; nothing after the last advanced LSN is lost."""


class CdcConnectionLost(CdcError):
    """The PostgreSQL connection dropped; restart the connector (it resumes from the slot)."""


# --------------------------------------------------------------------------------------------
# pgoutput protocol (version 1), parsed from pg_logical_slot_peek_binary_changes rows
# --------------------------------------------------------------------------------------------

UNCHANGED_TOAST = object()
"""Tuple value ``'u'``: an unchanged TOASTed column whose value the message does not carry."""

TupleValue = str | None | object  # text value, NULL, or UNCHANGED_TOAST

UNAVAILABLE_VALUE = "__debezium_unavailable_value"
"""Debezium's default ``unavailable.value.placeholder``: an unchanged TOASTed value that was not logged."""


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    convert: Callable[[str], Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "convert", converter(self.type_oid))


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_ts_us: int  # microseconds since 2000-01-01 UTC
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_ts_us: int


@dataclass(frozen=True, slots=True)
class RowChange:
    kind: str  # "I", "U" or "D"
    relid: int
    old: tuple[TupleValue, ...] | None
    new: tuple[TupleValue, ...] | None
    old_is_key: bool = False  # 'K': only the replica identity columns are set (others NULL); 'O': whole row


@dataclass(frozen=True, slots=True)
class Truncate:
    relids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Ignored:
    """Origin and Type messages: nothing to publish."""

    kind: str


PgOutputMessage = Begin | Commit | Relation | RowChange | Truncate | Ignored


_U8, _I16, _I32 = struct.Struct(">B"), struct.Struct(">h"), struct.Struct(">i")
_U32, _I64, _U64 = struct.Struct(">I"), struct.Struct(">q"), struct.Struct(">Q")


class _Buffer:
    """Big-endian cursor over one pgoutput message."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _unpack(self, fmt: struct.Struct) -> int:
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return int(value)

    def u8(self) -> int:
        return self._unpack(_U8)

    def i16(self) -> int:
        return self._unpack(_I16)

    def i32(self) -> int:
        return self._unpack(_I32)

    def u32(self) -> int:
        return self._unpack(_U32)

    def i64(self) -> int:
        return self._unpack(_I64)

    def u64(self) -> int:
        return self._unpack(_U64)

    def char(self) -> str:
        return chr(self.u8())

    def cstring(self) -> str:
        end = self.data.index(0, self.pos)
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("truncated pgoutput message")
        self.pos += n
        return chunk


def parse_message(data: bytes) -> PgOutputMessage:
    """Parse one pgoutput (protocol 1) message; ``ValueError`` on anything unknown or malformed.

    >>> parse_message(b"B" + (0x16B3748).to_bytes(8, "big") + (0).to_bytes(8, "big") + (742).to_bytes(4, "big"))
    Begin(final_lsn=23803720, commit_ts_us=0, xid=742)
    """
    buf = _Buffer(data)
    kind = buf.char()
    if kind == "B":
        return Begin(final_lsn=buf.u64(), commit_ts_us=buf.i64(), xid=buf.u32())
    if kind == "C":
        buf.u8()  # flags, unused
        return Commit(commit_lsn=buf.u64(), end_lsn=buf.u64(), commit_ts_us=buf.i64())
    if kind == "R":
        relid, namespace, name = buf.u32(), buf.cstring(), buf.cstring()
        buf.u8()  # replica identity setting
        columns = []
        for _ in range(buf.i16()):
            buf.u8()  # flags: 1 = part of the replica identity
            col_name, type_oid = buf.cstring(), buf.u32()
            buf.i32()  # type modifier
            columns.append(Column(col_name, type_oid))
        return Relation(relid, namespace or "pg_catalog", name, tuple(columns))
    if kind == "I":
        relid = buf.u32()
        _expect(buf, "N")
        return RowChange("I", relid, None, _tuple(buf))
    if kind == "U":
        relid = buf.u32()
        old, old_tag = None, ""
        tag = buf.char()
        if tag in ("K", "O"):
            old, old_tag = _tuple(buf), tag
            tag = buf.char()
        if tag != "N":
            raise ValueError(f"update message: expected 'N', got {tag!r}")
        return RowChange("U", relid, old, _tuple(buf), old_tag == "K")
    if kind == "D":
        relid = buf.u32()
        tag = buf.char()
        if tag not in ("K", "O"):
            raise ValueError(f"delete message: expected 'K' or 'O', got {tag!r}")
        return RowChange("D", relid, _tuple(buf), None, tag == "K")
    if kind == "T":
        count = buf.i32()
        buf.u8()  # options: cascade / restart identity
        return Truncate(tuple(buf.u32() for _ in range(count)))
    if kind in ("O", "Y"):
        return Ignored(kind)
    raise ValueError(f"unknown pgoutput message type {kind!r}")


def _expect(buf: _Buffer, tag: str) -> None:
    got = buf.char()
    if got != tag:
        raise ValueError(f"expected {tag!r}, got {got!r}")


def _tuple(buf: _Buffer) -> tuple[TupleValue, ...]:
    # the hot loop of the connector: locals instead of _Buffer calls
    data, pos = buf.data, buf.pos
    (count,) = _I16.unpack_from(data, pos)
    pos += 2
    values: list[TupleValue] = []
    for _ in range(count):
        kind = data[pos]
        pos += 1
        if kind == 0x74:  # 't'
            (size,) = _I32.unpack_from(data, pos)
            pos += 4
            if pos + size > len(data):
                raise ValueError("truncated pgoutput tuple")
            values.append(data[pos : pos + size].decode())
            pos += size
        elif kind == 0x6E:  # 'n'
            values.append(None)
        elif kind == 0x75:  # 'u'
            values.append(UNCHANGED_TOAST)
        else:  # 'b' only appears with the 'binary' option, which Weir does not request
            raise ValueError(f"unsupported tuple value kind {chr(kind)!r}")
    buf.pos = pos
    return tuple(values)


# --------------------------------------------------------------------------------------------
# values: PostgreSQL text output -> the Python values of the Debezium schemas
# --------------------------------------------------------------------------------------------

_BOOL, _BYTEA, _INT8, _INT2, _INT4, _OID = 16, 17, 20, 21, 23, 26
_FLOAT4, _FLOAT8, _NUMERIC = 700, 701, 1700
_TIMESTAMP, _TIMESTAMPTZ = 1114, 1184


def pg_text_to_python(type_oid: int, text: str) -> Any:
    """Convert PostgreSQL's text output of a value (session ``TimeZone=UTC``, ``DateStyle=ISO``).

    >>> pg_text_to_python(1700, "12.50"), pg_text_to_python(16, "t")
    (12.5, True)
    >>> pg_text_to_python(1184, "2026-01-01 00:00:00.123456+00")
    '2026-01-01T00:00:00.123456Z'
    """
    return converter(type_oid)(text)


def converter(type_oid: int) -> Callable[[str], Any]:
    """The function that converts a column of this type (resolved once per column, not per value)."""
    return _CONVERTERS.get(type_oid, str)  # text, varchar, uuid, json, date, ...: their text form


def _bool(text: str) -> bool:
    return text == "t"


def _bytea(text: str) -> bytes:
    return bytes.fromhex(text[2:]) if text.startswith("\\x") else text.encode()


def _zoned_timestamp(text: str) -> str:
    """Debezium's ZonedTimestamp: ISO-8601 in UTC with microseconds, e.g. ``2026-01-01T00:00:00.000000Z``."""
    if len(text) >= 22 and text.endswith("+00") and text[4] == "-" and text[10] == " ":
        # the common case under TimeZone=UTC, 'YYYY-MM-DD HH:MM:SS[.ffffff]+00', without datetime
        fraction = text[19:-3]
        return f"{text[:10]}T{text[11:19]}{fraction.ljust(7, '0') if fraction else '.000000'}Z"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:  # 'infinity', BC dates, years past 9999: keep PostgreSQL's spelling
        return text
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _local_timestamp(text: str) -> str:
    try:
        return datetime.fromisoformat(text).strftime("%Y-%m-%dT%H:%M:%S.%f")
    except ValueError:
        return text


_CONVERTERS: dict[int, Callable[[str], Any]] = {
    _BOOL: _bool,
    **dict.fromkeys((_INT2, _INT4, _INT8, _OID), int),
    **dict.fromkeys((_FLOAT4, _FLOAT8, _NUMERIC), float),  # numeric 'NaN', float 'Infinity' parse too
    _TIMESTAMPTZ: _zoned_timestamp,
    _TIMESTAMP: _local_timestamp,
    _BYTEA: _bytea,
}


def lsn_to_int(text: str) -> int:
    """``'16/B374D848'`` -> its 64-bit integer.

    >>> lsn_to_int("1/2A")
    4294967338
    """
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value: int) -> str:
    """Inverse of :func:`lsn_to_int`.

    >>> int_to_lsn(4294967338)
    '1/2A'
    """
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# --------------------------------------------------------------------------------------------
# tables and envelopes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedTable:
    """A table the connector publishes, as found in the catalog."""

    schema: str
    name: str
    primary_key: tuple[str, ...]
    columns: tuple[Column, ...]  # catalog order, as the snapshot reads them

    @property
    def topic(self) -> str:
        return f"cdc.{self.name}"

    @property
    def qualified(self) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.name))


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to produce. ``repr`` leaves the value out (it holds row data)."""

    topic: str
    key: bytes
    value: bytes | None = field(repr=False)
    lsn: int


def _row(columns: Iterable[Column], values: Iterable[TupleValue]) -> dict[str, Any]:
    return {
        col.name: None if value is None else col.convert(str(value))
        for col, value in zip(columns, values, strict=True)
    }


def _key(columns: tuple[Column, ...], values: tuple[TupleValue, ...], primary_key: tuple[str, ...]) -> bytes:
    by_name = dict(zip((c.name for c in columns), values, strict=True))
    return "|".join(str(by_name[name]) for name in primary_key).encode()


class EnvelopeEncoder:
    """Builds and encodes Debezium envelopes for the captured tables."""

    def __init__(self, tables: Iterable[CapturedTable], db: str, clock: Callable[[], float]) -> None:
        self.db = db
        self.clock = clock
        self._codecs = {t.topic: AvroCodec(t.topic) for t in tables}

    def encode(
        self,
        table: CapturedTable,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        *,
        ts_ms: int,
        lsn: int | None,
        tx_id: int | None,
        snapshot: str = "false",
    ) -> bytes:
        source = {
            "version": CONNECTOR_VERSION,
            "connector": "postgresql",
            "name": "weir",
            "ts_ms": ts_ms,
            "snapshot": snapshot,
            "db": self.db,
            "sequence": None,
            "schema": table.schema,
            "table": table.name,
            "txId": tx_id,
            "lsn": lsn,
            "xmin": None,
        }
        envelope = {
            "before": before,
            "after": after,
            "source": source,
            "op": op,
            "ts_ms": int(self.clock() * 1000),
        }
        try:
            return self._codecs[table.topic].encode(envelope)
        except (ValueError, TypeError, KeyError) as exc:
            # the message of fastavro's errors can quote the row: name the table and type only
            raise CdcError(
                f"a row of {table.schema}.{table.name} at LSN {int_to_lsn(lsn or 0)} does not fit schema "
                f"{table.topic!r} ({type(exc).__name__}); the table and the project's schemas/{table.topic} disagree"
            ) from None


class ChangeDecoder:
    """Turns pgoutput messages into outgoing records, one complete transaction at a time.

    Feed it the rows of ``pg_logical_slot_peek_binary_changes`` in order; it
    returns a transaction's records when it sees the transaction's Commit, so
    callers only ever hold whole transactions.
    """

    def __init__(self, tables: Iterable[CapturedTable], encoder: EnvelopeEncoder) -> None:
        self._tables = {(t.schema, t.name): t for t in tables}
        self._encoder = encoder
        self._relations: dict[int, Relation] = {}
        self._begin: Begin | None = None
        self._pending: list[Outgoing] = []
        self._changes = 0

    def feed(self, lsn: int, data: bytes) -> tuple[list[Outgoing], int, Commit] | None:
        """Consume one message; on Commit return (records, number of changes, the commit)."""
        msg = parse_message(data)
        if isinstance(msg, Relation):
            self._relations[msg.relid] = msg
        elif isinstance(msg, Begin):
            self._begin, self._pending, self._changes = msg, [], 0
        elif isinstance(msg, RowChange):
            self._on_change(lsn, msg)
        elif isinstance(msg, Truncate):
            names = [self._relations[r].name for r in msg.relids if r in self._relations]
            log.warning(
                "TRUNCATE of %s at LSN %s is not published (Debezium skips it by default)",
                names,
                int_to_lsn(lsn),
            )
        elif isinstance(msg, Commit):
            done = (self._pending, self._changes, msg)
            self._begin, self._pending, self._changes = None, [], 0
            return done
        return None

    def _on_change(self, lsn: int, change: RowChange) -> None:
        if self._begin is None:
            raise CdcError(f"pgoutput change at LSN {int_to_lsn(lsn)} outside a transaction")
        relation = self._relations.get(change.relid)
        if relation is None:
            raise CdcError(f"pgoutput change at LSN {int_to_lsn(lsn)} for unknown relation {change.relid}")
        table = self._tables.get((relation.namespace, relation.name))
        if table is None:  # in the publication but not captured by this connector
            return
        cols, pk = relation.columns, table.primary_key
        old, new = change.old, change.new
        if new is not None and old is not None and not change.old_is_key:
            new = tuple(o if n is UNCHANGED_TOAST else n for o, n in zip(old, new, strict=True))
        if new is not None and any(v is UNCHANGED_TOAST for v in new):
            new = _unavailable_placeholders(table, cols, new, lsn)
        # Without REPLICA IDENTITY FULL only the key is logged: Debezium leaves `before` empty then.
        full_old = old is not None and not change.old_is_key and UNCHANGED_TOAST not in old
        before = _row(cols, old) if full_old and old is not None else None
        after = _row(cols, new) if new is not None else None
        key = _key(cols, new, pk) if new is not None else None
        old_key = _key(cols, old, pk) if old is not None else key
        ts_ms = int((_PG_EPOCH + timedelta(microseconds=self._begin.commit_ts_us)).timestamp() * 1000)
        xid = self._begin.xid

        def enc(op: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> bytes:
            return self._encoder.encode(table, op, before, after, ts_ms=ts_ms, lsn=lsn, tx_id=xid)

        if change.kind == "I" and key is not None:
            self._emit(table, key, enc("c", None, after), lsn)
        elif change.kind == "U" and key is not None and old_key in (None, key):
            self._emit(table, key, enc("u", before, after), lsn)
        elif change.kind == "U" and key is not None and old_key is not None:
            # primary key changed: Debezium emits delete + tombstone for the old key, then create
            self._emit(table, old_key, enc("d", before, None), lsn)
            self._emit(table, old_key, None, lsn)
            self._emit(table, key, enc("c", None, after), lsn)
        elif change.kind == "D" and old_key is not None:
            self._emit(table, old_key, enc("d", before, None), lsn)
            self._emit(table, old_key, None, lsn)  # tombstone, as Debezium sends
        else:
            raise CdcError(
                f"malformed pgoutput {change.kind!r} change for {table.name} at LSN {int_to_lsn(lsn)}"
            )
        self._changes += 1

    def _emit(self, table: CapturedTable, key: bytes, value: bytes | None, lsn: int) -> None:
        self._pending.append(Outgoing(table.topic, key, value, lsn))


_PLACEHOLDER_OK = (str, _bytea)  # converters whose columns can carry UNAVAILABLE_VALUE


def _unavailable_placeholders(
    table: CapturedTable, columns: tuple[Column, ...], new: tuple[TupleValue, ...], lsn: int
) -> tuple[TupleValue, ...]:
    """``new`` with each unchanged TOASTed value replaced by :data:`UNAVAILABLE_VALUE`, as Debezium does.

    Reached only when the old row was not logged (the table lost REPLICA
    IDENTITY FULL). Raises :class:`CdcError` for a column whose type cannot
    carry the placeholder.
    """
    for col, value in zip(columns, new, strict=True):
        if value is UNCHANGED_TOAST and col.convert not in _PLACEHOLDER_OK:
            raise CdcError(
                f"{table.name}.{col.name}: unchanged TOASTed value at LSN {int_to_lsn(lsn)} without the old "
                "row, and its type cannot hold Debezium's placeholder; the table needs REPLICA IDENTITY FULL"
            )
    log.warning(
        "%s: unchanged TOASTed values at LSN %s published as %r: the table is not REPLICA IDENTITY FULL",
        table.name,
        int_to_lsn(lsn),
        UNAVAILABLE_VALUE,
    )
    return tuple(UNAVAILABLE_VALUE if v is UNCHANGED_TOAST else v for v in new)


# --------------------------------------------------------------------------------------------
# the connector
# --------------------------------------------------------------------------------------------


@dataclass
class CdcStats:
    """What one connector did since it was constructed: the connector's metrics.

    Written only by the connector's thread. Other threads may read a field at
    any time (each is replaced whole) or take :meth:`as_dict`, a copy whose
    fields may straddle one poll. Re-sent changes count again.
    """

    snapshot_rows: int = 0
    """Rows published as ``op="r"`` by snapshots this connector ran."""
    changes_published: int = 0
    """Row changes (c/u/d; a primary-key change counts once) acknowledged by Kafka; tombstones not counted."""
    transactions_published: int = 0
    """Committed transactions with at least one captured change, acknowledged by Kafka."""
    records_published: int = 0
    """Kafka records acknowledged: snapshot rows, change events and tombstones."""
    last_advanced_lsn: int | None = None
    """Where this connector last advanced the slot (None until it has); see :func:`int_to_lsn`."""
    slot_lag_bytes: int | None = None
    """WAL bytes between the server's flushed position and the slot's confirmed position, as of the last
    sample: taken on every poll, before publishing (the backlog) and again after advancing (what is left)."""
    lag_sampled_at: float | None = None
    """The connector's ``clock()`` at that sample."""

    def as_dict(self) -> dict[str, int | float | None]:
        return asdict(self)


@dataclass
class _Batch:
    records: list[Outgoing]
    changes: int
    transactions: int
    upto: int  # the server's flushed WAL position when the batch was read
    confirmed: int  # the slot's confirmed position then
    advance_to: int | None  # slot position once every record is acknowledged


class CdcConnector:
    """Streams captured tables from a logical replication slot to ``cdc.<table>`` topics.

    Not thread-safe: one thread calls ``setup()``, then ``poll_once()`` or
    ``run()``, then ``close()``. Every method blocks on PostgreSQL and Kafka.
    Delivery is at-least-once (see the module docstring).
    """

    def __init__(
        self,
        dsn: str,
        bootstrap: str,
        tables: list[str],
        *,
        slot: str = "weir_cdc",
        publication: str = "weir_cdc",
        partitions: int = 4,
        poll_interval_s: float = 0.05,
        max_changes: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not tables:
            raise ValueError("CdcConnector needs at least one table")
        self.dsn = dsn
        self.bootstrap = bootstrap
        self.table_names = list(tables)
        self.slot = slot
        self.publication = publication
        self.partitions = partitions
        self.poll_interval_s = poll_interval_s
        self.max_changes = max_changes
        self.clock = clock
        self.tables: list[CapturedTable] = []
        self._db = ""
        self._conn: psycopg.Connection[Any] | None = None
        self._producer: Producer | None = None
        self._decoder: ChangeDecoder | None = None
        self._encoder: EnvelopeEncoder | None = None
        self._delivery_errors: list[str] = []
        self._last_offsets: dict[tuple[str, int], int] = {}
        self.stats = CdcStats()
        """Counters and slot lag; see :class:`CdcStats`."""

    # -- lifecycle ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Connect, create topics, publication and slot if missing; snapshot when the slot is new.

        Idempotent. Blocks until the snapshot (if any) is acknowledged by Kafka.
        Raises :class:`CdcError` naming the table when one is missing or has no primary key.
        """
        conn = self._connect()
        with self._guard("setup"):
            self.tables = [self._describe(conn, name) for name in self.table_names]
            self._db = str(self._scalar("SELECT current_database()"))
            self._encoder = EnvelopeEncoder(self.tables, self._db, self.clock)
            self._decoder = ChangeDecoder(self.tables, self._encoder)
            if self._producer is None:  # murmur2: the partition Java clients (and Debezium) pick per key
                self._producer = Producer(producer_config(self.bootstrap, partitioner="murmur2_random"))
            ensure_topics(self.bootstrap, [t.topic for t in self.tables], self.partitions)
            self._ensure_publication(conn)
            self._ensure_state_table(conn)
            if not self._snapshot_done(conn):
                self._create_slot_and_snapshot()
        log.info(
            "CDC ready: slot %s, publication %s, tables %s",
            self.slot,
            self.publication,
            [t.topic for t in self.tables],
        )

    def poll_once(self) -> int:
        """Publish the changes waiting in the slot, then advance the slot past them.

        Blocks until Kafka acknowledged every record; advances only then, so a
        crash at any point re-sends rather than loses. Returns the number of row
        changes published (tombstones not counted). Updates :attr:`stats`, the
        slot lag included (sampled from the position this poll reads anyway).
        """
        batch = self._read_batch()
        self._sample_lag(batch.upto - batch.confirmed)
        if batch.records:
            self._publish(batch.records)
        self.stats.changes_published += batch.changes
        self.stats.transactions_published += batch.transactions
        if batch.advance_to is not None:
            self._advance(batch.advance_to)
            self.stats.last_advanced_lsn = batch.advance_to
        self._sample_lag(max(0, batch.upto - max(batch.confirmed, batch.advance_to or 0)))
        if batch.changes:
            log.info(
                "published %d changes up to LSN %s; last offsets %s",
                batch.changes,
                int_to_lsn(batch.advance_to or 0),
                self._offsets_summary(),
            )
        return batch.changes

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; sleeps ``poll_interval_s`` when the slot is empty. Raises on error."""
        while not stop.is_set():
            if self.poll_once() == 0:
                stop.wait(self.poll_interval_s)

    def close(self) -> None:
        """Flush the producer and close the connection. Does not advance the slot."""
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def slot_lag_bytes(self) -> int:
        """WAL bytes between the server's current position and the slot's confirmed position, queried now.

        Also recorded in :attr:`stats`. ``poll_once`` samples the lag without this extra query.
        """
        lag = self._scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        if lag is None:
            raise CdcError(f"replication slot {self.slot!r} does not exist")
        self._sample_lag(int(lag))
        return int(lag)

    def _sample_lag(self, lag: int) -> None:
        self.stats.slot_lag_bytes = lag
        self.stats.lag_sampled_at = self.clock()

    # -- PostgreSQL -----------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.dsn, autocommit=True)
            except psycopg.OperationalError as exc:
                raise CdcConnectionLost(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
            _session_settings(self._conn)
        return self._conn

    def _guard(self, what: str) -> _ConnectionGuard:
        return _ConnectionGuard(self, what)

    def _scalar(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        with self._guard("query"):
            row = self._connect().execute(query, params).fetchone()
        return None if row is None else row[0]

    def _describe(self, conn: psycopg.Connection[Any], name: str) -> CapturedTable:
        schema, _, table = name.rpartition(".")
        schema = schema or "public"
        oid = conn.execute(
            "SELECT to_regclass(%s)::oid", (sql.Identifier(schema, table).as_string(conn),)
        ).fetchone()
        if oid is None or oid[0] is None:
            raise CdcError(f"table {schema}.{table} does not exist")
        columns = conn.execute(
            "SELECT attname, atttypid::int8 FROM pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            (oid[0],),
        ).fetchall()
        pk = conn.execute(
            "SELECT a.attname FROM pg_index i"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n",
            (oid[0],),
        ).fetchall()
        if not pk:
            raise CdcError(f"table {schema}.{table} has no primary key; CDC needs one to key its topic")
        return CapturedTable(
            schema, table, tuple(r[0] for r in pk), tuple(Column(c, int(t)) for c, t in columns)
        )

    def _ensure_publication(self, conn: psycopg.Connection[Any]) -> None:
        exists = conn.execute(
            "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,)
        ).fetchone()
        pub = sql.Identifier(self.publication)
        if exists is None:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    pub, sql.SQL(", ").join(t.qualified for t in self.tables)
                )
            )
        else:
            published = set(
                conn.execute(
                    "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                    (self.publication,),
                ).fetchall()
            )
            for t in self.tables:
                if (t.schema, t.name) not in published:
                    conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, t.qualified))
        for t in self.tables:
            ident = conn.execute(
                "SELECT relreplident FROM pg_class WHERE oid = to_regclass(%s)",
                (t.qualified.as_string(conn),),
            ).fetchone()
            if ident is None or ident[0] != "f":  # FULL: updates and deletes carry the whole old row
                conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(t.qualified))

    def _ensure_state_table(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (slot text PRIMARY KEY, snapshot_lsn pg_lsn NOT NULL,"
                " snapshot_done_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(STATE_TABLE))
        )

    def _snapshot_done(self, conn: psycopg.Connection[Any]) -> bool:
        """True when the slot exists and its snapshot completed; drops a slot whose snapshot did not."""
        slot = conn.execute(
            "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
        ).fetchone()
        done = conn.execute(
            sql.SQL("SELECT 1 FROM {} WHERE slot = %s").format(sql.Identifier(STATE_TABLE)), (self.slot,)
        ).fetchone()
        if slot is not None and slot[0] != "pgoutput":
            raise CdcError(f"replication slot {self.slot!r} exists with plugin {slot[0]!r}, not pgoutput")
        if slot is not None and slot[1] != self._db:
            raise CdcError(
                f"replication slot {self.slot!r} belongs to database {slot[1]!r}; slot names are "
                "cluster-wide, give this connector another one"
            )
        if slot is not None and done is not None:
            return True
        if slot is not None:
            log.warning(
                "slot %s exists but its snapshot never completed: dropping it to snapshot again", self.slot
            )
            conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE slot = %s").format(sql.Identifier(STATE_TABLE)), (self.slot,)
        )
        return False

    def _create_slot_and_snapshot(self) -> None:
        """Create the slot exporting its snapshot, publish every row as ``op="r"``, then mark it done.

        The replication connection must stay open and idle while the snapshot
        is read: the exported snapshot lives only that long.
        """
        with psycopg.connect(self.dsn, autocommit=True, replication="database") as repl:
            cur = psycopg.ClientCursor(repl)  # replication commands need the simple query protocol
            cur.execute(
                sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')").format(
                    sql.Identifier(self.slot)
                )
            )
            row = cur.fetchone()
            assert row is not None
            consistent_lsn, snapshot_name = lsn_to_int(row[1]), str(row[2])
            log.info("created slot %s at LSN %s; snapshotting %d tables", self.slot, row[1], len(self.tables))
            rows = 0
            for records in self._snapshot_batches(snapshot_name, consistent_lsn):
                self._publish(records)
                rows += len(records)
                self.stats.snapshot_rows += len(records)
        conn = self._connect()
        conn.execute(
            sql.SQL("INSERT INTO {} (slot, snapshot_lsn) VALUES (%s, %s)").format(
                sql.Identifier(STATE_TABLE)
            ),
            (self.slot, int_to_lsn(consistent_lsn)),
        )
        log.info(
            "snapshot of slot %s complete: %d rows; last offsets %s", self.slot, rows, self._offsets_summary()
        )

    def _snapshot_batches(self, snapshot_name: str, lsn: int) -> Iterator[list[Outgoing]]:
        """Every row of every table at the exported snapshot, as batches of ``op="r"`` records."""
        assert self._encoder is not None
        ts_ms = int(self.clock() * 1000)
        with psycopg.connect(self.dsn) as snap:
            _session_settings(snap)
            snap.commit()
            snap.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            snap.read_only = True
            snap.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))
            tx_id = _snapshot_tx_id(snap)
            for table in self.tables:
                # Rows come as the types' text output, the very spelling pgoutput sends, so both
                # paths convert alike (a ::text cast would not: bool gives 'true', bpchar is trimmed).
                for col in table.columns:
                    snap.adapters.register_loader(col.type_oid, _RawText)
                select = sql.SQL("SELECT {} FROM {}").format(
                    sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns), table.qualified
                )
                with snap.cursor(name=f"weir_snapshot_{table.name}") as cur:
                    cur.execute(select)
                    while chunk := cur.fetchmany(self.max_changes):
                        yield [
                            Outgoing(
                                table.topic,
                                _key(table.columns, values, table.primary_key),
                                self._encoder.encode(
                                    table,
                                    "r",
                                    None,
                                    _row(table.columns, values),
                                    ts_ms=ts_ms,
                                    lsn=lsn,
                                    tx_id=tx_id,
                                    snapshot="true",
                                ),
                                lsn,
                            )
                            for values in chunk
                        ]
            snap.rollback()

    def _read_batch(self) -> _Batch:
        """Peek whole transactions from the slot (the slot does not move)."""
        assert self._decoder is not None, "call setup() first"
        with self._guard("reading the replication slot"):
            conn = self._connect()
            pos = conn.execute(
                "SELECT pg_current_wal_flush_lsn()::text, confirmed_flush_lsn::text,"
                " pg_current_wal_flush_lsn() = pg_current_wal_insert_lsn()"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            ).fetchone()
            if pos is None:
                raise CdcError(f"replication slot {self.slot!r} disappeared")
            upto, confirmed, quiet = lsn_to_int(pos[0]), lsn_to_int(pos[1]), bool(pos[2])
            rows = conn.execute(
                "SELECT (lsn - '0/0'::pg_lsn)::int8, data FROM pg_logical_slot_peek_binary_changes("
                "%s, %s::pg_lsn, %s, 'proto_version', '1', 'publication_names', %s)",
                (self.slot, int_to_lsn(upto), self.max_changes, self.publication),
            ).fetchall()
        records: list[Outgoing] = []
        changes, transactions, last_end = 0, 0, None
        for lsn, data in rows:
            done = self._decoder.feed(int(lsn), bytes(data))
            if done is not None:
                records += done[0]
                changes += done[1]
                transactions += int(done[1] > 0)
                last_end = done[2].end_lsn
        # Transactions that touch no captured table produce no rows, so a slot advanced
        # only to commits it published would pin their WAL forever. Advancing to `upto`
        # skips it, and is safe only when decoding reached `upto` (fewer rows than the
        # limit) and `upto` is a record boundary: everything inserted was flushed. The
        # flush position can fall inside a commit record still being written; advancing
        # there would make the slot skip that transaction.
        target = upto if quiet and len(rows) < self.max_changes else last_end
        advance_to = target if target is not None and target > confirmed else None
        return _Batch(records, changes, transactions, upto, confirmed, advance_to)

    def _advance(self, lsn: int) -> None:
        with self._guard("advancing the replication slot"):
            self._connect().execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self.slot, int_to_lsn(lsn))
            )

    # -- Kafka ----------------------------------------------------------------------------------

    def _publish(self, records: list[Outgoing]) -> None:
        """Produce ``records`` in order and block until every one is acknowledged; raise otherwise."""
        producer = self._producer
        assert producer is not None, "call setup() first"
        self._delivery_errors = []
        for rec in records:
            while True:
                try:
                    producer.produce(rec.topic, rec.value, rec.key, on_delivery=self._on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain
                    producer.poll(0.1)
        remaining = producer.flush(30)
        if remaining:
            raise CdcError(f"{remaining} CDC records not acknowledged by Kafka within 30s; slot not advanced")
        if self._delivery_errors:
            raise CdcError(
                f"{len(self._delivery_errors)} CDC records failed delivery (first: {self._delivery_errors[0]}); "
                "slot not advanced"
            )
        self.stats.records_published += len(records)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")
            return
        tp = (str(msg.topic()), int(msg.partition() or 0))
        self._last_offsets[tp] = max(self._last_offsets.get(tp, -1), int(msg.offset() or 0))

    def _offsets_summary(self) -> str:
        return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(self._last_offsets.items()))


def _snapshot_tx_id(snap: psycopg.Connection[Any]) -> int:
    """The snapshot transaction's id, as Debezium puts in ``source.txId`` of snapshot reads.

    32 bits, like the xids pgoutput sends for streamed changes (``txid_current()``
    adds the epoch above them).
    """
    row = snap.execute("SELECT txid_current() & 4294967295").fetchone()
    assert row is not None
    return int(row[0])


class _RawText(Loader):
    """Loads any text-format value as the server's text output, unparsed."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode()


class _ConnectionGuard:
    """Re-raises PostgreSQL errors as :class:`CdcError`, a dropped connection as :class:`CdcConnectionLost`."""

    def __init__(self, connector: CdcConnector, what: str) -> None:
        self.connector = connector
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if not isinstance(exc, psycopg.Error):
            return
        conn = self.connector._conn
        if conn is None or conn.broken or conn.closed:
            self.connector._conn = None
            raise CdcConnectionLost(
                f"lost the PostgreSQL connection while {self.what}: {exc}".strip()
            ) from exc
        raise CdcError(f"PostgreSQL error while {self.what}: {exc}".strip()) from exc


def _session_settings(conn: psycopg.Connection[Any]) -> None:
    """Fix how values are spelled: pgoutput and ``::text`` both use the session's settings."""
    conn.execute("SET TimeZone = 'UTC'")
    conn.execute("SET DateStyle = 'ISO, YMD'")
    conn.execute("SET extra_float_digits = 1")
    conn.execute("SET IntervalStyle = 'iso_8601'")
