"""Event-id dedup that survives restarts: first sightings kept in Redis for a horizon.

A first sighting stores the event id with the message's *origin* (source
topic, partition and offset) for ``horizon_ms``. An id seen again is a
duplicate unless it comes from the very same origin: that is the same message
re-delivered after a crash before its offsets were committed, which
at-least-once processing must process again, not drop. One Lua call per
batch checks and records every id atomically.

``MemoryDedup`` has the same semantics in process memory, bounded by
``max_keys``; it is for pure unit tests and single-process tools, not for a
stage that must survive a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

# KEYS: one dedup key per event; ARGV[1]: horizon in ms; ARGV[i+1]: origin of KEYS[i].
# Returns 1 where the event is new (or re-delivered from its first origin), 0 where it is a duplicate.
_CHECK_AND_SET = """
local out = {}
for i = 1, #KEYS do
  local origin = ARGV[i + 1]
  if redis.call('SET', KEYS[i], origin, 'NX', 'PX', ARGV[1]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[i]) == origin then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


class DedupStore(Protocol):
    """Remembers event ids. ``first_seen`` is True per item for a first sighting (or a
    re-delivery from the same origin), False for a duplicate; items of one call are
    checked in order, so a repeat within the call is a duplicate."""

    def first_seen(self, items: Sequence[tuple[str, str]]) -> list[bool]: ...


class RedisDedup:
    """:class:`DedupStore` in Redis: keys ``<prefix><event id>``, expiring after the horizon."""

    def __init__(self, client: Any, horizon_ms: int, prefix: str = "weir:dedup:") -> None:
        self.horizon_ms = horizon_ms
        self.prefix = prefix
        self._script = client.register_script(_CHECK_AND_SET)

    def first_seen(self, items: Sequence[tuple[str, str]]) -> list[bool]:
        if not items:
            return []
        keys = [self.prefix + event_id for event_id, _ in items]
        flags = self._script(keys=keys, args=[self.horizon_ms, *(origin for _, origin in items)])
        return [bool(f) for f in flags]


class MemoryDedup:
    """:class:`DedupStore` in memory (unit tests): at most ``max_keys`` ids, each kept ``horizon_ms``.

    >>> d = MemoryDedup(horizon_ms=1000, clock=lambda: 0.0)
    >>> d.first_seen([("a", "t:0:1"), ("a", "t:0:2"), ("a", "t:0:1"), ("b", "t:0:3")])
    [True, False, True, True]
    """

    def __init__(self, horizon_ms: int, max_keys: int = 1_000_000, clock: Callable[[], float] = time.time) -> None:
        self.horizon_ms = horizon_ms
        self.max_keys = max_keys
        self._clock = clock
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def first_seen(self, items: Sequence[tuple[str, str]]) -> list[bool]:
        now = self._clock() * 1000
        self._evict(now)
        out = []
        for event_id, origin in items:
            known = self._seen.get(event_id)
            if known is None:
                self._seen[event_id] = (origin, now + self.horizon_ms)
                out.append(True)
            else:
                out.append(known[0] == origin)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._seen)

    def _evict(self, now: float) -> None:
        while self._seen and next(iter(self._seen.values()))[1] < now:
            self._seen.popitem(last=False)
