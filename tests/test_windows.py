"""Window aggregates against a brute-force reference, on random out-of-order streams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.dedup import MemoryDedup
from streams.features.definitions import HOUR, MINUTE, CardState, UserState
from streams.features.windows import EntityStates, Window

events = st.lists(
    st.tuples(st.integers(0, 3 * HOUR), st.floats(0, 1000, allow_nan=False), st.sampled_from("abcde")),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events, st.sampled_from([MINUTE, 10 * MINUTE, HOUR]))
def test_window_matches_reference(evs: list[tuple[int, float, str]], span: int) -> None:
    w = Window(HOUR)
    seen: list[tuple[int, float, str]] = []
    for ts, v, tag in evs:
        w.add(ts, v, tag)
        seen.append((ts, v, tag))
        newest = max(t for t, _, _ in seen)
        # the window keeps what is within an hour of the newest event; query "as of" the newest
        ref = [(t, x, g) for t, x, g in seen if newest - span < t <= newest and t > newest - HOUR]
        assert w.count(newest, span) == len(ref)
        assert abs(w.total(newest, span) - sum(x for _, x, _ in ref)) < 1e-6
        assert w.distinct(newest, span) == len({g for _, _, g in ref})
        assert w.count_tag(newest, span, "a") == sum(1 for *_, g in ref if g == "a")


def test_entity_states_evict_idle_keys() -> None:
    states: EntityStates[CardState] = EntityStates(CardState, ttl_ms=HOUR)
    states.get("old", 0)
    for i in range(1, 30):
        states.get("busy", i * 10 * MINUTE)
    assert "old" not in set(states) and "busy" in set(states)


def test_card_features() -> None:
    card = CardState()
    for i in range(5):
        card.update(i * 1000, 2.0, f"m{i % 2}")
    card.update(30 * MINUTE, 100.0, "m9")
    assert card.values(30 * MINUTE) == [1.0, 100.0, 6.0, 110.0, 3.0]


def test_user_new_device_logins_and_since_login() -> None:
    user = UserState()
    user.update(0, "login", "d1")  # the first device is the user's own
    user.update(60_000, "page_view", None)
    user.update(120_000, "login", "d2")  # new device
    user.update(180_000, "search", None)
    clicks, searches, carts, new_dev, since = user.values(180_000)
    assert (clicks, searches, carts, new_dev, since) == (4.0, 1.0, 0.0, 1.0, 60.0)


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
