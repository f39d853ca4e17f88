"""The registry's state — subjects, versions, schema ids, compatibility config — durable in a Kafka topic.

Durability contract: every change is produced to the topic and acknowledged by
Kafka (``acks=all``, flushed) *before* the in-memory state changes and before
the caller (the HTTP handler) answers; a write Kafka does not acknowledge
raises ``StoreError`` and changes nothing. ``start()`` rebuilds the state by
replaying the topic from its beginning to its end, so a new store on the same
topic answers exactly what the old one did.

The topic is compacted, one partition (one total order), in the spirit of
Confluent's own ``_schemas``: the key is JSON naming what a record is about,
the value the JSON record, a null value deletes it::

    {"keytype":"SCHEMA","subject":"clicks-value","version":2,"magic":1}
      -> {"subject":"clicks-value","version":2,"id":17,"schema":"{...}","deleted":false}
    {"keytype":"CONFIG","subject":"clicks-value","magic":0}   (subject null = global)
      -> {"compatibilityLevel":"FULL"}

One store writes to a topic at a time (Confluent elects a leader for this;
Weir runs one registry). Schema ids follow Confluent: one schema, one id, in
every subject. Weir picks the id deterministically — ``schema_id_of`` (CRC-31
of the Parsing Canonical Form), or the next free id when that one already
belongs to a different schema. "The same schema" means the same normalized
JSON (key order and whitespace do not matter; defaults, docs and custom
attributes such as ``"pii"`` do) — not the Parsing Canonical Form, which drops
defaults, so adding a default would otherwise be silently ignored.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Literal

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streams.kafka import DeliveryTracker, flush_or_raise, producer_config
from streams.registry import compat
from streams.schemas import schema_id_of

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "_schemas"
_MAX_ID = 0x7FFFFFFF

VersionRef = int | Literal["latest"]


# --- errors: each carries the Confluent error code and HTTP status the server answers with ---

class RegistryError(Exception):
    """A request the registry refuses; ``error_code`` and ``http_status`` are Confluent's."""

    error_code = 50001
    http_status = 500


class SubjectNotFound(RegistryError):
    error_code, http_status = 40401, 404


class VersionNotFound(RegistryError):
    error_code, http_status = 40402, 404


class SchemaNotFound(RegistryError):
    error_code, http_status = 40403, 404


class SubjectNotSoftDeleted(RegistryError):
    error_code, http_status = 40405, 404


class VersionNotSoftDeleted(RegistryError):
    error_code, http_status = 40407, 404


class SubjectConfigNotFound(RegistryError):
    error_code, http_status = 40408, 404


class IncompatibleSchema(RegistryError):
    """The schema breaks the subject's compatibility level; ``messages`` say where and why."""

    error_code, http_status = 409, 409

    def __init__(self, subject: str, level: str, messages: list[str]) -> None:
        super().__init__(f"Schema being registered is incompatible with an earlier schema for subject "
                         f"'{subject}' ({level}): " + "; ".join(messages))
        self.messages = messages


class InvalidSchema(RegistryError):
    error_code, http_status = 42201, 422


class InvalidVersion(RegistryError):
    error_code, http_status = 42202, 422


class InvalidCompatibilityLevel(RegistryError):
    error_code, http_status = 42203, 422


class StoreError(RegistryError):
    """Kafka did not acknowledge a write, or the topic could not be read."""

    error_code, http_status = 50001, 500


@dataclass(frozen=True)
class RegisteredVersion:
    """One version of one subject. ``schema`` is the schema's JSON text as stored."""

    subject: str
    version: int
    schema_id: int
    schema: str
    deleted: bool = False


@lru_cache(maxsize=4096)
def canonical(schema: str) -> str:
    """The identity of a schema: normalized JSON of the parsed schema. ``InvalidSchema`` if it is not one."""
    try:
        parsed = compat.parse(schema)
    except compat.SchemaParseError as exc:
        raise InvalidSchema(str(exc)) from exc
    return json.dumps(parsed.to_json(), sort_keys=True, separators=(",", ":"))


def parse_version(version: str | int) -> VersionRef:
    """``"latest"``/``-1`` or a positive version number; ``InvalidVersion`` otherwise."""
    if version == "latest":
        return "latest"
    try:
        number = int(version)
    except (TypeError, ValueError):
        number = 0
    if number == -1:
        return "latest"
    if number < 1 or number > _MAX_ID:
        raise InvalidVersion(f"The specified version '{version}' is not a valid version id. Allowed values are "
                             f"between [1, {_MAX_ID}] and the string \"latest\"")
    return number


def ensure_schemas_topic(bootstrap: str, topic: str = DEFAULT_TOPIC, timeout: float = 10.0) -> None:
    """Create ``topic`` compacted with one partition if missing; ``StoreError`` if it has more partitions."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(timeout=timeout)
    if topic not in meta.topics:
        new = NewTopic(topic, num_partitions=1, replication_factor=1, config={"cleanup.policy": "compact"})
        for name, fut in admin.create_topics([new], operation_timeout=timeout).items():
            try:
                fut.result()
                log.info("created schema topic %s", name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise StoreError(f"cannot create schema topic {name}: {exc}") from exc
        meta = admin.list_topics(topic=topic, timeout=timeout)
    partitions = len(meta.topics[topic].partitions)
    if partitions != 1:
        # Versions and ids are assigned in one total order; a broker that re-created the
        # topic with several partitions (Tansu after a restart) has lost it.
        raise StoreError(f"schema topic {topic} has {partitions} partitions, expected 1")


class SchemaStore:
    """Thread-safe registry state over one compacted Kafka topic; see the module docstring for durability."""

    def __init__(self, bootstrap: str, topic: str = DEFAULT_TOPIC, *, timeout: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self._lock = threading.RLock()
        self._subjects: dict[str, dict[int, RegisteredVersion]] = {}
        self._ids: dict[int, str] = {}  # id -> schema text
        self._id_of: dict[str, int] = {}  # canonical form -> id
        self._config: dict[str | None, str] = {}  # None = global
        self._producer: Producer | None = None
        self._tracker = DeliveryTracker()

    # --- lifecycle ---

    def start(self) -> SchemaStore:
        """Ensure the topic, replay it from the beginning to its end, open the producer. Blocks."""
        ensure_schemas_topic(self.bootstrap, self.topic)
        with self._lock:
            self._replay()
            self._producer = Producer(producer_config(self.bootstrap, **{"linger.ms": 0}))
        return self

    def close(self) -> None:
        """Flush and drop the producer; the state stays readable."""
        with self._lock:
            if self._producer is not None:
                self._producer.flush(self.timeout)
                self._producer = None

    def _replay(self) -> None:
        # Tansu's ListOffsets high-water marks are wrong (docs/runtime.md), so the end of the log is
        # the partition-EOF event of a plain assign(); no group is joined, nothing is committed.
        consumer = Consumer({
            "bootstrap.servers": self.bootstrap,
            "group.id": f"weir-registry-replay-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 5,
        })
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            records = 0
            while True:
                msg = consumer.poll(self.timeout)
                if msg is None:
                    raise StoreError(f"no end of schema topic {self.topic} within {self.timeout:.0f}s")
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        break
                    raise StoreError(f"reading schema topic {self.topic}: {err}")
                self._apply_message(msg)
                records += 1
            log.info("schema store replayed %d records from %s: %d subjects, %d ids",
                     records, self.topic, len(self._subjects), len(self._ids))
        finally:
            consumer.close()

    def _apply_message(self, msg: Message) -> None:
        raw_key, raw_value = msg.key(), msg.value()
        try:
            key = json.loads(raw_key) if raw_key else None
            value = json.loads(raw_value) if raw_value else None
        except ValueError:
            log.warning("skipping undecodable record at %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
            return
        if not isinstance(key, dict) or (isinstance(value, dict) and value.get("schemaType", "AVRO") != "AVRO"):
            return  # not a record Weir writes (another tool's, or a non-Avro schema)
        try:
            self._apply(key, value)
        except (RegistryError, KeyError, TypeError, ValueError) as exc:
            log.warning("skipping invalid record at %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(),
                        type(exc).__name__)

    # --- applying records: the one place state changes, for replay and for live writes alike ---

    def _apply(self, key: dict[str, Any], value: dict[str, Any] | None) -> None:
        keytype = key.get("keytype")
        if keytype == "SCHEMA":
            subject, version = str(key["subject"]), int(key["version"])
            if value is None:
                self._subjects.get(subject, {}).pop(version, None)
                if not self._subjects.get(subject):
                    self._subjects.pop(subject, None)
                self._forget_unused_ids()
                return
            entry = RegisteredVersion(subject, version, int(value["id"]), str(value["schema"]),
                                      bool(value.get("deleted", False)))
            self._subjects.setdefault(subject, {})[version] = entry
            self._ids.setdefault(entry.schema_id, entry.schema)
            self._id_of.setdefault(canonical(entry.schema), entry.schema_id)
        elif keytype == "CONFIG":
            target = key.get("subject")
            if value is None:
                self._config.pop(target, None)
            else:
                self._config[target] = str(value["compatibilityLevel"])
        # Other key types (NOOP, MODE, DELETE_SUBJECT of a Confluent-written topic) carry nothing Weir keeps.

    def _forget_unused_ids(self) -> None:
        used = {v.schema_id for versions in self._subjects.values() for v in versions.values()}
        for schema_id in [i for i in self._ids if i not in used]:
            del self._ids[schema_id]
        self._id_of = {c: i for c, i in self._id_of.items() if i in used}

    def _write(self, records: list[tuple[dict[str, Any], dict[str, Any] | None]]) -> None:
        """Produce ``records``, wait for Kafka's acknowledgement, then apply them; ``StoreError`` if not acked."""
        if self._producer is None:
            raise StoreError("schema store is not started")
        try:
            for key, value in records:
                self._producer.produce(
                    self.topic,
                    key=json.dumps(key, separators=(",", ":")).encode(),
                    value=None if value is None else json.dumps(value, separators=(",", ":")).encode(),
                    on_delivery=self._tracker,
                )
            flush_or_raise(self._producer, self._tracker, self.timeout)
        except (RuntimeError, BufferError, KafkaException) as exc:
            self._producer.purge(in_queue=True, in_flight=False)
            raise StoreError(f"schema topic {self.topic} did not acknowledge the write: {exc}") from exc
        for key, value in records:
            self._apply(key, value)

    @staticmethod
    def _schema_record(v: RegisteredVersion) -> tuple[dict[str, Any], dict[str, Any]]:
        key = {"keytype": "SCHEMA", "subject": v.subject, "version": v.version, "magic": 1}
        value = {"subject": v.subject, "version": v.version, "id": v.schema_id, "schema": v.schema,
                 "deleted": v.deleted}
        return key, value

    @staticmethod
    def _config_key(subject: str | None) -> dict[str, Any]:
        return {"keytype": "CONFIG", "subject": subject, "magic": 0}

    # --- reads ---

    def subjects(self, *, deleted: bool = False, deleted_only: bool = False, prefix: str = "") -> list[str]:
        """Subjects with a live version (``deleted``: also soft-deleted ones; ``deleted_only``: only those)."""
        with self._lock:
            out = []
            for name, versions in self._subjects.items():
                live = any(not v.deleted for v in versions.values())
                if name.startswith(prefix) and ((not live) if deleted_only else (live or deleted)):
                    out.append(name)
            return sorted(out)

    def _versions_of(self, subject: str, deleted: bool) -> list[RegisteredVersion]:
        found = [v for _, v in sorted(self._subjects.get(subject, {}).items()) if deleted or not v.deleted]
        if not found:
            raise SubjectNotFound(f"Subject '{subject}' not found.")
        return found

    def versions(self, subject: str, *, deleted: bool = False, deleted_only: bool = False) -> list[int]:
        """Version numbers of ``subject``, oldest first; ``SubjectNotFound`` if it has none."""
        with self._lock:
            found = self._versions_of(subject, deleted or deleted_only)
            return [v.version for v in found if v.deleted or not deleted_only]

    def get_version(self, subject: str, version: VersionRef, *, deleted: bool = False) -> RegisteredVersion:
        """One version (``"latest"``: the newest live one); ``SubjectNotFound``/``VersionNotFound``."""
        with self._lock:
            found = self._versions_of(subject, deleted)
            if version == "latest":
                return found[-1]
            for v in found:
                if v.version == version:
                    return v
            raise VersionNotFound(f"Version {version} not found.")

    def schema(self, schema_id: int) -> str:
        """The schema text with ``schema_id``; ``SchemaNotFound`` if none."""
        with self._lock:
            if schema_id not in self._ids:
                raise SchemaNotFound(f"Schema {schema_id} not found")
            return self._ids[schema_id]

    def versions_of_id(self, schema_id: int, *, deleted: bool = False) -> list[RegisteredVersion]:
        """Every (subject, version) registered with ``schema_id``; ``SchemaNotFound`` if the id is unknown."""
        with self._lock:
            self.schema(schema_id)
            return [v for name in sorted(self._subjects) for _, v in sorted(self._subjects[name].items())
                    if v.schema_id == schema_id and (deleted or not v.deleted)]

    def lookup(self, subject: str, schema: str, *, deleted: bool = False) -> RegisteredVersion:
        """The version of ``subject`` holding ``schema`` (same normalized JSON); ``SchemaNotFound`` if none."""
        identity = canonical(schema)
        with self._lock:
            for v in reversed(self._versions_of(subject, deleted)):
                if canonical(v.schema) == identity:
                    return v
            raise SchemaNotFound("Schema not found")

    # --- compatibility ---

    def compatibility(self, subject: str | None = None) -> str:
        """The level in force for ``subject`` (its own, else the global one, else BACKWARD)."""
        with self._lock:
            return self._config.get(subject) or self._config.get(None) or compat.DEFAULT_LEVEL

    def subject_compatibility(self, subject: str) -> str:
        """``subject``'s own level; ``SubjectConfigNotFound`` if it has none."""
        with self._lock:
            if subject not in self._config:
                raise SubjectConfigNotFound(f"Subject '{subject}' does not have subject-level compatibility "
                                            "configured")
            return self._config[subject]

    def set_compatibility(self, level: str, subject: str | None = None) -> str:
        """Set and persist the level for ``subject`` (None: global); ``InvalidCompatibilityLevel``."""
        try:
            level = compat.check_level(level)
        except compat.UnknownLevel as exc:
            raise InvalidCompatibilityLevel(str(exc)) from exc
        with self._lock:
            self._write([(self._config_key(subject), {"compatibilityLevel": level})])
        return level

    def delete_compatibility(self, subject: str | None = None) -> str:
        """Remove ``subject``'s own level (None: the global one, back to BACKWARD); returns the old one."""
        with self._lock:
            if subject is not None and subject not in self._config:
                raise SubjectConfigNotFound(f"Subject '{subject}' does not have subject-level compatibility "
                                            "configured")
            previous = self._config.get(subject, compat.DEFAULT_LEVEL)
            if subject in self._config:
                self._write([(self._config_key(subject), None)])
            return previous

    def check(self, subject: str, schema: str, version: VersionRef | None = None) -> list[str]:
        """Why ``schema`` may not be registered under ``subject``; empty when it may.

        ``version=None`` checks against the versions the subject's level names (the
        latest, or all for ``*_TRANSITIVE``); a version checks against that one only,
        in the level's direction(s). An unknown subject makes every schema compatible
        only when ``version`` is None.
        """
        canonical(schema)  # InvalidSchema before anything else
        with self._lock:
            level = self.compatibility(subject)
            if version is None:
                earlier = [v for v in self._subjects.get(subject, {}).values() if not v.deleted]
                earlier.sort(key=lambda v: v.version)
            else:
                earlier = [self.get_version(subject, version)]
                level = level.removesuffix("_TRANSITIVE")
            return compat.problems(schema, [v.schema for v in earlier], level,
                                   versions=[v.version for v in earlier])

    # --- writes ---

    def register(self, subject: str, schema: str) -> RegisteredVersion:
        """Register ``schema`` under ``subject``; returns the new version, or the live one already holding it.

        Checks compatibility under the subject's level first (``IncompatibleSchema``
        with the messages). Durable before it returns (module docstring).
        """
        identity = canonical(schema)
        with self._lock:
            for v in self._subjects.get(subject, {}).values():
                if not v.deleted and canonical(v.schema) == identity:
                    return v
            messages = self.check(subject, schema)
            if messages:
                raise IncompatibleSchema(subject, self.compatibility(subject), messages)
            number = max(self._subjects.get(subject, {}), default=0) + 1  # soft-deleted numbers stay taken
            schema_id = self._id_for(identity, schema)
            text = self._ids.get(schema_id) or json.dumps(json.loads(schema), separators=(",", ":"))
            entry = RegisteredVersion(subject, number, schema_id, text)
            self._write([self._schema_record(entry)])
            log.info("registered %s version %d with schema id %d", subject, number, schema_id)
            log.debug("schema of %s version %d: %s", subject, number, text)
            return entry

    def _id_for(self, identity: str, schema: str) -> int:
        """The id this schema has in any subject, else its CRC-31 id, else the next free one."""
        if identity in self._id_of:
            return self._id_of[identity]
        schema_id = schema_id_of(json.loads(schema))
        while schema_id in self._ids:
            schema_id = schema_id % _MAX_ID + 1
        return schema_id

    def delete_subject(self, subject: str, *, permanent: bool = False) -> list[int]:
        """Soft-delete every live version (``permanent``: erase soft-deleted ones); returns their numbers."""
        with self._lock:
            if permanent:
                found = self._versions_of(subject, deleted=True)
                if any(not v.deleted for v in found):
                    raise SubjectNotSoftDeleted(f"Subject '{subject}' was not deleted first before being "
                                                "permanently deleted")
                records: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
                    (self._schema_record(v)[0], None) for v in found]
                if subject in self._config:
                    records.append((self._config_key(subject), None))
            else:
                found = self._versions_of(subject, deleted=False)
                records = [self._schema_record(replace(v, deleted=True)) for v in found]
            self._write(records)
            log.info("deleted subject %s (%s), versions %s", subject, "permanent" if permanent else "soft",
                     [v.version for v in found])
            return [v.version for v in found]

    def delete_version(self, subject: str, version: VersionRef, *, permanent: bool = False) -> int:
        """Soft-delete one version (``permanent``: erase a soft-deleted one); returns its number."""
        with self._lock:
            entry = self.get_version(subject, version, deleted=permanent)
            if permanent:
                if not entry.deleted:
                    raise VersionNotSoftDeleted(f"Subject '{subject}' Version {entry.version} was not deleted "
                                                "first before being permanently deleted")
                self._write([(self._schema_record(entry)[0], None)])
            else:
                self._write([self._schema_record(replace(entry, deleted=True))])
            log.info("deleted %s version %d (%s)", subject, entry.version, "permanent" if permanent else "soft")
            return entry.version

    def dump(self) -> dict[str, Any]:
        """A snapshot of the whole state (subjects, ids, config), for tests and diagnostics."""
        with self._lock:
            return {
                "subjects": {s: [v for _, v in sorted(vs.items())] for s, vs in sorted(self._subjects.items())},
                "ids": dict(sorted(self._ids.items())),
                "config": {("" if k is None else k): v for k, v in self._config.items()},
            }
