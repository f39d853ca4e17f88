"""The Avro contracts in ``schemas/``: one folder per subject, one file per version.

Subjects follow Confluent's TopicNameStrategy: the folder ``schemas/<topic>/``
holds the value schema of ``<topic>``. Until Weir serves a schema registry,
a schema's id is derived from its canonical form (CRC-32, 31 bits), so every
process agrees on ids without coordination.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@dataclass(frozen=True)
class Subject:
    """The newest registered schema of one topic."""

    topic: str
    version: int
    schema_id: int
    raw: dict[str, Any]
    parsed: Any  # fastavro's parsed schema


def schema_id_of(raw: dict[str, Any]) -> int:
    """Stable id of a schema: CRC-32 of its Parsing Canonical Form, never 0."""
    canonical = fastavro.schema.to_parsing_canonical_form(raw)
    return (zlib.crc32(canonical.encode()) & 0x7FFFFFFF) or 1


@cache
def subject(topic: str) -> Subject:
    """The newest version of ``topic``'s value schema; ``KeyError`` if none exists.

    ``dlq.*`` and ``cdc.*`` topics share schemas by prefix only where a folder says so.
    """
    folder = SCHEMA_DIR / topic
    versions = sorted(folder.glob("v*.avsc"), key=lambda p: int(p.stem[1:]))
    if not versions:
        raise KeyError(f"no schema for topic {topic!r} under {SCHEMA_DIR}")
    newest = versions[-1]
    raw = json.loads(newest.read_text())
    return Subject(topic, int(newest.stem[1:]), schema_id_of(raw), raw, fastavro.parse_schema(raw))


@cache
def by_id() -> dict[int, Subject]:
    """Every version of every subject, keyed by schema id."""
    table: dict[int, Subject] = {}
    for folder in sorted(p for p in SCHEMA_DIR.iterdir() if p.is_dir()):
        for path in folder.glob("v*.avsc"):
            raw = json.loads(path.read_text())
            sid = schema_id_of(raw)
            table[sid] = Subject(folder.name, int(path.stem[1:]), sid, raw, fastavro.parse_schema(raw))
    return table


def topics() -> list[str]:
    """Every topic that has a schema."""
    return sorted(p.name for p in SCHEMA_DIR.iterdir() if p.is_dir())
