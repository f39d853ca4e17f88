"""Ingest: decode and validate public input, drop duplicates, re-key into internal micro-batches.

Inputs: ``clickstream.events`` (one event per message) and the Debezium
topics ``cdc.payments`` and ``cdc.payment_labels``. Outputs: ``weir.clicks``
and ``weir.payments`` (Avro micro-batches, one message per destination
partition per batch, partitioned by user id / card id) and ``labels.fraud``
(public, one label per message). Refused records go to ``dlq.<topic>``.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from streams import topics as T
from streams.base import InvalidEvent, Message, Produce, Reason, Rejected, StepResult
from streams.codec import AvroCodec
from streams.dedup import Deduplicator

MAX_AMOUNT = 1_000_000.0


def iso_ms(value: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 timestamp with offset (Debezium ZonedTimestamp)."""
    try:
        dt = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(Reason.OUT_OF_RANGE, f"not an ISO-8601 timestamp: {value!r}") from exc
    if dt.tzinfo is None:
        raise InvalidEvent(Reason.OUT_OF_RANGE, "timestamp without a time zone")
    return int(dt.timestamp() * 1000)


def require(record: dict[str, Any], *names: str) -> None:
    for name in names:
        if record.get(name) in (None, ""):
            raise InvalidEvent(Reason.MISSING_FIELD, f"required field {name!r} is missing or empty")


def to_click(rec: dict[str, Any]) -> dict[str, Any]:
    require(rec, "event_id", "user_id", "session_id")
    amount = rec.get("amount")
    if amount is not None and not 0 <= amount <= MAX_AMOUNT:
        raise InvalidEvent(Reason.OUT_OF_RANGE, f"amount {amount} outside [0, {MAX_AMOUNT:g}]")
    return {
        "event_id": rec["event_id"], "event_type": rec["event_type"], "user_id": rec["user_id"],
        "session_id": rec["session_id"], "device_id": rec.get("device_id"),
        "ts_ms": int(rec["ts"].timestamp() * 1000), "amount": amount,
    }


def to_payment(row: dict[str, Any], source_ms: int) -> dict[str, Any]:
    require(row, "payment_id", "card_id", "customer_id", "merchant_id", "created_at")
    amount = row["amount"]
    if not 0 < amount <= MAX_AMOUNT:
        raise InvalidEvent(Reason.OUT_OF_RANGE, f"amount {amount} outside (0, {MAX_AMOUNT:g}]")
    return {
        "event_id": row["payment_id"], "payment_id": row["payment_id"], "card_id": row["card_id"],
        "customer_id": row["customer_id"], "merchant_id": row["merchant_id"],
        "merchant_category": row["merchant_category"], "amount": float(amount), "device_id": row.get("device_id"),
        "ts_ms": iso_ms(row["created_at"]), "source_ms": source_ms,
    }


def to_label(row: dict[str, Any]) -> dict[str, Any]:
    require(row, "payment_id", "payment_created_at", "labelled_at")
    return {
        "event_id": f"label:{row['payment_id']}", "payment_id": row["payment_id"], "is_fraud": bool(row["is_fraud"]),
        "payment_ts": iso_ms(row["payment_created_at"]), "label_ts": iso_ms(row["labelled_at"]),
    }


class IngestStage:
    """Validation, dedup and re-keying. Holds only the dedup window as state."""

    step_id = "ingest"
    topics = (T.CLICKS, T.CDC_PAYMENTS, T.CDC_LABELS)

    def __init__(self, partitions: int, dedup_horizon_ms: int = 6 * 3600 * 1000) -> None:
        self.partitions = partitions
        self.dedup = Deduplicator(dedup_horizon_ms)
        self.duplicates = 0
        self._in = {t: AvroCodec(t) for t in self.topics}
        self._clicks = AvroCodec(T.I_CLICKS)
        self._payments = AvroCodec(T.I_PAYMENTS)
        self._labels = AvroCodec(T.LABELS)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        clicks: dict[int, list[dict[str, Any]]] = defaultdict(list)
        payments: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for msg in batch:
            try:
                self._route(msg, clicks, payments, result)
            except InvalidEvent as exc:
                result.rejected.append(Rejected(msg, exc))
        result.produce.extend(self._batches(T.I_CLICKS, self._clicks, clicks))
        result.produce.extend(self._batches(T.I_PAYMENTS, self._payments, payments))
        return result

    def _route(self, msg: Message, clicks: dict[int, list[dict[str, Any]]],
               payments: dict[int, list[dict[str, Any]]], result: StepResult) -> None:
        if msg.topic == T.CLICKS:
            click = to_click(self._in[T.CLICKS].decode(msg.value))
            if self._first(click["event_id"], click["ts_ms"]):
                clicks[T.partition_for(click["user_id"], self.partitions)].append(click)
            return
        if msg.value is None:  # Debezium tombstone after a delete: nothing to ingest
            return
        envelope = self._in[msg.topic].decode(msg.value)
        if envelope["op"] not in ("c", "r") or envelope["after"] is None:
            return  # updates and deletes are kept by the CDC sink, not scored or labelled
        if msg.topic == T.CDC_PAYMENTS:
            pay = to_payment(envelope["after"], msg.timestamp_ms)
            if self._first(pay["event_id"], pay["ts_ms"]):
                payments[T.partition_for(pay["card_id"], self.partitions)].append(pay)
        else:
            label = to_label(envelope["after"])
            if self._first(label["event_id"], label["label_ts"]):
                key = label["payment_id"].encode()
                result.produce.append(Produce(T.LABELS, key, self._labels.encode(label)))

    def _first(self, event_id: str, ts_ms: int) -> bool:
        if self.dedup.first_time(event_id, ts_ms):
            return True
        self.duplicates += 1
        return False

    @staticmethod
    def _batches(topic: str, codec: AvroCodec, groups: dict[int, list[dict[str, Any]]]) -> list[Produce]:
        return [Produce(topic, None, codec.encode({"items": items}), partition=p) for p, items in groups.items()]
