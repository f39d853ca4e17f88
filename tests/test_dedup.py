"""The in-memory dedup's bounds: a key count and a time horizon."""

from __future__ import annotations

from streams.dedup import MemoryDedup


def test_dedup_bounded_by_count() -> None:
    d = MemoryDedup(horizon_ms=10**9, max_keys=3, clock=lambda: 0.0)
    assert d.first_seen([(k, f"t:0:{i}") for i, k in enumerate("abcd")]) == [True] * 4
    assert len(d) == 3 and d.first_seen([("a", "t:0:9")]) == [True]  # forgotten: bounded memory wins


def test_dedup_forgets_after_the_horizon() -> None:
    now = [0.0]
    d = MemoryDedup(horizon_ms=1000, clock=lambda: now[0])
    assert d.first_seen([("a", "t:0:1")]) == [True]
    now[0] = 0.5
    assert d.first_seen([("a", "t:0:2")]) == [False]
    now[0] = 1.5
    assert d.first_seen([("a", "t:0:3")]) == [True]
