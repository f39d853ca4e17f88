"""Weir's own topic names, the topics of a project, and the partitioner internal micro-batch topics use.

A project's topics (its sources', its models' prediction topics, and its
internal ones) come from :func:`project_topics`. Weir's public topics below are
shared by every project on a stack (their records name their model); its
internal topics are the project's own, named ``weir.<project>.<name>``
(:func:`internal`), so that several projects can share a Kafka cluster.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.project.spec import Project

ALERTS = "alerts"
RETRAIN = "retrain"
MODEL_EVENTS = "model.events"
MODEL_METRICS = "model.metrics"
MODEL_COMMANDS = "model.commands"

# internal (Weir's own business): micro-batched per partition, except outcomes. Each project has its own
# (`internal(project, I_SCORED)` is `weir.<project>.scored`); the names here are their schemas' subjects.
I_SCORED = "weir.scored"  # inference -> learn: served vectors and scores, every model's
I_OUTCOMES = "weir.outcomes"  # learn -> drift: scored events joined with their labels
I_FEATURE_LOG = "weir.feature_log"  # features -> ClickHouse feature_log
I_AUDIT = "weir.audit"  # prediction audit records, to ClickHouse prediction_audit
I_FEATURE_DRIFT = "weir.feature_drift"  # drift -> ClickHouse feature_drift: each window's inputs against a reference
PER_PROJECT = [I_SCORED, I_OUTCOMES, I_FEATURE_LOG, I_AUDIT, I_FEATURE_DRIFT]
# shared by every project
REPLAY = "weir.replay"  # `weir replay`: river datasets, one partition, created on demand
PROJECTS = "weir.projects"  # what `weir apply` registered of each project (views, models: versions, fingerprints)

PUBLIC = [ALERTS, RETRAIN, MODEL_EVENTS, MODEL_METRICS, MODEL_COMMANDS]
INTERNAL = [PROJECTS]


def internal(project: Project, name: str) -> str:
    """The project's own topic of one of Weir's internal ones: ``weir.scored`` -> ``weir.<project>.scored``."""
    return f"weir.{project.name}.{name.removeprefix('weir.')}"


def project_topics(project: Project) -> tuple[list[str], list[str]]:
    """(public, internal) topics of ``project``, Weir's own included."""
    from streams.project.contracts import internal_topics

    return PUBLIC + project.public_topics(), INTERNAL + [internal(project, t) for t in PER_PROJECT] + \
        internal_topics(project)


def all_topics(project: Project) -> list[str]:
    """Every topic a stack running ``project`` creates: public, internal and a dead-letter topic for each."""
    public, internal = project_topics(project)
    return public + internal + [f"dlq.{t}" for t in public + internal]


def partition_for(key: str, partitions: int) -> int:
    """Stable partition of an entity key (CRC-32), the same in every process."""
    return zlib.crc32(key.encode()) % partitions
