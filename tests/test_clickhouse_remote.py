"""Reading the embedded ClickHouse through the process that owns it (``streams/clickhouse_hub.py``).

In this process: a :class:`HealthServer` with the hub's query handler over the session's chdb and a
:class:`RemoteClickHouse` on it, compared with direct reads. Across processes: ``tests/hub_process.py``
holds a data directory's lock and its chdb and serves the endpoint, as ``weir up`` does, while the real
``weir features training-set`` runs beside it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from examples.fraud_shop.project import fraud
from sinks.clickhouse import ClickHouse
from streams.clickhouse_hub import (
    ClickHouseUnavailable,
    HubQueries,
    RemoteClickHouse,
    RemoteQueryError,
    WriteRefused,
    chdb_owner,
    connect,
    to_wire,
)
from streams.features import offline
from streams.health import QUERY_PATH, HealthServer, QueryError
from streams.project.contracts import tables
from streams.stack import DataDirLock
from tests.conftest import FREE_PORTS, SHOP
from tests.hub_process import fill

ROOT = Path(__file__).resolve().parent.parent
WEIR = Path(sys.executable).parent / "weir"

TYPES = """
    id UInt32, s String, fs FixedString(3), lc LowCardinality(String), e Enum8('a' = 1, 'b' = 2),
    i8 Int8, u64 UInt64, i128 Int128, f32 Float32, f64 Float64, b Bool, n Nullable(Int32), ns Nullable(String),
    d Date, d32 Date32, dt DateTime, dt_utc DateTime('UTC'), dt64 DateTime64(3, 'UTC'),
    dt64_tokyo DateTime64(6, 'Asia/Tokyo'), dec Decimal(18, 4), dec_big Decimal(38, 10), u UUID,
    ip4 IPv4, ip6 IPv6, arr Array(Float64), arr_n Array(Nullable(String)), nested Array(Array(Int32)),
    tup Tuple(Int32, String), named Tuple(a Float64, b Array(String)), m Map(String, Float64),
    m_int Map(UInt16, Array(String)), arr_tup Array(Tuple(String, DateTime64(3, 'UTC')))"""

VALUES = """
    (1, 'plain', 'abc', 'lc', 'b', -128, 18446744073709551615, -170141183460469231731687303715884105728,
     1.1, 0.1, true, NULL, NULL, '2026-01-02', '1950-06-30', '2026-01-03 04:05:06', '2026-01-03 04:05:06',
     '2026-01-01 00:00:01.234', '2026-03-29 01:30:00.123456', 12.3456, -1234567890.0123456789,
     '00000000-0000-0000-0000-000000000001', '1.2.3.4', '2001:db8::1', [1.5, -0.0, inf, -inf],
     ['x', NULL], [[1], [], [2, 3]], (7, 'seven'), (2.5, ['p', 'q']), {'auc': 0.93, 'mae': 4.2},
     {1: ['one'], 2: []}, [('a', '2026-01-01 00:00:00.001')]),
    (2, 'ünïcødé "quoted" \\n line', 'x\\0\\0', '', 'a', 0, 0, 0, nan, nan, false, 42, '', '1970-01-01',
     '1970-01-01', '1970-01-01 00:00:00', '2106-02-07 06:28:15', '1900-01-01 00:00:00', '2299-12-31 23:59:59',
     0, 0, '6ba7b810-9dad-11d1-80b4-00c04fd430c8', '0.0.0.0', '::', [], [], [], (0, ''), (0, []), {}, {}, [])"""


@pytest.fixture
def database(clickhouse_client: Any) -> str:
    """The test's own database in the session's chdb, with the fraud shop's tables."""
    return str(clickhouse_client.database)


@pytest.fixture
def direct(database: str, chdb_path: Path) -> ClickHouse:
    ch = ClickHouse(f"chdb://{chdb_path}", database=database)
    ch.ensure_schema(tables(SHOP))
    return ch


@pytest.fixture
def hub(chdb_path: Path) -> Iterator[HealthServer]:
    """A health server serving the hub's queries over the session's chdb (this process owns it)."""
    server = HealthServer(lambda: {"ok": True}, query=HubQueries(f"chdb://{chdb_path}")).start()
    yield server
    server.stop()


@pytest.fixture
def remote(hub: HealthServer, database: str) -> RemoteClickHouse:
    return RemoteClickHouse(hub.url.replace("/healthz", QUERY_PATH), database, owner="the test's hub")


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type all the way down (NaN equals NaN, a datetime's zone counts)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, datetime):
        return bool(a == b and a.tzinfo == b.tzinfo and a.fold == b.fold)
    return bool(a == b)


def test_rows_round_trip_with_their_types(direct: ClickHouse, remote: RemoteClickHouse) -> None:
    direct.command(f"CREATE TABLE every_type ({TYPES}) ENGINE = MergeTree ORDER BY id")
    direct.command(f"INSERT INTO every_type VALUES {VALUES}")

    want = direct.rows("SELECT * FROM every_type ORDER BY id")
    got = remote.rows("SELECT * FROM every_type ORDER BY id")

    assert len(got) == 2 and all(type(r) is tuple for r in got)
    for w, g in zip(want, got, strict=True):
        for i, (x, y) in enumerate(zip(w, g, strict=True)):
            assert same(x, y), (i, x, y)
    flat = "SELECT * EXCEPT (tup, named, m, m_int, arr_tup) FROM every_type ORDER BY id"  # no tuple, no map
    assert same(remote.rows(flat), direct.rows(flat))
    answer = remote.query("SELECT * FROM every_type ORDER BY id")
    result = direct.client.query("SELECT * FROM every_type ORDER BY id")
    assert answer.column_names == tuple(result.column_names)
    assert answer.column_types == tuple(t.name for t in result.column_types)
    # the values the callers care about, as Python has them
    first = dict(zip(answer.column_names, got[0], strict=True))
    assert first["dec"] == Decimal("12.3456") and first["u"] == UUID(int=1) and first["tup"] == (7, "seven")
    assert first["m"] == {"auc": 0.93, "mae": 4.2} and first["m_int"] == {1: ["one"], 2: []}
    assert first["dt64_tokyo"].tzinfo is not None and first["dt64_tokyo"].utcoffset().total_seconds() == 9 * 3600


def test_parameters_and_an_empty_answer(direct: ClickHouse, remote: RemoteClickHouse) -> None:
    sql = ("SELECT {when:DateTime64(3, 'UTC')} AS t, {name:String} AS s, {n:Int64} + 1 AS n, {xs:Array(Float64)} "
           "AS xs, {pair:Tuple(Int32, String)} AS pair, {d:Decimal(9, 2)} AS d")
    params = {"when": datetime(2026, 1, 1, 1, 2, 3, 456000, tzinfo=UTC), "name": "it's", "n": 2**62,
              "xs": [0.5, 1e-300], "pair": (1, "a"), "d": Decimal("1.25")}
    assert same(remote.rows(sql, params), direct.rows(sql, params))
    assert remote.rows("SELECT * FROM feature_log WHERE view = {v:String}", {"v": "none"}) == []
    assert remote.scalar("SELECT count() FROM feature_log") == 0
    assert remote.scalar("SELECT 1 WHERE 0") is None


def test_a_training_set_through_the_hub_is_the_direct_one(direct: ClickHouse, remote: RemoteClickHouse) -> None:
    fill(direct, 3000)
    want = offline.training_set(direct, SHOP, fraud)
    got = offline.training_set(remote, SHOP, fraud)
    assert got.rows == want.rows == 3000 and got.sha256 == want.sha256
    np.testing.assert_array_equal(got.X, want.X)
    np.testing.assert_array_equal(got.defaulted, want.defaulted)
    assert offline.mature_labels(remote, SHOP, fraud, 600_000) == offline.mature_labels(direct, SHOP, fraud, 600_000)
    assert want.ts_max_ms is not None
    newest = offline.training_set(remote, SHOP, fraud, since_ms=want.ts_max_ms - 10_000, limit=3)
    assert list(newest.event_ids) == list(want.event_ids[-3:])


@pytest.mark.parametrize("sql", [
    "INSERT INTO feature_log (view) VALUES ('x')",
    "DROP TABLE feature_log",
    "  /* a comment */ TRUNCATE TABLE feature_log",
    "ALTER TABLE feature_log DELETE WHERE 1",
    "CREATE TABLE t2 (a Int8) ENGINE = Memory",
    "OPTIMIZE TABLE feature_log FINAL",
    "KILL QUERY WHERE 1",
    "SYSTEM FLUSH LOGS",
    "SET readonly = 0",
    "SELECT * FROM feature_log INTO OUTFILE '{out}'",  # chdb writes the file even in read-only mode
    "(SELECT 1) INTO/* */OutFile '{out}' TRUNCATE",
    "SELECT $$it's$$ INTO OUTFILE '{out}'",  # quoting a lexer of our own would not know
    "SELECT 1 # it's\n INTO OUTFILE '{out}'",
    "EXPLAIN SYNTAX SELECT 1 INTO OUTFILE '{out}'",
    "SHOW TABLES INTO OUTFILE '{out}'",
    "DESCRIBE file('/etc/hostname', 'CSVWithNames')",  # readonly=1 lets this read a file's first line
    "DESC url('http://127.0.0.1:1/', 'CSVWithNames')",  # ... and connect out
    "EXPLAIN SELECT * FROM file('/etc/hostname', 'LineAsString')",
])
def test_the_hub_serves_reads_only(direct: ClickHouse, remote: RemoteClickHouse, sql: str, tmp_path: Path) -> None:
    fill(direct, 3)
    with pytest.raises(RemoteQueryError, match="only reads are served here.*stop `weir up`.*WEIR_CLICKHOUSE_URL"):
        remote.rows(sql.format(out=tmp_path / "out.tsv"))
    assert direct.scalar("SELECT count() FROM feature_log") == 6
    assert not (tmp_path / "out.tsv").exists()


@pytest.mark.parametrize("sql", [
    "SELECT 1 SETTINGS readonly = 0",  # a read that would lift the read-only mode for itself
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",  # the hub's files
    "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
    "WITH 1 AS x SELECT x; DROP TABLE feature_log",
    "SELECT * FROM feature_log; INSERT INTO feature_log (view) VALUES ('x')",
])
def test_clickhouse_itself_refuses_what_is_not_a_read(direct: ClickHouse, remote: RemoteClickHouse,
                                                       sql: str) -> None:
    with pytest.raises(RemoteQueryError, match=r"READONLY|SYNTAX_ERROR|Multi-statements"):
        remote.rows(sql)
    assert direct.scalar("EXISTS TABLE feature_log") == 1


def test_queries_are_served_to_a_loopback_host_only(direct: ClickHouse, remote: RemoteClickHouse) -> None:
    """A browser page whose name was rebound to 127.0.0.1 sends its own name as Host: refused."""
    import json
    import urllib.error
    import urllib.request

    url = remote.url
    body = json.dumps({"sql": "SELECT 1", "parameters": {}, "database": None}).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"Host": "evil.example:18088"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


def test_the_hub_handle_is_read_only_whatever_the_statement(direct: ClickHouse, chdb_path: Path,
                                                            database: str) -> None:
    queries = HubQueries(f"chdb://{chdb_path}")
    try:
        handle = queries._open()  # what the keyword check stands in front of
        handle.database = database
        for sql in ("INSERT INTO feature_log (view) VALUES ('x')", "DROP TABLE feature_log",
                    "CREATE TABLE t3 (a Int8) ENGINE = Memory", "SET readonly = 0"):
            with pytest.raises(DatabaseError, match="READONLY|readonly"):
                handle.command(sql)
        assert handle.query("SELECT count() FROM feature_log").result_rows == [(0,)]
    finally:
        queries.close()
    assert direct.scalar("EXISTS TABLE feature_log") == 1 and direct.scalar("EXISTS TABLE t3") == 0


def test_closing_the_hub_does_not_wait_for_a_query_in_flight(chdb_path: Path) -> None:
    queries = HubQueries(f"chdb://{chdb_path}")
    answer = queries({"sql": "SELECT number FROM system.numbers LIMIT 1000000"})
    assert json.loads(next(answer))["types"] == ["UInt64"]
    assert next(answer).startswith(b"[[0],[1],")  # a block of rows
    started = time.monotonic()
    queries.close()  # the stream holds the handle: closed when it ends
    assert time.monotonic() - started < 1.0
    assert json.loads(next(answer))["error"].startswith("the hub is stopping")
    assert next(answer, None) is None and queries._client is None
    with pytest.raises(QueryError, match="stopping"):
        next(queries({"sql": "SELECT 1"}))


def test_writes_through_the_client_are_refused_in_one_line(remote: RemoteClickHouse) -> None:
    remote.dsn = "chdb:///somewhere/clickhouse"
    writes: list[Callable[[], Any]] = [lambda: remote.command("DROP TABLE x"), lambda: remote.client,
                                       lambda: remote.insert("t", [[1]], ["a"]), remote.ensure_schema]
    for write in writes:
        with pytest.raises(WriteRefused, match=r"belongs to the test's hub, which serves reads only: stop `weir "
                                               r"up` to write to it, or set WEIR_CLICKHOUSE_URL"):
            write()


def test_query_errors_keep_clickhouse_s_message_and_code(direct: ClickHouse, remote: RemoteClickHouse) -> None:
    with pytest.raises(RemoteQueryError, match="UNKNOWN_TABLE") as caught:
        remote.rows("SELECT * FROM no_such_table")
    assert caught.value.code == 60
    # an error after rows were streamed: the answer's last line says so
    with pytest.raises(RemoteQueryError, match="boom"):
        remote.rows("SELECT throwIf(number > 200000, 'boom') FROM system.numbers LIMIT 300000")
    assert remote.scalar("SELECT 7") == 7  # the hub serves the next one


def test_a_hub_that_does_not_answer_is_one_line(direct: ClickHouse, database: str) -> None:
    server = HealthServer(lambda: {"ok": True}).start()  # no query handler: 404
    url = server.url.replace("/healthz", QUERY_PATH)
    with pytest.raises(ClickHouseUnavailable, match=r"does not serve queries at .*HTTP 404"):
        RemoteClickHouse(url, database).rows("SELECT 1")
    server.stop()
    with pytest.raises(ClickHouseUnavailable, match=r"^the hub owns the embedded ClickHouse and does not answer at "
                                                    r"http://127\.0\.0\.1:\d+/clickhouse/query \(.*\): wait until"):
        RemoteClickHouse(url, database).rows("SELECT 1")


def test_values_json_has_no_type_for_are_tagged() -> None:
    assert to_wire({"k": (1, [b"\x00"])}) == {"$map": [["k", {"$tuple": [1, [{"$bytes": "AA=="}]]}]]}
    with pytest.raises(TypeError, match="a object value cannot be sent"):
        to_wire(object())


def test_who_owns_the_engine(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'clickhouse'}"
    assert DataDirLock(tmp_path).holder() is None and chdb_owner(dsn, tmp_path) is None
    mine = DataDirLock(tmp_path)
    mine.acquire()
    try:
        assert DataDirLock(tmp_path).holder() == os.getpid()
        assert chdb_owner(dsn, tmp_path) is None  # this process holds it, so this process has the engine
    finally:
        mine.release()
    assert chdb_owner("http://ch:8123", tmp_path) is None

    # another process holds the directory and has not written endpoints.json yet (a `weir up` starting)
    hold = ("import sys; from pathlib import Path; from streams.stack import DataDirLock; "
            "DataDirLock(Path(sys.argv[1])).acquire(); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert DataDirLock(tmp_path).holder() == holder.pid
        with pytest.raises(ClickHouseUnavailable, match=rf"belongs to the Weir process holding {tmp_path} \(pid "
                                                        rf"{holder.pid}\), which serves no queries"):
            connect(dsn, "db", data_dir=tmp_path)
        # its endpoints.json names another ClickHouse: it does not own this one
        (tmp_path / "endpoints.json").write_text(json.dumps({"clickhouse_dsn": "chdb:///elsewhere/clickhouse"}))
        assert chdb_owner(dsn, tmp_path) is None
        (tmp_path / "endpoints.json").write_text(json.dumps({"clickhouse_dsn": dsn,
                                                             "health_url": "http://127.0.0.1:9/healthz"}))
        owner = chdb_owner(dsn, tmp_path)
        assert owner is not None and owner.pid == holder.pid and owner.query_url == "http://127.0.0.1:9" + QUERY_PATH
        assert isinstance(connect(dsn, "db", data_dir=tmp_path), RemoteClickHouse)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)


def _weir_env(data_dir: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")} | FREE_PORTS | {
        "WEIR_DATA_DIR": str(data_dir), "WEIR_PROJECT": "examples.fraud_shop.project:project"}


def _training_set(data_dir: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run([str(WEIR), "features", "training-set", "--out", str(out)], check=False, cwd=ROOT,
                          env=_weir_env(data_dir), capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - started


def test_the_cli_reads_through_the_process_that_owns_the_engine(tmp_path: Path) -> None:
    data_dir = tmp_path / "weir"
    data_dir.mkdir()
    hub = subprocess.Popen([sys.executable, "-m", "tests.hub_process", str(data_dir), "4000"], cwd=ROOT,
                           env=_weir_env(data_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert hub.stdin is not None and hub.stdout is not None
        ready = json.loads(hub.stdout.readline())
        assert ready["rows"] == 4000

        done, through_hub_s = _training_set(data_dir, tmp_path / "hub.csv")
        assert done.returncode == 0, done.stderr
        assert f"sha256: {ready['sha256']}" in done.stdout and "rows: 4000" in done.stdout

        hub.stdin.write("stop-serving\n")
        hub.stdin.flush()
        assert json.loads(hub.stdout.readline()) == {"stopped": True}
        done, _ = _training_set(data_dir, tmp_path / "none.csv")
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"weir features training-set: error: the Weir process holding {data_dir} (pid "
                                      f"{hub.pid}) owns the embedded ClickHouse and does not answer at "), done.stderr
    finally:
        if hub.stdin is not None:
            hub.stdin.close()
        hub.wait(60)

    done, direct_s = _training_set(data_dir, tmp_path / "direct.csv")  # nobody holds it: opened directly
    assert done.returncode == 0, done.stderr
    assert f"sha256: {ready['sha256']}" in done.stdout
    assert (tmp_path / "hub.csv").read_bytes() == (tmp_path / "direct.csv").read_bytes()
    print(f"weir features training-set, 4000 rows: {through_hub_s:.2f} s through the hub, {direct_s:.2f} s direct")
