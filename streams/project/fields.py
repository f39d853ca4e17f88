"""What a source's events hold: each field's type, read from the newest version of the topic's Avro schema.

For a CDC source the fields are the row's columns: the record inside the
Debezium envelope's ``before``/``after`` union. A field's type is reduced to
what the project's checks need: its Avro kind (``string``, ``long``,
``double``, ``boolean``, ``enum``, ``record``…), its logical type, and whether
it may be null.

>>> raw = {"type": "record", "name": "E", "fields": [
...     {"name": "id", "type": "string"},
...     {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
...     {"name": "amount", "type": ["null", "double"], "default": None}]}
>>> f = record_fields(raw)
>>> f["ts"].logical, f["amount"].nullable, f["amount"].numeric, f["id"].kind
('timestamp-millis', True, True, 'string')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FieldType", "record_fields", "row_fields"]

NUMERIC = frozenset({"int", "long", "float", "double"})
PRIMITIVE = NUMERIC | {"string", "boolean", "enum"}


@dataclass(frozen=True)
class FieldType:
    """One field's Avro type, reduced: ``kind`` of its non-null branch (``union`` when it has several)."""

    kind: str
    logical: str | None = None
    nullable: bool = False
    connect: str | None = None  # Kafka Connect's type name (``io.debezium.time.ZonedTimestamp``)

    @property
    def numeric(self) -> bool:
        return self.kind in NUMERIC and self.logical is None

    @property
    def primitive(self) -> bool:
        """A value ingest can carry and a feature or expression can read: a number, string, boolean or enum
        (a ``timestamp-millis`` travels as its epoch milliseconds; other logical types are not read)."""
        return self.kind in PRIMITIVE and self.logical in (None, "timestamp-millis")

    def describe(self) -> str:
        text = self.logical or self.connect or self.kind
        return f"nullable {text}" if self.nullable else text


def _named(node: Any, names: dict[str, Any], namespace: str = "") -> None:
    """Collect every named type (records, enums, fixed) under ``node`` by full and short name."""
    if isinstance(node, list):
        for branch in node:
            _named(branch, names, namespace)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed") and "name" in node:
            ns = node.get("namespace", namespace)
            full = node["name"] if "." in node["name"] or not ns else f"{ns}.{node['name']}"
            names[full] = names[node["name"].rsplit(".", 1)[-1]] = node
            namespace = ns
        for f in node.get("fields", ()):
            _named(f["type"], names, namespace)
        for nested in ("items", "values"):
            if nested in node:
                _named(node[nested], names, namespace)


def _resolve(node: Any, names: dict[str, Any]) -> Any:
    return names.get(node, node) if isinstance(node, str) else node


def _field_type(node: Any, names: dict[str, Any]) -> FieldType:
    node = _resolve(node, names)
    if isinstance(node, list):
        branches = [_resolve(b, names) for b in node if b != "null"]
        nullable = len(branches) < len(node)
        if len(branches) != 1:
            return FieldType("union", nullable=nullable)
        inner = _field_type(branches[0], names)
        return FieldType(inner.kind, inner.logical, nullable, inner.connect)
    if isinstance(node, dict):
        kind = node["type"] if isinstance(node["type"], str) else "union"
        if kind in ("record", "enum", "fixed", "array", "map"):
            return FieldType(kind)
        return FieldType(kind, node.get("logicalType"), connect=node.get("connect.name"))
    return FieldType(str(node))


def record_fields(raw: dict[str, Any], names: dict[str, Any] | None = None) -> dict[str, FieldType]:
    """Each top-level field of the record schema ``raw`` and its type (``names``: the named types in scope)."""
    if names is None:
        names = {}
        _named(raw, names)
    return {f["name"]: _field_type(f["type"], names) for f in raw.get("fields", ())}


def row_fields(raw: dict[str, Any]) -> dict[str, FieldType] | None:
    """The row's fields of a Debezium envelope schema (the record in ``after``), or None if ``raw`` is not
    an envelope."""
    names: dict[str, Any] = {}
    _named(raw, names)
    top = {f["name"]: f["type"] for f in raw.get("fields", ())}
    if not {"before", "after", "op"} <= set(top):
        return None
    after = top["after"]
    branches = [_resolve(b, names) for b in (after if isinstance(after, list) else [after]) if b != "null"]
    if len(branches) != 1 or not isinstance(branches[0], dict) or branches[0].get("type") != "record":
        return None
    return record_fields(branches[0], names)
