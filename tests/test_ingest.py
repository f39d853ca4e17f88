"""Ingest's batch logic: validation reasons, event time, pseudonymization, dedup (in real Redis), re-keying.

Mostly on the fraud shop (``examples/fraud_shop``); the last tests declare a tiny project of their own, to see
that nothing in ingest is specific to the shop.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.fraud_shop.project import project as SHOP
from streams import schemas
from streams import topics as T
from streams.base import Message, Reason
from streams.codec import AvroCodec
from streams.dedup import MemoryDedup, RedisDedup
from streams.event_time import EventTimeGuard
from streams.project import Project, Range, Source
from streams.project.contracts import silver_topic, use_project
from streams.project.load import validate
from streams.pseudonymize import Pseudonymizer
from streams.stack import Endpoints
from streams.stages.ingest import IngestStage

TS = datetime(2026, 1, 1, tzinfo=UTC)
NOW = TS.timestamp() + 3600  # the injected wall clock: an hour after TS
KEY = b"test-key"
CLICKS, CDC_PAYMENTS, CDC_LABELS = "clickstream.events", "cdc.payments", "cdc.payment_labels"
SILVER_CLICKS, SILVER_PAYMENTS, SILVER_LABELS = (
    "weir.fraud_shop.silver.clicks", "weir.fraud_shop.silver.payments", "weir.fraud_shop.silver.labels")


def stage_with(dedup: Any = None, project: Project = SHOP, **guard: int) -> IngestStage:
    limits = {"max_future_ms": 300_000, "max_age_ms": 86_400_000, "allowed_lateness_ms": 60_000} | guard
    return IngestStage(project, 4, dedup=dedup or MemoryDedup(3_600_000, clock=lambda: NOW),
                       pseudonymizer=Pseudonymizer(KEY), event_time=EventTimeGuard(**limits, clock=lambda: NOW))


def click(event_id: str, user: str = "u1", ts: datetime = TS, **over: Any) -> bytes:
    rec = {"event_id": event_id, "event_type": "page_view", "user_id": user, "session_id": "s", "ts": ts,
           "device_id": None, "ip": None, "page": "/", "query": None, "product_id": None, "amount": None} | over
    return AvroCodec(CLICKS).encode(rec)


def envelope(table: str, after: dict[str, Any] | None, op: str = "c", before: dict[str, Any] | None = None,
             lsn: int = 1) -> bytes:
    source = {"version": "t", "connector": "postgresql", "name": "weir", "ts_ms": 0, "snapshot": "false",
              "db": "postgres", "sequence": None, "schema": "public", "table": table, "txId": 1, "lsn": lsn,
              "xmin": None}
    return AvroCodec(f"cdc.{table}").encode({"before": before, "after": after, "source": source, "op": op,
                                              "ts_ms": 0})


def payment(pid: str, card: str = "c1", amount: float = 10.0, created: str = "2026-01-01T00:00:00.250000Z",
            device: str | None = None) -> dict[str, Any]:
    return {"payment_id": pid, "order_id": "o", "customer_id": "u1", "card_id": card, "merchant_id": "m",
            "merchant_category": "retail", "amount": amount, "currency": "EUR", "status": "authorized",
            "device_id": device, "created_at": created}


def msgs(*pairs: tuple[str, bytes | None], partition: int = 0, first_offset: int = 0) -> list[Message]:
    return [Message(topic, partition, first_offset + i, f"k{i}".encode(), value, 1_000)
            for i, (topic, value) in enumerate(pairs)]


def produced(result: Any, topic: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in result.produce:
        if p.topic == topic:
            rec = AvroCodec(topic).decode(p.value)
            out.extend(rec.get("items", [rec]))
    return out


def test_routes_valid_records_and_rejects_bad_ones_with_reasons() -> None:
    stage = stage_with()
    label = {"payment_id": "p1", "is_fraud": True, "reason": "chargeback",
             "payment_created_at": "2026-01-01T00:00:00Z", "labelled_at": "2026-01-01T00:05:00+00:00"}
    result = stage.handle(msgs(
        (CLICKS, click("e1")),
        (CLICKS, click("e1")),  # duplicate
        (CLICKS, click("e2", user="")),
        (CLICKS, b"garbage"),
        (CDC_PAYMENTS, envelope("payments", payment("p1"))),
        (CDC_PAYMENTS, envelope("payments", payment("p2", amount=-5.0), lsn=2)),
        (CDC_PAYMENTS, envelope("payments", None, op="d", before=payment("p3"), lsn=3)),
        (CDC_PAYMENTS, None),  # tombstone after the delete
        (CDC_LABELS, envelope("payment_labels", label)),
    ))
    assert [r.error.reason for r in result.rejected] == [
        Reason.MISSING_FIELD, Reason.UNDECODABLE, Reason.OUT_OF_RANGE, Reason.DUPLICATE]
    assert "'user_id'" in result.rejected[0].error.detail and "amount" in result.rejected[2].error.detail
    assert stage.counts == {"accepted": 3, "skipped": 2, "missing_field": 1, "undecodable": 1, "out_of_range": 1,
                            "duplicate": 1}
    assert [c["event_id"] for c in produced(result, SILVER_CLICKS)] == ["e1"]
    (pays,) = [p for p in result.produce if p.topic == SILVER_PAYMENTS]
    items = produced(result, SILVER_PAYMENTS)
    assert [(p["payment_id"], p["ts_ms"], p["source_ms"]) for p in items] == [("p1", 1767225600250, 1_000)]
    assert pays.partition == T.partition_for("c1", 4)
    (lab,) = [p for p in result.produce if p.topic == SILVER_LABELS]  # labels are silver events too
    (label_event,) = produced(result, SILVER_LABELS)
    assert label_event["is_fraud"] is True and label_event["event_id"] == label_event["payment_id"] == "p1"
    assert label_event["ts_ms"] == 1767225600000 + 300_000  # labelled_at
    assert lab.partition == T.partition_for("p1", 4)  # keyed by the payment id


def test_a_nan_value_lies_within_no_range() -> None:
    """Debezium writes a numeric 'NaN' column as NaN (decimal.handling.mode=double): refused, never scored."""
    result = stage_with().handle(msgs((CDC_PAYMENTS, envelope("payments", payment("p1", amount=float("nan")))),
                                      (CLICKS, click("e1", amount=float("nan")))))
    assert [(r.error.reason, "amount nan" in r.error.detail) for r in result.rejected] == [
        (Reason.OUT_OF_RANGE, True), (Reason.OUT_OF_RANGE, True)]
    assert result.produce == []


def test_cdc_resend_is_deduplicated_by_source_position() -> None:
    stage = stage_with()
    first = stage.handle(msgs((CDC_PAYMENTS, envelope("payments", payment("p1")))))
    again = stage.handle(msgs((CDC_PAYMENTS, envelope("payments", payment("p1"))), first_offset=7))
    assert len(first.produce) == 1 and again.produce == [] and stage.duplicates == 1
    assert again.rejected[0].error.reason is Reason.DUPLICATE


def test_redelivery_of_the_same_message_is_processed_again() -> None:
    """After a crash before the commit, the same offsets come back: they are not duplicates."""
    stage = stage_with()
    batch = msgs((CLICKS, click("e1")), (CDC_PAYMENTS, envelope("payments", payment("p1"))))
    assert len(stage.handle(batch).produce) == 2
    again = stage.handle(batch)
    assert len(again.produce) == 2 and again.rejected == []


@pytest.mark.parametrize(("ts", "reason"), [
    (TS + timedelta(hours=1, minutes=6), Reason.FUTURE_TIMESTAMP),  # 6 min ahead of the clock, 5 allowed
    (TS - timedelta(days=2), Reason.PAST_TIMESTAMP),
])
def test_implausible_event_times_are_refused(ts: datetime, reason: Reason) -> None:
    result = stage_with().handle(msgs((CLICKS, click("e1", ts=ts))))
    assert [r.error.reason for r in result.rejected] == [reason]


def test_late_events_are_refused_per_partition_but_snapshots_are_history() -> None:
    stage = stage_with()
    newest, late = TS + timedelta(minutes=10), TS + timedelta(minutes=8)  # 2 min behind, 1 min allowed
    # the watermark follows the third newest event (streams.event_time): three at `newest` confirm it
    result = stage.handle(msgs(*[(CLICKS, click(f"e1{c}", ts=newest)) for c in "abc"], (CLICKS, click("e2", ts=late)),
                               (CLICKS, click("e3", ts=late + timedelta(minutes=1, seconds=30)))))
    assert [(r.message.offset, r.error.reason) for r in result.rejected] == [(3, Reason.LATE)]
    assert "allowed lateness 60000 ms" in result.rejected[0].error.detail
    other = stage.handle(msgs((CLICKS, click("e4", ts=late)), partition=1))
    assert other.rejected == []  # another partition has its own watermark
    ancient = payment("p9", created="2020-01-01T00:00:00Z")
    snap = stage.handle(msgs((CDC_PAYMENTS, envelope("payments", ancient, op="r"))))
    assert snap.rejected == [] and len(produced(snap, SILVER_PAYMENTS)) == 1


def test_pii_fields_leave_ingest_as_tokens() -> None:
    stage = stage_with()
    result = stage.handle(msgs((CLICKS, click("e1", device_id="dev-RAW-1", ip="203.0.113.9")),
                               (CDC_PAYMENTS, envelope("payments", payment("p1", device="dev-RAW-1")))))
    (c,), (p,) = produced(result, SILVER_CLICKS), produced(result, SILVER_PAYMENTS)
    token = Pseudonymizer(KEY).token("dev-RAW-1")
    assert c["device_id"] == p["device_id"] == token != "dev-RAW-1"  # one token per value: joins still work
    assert all(b"RAW" not in (r.value or b"") and b"203.0.113.9" not in (r.value or b"") for r in result.produce)


@pytest.fixture
def redis_client(endpoints: Endpoints) -> Iterator[Any]:
    client = redis.Redis.from_url(endpoints.redis_url)
    yield client
    client.close()


def test_dedup_survives_a_restart(redis_client: Any) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    before = stage_with(RedisDedup(redis_client, 60_000, prefix=prefix))
    batch = msgs((CLICKS, click("e1")), (CLICKS, click("e2")))
    assert len(produced(before.handle(batch), SILVER_CLICKS)) == 2
    after = stage_with(RedisDedup(redis_client, 60_000, prefix=prefix))  # a new process: no memory of its own
    resent = after.handle(msgs((CLICKS, click("e1")), first_offset=100))
    assert [r.error.reason for r in resent.rejected] == [Reason.DUPLICATE]
    assert len(produced(after.handle(batch), SILVER_CLICKS)) == 2  # re-delivery of the uncommitted batch
    assert 0 < redis_client.pttl(prefix + "clickstream.events|e1") <= 60_000


# --- property: whatever bytes arrive, ingest neither crashes nor loses a message --------------------------------

def _valid(draw: st.DrawFn) -> tuple[str, bytes | None]:
    i = draw(st.integers(0, 30))
    kind = draw(st.sampled_from(["click", "payment", "label", "tombstone"]))
    if kind == "click":
        ts = TS + timedelta(seconds=draw(st.integers(-4000, 4000)))
        return CLICKS, click(f"e{i}", user=draw(st.sampled_from(["u1", "u2", ""])), ts=ts,
                               amount=draw(st.none() | st.floats(-10, 2e6) | st.just(float("nan"))))
    if kind == "payment":
        amount = draw(st.floats(-10, 2e6) | st.just(float("nan")))
        return CDC_PAYMENTS, envelope("payments", payment(f"p{i}", amount=amount), lsn=i,
                                        op=draw(st.sampled_from(["c", "r", "u"])))
    if kind == "label":
        label = {"payment_id": f"p{i}", "is_fraud": draw(st.booleans()), "reason": None,
                 "payment_created_at": "2026-01-01T00:00:00Z", "labelled_at": draw(st.sampled_from(
                     ["2026-01-01T00:05:00+00:00", "2026-01-01T00:05:00", "not a time"]))}
        return CDC_LABELS, envelope("payment_labels", label, lsn=i)
    return CDC_PAYMENTS, None


@st.composite
def hostile_message(draw: st.DrawFn) -> tuple[str, bytes | None]:
    topic, value = _valid(draw)
    damage = draw(st.sampled_from(["none", "truncate", "flip", "random", "header"]))
    if value is None or damage == "none":
        return topic, value
    if damage == "truncate":
        return topic, value[:draw(st.integers(0, len(value) - 1))]
    if damage == "flip":
        pos, bit = draw(st.integers(0, len(value) - 1)), draw(st.integers(0, 7))
        return topic, value[:pos] + bytes([value[pos] ^ (1 << bit)]) + value[pos + 1:]
    if damage == "header":  # a valid body behind an unknown schema id
        return topic, b"\x00" + draw(st.binary(min_size=4, max_size=4)) + value[5:]
    return draw(st.sampled_from([CLICKS, CDC_PAYMENTS, CDC_LABELS])), draw(st.binary(max_size=64))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(hostile_message(), min_size=1, max_size=40))
def test_hostile_input_never_crashes_and_nothing_is_lost(redis_client: Any,
                                                        batch: list[tuple[str, bytes | None]]) -> None:
    stage = stage_with(RedisDedup(redis_client, 60_000, prefix=f"prop:{uuid.uuid4().hex}:"))
    result = stage.handle(msgs(*batch))
    out = sum(len(produced(result, t)) for t in (silver_topic(SHOP, src) for src in SHOP.sources))
    assert stage.counts["accepted"] == out
    assert stage.counts["accepted"] + stage.counts["skipped"] + len(result.rejected) == len(batch)
    assert all(r.error.reason in Reason for r in result.rejected)


# --- a project of the test's own: nothing in ingest is the shop's ---------------------------------------------

SENSOR_SCHEMA = {
    "type": "record", "name": "Reading", "namespace": "test.sensors", "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "sensor_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "celsius", "type": ["null", "double"], "default": None},
        {"name": "site", "type": ["null", "string"], "default": None},
        {"name": "note", "type": ["null", "string"], "default": None},
    ]}
SENSOR_TOPIC = "sensor.readings"


@pytest.fixture
def sensors(tmp_path: Path) -> Iterator[Project]:
    """A one-source project over a schema folder of its own, known to this process's catalog while the test runs."""
    (tmp_path / "schemas" / SENSOR_TOPIC).mkdir(parents=True)
    (tmp_path / "schemas" / SENSOR_TOPIC / "v1.avsc").write_text(json.dumps(SENSOR_SCHEMA))
    sensor = Source("sensor", SENSOR_TOPIC, event_id="reading_id", event_time="ts", keys=("sensor_id",),
                    fields=("sensor_id", "celsius", "site"), required=("site",),
                    ranges=(Range("celsius", -60.0, 150.0),))
    project = Project("sensors", tmp_path / "schemas", sources=(sensor,))
    assert validate(project) == []
    previous = schemas.set_catalog(None)  # a registry catalog (the session's stack) knows only what it registered
    use_project(project)
    try:
        yield project
    finally:
        use_project(SHOP)
        schemas.set_catalog(previous)


def reading(rid: str, sensor: str = "s-7", ts: datetime = TS, **over: Any) -> bytes:
    rec = {"reading_id": rid, "sensor_id": sensor, "ts": ts, "celsius": 21.5, "site": "plant-1", "note": "n"} | over
    return AvroCodec(SENSOR_TOPIC).encode(rec)


def test_a_project_of_its_own_is_validated_and_re_keyed_generically(sensors: Project) -> None:
    stage = stage_with(project=sensors)
    assert stage.topics == (SENSOR_TOPIC,)
    result = stage.handle(msgs(
        (SENSOR_TOPIC, reading("r1", celsius=400.0)),  # out of range
        (SENSOR_TOPIC, reading("r2", site=None)),  # a required field missing
        (SENSOR_TOPIC, reading("r3", site="")),  # ... or empty
        (SENSOR_TOPIC, reading("r4", sensor="s-7", ts=TS + timedelta(seconds=1))),
        (SENSOR_TOPIC, reading("r5", sensor="s-8", celsius=None)),  # a null passes the range (not required)
    ))
    assert [(r.message.offset, r.error.reason) for r in result.rejected] == [
        (0, Reason.OUT_OF_RANGE), (1, Reason.MISSING_FIELD), (2, Reason.MISSING_FIELD)]
    assert "celsius" in result.rejected[0].error.detail and "400" in result.rejected[0].error.detail
    assert all("'site'" in r.error.detail for r in result.rejected[1:])
    assert stage.counts == {"accepted": 2, "out_of_range": 1, "missing_field": 2}

    out = f"weir.{sensors.name}.silver.sensor"
    assert silver_topic(sensors, sensors.source("sensor")) == out and {p.topic for p in result.produce} == {out}
    for p in result.produce:  # one message per destination partition, each event in its key's partition
        assert all(p.partition == T.partition_for(i["sensor_id"], 4) for i in AvroCodec(out).decode(p.value)["items"])
    partitions = [p.partition for p in result.produce]
    assert len(partitions) == len(set(partitions)) and set(partitions) == {T.partition_for(s, 4) for s in ("s-7", "s-8")}
    got = sorted((i for p in result.produce for i in AvroCodec(out).decode(p.value)["items"]),
                 key=lambda i: i["event_id"])
    assert got == [
        {"event_id": "r4", "ts_ms": int(TS.timestamp() * 1000) + 1000, "source_ms": 1_000, "sensor_id": "s-7",
         "celsius": 21.5, "site": "plant-1"},  # the kept fields only: no "note"
        {"event_id": "r5", "ts_ms": int(TS.timestamp() * 1000), "source_ms": 1_000, "sensor_id": "s-8",
         "celsius": None, "site": "plant-1"},
    ]
    again = stage.handle(msgs((SENSOR_TOPIC, reading("r4")), first_offset=10))  # its own id is the dedup key
    assert [r.error.reason for r in again.rejected] == [Reason.DUPLICATE]


def test_two_sources_may_share_event_ids() -> None:
    """An order and its delivery carry the same order id: each is its source's event, neither a duplicate."""
    from examples.delivery_eta.project import project as delivery

    previous = schemas.set_catalog(None)
    use_project(delivery)
    try:
        stage = IngestStage(delivery, 4, dedup=MemoryDedup(3_600_000, clock=lambda: NOW),
                            pseudonymizer=Pseudonymizer(KEY),
                            event_time=EventTimeGuard(max_future_ms=300_000, max_age_ms=86_400_000,
                                                      allowed_lateness_ms=60_000, clock=lambda: NOW))
        order = {"order_id": "o1", "placed_at": TS, "restaurant_id": "r1", "customer_id": "c1", "zone_id": "z1",
                 "distance_km": 2.5, "items": 2, "basket_value": 20.0, "raining": False}
        done = {"order_id": "o1", "restaurant_id": "r1", "courier_id": "k1", "delivered_at": TS + timedelta(minutes=30),
                "minutes": 30.0}
        result = stage.handle(msgs(("delivery.orders", AvroCodec("delivery.orders").encode(order)),
                                   ("delivery.completed", AvroCodec("delivery.completed").encode(done))))
        assert result.rejected == [] and stage.counts == {"accepted": 2}
        again = stage.handle(msgs(("delivery.completed", AvroCodec("delivery.completed").encode(done)),
                                  first_offset=9))
        assert [r.error.reason for r in again.rejected] == [Reason.DUPLICATE]  # the same delivery, sent twice
    finally:
        use_project(SHOP)
        schemas.set_catalog(previous)
