"""The Avro contracts and the catalog that gives them schema ids.

Schemas live in folders of topics: Weir's own in ``schemas/`` (its internal
topics, model events, alerts) and a project's in the folder it declares
(:attr:`streams.project.Project.schemas`: its sources' topics and
prediction topics). Subjects follow Confluent's TopicNameStrategy: the folder
``<root>/<topic>/`` holds every version of subject ``<topic>-value``
(``v1.avsc``, ``v2.avsc``, …; an optional file ``compatibility`` names the
subject's level, BACKWARD when absent). The newest version is the topic's
reader schema; a record written with any registered version decodes into it.
:func:`set_roots` says which folders this process knows (Weir's own, plus
the running project's).

Schema ids come from a schema registry. :func:`use_registry` registers every
version of every subject there (in order, so the registry checks each
evolution step) and makes this process's :func:`catalog` resolve ids through
it, including ids of schemas that other producers registered. Weir's own
registry assigns ids deterministically (:func:`schema_id_of`), so a process
that runs without a registry (pure unit tests) agrees with it on Weir's ids.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
DEFAULT_COMPATIBILITY = "BACKWARD"
UNKNOWN_ID_TTL_S = 30.0  # how long a schema id the registry does not know is not asked for again
UNKNOWN_IDS_KEPT = 10_000  # distinct unknown ids remembered at most (then forgotten all at once)


@dataclass(frozen=True)
class Subject:
    """One version of a topic's value schema, with the id writers put in the wire header."""

    topic: str
    version: int
    schema_id: int
    raw: dict[str, Any]
    parsed: Any  # fastavro's parsed schema


def schema_id_of(raw: dict[str, Any]) -> int:
    """Stable id of a schema: CRC-32 of its Parsing Canonical Form, 31 bits, never 0."""
    canonical = fastavro.schema.to_parsing_canonical_form(raw)
    return (zlib.crc32(canonical.encode()) & 0x7FFFFFFF) or 1


def subject_name(topic: str) -> str:
    """The registry subject of a topic's values (TopicNameStrategy)."""
    return f"{topic}-value"


def topics(schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Every topic that has a schema under ``schema_dir``: its folders holding a ``v<N>.avsc`` (none when the
    folder does not exist; ``weir schemas check`` reports folders without one)."""
    if not schema_dir.is_dir():
        return []
    return sorted(p.name for p in schema_dir.iterdir() if p.is_dir() and any(p.glob("v*.avsc")))


def local_versions(topic: str, schema_dir: Path = SCHEMA_DIR) -> tuple[dict[str, Any], ...]:
    """Every version of ``topic``'s schema in ``schemas/``, oldest first; ``KeyError`` if none."""
    paths = sorted((schema_dir / topic).glob("v*.avsc"), key=lambda p: int(p.stem[1:]))
    if not paths:
        raise KeyError(f"no schema for topic {topic!r} under {schema_dir}")
    return tuple(json.loads(p.read_text()) for p in paths)


def compatibility(topic: str, schema_dir: Path = SCHEMA_DIR) -> str:
    """The subject's compatibility level from ``schemas/<topic>/compatibility`` (default BACKWARD)."""
    path = schema_dir / topic / "compatibility"
    return path.read_text().strip().upper() if path.exists() else DEFAULT_COMPATIBILITY


class Catalog:
    """Schema ids for this process: the topics' reader schemas and every writer schema by id.

    ``roots`` are the schema folders it knows (default: those :func:`set_roots` set).
    Without a registry it knows only those folders (ids from :func:`schema_id_of`).
    With one, ids are the registry's and an id seen for the first time is
    fetched from it (then cached). ``writer`` returns ``None`` for an id no one
    registered, and remembers that for ``UNKNOWN_ID_TTL_S``: a burst of garbage
    framed with one id costs one lookup, not one per message (300 such records
    once cost 10 s of registry round trips, past the consumer's poll interval,
    so their batch never completed). A registry that cannot be reached raises
    (that is an outage, not bad input).
    """

    def __init__(self, registry: Any | None = None, roots: tuple[Path, ...] | None = None,
                 generated: dict[str, dict[str, Any]] | None = None) -> None:
        self.registry = registry  # a confluent_kafka.schema_registry.SchemaRegistryClient
        self.roots = roots if roots is not None else _roots
        self.generated = dict(generated if generated is not None else _generated)
        self._current: dict[str, Subject] = {}
        self._writers: dict[int, Any] = {}
        self._unknown: dict[int, float] = {}  # id -> monotonic time until which it is known to be unknown
        self._lock = threading.Lock()
        if registry is None:
            self._index_local()

    def local(self) -> list[tuple[str, tuple[dict[str, Any], ...], str]]:
        """Every subject this catalog knows without a registry: (topic, its versions oldest first, compatibility
        level), from the folders and the generated subjects. A topic defined twice is an error."""
        seen: dict[str, str] = {}
        out = []
        for root in self.roots:
            for topic in topics(root):
                if topic in seen:
                    raise ValueError(f"topic {topic!r} has schemas in both {seen[topic]} and {root}")
                seen[topic] = str(root)
                out.append((topic, local_versions(topic, root), compatibility(topic, root)))
        for topic, raw in self.generated.items():
            if topic in seen:
                raise ValueError(f"topic {topic!r} has schemas in {seen[topic]} and generated ones")
            out.append((topic, (raw,), DEFAULT_COMPATIBILITY))
        return out

    def _index_local(self) -> None:
        for topic, versions, _ in self.local():
            for version, raw in enumerate(versions, start=1):
                self._add(Subject(topic, version, schema_id_of(raw), raw, fastavro.parse_schema(raw)))

    def _add(self, sub: Subject) -> None:
        self._writers[sub.schema_id] = sub.parsed
        if sub.topic not in self._current or self._current[sub.topic].version <= sub.version:
            self._current[sub.topic] = sub

    def register_local(self) -> None:
        """Register every version of every subject in the known folders with the registry, oldest first."""
        from confluent_kafka.schema_registry import Schema

        assert self.registry is not None
        for topic, versions, level in self.local():
            name = subject_name(topic)
            self.registry.set_compatibility(name, level)
            for version, raw in enumerate(versions, start=1):
                sid = self.registry.register_schema(name, Schema(json.dumps(raw), "AVRO"))
                self._add(Subject(topic, version, sid, raw, fastavro.parse_schema(raw)))

    def current(self, topic: str) -> Subject:
        """The newest version of ``topic``'s schema (the reader schema); ``KeyError`` if none."""
        try:
            return self._current[topic]
        except KeyError:
            raise KeyError(f"no schema for topic {topic!r} under {', '.join(map(str, self.roots))}") from None

    def writer(self, schema_id: int) -> Any | None:
        """The parsed schema registered under ``schema_id``, or ``None`` if no such id exists."""
        found = self._writers.get(schema_id)
        if found is not None or self.registry is None:
            return found
        if self._unknown.get(schema_id, 0.0) > time.monotonic():
            return None
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            schema = self.registry.get_schema(schema_id)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                with self._lock:
                    if len(self._unknown) >= UNKNOWN_IDS_KEPT:
                        self._unknown.clear()
                    self._unknown[schema_id] = time.monotonic() + UNKNOWN_ID_TTL_S
                return None
            raise
        if schema.schema_type not in (None, "AVRO"):
            return None
        parsed = fastavro.parse_schema(json.loads(schema.schema_str))
        with self._lock:
            self._writers[schema_id] = parsed
        return parsed

    def register(self, topic: str, raw: dict[str, Any]) -> int:
        """Register ``raw`` as a writer schema of ``topic`` (the registry checks compatibility)."""
        parsed = fastavro.parse_schema(raw)
        if self.registry is None:
            sid = schema_id_of(raw)
        else:
            from confluent_kafka.schema_registry import Schema

            sid = self.registry.register_schema(subject_name(topic), Schema(json.dumps(raw), "AVRO"))
        with self._lock:
            self._writers[sid] = parsed
        return sid


_catalog: Catalog | None = None
_catalog_lock = threading.Lock()
_roots: tuple[Path, ...] = (SCHEMA_DIR,)
_generated: dict[str, dict[str, Any]] = {}


def set_roots(*extra: Path) -> None:
    """The schema folders this process knows: Weir's own ``schemas/`` plus ``extra`` (a project's). Drops a
    catalog that knows only local folders (it is rebuilt over the new ones); a registry catalog stays."""
    global _roots, _catalog
    with _catalog_lock:
        _roots = (SCHEMA_DIR, *(p.resolve() for p in extra if p.resolve() != SCHEMA_DIR))
        if _catalog is not None and _catalog.registry is None:
            _catalog = None


def set_generated(subjects: dict[str, dict[str, Any]]) -> None:
    """Subjects this process knows besides the folders' (topic -> schema, one version each): the ones a
    project's contracts generate. Drops a catalog that knows only local subjects, as :func:`set_roots`."""
    global _generated, _catalog
    with _catalog_lock:
        _generated = dict(subjects)
        if _catalog is not None and _catalog.registry is None:
            _catalog = None


def roots() -> tuple[Path, ...]:
    """The schema folders this process knows (see :func:`set_roots`)."""
    return _roots


def catalog() -> Catalog:
    """This process's catalog: the one :func:`use_registry` set, else one over the known folders alone."""
    global _catalog
    with _catalog_lock:
        if _catalog is None:
            _catalog = Catalog()
        return _catalog


SchemaState = tuple["Catalog | None", tuple[Path, ...], dict[str, dict[str, Any]]]


def schema_state() -> SchemaState:
    """This process's catalog, schema folders and generated subjects, for :func:`set_schema_state`."""
    with _catalog_lock:
        return _catalog, _roots, dict(_generated)


def set_schema_state(state: SchemaState) -> None:
    """Put back what :func:`schema_state` returned (a stack that used a project of its own, stopping)."""
    global _catalog, _roots, _generated
    with _catalog_lock:
        _catalog, _roots, _generated = state[0], state[1], dict(state[2])


def set_catalog(cat: Catalog | None) -> Catalog | None:
    """Make ``cat`` this process's catalog (``None``: back to the known folders alone); returns the previous one."""
    global _catalog
    with _catalog_lock:
        previous, _catalog = _catalog, cat
    return previous


def use_registry(url: str) -> Catalog:
    """Register the known folders' schemas with the registry at ``url`` and resolve ids through it from now on.

    Call before building codecs: a codec takes its writer id when it is made.
    Raises the registry's error when a local version is incompatible with
    what the subject already holds.
    """
    from confluent_kafka.schema_registry import SchemaRegistryClient

    cat = Catalog(SchemaRegistryClient({"url": url}))
    cat.register_local()
    set_catalog(cat)
    return cat


def register(topic: str, raw: dict[str, Any]) -> int:
    """Make ``raw`` a known writer schema of ``topic`` in this process's catalog; returns its id."""
    return catalog().register(topic, raw)


def subject(topic: str) -> Subject:
    """The newest version of ``topic``'s schema in this process's catalog."""
    return catalog().current(topic)
