"""Reading the embedded ClickHouse while ``weir up`` runs: through the process that owns it.

chdb, the embedded engine (``chdb://<data dir>/clickhouse``), admits one process: ``weir up`` (the hub)
opens it, so a CLI command that opened it too would fail. Instead:

* **The hub** serves ``POST /clickhouse/query`` beside ``/healthz`` (:class:`streams.health.HealthServer`,
  to this machine only) with a :class:`HubQueries`: each query runs on a chdb handle of its own, with
  ClickHouse's ``readonly=1`` set on it, so ClickHouse itself refuses anything but a read (an ``INSERT``,
  ``DROP``, ``ALTER``, a ``SETTINGS readonly=0``, the ``file()``/``url()`` table functions); only
  statements that start with a reading keyword are even tried, and none with ``INTO OUTFILE`` (chdb
  writes that file even in read-only mode), both checked on the statement as ClickHouse's parser reads it
  (``formatQuery``). The sinks keep writing meanwhile on their
  own handle. Queries run one at a time.
* **A command** calls :func:`connect`: for a ``chdb://`` DSN whose data directory's lock
  (``<data dir>/weir.lock``, see :class:`streams.stack.DataDirLock`) another process holds, it gets a
  :class:`RemoteClickHouse` on that process's endpoint (``health_url`` in ``<data dir>/endpoints.json``,
  path :data:`~streams.health.QUERY_PATH`); otherwise the engine, opened as before
  (:class:`sinks.clickhouse.ClickHouse`). A hub that does not answer, or a process that holds the data
  directory and serves no queries (``weir demo``), is one line (:class:`ClickHouseUnavailable`); so is a
  write through the hub (:class:`WriteRefused`).

The wire: the request is JSON ``{"sql", "parameters", "database"}``; the answer is JSON lines (streamed
as ClickHouse produces blocks): ``{"columns": [...], "types": [...]}``, one JSON array of rows per block, then
``{"rows": n}``, or ``{"error": ..., "code": ...}`` when the query fails midway. A value JSON has no type
for travels as a tagged object (:func:`to_wire`): a datetime as its ISO text (its zone's name too), a
Decimal, UUID, IP address, date or time as text, bytes as base64, a tuple and a map as lists; a float's
``repr`` is exact, NaN and infinities included. So a row read through the hub equals the row a direct
read gives, types included (``tests/test_clickhouse_remote.py``).
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

from clickhouse_connect.driver.exceptions import DatabaseError, ProgrammingError

from sinks.clickhouse import ClickHouse
from streams.health import QUERY_PATH, QueryError
from streams.stack import DataDirLock

CHDB = "chdb://"
READS = ("SELECT", "WITH", "SHOW", "EXISTS")
"""Statements served. Not DESCRIBE or EXPLAIN: ``DESCRIBE file(...)``/``url(...)``/``remote(...)`` read a local
file's first line or connect out even with ``readonly=1`` (tried); SELECT through those functions is refused."""
LIMITS = {"max_execution_time": 300, "max_memory_usage": 4 << 30, "readonly": 1}  # readonly last: set in order
"""The query handle's settings: read-only, and bounded (chdb runs inside the hub: a runaway query must not
take it down)."""
_LEADING = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*", re.DOTALL)  # whitespace, comments, opening parentheses
_WORD = re.compile(r"[A-Za-z]+")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|`(?:[^`\\]|\\.)*`|\"(?:[^\"\\]|\\.)*\"")  # ClickHouse's own quoting
_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)


class ClickHouseUnavailable(RuntimeError):
    """The embedded ClickHouse cannot be read from this process; the message (one line) says why and what
    to do."""


class WriteRefused(ClickHouseUnavailable):
    """A write to an embedded ClickHouse another process owns."""


class RemoteQueryError(DatabaseError):
    """ClickHouse, in the process that owns it, refused or failed the query (``code`` is ClickHouse's)."""


# ---------------------------------------------------------------------------------------------
# values on the wire


def to_wire(value: Any) -> Any:
    """``value`` (as clickhouse-connect returns it) as JSON can carry it: see the module docstring.

    >>> to_wire([1, (2.5, "x"), {"k": None}])
    [1, {'$tuple': [2.5, 'x']}, {'$map': [['k', None]]}]
    """
    kind = type(value)
    if value is None or kind is str or kind is int or kind is float or kind is bool:
        return value
    if kind is list:
        return [to_wire(v) for v in value]
    if kind is tuple:
        return {"$tuple": [to_wire(v) for v in value]}
    if kind is dict:
        return {"$map": [[to_wire(k), to_wire(v)] for k, v in value.items()]}
    if isinstance(value, datetime):
        if isinstance(value.tzinfo, ZoneInfo):  # the zone itself, not only the offset
            return {"$datetime": value.replace(tzinfo=None).isoformat(), "tz": value.tzinfo.key, "fold": value.fold}
        return {"$datetime": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, time):
        return {"$time": value.isoformat()}
    if isinstance(value, timedelta):
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, UUID):
        return {"$uuid": str(value)}
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return {"$ip": str(value)}
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, str):  # a subclass (an enum member): its plain value
        return "" + value
    if isinstance(value, int | float):
        return (int if isinstance(value, int) else float)(value)
    raise TypeError(f"a {kind.__name__} value cannot be sent from the hub")


def _datetime(obj: dict[str, Any]) -> datetime:
    dt = datetime.fromisoformat(obj["$datetime"])
    return dt.replace(tzinfo=ZoneInfo(obj["tz"]), fold=obj.get("fold", 0)) if "tz" in obj else dt


_REVIVE: dict[str, Callable[[dict[str, Any]], Any]] = {
    "$tuple": lambda o: tuple(o["$tuple"]),
    "$map": lambda o: {k: v for k, v in o["$map"]},
    "$datetime": _datetime,
    "$date": lambda o: date.fromisoformat(o["$date"]),
    "$time": lambda o: time.fromisoformat(o["$time"]),
    "$timedelta": lambda o: timedelta(*o["$timedelta"]),
    "$decimal": lambda o: Decimal(o["$decimal"]),
    "$uuid": lambda o: UUID(o["$uuid"]),
    "$ip": lambda o: ipaddress.ip_address(o["$ip"]),
    "$bytes": lambda o: base64.b64decode(o["$bytes"]),
}


def revive(obj: dict[str, Any]) -> Any:
    """A ``json.loads`` object hook: the value a tagged object stands for (other objects as they are)."""
    for key in obj:
        fn = _REVIVE.get(key)
        return obj if fn is None else fn(obj)
    return obj


def from_wire(value: Any) -> Any:
    """:func:`to_wire` undone on JSON already parsed (the parameters of a request).

    >>> from_wire({"$tuple": [1, {"$decimal": "0.10"}]})
    (1, Decimal('0.10'))
    """
    if isinstance(value, list):
        return [from_wire(v) for v in value]
    if isinstance(value, dict):
        return revive({k: from_wire(v) for k, v in value.items()})
    return value


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=to_wire).encode() + b"\n"


# the types whose values hold tuples or maps (JSON would turn them into lists and objects silently): their
# rows are converted value by value; any other row goes to JSON as it is (``to_wire`` tags its scalars)
_NESTING = re.compile(r"Tuple|Map|Nested|JSON|Object|Variant|Dynamic|Point|Ring|Polygon|LineString|Geometry|"
                      r"AggregateFunction")


# ---------------------------------------------------------------------------------------------
# the hub's side


def first_keyword(sql: str) -> str:
    """The statement's first word, past whitespace, comments and opening parentheses, upper case.

    >>> first_keyword("  -- the newest\\n(/* x */ select 1)"), first_keyword("INSERT INTO t VALUES (1)")
    ('SELECT', 'INSERT')
    """
    lead = _LEADING.match(sql)
    m = _WORD.match(sql, lead.end() if lead else 0)
    return m.group().upper() if m else ""


def writes_a_file(formatted: str) -> bool:
    """Whether a statement as ClickHouse formats it (``formatQuery``: no comments, every literal in single
    quotes) has ``INTO OUTFILE``, outside its literals: the embedded engine writes that file, ``readonly``
    or not.

    >>> writes_a_file("SELECT 1\\nINTO OUTFILE '/tmp/x'"), writes_a_file("SELECT 'it\\\\'s INTO OUTFILE x' AS `into outfile`")
    (True, False)
    """
    return _OUTFILE.search(_QUOTED.sub(" ", formatted)) is not None


def _request(request: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    sql, parameters, database = request.get("sql"), request.get("parameters"), request.get("database")
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("no sql")
    if parameters is not None and not isinstance(parameters, dict):
        raise QueryError("parameters is not an object")
    if database is not None and not isinstance(database, str):
        raise QueryError("database is not a string")
    _check_read(sql)
    return sql, {str(k): from_wire(v) for k, v in parameters.items()} if parameters else None, database


def _check_read(sql: str) -> None:
    if first_keyword(sql) not in READS or writes_a_file(sql):
        raise QueryError(f"only reads are served here ({', '.join(READS)}; no INTO OUTFILE): this process owns the "
                         "embedded ClickHouse; stop `weir up` to write to it, or set WEIR_CLICKHOUSE_URL to a "
                         "ClickHouse server")


def _message(exc: BaseException) -> str:
    """``exc`` 's message on one line (at most 600 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 600 else text[:597] + "..."


class HubQueries:
    """The hub's ``POST /clickhouse/query`` handler (a :class:`streams.health.QueryHandler`) over the
    embedded ClickHouse at ``dsn``: read-only (see the module docstring), one query at a time, on a chdb
    handle opened on the first query and closed by :meth:`close`."""

    def __init__(self, dsn: str) -> None:
        if not dsn.startswith(CHDB):
            raise ValueError(f"{dsn} is not an embedded ClickHouse (chdb://)")
        self.dsn = dsn
        self._client: Any = None
        self._lock = threading.Lock()
        self._closed = False

    def _open(self) -> Any:
        if self._closed:
            raise QueryError("the hub is stopping")
        if self._client is None:
            import clickhouse_connect

            # readonly=1 on the handle: every statement is a read, and no query can change the setting back
            self._client = clickhouse_connect.get_client(dsn=self.dsn, settings=LIMITS)
        return self._client

    def __call__(self, request: dict[str, Any]) -> Iterator[bytes]:
        """The answer's chunks (a generator: nothing runs before the first ``next``, which raises
        :class:`QueryError` for a query refused or failed before its first row)."""
        sql, parameters, database = _request(request)
        with self._lock:
            try:
                yield from self._answer(sql, parameters, database)
            finally:
                if self._closed:  # closed while this query ran
                    self._shut()

    def _answer(self, sql: str, parameters: dict[str, Any] | None, database: str | None) -> Iterator[bytes]:
        client = self._open()
        client.database = database
        try:
            # the statement as ClickHouse parses it (one statement, comments and quoting forms gone), checked again
            _check_read(client.query("SELECT formatQuery({q:String})", parameters={"q": sql}).result_rows[0][0])
            with client.query_row_block_stream(sql, parameters=parameters) as stream:
                blocks = iter(stream)
                try:
                    block = next(blocks, None)
                except DatabaseError as exc:
                    raise QueryError(_message(exc), exc.code) from None
                source = stream.source
                types = [t.name for t in source.column_types]
                yield _line({"columns": list(source.column_names), "types": types})
                nesting = any(_NESTING.search(t) for t in types)
                rows = 0
                try:
                    while block is not None:
                        if self._closed:
                            yield _line({"error": "the hub is stopping: retry once it is up", "code": None})
                            return
                        yield _line([[to_wire(v) for v in row] for row in block] if nesting else block)
                        rows += len(block)
                        block = next(blocks, None)
                except (DatabaseError, TypeError) as exc:
                    yield _line({"error": _message(exc), "code": getattr(exc, "code", None)})
                    return
                yield _line({"rows": rows})
        except DatabaseError as exc:  # refused or failed when it started
            raise QueryError(_message(exc), exc.code) from None

    def close(self) -> None:
        """Close the handle now, or when the query in flight ends (never waiting for it: the hub is stopping)."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._shut()
            finally:
                self._lock.release()

    def _shut(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def hub_queries(dsn: str) -> HubQueries | None:
    """The query handler ``weir up`` serves when it owns an embedded ClickHouse (a ``chdb://`` DSN), else
    None (a ClickHouse server serves its own readers)."""
    return HubQueries(dsn) if dsn.startswith(CHDB) else None


# ---------------------------------------------------------------------------------------------
# a command's side


@dataclass(frozen=True)
class Answer:
    """A query's result, as clickhouse-connect's ``QueryResult`` names it."""

    column_names: tuple[str, ...]
    column_types: tuple[str, ...]  # ClickHouse's type names
    result_rows: list[tuple[Any, ...]]


class RemoteClickHouse:
    """:class:`sinks.clickhouse.ClickHouse`'s reads (``rows``, ``scalar``, ``query``) through the process that
    owns the embedded ClickHouse ``dsn`` (``owner`` names it in messages), at ``url``; its writes raise
    :class:`WriteRefused`. ``timeout_s`` bounds each wait for the hub (connecting is 10 s at most)."""

    def __init__(self, url: str, database: str | None, *, dsn: str = "", owner: str = "the hub",
                 timeout_s: float = 600.0) -> None:
        self.url = url
        self.database = database
        self.dsn = dsn
        self.owner = owner
        self.timeout_s = timeout_s

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Answer:
        wire = {k: to_wire(v) for k, v in parameters.items()} if parameters else None
        body = json.dumps({"sql": sql, "parameters": wire, "database": self.database}).encode()
        split = urllib.parse.urlsplit(self.url)
        conn = http.client.HTTPConnection(split.hostname or "127.0.0.1", split.port, timeout=min(10.0, self.timeout_s))
        try:
            try:
                conn.connect()
                assert conn.sock is not None
                conn.sock.settimeout(self.timeout_s)
                conn.request("POST", split.path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                if response.status != 200:
                    raise self._refusal(response.status, response.read())
                head = json.loads(response.readline())
                rows: list[tuple[Any, ...]] = []
                for line in response:
                    value = json.loads(line, object_hook=revive)
                    if type(value) is list:  # a block of rows
                        rows.extend(map(tuple, value))
                    elif "rows" in value:
                        return Answer(tuple(head["columns"]), tuple(head["types"]), rows)
                    else:
                        raise RemoteQueryError(value.get("error", "?"), code=value.get("code"))
                raise ClickHouseUnavailable(f"{self.owner} stopped answering midway at {self.url}: retry")
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                raise ClickHouseUnavailable(
                    f"{self.owner} owns the embedded ClickHouse and does not answer at {self.url} "
                    f"({_message(exc)}): wait until `weir up` says it is up, or stop it and retry") from None
        finally:
            conn.close()

    def _refusal(self, status: int, body: bytes) -> Exception:
        try:
            reply = json.loads(body)
            message, code = str(reply["error"]), reply.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = body.decode(errors="replace").strip()[:200] or f"HTTP {status}", None
        if status == 400:
            return RemoteQueryError(message, code=code)
        return ClickHouseUnavailable(f"{self.owner} owns the embedded ClickHouse and does not serve queries at "
                                     f"{self.url} (HTTP {status}: {message}); stop it and retry, or set "
                                     "WEIR_CLICKHOUSE_URL to a ClickHouse server")

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return self.query(sql, parameters).result_rows

    def scalar(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        rows = self.rows(sql, parameters)
        return rows[0][0] if rows else None

    def _refused(self) -> WriteRefused:
        return WriteRefused(f"the embedded ClickHouse {self.dsn or ''} belongs to {self.owner}, which serves reads "
                            "only: stop `weir up` to write to it, or set WEIR_CLICKHOUSE_URL to a ClickHouse server")

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        raise self._refused()

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        raise self._refused()

    def ensure_schema(self, extra: Sequence[str] = ()) -> None:
        raise self._refused()

    @property
    def client(self) -> Any:
        """Refused: a clickhouse-connect client reads and writes."""
        raise self._refused()

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Owner:
    """Another process holding the data directory the embedded ClickHouse is in, and its ``health_url``."""

    pid: int
    data_dir: Path
    health_url: str | None

    @property
    def name(self) -> str:
        return f"the Weir process holding {self.data_dir} (pid {self.pid if self.pid >= 0 else '?'})"

    @property
    def query_url(self) -> str | None:
        if not self.health_url:
            return None
        split = urllib.parse.urlsplit(self.health_url)
        return urllib.parse.urlunsplit((split.scheme, split.netloc, QUERY_PATH, "", ""))


def _chdb_path(dsn: str) -> str:
    return os.path.realpath(dsn[len(CHDB):].split("?")[0])


def chdb_owner(dsn: str, data_dir: Path | None = None) -> Owner | None:
    """The process, other than this one, that owns the embedded ClickHouse ``dsn``: one holding the lock of
    ``data_dir`` (default ``WEIR_DATA_DIR``) or of the DSN's parent directory (``chdb://<data dir>/clickhouse``)
    whose ``endpoints.json`` names that ClickHouse, or has none yet. None for a server DSN, or when no other
    process holds either directory."""
    if not dsn.startswith(CHDB):
        return None
    if data_dir is None:
        from streams.settings import WeirSettings

        data_dir = WeirSettings().data_dir
    path = _chdb_path(dsn)
    seen: set[str] = set()
    for d in (Path(data_dir), Path(path).parent):
        d = d.resolve()
        if str(d) in seen:
            continue
        seen.add(str(d))
        pid = DataDirLock(d).holder()
        if pid is None or pid == os.getpid():  # free, or this process owns it (and the engine)
            continue
        try:
            info = json.loads((d / "endpoints.json").read_text())
        except (OSError, ValueError):
            info = {}
        theirs = info.get("clickhouse_dsn") if isinstance(info, dict) else None
        if isinstance(theirs, str) and theirs.startswith(CHDB) and _chdb_path(theirs) == path:
            url = info.get("health_url")
            return Owner(pid, d, url if isinstance(url, str) else None)
        if theirs is None and d == Path(path).parent:  # starting: endpoints.json not written yet
            return Owner(pid, d, None)
    return None


def connect(dsn: str, database: str, *, create: bool = True, data_dir: Path | None = None,
            timeout_s: float = 600.0) -> ClickHouse | RemoteClickHouse:
    """ClickHouse ``dsn`` on ``database`` for a command: through the process that owns it when another one
    does (see :func:`chdb_owner`), else opened here (``create``: the database is created if missing, as
    :meth:`ClickHouse.for_project` does). Raises :class:`ClickHouseUnavailable` (one line) when neither
    works."""
    owner = chdb_owner(dsn, data_dir)
    if owner is not None:
        url = owner.query_url
        if url is None:
            raise ClickHouseUnavailable(
                f"the embedded ClickHouse {dsn} belongs to {owner.name}, which serves no queries (`weir demo`, "
                "or `weir up` still starting): wait for it, or stop it and retry")
        return RemoteClickHouse(url, database, dsn=dsn, owner=owner.name, timeout_s=timeout_s)
    try:
        return ClickHouse.for_project(dsn, database) if create else ClickHouse(dsn, database)
    except ProgrammingError as exc:
        if not dsn.startswith(CHDB):
            raise
        raise ClickHouseUnavailable(f"cannot open the embedded ClickHouse {dsn}: another process has it open "
                                    f"({_message(exc)}); stop that process and retry") from None
