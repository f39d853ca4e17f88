"""Per-entity sliding windows over event time.

Each window keeps the entity's events of the last ``span_ms`` of event time
(relative to the newest event it has seen) in time order; out-of-order events
are inserted in place. Aggregates over shorter spans read from the right.
Memory per entity is bounded by the span; idle entities are evicted by
:class:`EntityStates` after a TTL.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

S = TypeVar("S")


@dataclass(slots=True)
class Window:
    """Events (ts, value, tag) of one entity within ``span_ms`` of its newest event.

    >>> w = Window(span_ms=60_000)
    >>> for ts, v in [(0, 1.0), (30_000, 2.0), (61_000, 4.0)]:
    ...     w.add(ts, v, "m")
    >>> w.count(61_000, 60_000), w.total(61_000, 60_000)
    (2, 6.0)
    """

    span_ms: int
    ts: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def add(self, ts: int, value: float, tag: str = "") -> None:
        if not self.ts or ts >= self.ts[-1]:
            self.ts.append(ts)
            self.values.append(value)
            self.tags.append(tag)
        else:  # late within the span: keep time order
            i = bisect.bisect_right(self.ts, ts)
            self.ts.insert(i, ts)
            self.values.insert(i, value)
            self.tags.insert(i, tag)
        self._evict()

    def _evict(self) -> None:
        cutoff = self.ts[-1] - self.span_ms
        if self.ts[0] > cutoff:
            return
        i = bisect.bisect_right(self.ts, cutoff)
        del self.ts[:i], self.values[:i], self.tags[:i]

    def _start(self, now: int, span_ms: int) -> tuple[int, int]:
        """Index range of events in (now - span_ms, now]."""
        return bisect.bisect_right(self.ts, now - span_ms), bisect.bisect_right(self.ts, now)

    def count(self, now: int, span_ms: int) -> int:
        lo, hi = self._start(now, span_ms)
        return hi - lo

    def total(self, now: int, span_ms: int) -> float:
        lo, hi = self._start(now, span_ms)
        return float(sum(self.values[lo:hi]))

    def distinct(self, now: int, span_ms: int) -> int:
        lo, hi = self._start(now, span_ms)
        return len(set(self.tags[lo:hi]))

    def count_tag(self, now: int, span_ms: int, tag: str) -> int:
        lo, hi = self._start(now, span_ms)
        return sum(1 for t in self.tags[lo:hi] if t == tag)


class EntityStates(Generic[S]):
    """Per-key state with eviction of keys idle for ``ttl_ms`` of event time."""

    def __init__(self, factory: Callable[[], S], ttl_ms: int) -> None:
        self._factory = factory
        self._ttl_ms = ttl_ms
        self._states: dict[str, S] = {}
        self._last: dict[str, int] = {}
        self._watermark = 0
        self._next_sweep = 0

    def get(self, key: str, ts: int) -> S:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = self._factory()
        self._last[key] = max(ts, self._last.get(key, ts))
        if ts > self._watermark:
            self._watermark = ts
            if ts >= self._next_sweep:
                self._sweep()
        return state

    def _sweep(self) -> None:
        cutoff = self._watermark - self._ttl_ms
        for key in [k for k, t in self._last.items() if t < cutoff]:
            del self._states[key], self._last[key]
        self._next_sweep = self._watermark + self._ttl_ms // 10

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)
