"""The fraud model's feature views, declared: what is aggregated, over which window, per which entity.

A :class:`FeatureView` is data, not code: its source topic, entity key,
event-time rules (allowed lateness, TTL) and a tuple of :class:`Feature` s,
each an aggregation (:class:`~streams.features.aggregations.Agg`) of one
event field over one window, optionally only over events matching equality
conditions. :mod:`streams.features.engine` compiles a view into
:class:`~streams.features.aggregations.Aggregators`; the features stage,
backfill, the offline store and serving all read these same objects, so
they cannot disagree. How to add a feature: ``docs/features.md``.

The feature vector the models see is ``FEATURE_NAMES`` in this order: the
card view, the user view, then request features computed from the payment
itself.
"""

from __future__ import annotations

import hashlib
import json
import math
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
    source: str  # the topic (after ingest) the events come from
    specs: tuple[Feature, ...]
    ttl_ms: int  # online values older than this at read time are stale; idle entities' state is dropped
    allowed_lateness_ms: int = 10 * MINUTE  # events further behind the partition's newest are refused (LATE)
    derive: tuple[FirstSeen, ...] = ()
    owner: str = "fraud-team"
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
        return hashlib.sha256(json.dumps(_canonical(self), sort_keys=True).encode()).hexdigest()[:12]


def _canonical(obj: object) -> object:
    """A JSON-able form of a definition: dataclasses as {type, fields}, enums by value, tuples as lists."""
    if isinstance(obj, Agg):
        return obj.value
    if isinstance(obj, (Feature, FirstSeen, FeatureView, Sliding, Tumbling, Hopping)):
        return {"type": type(obj).__name__} | {k: _canonical(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, tuple):
        return [_canonical(x) for x in obj]
    if isinstance(obj, float):
        return obj.hex()
    return obj


CARD = FeatureView(
    "card", "card_id", 2, source="weir.payments",
    specs=(
        Feature("card_count_1m", Agg.COUNT, Sliding(MINUTE), "count of the card's payments, sliding 1 min"),
        Feature("card_amount_1m", Agg.SUM, Sliding(MINUTE), "sum of their amounts, sliding 1 min", value="amount"),
        Feature("card_count_1h", Agg.COUNT, Sliding(HOUR), "count of the card's payments, sliding 1 h"),
        Feature("card_amount_1h", Agg.SUM, Sliding(HOUR), "sum of their amounts, sliding 1 h", value="amount"),
        Feature("card_distinct_merchants_1h", Agg.DISTINCT, Sliding(HOUR),
                "distinct merchants the card paid, sliding 1 h", distinct="merchant_id"),
    ),
    ttl_ms=2 * HOUR,
    description="Velocity of one card: how often, how much and where it paid lately (the payment itself included).",
)
LOGIN: Condition = ("event_type", "login")
USER = FeatureView(
    "user", "user_id", 2, source="weir.clicks",
    specs=(
        Feature("user_clicks_30m", Agg.COUNT, Sliding(30 * MINUTE),
                "count of the user's clickstream events, sliding 30 min"),
        Feature("user_searches_30m", Agg.COUNT, Sliding(30 * MINUTE), "count of its searches, sliding 30 min",
                where=(("event_type", "search"),)),
        Feature("user_add_to_cart_30m", Agg.COUNT, Sliding(30 * MINUTE),
                "count of its add-to-cart events, sliding 30 min", where=(("event_type", "add_to_cart"),)),
        Feature("user_new_device_logins_1h", Agg.COUNT, Sliding(HOUR),
                "logins from a device the user was not seen logging in with before, sliding 1 h",
                where=(LOGIN, ("new_device", True))),
        Feature("user_secs_since_login", Agg.SINCE_LAST, Sliding(HOUR),
                "seconds since the user's last login; 3600 when none in the last hour", where=(LOGIN,),
                default=3600.0),
    ),
    ttl_ms=2 * HOUR,
    derive=(FirstSeen("device_id", "new_device", where=(LOGIN,)),),
    description="What the user did on the site before paying (keyed by user id = the payment's customer id).",
)
VIEWS = (CARD, USER)
REQUEST = ("amount", "log_amount", "is_digital_goods")
FEATURE_NAMES: tuple[str, ...] = CARD.features + USER.features + REQUEST


def view_key(view: FeatureView) -> str:
    """``<name>:v<version>``: how the feature log and scoring records name a view's values."""
    return f"{view.name}:v{view.version}"


def request_features(amount: float, merchant_category: str) -> list[float]:
    return [amount, math.log1p(max(amount, 0.0)), 1.0 if merchant_category == "digital_goods" else 0.0]


DEFAULTS: dict[str, float] = {f.name: f.default for v in VIEWS for f in v.specs} | {name: 0.0 for name in REQUEST}
