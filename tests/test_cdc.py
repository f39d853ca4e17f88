"""CDC from the embedded PostgreSQL to the embedded broker: envelopes, types, and no loss across crashes.

Real services throughout: one PostgreSQL for the module (a fresh database and
slot per test) and one Tansu broker per test (it starts in well under a second
and keeps every test's topics apart).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from streams.cdc import CdcConnectionLost, CdcConnector, CdcError, pg_text_to_python
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
        from streams.cdc import CdcConnector
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
