"""Ingest's batch logic, without a broker: validation reasons, dedup, re-keying."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from streams import topics as T
from streams.base import Message, Reason
from streams.codec import AvroCodec
from streams.stages.ingest import IngestStage

TS = datetime(2026, 1, 1, tzinfo=UTC)


def click(event_id: str, user: str = "u1", **over: Any) -> bytes:
    rec = {"event_id": event_id, "event_type": "page_view", "user_id": user, "session_id": "s", "ts": TS,
           "device_id": None, "ip": None, "page": "/", "query": None, "product_id": None, "amount": None} | over
    return AvroCodec(T.CLICKS).encode(rec)


def envelope(table: str, after: dict[str, Any] | None, op: str = "c", before: dict[str, Any] | None = None) -> bytes:
    source = {"version": "t", "connector": "postgresql", "name": "weir", "ts_ms": 0, "snapshot": "false",
              "db": "postgres", "sequence": None, "schema": "public", "table": table, "txId": 1, "lsn": 1,
              "xmin": None}
    return AvroCodec(f"cdc.{table}").encode({"before": before, "after": after, "source": source, "op": op,
                                              "ts_ms": 0})


def payment(pid: str, card: str = "c1", amount: float = 10.0) -> dict[str, Any]:
    return {"payment_id": pid, "order_id": "o", "customer_id": "u1", "card_id": card, "merchant_id": "m",
            "merchant_category": "retail", "amount": amount, "currency": "EUR", "status": "authorized",
            "device_id": None, "created_at": "2026-01-01T00:00:00.250000Z"}


def msgs(*pairs: tuple[str, bytes | None]) -> list[Message]:
    return [Message(topic, 0, i, None, value, 1_000) for i, (topic, value) in enumerate(pairs)]


def test_routes_valid_records_and_rejects_bad_ones_with_reasons() -> None:
    stage = IngestStage(partitions=4)
    label = {"payment_id": "p1", "is_fraud": True, "reason": "chargeback",
             "payment_created_at": "2026-01-01T00:00:00Z", "labelled_at": "2026-01-01T00:05:00+00:00"}
    result = stage.handle(msgs(
        (T.CLICKS, click("e1")),
        (T.CLICKS, click("e1")),  # duplicate: dropped
        (T.CLICKS, click("e2", user="")),
        (T.CLICKS, b"garbage"),
        (T.CDC_PAYMENTS, envelope("payments", payment("p1"))),
        (T.CDC_PAYMENTS, envelope("payments", payment("p2", amount=-5.0))),
        (T.CDC_PAYMENTS, envelope("payments", None, op="d", before=payment("p3"))),
        (T.CDC_PAYMENTS, None),  # tombstone after the delete
        (T.CDC_LABELS, envelope("payment_labels", label)),
    ))
    assert [r.error.reason for r in result.rejected] == [Reason.MISSING_FIELD, Reason.UNDECODABLE, Reason.OUT_OF_RANGE]
    assert stage.duplicates == 1
    by_topic: dict[str, list[Any]] = {}
    for p in result.produce:
        by_topic.setdefault(p.topic, []).append(p)
    (clicks,) = by_topic[T.I_CLICKS]
    assert [c["event_id"] for c in AvroCodec(T.I_CLICKS).decode(clicks.value)["items"]] == ["e1"]
    (pays,) = by_topic[T.I_PAYMENTS]
    items = AvroCodec(T.I_PAYMENTS).decode(pays.value)["items"]
    assert [(p["payment_id"], p["ts_ms"], p["source_ms"]) for p in items] == [("p1", 1767225600250, 1_000)]
    assert pays.partition == T.partition_for("c1", 4)
    (lab,) = by_topic[T.LABELS]
    decoded = AvroCodec(T.LABELS).decode(lab.value)
    assert decoded["is_fraud"] is True and decoded["payment_id"] == "p1" and lab.key == b"p1"


def test_cdc_resend_is_deduplicated() -> None:
    stage = IngestStage(partitions=4)
    first = stage.handle(msgs((T.CDC_PAYMENTS, envelope("payments", payment("p1")))))
    again = stage.handle(msgs((T.CDC_PAYMENTS, envelope("payments", payment("p1")))))
    assert len(first.produce) == 1 and again.produce == [] and stage.duplicates == 1
