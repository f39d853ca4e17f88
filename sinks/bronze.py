"""The bronze sink: every message of the project's source topics, as received, into ``bronze_events``.

Nothing is refused here: a record that decodes is stored as JSON (its PII
fields replaced by tokens, see :mod:`streams.pseudonymize`); a tombstone as
status ``tombstone``; bytes that do not decode as their size, SHA-256 and the
reason (the raw bytes are in ``dlq.<topic>``, where ingest sent them). Rows
are keyed by Kafka coordinates and the cluster's id, so a re-delivered batch changes nothing and a restarted
embedded broker's offsets replace nothing.
"""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import UTC, date, datetime
from typing import Any

from sinks.clickhouse import ClickHouse
from streams.base import Message, Stage, StepResult
from streams.codec import AvroCodec, DecodeError
from streams.project.spec import Project
from streams.pseudonymize import Pseudonymizer, topic_pii

COLUMNS = ("topic", "partition", "offset", "key", "schema_id", "status", "record", "size", "sha256", "kafka_ts",
           "stored_ts", "log_id")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class BronzeSink(Stage):
    """Stage writing ``bronze_events``; one ClickHouse insert per batch."""

    step_id = "sink-bronze"

    def __init__(self, ch: ClickHouse, pseudonymizer: Pseudonymizer, project: Project, log_id: str = "") -> None:
        self.ch = ch
        self.log_id = log_id  # the Kafka cluster's id: see sinks.clickhouse
        self.topics: tuple[str, ...] = tuple(s.topic for s in project.sources)
        self._pseudo = pseudonymizer
        self._codecs = {t: AvroCodec(t) for t in self.topics}

    def handle(self, batch: list[Message]) -> StepResult:
        stored = datetime.now(UTC)
        self.ch.insert("bronze_events", [self.row(m, stored) for m in batch], COLUMNS)
        return StepResult()

    def row(self, msg: Message, stored: datetime) -> list[Any]:
        value = msg.value
        schema_id = struct.unpack_from(">I", value, 1)[0] if value is not None and len(value) >= 5 else None
        status, record = "ok", None
        if value is None:
            status = "tombstone"
        else:
            try:
                decoded = self._codecs[msg.topic].decode(value)
                pii = topic_pii(msg.topic)
                clean = self._pseudo.envelope(pii, decoded) if "before" in decoded else self._pseudo.record(pii, decoded)
                record = json.dumps(clean, default=_json_default)
            except DecodeError as exc:
                status = exc.reason.value
        return [msg.topic, msg.partition, msg.offset, msg.key.decode("utf-8", "replace") if msg.key else None,
                schema_id, status, record, len(value or b""), hashlib.sha256(value or b"").hexdigest(),
                datetime.fromtimestamp(msg.timestamp_ms / 1000, UTC), stored, self.log_id]

