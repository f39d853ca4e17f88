"""Avro schema compatibility under the Schema Registry's levels, with messages a person can act on.

The verdict is always Apache Avro's own ``ReaderWriterCompatibilityChecker``
(the rules the Java registry applies). Avro's result keeps its problems,
messages and locations in separate sets, so with several problems it cannot say
which rule failed where, and inside unions it loses the location altogether.
So once Avro says *incompatible*, a walk that follows the same rules over the
same pair names each problem: the field path (with field names), the location
in the reader schema and the rule (``SchemaIncompatibilityType`` in upper case).

Levels: BACKWARD means the new schema, as reader, reads data written with an
earlier one; FORWARD means an earlier schema reads data written with the new
one; FULL means both. Plain levels check against the latest earlier version
only, ``*_TRANSITIVE`` ones against every earlier version. NONE checks nothing.
Custom attributes (``"pii": true`` on a field, ``"doc"``) are allowed and
ignored by the rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import avro.errors
import avro.schema
from avro.compatibility import (
    ReaderWriterCompatibilityChecker,
    SchemaCompatibilityResult,
    SchemaCompatibilityType,
    SchemaIncompatibilityType,
    check_reader_enum_contains_writer_enum,
    lookup_writer_field,
    schema_name_equals,
)
from avro.schema import (
    ArraySchema,
    EnumSchema,
    FixedSchema,
    MapSchema,
    NamedSchema,
    RecordSchema,
    Schema,
    UnionSchema,
)

LEVELS = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE")
DEFAULT_LEVEL = "BACKWARD"

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# Avro's promotions: reader type -> writer types it can read.
_PROMOTIONS: dict[str, frozenset[str]] = {
    "long": frozenset({"int"}),
    "float": frozenset({"int", "long"}),
    "double": frozenset({"int", "long", "float"}),
    "bytes": frozenset({"string"}),
    "string": frozenset({"bytes"}),
}

MISSING_DEFAULT = SchemaIncompatibilityType.reader_field_missing_default_value.name.upper()
TYPE_MISMATCH = SchemaIncompatibilityType.type_mismatch.name.upper()
NAME_MISMATCH = SchemaIncompatibilityType.name_mismatch.name.upper()
FIXED_SIZE_MISMATCH = SchemaIncompatibilityType.fixed_size_mismatch.name.upper()
MISSING_ENUM_SYMBOLS = SchemaIncompatibilityType.missing_enum_symbols.name.upper()
MISSING_UNION_BRANCH = SchemaIncompatibilityType.missing_union_branch.name.upper()


class SchemaParseError(ValueError):
    """The text is not JSON or not a valid Avro schema."""


class UnknownLevel(ValueError):
    """A compatibility level that is not one of ``LEVELS``."""


@dataclass(frozen=True)
class Incompatibility:
    """One reason a reader schema cannot read what a writer schema writes.

    ``location`` points into the reader schema the way Avro spells it
    (``/fields/11/type``); ``field`` is the dotted field path (``address.country``,
    ``items[].sku``), empty at the top level; ``reader``/``writer`` say what each
    side has there (a type, a name, a size, symbols).
    """

    rule: str
    location: str
    field: str
    reader: str = ""
    writer: str = ""

    def describe(self, reader: str, writer: str) -> str:
        """One sentence naming the field, the rule, and ``reader``/``writer`` (e.g. "version 1")."""
        where = f"field '{self.field}' ({self.location})" if self.field else f"top level ({self.location})"
        if self.rule == MISSING_DEFAULT:
            what = f"has no default and {writer} does not write it"
        elif self.rule == TYPE_MISMATCH:
            what = f"is {self.reader} in {reader} but {self.writer} in {writer}"
        elif self.rule == NAME_MISMATCH:
            what = f"is named {self.reader} in {reader} but {self.writer} in {writer}"
        elif self.rule == FIXED_SIZE_MISMATCH:
            what = f"has size {self.reader} in {reader} but {self.writer} in {writer}"
        elif self.rule == MISSING_ENUM_SYMBOLS:
            what = f"lacks symbols {self.writer} in {reader} that {writer} may write"
        elif self.rule == MISSING_UNION_BRANCH:
            what = f"has no union branch in {reader} for the {self.writer} that {writer} may write"
        else:
            what = f"{self.reader} / {self.writer}".strip(" /")
        return f"{where} {what}: {self.rule}"


def parse(text: str) -> Schema:
    """Parse an Avro schema from JSON text; ``SchemaParseError`` says why it is not one.

    Field defaults are validated as Java Avro (and so Confluent's registry) does:
    a union field's default must be a value of the union's *first* branch.

    >>> parse('{"type": "record", "name": "R", "fields": [{"name": "s", "type": ["null", "string"], "default": "x"}]}')
    Traceback (most recent call last):
    ...
    streams.registry.compat.SchemaParseError: invalid Avro schema: field 's': default 'x' is not a null (a union's default must match its first branch)
    """
    try:
        schema = avro.schema.parse(text)
    except (avro.errors.AvroException, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise SchemaParseError(f"invalid Avro schema: {exc}") from exc
    bad = invalid_defaults(schema)
    if bad:
        raise SchemaParseError(f"invalid Avro schema: {'; '.join(bad)}")
    return schema


def invalid_defaults(schema: Schema, path: str = "") -> list[str]:
    """Fields whose default is not a value of their type (of a union's first branch)."""
    found: list[str] = []
    seen: set[int] = set()

    def walk(node: Schema, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, RecordSchema):
            for f in node.fields:
                name = f"{where}.{f.name}" if where else f.name
                if f.has_default:
                    target = f.type.schemas[0] if isinstance(f.type, UnionSchema) else f.type
                    if target.validate(f.default) is None:
                        branch = " (a union's default must match its first branch)" \
                            if isinstance(f.type, UnionSchema) else ""
                        found.append(f"field {name!r}: default {f.default!r} is not a {target.type}{branch}")
                walk(f.type, name)
        elif isinstance(node, UnionSchema):
            for branch in node.schemas:
                walk(branch, where)
        elif isinstance(node, ArraySchema):
            walk(node.items, f"{where}[]")
        elif isinstance(node, MapSchema):
            walk(node.values, f"{where}{{}}")

    walk(schema, path)
    return found


def check_level(level: str) -> str:
    """``level`` in upper case if it is one of ``LEVELS``, else ``UnknownLevel``."""
    upper = level.upper() if isinstance(level, str) else ""
    if upper not in LEVELS:
        raise UnknownLevel(f"unknown compatibility level {level!r}; expected one of {', '.join(LEVELS)}")
    return upper


def incompatibilities(reader: Schema, writer: Schema) -> list[Incompatibility]:
    """Why ``reader`` cannot read data written with ``writer``; empty when Avro says it can."""
    result = _avro_result(reader, writer)
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    found = _walk(reader, writer, (), (), frozenset())
    if found:
        return found
    # Our walk mirrors Avro's rules; should they ever disagree, report Avro's own words.
    return [
        Incompatibility(kind.name.upper(), ", ".join(sorted(result.locations)), "",
                        "; ".join(sorted(result.messages)))
        for kind in dict.fromkeys(result.incompatibilities)
    ]


def problems(new: str, existing: Sequence[str], level: str, *, versions: Sequence[int] | None = None,
             label: str = "version {}") -> list[str]:
    """Messages saying why ``new`` may not follow ``existing`` under ``level``; empty when it may.

    ``existing`` are the earlier schemas, oldest first; ``versions`` their version
    numbers (default 1..n), ``label`` how a message names one (``"v{}"`` gives
    ``v1``). Every message names the direction, the version, the
    field and the rule. Raises ``SchemaParseError`` for a schema that does not
    parse and ``UnknownLevel`` for a level not in ``LEVELS``.

    >>> v1 = '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]}'
    >>> v2 = '{"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}, {"name": "b", "type": "string"}]}'
    >>> problems(v2, [v1], "BACKWARD")
    ["BACKWARD vs version 1: field 'b' (/fields/1) has no default and version 1 does not write it: READER_FIELD_MISSING_DEFAULT_VALUE"]
    >>> problems(v2, [v1], "FORWARD")
    []
    """
    level = check_level(level)
    numbers = list(versions) if versions is not None else list(range(1, len(existing) + 1))
    if len(numbers) != len(existing):
        raise ValueError(f"{len(existing)} schemas but {len(numbers)} version numbers")
    candidate = parse(new)
    if level == "NONE" or not existing:
        return []
    pairs = list(zip(numbers, existing))
    if not level.endswith("_TRANSITIVE"):
        pairs = pairs[-1:]
    base = level.removesuffix("_TRANSITIVE")
    out: list[str] = []
    for number, text in pairs:
        old = parse(text)
        name = label.format(number)
        if base in ("BACKWARD", "FULL"):
            out += [f"BACKWARD vs {name}: {i.describe('the new schema', name)}"
                    for i in incompatibilities(candidate, old)]
        if base in ("FORWARD", "FULL"):
            out += [f"FORWARD vs {name}: {i.describe(name, 'the new schema')}"
                    for i in incompatibilities(old, candidate)]
    return out


# --- the walk: Avro's rules (avro/compatibility.py), keeping each problem with its place ---

_Path = tuple[str, ...]


def _avro_result(reader: Schema, writer: Schema) -> SchemaCompatibilityResult:
    """Avro's verdict; a fresh checker each time (it memoizes pairs by identity)."""
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    return checker.get_compatibility(reader, writer)


def _compatible(reader: Schema, writer: Schema) -> bool:
    return _avro_result(reader, writer).compatibility is SchemaCompatibilityType.compatible


def _field_path(names: _Path) -> str:
    out = ""
    for name in names:
        out += name if name in ("[]", "{}") or not out else f".{name}"
    return out


def _problem(rule: str, loc: _Path, names: _Path, reader: str = "", writer: str = "") -> Incompatibility:
    return Incompatibility(rule, "/" + "/".join(loc), _field_path(names), reader, writer)


def _type_name(schema: Schema) -> str:
    if isinstance(schema, NamedSchema):
        return f"{schema.type} {schema.fullname}"
    return str(schema.type)


def _walk(reader: Schema, writer: Schema, loc: _Path, names: _Path,
          active: frozenset[tuple[int, int]]) -> list[Incompatibility]:
    pair = (id(reader), id(writer))
    if pair in active:  # a recursive type: the pair is being checked further up
        return []
    active = active | {pair}
    if reader.type == writer.type:
        return _same_type(reader, writer, loc, names, active)
    if isinstance(writer, UnionSchema):
        return [p for branch in writer.schemas for p in _walk(reader, branch, loc, names, active)]
    if isinstance(reader, UnionSchema):
        if any(_compatible(branch, writer) for branch in reader.schemas):
            return []
        return _union_branch(reader, writer, loc, names, active)
    if writer.type in _PROMOTIONS.get(str(reader.type), frozenset()):
        return []
    return [_problem(TYPE_MISMATCH, loc, names, _type_name(reader), _type_name(writer))]


def _same_type(reader: Schema, writer: Schema, loc: _Path, names: _Path,
               active: frozenset[tuple[int, int]]) -> list[Incompatibility]:
    if reader.type in _PRIMITIVES:
        return []
    if isinstance(reader, ArraySchema) and isinstance(writer, ArraySchema):
        return _walk(reader.items, writer.items, loc + ("items",), names + ("[]",), active)
    if isinstance(reader, MapSchema) and isinstance(writer, MapSchema):
        return _walk(reader.values, writer.values, loc + ("values",), names + ("{}",), active)
    if isinstance(reader, UnionSchema) and isinstance(writer, UnionSchema):
        out: list[Incompatibility] = []
        for i, branch in enumerate(writer.schemas):
            if not _compatible(reader, branch):
                out += _union_branch(reader, branch, loc + (str(i),), names, active, indexed=True)
        return out
    out = []
    if (isinstance(reader, NamedSchema) and isinstance(writer, NamedSchema)
            and not schema_name_equals(reader, writer)):
        out.append(_problem(NAME_MISMATCH, loc + ("name",), names, reader.fullname, writer.fullname))
    if isinstance(reader, FixedSchema) and isinstance(writer, FixedSchema) and reader.size != writer.size:
        out.append(_problem(FIXED_SIZE_MISMATCH, loc + ("size",), names, str(reader.size), str(writer.size)))
    if isinstance(reader, EnumSchema) and isinstance(writer, EnumSchema):
        verdict = check_reader_enum_contains_writer_enum(reader, writer, list(loc))
        if verdict.compatibility is SchemaCompatibilityType.incompatible:
            missing = sorted(set(writer.symbols) - set(reader.symbols))
            out.append(_problem(MISSING_ENUM_SYMBOLS, loc + ("symbols",), names, writer=str(missing)))
    if isinstance(reader, RecordSchema) and isinstance(writer, RecordSchema):
        out += _fields(reader, writer, loc, names, active)
    return out


def _fields(reader: RecordSchema, writer: RecordSchema, loc: _Path, names: _Path,
            active: frozenset[tuple[int, int]]) -> list[Incompatibility]:
    out: list[Incompatibility] = []
    for i, field in enumerate(reader.fields):
        here = loc + ("fields", str(i))
        written = lookup_writer_field(writer_schema=writer, reader_field=field)
        if written is None:
            # Avro also accepts an enum-typed field with an enum default here only when
            # the enum can read the writer record, which it never can: a missing default.
            if not field.has_default:
                out.append(_problem(MISSING_DEFAULT, here, names + (field.name,)))
            continue
        out += _walk(field.type, written.type, here + ("type",), names + (field.name,), active)
    return out


def _union_branch(reader: UnionSchema, writer: Schema, loc: _Path, names: _Path,
                  active: frozenset[tuple[int, int]], *, indexed: bool = False) -> list[Incompatibility]:
    """``writer`` fits no branch of ``reader``: explain through the one branch of its kind, if any."""
    kin = [
        (i, branch) for i, branch in enumerate(reader.schemas)
        if branch.type == writer.type
        and (not isinstance(branch, NamedSchema) or not isinstance(writer, NamedSchema)
             or schema_name_equals(branch, writer))
    ]
    if len(kin) == 1:
        i, branch = kin[0]
        base = loc[:-1] if indexed else loc
        found = _walk(branch, writer, base + (str(i),), names, active)
        if found:
            return found
    return [_problem(MISSING_UNION_BRANCH, loc, names, writer=_type_name(writer))]
