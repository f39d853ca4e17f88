"""Ingest: decode, validate, check event time, pseudonymize, dedup, re-key into internal micro-batches.

Inputs: ``clickstream.events`` (one event per message) and the Debezium
topics ``cdc.payments`` and ``cdc.payment_labels``. Outputs: ``weir.clicks``
and ``weir.payments`` (Avro micro-batches, one message per destination
partition per batch, partitioned by user id / card id) and ``labels.fraud``
(public, one label per message): the *silver* stream — validated, deduped,
and with every PII field replaced by its token. Every refused record goes to
``dlq.<topic>`` with its reason (see :class:`streams.base.Reason`); every
consumed message is either accepted, skipped (a CDC update, delete or
tombstone, which ingest does not score), or dead-lettered.

Dedup keys: a click's ``event_id``; a CDC change's (topic, key, op,
``source.lsn``, ``source.txId``), which a connector re-sending after a crash
repeats exactly. Snapshot reads (``op="r"``) are history and skip the
event-time checks; everything else is checked by :class:`EventTimeGuard`
per source partition.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any, NamedTuple

from streams import topics as T
from streams.base import InvalidEvent, Message, Produce, Reason, Rejected, StepResult
from streams.codec import AvroCodec
from streams.dedup import DedupStore
from streams.event_time import EventTimeGuard
from streams.pseudonymize import Pseudonymizer, topic_pii

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


class Accepted(NamedTuple):
    """A valid, pseudonymized record waiting for the dedup verdict."""

    message: Message
    dedup_id: str
    kind: str  # "click" | "payment" | "label"
    record: dict[str, Any]


class IngestStage:
    """Validation, event time, pseudonymization, dedup and re-keying.

    State: event-time watermarks in memory (see :mod:`streams.event_time`) and
    the dedup store, which survives restarts when it is Redis. ``counts`` tallies
    every outcome (``accepted``, ``skipped``, and each refusal reason).
    """

    step_id = "ingest"
    topics = (T.CLICKS, T.CDC_PAYMENTS, T.CDC_LABELS)

    def __init__(self, partitions: int, *, dedup: DedupStore, pseudonymizer: Pseudonymizer,
                 event_time: EventTimeGuard) -> None:
        self.partitions = partitions
        self.dedup = dedup
        self.event_time = event_time
        self.counts: Counter[str] = Counter()
        self._pseudo = pseudonymizer
        self._in = {t: AvroCodec(t) for t in self.topics}
        self._pii = {t: topic_pii(t) for t in self.topics}
        self._clicks = AvroCodec(T.I_CLICKS)
        self._payments = AvroCodec(T.I_PAYMENTS)
        self._labels = AvroCodec(T.LABELS)

    @property
    def duplicates(self) -> int:
        return self.counts[Reason.DUPLICATE.value]

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        accepted: list[Accepted] = []
        now_ms = self.event_time.now_ms()
        for msg in batch:
            try:
                item = self._validate(msg, now_ms)
            except InvalidEvent as exc:
                self._reject(result, msg, exc)
                continue
            if item is None:
                self.counts["skipped"] += 1
            else:
                accepted.append(item)
        fresh = self.dedup.first_seen([(a.dedup_id, f"{a.message.topic}:{a.message.partition}:{a.message.offset}")
                                       for a in accepted])
        clicks: dict[int, list[dict[str, Any]]] = defaultdict(list)
        payments: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for item, first in zip(accepted, fresh, strict=True):
            if not first:
                self._reject(result, item.message, InvalidEvent(
                    Reason.DUPLICATE, f"event {item.dedup_id!r} was already ingested within the dedup horizon"))
                continue
            self.counts["accepted"] += 1
            rec = item.record
            if item.kind == "click":
                clicks[T.partition_for(rec["user_id"], self.partitions)].append(rec)
            elif item.kind == "payment":
                payments[T.partition_for(rec["card_id"], self.partitions)].append(rec)
            else:
                result.produce.append(Produce(T.LABELS, rec["payment_id"].encode(), self._labels.encode(rec)))
        result.produce.extend(self._batches(T.I_CLICKS, self._clicks, clicks))
        result.produce.extend(self._batches(T.I_PAYMENTS, self._payments, payments))
        return result

    def _reject(self, result: StepResult, msg: Message, exc: InvalidEvent) -> None:
        self.counts[exc.reason.value] += 1
        result.rejected.append(Rejected(msg, exc))

    def _validate(self, msg: Message, now_ms: int) -> Accepted | None:
        """The accepted record of ``msg``, ``None`` to skip it, or :class:`InvalidEvent`.

        PII is tokenized in the record ingest emits (fields it drops, such as a click's IP,
        never leave at all), so each raw value is hashed once and only if it travels on."""
        source = (msg.topic, msg.partition)
        if msg.topic == T.CLICKS:
            click = to_click(self._in[msg.topic].decode(msg.value))
            self.event_time.check(source, click["ts_ms"], now_ms)
            self._pseudo.in_place(self._pii[msg.topic], click)
            return Accepted(msg, click["event_id"], "click", click)
        if msg.value is None:  # Debezium tombstone after a delete: nothing to ingest
            return None
        envelope = self._in[msg.topic].decode(msg.value)
        if envelope["op"] not in ("c", "r") or envelope["after"] is None:
            return None  # updates and deletes are kept in bronze, not scored or labelled
        src = envelope["source"]
        change_id = f"{msg.topic}|{(msg.key or b'').decode(errors='replace')}|{envelope['op']}|" \
                    f"{src.get('lsn')}|{src.get('txId')}"
        if msg.topic == T.CDC_PAYMENTS:
            rec, kind, ts = to_payment(envelope["after"], msg.timestamp_ms), "payment", "ts_ms"
        else:
            rec, kind, ts = to_label(envelope["after"]), "label", "label_ts"
        if envelope["op"] != "r":  # snapshot reads are history: no lateness or age limits
            self.event_time.check(source, rec[ts], now_ms)
        self._pseudo.in_place(self._pii[msg.topic], rec)
        return Accepted(msg, change_id, kind, rec)

    @staticmethod
    def _batches(topic: str, codec: AvroCodec, groups: dict[int, list[dict[str, Any]]]) -> list[Produce]:
        return [Produce(topic, None, codec.encode({"items": items}), partition=p) for p, items in groups.items()]
