"""Ingest: decode, validate, check event time, pseudonymize, dedup, re-key into internal micro-batches.

Inputs: every source topic of the project (one event per message; a CDC
source's messages are Debezium envelopes). Outputs: per source,
``weir.<project>.silver.<source>`` (:mod:`streams.project.contracts`): Avro micro-batches,
one message per destination partition per batch, partitioned by the source's
partition key, each event its id, event time, the produce time of its message
and the fields the source keeps, every PII field replaced by its token: the
*silver* stream. Every refused record goes to ``dlq.<topic>`` with its reason
(see :class:`streams.base.Reason`); every consumed message is either accepted,
skipped (a CDC update, delete or tombstone, which ingest does not pass on), or
dead-lettered.

Checks, in order, each naming the field it refuses: the event id and the
partition key are present and non-empty, so is every ``required`` field;
every ``ranges`` rule holds; the event time parses and is plausible and not
late (:class:`EventTimeGuard`, per source partition). Snapshot reads
(``op="r"``) are history and skip the event-time checks.

Dedup keys: a plain event's (topic, id), so two sources may share ids (an
order and its delivery); a CDC change's (topic, key, op, ``source.lsn``,
``source.txId``), which a connector re-sending after a crash repeats exactly.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any, NamedTuple

from streams import topics as T
from streams.base import InvalidEvent, Message, Produce, Reason, Rejected, Stage, StepResult
from streams.codec import AvroCodec
from streams.dedup import DedupStore
from streams.event_time import EventTimeGuard
from streams.project.contracts import silver_topic, source_fields
from streams.project.spec import Project, Source
from streams.pseudonymize import Pseudonymizer, topic_pii


def iso_ms(value: str) -> int:
    """Milliseconds since the epoch of an ISO-8601 timestamp with offset (Debezium ZonedTimestamp)."""
    try:
        dt = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(Reason.OUT_OF_RANGE, f"not an ISO-8601 timestamp: {value!r}") from exc
    if dt.tzinfo is None:
        raise InvalidEvent(Reason.OUT_OF_RANGE, f"timestamp {value!r} has no time zone")
    return int(dt.timestamp() * 1000)


def epoch_ms(value: Any, name: str) -> int:
    """Epoch milliseconds of an event-time value: an aware datetime (Avro ``timestamp-millis``), an integer of
    epoch ms, or an ISO-8601 string with offset."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return iso_ms(value)
    raise InvalidEvent(Reason.MISSING_FIELD if value is None else Reason.OUT_OF_RANGE,
                       f"event time {name!r} is {'missing' if value is None else type(value).__name__}")


class Accepted(NamedTuple):
    """A valid, pseudonymized record waiting for the dedup verdict."""

    message: Message
    dedup_id: str
    source: SourcePlan
    record: dict[str, Any]


class SourcePlan:
    """One source, compiled for ingest: its codecs, checks, PII fields and what it keeps."""

    def __init__(self, project: Project, source: Source, pseudonymizer: Pseudonymizer) -> None:
        self.source = source
        self.cdc = source.cdc is not None
        self.codec = AvroCodec(source.topic)
        self.out_topic = silver_topic(project, source)
        self.out = AvroCodec(self.out_topic)
        types = source_fields(project, source)
        self.timestamps = [f for f in source.fields if types[f].logical == "timestamp-millis"]
        self.must = list(dict.fromkeys((source.event_id, source.partition_key, *source.required)))
        pii = topic_pii(source.topic)
        self.pii = frozenset(f for f in source.fields if f in pii)
        self.token_id = source.event_id in pii
        self._pseudo = pseudonymizer

    def check(self, rec: dict[str, Any]) -> None:
        """Raise :class:`InvalidEvent` naming the field when a required one is missing or a range is violated."""
        for name in self.must:
            if rec.get(name) in (None, ""):
                raise InvalidEvent(Reason.MISSING_FIELD, f"required field {name!r} is missing or empty")
        for rule in self.source.ranges:
            value = rec.get(rule.field)
            if value is not None and rule.violated(value):
                raise InvalidEvent(Reason.OUT_OF_RANGE, f"{rule.field} {value} outside {rule.describe()}")

    def silver(self, rec: dict[str, Any], ts_ms: int, source_ms: int) -> dict[str, Any]:
        """The record ingest emits (after :meth:`check`): id, event time, produce time and the kept fields,
        PII as tokens."""
        event_id = rec[self.source.event_id]
        out: dict[str, Any] = {"event_id": self._pseudo.token(str(event_id)) if self.token_id else str(event_id),
               "ts_ms": ts_ms, "source_ms": source_ms}
        for name in self.source.fields:
            out[name] = rec.get(name)
        for name in self.timestamps:
            if isinstance(out[name], datetime):
                out[name] = int(out[name].timestamp() * 1000)
        self._pseudo.in_place(self.pii, out)
        return out


class IngestStage(Stage):
    """Validation, event time, pseudonymization, dedup and re-keying of every source of a project.

    State: event-time watermarks in memory (see :mod:`streams.event_time`) and
    the dedup store, which survives restarts when it is Redis. ``counts`` tallies
    every outcome (``accepted``, ``skipped``, and each refusal reason).
    """

    step_id = "ingest"

    def __init__(self, project: Project, partitions: int, *, dedup: DedupStore, pseudonymizer: Pseudonymizer,
                 event_time: EventTimeGuard) -> None:
        self.partitions = partitions
        self.dedup = dedup
        self.event_time = event_time
        self.counts: Counter[str] = Counter()
        self._plans = {s.topic: SourcePlan(project, s, pseudonymizer) for s in project.sources}
        self.topics: tuple[str, ...] = tuple(self._plans)

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
        out: dict[tuple[SourcePlan, int], list[dict[str, Any]]] = defaultdict(list)
        for item, first in zip(accepted, fresh, strict=True):
            if not first:
                self._reject(result, item.message, InvalidEvent(
                    Reason.DUPLICATE, f"event {item.dedup_id!r} was already ingested within the dedup horizon"))
                continue
            self.counts["accepted"] += 1
            key = item.record[item.source.source.partition_key]
            out[(item.source, T.partition_for(str(key), self.partitions))].append(item.record)
        result.produce.extend(Produce(plan.out_topic, None, plan.out.encode({"items": items}), partition=p)
                              for (plan, p), items in out.items())
        return result

    def _reject(self, result: StepResult, msg: Message, exc: InvalidEvent) -> None:
        self.counts[exc.reason.value] += 1
        result.rejected.append(Rejected(msg, exc))

    def _validate(self, msg: Message, now_ms: int) -> Accepted | None:
        """The accepted record of ``msg``, ``None`` to skip it, or :class:`InvalidEvent`.

        PII is tokenized in the record ingest emits (fields it does not keep never leave at all), so each
        raw value is hashed once and only if it travels on."""
        plan = self._plans[msg.topic]
        source = plan.source
        if not plan.cdc:
            rec = plan.codec.decode(msg.value)
            plan.check(rec)
            ts = epoch_ms(rec.get(source.event_time), source.event_time)
            self.event_time.check((msg.topic, msg.partition), ts, now_ms)
            return Accepted(msg, f"{msg.topic}|{rec[source.event_id]}", plan, plan.silver(rec, ts, msg.timestamp_ms))
        if msg.value is None:  # Debezium tombstone after a delete: nothing to ingest
            return None
        envelope = plan.codec.decode(msg.value)
        if envelope["op"] not in ("c", "r") or envelope["after"] is None:
            return None  # updates and deletes are kept in bronze, not passed on
        src, row = envelope["source"], envelope["after"]
        plan.check(row)
        change_id = f"{msg.topic}|{(msg.key or b'').decode(errors='replace')}|{envelope['op']}|" \
                    f"{src.get('lsn')}|{src.get('txId')}"
        ts = epoch_ms(row.get(source.event_time), source.event_time) if source.event_time else int(src["ts_ms"])
        if envelope["op"] != "r":  # snapshot reads are history: no lateness or age limits
            self.event_time.check((msg.topic, msg.partition), ts, now_ms)
        return Accepted(msg, change_id, plan, plan.silver(row, ts, msg.timestamp_ms))
