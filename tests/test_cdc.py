"""CDC from the embedded PostgreSQL to the embedded broker: envelopes, types, and no loss across crashes.

Real services throughout: one PostgreSQL for the module (a fresh database and
slot per test) and one Tansu broker per test (it starts in well under a second
and keeps every test's topics apart).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import signal
import string
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

import streams.cdc
from streams.cdc import (
    UNAVAILABLE_VALUE,
    CapturedTable,
    CdcConnectionLost,
    CdcConnector,
    CdcError,
    EnvelopeEncoder,
    lsn_to_int,
    pg_text_to_python,
)
from streams.codec import AvroCodec
from streams.embedded.kafka import EmbeddedKafka
from streams.embedded.postgres import EmbeddedPostgres

REPO = Path(__file__).resolve().parent.parent
TABLES = ["payments", "payment_labels"]
DDL = """
CREATE TABLE payments (
    payment_id text PRIMARY KEY, order_id text NOT NULL, customer_id text NOT NULL, card_id text NOT NULL,
    merchant_id text NOT NULL, merchant_category text NOT NULL, amount numeric(12,2) NOT NULL,
    currency text NOT NULL, status text NOT NULL, device_id text NULL, created_at timestamptz NOT NULL);
CREATE TABLE payment_labels (
    payment_id text PRIMARY KEY, is_fraud boolean NOT NULL, reason text NULL,
    payment_created_at timestamptz NOT NULL, labelled_at timestamptz NOT NULL);
"""
_db_numbers = itertools.count()


# -- fixtures: real services ------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture
def bootstrap(tmp_path: Path) -> Iterator[str]:
    kafka = EmbeddedKafka(tmp_path)
    kafka.start()
    try:
        yield kafka.bootstrap
    finally:
        kafka.stop()


@dataclass(frozen=True)
class Db:
    dsn: str
    name: str

    def sql(self, *statements: str, params: tuple[Any, ...] = ()) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement, params or None)

    def connector(self, bootstrap: str, **kwargs: Any) -> CdcConnector:
        return CdcConnector(self.dsn, bootstrap, TABLES, slot=f"slot_{self.name}", partitions=2, **kwargs)


@pytest.fixture
def db(pg: EmbeddedPostgres) -> Db:
    """A fresh database with the shop's payments tables (slots are cluster-wide: each test names its own)."""
    name = f"shop{next(_db_numbers)}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    db = Db(pg.dsn.rsplit("/", 1)[0] + f"/{name}", name)
    db.sql(DDL)
    return db


# -- helpers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str
    value: dict[str, Any] | None  # None: tombstone
    raw: bytes | None


def consume(bootstrap: str, count: int, timeout: float = 15.0) -> list[Record]:
    """Read ``cdc.*`` from the beginning (assigned partitions, no group join) until ``count`` records."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "test-cdc",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    consumer.assign([TopicPartition(f"cdc.{t}", p, OFFSET_BEGINNING) for t in TABLES for p in range(2)])
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.2):
                assert msg.error() is None, msg.error()
                topic, partition, offset, key = msg.topic(), msg.partition(), msg.offset(), msg.key()
                assert topic is not None and partition is not None and offset is not None and key is not None
                raw = msg.value()
                value = None if raw is None else AvroCodec(topic).decode(raw)
                records.append(Record(topic, partition, offset, key.decode(), value, raw))
    finally:
        consumer.close()
    assert len(records) >= count, f"expected {count} records, got {len(records)}"
    return records


def drain(connector: CdcConnector, rounds: int = 50) -> int:
    """Poll until the slot has nothing left (at least one empty round); returns changes published."""
    total = 0
    for _ in range(rounds):
        n = connector.poll_once()
        total += n
        if n == 0:
            return total
    raise AssertionError("the slot never drained")


def payment(pid: str, amount: str = "12.50", device: str | None = "dev-1") -> tuple[Any, ...]:
    return (
        pid,
        f"o-{pid}",
        "cust-1",
        "card-1",
        "m-1",
        "grocery",
        amount,
        "EUR",
        "approved",
        device,
        "2026-01-01 00:00:00.123456+00",
    )


INSERT_PAYMENT = "INSERT INTO payments VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_oid", "text", "expected"),
    [
        (1184, "2026-01-01 00:00:00+00", "2026-01-01T00:00:00.000000Z"),
        (1184, "2026-01-01 00:00:00.5+00", "2026-01-01T00:00:00.500000Z"),
        (1184, "2026-01-01 00:00:00.123456+00", "2026-01-01T00:00:00.123456Z"),
        (1184, "2026-01-01 05:30:00.25+05:30", "2026-01-01T00:00:00.250000Z"),  # a session not in UTC
        (1184, "infinity", "infinity"),
        (1114, "2026-01-01 00:00:00.1", "2026-01-01T00:00:00.100000"),
        (1700, "12.50", 12.5),
        (1700, "NaN", math.nan),
        (701, "-Infinity", -math.inf),
        (20, "-9007199254740993", -9007199254740993),
        (16, "f", False),
        (17, "\\x00ff", b"\x00\xff"),
        (25, "plain text", "plain text"),
    ],
)
def test_text_values_convert_like_debezium(type_oid: int, text: str, expected: Any) -> None:
    got = pg_text_to_python(type_oid, text)
    assert got == expected or (isinstance(got, float) and math.isnan(got) and math.isnan(expected))
    assert type(got) is type(expected)


def test_snapshot_then_inserts_updates_deletes(db: Db, bootstrap: str) -> None:
    db.sql(INSERT_PAYMENT, params=payment("p1"))
    db.sql(INSERT_PAYMENT, params=payment("p2", "3", device=None))
    db.sql(
        "INSERT INTO payment_labels VALUES ('p1', true, NULL, '2026-01-01T00:00:00Z', '2026-01-02 10:00:00+02')"
    )
    connector = db.connector(bootstrap)
    connector.setup()
    try:
        snapshot = consume(bootstrap, 3)
        assert {(r.topic, r.key) for r in snapshot} == {
            ("cdc.payments", "p1"),
            ("cdc.payments", "p2"),
            ("cdc.payment_labels", "p1"),
        }
        for r in snapshot:
            assert r.value is not None and r.value["op"] == "r" and r.value["before"] is None
            assert r.value["source"]["snapshot"] == "true"

        t0 = int(time.time() * 1000)
        db.sql(INSERT_PAYMENT, params=payment("p3", "99.99"))
        db.sql("UPDATE payments SET status = 'refunded', amount = 10 WHERE payment_id = 'p3'")
        db.sql("DELETE FROM payments WHERE payment_id = 'p2'")
        db.sql("INSERT INTO payment_labels VALUES ('p3', false, 'chargeback', now(), now())")
        assert drain(connector) == 4
    finally:
        connector.close()

    records = consume(bootstrap, 3 + 5)
    streamed = [r for r in records if r.value is None or r.value["op"] != "r"]
    by_key = {
        (r.topic, r.key): [x for x in streamed if (x.topic, x.key) == (r.topic, r.key)] for r in streamed
    }
    p3 = by_key[("cdc.payments", "p3")]
    assert [r.value["op"] for r in p3 if r.value] == ["c", "u"]
    assert len({r.partition for r in p3}) == 1 and p3[0].offset < p3[1].offset  # per-key order
    created, updated = (r.value for r in p3)
    assert created is not None and updated is not None
    assert created["before"] is None
    assert created["after"] == {
        "payment_id": "p3",
        "order_id": "o-p3",
        "customer_id": "cust-1",
        "card_id": "card-1",
        "merchant_id": "m-1",
        "merchant_category": "grocery",
        "amount": 99.99,
        "currency": "EUR",
        "status": "approved",
        "device_id": "dev-1",
        "created_at": "2026-01-01T00:00:00.123456Z",
    }
    assert updated["before"] == created["after"]
    assert updated["after"]["status"] == "refunded" and updated["after"]["amount"] == 10.0

    source = updated["source"]
    assert (source["version"], source["connector"], source["name"]) == ("weir-0.1", "postgresql", "weir")
    assert (source["db"], source["schema"], source["table"], source["snapshot"]) == (
        db.name,
        "public",
        "payments",
        "false",
    )
    assert isinstance(source["txId"], int) and source["txId"] > created["source"]["txId"]
    assert source["lsn"] > created["source"]["lsn"] > 0
    assert t0 - 1000 <= source["ts_ms"] <= updated["ts_ms"] <= int(time.time() * 1000) + 1000

    deleted, tombstone = by_key[("cdc.payments", "p2")]
    assert deleted.value is not None and deleted.value["op"] == "d" and deleted.value["after"] is None
    assert deleted.value["before"]["device_id"] is None and deleted.value["before"]["amount"] == 3.0
    assert (
        tombstone.value is None
        and tombstone.partition == deleted.partition
        and tombstone.offset > deleted.offset
    )

    (label,) = by_key[("cdc.payment_labels", "p3")]
    assert label.value is not None and label.value["after"]["is_fraud"] is False
    assert label.value["after"]["reason"] == "chargeback"
    snapshot_label = next(r.value for r in records if r.topic == "cdc.payment_labels" and r.key == "p1")
    assert snapshot_label is not None
    assert snapshot_label["after"] == {
        "payment_id": "p1",
        "is_fraud": True,
        "reason": None,
        "payment_created_at": "2026-01-01T00:00:00.000000Z",
        "labelled_at": "2026-01-02T08:00:00.000000Z",
    }
    labelled = datetime.fromisoformat(label.value["after"]["labelled_at"])
    assert labelled.tzinfo == UTC and abs(labelled.timestamp() * 1000 - t0) < 60_000

    for r in records:  # the bytes are what AvroCodec itself would write
        if r.raw is not None and r.value is not None:
            assert AvroCodec(r.topic).encode(r.value) == r.raw


def test_primary_key_change_is_delete_tombstone_create(db: Db, bootstrap: str) -> None:
    connector = db.connector(bootstrap)
    connector.setup()
    db.sql(INSERT_PAYMENT, params=payment("old"))
    db.sql("UPDATE payments SET payment_id = 'new' WHERE payment_id = 'old'")
    assert drain(connector) == 2
    connector.close()
    records = consume(bootstrap, 4)
    ops = [(r.key, r.value["op"] if r.value else None) for r in records]
    assert sorted(ops, key=str) == sorted([("old", "c"), ("old", "d"), ("old", None), ("new", "c")], key=str)


def test_table_without_primary_key_is_a_clear_error(db: Db, bootstrap: str) -> None:
    db.sql("ALTER TABLE payment_labels DROP CONSTRAINT payment_labels_pkey")
    with pytest.raises(CdcError, match="public.payment_labels has no primary key"):
        db.connector(bootstrap).setup()


def test_crash_between_publish_and_advance_resends(db: Db, bootstrap: str) -> None:
    first = db.connector(bootstrap)
    first.setup()
    db.sql(INSERT_PAYMENT, params=payment("a"))
    db.sql(INSERT_PAYMENT, params=payment("b"))
    batch = first._read_batch()
    first._publish(batch.records)  # published and acknowledged ... then the process dies
    first.close()

    second = db.connector(bootstrap)
    second.setup()  # the slot exists and its snapshot completed: no second snapshot
    lag_before = second.slot_lag_bytes()
    assert lag_before > 0
    assert drain(second) == 2
    assert second.slot_lag_bytes() < lag_before
    second.close()

    records = consume(bootstrap, 4)
    assert sorted(r.key for r in records) == ["a", "a", "b", "b"]  # at least once: here exactly twice
    for key in "ab":  # the re-sent copy carries the same source position, so consumers can dedupe
        copies = {
            (r.value["source"]["lsn"], r.value["source"]["txId"]) for r in records if r.key == key and r.value
        }
        assert len(copies) == 1


def test_wal_of_other_tables_does_not_pin_the_slot(db: Db, bootstrap: str) -> None:
    connector = db.connector(bootstrap)
    connector.setup()
    db.sql("CREATE TABLE other (x int)", "INSERT INTO other SELECT generate_series(1, 20000)")
    assert connector.slot_lag_bytes() > 100_000
    assert connector.poll_once() == 0
    assert connector.slot_lag_bytes() < 10_000
    connector.close()


def test_kill_9_loses_nothing(db: Db, bootstrap: str) -> None:
    script = textwrap.dedent(f"""
        import sys, threading
        sys.path.insert(0, {str(REPO)!r})
        from examples.fraud_shop.project import project
        from streams.cdc import CdcConnector
        from streams.project.contracts import use_project
        use_project(project)  # a fresh process: its catalog knows the shop's cdc.* schemas once told
        c = CdcConnector({db.dsn!r}, {bootstrap!r}, {TABLES!r}, slot="slot_{db.name}", partitions=2,
                         poll_interval_s=0.005, max_changes=7)
        c.setup()
        print("ready", flush=True)
        c.run(threading.Event())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        for i in range(60):
            db.sql(
                *(
                    f"INSERT INTO payments VALUES ('k{i}-{j}', 'o', 'c', 'card', 'm', 'cat', {j}, 'EUR', 'ok',"
                    f" NULL, now())"
                    for j in range(5)
                )
            )
            if i == 30:
                os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

    survivor = db.connector(bootstrap, max_changes=50)
    survivor.setup()
    drain(survivor)
    survivor.close()
    keys = {r.key for r in consume(bootstrap, 300)}
    assert keys >= {f"k{i}-{j}" for i in range(60) for j in range(5)}


def test_interrupted_snapshot_is_redone(db: Db, bootstrap: str) -> None:
    db.sql(INSERT_PAYMENT, params=payment("s1"))
    # what a connector killed mid-snapshot leaves behind: the slot, but no record of a finished snapshot
    db.sql(f"SELECT pg_create_logical_replication_slot('slot_{db.name}', 'pgoutput')")
    connector = db.connector(bootstrap)
    connector.setup()
    connector.close()
    (record,) = consume(bootstrap, 1)
    assert record.key == "s1" and record.value is not None and record.value["op"] == "r"


def test_dropped_connection_is_a_clear_error(db: Db, bootstrap: str) -> None:
    connector = db.connector(bootstrap)
    connector.setup()
    assert connector._conn is not None
    db.sql("SELECT pg_terminate_backend(%s)", params=(connector._conn.info.backend_pid,))
    with pytest.raises(CdcConnectionLost, match="lost the PostgreSQL connection"):
        connector.poll_once()
    connector.close()


def test_embedded_postgres_restarts_on_its_data_and_survives_a_stale_pid_file(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    with server, psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
    assert not (server.pgdata / "postmaster.pid").exists()
    # a killed server's pid file, naming a pid that now belongs to someone else
    (server.pgdata / "postmaster.pid").write_text(
        f"{os.getpid()}\n{server.pgdata}\n0\n5432\n\n127.0.0.1\n0 0\nready\n"
    )
    with server:
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
        pid = server._proc.pid if server._proc else 0
    assert pid and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- types, TOAST, dedup keys, metrics --------------------------------------------------------

TYPED_DDL = """
CREATE TABLE typed (
    id int PRIMARY KEY, b boolean, i2 smallint, i4 integer, i8 bigint, f4 real, f8 double precision,
    n_scaled numeric(12,2), n_free numeric, n_big numeric(60,20), n_nan numeric, n_inf numeric,
    tz timestamptz, ts timestamp, by bytea, t text, vc varchar(10), bp char(3), d date, u uuid, j jsonb)
"""
TYPED_COLUMNS = "b, i2, i4, i8, f4, f8, n_scaled, n_free, n_big, n_nan, n_inf, tz, ts, by, t, vc, bp, d, u, j"
TYPED_VALUES = (
    "true, -32768, 2147483647, -9007199254740993, 1.5, '-Infinity', 12.50, 0.000000000000000000001,"
    " 1234567890123456789012345678901234567890.12345678901234567890, 'NaN', 'Infinity',"
    " '2026-03-29 01:30:00.000001+02', '2026-01-01 00:00:00.1', '\\x00ff', 'plain', 'v', 'ab',"
    " '2026-01-01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": 1}'"
)
TYPED_EXPECTED: dict[str, Any] = {
    "b": True,
    "i2": -32768,
    "i4": 2147483647,
    "i8": -9007199254740993,
    "f4": 1.5,
    "f8": -math.inf,
    "n_scaled": 12.5,  # numeric with scale: a double, as decimal.handling.mode=double
    "n_free": 1e-21,  # numeric without scale or precision
    "n_big": 1.2345678901234568e39,  # 60 digits of precision, rounded to a double
    "n_nan": "NaN",  # (math.nan, compared through _comparable)
    "n_inf": math.inf,
    "tz": "2026-03-28T23:30:00.000001Z",  # ZonedTimestamp, in UTC
    "ts": "2026-01-01T00:00:00.100000",  # timestamp without time zone: no offset
    "by": b"\x00\xff",
    "t": "plain",
    "vc": "v",
    "bp": "ab ",  # char(3) keeps its padding, as Debezium does
    "d": "2026-01-01",
    "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "j": '{"a": 1}',
}
ALL_NULL = dict.fromkeys(TYPED_EXPECTED)


def _comparable(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """NaN never equals itself: spell it as a string to compare rows."""
    if row is None:
        return None
    return {k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def recording_encoder(sink: list[dict[str, Any]]) -> type[EnvelopeEncoder]:
    """An encoder that keeps the envelope's parts instead of Avro bytes (``typed`` has no schema)."""

    class Recording(EnvelopeEncoder):
        def __init__(self, tables: Any, db: str, clock: Callable[[], float]) -> None:
            self.db, self.clock = db, clock

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
            sink.append({"op": op, "before": before, "after": after, "lsn": lsn, "txId": tx_id})
            return b"{}"

    return Recording


def test_every_type_and_null_converts_alike_in_snapshot_and_stream(
    db: Db, bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    envelopes: list[dict[str, Any]] = []
    monkeypatch.setattr(streams.cdc, "EnvelopeEncoder", recording_encoder(envelopes))
    db.sql(TYPED_DDL, f"INSERT INTO typed (id, {TYPED_COLUMNS}) VALUES (1, {TYPED_VALUES})")
    connector = CdcConnector(db.dsn, bootstrap, ["typed"], slot=f"slot_{db.name}", partitions=2)
    connector.setup()
    try:
        db.sql(
            "SET TimeZone = 'Asia/Kolkata'",  # the writer's session zone must not matter
            f"INSERT INTO typed (id, {TYPED_COLUMNS}) VALUES (2, {TYPED_VALUES})",
            "INSERT INTO typed (id) VALUES (3)",
            "UPDATE typed SET " + ", ".join(f"{c} = NULL" for c in TYPED_EXPECTED) + " WHERE id = 2",
            f"UPDATE typed SET ({TYPED_COLUMNS}) = ({TYPED_VALUES}) WHERE id = 3",
            "DELETE FROM typed WHERE id = 1",
        )
        assert drain(connector) == 5
    finally:
        connector.close()

    full, nulls = {"id": 1, **TYPED_EXPECTED}, {"id": 3, **ALL_NULL}
    got = [(e["op"], _comparable(e["before"]), _comparable(e["after"])) for e in envelopes]
    assert got == [
        ("r", None, full),
        ("c", None, {**full, "id": 2}),
        ("c", None, nulls),
        ("u", {**full, "id": 2}, {**nulls, "id": 2}),
        ("u", nulls, {**full, "id": 3}),
        ("d", full, None),
    ]
    assert all(isinstance(e["lsn"], int) and isinstance(e["txId"], int) for e in envelopes)


def _random_text(n: int) -> str:
    """Text pglz cannot shrink by 25%, so PostgreSQL stores it out of line, uncompressed."""
    return "".join(random.Random(n).choices(string.ascii_letters + string.digits, k=n))


def _label_updates(records: list[Record]) -> list[dict[str, Any]]:
    labels = sorted((r for r in records if r.topic == "cdc.payment_labels"), key=lambda r: r.offset)
    return [r.value for r in labels if r.value is not None and r.value["op"] == "u"]


def _insert_toasted_label(db: Db, reason: str) -> None:
    db.sql("INSERT INTO payment_labels VALUES ('p1', false, %s, now(), now())", params=(reason,))
    with psycopg.connect(db.dsn) as conn:
        toast = conn.execute(
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'payment_labels'"
        ).fetchone()
    assert toast is not None and toast[0] > 0, "the reason column was not TOASTed out of line"


def test_unchanged_toasted_column_is_taken_from_the_old_row(db: Db, bootstrap: str) -> None:
    reason = _random_text(10_000)
    connector = db.connector(bootstrap)
    connector.setup()  # sets REPLICA IDENTITY FULL
    _insert_toasted_label(db, reason)
    db.sql("UPDATE payment_labels SET is_fraud = true WHERE payment_id = 'p1'")  # reason untouched
    assert drain(connector) == 2
    connector.close()

    (update,) = _label_updates(consume(bootstrap, 2))
    assert update["after"]["reason"] == reason and update["after"]["is_fraud"] is True
    assert update["before"]["reason"] == reason and update["before"]["is_fraud"] is False


def test_unchanged_toasted_column_without_the_old_row_is_debeziums_placeholder(
    db: Db, bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    reason = _random_text(10_000)
    connector = db.connector(bootstrap)
    connector.setup()
    _insert_toasted_label(db, reason)
    db.sql("ALTER TABLE payment_labels REPLICA IDENTITY DEFAULT")  # behind the connector's back
    db.sql("UPDATE payment_labels SET is_fraud = true WHERE payment_id = 'p1'")
    with caplog.at_level(logging.WARNING, logger="streams.cdc"):
        assert drain(connector) == 2
    connector.close()
    assert any("payment_labels" in m and UNAVAILABLE_VALUE in m for m in caplog.messages)
    assert reason not in caplog.text

    restarted = db.connector(bootstrap)
    restarted.setup()  # sets REPLICA IDENTITY FULL again
    db.sql("UPDATE payment_labels SET is_fraud = false WHERE payment_id = 'p1'")
    assert drain(restarted) == 1
    restarted.close()

    placeholder, whole = _label_updates(consume(bootstrap, 3))
    assert placeholder["after"]["reason"] == UNAVAILABLE_VALUE and placeholder["after"]["is_fraud"] is True
    assert placeholder["before"] is None  # only the key was logged: Debezium's `before` is empty too
    assert whole["after"]["reason"] == reason and whole["before"]["reason"] == reason


def test_resent_transaction_repeats_every_dedup_key(db: Db, bootstrap: str) -> None:
    db.sql(INSERT_PAYMENT, params=payment("s"))
    first = db.connector(bootstrap)
    first.setup()
    with psycopg.connect(db.dsn) as conn:  # one transaction, four changes
        conn.execute(INSERT_PAYMENT, payment("a"))
        conn.execute("UPDATE payments SET status = 'refunded' WHERE payment_id = 'a'")
        conn.execute("DELETE FROM payments WHERE payment_id = 's'")
        conn.execute(INSERT_PAYMENT, payment("b"))
    batch = first._read_batch()
    first._publish(batch.records)  # acknowledged ... and the process dies before advancing
    first.close()
    second = db.connector(bootstrap)
    second.setup()
    assert drain(second) == 4
    second.close()

    records = consume(bootstrap, 1 + 2 * 5)  # snapshot row; twice c, u, d, tombstone, c
    keys = Counter(
        (r.topic, r.key, r.value["op"], r.value["source"]["lsn"], r.value["source"]["txId"])
        for r in records
        if r.value is not None
    )
    (snapshot_key,) = [k for k in keys if k[2] == "r"]
    assert keys.pop(snapshot_key) == 1
    assert isinstance(snapshot_key[3], int) and isinstance(snapshot_key[4], int)  # dedup fields set
    assert sorted((k[1], k[2]) for k in keys) == [("a", "c"), ("a", "u"), ("b", "c"), ("s", "d")]
    assert set(keys.values()) == {2}  # each change twice, with an identical (topic, key, op, lsn, txId)
    assert len({k[4] for k in keys}) == 1 and len({k[3] for k in keys}) == 4  # one tx, one LSN per change
    assert sorted(r.key for r in records if r.value is None) == ["s", "s"]


def test_stats_count_changes_and_sample_slot_lag(db: Db, bootstrap: str) -> None:
    now = [1000.0]
    db.sql(INSERT_PAYMENT, params=payment("s1"))
    connector = db.connector(bootstrap, max_changes=3, clock=lambda: now[0])
    connector.setup()
    assert (connector.stats.snapshot_rows, connector.stats.records_published) == (1, 1)
    for i in range(5):
        db.sql(INSERT_PAYMENT, params=payment(f"p{i}"))

    now[0] = 1001.0
    published = connector.poll_once()  # a few rows per poll: most of the changes stay in the slot
    assert 0 < published < 5 and connector.stats.changes_published == published
    assert connector.stats.slot_lag_bytes is not None and connector.stats.slot_lag_bytes > 0
    assert connector.stats.lag_sampled_at == 1001.0
    assert connector.slot_lag_bytes() > 0

    drain(connector)
    with psycopg.connect(db.dsn) as conn:
        confirmed = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (connector.slot,),
        ).fetchone()
    connector.close()
    stats = connector.stats.as_dict()
    counts = (stats["changes_published"], stats["transactions_published"], stats["records_published"])
    assert counts == (5, 5, 6)
    lag = stats["slot_lag_bytes"]
    assert lag is not None and lag < 4096  # back to ~0: at most the WAL of unrelated server work
    assert confirmed is not None and stats["last_advanced_lsn"] == lsn_to_int(confirmed[0])
