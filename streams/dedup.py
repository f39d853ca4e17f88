"""Bounded event-id dedup: remembers ids for a horizon of event time and at most ``max_keys`` ids."""

from __future__ import annotations

from collections import OrderedDict


class Deduplicator:
    """``first_time(id, ts)`` is True the first time an id is seen within the horizon.

    >>> d = Deduplicator(horizon_ms=1000, max_keys=10)
    >>> d.first_time("a", 0), d.first_time("a", 10), d.first_time("b", 5000), d.first_time("a", 5001)
    (True, False, True, True)
    """

    def __init__(self, horizon_ms: int, max_keys: int = 1_000_000) -> None:
        self.horizon_ms = horizon_ms
        self.max_keys = max_keys
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._watermark = 0

    def first_time(self, event_id: str, ts_ms: int) -> bool:
        self._watermark = max(self._watermark, ts_ms)
        if event_id in self._seen:
            return False
        self._seen[event_id] = ts_ms
        self._evict()
        return True

    def __len__(self) -> int:
        return len(self._seen)

    def _evict(self) -> None:
        seen, cutoff = self._seen, self._watermark - self.horizon_ms
        while seen and (len(seen) > self.max_keys or next(iter(seen.values())) < cutoff):
            seen.popitem(last=False)
