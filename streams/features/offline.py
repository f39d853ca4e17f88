"""The offline store: point-in-time correct training sets from the ClickHouse feature log.

The features stage logs every value it computes, with the event time it is
as of, to ``feature_log`` (one row per view and accepted event).
:func:`training_set` rebuilds, for each labelled event a model scores, the
vector serving read for it, using only log rows whose event time is at or
before the event's: one ``ASOF LEFT JOIN`` per view of the model, in one
query, generated from the project's declaration (:func:`training_sql`).

The labelled events: the scored source's silver table, joined with its label
(:class:`~streams.project.spec.LabelStream`: the label source's silver table,
the newest label of each event; :class:`~streams.project.spec.LabelField`: a
column of the event itself).

The as-of rule, per view: the newest ``feature_log`` row of the event's
entity (the event's field the model looks the view up by) with
``row.ts <= event.ts`` (the same millisecond included).

* Why "at" is included: the features stage updates a view over the scored
  source with the event and then logs the entity's values *at that event's
  time*, writing Redis before forwarding the event to scoring. So the row
  stamped exactly ``T`` is the one that includes the event itself, and it is
  what inference read. Excluding it (``<``) would train on a vector without
  the event while serving scores with it.
* Why it cannot leak: a row stamped ``t`` holds window aggregates over
  ``(t - span, t]`` only (:meth:`streams.features.aggregations.EntityAggregator.values`
  never reads an event later than ``now``), so a row with ``t <= T`` never counts an event later
  than ``T``. Rows after ``T`` are never read, whatever their value and
  however early they were written; label time plays no part.
* No row at or before ``T`` (a new entity): the view's defaults
  (:attr:`~streams.features.definitions.FeatureView.defaults`), as the online store returns
  for a missing key, and the row's ``defaulted`` flag for that view is set.
* Re-delivered log rows collapse (``FINAL`` plus a ``GROUP BY`` on
  ``(entity, ts)``); two distinct rows of one entity at the same millisecond
  (two batches that both ended at ``T``) are broken by the greatest event id,
  so the result is deterministic. Both are as of ``T``: neither leaks.

What serving used, per event: the features stage logs one row per accepted
event, with the entity's values as of that event's own time, and attaches the
rows of the views over the scored source to the event it forwards for
scoring; inference uses those values instead of reading Redis. So those views'
part of the training vector is the one the event was scored with, even when
several events of one entity share a micro-batch (``tests/test_e2e.py`` checks
every event). Views over other sources are read from Redis at scoring time:
they may include events processed before the scored one but stamped after it,
which this join (rightly) leaves out.

Staleness, as serving applies it: a row older than the view's ``ttl_ms`` at
the event's time (``T - row.ts > ttl_ms``) is stale, and the view gets its
defaults and the ``defaulted`` flag, exactly as :meth:`OnlineStore.read` does
with ``as_of``. (Redis also expires keys ``ttl_ms`` of wall time after their
write; with event time near wall time that is the same cut.)

Request features are computed from the event's own fields, by the same
compiled functions inference runs (:attr:`~streams.project.spec.RequestFeature.compute`).
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

from sinks.clickhouse import ClickHouseReader
from streams.clickhouse_hub import ClickHouseUnavailable, RemoteQueryError, connect
from streams.features.definitions import view_key
from streams.project.contracts import silver_table
from streams.project.load import project_of
from streams.project.spec import LabelField, LabelStream, Model, Project
from streams.settings import WeirSettings
from streams.stack import EndpointNotFound, endpoint

LABEL, EVENT_ID, EVENT_TS = "label", "event_id", "event_ts"


@dataclass(frozen=True)
class TrainingSet:
    """Labelled events with their as-of feature vectors, oldest first (ties by event id).

    ``X`` is (n, len(feature_names)) float32 with columns in the model's
    ``feature_names`` order; ``defaulted[i, j]`` says that event ``i`` had no
    row of ``views[j]`` at or before its time. ``y`` holds the labels (0/1 for a
    binary model). ``since_ms``/``until_ms`` are the requested range (``[since,
    until)`` on the event's time, ``None`` = open); ``sha256`` covers every row.
    """

    X: np.ndarray
    y: np.ndarray
    event_ids: np.ndarray
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


def _q(name: str) -> str:
    """A column name quoted for ClickHouse."""
    return "`" + name.replace("`", "``") + "`"


def labels_sql(project: Project, model: Model) -> tuple[str, str]:
    """(the FROM clause of the model's labelled events as ``p`` joined to ``l``, the label column)."""
    events = f"(SELECT * FROM {silver_table(project.source(model.source))} FINAL) AS p"
    label = model.label
    if isinstance(label, LabelField):
        return f"{events}", f"toFloat64(p.{_q(label.field)})"
    assert isinstance(label, LabelStream)
    labels = silver_table(project.source(label.source))
    return (f"{events}\n    INNER JOIN (SELECT toString({_q(label.key)}) AS event_id, "
            f"toFloat64(argMax({_q(label.value)}, ts)) AS label FROM {labels} FINAL "
            f"WHERE {_q(label.key)} IS NOT NULL AND {_q(label.value)} IS NOT NULL GROUP BY event_id) AS l "
            "ON p.event_id = l.event_id"), "l.label"


def _view_join(i: int, until: str) -> str:
    # Dedup before the join: FINAL collapses re-delivered rows; GROUP BY leaves one row per (entity, ts).
    return f"""
ASOF LEFT JOIN (
    SELECT entity_id, toUnixTimestamp64Milli(ts) AS ts_ms, argMax(values, event_id) AS values, toUInt8(1) AS hit
    FROM feature_log FINAL
    WHERE view = {{view{i}:String}} AND entity_id IN (SELECT k{i} FROM q){until}
    GROUP BY entity_id, ts
) AS v{i} ON q.k{i} = v{i}.entity_id AND q.ts_ms >= v{i}.ts_ms"""


def training_sql(project: Project, model: Model, *, since: bool, until: bool, limit: bool) -> str:
    """The query :func:`training_set` runs (parameters ``since``, ``until``, ``limit``, ``view<i>``)."""
    source = project.source(model.source)
    where = [c for c, on in (("p.ts >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')", since),
                             ("p.ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')", until)) if on]
    log_until = " AND ts < fromUnixTimestamp64Milli({until:Int64}, 'UTC')" if until else ""
    events, label = labels_sql(project, model)
    keys = "".join(f", ifNull(toString(p.{_q(ref.key_field)}), '') AS k{i}" for i, ref in enumerate(model.views))
    fields = "".join(f", p.{_q(f)} AS f{j}" for j, f in enumerate(source.fields))
    # a row older than the view's TTL at the event's time is stale: serving gets the defaults for it too
    picked = "".join(f",\n    v{i}.hit AND q.ts_ms - v{i}.ts_ms <= {int(ref.view.ttl_ms)}, v{i}.values"
                     for i, ref in enumerate(model.views))
    return f"""
WITH q AS (
    SELECT p.event_id AS event_id, toUnixTimestamp64Milli(p.ts) AS ts_ms{keys}{fields}, {label} AS label
    FROM {events}
    WHERE {label} IS NOT NULL{"".join(" AND " + c for c in where)}
    ORDER BY ts_ms DESC, event_id DESC
    LIMIT 1 BY event_id
    {"LIMIT {limit:UInt64}" if limit else ""}
)
SELECT q.event_id, q.ts_ms, q.label{"".join(f", q.f{j}" for j in range(len(source.fields)))}{picked}
FROM q{"".join(_view_join(i, log_until) for i in range(len(model.views)))}
ORDER BY q.ts_ms, q.event_id"""


def content_hash(X: np.ndarray, y: np.ndarray, event_ids: Sequence[str], event_ts: np.ndarray,
                 feature_names: Sequence[str]) -> str:
    """sha256 over the column names, then each row in order: event id, event time, label, float32 features."""
    h = hashlib.sha256("\x1f".join(feature_names).encode())
    Xb = np.ascontiguousarray(X, dtype="<f4")
    yb = np.asarray(y, dtype=np.float64)
    for i, eid in enumerate(event_ids):
        raw = str(eid).encode()
        h.update(struct.pack("<I", len(raw)) + raw + struct.pack("<qd", int(event_ts[i]), float(yb[i])))
        h.update(Xb[i].tobytes())
    return h.hexdigest()


def training_set(ch: ClickHouseReader, project: Project, model: Model, *, since_ms: int | None = None,
                 until_ms: int | None = None, limit: int | None = None) -> TrainingSet:
    """The point-in-time correct training set of ``model``: its labelled events with ``since <= ts < until``.

    ``limit`` keeps the newest ``limit`` events. Each event appears once, however often its label or its
    own row was delivered. See the module docstring for the as-of rule.
    """
    views = [ref.view for ref in model.views]
    fields = project.source(model.source).fields
    params: dict[str, Any] = {f"view{i}": view_key(v) for i, v in enumerate(views)}
    params |= {k: v for k, v in (("since", since_ms), ("until", until_ms), ("limit", limit)) if v is not None}
    sql = training_sql(project, model, since=since_ms is not None, until=until_ms is not None,
                       limit=limit is not None)
    rows = ch.rows(sql, params)

    request = [r.compute for r in model.request]
    X = np.empty((len(rows), len(model.feature_names)), dtype=np.float32)
    defaulted = np.zeros((len(rows), len(views)), dtype=bool)
    n_fields = len(fields)
    for r, row in enumerate(rows):
        event = dict(zip(fields, row[3:3 + n_fields], strict=True))
        picked = row[3 + n_fields:]
        vector: list[float] = []
        for j, view in enumerate(views):
            hit, values = picked[2 * j], picked[2 * j + 1]
            if not hit:
                defaulted[r, j] = True
                values = view.defaults
            elif len(values) != len(view.features):
                raise ValueError(f"feature_log {view_key(view)} row has {len(values)} values, "
                                 f"the view has {len(view.features)} features")
            vector.extend(values)
        X[r] = vector + [f(event) for f in request]
    event_ids = np.asarray([r[0] for r in rows], dtype=object)
    event_ts = np.asarray([r[1] for r in rows], dtype=np.int64)
    dtype = np.int64 if model.task == "binary" else np.float64
    y = np.asarray([r[2] for r in rows], dtype=np.float64).astype(dtype)
    return TrainingSet(X=X, y=y, event_ids=event_ids, event_ts=event_ts, defaulted=defaulted,
                       feature_names=model.feature_names, views=tuple(view_key(v) for v in views),
                       since_ms=since_ms, until_ms=until_ms,
                       sha256=content_hash(X, y, list(event_ids), event_ts, model.feature_names))


def newest_label_ms(ch: ClickHouseReader, project: Project, model: Model) -> int | None:
    """The event time of ``model`` 's newest label (a label stream's newest event; for a label field, the
    newest scored event's), or None before any."""
    label = model.label
    source = project.source(label.source if isinstance(label, LabelStream) else model.source)
    value = ch.scalar(f"SELECT toUnixTimestamp64Milli(max(ts)) FROM {silver_table(source)}")
    return int(value) if value else None


def warm_from_ms(ch: ClickHouseReader, model: Model) -> int:
    """The event time from which each of ``model`` 's windowed features covers a whole window: the latest, over
    its views, of the view's first ``feature_log`` row plus its longest window. Before it, a count over the last
    hour counts less than an hour (the stream's first hour). 0 for a model without views."""
    warm = 0
    for vf in model.views:
        first = ch.scalar("SELECT toUnixTimestamp64Milli(min(ts)) FROM feature_log WHERE view = {v:String}",
                          {"v": view_key(vf.view)})
        if first:
            warm = max(warm, int(first) + max(f.window.extent_ms for f in vf.view.specs))
    return warm


def mature_labels(ch: ClickHouseReader, project: Project, model: Model, maturity_ms: int) -> int:
    """How many of the model's labelled events are at least ``maturity_ms`` older than its newest label: what
    a retrain would train on."""
    newest = newest_label_ms(ch, project, model)
    if newest is None:
        return 0
    events, label = labels_sql(project, model)
    n = ch.scalar(f"SELECT count() FROM {events} WHERE {label} IS NOT NULL AND "
                  "toUnixTimestamp64Milli(p.ts) <= {until:Int64}", {"until": newest - maturity_ms})
    return int(n or 0)


# ---------------------------------------------------------------------------------------------
# writing it out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def header(ts: TrainingSet) -> list[str]:
    return [*ts.feature_names, LABEL, EVENT_ID, EVENT_TS]


def write_csv(ts: TrainingSet, path: Path) -> None:
    """One row per event: features (shortest float32 repr), label, event id, ISO event time (UTC)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header(ts))
        for i in range(ts.rows):
            w.writerow([*(str(x) for x in ts.X[i]), ts.y[i], ts.event_ids[i], _iso(int(ts.event_ts[i]))])


def write_parquet(ts: TrainingSet, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {name: pa.array(ts.X[:, j], pa.float32()) for j, name in enumerate(ts.feature_names)}
    columns[LABEL] = pa.array(ts.y, pa.int64() if ts.y.dtype == np.int64 else pa.float64())
    columns[EVENT_ID] = pa.array([str(p) for p in ts.event_ids], pa.string())
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
    project = project_of(args)
    try:
        model = project.model(args.model) if args.model else project.models[0]
    except (KeyError, IndexError) as exc:
        print(f"weir features training-set: error: {exc.args[0] if exc.args else 'the project has no model'}",
              file=sys.stderr)
        return 1
    try:  # while `weir up` runs, through it: the embedded ClickHouse admits one process (streams.clickhouse_hub)
        ch = connect(dsn, args.database or project.name, create=not args.database)
        try:
            ts = training_set(ch, project, model, since_ms=since, until_ms=until, limit=args.limit)
        finally:
            ch.close()
    except (ClickHouseUnavailable, RemoteQueryError) as exc:
        print(f"weir features training-set: error: {exc}", file=sys.stderr)
        return 1
    out: Path = args.out if args.out is not None else WeirSettings().data_dir / "training-set.csv"
    fmt = write(ts, out)
    lo, hi = ts.ts_min_ms, ts.ts_max_ms
    span = f"{_iso(lo)} .. {_iso(hi)}" if lo is not None and hi is not None else "(empty)"
    defaulted = ", ".join(f"{v} {int(ts.defaulted[:, j].sum())}" for j, v in enumerate(ts.views))
    labels = f"{int(ts.y.sum())} positive" if model.task == "binary" else f"mean label {float(ts.y.mean()):.4g}"
    print(f"model: {model.name}\n"
          f"rows: {ts.rows} ({labels if ts.rows else 'no label yet'})\n"
          f"event time: {span}\n"
          f"defaulted views: {defaulted}\n"
          f"sha256: {ts.sha256}\n"
          f"wrote: {out} ({fmt})")
    return 0


def add_training_set_parser(features_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``training-set`` to the ``features`` command's subparsers (sets ``handler(args) -> int``)."""
    p = features_sub.add_parser(
        "training-set", help="a model's point-in-time correct training set from the feature log (as of each "
                             "scored event's time)")
    p.add_argument("--model", default=None, help="the model (default: the project's first)")
    p.add_argument("--since", default=None, help="first event time, ISO 8601 (UTC if no offset)")
    p.add_argument("--until", default=None, help="event times before this, ISO 8601 (UTC if no offset)")
    p.add_argument("--limit", type=int, default=None, help="keep only the newest N labelled events")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write: Parquet if it ends in .parquet, else CSV (default <data dir>/training-set.csv)")
    p.add_argument("--clickhouse", default=None,
                   help="ClickHouse DSN (default: clickhouse_dsn in <WEIR_DATA_DIR>/endpoints.json)")
    p.add_argument("--database", default=None, help=argparse.SUPPRESS)  # tests: a database of their own
    p.set_defaults(handler=_cmd_training_set)
