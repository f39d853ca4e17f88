"""The cyclic garbage collector, tuned for a worker that holds a large, growing, long-lived state.

The features stage keeps every entity's windows in memory: hundreds of
thousands of small lists that live for hours. CPython's full collections scan
all of them each time the heap has grown by a quarter, which while the state
builds up took about 40% of the stage's time (``load_tests/features.py``,
"GC" share). The state is acyclic (lists of numbers and strings), so reference
counting frees what is evicted; the cyclic collector has nothing to find in it.

:class:`StateFreezer`, called after each commit, first collects the young
generations (cyclic garbage made since the last call is freed, not kept), then
moves every surviving object to the permanent generation (``gc.freeze()``),
which collections skip. Cyclic garbage that became unreachable only after
reaching the old generation would stay frozen, so every ``full_every_s`` it
unfreezes and runs one full collection: a bounded pause, instead of one per
quarter of growth.

>>> calls = []
>>> f = StateFreezer(full_every_s=600, clock=lambda: 0.0, gc_module=_Recorder(calls))
>>> f(); calls
['collect(1)', 'freeze']
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any


class StateFreezer:
    """Call after each commit: see the module docstring."""

    def __init__(self, full_every_s: float = 600.0, *, clock: Callable[[], float] = time.monotonic,
                 gc_module: Any = gc) -> None:
        self.full_every_s = full_every_s
        self._clock = clock
        self._gc = gc_module
        self._next_full = clock() + full_every_s
        self.full_collections = 0

    def __call__(self) -> None:
        self._gc.collect(1)
        if self._clock() >= self._next_full:
            self._gc.unfreeze()
            self._gc.collect()
            self.full_collections += 1
            self._next_full = self._clock() + self.full_every_s
        self._gc.freeze()


class _Recorder:
    """Stands in for :mod:`gc` in the doctest."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect({generation})")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")
