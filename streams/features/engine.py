"""A feature view's definition, compiled: per-entity state fed event by event, values on demand.

:class:`ViewState` runs one :class:`~streams.features.definitions.FeatureView`
over one partition's events (the view's entity is the partitioning key, so
every entity's events are in one partition). It is what the features stage,
backfill and the tests all run. Pure: no I/O, no wall clock.

**Compilation.** The view's features are grouped into *lanes*, each one
:class:`~streams.features.aggregations.Aggregators` fed with one numeric
value field and one tag field, after an optional pre-filter:

* a feature whose only condition is ``field == "text"`` joins a lane tagged
  by ``field`` and filters with ``where_tag`` (one stored event serves every
  such feature: clicks, searches and logins share one lane);
* a ``distinct`` feature needs its field as the tag; its conditions become the
  lane's pre-filter;
* any other conditions are a pre-filter.

Features with the same pre-filter and value field share a lane (count,
distinct and since_last read no value: they share the lanes without one), and
a feature that reads no tag joins any such lane. An event whose value field is
missing or not a finite number is left out of the features that read that
field (and only those); a missing tag is ``""``.

**Event time.** The view keeps one watermark per partition, by the rule of
:mod:`streams.event_time`: the third newest event time it accepted minus the
view's ``allowed_lateness_ms`` (one outlier cannot move it). An event below it
is ``LATE`` and changes nothing; an event id the entity already has is a
``DUPLICATE`` (ingest dedups before this, so that is a redelivery). An entity's
values are as of its newest accepted event: a late-but-allowed event updates
the windows, and the values stay as of the newest event. An entity idle for
more than the view's ``ttl_ms`` before that watermark is dropped from every
lane (every eighth of the TTL of watermark progress), a pre-filtered lane
included even when no event has matched its filter since.

**Derived fields** (:class:`~streams.features.definitions.FirstSeen`) are
computed before the lanes, from per-entity sets forgotten after ``ttl_ms`` of
the entity's own event time (exact: a forgotten set and an expired one give
the same answers).

>>> from streams.features.aggregations import Agg, Sliding
>>> from streams.features.definitions import Feature, FeatureView
>>> kitchen = FeatureView("kitchen", "restaurant_id", 1, source="orders", ttl_ms=7_200_000, specs=(
...     Feature("n", Agg.COUNT, Sliding(60_000), "orders, 1 min"),
...     Feature("items", Agg.SUM, Sliding(60_000), "their items", value="items"),
...     Feature("zones", Agg.DISTINCT, Sliding(60_000), "distinct zones", distinct="zone_id")))
>>> state = ViewState(kitchen)
>>> for i, (zone, items) in enumerate([("z1", 5.0), ("z2", 7.5), ("z1", 1.0)]):
...     _ = state.add({"event_id": f"o{i}", "restaurant_id": "r1", "ts_ms": 1_000 * i, "items": items,
...                    "zone_id": zone})
>>> state.values("r1")
(2000, [3.0, 13.5, 2.0])
"""

from __future__ import annotations

import math
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.event_time import CONFIRMATIONS, UNSET, confirm, new_top
from streams.features.aggregations import Aggregators, FeatureSpec, SnapshotError, Status, plain_loads
from streams.features.definitions import Condition, Feature, FeatureView, FirstSeen

__all__ = ["ViewState"]

_MAGIC = b"WEIRVIEW"
_HEADER = struct.Struct(">8sH6s")  # magic, format, view fingerprint (12 hex digits as 6 bytes)
_FORMAT = 2  # 2: watermarks by the third newest event time


@dataclass
class _Lane:
    where: tuple[Condition, ...]
    value: str | None
    tag: str | None
    features: list[tuple[int, FeatureSpec]] = field(default_factory=list)  # (position in the view, spec)
    aggs: Aggregators | None = None


def _needs(f: Feature) -> tuple[tuple[Condition, ...], str | None, str | None, str | None]:
    """(pre-filter, value field, tag field, where_tag) the feature needs from its lane."""
    if f.distinct is not None:
        return f.where, f.value, f.distinct, None
    if len(f.where) == 1:
        (tag, wanted), = f.where
        if isinstance(wanted, str):
            return (), f.value, tag, wanted
    return f.where, f.value, None, None


def compile_lanes(view: FeatureView) -> list[_Lane]:
    """Group the view's features into as few lanes as their fields allow (declaration order kept)."""
    lanes: list[_Lane] = []
    for pos, f in enumerate(view.specs):
        where, value, tag, where_tag = _needs(f)
        spec = FeatureSpec(f.name, f.agg, f.window, f.default, where_tag)
        for lane in lanes:
            if lane.where == where and lane.value == value and (tag is None or lane.tag in (None, tag)):
                lane.tag = lane.tag or tag
                break
        else:
            lane = _Lane(where, value, tag)
            lanes.append(lane)
        lane.features.append((pos, spec))
    for lane in lanes:
        lane.aggs = Aggregators([s for _, s in lane.features], allowed_lateness_ms=view.allowed_lateness_ms,
                                ttl_ms=view.ttl_ms)
    return lanes


def _matches(event: Mapping[str, Any], where: tuple[Condition, ...]) -> bool:
    return all(event.get(f) == v for f, v in where)


class _FirstSeenState:
    """Per-entity [newest ts, remembered values] for one :class:`FirstSeen`."""

    def __init__(self, rule: FirstSeen, ttl_ms: int) -> None:
        self.rule = rule
        self.ttl_ms = ttl_ms
        self.seen: dict[str, list[Any]] = {}

    def apply(self, key: str, event: Mapping[str, Any], ts: int) -> bool:
        rule = self.rule
        if not _matches(event, rule.where):
            return False
        value = event.get(rule.field)
        if value is None:
            return False
        entry = self.seen.get(key)
        if entry is None or ts - entry[0] > self.ttl_ms:  # never seen, or idle past the TTL: its own value
            self.seen[key] = [ts, [value]]
            return False
        entry[0] = max(entry[0], ts)
        known: list[Any] = entry[1]
        if value in known:
            return False
        if len(known) < rule.remember:
            known.append(value)
        return True

    def sweep(self, watermark: int) -> None:
        """Forget entities whose every later event is past their TTL anyway (no event is older than the
        watermark)."""
        cutoff = watermark - self.ttl_ms
        for key in [k for k, (ts, _) in self.seen.items() if ts < cutoff]:
            del self.seen[key]


class ViewState:
    """One view over one partition's events; see the module docstring."""

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self._key = view.entity
        self._lanes = compile_lanes(view)
        self._aggs = [lane.aggs for lane in self._lanes if lane.aggs is not None]
        self._derive = [_FirstSeenState(rule, view.ttl_ms) for rule in view.derive]
        self._top = new_top()  # the CONFIRMATIONS newest accepted event times; top[0]: the watermark's base
        self._next_sweep: int | None = None
        self.late = 0
        self.duplicates = 0

    @property
    def n_lanes(self) -> int:
        return len(self._lanes)

    def add(self, event: Mapping[str, Any]) -> Status:
        """Feed one event (a source record: the entity field, ``event_id``, ``ts_ms`` and what the features read)."""
        ts: int = event["ts_ms"]
        key: str = event[self._key]
        top = self._top
        lateness = self.view.allowed_lateness_ms
        if ts < top[0] - lateness:
            self.late += 1
            return Status.LATE
        if self._derive:
            event = dict(event)
            for d in self._derive:
                event[d.rule.out] = d.apply(key, event, ts)
        event_id: str = event["event_id"]
        status = Status.ACCEPTED
        for lane in self._lanes:
            if lane.where and not _matches(event, lane.where):
                continue
            value = 0.0
            if lane.value is not None:
                raw = event.get(lane.value)
                if not isinstance(raw, (int, float)) or not math.isfinite(raw):
                    continue
                value = float(raw)
            tag = "" if lane.tag is None else str(event.get(lane.tag) or "")
            assert lane.aggs is not None
            if lane.aggs.add(key, event_id, ts, value, tag) is Status.DUPLICATE:
                status = Status.DUPLICATE
        if status is Status.DUPLICATE:
            self.duplicates += 1
        elif confirm(top, ts) and top[0] != UNSET:
            base = top[0]
            if self._next_sweep is None or base >= self._next_sweep:
                for d in self._derive:
                    d.sweep(base - lateness)
                for aggs in self._aggs:  # at the view's watermark: a lane's own moves with its matches only
                    aggs.sweep(base)
                self._next_sweep = base + max(1, self.view.ttl_ms // 8)
        return status

    def values(self, key: str, at: int | None = None) -> tuple[int, list[float]] | None:
        """``key`` 's values as of event time ``at`` (default: its newest accepted event), with that time;
        ``None`` if no lane holds the key. ``at`` must not be below the watermark (the time of any event
        just accepted qualifies)."""
        newest = [ts for a in self._aggs if (ts := a.newest(key)) is not None]
        if not newest:
            return None
        now = max(newest) if at is None else at
        out = self.view.defaults
        for lane in self._lanes:
            assert lane.aggs is not None
            for (pos, _), v in zip(lane.features, lane.aggs.values(key, now), strict=True):
                out[pos] = v
        return now, out

    def __len__(self) -> int:
        """Entities held (in the view's largest lane)."""
        return max(len(a) for a in self._aggs)

    # -- recovery

    def snapshot(self) -> bytes:
        """All state as bytes: header (format, view fingerprint), then builtins only (each lane's own
        CRC-checked :meth:`Aggregators.snapshot`)."""
        body = (self._top, self._next_sweep, [a.snapshot() for a in self._aggs], [d.seen for d in self._derive])
        return _HEADER.pack(_MAGIC, _FORMAT, bytes.fromhex(self.view.fingerprint)) + pickle.dumps(body, protocol=5)

    @classmethod
    def restore(cls, view: FeatureView, data: bytes) -> ViewState:
        """A state equal to the one :meth:`snapshot` was taken of; raises :class:`SnapshotError` if the
        bytes are corrupt or were taken with another definition."""
        if len(data) < _HEADER.size:
            raise SnapshotError("truncated view snapshot")
        magic, fmt, fingerprint = _HEADER.unpack_from(data)
        if magic != _MAGIC or fmt != _FORMAT:
            raise SnapshotError("not a view snapshot of this format")
        if fingerprint.hex() != view.fingerprint:
            raise SnapshotError(f"snapshot of another definition of view {view.name!r}")
        try:
            top, next_sweep, lanes, derived = plain_loads(memoryview(data)[_HEADER.size:])
        except SnapshotError:
            raise
        except Exception as exc:  # any malformed pickle
            raise SnapshotError(f"malformed view snapshot: {exc!r}") from exc
        state = cls(view)
        if len(lanes) != len(state._aggs) or len(derived) != len(state._derive):
            raise SnapshotError("view snapshot does not match the compiled view")
        for aggs, blob in zip(state._aggs, lanes, strict=True):
            aggs.restore(blob)
        for d, seen in zip(state._derive, derived, strict=True):
            d.seen = seen
        if len(top) != CONFIRMATIONS:
            raise SnapshotError("view snapshot's watermark of another shape")
        state._top, state._next_sweep = top, next_sweep
        return state
