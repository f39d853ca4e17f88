"""Event time at the edge: plausibility bounds against the wall clock, and watermarks one outlier cannot move.

**The watermark rule** (the same in ingest and in every feature view): a
source partition's watermark is its *third newest* accepted event time minus
the allowed lateness, so an event time moves it only when two other events
at or beyond it confirm it (:data:`CONFIRMATIONS`). An event below the
watermark is *late* and refused (``Reason.LATE``). Before the partition's
third accepted event there is no watermark and nothing is late.

Why: with the plain rule (newest minus lateness) one event stamped minutes
ahead by a broken producer clock pushed its partition's watermark and sent
every on-time event after it to the dead-letter topic. With this rule, up to
``CONFIRMATIONS - 1`` such outliers at a time change nothing: the watermark
stays at or below the newest *on-time* event, and once the stream's own time
passes an outlier it is an ordinary old event. The price is a watermark that
trails by two events — which only ever accepts more, never refuses more.
Events further than ``max_future_ms`` ahead of the wall clock or older than
``max_age_ms`` are refused as implausible before they reach the watermark.

Watermarks are deterministic functions of the accepted event times (no wall
clock): a state restored from a snapshot and fed the rest of the log refuses
exactly what an uninterrupted run refuses. Ingest keeps its watermarks in
memory: after a restart they start empty, the conservative direction.

>>> top = new_top()
>>> [confirm(top, ts) for ts in (1_000, 2_000, 900_000, 3_000)], base(top)  # one outlier: base stays
([True, True, True, True], 2000)

>>> clock = lambda: 1_000.0  # wall clock in seconds, injected
>>> w = EventTimeGuard(max_future_ms=60_000, max_age_ms=3_600_000, allowed_lateness_ms=5_000, clock=clock)
>>> for ts in (1_000_000, 1_000_000, 1_000_000, 996_000):  # 4 s behind: allowed
...     w.check(("t", 0), ts)
>>> w.check(("t", 0), 994_000)
Traceback (most recent call last):
...
streams.base.InvalidEvent: late: event time 994000 is 6000 ms behind t[0]'s watermark base 1000000 (its 3rd newest event; allowed lateness 5000 ms)
"""

from __future__ import annotations

import time
from bisect import insort
from collections.abc import Callable, Hashable

from streams.base import InvalidEvent, Reason

CONFIRMATIONS = 3  # the watermark follows the 3rd newest event time: 2 outliers at a time cannot move it
UNSET = -(1 << 62)  # a slot of ``top`` no event has filled: below every event time, so nothing is late


def new_top() -> list[int]:
    """The ``CONFIRMATIONS`` greatest accepted event times, ascending, before any event."""
    return [UNSET] * CONFIRMATIONS


def confirm(top: list[int], ts: int) -> bool:
    """Fold accepted event time ``ts`` into ``top`` (:func:`new_top`); True when :func:`base` rose (the
    caller's cue to evict). O(1). The features engine inlines this on its hot path."""
    if ts <= top[0]:
        return False
    del top[0]
    if ts >= top[-1]:
        top.append(ts)
    else:
        insort(top, ts)
    return True


def base(top: list[int]) -> int | None:
    """The event time the watermark trails by the lateness: the ``CONFIRMATIONS``-th greatest, or ``None``
    before that many events (nothing is late yet)."""
    return None if top[0] == UNSET else top[0]


class EventTimeGuard:
    """Refuses implausible and late events; keeps one watermark per source (any hashable key)."""

    def __init__(
        self,
        *,
        max_future_ms: int,
        max_age_ms: int,
        allowed_lateness_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_future_ms = max_future_ms
        self.max_age_ms = max_age_ms
        self.allowed_lateness_ms = allowed_lateness_ms
        self._clock = clock
        self._top: dict[Hashable, list[int]] = {}  # per source: new_top()

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check(self, source: Hashable, ts_ms: int, now_ms: int | None = None) -> None:
        """Accept ``ts_ms`` from ``source`` (folding it into its watermark) or raise :class:`InvalidEvent`."""
        now = self.now_ms() if now_ms is None else now_ms
        if ts_ms > now + self.max_future_ms:
            raise InvalidEvent(Reason.FUTURE_TIMESTAMP,
                               f"event time {ts_ms} is {ts_ms - now} ms ahead of the clock (max {self.max_future_ms})")
        if ts_ms < now - self.max_age_ms:
            raise InvalidEvent(Reason.PAST_TIMESTAMP,
                               f"event time {ts_ms} is {now - ts_ms} ms old (max age {self.max_age_ms})")
        top = self._top.get(source)
        if top is None:
            top = self._top[source] = new_top()
        b = top[0]
        if ts_ms < b - self.allowed_lateness_ms:
            where = f"{source[0]}[{source[1]}]" if isinstance(source, tuple) and len(source) == 2 else str(source)
            raise InvalidEvent(Reason.LATE, f"event time {ts_ms} is {b - ts_ms} ms behind {where}'s watermark base "
                                            f"{b} (its {_ordinal(CONFIRMATIONS)} newest event; allowed lateness "
                                            f"{self.allowed_lateness_ms} ms)")
        confirm(top, ts_ms)

    def watermark(self, source: Hashable) -> int | None:
        """Event time below which ``source``'s events are late; ``None`` while nothing is late there."""
        b = base(self._top.get(source) or new_top())
        return None if b is None else b - self.allowed_lateness_ms


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
