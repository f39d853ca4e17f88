"""Event time at the edge: plausibility bounds against the wall clock, and watermarks with lateness.

Each source partition has a watermark: the highest event time seen there
minus the allowed lateness. An event older than its partition's watermark is
*late* and refused (``Reason.LATE``): the windows downstream have closed over
it. Events further than ``max_future_ms`` ahead of the wall clock or older
than ``max_age_ms`` are refused as implausible (a producer with a broken
clock, a replay of ancient data) before they can move a watermark.

Watermarks live in memory. After a restart they start empty, so the first
events of each partition are accepted; lateness is then measured again from
what arrives — the conservative direction (nothing valid is refused).

>>> clock = lambda: 1_000.0  # wall clock in seconds, injected
>>> w = EventTimeGuard(max_future_ms=60_000, max_age_ms=3_600_000, allowed_lateness_ms=5_000, clock=clock)
>>> w.check(("t", 0), 1_000_000); w.check(("t", 0), 996_000)  # 4 s behind the newest: allowed
>>> w.check(("t", 0), 994_000)
Traceback (most recent call last):
...
streams.base.InvalidEvent: late: event time 994000 is 6000 ms behind the newest event of t[0] (allowed lateness 5000 ms)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from streams.base import InvalidEvent, Reason


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
        self._newest: dict[Hashable, int] = {}

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def check(self, source: Hashable, ts_ms: int, now_ms: int | None = None) -> None:
        """Accept ``ts_ms`` from ``source`` (advancing its watermark) or raise :class:`InvalidEvent`."""
        now = self.now_ms() if now_ms is None else now_ms
        if ts_ms > now + self.max_future_ms:
            raise InvalidEvent(Reason.FUTURE_TIMESTAMP,
                               f"event time {ts_ms} is {ts_ms - now} ms ahead of the clock (max {self.max_future_ms})")
        if ts_ms < now - self.max_age_ms:
            raise InvalidEvent(Reason.PAST_TIMESTAMP,
                               f"event time {ts_ms} is {now - ts_ms} ms old (max age {self.max_age_ms})")
        newest = self._newest.get(source)
        if newest is None or ts_ms > newest:
            self._newest[source] = ts_ms
        elif ts_ms < newest - self.allowed_lateness_ms:
            where = f"{source[0]}[{source[1]}]" if isinstance(source, tuple) and len(source) == 2 else str(source)
            raise InvalidEvent(Reason.LATE, f"event time {ts_ms} is {newest - ts_ms} ms behind the newest event "
                                            f"of {where} (allowed lateness {self.allowed_lateness_ms} ms)")

    def watermark(self, source: Hashable) -> int | None:
        """Event time below which ``source``'s events are late; ``None`` before its first event."""
        newest = self._newest.get(source)
        return None if newest is None else newest - self.allowed_lateness_ms
