"""``weir plan`` and ``weir apply``: what a project would change on a running stack, and registering it.

The *applied* state of a project is the newest ``weir.projects`` record of its
name: every feature view's and model's version with the fingerprint of its
definition, and the subjects registered for it. A plan compares the project
as declared now with it, and with the schema registry:

* each subject (the project's schema files, and the subjects generated from it:
  :mod:`streams.project.contracts`): versions the registry already holds are
  unchanged; a new one is tested against the registry under the subject's
  compatibility level, and an incompatible one is **refused**, with the
  registry's explanation;
* each view and model: new, a new version, or unchanged; one whose definition
  changed under the same version is **refused** ("bump its version"): its Redis
  keys, feature-log rows and registered artifacts would otherwise mix two
  definitions.

:func:`apply` carries out a plan with nothing refused: it registers the new
schema versions and records the applied state. ``weir up`` and ``weir demo``
apply on start and stop with the plan's refusals.
"""

from __future__ import annotations

import io
import json
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fastavro
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from streams import schemas
from streams import topics as T
from streams.kafka import DeliveryTracker, consumer_config, flush_or_raise, producer_config
from streams.project.contracts import generated
from streams.project.spec import Project

__all__ = [
    "Applied",
    "Change",
    "Plan",
    "PlanRefused",
    "applied_state",
    "apply",
    "check",
    "make_plan",
    "record_applied",
    "subjects_of",
]


class PlanRefused(Exception):
    """A project the running stack must not take as it is; ``plan`` says why, change by change."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        super().__init__(f"project {plan.project} cannot be applied:\n" + "\n".join(
            f"  - {c.line()}" for c in plan.refused))


@dataclass(frozen=True)
class Change:
    """One line of a plan: ``kind`` (schema, view or model), what, and ``action``: new, new version,
    unchanged or refused."""

    kind: str
    name: str
    action: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.kind} {self.name}: {self.action}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Plan:
    project: str
    changes: list[Change] = field(default_factory=list)
    compared: bool = True  # False: no running stack to compare with (everything reads as new)

    @property
    def refused(self) -> list[Change]:
        return [c for c in self.changes if c.action == "refused"]

    def lines(self) -> list[str]:
        order = {"refused": 0, "new": 1, "new version": 2, "unchanged": 3}
        head = f"project {self.project}: " + (
            "nothing to change" if all(c.action == "unchanged" for c in self.changes) else
            ", ".join(f"{n} {a}" for a, n in _counts(self.changes)))
        return [head] + [f"  {c.line()}" for c in sorted(self.changes, key=lambda c: (order[c.action], c.kind))]


def _counts(changes: list[Change]) -> Iterator[tuple[str, int]]:
    for action in ("refused", "new", "new version", "unchanged"):
        n = sum(c.action == action for c in changes)
        if n:
            yield action, n


@dataclass(frozen=True)
class Applied:
    """A project's applied state: (name, version, fingerprint) of each view and model; its subjects."""

    views: dict[str, tuple[int, str]]
    models: dict[str, tuple[int, str]]
    subjects: tuple[str, ...] = ()

    @classmethod
    def of(cls, project: Project) -> Applied:
        return cls({v.name: (v.version, v.fingerprint) for v in project.views},
                   {m.name: (m.version, m.fingerprint) for m in project.models}, tuple(sorted(subjects_of(project))))

    def record(self, project: str, now_ms: int) -> dict[str, Any]:
        def defs(d: dict[str, tuple[int, str]]) -> list[dict[str, Any]]:
            return [{"name": n, "version": v, "fingerprint": f} for n, (v, f) in sorted(d.items())]
        return {"project": project, "applied_ms": now_ms, "views": defs(self.views), "models": defs(self.models),
                "subjects": list(self.subjects)}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Applied:
        return cls({d["name"]: (d["version"], d["fingerprint"]) for d in rec["views"]},
                   {d["name"]: (d["version"], d["fingerprint"]) for d in rec["models"]}, tuple(rec["subjects"]))


def subjects_of(project: Project) -> dict[str, tuple[tuple[dict[str, Any], ...], str]]:
    """Topic -> (every version of its schema, oldest first; compatibility level) of the project's subjects."""
    out = {topic: (versions, level) for topic, versions, level in schemas.Catalog(
        roots=(project.schemas,), generated=generated(project)).local()}
    return out


# ---------------------------------------------------------------------------------------------------
# the applied state, in Kafka


def applied_state(bootstrap: str, registry: str, project: str, timeout_s: float = 10.0) -> Applied | None:
    """The newest applied state of ``project`` in ``weir.projects`` (None if it was never applied). Records are
    decoded with their writer schema fetched from ``registry`` by id, independently of this process's
    catalog (it may not be set up yet)."""
    consumer = Consumer(consumer_config(bootstrap, f"weir-plan-{time.time_ns()}", **{"enable.partition.eof": True}))
    try:
        meta = consumer.list_topics(T.PROJECTS, timeout=timeout_s).topics.get(T.PROJECTS)
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        consumer.assign([TopicPartition(T.PROJECTS, p, 0) for p in meta.partitions])
        left, newest = set(meta.partitions), None
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.2):
                err, value = m.error(), m.value()
                if err is not None or value is None:
                    if err is not None and err.code() == KafkaError._PARTITION_EOF:
                        left.discard(m.partition())
                    continue
                rec = _decode(registry, value)
                if rec["project"] == project and (newest is None or rec["applied_ms"] >= newest["applied_ms"]):
                    newest = rec
        return None if newest is None else Applied.from_record(newest)
    finally:
        consumer.close()


def _reader() -> dict[str, Any]:
    return schemas.local_versions(T.PROJECTS)[-1]


def _decode(registry: str, value: bytes) -> dict[str, Any]:
    sid = struct.unpack_from(">I", value, 1)[0]
    status, reply = _call(f"{registry}/schemas/ids/{sid}")
    if status != 200:
        raise RuntimeError(f"{T.PROJECTS}: schema id {sid} is not in the registry at {registry} ({reply})")
    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), fastavro.parse_schema(json.loads(reply["schema"])),
                                        fastavro.parse_schema(_reader()))
    assert isinstance(record, dict)
    return record


def record_applied(bootstrap: str, registry: str, project: Project) -> None:
    """Record ``project`` as applied (its views', models' and subjects' state now) in ``weir.projects``."""
    status, reply = _call(f"{registry}/subjects/{schemas.subject_name(T.PROJECTS)}/versions", "POST",
                          {"schema": json.dumps(_reader())})
    if status != 200:
        raise RuntimeError(f"the registry at {registry} refused the schema of {T.PROJECTS}: {reply}")
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, reply["id"]))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(_reader()),
                               Applied.of(project).record(project.name, int(time.time() * 1000)))
    tracker = DeliveryTracker()
    producer = Producer(producer_config(bootstrap), on_delivery=tracker)
    producer.produce(T.PROJECTS, buf.getvalue(), project.name.encode())
    flush_or_raise(producer, tracker)


# ---------------------------------------------------------------------------------------------------
# the registry, through its REST API (Weir's own or any Confluent-compatible one)


def _call(url: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _registered(registry: str, subject: str, raw: dict[str, Any]) -> bool:
    status, _ = _call(f"{registry}/subjects/{subject}", "POST", {"schema": json.dumps(raw)})
    return status == 200


def _incompatibility(registry: str, subject: str, raw: dict[str, Any]) -> list[str]:
    """Why the registry would refuse ``raw`` as the subject's next version (empty: it would take it)."""
    status, reply = _call(f"{registry}/compatibility/subjects/{subject}/versions/latest?verbose=true", "POST",
                          {"schema": json.dumps(raw)})
    if status == 404:  # no version yet: anything goes
        return []
    if status != 200:
        return [f"the registry answered {status}: {reply}"]
    return [] if reply.get("is_compatible") else (reply.get("messages") or ["incompatible"])


# ---------------------------------------------------------------------------------------------------
# planning and applying


def make_plan(project: Project, registry: str | None, applied: Applied | None) -> Plan:
    """What applying ``project`` would change (``registry`` None: no stack to compare with)."""
    plan = Plan(project.name, compared=registry is not None)
    for topic, (versions, level) in sorted(subjects_of(project).items()):
        subject = schemas.subject_name(topic)
        if registry is None:
            plan.changes.append(Change("schema", subject, "new", f"{len(versions)} version(s), {level}"))
            continue
        fresh = [i for i, raw in enumerate(versions, start=1) if not _registered(registry, subject, raw)]
        if not fresh:
            plan.changes.append(Change("schema", subject, "unchanged", f"{len(versions)} version(s)"))
            continue
        why = _incompatibility(registry, subject, versions[fresh[0] - 1])
        if why:
            plan.changes.append(Change("schema", subject, "refused",
                                       f"v{fresh[0]} is not {level}-compatible: {'; '.join(why)}"))
        else:
            kind = "new" if len(fresh) == len(versions) else "new version"
            plan.changes.append(Change("schema", subject, kind, f"v{', v'.join(map(str, fresh))}, {level}: compatible"))
    for kind, declared, before in (("view", {v.name: (v.version, v.fingerprint) for v in project.views},
                                    applied.views if applied else {}),
                                   ("model", {m.name: (m.version, m.fingerprint) for m in project.models},
                                    applied.models if applied else {})):
        for name, (version, fp) in declared.items():
            plan.changes.append(_definition(kind, name, version, fp, before.get(name)))
    return plan


def _definition(kind: str, name: str, version: int, fp: str, before: tuple[int, str] | None) -> Change:
    if before is None:
        return Change(kind, name, "new", f"v{version}")
    old_version, old_fp = before
    if version == old_version:
        if fp == old_fp:
            return Change(kind, name, "unchanged", f"v{version}")
        return Change(kind, name, "refused", f"its definition changed under v{version} (fingerprint {fp}, applied "
                                             f"{old_fp}): bump its version")
    if version < old_version:
        return Change(kind, name, "refused", f"v{version} is older than the applied v{old_version}")
    what = "its online values and feature-log rows start afresh" if kind == "view" else \
        "versions trained for another definition no longer serve: it is retrained"
    return Change(kind, name, "new version", f"v{old_version} -> v{version}: {what}")


def check(project: Project, bootstrap: str, registry: str) -> Plan:
    """The plan of ``project`` against the running stack; raises :class:`PlanRefused` when it refuses anything."""
    plan = make_plan(project, registry, applied_state(bootstrap, registry, project.name))
    if plan.refused:
        raise PlanRefused(plan)
    return plan


def apply(project: Project, bootstrap: str, registry: str) -> Plan:
    """Plan ``project`` against the stack and, if nothing is refused, register its new schema versions and
    record its applied state; raises :class:`PlanRefused` otherwise (nothing is changed then)."""
    plan = check(project, bootstrap, registry)
    for topic, (versions, level) in subjects_of(project).items():
        subject = schemas.subject_name(topic)
        _call(f"{registry}/config/{subject}", "PUT", {"compatibility": level})
        for raw in versions:
            status, reply = _call(f"{registry}/subjects/{subject}/versions", "POST", {"schema": json.dumps(raw)})
            if status != 200:  # the plan said it would pass: a concurrent change
                raise PlanRefused(Plan(project.name, [Change("schema", subject, "refused", str(reply))]))
    record_applied(bootstrap, registry, project)
    return plan
