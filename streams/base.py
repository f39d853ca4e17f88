"""Interfaces shared by every stage: typed bad input, the DLQ reason codes, messages and steps.

A stage's business logic is a :class:`Step`: it takes a batch of decoded
records in and gives a batch of outputs back, with no I/O of its own. The
runtime around it (a faust agent or a :class:`streams.runtime.BatchRunner`)
decodes, calls it, produces what it returns, waits for the broker to
acknowledge, and only then commits the input offsets.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple


class Reason(str, enum.Enum):
    """Why a record went to the dead-letter topic (header ``weir.reason``)."""

    UNDECODABLE = "undecodable"
    UNKNOWN_SCHEMA = "unknown_schema_id"
    SCHEMA_MISMATCH = "schema_mismatch"
    MISSING_FIELD = "missing_field"
    OUT_OF_RANGE = "out_of_range"
    FUTURE_TIMESTAMP = "timestamp_in_future"
    PAST_TIMESTAMP = "timestamp_too_old"
    LATE = "late"
    DUPLICATE = "duplicate"


class InvalidEvent(Exception):
    """A record a stage refuses; the runtime sends its original bytes to ``dlq.<topic>``."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class Message(NamedTuple):
    """A consumed Kafka message, immutable. ``repr`` leaves the payload out (it may hold personal data).

    A named tuple rather than a frozen dataclass: the runtime makes one per consumed
    message, and a frozen dataclass costs three times as much to build (0.58 µs vs 0.18 µs).

    >>> Message("t", 0, 7, b"k", b"secret", 0)
    Message(topic='t', partition=0, offset=7, key=b'k', timestamp_ms=0)
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    headers: tuple[tuple[str, bytes], ...] = ()

    def __repr__(self) -> str:
        return (f"Message(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
                f"key={self.key!r}, timestamp_ms={self.timestamp_ms})")


@dataclass(frozen=True, slots=True)
class Produce:
    """A record a step wants produced: topic, key, already-encoded value."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None  # None: the producer's partitioner decides by key


@dataclass(slots=True)
class Rejected:
    """An input message a step refused, with its reason."""

    message: Message
    error: InvalidEvent


@dataclass(slots=True)
class StepResult:
    """What a stage returns for one batch: records to produce and rejected inputs."""

    produce: list[Produce] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


TopicPartitionKey = tuple[str, int]


class Stage:
    """The base of every stage a :class:`~streams.runtime.BatchRunner` drives: every hook the runtime calls is
    declared here with its contract; a stage overrides what it needs, and the defaults do nothing. The runner
    calls every hook on its own thread (the rebalance ones from inside ``consume``), never two at once.

    A subclass sets ``step_id`` (the name in errors, metrics, the consumer group and ``/healthz``) and
    ``topics`` (what it consumes), as class attributes or in ``__init__``.
    """

    step_id: str
    topics: tuple[str, ...]
    slow: ClassVar[bool] = False
    """``handle`` may take minutes (training): the runner calls it in a helper thread and keeps the consumer in
    its group meanwhile (partitions paused)."""

    def handle(self, batch: list[Message]) -> StepResult:
        """Process the messages of one consume call (any mix of the subscribed topics and partitions, in offset
        order per partition) and return what to produce and which messages were refused.

        Must not raise on bad input: a refused message comes back in ``rejected`` (the runtime dead-letters it).
        Any other exception is a failure: the runner rewinds to the committed offsets and retries with backoff.
        Any durable write it does must be complete when it returns."""
        raise NotImplementedError

    @property
    def max_units(self) -> int:
        """0: a batch is what one consume call returns. Above 0: the messages carry several units of work (the
        events of a micro-batch record) and the runner keeps consuming, for at most its ``max_wait_ms`` from
        the first call, until they hold ``max_units`` :meth:`units` or the wait is over."""
        return 0

    def units(self, message: Message) -> int:
        """The units of work in ``message`` (read only when :attr:`max_units` is above 0)."""
        return 1

    def on_assign(self, assigned: list[TopicPartitionKey],
                  committed: dict[TopicPartitionKey, int | None]) -> dict[TopicPartitionKey, int]:
        """The group gave this member ``assigned``; ``committed`` is the group's committed offset of each (None:
        never committed). Returns the offset to start reading at for the partitions that must not start at the
        committed offset (a snapshot's offset, or ``-2`` for the log's beginning, to replay state). For a
        partition started below its committed offset C the runner never commits below C, so a replay never
        moves the group backwards. Also called after a failure's rewind, following :meth:`on_revoke`."""
        return {}

    def on_revoke(self, revoked: list[TopicPartitionKey]) -> None:
        """After the runner committed what it processed, ``revoked`` leave this member (revoked, lost, or
        rewound after a failure): drop their state."""

    def after_commit(self, offsets: dict[TopicPartitionKey, int]) -> None:
        """After each successful commit, with the offsets it committed: every message :meth:`handle` has seen
        is at or below its partition's committed offset (the moment to snapshot state). Not called when the
        commit was lost to a rebalance."""
