"""The contracts Weir derives from a project: internal topics and their Avro schemas, prediction schemas.

Per source, ingest writes its validated events to ``weir.<project>.silver.<source>``:
Avro micro-batches (one message per destination partition per batch), each
event a record of ``event_id`` (string), ``ts_ms`` (event time, epoch ms),
``source_ms`` (when the source message was produced: the latency origin) and
the source's kept ``fields``, with the types of the source schema (enums as
strings, ``timestamp-millis`` as epoch-ms longs), every one nullable with a
null default, so that keeping another field later stays a compatible change.
The features stage forwards the events of each scored source to
``weir.<project>.scoring.<source>``: the same records plus ``served``, the values of
the views over that source as of each event. Both schemas are generated here
and registered like the files in ``schemas/`` (subject ``<topic>-value``).

A model's predictions (``predictions.<model>``, its online learner's
``predictions.<model>.online`` and its shadows' ``predictions.shadow.<model>``)
follow the schema the project declares in its ``schemas`` folder for that
topic, or else the one generated here: the event id, the model's key field,
the carried fields, and Weir's prediction fields (:data:`PREDICTION_FIELDS`).
Online predictions carry the key only (the online learner sees the served
vector, not the event).
"""

from __future__ import annotations

import re
from typing import Any

from streams import schemas
from streams.project.fields import FieldType, record_fields, row_fields
from streams.project.spec import Model, Project, Source

__all__ = [
    "PREDICTION_FIELDS",
    "RESERVED",
    "avro_type",
    "generated",
    "internal_topics",
    "prediction_fields",
    "prediction_schema",
    "scoring_schema",
    "scoring_topic",
    "silver_ddl",
    "silver_schema",
    "silver_table",
    "silver_topic",
    "source_fields",
    "tables",
    "use_project",
]

RESERVED = ("event_id", "ts_ms", "source_ms", "served")
"""Names every internal event record has: a source may not keep a field so named."""

_TS = {"type": "long", "logicalType": "timestamp-millis"}

PREDICTION_FIELDS: tuple[dict[str, Any], ...] = (
    {"name": "score", "type": "double", "doc": "a binary model's probability of the positive class; a "
                                               "regression's predicted value"},
    {"name": "model_name", "type": "string"},
    {"name": "model_version", "type": "string", "doc": "the version that served, e.g. eta-v3"},
    {"name": "latency_ms", "type": "double", "doc": "from the source message's production to this prediction"},
    {"name": "event_ts", "type": _TS, "doc": "the scored event's time"},
    {"name": "predicted_ts", "type": _TS},
    {"name": "decision", "type": ["null", "boolean"], "default": None,
     "doc": "a binary model's score >= threshold; null for a regression"},
    {"name": "threshold", "type": ["null", "double"], "default": None},
    {"name": "route", "type": "string", "default": "champion", "doc": "champion, canary or shadow"},
    {"name": "served_by", "type": "string", "default": "model", "doc": "model, cache, online or rules"},
    {"name": "degraded", "type": "boolean", "default": False,
     "doc": "served without the online feature store (last-known values or defaults)"},
)
"""Weir's own fields of every prediction, after the event id, the key and the carried fields."""


def source_fields(project: Project, source: Source) -> dict[str, FieldType]:
    """The fields of ``source``'s events (a CDC source: the row's), from its topic's newest schema.

    Raises ``KeyError`` when the topic has no schema under the project's ``schemas`` folder, and
    ``ValueError`` when a CDC source's schema is not a Debezium envelope."""
    raw = schemas.local_versions(source.topic, project.schemas)[-1]
    if source.cdc is None:
        return record_fields(raw)
    row = row_fields(raw)
    if row is None:
        raise ValueError(f"the schema of {source.topic} is not a Debezium envelope (before, after, op) "
                         "with one row record")
    return row


def use_project(project: Project) -> None:
    """Make this process's schema catalog know ``project``: its schema folder and generated subjects.

    A catalog that resolves ids through a registry (:func:`streams.schemas.use_registry`) knows what it
    registered when it was made: call this first, then ``use_registry`` (as :class:`~streams.stack.Stack`
    does)."""
    schemas.set_roots(project.schemas)
    schemas.set_generated(generated(project))


def _avro_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def silver_topic(project: Project, source: Source) -> str:
    return f"weir.{project.name}.silver.{source.name}"


def silver_table(source: Source) -> str:
    """The ClickHouse table of a source's silver events."""
    return f"silver_{_avro_name(source.name)}"


def scoring_topic(project: Project, source: Source) -> str:
    return f"weir.{project.name}.scoring.{source.name}"


def avro_type(t: FieldType) -> str:
    """The Avro type a kept field travels as inside Weir (enums as strings, timestamps as epoch ms)."""
    if t.kind == "enum":
        return "string"
    return t.kind


def _event_fields(project: Project, source: Source) -> list[dict[str, Any]]:
    types = source_fields(project, source)
    out: list[dict[str, Any]] = [
        {"name": "event_id", "type": "string"},
        {"name": "ts_ms", "type": "long", "doc": "event time, epoch ms"},
        {"name": "source_ms", "type": "long", "doc": "when the source message was produced (latency origin)"},
    ]
    out += [{"name": name, "type": ["null", avro_type(types[name])], "default": None} for name in source.fields]
    return out


def _batch(name: str, namespace: str, fields: list[dict[str, Any]], doc: str) -> dict[str, Any]:
    return {"type": "record", "name": f"{name}Batch", "namespace": namespace, "doc": doc, "fields": [
        {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": name, "fields": fields}}}]}


def silver_schema(project: Project, source: Source) -> dict[str, Any]:
    """The micro-batch schema of ``weir.<project>.silver.<source>``."""
    return _batch("Event", f"weir.silver.{_avro_name(source.name)}", _event_fields(project, source),
                  f"Validated, deduplicated, pseudonymized events of source {source.name} ({source.topic}).")


def scoring_schema(project: Project, source: Source) -> dict[str, Any]:
    """The micro-batch schema of ``weir.<project>.scoring.<source>``: silver events plus the served view values."""
    served = {"name": "served", "type": ["null", {"type": "map", "values": {"type": "array", "items": "double"}}],
              "default": None, "doc": "per view ('card:v3'), the values the features stage computed for this "
                                      "event, as of it: inference serves them instead of reading the online store"}
    return _batch("Event", f"weir.scoring.{_avro_name(source.name)}", _event_fields(project, source) + [served],
                  f"Events of source {source.name} on their way to scoring.")


def prediction_fields(project: Project, model: Model, *, online: bool = False) -> list[dict[str, Any]]:
    """The fields of a prediction of ``model`` (its online learner's when ``online``)."""
    source = project.source(model.source)
    types = source_fields(project, source)
    key = model.key or source.partition_key
    head: list[dict[str, Any]] = [{"name": "event_id", "type": "string", "doc": "the scored event's id"},
                                  {"name": key, "type": "string", "doc": "the prediction's key"}]
    carried = [] if online else [n for n in model.carry if n not in (key, "event_id")]
    head += [{"name": n, "type": ["null", avro_type(types[n])], "default": None} for n in carried]
    return head + [dict(f) for f in PREDICTION_FIELDS]


def prediction_schema(project: Project, model: Model, *, online: bool = False) -> dict[str, Any]:
    """The generated schema of ``model`` 's prediction topic (or its online topic)."""
    return {"type": "record", "name": "Prediction", "namespace": f"weir.predictions.{_avro_name(model.name)}",
            "doc": f"One prediction of model {model.name}{' (online learner)' if online else ''}.",
            "fields": prediction_fields(project, model, online=online)}


_CLICKHOUSE = {"string": "String", "enum": "String", "boolean": "Bool", "int": "Int32", "long": "Int64",
               "float": "Float32", "double": "Float64"}


def silver_ddl(project: Project, source: Source) -> str:
    """The ClickHouse table of a source's silver events: id, event time, produce time and the kept fields
    (every one nullable, as in the silver schema); a re-delivered event collapses on its id (read ``FINAL``)."""
    types = source_fields(project, source)
    cols = "".join(f", `{name}` Nullable({_CLICKHOUSE[types[name].kind]})" for name in source.fields)
    return (f"CREATE TABLE IF NOT EXISTS {silver_table(source)} (event_id String, ts DateTime64(3, 'UTC'), "
            f"source_ts DateTime64(3, 'UTC'){cols}) ENGINE = ReplacingMergeTree ORDER BY event_id")


def tables(project: Project) -> list[str]:
    """The DDL of every table generated for ``project`` (one silver table per source)."""
    return [silver_ddl(project, s) for s in project.sources]


def internal_topics(project: Project) -> list[str]:
    """Every internal topic the project's stages use besides Weir's own."""
    scored = {m.source for m in project.models}
    return [silver_topic(project, s) for s in project.sources] + \
        [scoring_topic(project, project.source(n)) for n in sorted(scored)]


def generated(project: Project) -> dict[str, dict[str, Any]]:
    """Topic -> schema of every subject generated for ``project``: the silver and scoring topics, the
    prediction topics the project does not declare a schema for, and the project's own copies of Weir's
    internal topics (``weir.<project>.scored`` has the newest schema of ``weir.scored``: each topic its
    subject, as TopicNameStrategy has it)."""
    from streams import topics as T

    out = {T.internal(project, t): schemas.local_versions(t)[-1] for t in T.PER_PROJECT}
    out |= {silver_topic(project, s): silver_schema(project, s) for s in project.sources}
    for name in sorted({m.source for m in project.models}):
        source = project.source(name)
        out[scoring_topic(project, source)] = scoring_schema(project, source)
    for m in project.models:
        for topic, online in ((m.prediction_topic, False), (m.shadow_topic, False), (m.online_topic, True)):
            if not (project.schemas / topic).is_dir():
                out[topic] = prediction_schema(project, m, online=online)
    return out
