"""Feature views, declared: what is aggregated, over which window, per which entity.

A :class:`FeatureView` is data, not code: the project source its events come
from, its entity key, event-time rules (allowed lateness, TTL) and a tuple of
:class:`Feature` s, each an aggregation (:class:`~streams.features.aggregations.Agg`)
of one event field over one window, optionally only over events matching
equality conditions. A project declares its views (:mod:`streams.project`);
:mod:`streams.features.engine` compiles a view into
:class:`~streams.features.aggregations.Aggregators`; the features stage,
backfill, the offline store and serving all read these same objects, so they
cannot disagree. How to add a feature: ``docs/features.md``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from streams.features.aggregations import Agg, Hopping, Sliding, Tumbling, WindowSpec

MINUTE = 60_000
HOUR = 60 * MINUTE

Condition = tuple[str, str | bool]  # (event field, value it must equal)

# aggregations that read each event's numeric value; the others read only its time or its tag
VALUE_AGGS = frozenset({Agg.SUM, Agg.MEAN, Agg.STD, Agg.MIN, Agg.MAX, Agg.LAST})


@dataclass(frozen=True)
class Feature:
    """One feature: ``agg`` over the entity's events in ``window`` that match every ``where`` condition.

    ``value`` names the numeric event field that sum, mean, std, min, max and
    last read; ``distinct`` the field whose distinct values ``Agg.DISTINCT``
    counts. ``default`` is the value on an empty window (0 for count, sum and
    distinct) and for an entity with no or stale values online.

    >>> Feature("card_amount_1m", Agg.SUM, Sliding(MINUTE), "sum of amounts, sliding 1 min", value="amount").agg
    <Agg.SUM: 'sum'>
    """

    name: str
    agg: Agg
    window: WindowSpec
    doc: str
    value: str | None = None
    distinct: str | None = None
    where: tuple[Condition, ...] = ()
    default: float = 0.0

    def __post_init__(self) -> None:
        if (self.agg in VALUE_AGGS) != (self.value is not None):
            raise ValueError(f"{self.name}: {self.agg.value} {'needs' if self.agg in VALUE_AGGS else 'reads no'} "
                             "value field")
        if (self.agg is Agg.DISTINCT) != (self.distinct is not None):
            raise ValueError(f"{self.name}: a distinct field is for, and required by, Agg.DISTINCT")


@dataclass(frozen=True)
class FirstSeen:
    """Derives the boolean event field ``out``: does this event bring a ``field`` value the entity has not had?

    Only events matching ``where`` are considered (others get ``out`` False).
    The entity's first value ever is not new (it is the entity's own); a
    value is remembered until the entity has been idle for the view's TTL of
    event time, at most ``remember`` values per entity (past that, every
    unremembered value counts as new). "Before" is arrival order within the
    partition.
    """

    field: str
    out: str
    where: tuple[Condition, ...] = ()
    remember: int = 32


@dataclass(frozen=True)
class FeatureView:
    """A named, versioned group of features of one entity, computed from one topic and stored together online.

    ``fingerprint`` hashes the whole definition; a test pins it per
    (name, version), so a definition cannot change without its version
    changing, and with it the Redis keys and the feature-log rows.
    """

    name: str
    entity: str  # the entity's name, and the source event field holding its id
    version: int
    source: str  # the project source (by name) whose events feed it; every view over a source is keyed alike
    specs: tuple[Feature, ...]
    ttl_ms: int  # online values older than this at read time are stale; idle entities' state is dropped
    allowed_lateness_ms: int = 10 * MINUTE  # further behind the partition's third newest: LATE
    derive: tuple[FirstSeen, ...] = ()
    owner: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        names = [f.name for f in self.specs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"view {self.name}: feature names must be present and unique, got {names}")

    @cached_property
    def features(self) -> tuple[str, ...]:
        """The feature names, in the order values are stored and served (computed once: serving asks per row)."""
        return tuple(f.name for f in self.specs)

    @property
    def defaults(self) -> list[float]:
        return [f.default for f in self.specs]

    @property
    def docs(self) -> tuple[str, ...]:
        return tuple(f.doc for f in self.specs)

    def redis_key(self, entity_id: str) -> str:
        return f"weir:fv:{self.name}:v{self.version}:{entity_id}"

    @property
    def fingerprint(self) -> str:
        """SHA-256 (12 hex digits) of the whole definition."""
        return hashlib.sha256(json.dumps(canonical(self), sort_keys=True).encode()).hexdigest()[:12]


def canonical(obj: object) -> object:
    """A JSON-able form of a declaration, for fingerprints: dataclasses as {type, fields} (or their own
    ``_canonical()``), enums by value, tuples as lists, mappings sorted, floats exactly (hex)."""
    own = getattr(obj, "_canonical", None)
    if own is not None:
        return own()
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__} | {f.name: canonical(getattr(obj, f.name))
                                               for f in dataclasses.fields(obj) if f.compare}
    if isinstance(obj, (tuple, list)):
        return [canonical(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): canonical(v) for k, v in sorted(obj.items())}
    if isinstance(obj, float):
        return obj.hex()
    return obj


def view_key(view: FeatureView) -> str:
    """``<name>:v<version>``: how the feature log and scoring records name a view's values."""
    return f"{view.name}:v{view.version}"
