"""StateFreezer: young garbage collected at each call, the state frozen, a full collection on schedule."""

from __future__ import annotations

import gc
import weakref

from streams.gcpolicy import StateFreezer, _Recorder


def test_a_full_collection_runs_on_schedule_only() -> None:
    now = [0.0]
    calls: list[str] = []
    freezer = StateFreezer(full_every_s=10, clock=lambda: now[0], gc_module=_Recorder(calls))
    freezer()
    now[0] = 9.9
    freezer()
    assert calls == ["collect(1)", "freeze"] * 2 and freezer.full_collections == 0
    now[0] = 10.0
    freezer()
    assert calls[4:] == ["collect(1)", "unfreeze", "collect(2)", "freeze"] and freezer.full_collections == 1


def test_cyclic_garbage_made_before_a_call_is_not_frozen() -> None:
    class Node:
        pass

    try:
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        kept = Node()
        del a, b
        StateFreezer()()
        assert gone() is None  # the cycle was collected, not frozen
        assert gc.get_freeze_count() > 0 and not any(o is kept for o in gc.get_objects())  # the living: frozen
    finally:
        gc.unfreeze()
