"""The offline store: point-in-time correct training sets from the ClickHouse feature log.

The features stage logs every value it computes, with the event time it is
as of, to ``feature_log`` (one row per view and accepted event). :func:`training_set` rebuilds, for each labelled payment, the
vector serving read for it, using only log rows whose event time is at or
before the payment's: one ``ASOF LEFT JOIN`` per view, in one query.

The as-of rule, per view: the newest ``feature_log`` row of the payment's
entity with ``row.ts <= payment.ts`` (the same millisecond included).

* Why "at" is included: the features stage updates a card's window with a
  payment and then logs the card's values *at that payment's time*
  (``now = payment ts``, when it is the card's newest event of the batch),
  writing Redis before forwarding the payment to scoring. So the card row
  stamped exactly ``T`` is the one that includes the payment itself, and it
  is what inference read. Excluding it (``<``) would
  train on a vector without the payment while serving scores with it.
* Why it cannot leak: a row stamped ``t`` holds window aggregates over
  ``(t - span, t]`` only (:meth:`streams.features.aggregations.EntityAggregator.values`
  never reads an event later than ``now``), so a row with ``t <= T`` never counts an event later
  than ``T``. Rows after ``T`` are never read, whatever their value and
  however early they were written; label time plays no part.
* No row at or before ``T`` (a new card, a user with no clicks yet): the view's
  defaults (:attr:`~streams.features.definitions.FeatureView.defaults`), as the online store returns
  for a missing key, and the row's ``defaulted`` flag for that view is set.
* Re-delivered log rows collapse (``FINAL`` plus a ``GROUP BY`` on
  ``(entity, ts)``); two distinct rows of one entity at the same millisecond
  (two batches that both ended at ``T``) are broken by the greatest event id,
  so the result is deterministic. Both are as of ``T``: neither leaks.

What serving used, per payment: the features stage logs one row per accepted
event, with the entity's values as of that event's own time, and attaches the
card view's row to the payment it forwards for scoring; inference uses those
values instead of reading the card from Redis. So a payment's card vector in
the training set is the one it was scored with, even when several payments of
one card share a micro-batch (``tests/test_e2e.py`` checks every payment).
The user view is still read from Redis at scoring time: it may include clicks
processed before the payment but stamped after it, which this join (rightly)
leaves out. Two events of one entity in the same millisecond give two rows
with the same ``ts``; the join takes the greatest event id's.

Staleness, as serving applies it: a row older than the view's ``ttl_ms`` at
the payment's time (``T - row.ts > ttl_ms``) is stale, and the view gets its
defaults and the ``defaulted`` flag, exactly as :meth:`OnlineStore.read` does
with ``as_of``. (Redis also expires keys ``ttl_ms`` of wall time after their
write; with event time near wall time that is the same cut.)

Request features come from the payment itself (:func:`request_features`).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sinks.clickhouse import ClickHouse
from streams.features.definitions import CARD, REQUEST, USER, FeatureView, request_features, view_key
from streams.settings import WeirSettings
from streams.stack import EndpointNotFound, endpoint

# The silver_payments column that holds each view entity's id (inference reads USER by customer_id).
ENTITY_COLUMNS: dict[str, str] = {"card_id": "card_id", "user_id": "customer_id"}

LABEL, PAYMENT_ID, EVENT_TS = "label", "payment_id", "event_ts"


@dataclass(frozen=True)
class TrainingSet:
    """Labelled payments with their as-of feature vectors, oldest first (ties by payment id).

    ``X`` is (n, len(feature_names)) float32 with columns in ``feature_names``
    order (``FEATURE_NAMES`` for the default views); ``defaulted[i, j]`` says
    that payment ``i`` had no row of ``views[j]`` at or before its time.
    ``since_ms``/``until_ms`` are the requested range (``[since, until)`` on the
    payment's event time, ``None`` = open); ``sha256`` covers every row.
    """

    X: np.ndarray
    y: np.ndarray
    payment_ids: np.ndarray
    event_ts: np.ndarray
    defaulted: np.ndarray
    feature_names: tuple[str, ...]
    views: tuple[str, ...]
    since_ms: int | None
    until_ms: int | None
    sha256: str

    @property
    def rows(self) -> int:
        return len(self.y)

    @property
    def ts_min_ms(self) -> int | None:
        return int(self.event_ts.min()) if self.rows else None

    @property
    def ts_max_ms(self) -> int | None:
        return int(self.event_ts.max()) if self.rows else None


def _view_join(i: int, view: FeatureView, until: str) -> str:
    entity = ENTITY_COLUMNS[view.entity]
    # Dedup before the join: FINAL collapses re-delivered rows; GROUP BY leaves one row per (entity, ts).
    return f"""
ASOF LEFT JOIN (
    SELECT entity_id, toUnixTimestamp64Milli(ts) AS ts_ms, argMax(values, event_id) AS values, toUInt8(1) AS hit
    FROM feature_log FINAL
    WHERE view = {{view{i}:String}} AND entity_id IN (SELECT {entity} FROM q){until}
    GROUP BY entity_id, ts
) AS v{i} ON q.{entity} = v{i}.entity_id AND q.ts_ms >= v{i}.ts_ms"""


def training_sql(views: Sequence[FeatureView], *, since: bool, until: bool, limit: bool) -> str:
    """The query :func:`training_set` runs (parameters ``since``, ``until``, ``limit``, ``view<i>``)."""
    where = [c for c, on in (("p.ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')", since),
                             ("p.ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')", until)) if on]
    log_until = " AND ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')" if until else ""
    # a row older than the view's TTL at the payment's time is stale: serving gets the defaults for it too
    picked = ",\n    ".join(f"v{i}.hit AND q.ts_ms - v{i}.ts_ms <= {int(v.ttl_ms)}, v{i}.values"
                            for i, v in enumerate(views))
    return f"""
WITH q AS (
    SELECT p.payment_id AS payment_id, p.card_id AS card_id, p.customer_id AS customer_id, p.amount AS amount,
           toString(p.merchant_category) AS merchant_category, toUnixTimestamp64Milli(p.ts) AS ts_ms,
           l.is_fraud AS is_fraud
    FROM (SELECT * FROM silver_payments FINAL) AS p
    INNER JOIN (SELECT payment_id, is_fraud FROM labels FINAL) AS l ON p.payment_id = l.payment_id
    {"WHERE " + " AND ".join(where) if where else ""}
    ORDER BY ts_ms DESC, payment_id DESC
    LIMIT 1 BY payment_id
    {"LIMIT {limit:UInt64}" if limit else ""}
)
SELECT q.payment_id, q.ts_ms, q.is_fraud, q.amount, q.merchant_category,
    {picked}
FROM q{"".join(_view_join(i, v, log_until) for i, v in enumerate(views))}
ORDER BY q.ts_ms, q.payment_id"""


def content_hash(X: np.ndarray, y: np.ndarray, payment_ids: Sequence[str], event_ts: np.ndarray,
                 feature_names: Sequence[str]) -> str:
    """sha256 over the column names, then each row in order: payment id, event time, label, float32 features."""
    h = hashlib.sha256("\x1f".join(feature_names).encode())
    Xb = np.ascontiguousarray(X, dtype="<f4")
    for i, pid in enumerate(payment_ids):
        raw = str(pid).encode()
        h.update(struct.pack("<I", len(raw)) + raw + struct.pack("<qq", int(event_ts[i]), int(y[i])))
        h.update(Xb[i].tobytes())
    return h.hexdigest()


def training_set(ch: ClickHouse, *, since_ms: int | None = None, until_ms: int | None = None,
                 views: Sequence[FeatureView] = (CARD, USER), limit: int | None = None) -> TrainingSet:
    """The point-in-time correct training set of the labelled payments with ``since <= ts < until``.

    ``limit`` keeps the newest ``limit`` payments. Each payment appears once,
    however often its label or payment row was delivered. See the module
    docstring for the as-of rule.
    """
    views = tuple(views)
    params: dict[str, Any] = {f"view{i}": view_key(v) for i, v in enumerate(views)}
    params |= {k: v for k, v in (("since", since_ms), ("until", until_ms), ("limit", limit)) if v is not None}
    sql = training_sql(views, since=since_ms is not None, until=until_ms is not None, limit=limit is not None)
    rows = ch.rows(sql, params)

    names = tuple(f for v in views for f in v.features) + REQUEST
    defaults = [v.defaults for v in views]
    X = np.empty((len(rows), len(names)), dtype=np.float32)
    defaulted = np.zeros((len(rows), len(views)), dtype=bool)
    for r, (_, _, _, amount, category, *picked) in enumerate(rows):
        vector: list[float] = []
        for j, view in enumerate(views):
            hit, values = picked[2 * j], picked[2 * j + 1]
            if not hit:
                defaulted[r, j] = True
                values = defaults[j]
            elif len(values) != len(view.features):
                raise ValueError(f"feature_log {view_key(view)} row has {len(values)} values, "
                                 f"the view has {len(view.features)} features")
            vector.extend(values)
        X[r] = vector + request_features(amount, category)
    payment_ids = np.asarray([r[0] for r in rows], dtype=object)
    event_ts = np.asarray([r[1] for r in rows], dtype=np.int64)
    y = np.asarray([r[2] for r in rows], dtype=np.int64)
    return TrainingSet(X=X, y=y, payment_ids=payment_ids, event_ts=event_ts, defaulted=defaulted,
                       feature_names=names, views=tuple(view_key(v) for v in views), since_ms=since_ms,
                       until_ms=until_ms, sha256=content_hash(X, y, list(payment_ids), event_ts, names))


# ---------------------------------------------------------------------------------------------
# writing it out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def header(ts: TrainingSet) -> list[str]:
    return [*ts.feature_names, LABEL, PAYMENT_ID, EVENT_TS]


def write_csv(ts: TrainingSet, path: Path) -> None:
    """One row per payment: features (shortest float32 repr), label, payment id, ISO event time (UTC)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header(ts))
        for i in range(ts.rows):
            w.writerow([*(str(x) for x in ts.X[i]), int(ts.y[i]), ts.payment_ids[i], _iso(int(ts.event_ts[i]))])


def write_parquet(ts: TrainingSet, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {name: pa.array(ts.X[:, j], pa.float32()) for j, name in enumerate(ts.feature_names)}
    columns[LABEL] = pa.array(ts.y, pa.int64())
    columns[PAYMENT_ID] = pa.array([str(p) for p in ts.payment_ids], pa.string())
    columns[EVENT_TS] = pa.array(ts.event_ts, pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    table = pa.table(columns).replace_schema_metadata({"weir.sha256": ts.sha256})
    pq.write_table(table, path)


def write(ts: TrainingSet, path: Path) -> str:
    """Write ``ts`` to ``path``: Parquet for a ``.parquet`` suffix, else CSV. Returns the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        write_parquet(ts, path)
        return "parquet"
    write_csv(ts, path)
    return "csv"


# ---------------------------------------------------------------------------------------------
# the command line


class OfflineError(Exception):
    """A command-line problem worth one line on stderr (no ClickHouse to talk to, a bad time)."""


def parse_time(text: str) -> int:
    """An ISO 8601 time as epoch ms; a time without an offset is taken as UTC.

    >>> parse_time("2026-01-01T00:00:01.5Z"), parse_time("2026-01-01 01:00:00+01:00")
    (1767225601500, 1767225600000)
    """
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise OfflineError(f"not an ISO 8601 time: {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return round(t.timestamp() * 1000)


def resolve_dsn(explicit: str | None, data_dir: Path | None = None) -> str:
    """``explicit``, else ``clickhouse_dsn`` from ``<data_dir>/endpoints.json`` (written by ``weir up``)."""
    try:
        return endpoint("clickhouse_dsn", explicit, flag="--clickhouse DSN", data_dir=data_dir)
    except EndpointNotFound as exc:
        raise OfflineError(str(exc)) from None


def _cmd_training_set(args: argparse.Namespace) -> int:
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        if since is not None and until is not None and until <= since:
            raise OfflineError("--until must be after --since")
        dsn = resolve_dsn(args.clickhouse)
    except OfflineError as exc:
        print(f"weir features training-set: error: {exc}", file=sys.stderr)
        return 1
    ch = ClickHouse(dsn, database=args.database)
    try:
        ts = training_set(ch, since_ms=since, until_ms=until, limit=args.limit)
    finally:
        ch.close()
    out: Path = args.out if args.out is not None else WeirSettings().data_dir / "training-set.csv"
    fmt = write(ts, out)
    lo, hi = ts.ts_min_ms, ts.ts_max_ms
    span = f"{_iso(lo)} .. {_iso(hi)}" if lo is not None and hi is not None else "(empty)"
    defaulted = ", ".join(f"{v} {int(ts.defaulted[:, j].sum())}" for j, v in enumerate(ts.views))
    print(f"rows: {ts.rows} ({int(ts.y.sum())} positive)\n"
          f"event time: {span}\n"
          f"defaulted views: {defaulted}\n"
          f"sha256: {ts.sha256}\n"
          f"wrote: {out} ({fmt})")
    return 0


def add_training_set_parser(features_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``training-set`` to the ``features`` command's subparsers (sets ``handler(args) -> int``)."""
    p = features_sub.add_parser(
        "training-set", help="point-in-time correct training set from the feature log (as of each payment's time)")
    p.add_argument("--since", default=None, help="first payment event time, ISO 8601 (UTC if no offset)")
    p.add_argument("--until", default=None, help="payment event times before this, ISO 8601 (UTC if no offset)")
    p.add_argument("--limit", type=int, default=None, help="keep only the newest N labelled payments")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write: Parquet if it ends in .parquet, else CSV (default <data dir>/training-set.csv)")
    p.add_argument("--clickhouse", default=None,
                   help="ClickHouse DSN (default: clickhouse_dsn in <WEIR_DATA_DIR>/endpoints.json)")
    p.add_argument("--database", default=None, help=argparse.SUPPRESS)  # tests: a database of their own
    p.set_defaults(handler=_cmd_training_set)
