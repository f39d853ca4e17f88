"""Avro in the Confluent wire format: magic byte 0, 4-byte big-endian schema id, Avro body.

Decoding resolves the writer schema (named by the id) into the topic's current
reader schema, so records written with an older registered version still decode.
Every failure is raised as :class:`DecodeError` with a reason code for the DLQ.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError

from streams import schemas
from streams.base import InvalidEvent, Message, Reason, Rejected, StepResult

MAGIC = 0
_HEADER = struct.Struct(">bI")


class DecodeError(InvalidEvent):
    """Bytes that cannot become a record of the topic's schema."""


class AvroCodec:
    """Encoder/decoder for one topic's value schema.

    >>> codec = AvroCodec("alerts")
    >>> rec = {"alert_id": "a1", "ts": 0, "detector": "adwin", "metric": "error",
    ...        "value": 0.3, "threshold": 0.1, "model_version": "v1", "message": "drift"}
    >>> codec.decode(codec.encode(rec))["alert_id"]
    'a1'
    """

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._catalog = schemas.catalog()
        self.subject = self._catalog.current(topic)
        self._reader = self.subject.parsed
        self._header = _HEADER.pack(MAGIC, self.subject.schema_id)

    @property
    def schema_id(self) -> int:
        return self.subject.schema_id

    def encode(self, record: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        buf.write(self._header)
        fastavro.schemaless_writer(buf, self._reader, record)
        return buf.getvalue()

    def decode(self, data: bytes | None) -> dict[str, Any]:
        """Decode one message value; raises :class:`DecodeError`."""
        if data is None:
            raise DecodeError(Reason.UNDECODABLE, "null value (tombstone) where a record was expected")
        if len(data) < 5 or data[0] != MAGIC:
            raise DecodeError(Reason.UNDECODABLE, "not Confluent wire format (magic byte 0 + schema id)")
        _, sid = _HEADER.unpack_from(data)
        if sid == self.subject.schema_id:
            writer = self._reader
        else:
            found = self._catalog.writer(sid)
            if found is None:
                raise DecodeError(Reason.UNKNOWN_SCHEMA, f"unknown schema id {sid}: not in the schema registry")
            writer = found
        body = io.BytesIO(data)
        body.seek(5)
        try:
            record = fastavro.schemaless_reader(body, writer, self._reader)
        except SchemaResolutionError as exc:
            raise DecodeError(
                Reason.SCHEMA_MISMATCH, f"writer schema {sid} cannot be read as {self.topic!r}: {exc}"
            ) from exc
        except Exception as exc:  # fastavro raises many types on corrupt input
            raise DecodeError(Reason.UNDECODABLE, f"corrupt Avro body: {type(exc).__name__}") from exc
        if body.tell() != len(data):
            raise DecodeError(Reason.UNDECODABLE, f"{len(data) - body.tell()} trailing bytes after the record")
        if not isinstance(record, dict):
            raise DecodeError(Reason.UNDECODABLE, "body is not a record")
        return record


def leading_array_length(data: bytes | None) -> int:
    """How many items a micro-batch record holds, read without decoding it: the first block count of the
    array that is its first field (Avro writes a zig-zag varint; a negative count is followed by the block's
    size). 0 when the bytes are not such a record (decoding will say why).

    >>> leading_array_length(AvroCodec("weir.scored").encode({"items": []}))
    0
    """
    if data is None or len(data) < 6 or data[0] != MAGIC:
        return 0
    shift = value = 0
    for byte in data[5:15]:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return abs((value >> 1) ^ -(value & 1))
    return 0


def decoded(
    batch: list[Message], codecs: dict[str, AvroCodec], result: StepResult
) -> Iterator[tuple[Message, dict[str, Any]]]:
    """Each message of ``batch`` decoded with its topic's codec; undecodable ones are added to
    ``result.rejected`` (for the runtime to dead-letter) and skipped."""
    for msg in batch:
        try:
            record = codecs[msg.topic].decode(msg.value)
        except DecodeError as exc:
            result.rejected.append(Rejected(msg, exc))
            continue
        yield msg, record
