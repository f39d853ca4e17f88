"""Windowed per-entity aggregations over event time, with watermark, lateness, dedup, TTL and snapshots.

Pure: no I/O, no wall clock. Time is event time in integer milliseconds.

**Windows.** Every feature reads the events of one entity whose timestamp lies
in ``[window.start(now), now]`` (both ends inclusive; ``now`` is the query's
event time):

* :class:`Sliding` ``(span_ms)``: ``(now - span_ms, now]``.
* :class:`Tumbling` ``(size_ms)``: the current, still-open bucket:
  ``[floor(now / size_ms) * size_ms, now]``.
* :class:`Hopping` ``(size_ms, hop_ms)``: windows ``[k*hop, k*hop + size)``;
  of those that contain ``now`` it reads the *oldest* one, the one that
  closes next, at the first hop boundary strictly after ``now``:
  ``[(floor(now / hop) + 1) * hop - size, now]``. ``Hopping(s, s)`` is
  ``Tumbling(s)``.

Events with ``ts > now`` are never read, so a query "as of" an out-of-order
event's time sees only what had happened by then.

**Aggregations** (:class:`Agg`), over the window's events (after the
feature's ``where_tag`` filter): ``count``; ``sum`` (exactly rounded,
:func:`math.fsum`); ``mean``; ``std`` (*population* standard deviation,
from exactly rounded sums of x and x²: absolute error below about
``1e-7 * max|x|``); ``min``; ``max``; ``distinct`` (exact number of distinct
tags); ``last`` (the value of the event with the greatest ts; among equal ts
the one that arrived last); ``since_last`` (``(now - ts of the newest event
before now) / 1000``, seconds: a view computed as of one of its own events
gives the time since the previous one, not 0; the feature's ``default`` when
the window holds none before now). On an empty window ``count``, ``sum`` and
``distinct`` give 0 and every other aggregation gives the feature's ``default``.

**Event time.** :class:`Aggregators` (key -> :class:`EntityAggregator`) keeps
one watermark, by the rule of :mod:`streams.event_time`: the third greatest
event ts it has accepted (its *base*) minus ``allowed_lateness_ms``, so one
outlier cannot move it; each entity keeps its own by the same rule over its
own events (never above the container's). ``add`` answers :class:`Status`:
``LATE`` (ts below the container's or the entity's watermark; checked first),
``DUPLICATE`` (an event id already accepted for that key and still
retained), else ``ACCEPTED``. Refused events change nothing. Redelivered
events are assumed to carry their original ts: an id is remembered while its
ts is at or above the entity's own watermark, and a redelivery older than
that is refused as ``LATE``.

**Queries.** ``values(now)`` is exact for every ``now >= newest - allowed_lateness_ms``
(``newest``: the entity's greatest accepted ts), for the ts of any event just
accepted (even one far behind an outlier newest) and for any ``now`` at or
above the container's watermark. A ``now`` below the entity's own watermark
raises :class:`ValueError`: the events it would need may be evicted.

**Bounded state.** An entity keeps only events with
``ts > base - allowed_lateness_ms - longest window extent`` (its own base).
Entities idle for more than ``ttl_ms`` of event time (the container's
watermark minus the entity's newest ts) are dropped; ``ttl_ms`` must be at least the lateness plus
the longest extent, so a dropped entity's events lie outside every window any
valid later query reads, even after a new event for it as old as the
watermark: dropping never changes a value.

**Recovery.** :meth:`Aggregators.snapshot` / :meth:`Aggregators.restore`:
restoring a snapshot and feeding the remaining events gives bit-identical
values and statuses to an uninterrupted run.

>>> specs = (
...     FeatureSpec("n_1m", Agg.COUNT, Sliding(60_000)),
...     FeatureSpec("amount_1m", Agg.SUM, Sliding(60_000)),
...     FeatureSpec("max_amount_1h", Agg.MAX, Tumbling(3_600_000), default=-1.0),
...     FeatureSpec("merchants_1h", Agg.DISTINCT, Sliding(3_600_000)),
...     FeatureSpec("secs_since_login", Agg.SINCE_LAST, Sliding(3_600_000), default=3600.0, where_tag="login"),
... )
>>> aggs = Aggregators(specs, allowed_lateness_ms=5_000, ttl_ms=2 * 3_600_000)
>>> [aggs.add("card1", f"e{i}", ts, v, m) for i, ts, v, m in [(1, 10_000, 5.0, "m1"), (2, 68_000, 7.0, "m2"),
...                                                        (4, 69_000, 0.5, "m4"), (5, 70_000, 1.5, "m5")]]
[<Status.ACCEPTED: 1>, <Status.ACCEPTED: 1>, <Status.ACCEPTED: 1>, <Status.ACCEPTED: 1>]
>>> aggs.watermark  # the third newest (68 s) minus the lateness
63000
>>> aggs.add("card1", "e2", 68_000, 7.0, "m2"), aggs.add("card1", "e0", 62_000, 1.0, "m1")
(<Status.DUPLICATE: 3>, <Status.LATE: 2>)
>>> aggs.add("card1", "e3", 66_000, 2.0, "m3")
<Status.ACCEPTED: 1>
>>> aggs.values("card1", 70_000)
[4.0, 11.0, 7.0, 5.0, 3600.0]
>>> aggs.values("nobody", 70_000)
[0.0, 0.0, -1.0, 0.0, 3600.0]
>>> fresh = Aggregators(specs, allowed_lateness_ms=5_000, ttl_ms=2 * 3_600_000)
>>> fresh.restore(aggs.snapshot()); fresh.values("card1", 70_000)
[4.0, 11.0, 7.0, 5.0, 3600.0]
"""

from __future__ import annotations

import enum
import hashlib
import io
import pickle
import struct
import zlib
from bisect import bisect_left, bisect_right, insort
from collections.abc import Sequence
from dataclasses import dataclass
from math import fsum, sqrt
from typing import Any

from streams.event_time import CONFIRMATIONS, UNSET, new_top

__all__ = [
    "Agg",
    "Aggregators",
    "EntityAggregator",
    "FeatureSpec",
    "Hopping",
    "Sliding",
    "SnapshotError",
    "Status",
    "Tumbling",
    "WindowSpec",
    "plain_loads",
]


# --------------------------------------------------------------------------- windows

@dataclass(frozen=True, slots=True)
class Sliding:
    """Events with ts in ``(now - span_ms, now]``.

    >>> w = Sliding(1_000)
    >>> w.start(5_000), w.extent_ms
    (4001, 1000)
    """

    span_ms: int

    def __post_init__(self) -> None:
        if self.span_ms <= 0:
            raise ValueError(f"span_ms must be positive, got {self.span_ms}")

    @property
    def extent_ms(self) -> int:
        """The most event time a window can cover: ``start(now) > now - extent_ms``."""
        return self.span_ms

    def start(self, now: int) -> int:
        """Smallest ts (inclusive) the window at ``now`` reads."""
        return now - self.span_ms + 1


@dataclass(frozen=True, slots=True)
class Tumbling:
    """The bucket containing ``now``, up to ``now``: ts in ``[floor(now/size)*size, now]``.

    >>> Tumbling(1_000).start(5_999), Tumbling(1_000).start(6_000), Tumbling(1_000).start(-1)
    (5000, 6000, -1000)
    """

    size_ms: int

    def __post_init__(self) -> None:
        if self.size_ms <= 0:
            raise ValueError(f"size_ms must be positive, got {self.size_ms}")

    @property
    def extent_ms(self) -> int:
        """The most event time a window can cover: ``start(now) > now - extent_ms``."""
        return self.size_ms

    def start(self, now: int) -> int:
        """Smallest ts (inclusive) the window at ``now`` reads."""
        return now - now % self.size_ms


@dataclass(frozen=True, slots=True)
class Hopping:
    """Of the windows ``[k*hop, k*hop + size)`` holding ``now``, the oldest (it closes next), up to ``now``.

    That is ts in ``[(floor(now/hop) + 1) * hop - size, now]``: between
    ``size - hop`` (exclusive) and ``size`` (inclusive) of history.
    ``size_ms`` must be a multiple of ``hop_ms``.

    >>> w = Hopping(size_ms=3_000, hop_ms=1_000)
    >>> w.start(5_000), w.start(5_999), w.start(6_000)
    (3000, 3000, 4000)
    """

    size_ms: int
    hop_ms: int

    def __post_init__(self) -> None:
        if self.hop_ms <= 0 or self.size_ms <= 0 or self.size_ms % self.hop_ms:
            raise ValueError(f"need 0 < hop_ms and size_ms a multiple of it, got {self.size_ms}/{self.hop_ms}")

    @property
    def extent_ms(self) -> int:
        """The most event time a window can cover: ``start(now) > now - extent_ms``."""
        return self.size_ms

    def start(self, now: int) -> int:
        """Smallest ts (inclusive) the window at ``now`` reads."""
        return now - now % self.hop_ms + self.hop_ms - self.size_ms


WindowSpec = Sliding | Tumbling | Hopping


# --------------------------------------------------------------------------- specs

class Agg(enum.Enum):
    """An aggregation; see the module docstring for each one's exact definition."""

    COUNT = "count"
    SUM = "sum"
    MEAN = "mean"
    STD = "std"  # population standard deviation
    MIN = "min"
    MAX = "max"
    DISTINCT = "distinct"  # exact count of distinct tags
    LAST = "last"
    SINCE_LAST = "since_last"  # seconds


_ZERO_WHEN_EMPTY = frozenset({Agg.COUNT, Agg.SUM, Agg.DISTINCT})


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One feature: ``agg`` over the events of ``window``, optionally only those whose tag is ``where_tag``.

    Each event carries one ``value`` (a finite float: sum, mean, std, min, max,
    last read it) and one ``tag`` (a string: distinct reads it; ``where_tag``
    filters on it). Which event fields feed them is the caller's choice, one
    per :class:`Aggregators`. ``default`` is the value on an empty window; it
    must be 0 for count, sum and distinct, which are 0 there.
    """

    name: str
    agg: Agg
    window: WindowSpec
    default: float = 0.0
    where_tag: str | None = None

    def __post_init__(self) -> None:
        if self.agg in _ZERO_WHEN_EMPTY and self.default != 0.0:
            raise ValueError(f"{self.name}: {self.agg.value} of an empty window is 0; default must be 0")


class Status(enum.Enum):
    """What :meth:`Aggregators.add` did with an event."""

    ACCEPTED = 1
    LATE = 2  # ts below the watermark: refused
    DUPLICATE = 3  # event id already accepted for this key: refused


_ACCEPTED, _LATE, _DUPLICATE = Status.ACCEPTED, Status.LATE, Status.DUPLICATE


# --------------------------------------------------------------------------- compiled plan

# aggregation codes, window kinds: ints compare faster than enum members on the hot path
_COUNT, _SUM, _MEAN, _STD, _MIN, _MAX, _DISTINCT, _LAST, _SINCE = range(9)
_CODE = {Agg.COUNT: _COUNT, Agg.SUM: _SUM, Agg.MEAN: _MEAN, Agg.STD: _STD, Agg.MIN: _MIN, Agg.MAX: _MAX,
         Agg.DISTINCT: _DISTINCT, Agg.LAST: _LAST, Agg.SINCE_LAST: _SINCE}
_SLIDING, _TUMBLING, _HOPPING = range(3)


def _window_key(w: WindowSpec) -> tuple[int, int, int]:
    if isinstance(w, Sliding):
        return (_SLIDING, w.span_ms, 0)
    if isinstance(w, Tumbling):
        return (_TUMBLING, w.size_ms, 0)
    return (_HOPPING, w.size_ms, w.hop_ms)


class _Plan:
    """Specs compiled once per container and shared by its entities.

    Events are kept in one time-ordered store per distinct ``where_tag``
    (``None``: all events). ``groups`` lists, per (store, window), the specs
    that read it, so one bisect serves them all.
    """

    __slots__ = (
        "groups",
        "horizons",
        "lateness",
        "max_extent",
        "n_out",
        "n_stores",
        "specs",
        "sq_stores",
        "targets_all",
        "targets_by_tag",
    )

    def __init__(self, specs: Sequence[FeatureSpec], allowed_lateness_ms: int) -> None:
        if not specs:
            raise ValueError("need at least one FeatureSpec")
        if allowed_lateness_ms < 0:
            raise ValueError(f"allowed_lateness_ms must be >= 0, got {allowed_lateness_ms}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"feature names must be unique: {names}")
        self.specs = tuple(specs)
        self.lateness = allowed_lateness_ms
        filters: list[str | None] = []
        for s in specs:
            if s.where_tag not in filters:
                filters.append(s.where_tag)
        # None (all events) first, so an event's targets are in a fixed order
        filters.sort(key=lambda f: (f is not None, f or ""))
        index = {f: i for i, f in enumerate(filters)}
        self.n_stores = len(filters)
        self.horizons = [0] * len(filters)  # lateness + longest extent read from each store
        sq = [False] * len(filters)
        groups: dict[tuple[int, int, int, int], list[tuple[int, int, float]]] = {}
        for out, s in enumerate(specs):
            i = index[s.where_tag]
            self.horizons[i] = max(self.horizons[i], allowed_lateness_ms + s.window.extent_ms)
            sq[i] = sq[i] or s.agg is Agg.STD
            groups.setdefault((i, *_window_key(s.window)), []).append((out, _CODE[s.agg], float(s.default)))
        self.sq_stores = tuple(i for i, need in enumerate(sq) if need)
        self.max_extent = max(s.window.extent_ms for s in specs)
        self.targets_all: tuple[int, ...] = (0,) if filters[0] is None else ()
        self.targets_by_tag = {f: (*self.targets_all, i) for f, i in index.items() if f is not None}
        self.groups = tuple((i, kind, a, b, tuple(outs)) for (i, kind, a, b), outs in groups.items())
        self.n_out = len(specs)

    def fingerprint(self, ttl_ms: int) -> bytes:
        """16 bytes naming the specs, lateness and TTL: a snapshot only restores into the same config."""
        canon = repr((
            [(s.name, s.agg.value, _window_key(s.window), float(s.default).hex(), s.where_tag) for s in self.specs],
            self.lateness, ttl_ms,
        ))
        return hashlib.blake2b(canon.encode(), digest_size=16).digest()


# --------------------------------------------------------------------------- one entity

class _Store:
    """Events in (ts, arrival) order: parallel lists; ``sq`` (x²) only where a std reads the store."""

    __slots__ = ("sq", "tags", "ts", "vals")

    def __init__(self, with_sq: bool) -> None:
        self.ts: list[int] = []
        self.vals: list[float] = []
        self.tags: list[str] = []
        self.sq: list[float] | None = [] if with_sq else None


class EntityAggregator:
    """The state of one entity for a tuple of specs: its retained events and the ids it has seen.

    On its own it applies the same rules per entity as :class:`Aggregators`
    does per container (watermark: this entity's third newest ts minus the
    lateness). ``add`` costs O(1) amortized for in-order events, plus a
    memmove for out-of-order ones; ``values`` costs O(log n) per window plus
    O(events in the window) in C for sum, mean, std, min, max and distinct.

    >>> e = EntityAggregator([FeatureSpec("n", Agg.COUNT, Sliding(10)), FeatureSpec("last", Agg.LAST, Sliding(10))])
    >>> e.add("a", 5, 1.0), e.add("b", 5, 2.0), e.add("c", 5, 3.0), e.add("d", 3, 4.0), e.add("a", 5, 1.0)
    (<Status.ACCEPTED: 1>, <Status.ACCEPTED: 1>, <Status.ACCEPTED: 1>, <Status.LATE: 2>, <Status.DUPLICATE: 3>)
    >>> e.values(5), e.values(14), e.values(15)
    ([3.0, 3.0], [3.0, 3.0], [0.0, 0.0])
    """

    __slots__ = ("_id_list", "_id_ts", "_ids", "_plan", "_stores", "_top")

    def __init__(self, specs: Sequence[FeatureSpec], allowed_lateness_ms: int = 0, *,
                 _plan: _Plan | None = None) -> None:
        plan = _plan if _plan is not None else _Plan(specs, allowed_lateness_ms)
        self._plan = plan
        self._stores = [_Store(i in plan.sq_stores) for i in range(plan.n_stores)]
        self._top = new_top()  # the CONFIRMATIONS greatest accepted ts; top[0]: the watermark's base
        # ids of retained events with ts >= this entity's watermark: older redeliveries are LATE anyway
        self._ids: set[str] = set()
        self._id_ts: list[int] = []
        self._id_list: list[str] = []

    @property
    def newest(self) -> int | None:
        """The greatest accepted ts; ``None`` before the first event."""
        newest = self._top[-1]
        return None if newest == UNSET else newest

    def __len__(self) -> int:
        """Events retained, summed over the stores (an event can sit in two: all events and its tag's)."""
        return sum(len(s.ts) for s in self._stores)

    def add(self, event_id: str, ts: int, value: float = 0.0, tag: str = "") -> Status:
        """Record one event (``LATE``: ts below this entity's watermark; ``DUPLICATE``)."""
        plan = self._plan
        top = self._top
        if ts < top[0] - plan.lateness:
            return _LATE
        ids = self._ids
        if event_id in ids:
            return _DUPLICATE
        ids.add(event_id)
        id_ts = self._id_ts
        if not id_ts or ts >= id_ts[-1]:
            id_ts.append(ts)
            self._id_list.append(event_id)
        else:
            i = bisect_right(id_ts, ts)
            id_ts.insert(i, ts)
            self._id_list.insert(i, event_id)
        stores = self._stores
        for i in plan.targets_by_tag.get(tag, plan.targets_all):
            s = stores[i]
            st = s.ts
            if not st or ts >= st[-1]:
                st.append(ts)
                s.vals.append(value)
                s.tags.append(tag)
                if s.sq is not None:
                    s.sq.append(value * value)
            else:
                j = bisect_right(st, ts)  # after equal ts: ties keep arrival order
                st.insert(j, ts)
                s.vals.insert(j, value)
                s.tags.insert(j, tag)
                if s.sq is not None:
                    s.sq.insert(j, value * value)
        if ts > top[0]:  # streams.event_time.confirm, inlined: the base may rise
            del top[0]
            if ts >= top[-1]:
                top.append(ts)
            else:
                insort(top, ts)
            if top[0] != UNSET:
                self._evict(top[0])
        return _ACCEPTED

    def _evict(self, base: int) -> None:
        plan = self._plan
        cutoff = base - plan.lateness  # ids below the entity's watermark: redeliveries are LATE
        id_ts = self._id_ts
        if id_ts[0] < cutoff:
            i = bisect_left(id_ts, cutoff)
            ids = self._ids
            for eid in self._id_list[:i]:
                ids.discard(eid)
            del id_ts[:i], self._id_list[:i]
        for s, horizon in zip(self._stores, plan.horizons, strict=True):
            st = s.ts
            if st and st[0] <= base - horizon:
                i = bisect_right(st, base - horizon)
                del st[:i], s.vals[:i], s.tags[:i]
                if s.sq is not None:
                    del s.sq[:i]

    def values(self, now: int) -> list[float]:
        """The features at event time ``now``, in spec order. Raises ``ValueError`` if ``now`` is too old
        (below this entity's watermark) for the retained events to answer exactly."""
        plan = self._plan
        if self._top[-1] == UNSET:
            return _defaults(plan)
        top = self._top
        if now < top[0] - plan.lateness:
            raise ValueError(f"now={now} is older than the entity's watermark base {top[0]} minus the lateness "
                             f"{plan.lateness}")
        res: list[float] = [0.0] * plan.n_out
        stores = self._stores
        his: list[int] = [-1] * plan.n_stores
        for i, kind, a, b, outs in plan.groups:
            s = stores[i]
            st = s.ts
            hi = his[i]
            if hi < 0:
                hi = his[i] = len(st) if not st or st[-1] <= now else bisect_right(st, now)
            if kind == _SLIDING:
                start = now - a + 1
            elif kind == _TUMBLING:
                start = now - now % a
            else:
                start = now - now % b + b - a
            lo = bisect_left(st, start, 0, hi)
            n = hi - lo
            if n == 0:
                for o, _, default in outs:
                    res[o] = default  # 0 for count, sum and distinct: FeatureSpec checks it
                continue
            vals: list[float] | None = None
            total: float | None = None
            for o, code, default in outs:
                if code == _COUNT:
                    res[o] = float(n)
                elif code == _LAST:
                    res[o] = s.vals[hi - 1]
                elif code == _SINCE:  # the newest event before now: one at now is not its own previous one
                    before = hi if st[hi - 1] < now else bisect_left(st, now, lo, hi)
                    res[o] = (now - st[before - 1]) / 1000 if before > lo else default
                elif code == _DISTINCT:
                    res[o] = float(len(set(s.tags[lo:hi])))
                else:
                    if vals is None:
                        vals = s.vals[lo:hi]
                    if code == _MIN:
                        res[o] = min(vals)
                    elif code == _MAX:
                        res[o] = max(vals)
                    else:
                        if total is None:
                            total = fsum(vals)
                        if code == _SUM:
                            res[o] = total
                        elif code == _MEAN:
                            res[o] = total / n
                        else:  # _STD, population: from exactly rounded sums of x and x²
                            sq = s.sq
                            assert sq is not None
                            var = (fsum(sq[lo:hi]) - total * total / n) / n
                            res[o] = sqrt(var) if var > 0.0 else 0.0
        return res


def _defaults(plan: _Plan) -> list[float]:
    return [float(s.default) for s in plan.specs]


# --------------------------------------------------------------------------- the keyed container

class Aggregators:
    """Per-key :class:`EntityAggregator` s under one event-time watermark, idle keys dropped after ``ttl_ms``.

    Not thread-safe: one instance per worker and source partition (keys
    partitioned by entity), fed in the partition's order. The watermark is
    the third greatest accepted ts minus ``allowed_lateness_ms``, over all
    keys, so feeding it from several partitions that lag each other refuses
    the laggard's events as ``LATE``.
    """

    def __init__(self, specs: Sequence[FeatureSpec], *, allowed_lateness_ms: int, ttl_ms: int) -> None:
        plan = _Plan(specs, allowed_lateness_ms)
        if ttl_ms < allowed_lateness_ms + plan.max_extent:
            raise ValueError(f"ttl_ms={ttl_ms} must be >= allowed_lateness_ms + the longest window "
                             f"({allowed_lateness_ms + plan.max_extent}), or dropping idle keys would change values")
        self._plan = plan
        self._lateness = allowed_lateness_ms
        self._ttl_ms = ttl_ms
        self._sweep_every = max(1, ttl_ms // 8)
        self._fingerprint = plan.fingerprint(ttl_ms)
        self._entities: dict[str, EntityAggregator] = {}
        self._top = new_top()  # the CONFIRMATIONS greatest accepted ts; top[0]: the watermark's base
        self._next_sweep: int | None = None

    @property
    def specs(self) -> tuple[FeatureSpec, ...]:
        return self._plan.specs

    @property
    def watermark(self) -> int | None:
        """Events with ts below it are ``LATE``; ``None`` before the first accepted event."""
        b = self._top[0]
        return None if b == UNSET else b - self._lateness

    def __len__(self) -> int:
        return len(self._entities)

    def __contains__(self, key: object) -> bool:
        return key in self._entities

    def keys(self) -> list[str]:
        """The keys whose state is held now."""
        return list(self._entities)

    def newest(self, key: str) -> int | None:
        """``key`` 's greatest accepted ts; ``None`` if the key is not held."""
        ent = self._entities.get(key)
        return None if ent is None else ent.newest

    def add(self, key: str, event_id: str, ts: int, value: float = 0.0, tag: str = "") -> Status:
        """Record one event of entity ``key``; refused events (``LATE``, ``DUPLICATE``) change nothing.

        ``value`` must be finite; ``ts`` is event time in ms.
        """
        top = self._top
        if ts < top[0] - self._lateness:
            return _LATE
        ent = self._entities.get(key)
        if ent is None:
            ent = self._entities[key] = EntityAggregator((), _plan=self._plan)
        status = ent.add(event_id, ts, value, tag)
        if status is _ACCEPTED and ts > top[0]:  # streams.event_time.confirm, inlined
            del top[0]
            if ts >= top[-1]:
                top.append(ts)
            else:
                insort(top, ts)
            base = top[0]
            if base != UNSET:  # a watermark exists: sweep idle keys every ttl / 8 of its progress
                if self._next_sweep is None:
                    self._next_sweep = base + self._sweep_every
                elif base >= self._next_sweep:
                    self._sweep(base)
        return status

    def sweep(self, base: int) -> None:
        """Drop the keys idle for more than the TTL before ``base``, a watermark base at least this container's
        own: a feature view's, over all its lanes (a lane whose filter rarely matches would otherwise keep its
        keys until its next matching event moved its own watermark)."""
        if base != UNSET:
            self._sweep(base)

    def _sweep(self, base: int) -> None:
        # Idle relative to the *watermark*, not the newest ts: a dropped key may get a new event as old as
        # the watermark, after which queries may reach lateness + extent further back; measured from the
        # watermark, ttl >= lateness + extent keeps everything such a query could read.
        cutoff = base - self._lateness - self._ttl_ms
        idle = [k for k, e in self._entities.items() if e._top[-1] < cutoff]  # held entities have an event
        for k in idle:
            del self._entities[k]
        self._next_sweep = base + self._sweep_every

    def values(self, key: str, now: int) -> list[float]:
        """``key`` 's features at event time ``now`` (see :meth:`EntityAggregator.values`).

        A key not held (never seen, or dropped as idle) gives the empty-window
        values; for a dropped key that is exact when ``now >= watermark``.
        """
        ent = self._entities.get(key)
        if ent is None:
            return _defaults(self._plan)
        return ent.values(now)

    # -- recovery

    def snapshot(self) -> bytes:
        """All state, as bytes: a versioned header (config fingerprint, length, CRC-32), then the payload.

        Take it between events (e.g. on commit, together with the offsets it covers).
        """
        entities = [
            (key, e._top, e._id_ts, e._id_list, [(st.ts, st.vals, st.tags) for st in e._stores])
            for key, e in self._entities.items()
        ]
        payload = pickle.dumps((self._top, self._next_sweep, entities), protocol=5)
        header = _HEADER.pack(_MAGIC, _VERSION, self._fingerprint, len(payload), zlib.crc32(payload))
        return header + payload

    def restore(self, data: bytes) -> None:
        """Replace all state with a :meth:`snapshot` 's. Raises :class:`SnapshotError` (state unchanged)
        if it is corrupt, of another format version, or taken with other specs, lateness or TTL."""
        if len(data) < _HEADER.size:
            raise SnapshotError("truncated header")
        magic, version, fingerprint, length, crc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise SnapshotError("not an aggregations snapshot")
        if version != _VERSION:
            raise SnapshotError(f"format version {version}, this code reads {_VERSION}")
        if fingerprint != self._fingerprint:
            raise SnapshotError("taken with other specs, lateness or TTL: rebuild by replay instead")
        payload = memoryview(data)[_HEADER.size:]
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise SnapshotError("payload length or CRC mismatch")
        try:
            top, next_sweep, rows = plain_loads(payload)
            entities: dict[str, EntityAggregator] = {}
            plan = self._plan
            for key, entity_top, id_ts, id_list, stores in rows:
                e = EntityAggregator((), _plan=plan)
                if len(stores) != plan.n_stores or len(id_ts) != len(id_list) or len(entity_top) != CONFIRMATIONS:
                    raise SnapshotError("entity shape does not match the specs")
                e._top, e._id_ts, e._id_list, e._ids = entity_top, id_ts, id_list, set(id_list)
                for st, (ts, vals, tags) in zip(e._stores, stores, strict=True):
                    if not len(ts) == len(vals) == len(tags):
                        raise SnapshotError("store lists of unequal length")
                    st.ts, st.vals, st.tags = ts, vals, tags
                    if st.sq is not None:
                        st.sq = [v * v for v in vals]  # the same float ops as add: bit-identical
                entities[key] = e
        except SnapshotError:
            raise
        except Exception as exc:  # any malformed payload
            raise SnapshotError(f"malformed payload: {exc!r}") from exc
        if len(top) != CONFIRMATIONS:
            raise SnapshotError("watermark of another shape")
        self._entities, self._top, self._next_sweep = entities, top, next_sweep


_MAGIC = b"WEIRAGG\x00"
_VERSION = 2  # 2: watermarks by the third newest event time (streams.event_time)
_HEADER = struct.Struct(">8sH16sQI")  # magic, version, config fingerprint, payload length, CRC-32


class _PlainUnpickler(pickle.Unpickler):
    """Loads only builtin containers and scalars: a snapshot never names a class or function."""

    def find_class(self, module: str, name: str) -> Any:
        raise SnapshotError(f"snapshot names {module}.{name}")


def plain_loads(data: bytes | memoryview) -> Any:
    """Unpickle builtin containers and scalars only; anything naming a class or function raises
    :class:`SnapshotError` (a snapshot from Redis must not be able to run code)."""
    return _PlainUnpickler(io.BytesIO(data)).load()


class SnapshotError(ValueError):
    """A snapshot that cannot be restored: corrupt, another format version, or another config."""
