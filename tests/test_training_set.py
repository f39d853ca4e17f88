"""The offline store against the real embedded ClickHouse: point-in-time correctness, with adversarial timestamps.

The rule under test (see :mod:`streams.features.offline`): for a payment at
``T``, each view's values are those of the entity's newest feature-log row
with ``ts <= T``; nothing stamped after ``T`` may ever reach the training row.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.fraud_shop.project import card as CARD
from examples.fraud_shop.project import fraud
from examples.fraud_shop.project import user as USER
from sinks.clickhouse import ClickHouse
from sinks.events import FLOG_COLS
from streams.cli import parser
from streams.features import offline
from streams.project.contracts import tables
from tests.conftest import SHOP

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
DAY = 24 * HOUR
FEATURE_NAMES = fraud.feature_names
DEFAULTS = {f.name: f.default for v in (CARD, USER) for f in v.specs} | {r.name: r.default for r in fraud.request}
SILVER_PAYMENT_COLS = ("event_id", "ts", "source_ts", *SHOP.source("payments").fields)
SILVER_LABEL_COLS = ("event_id", "ts", "source_ts", *SHOP.source("labels").fields)
CARD_V, USER_V = offline.view_key(CARD), offline.view_key(USER)
CARD_DEFAULTS = [DEFAULTS[f] for f in CARD.features]
USER_DEFAULTS = [DEFAULTS[f] for f in USER.features]


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def request_features(amount: float, merchant_category: str) -> list[float]:
    """The fraud model's request features, by hand: amount, log(1 + amount), digital goods."""
    return [amount, math.log1p(max(amount, 0.0)), 1.0 if merchant_category == "digital_goods" else 0.0]


def training_set(ch: ClickHouse, **kwargs: Any) -> offline.TrainingSet:
    """The fraud model's training set."""
    return offline.training_set(ch, SHOP, fraud, **kwargs)


@pytest.fixture
def ch(clickhouse_client: Any, chdb_path: Path) -> ClickHouse:
    handle = ClickHouse(f"chdb://{chdb_path}", database=clickhouse_client.database)
    handle.ensure_schema(tables(SHOP))
    return handle


def log(ch: ClickHouse, rows: Sequence[tuple[str, str, str, int, Sequence[float]]]) -> None:
    """Feature-log rows (view, entity, event id, ts ms, values), as the ClickHouse sink writes them."""
    ch.insert("feature_log", [[v, e, eid, _dt(ts), list(vals)] for v, e, eid, ts, vals in rows], FLOG_COLS)


def pay(ch: ClickHouse, rows: Sequence[tuple[str, str, str, int, float, str]]) -> None:
    """Silver payments (payment id, card, customer, ts ms, amount, merchant category)."""
    ch.insert("silver_payments", [[pid, _dt(ts), _dt(ts), pid, card, cust, "m1", cat, amount, None]
                                  for pid, card, cust, ts, amount, cat in rows], SILVER_PAYMENT_COLS)


def label(ch: ClickHouse, rows: Sequence[tuple[str, int, int, int]]) -> None:
    """Labels (payment id, is_fraud, payment ts ms, label ts ms): silver events of the label source."""
    ch.insert("silver_labels", [[pid, _dt(lts), _dt(lts), pid, bool(y), _dt(pts).isoformat()]
                                for pid, y, pts, lts in rows], SILVER_LABEL_COLS)


def vec(x: float, n: int = 5) -> list[float]:
    return [x + i / 8 for i in range(n)]  # exact in float32


def row_of(ts: offline.TrainingSet, pid: str) -> int:
    (i,) = np.flatnonzero(ts.event_ids == pid)
    return int(i)


# ---------------------------------------------------------------------------------------------
# adversarial timestamps


T = T0 + HOUR  # the payments' time


@pytest.fixture
def adversarial(ch: ClickHouse) -> ClickHouse:
    poison = vec(1e6)  # what a leak would look like
    log(ch, [
        # card c1: rows just before, exactly at, just after and long after T
        (CARD_V, "c1", "e-1", T - 1, vec(1)),
        (CARD_V, "c1", "e0", T, vec(2)),
        (CARD_V, "c1", "e+1", T + 1, poison),
        (CARD_V, "c1", "e+late", T + 30 * DAY, poison),
        # card c2: nothing at T, so T - 1 (written *after* the later rows: insertion order must not matter)
        (CARD_V, "c2", "f+1", T + 1, poison),
        # card c3 shares every timestamp with c1, other values
        (CARD_V, "c3", "g-1", T - 1, vec(30)),
        (CARD_V, "c3", "g0", T, vec(31)),
        (CARD_V, "c3", "g+1", T + 1, poison),
        # user u1 has only rows after T: defaults, flagged
        (USER_V, "u1", "h+1", T + 1, poison),
        (USER_V, "u1", "h+day", T + DAY, poison),
        # user u2: an old row; a *card* id "u2" (another view, same entity string) must not be picked
        (USER_V, "u2", "k-old", T - 90 * 60_000, vec(40)),
        # user u3: its newest row is older than the view's TTL at T: stale, so defaults, flagged
        (USER_V, "u3", "s-stale", T - 5 * HOUR, poison),
        # card c5: its row is exactly the TTL old at T: still fresh
        (CARD_V, "c5", "t-edge", T - CARD.ttl_ms, vec(70)),
        (CARD_V, "u2", "k-card", T, poison),
        # user "c1": same entity string as card c1, user view
        (USER_V, "c1", "m0", T, vec(50)),
        # card c4: two distinct rows at exactly T (two batches ending at T): the greatest event id wins
        (CARD_V, "c4", "b-first", T, vec(60)),
        (CARD_V, "c4", "a-second", T, vec(61)),
        (CARD_V, "c4", "z-future", T + 1, poison),
    ])
    log(ch, [(CARD_V, "c2", "f-1", T - 1, vec(20))])
    # re-delivered batches: the same rows again, in other parts
    log(ch, [(CARD_V, "c1", "e0", T, vec(2)), (CARD_V, "c1", "e-1", T - 1, vec(1))])
    log(ch, [(CARD_V, "c1", "e0", T, vec(2))])
    payments = [
        ("p1", "c1", "u1", T, 12.5, "digital_goods"),
        ("p2", "c2", "u2", T, 3.0, "grocery"),
        ("p3", "c3", "c1", T, 7.0, "grocery"),
        ("p4", "c4", "u9", T, 1.0, "grocery"),
        ("p5", "c5", "u3", T, 2.0, "grocery"),
        ("p-early", "c1", "u1", T - 2 * HOUR, 5.0, "grocery"),  # outside --since
        ("p-until", "c1", "u1", T + 2 * HOUR, 5.0, "grocery"),  # at --until: excluded
        ("p-unlabelled", "c1", "u1", T, 5.0, "grocery"),
    ]
    pay(ch, payments)
    pay(ch, payments[:2])  # re-delivered payments
    # labels arrive long after the payment (30 days), some twice
    label(ch, [(pid, int(pid == "p1"), ts, ts + 30 * DAY) for pid, _, _, ts, _, _ in payments if pid != "p-unlabelled"])
    label(ch, [("p1", 1, T, T + 31 * DAY)])
    return ch


def test_as_of_rule_with_adversarial_timestamps(adversarial: ClickHouse) -> None:
    ts = training_set(adversarial, since_ms=T - HOUR, until_ms=T + 2 * HOUR)

    assert sorted(ts.event_ids) == ["p1", "p2", "p3", "p4", "p5"]  # one row each, in range, labelled
    assert ts.rows == 5 and ts.X.shape == (5, len(FEATURE_NAMES)) and ts.X.dtype == np.float32
    assert ts.feature_names == FEATURE_NAMES and ts.views == (CARD_V, USER_V)
    assert (ts.event_ts == T).all() and ts.ts_min_ms == ts.ts_max_ms == T
    assert ts.X.max() < 1e5, "a value stamped after the payment leaked into the training set"

    expected = {
        "p1": (vec(2), USER_DEFAULTS, (False, True), request_features(12.5, "digital_goods"), 1),
        "p2": (vec(20), vec(40), (False, False), request_features(3.0, "grocery"), 0),
        "p3": (vec(31), vec(50), (False, False), request_features(7.0, "grocery"), 0),
        "p4": (vec(60), USER_DEFAULTS, (False, True), request_features(1.0, "grocery"), 0),
        "p5": (vec(70), USER_DEFAULTS, (False, True), request_features(2.0, "grocery"), 0),
    }
    for pid, (card, user, flags, request, y) in expected.items():
        i = row_of(ts, pid)
        np.testing.assert_array_equal(ts.X[i], np.asarray(card + user + request, dtype=np.float32), err_msg=pid)
        assert tuple(ts.defaulted[i]) == flags, pid
        assert ts.y[i] == y, pid
    assert ts.X[row_of(ts, "p1"), FEATURE_NAMES.index("user_secs_since_login")] == 3600.0


def test_open_range_and_limit(adversarial: ClickHouse) -> None:
    everything = training_set(adversarial)
    assert sorted(everything.event_ids) == ["p-early", "p-until", "p1", "p2", "p3", "p4", "p5"]
    assert list(everything.event_ts) == sorted(everything.event_ts)
    early = everything.X[row_of(everything, "p-early")]
    np.testing.assert_array_equal(early[:5], CARD_DEFAULTS)  # c1 has no row 2 h before T
    assert tuple(everything.defaulted[row_of(everything, "p-early")]) == (True, True)
    late = everything.X[row_of(everything, "p-until")]
    np.testing.assert_array_equal(late[:5], np.asarray(vec(1e6), dtype=np.float32))  # T + 1 is before it: fine

    newest = training_set(adversarial, limit=2)
    assert list(newest.event_ids) == ["p5", "p-until"]  # the newest two, oldest first (ties by id)


def test_a_row_after_the_payment_is_never_read_even_when_written_first(ch: ClickHouse) -> None:
    # the only rows of the card are 1 ms and 1 year after the payment; the label comes a year later too
    log(ch, [(CARD_V, "c", "late", T + 1, vec(9)), (CARD_V, "c", "later", T + 365 * DAY, vec(9))])
    pay(ch, [("p", "c", "u", T, 1.0, "x")])
    label(ch, [("p", 1, T, T + 365 * DAY)])
    ts = training_set(ch)
    np.testing.assert_array_equal(ts.X[0, :5], CARD_DEFAULTS)
    assert ts.defaulted[0].all()


def test_empty(ch: ClickHouse) -> None:
    ts = training_set(ch)
    assert ts.rows == 0 and ts.X.shape == (0, len(FEATURE_NAMES)) and ts.ts_min_ms is None


# ---------------------------------------------------------------------------------------------
# against a brute-force reference

_entities = st.sampled_from(["a", "b", "c"])


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    logs: dict[tuple[str, str, int, str], list[float]] = {}
    for _ in range(draw(st.integers(0, 25))):
        key = (draw(st.sampled_from([CARD_V, USER_V])), draw(_entities), draw(st.integers(0, 12)),
               draw(st.sampled_from(["e1", "e2", "e3"])))
        logs[key] = [float(draw(st.integers(-50, 50))) for _ in range(5)]
    payments = {}
    for i in range(draw(st.integers(0, 8))):
        payments[f"p{i}"] = (draw(_entities), draw(_entities), draw(st.integers(0, 12)),
                             float(draw(st.integers(0, 500))) / 4, draw(st.sampled_from(["digital_goods", "x"])))
    labelled = {pid: draw(st.integers(0, 1)) for pid in payments if draw(st.booleans())}
    redelivered = draw(st.lists(st.sampled_from(sorted(logs)), max_size=5)) if logs else []
    bounds = draw(st.tuples(st.none() | st.integers(0, 13), st.none() | st.integers(0, 13)))
    return {"logs": logs, "payments": payments, "labelled": labelled, "redelivered": redelivered, "bounds": bounds}


UNIT = 20 * 60_000  # the scenarios' time unit: 13 units span more than the views' 2 h TTL


def reference(sc: dict[str, Any]) -> dict[str, tuple[list[float], tuple[bool, bool], int]]:
    """For each labelled payment in range: scan every log row of its entities, keep the newest with ts <= T,
    unless it is older than the view's TTL at T (stale: defaults, as serving does)."""
    since, until = sc["bounds"]
    out = {}
    for pid, (card, cust, t, amount, cat) in sc["payments"].items():
        if pid not in sc["labelled"] or (since is not None and t < since) or (until is not None and t >= until):
            continue
        vector: list[float] = []
        flags = []
        for view, entity, defaults in ((CARD_V, card, CARD_DEFAULTS), (USER_V, cust, USER_DEFAULTS)):
            best: tuple[int, str] | None = None
            for (v, e, ts, eid) in sc["logs"]:
                if v == view and e == entity and ts <= t and (best is None or (ts, eid) > best):
                    best = (ts, eid)
            if best is not None and (t - best[0]) * UNIT > (CARD if view == CARD_V else USER).ttl_ms:
                best = None
            vector += defaults if best is None else sc["logs"][(view, entity, *best)]
            flags.append(best is None)
        out[pid] = (vector + request_features(amount, cat), (flags[0], flags[1]), sc["labelled"][pid])
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_matches_brute_force_reference(ch: ClickHouse, sc: dict[str, Any]) -> None:
    for table in ("feature_log", "silver_payments", "silver_labels"):
        ch.command(f"TRUNCATE TABLE {table}")
    log(ch, [(v, e, eid, T0 + ts * UNIT, vals) for (v, e, ts, eid), vals in sc["logs"].items()])
    log(ch, [(v, e, eid, T0 + ts * UNIT, sc["logs"][(v, e, ts, eid)]) for (v, e, ts, eid) in sc["redelivered"]])
    pay(ch, [(pid, card, cust, T0 + t * UNIT, amount, cat)
             for pid, (card, cust, t, amount, cat) in sc["payments"].items()])
    label(ch, [(pid, y, T0 + sc["payments"][pid][2] * UNIT, T0 + DAY) for pid, y in sc["labelled"].items()])
    since, until = sc["bounds"]

    got = training_set(ch, since_ms=None if since is None else T0 + since * UNIT,
                       until_ms=None if until is None else T0 + until * UNIT)

    want = reference(sc)
    assert sorted(got.event_ids) == sorted(want)
    order = sorted(want, key=lambda pid: (sc["payments"][pid][2], pid))
    assert list(got.event_ids) == order
    for i, pid in enumerate(got.event_ids):
        vector, flags, y = want[pid]
        np.testing.assert_array_equal(got.X[i], np.asarray(vector, dtype=np.float32), err_msg=pid)
        assert tuple(got.defaulted[i]) == flags and got.y[i] == y
        assert got.event_ts[i] == T0 + sc["payments"][pid][2] * UNIT


# ---------------------------------------------------------------------------------------------
# lineage


def test_content_hash_is_stable_and_follows_the_values(adversarial: ClickHouse) -> None:
    first, again = training_set(adversarial), training_set(adversarial)
    assert first.sha256 == again.sha256 and len(first.sha256) == 64

    log(adversarial, [(CARD_V, "c1", "e-1", T - 1, vec(1))])  # a re-delivery changes nothing
    assert training_set(adversarial).sha256 == first.sha256

    log(adversarial, [(CARD_V, "c2", "f-half", T - 1, [*vec(20)[:4], 99.0])])  # a newer row (greater id) at T - 1
    changed = training_set(adversarial)
    assert changed.sha256 != first.sha256
    assert changed.X[row_of(changed, "p2"), 4] == 99.0

    log(adversarial, [(CARD_V, "c3", "g0", T, vec(32))])  # the same log row re-written: the last write wins
    rewritten = training_set(adversarial)
    np.testing.assert_array_equal(rewritten.X[row_of(rewritten, "p3"), :5], np.asarray(vec(32), dtype=np.float32))
    assert rewritten.sha256 != changed.sha256
    changed = rewritten

    label(adversarial, [("p2", 1, T, T + 40 * DAY)])  # a corrected label
    assert training_set(adversarial).sha256 != changed.sha256


# ---------------------------------------------------------------------------------------------
# the command line


def _weir(argv: list[str]) -> argparse.Namespace:
    return parser().parse_args(argv)  # the `weir` command itself


def test_cli_writes_csv(adversarial: ClickHouse, clickhouse_client: Any, chdb_path: Path, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "endpoints.json").write_text(json.dumps({"clickhouse_dsn": f"chdb://{chdb_path}"}))
    monkeypatch.setenv("WEIR_DATA_DIR", str(data_dir))
    out = tmp_path / "out" / "ts.csv"
    args = _weir(["features", "training-set", "--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T03:00:00",
                  "--out", str(out), "--database", clickhouse_client.database])

    assert args.handler(args) == 0

    with out.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == [*FEATURE_NAMES, "label", "event_id", "event_ts"]
    assert len(rows) == 1 + 5
    expected = training_set(adversarial, since_ms=T0, until_ms=T0 + 3 * HOUR)
    by_id = {r[-2]: r for r in rows[1:]}
    for i, pid in enumerate(expected.event_ids):
        r = by_id[pid]
        np.testing.assert_array_equal(np.asarray(r[:len(FEATURE_NAMES)], dtype=np.float32), expected.X[i])
        assert int(r[len(FEATURE_NAMES)]) == expected.y[i] and r[-1] == "2026-01-01T01:00:00.000Z"
    printed = capsys.readouterr().out
    assert "rows: 5" in printed and expected.sha256 in printed and str(out) in printed


def test_cli_writes_parquet_and_defaults(adversarial: ClickHouse, clickhouse_client: Any, chdb_path: Path,
                                         tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "ts.parquet"
    args = _weir(["features", "training-set", "--clickhouse", f"chdb://{chdb_path}",
                  "--database", clickhouse_client.database, "--out", str(out)])
    assert args.handler(args) == 0
    table = pq.read_table(out)
    assert table.column_names == [*FEATURE_NAMES, "label", "event_id", "event_ts"]
    assert table.num_rows == 7
    assert table.schema.metadata[b"weir.sha256"].decode() == training_set(adversarial).sha256


def test_cli_without_clickhouse_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WEIR_DATA_DIR", str(tmp_path))
    args = _weir(["features", "training-set"])
    assert args.handler(args) == 1
    assert "pass --clickhouse" in capsys.readouterr().err
    args = _weir(["features", "training-set", "--clickhouse", "chdb://x", "--since", "yesterday"])
    assert args.handler(args) == 1
    assert "not an ISO 8601 time" in capsys.readouterr().err
