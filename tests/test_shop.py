"""The reference shop scenario: determinism, ordering, schema validity, designed rates and patterns,
and (when the embedded services are available) the driver against real Postgres and Kafka."""

from __future__ import annotations

import collections
import itertools
import math
import re
import statistics
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from streams.codec import AvroCodec
from examples.fraud_shop.simulator import PATTERNS, Click, Row, ShopConfig, ShopEvent, ShopSimulator

N = 30_000
CDC_TABLES = ("customers", "merchants", "orders", "payments", "payment_labels")


@pytest.fixture(scope="module")
def run() -> tuple[ShopSimulator, list[ShopEvent]]:
    sim = ShopSimulator()
    return sim, list(sim.events(N))


def timed(events: list[ShopEvent], n_ref: int) -> list[ShopEvent]:
    return events[n_ref:]


def n_reference(cfg: ShopConfig) -> int:
    return cfg.n_customers + cfg.n_merchants


def payments(events: list[ShopEvent]) -> list[Row]:
    return [e for e in events if isinstance(e, Row) and e.table == "payments" and e.op == "insert"]


def fingerprint(events: Iterator[ShopEvent]) -> list[tuple[object, ...]]:
    return [(type(e).__name__, e.ts, repr(e.record) if isinstance(e, Click) else repr(e.row)) for e in events]


# ---- determinism and shape ------------------------------------------------------------------


def test_same_seed_same_events_different_seed_different() -> None:
    cfg = ShopConfig(n_customers=200, n_merchants=20)
    a = fingerprint(ShopSimulator(cfg).events(3000))
    b = fingerprint(ShopSimulator(cfg).events(3000))
    sim = ShopSimulator(cfg)
    c = fingerprint(sim.events(3000))
    c_again = fingerprint(sim.events(3000))  # each call restarts the world
    d = fingerprint(ShopSimulator(ShopConfig(seed=8, n_customers=200, n_merchants=20)).events(3000))
    assert a == b == c == c_again
    assert a != d


def test_counts_reference_and_flush_contract(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    sim, events = run
    cfg = sim.config
    ref = events[: n_reference(cfg)]
    assert [e.table for e in ref if isinstance(e, Row)] == ["customers"] * cfg.n_customers + [
        "merchants"
    ] * cfg.n_merchants
    bare = list(ShopSimulator(cfg).events(N, reference=False, flush_labels=False))
    assert len(bare) == N
    flushed = events[n_reference(cfg) + N :]
    assert flushed and all(isinstance(e, Row) and e.table in ("payment_labels", "payments") for e in flushed)
    assert all(isinstance(e, Row) and (e.op == "update") == (e.table == "payments") for e in flushed)


def test_event_time_is_non_decreasing_and_tz_aware(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    sim, events = run
    ts = [e.ts for e in events]
    assert all(t.tzinfo is not None for t in ts)
    assert all(a <= b for a, b in itertools.pairwise(ts))
    assert ts[0] == sim.config.start


def test_clock_runs_about_an_hour_per_20k_events(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    sim, events = run
    body = timed(events, n_reference(sim.config))[:N]
    hours = (body[-1].ts - body[0].ts).total_seconds() / 3600
    assert 0.7 * N / 20_000 < hours < 1.3 * N / 20_000


def test_every_click_and_row_encodes_and_decodes(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    _, events = run
    clicks = AvroCodec("clickstream.events")
    cdc = {t: AvroCodec(f"cdc.{t}") for t in CDC_TABLES}
    source = {"version": "2", "connector": "postgresql", "name": "weir", "ts_ms": 0, "db": "postgres",
              "schema": "public", "table": ""}
    ids: set[str] = set()
    for e in events:
        if isinstance(e, Click):
            r = e.record
            assert r["event_id"] not in ids
            ids.add(r["event_id"])
            back = clicks.decode(clicks.encode(r))
            assert back["ts"] == r["ts"] and back["event_id"] == r["event_id"]
            assert (r["amount"] is not None) == (r["event_type"] == "checkout")
        else:
            # Debezium maps numeric -> double and timestamptz -> ZonedTimestamp strings.
            after = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in e.row.items()}
            env = {"before": None, "after": after, "source": {**source, "table": e.table}, "op": "c", "ts_ms": 0}
            assert cdc[e.table].decode(cdc[e.table].encode(env))["after"] == after


def test_users_and_cards_refer_to_customers(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    _, events = run
    customers = {e.row["customer_id"] for e in events if isinstance(e, Row) and e.table == "customers"}
    assert {e.record["user_id"] for e in events if isinstance(e, Click)} <= customers
    for p in payments(events):
        assert p.row["customer_id"] in customers
        assert p.row["card_id"].startswith("card-" + p.row["customer_id"][5:])


def test_ddl_columns_are_the_cdc_after_records() -> None:
    sql = (Path(__file__).parent.parent / "examples/fraud_shop/shop.sql").read_text()
    for table in CDC_TABLES:
        block = re.search(rf"CREATE TABLE IF NOT EXISTS {table} \((.*?)\n\);", sql, re.DOTALL)
        assert block is not None
        cols = [line.split()[0] for line in block.group(1).strip().splitlines()]
        value = AvroCodec(f"cdc.{table}").subject.raw["fields"][0]["type"][1]
        assert cols == [f["name"] for f in value["fields"]]


# ---- designed rates ---------------------------------------------------------------------------


def test_fraud_rate_and_payment_share(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    sim, events = run
    body = timed(events, n_reference(sim.config))[:N]
    pays = payments(body)
    fraud = sum(bool(p.is_fraud) for p in pays) / len(pays)
    assert 0.03 <= fraud <= 0.06
    assert 0.10 <= len(pays) / N <= 0.20
    legit = [p for p in pays if p.pattern == "legit"]
    assert 0.60 <= len(legit) / len(pays) <= 0.75
    assert {p.pattern for p in pays} == set(PATTERNS)
    assert all(p.is_fraud == (p.pattern in ("card_testing", "account_takeover", "digital_cashout")) for p in pays)
    assert sim.truth == {p.row["payment_id"]: (bool(p.is_fraud), p.pattern) for p in pays}


def test_drift_pattern_only_after_drift_and_a_major_share_of_fraud(
    run: tuple[ShopSimulator, list[ShopEvent]],
) -> None:
    sim, events = run
    body = timed(events, n_reference(sim.config))
    cut = int(sim.config.drift_at * N)
    assert not [p for p in payments(body[:cut]) if p.pattern == "digital_cashout"]
    post_fraud = [p for p in payments(body[cut:N]) if p.is_fraud]
    share = sum(p.pattern == "digital_cashout" for p in post_fraud) / len(post_fraud)
    assert 0.4 <= share <= 0.85
    assert sim.drift_started_at is not None and body[cut - 1].ts <= sim.drift_started_at
    for p in payments(body):
        if p.pattern == "digital_cashout":
            assert p.row["merchant_category"] == "digital_goods" and 300 <= p.row["amount"] <= 600


def test_every_payment_gets_one_label_later_with_the_stated_delay(
    run: tuple[ShopSimulator, list[ShopEvent]],
) -> None:
    sim, events = run
    cfg = sim.config
    pays = {p.row["payment_id"]: p for p in payments(events)}
    labels = [e for e in events if isinstance(e, Row) and e.table == "payment_labels"]
    assert collections.Counter(lb.row["payment_id"] for lb in labels) == collections.Counter(set(pays))
    for lb in labels:
        p = pays[lb.row["payment_id"]]
        delay = (lb.ts - p.ts).total_seconds()
        lo, hi = cfg.fraud_label_delay_s if p.is_fraud else cfg.legit_label_delay_s
        assert lo - 0.001 <= delay <= hi
        assert lb.row["is_fraud"] == p.is_fraud
        assert lb.row["reason"] == ("chargeback" if p.is_fraud else "settled")
        assert lb.row["payment_created_at"] == p.row["created_at"] and lb.row["labelled_at"] == lb.ts


def test_captures_update_the_same_payment_later(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    _, events = run
    pays = {p.row["payment_id"]: p for p in payments(events)}
    updates = [e for e in events if isinstance(e, Row) and e.table == "payments" and e.op == "update"]
    assert 0.6 < len(updates) / len(pays) < 0.95
    for u in updates:
        p = pays[u.row["payment_id"]]
        assert u.ts > p.ts and u.row == {**p.row, "status": "captured"}


# ---- the patterns show in the features -------------------------------------------------------


def _card_count_1m(events: list[ShopEvent]) -> dict[str, int]:
    """payment_id -> payments by its card in the last minute (inclusive), a batch reference."""
    by_card: dict[str, list[datetime]] = collections.defaultdict(list)
    out = {}
    for p in payments(events):
        times = by_card[p.row["card_id"]]
        times.append(p.ts)
        out[p.row["payment_id"]] = sum(1 for t in times if t > p.ts - timedelta(minutes=1))
    return out


def _user_clicks_30m(events: list[ShopEvent]) -> dict[str, int]:
    clicks: dict[str, list[datetime]] = collections.defaultdict(list)
    out = {}
    for e in events:
        if isinstance(e, Click):
            clicks[e.record["user_id"]].append(e.ts)
        elif e.table == "payments" and e.op == "insert":
            times = clicks[e.row["customer_id"]]
            out[e.row["payment_id"]] = sum(1 for t in times if t > e.ts - timedelta(minutes=30))
    return out


def _by_pattern(
    events: list[ShopEvent], values: dict[str, float], stat: Callable[[list[float]], float] = statistics.fmean
) -> dict[str, float]:
    acc: dict[str, list[float]] = collections.defaultdict(list)
    for p in payments(events):
        acc[p.pattern or "legit"].append(values[p.row["payment_id"]])
    return {k: stat(v) for k, v in acc.items()}


def test_patterns_are_visible_in_the_features(run: tuple[ShopSimulator, list[ShopEvent]]) -> None:
    _, events = run
    count_1m = _by_pattern(events, {k: float(v) for k, v in _card_count_1m(events).items()})
    assert count_1m["card_testing"] > 3 * count_1m["legit"]
    clicks = _by_pattern(events, {k: float(v) for k, v in _user_clicks_30m(events).items()}, statistics.median)
    # Sessionless patterns show only the user's background browsing (see the module docstring).
    sessionless = max(clicks["renewal"], clicks["card_testing"], clicks["digital_cashout"])
    assert clicks["legit"] > 3 * max(sessionless, 1) and clicks["account_takeover"] > 3 * max(sessionless, 1)
    amount = _by_pattern(events, {p.row["payment_id"]: math.log(p.row["amount"]) for p in payments(events)})
    assert amount["card_testing"] < math.log(5) < math.log(20) < amount["legit"] < math.log(300)
    assert amount["renewal"] < math.log(300) <= amount["digital_cashout"]


def test_account_takeover_logs_in_from_a_new_device_and_pays_with_it(
    run: tuple[ShopSimulator, list[ShopEvent]],
) -> None:
    _, events = run
    first_seen: dict[tuple[str, str | None], Click] = {}  # (user, device) -> first click with it
    n_ato = 0
    for e in events:
        if isinstance(e, Click):
            first_seen.setdefault((e.record["user_id"], e.record["device_id"]), e)
        elif e.table == "payments" and e.op == "insert" and e.pattern == "account_takeover":
            n_ato += 1
            first = first_seen[(e.row["customer_id"], e.row["device_id"])]
            assert first.record["event_type"] == "login"
            assert e.ts - timedelta(hours=1) < first.ts < e.ts
    assert n_ato > 0


# ---- the driver against real Postgres and Kafka -----------------------------------------------


def test_driver_writes_rows_to_postgres_and_clicks_to_kafka(tmp_path: Path) -> None:
    pg_mod = pytest.importorskip("streams.embedded.postgres")
    kafka_mod = pytest.importorskip("streams.embedded.kafka")
    import psycopg
    from confluent_kafka import Consumer, TopicPartition

    from examples.fraud_shop.driver import ShopDriver

    cfg = ShopConfig(n_customers=100, n_merchants=10)
    sim = ShopSimulator(cfg)
    events = list(sim.events(1000))
    want = collections.Counter(e.table for e in events if isinstance(e, Row) and e.op == "insert")
    want_clicks = sum(isinstance(e, Click) for e in events)

    pg = pg_mod.EmbeddedPostgres(tmp_path / "pg")
    kafka = kafka_mod.EmbeddedKafka(tmp_path / "kafka")
    pg.start()
    kafka.start()
    try:
        driver = ShopDriver(pg.dsn, kafka.bootstrap, partitions=4)
        driver.prepare()
        driver.prepare()  # idempotent
        seen: list[int] = []
        stats = driver.run(events, progress=seen.append)
        assert stats.clicks == want_clicks and stats.payments == want["payments"]
        assert stats.labels == want["payment_labels"] and stats.rows + stats.clicks == len(events)
        assert stats.fraud_payments == sum(f for f, _ in sim.truth.values())
        assert driver.truth == sim.truth and seen[-1] == len(events)
        with psycopg.connect(pg.dsn) as conn:
            for table, n in want.items():
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (n,)
            captured = conn.execute("SELECT count(*) FROM payments WHERE status = 'captured'").fetchone()
            assert captured == (stats.payment_updates,)

        # Preparing again beside a live writer takes no exclusive lock (ALTER TABLE on every start waited
        # for writers, and once deadlocked one)
        with psycopg.connect(pg.dsn) as writer:
            writer.execute("UPDATE payments SET status = status WHERE payment_id = "
                           "(SELECT min(payment_id) FROM payments)")  # an open transaction holding its lock
            prepared = threading.Event()
            threading.Thread(target=lambda: (driver.prepare(), prepared.set()), daemon=True).start()
            assert prepared.wait(15), "prepare() waited for a live writer's lock"
            writer.rollback()

        # Replaying the same seed is idempotent; a set stop event ends the run after one chunk.
        stop = threading.Event()
        stop.set()
        again = ShopDriver(pg.dsn, kafka.bootstrap, clicks_topic="clickstream.replay").run(
            ShopSimulator(cfg).events(1000), stop=stop
        )
        assert again.events == 256
        with psycopg.connect(pg.dsn) as conn:
            for table, n in want.items():
                assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (n,)

        codec = AvroCodec("clickstream.events")
        consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "test-shop",
                             "enable.auto.commit": False})
        consumer.assign([TopicPartition("clickstream.events", p, 0) for p in range(4)])
        got = []
        for _ in range(200):
            for msg in consumer.consume(1000, timeout=0.2):
                assert msg.error() is None
                rec = codec.decode(msg.value())
                assert msg.key() == rec["user_id"].encode()
                got.append(rec["event_id"])
            if len(got) >= want_clicks:
                break
        consumer.close()
        assert sorted(got) == sorted(e.record["event_id"] for e in events if isinstance(e, Click))
    finally:
        kafka.stop()
        pg.stop()


def test_driver_rejects_a_bad_rate() -> None:
    from examples.fraud_shop.driver import ShopDriver

    with pytest.raises(ValueError):
        ShopDriver("postgresql://x", "127.0.0.1:1", rate=0)
