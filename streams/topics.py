"""Weir's own topic names, the topics of a project, and the partitioner internal micro-batch topics use.

A project's topics (its sources', its models' prediction topics, and the
internal ``weir.silver.*`` / ``weir.scoring.*`` ones generated from it) come
from :func:`project_topics`; the names below are Weir's own, the same in
every project.
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

# internal (Weir's own business): micro-batched per partition, except outcomes
I_SCORED = "weir.scored"  # inference -> learn: served vectors and scores, every model's
I_OUTCOMES = "weir.outcomes"  # learn -> drift: scored events joined with their labels
I_FEATURE_LOG = "weir.feature_log"  # features -> ClickHouse feature_log
I_AUDIT = "weir.audit"  # prediction audit records, to ClickHouse prediction_audit
REPLAY = "weir.replay"  # `weir replay`: river datasets, one partition, created on demand

PUBLIC = [ALERTS, RETRAIN, MODEL_EVENTS, MODEL_METRICS, MODEL_COMMANDS]
INTERNAL = [I_SCORED, I_OUTCOMES, I_FEATURE_LOG, I_AUDIT]


def project_topics(project: Project) -> tuple[list[str], list[str]]:
    """(public, internal) topics of ``project``, Weir's own included."""
    from streams.project.contracts import internal_topics

    return PUBLIC + project.public_topics(), INTERNAL + internal_topics(project)


def all_topics(project: Project) -> list[str]:
    """Every topic a stack running ``project`` creates: public, internal and a dead-letter topic for each."""
    public, internal = project_topics(project)
    return public + internal + [f"dlq.{t}" for t in public + internal]


def partition_for(key: str, partitions: int) -> int:
    """Stable partition of an entity key (CRC-32), the same in every process."""
    return zlib.crc32(key.encode()) % partitions
