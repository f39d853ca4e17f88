"""The watermark rule against adversarial streams: outliers cannot make on-time events late."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.base import InvalidEvent, Reason
from streams.event_time import CONFIRMATIONS, EventTimeGuard, base, confirm, new_top
from streams.features.aggregations import Agg, Sliding, Status
from streams.features.definitions import Feature, FeatureView
from streams.features.engine import ViewState

LATENESS = 1_000


def plain_accepts(times: list[int], lateness: int) -> list[bool]:
    """The rule before: late when below the newest accepted event time minus the lateness."""
    newest: int | None = None
    out = []
    for ts in times:
        ok = newest is None or ts >= newest - lateness
        out.append(ok)
        if ok:
            newest = ts if newest is None else max(newest, ts)
    return out


def robust_accepts(times: list[int], lateness: int) -> list[bool]:
    top = new_top()
    out = []
    for ts in times:
        b = base(top)
        ok = b is None or ts >= b - lateness
        out.append(ok)
        if ok:
            confirm(top, ts)
    return out


honest_streams = st.lists(st.integers(-3_000, 3_000), min_size=1, max_size=80).map(
    lambda steps: [100_000 + sum(steps[:i + 1]) for i in range(len(steps))])  # a random walk: out of order too


@settings(max_examples=400, deadline=None)
@given(honest_streams, st.lists(st.tuples(st.integers(0, 80), st.integers(-10**9, 10**9)),
                                max_size=CONFIRMATIONS - 1))
def test_outliers_never_make_an_event_late_that_the_honest_stream_accepts(honest: list[int],
                                                                          outliers: list[tuple[int, int]]) -> None:
    """Up to CONFIRMATIONS - 1 outliers, anywhere and of any size, refuse nothing that the plain rule over
    the honest events alone would accept (the robust base stays between the honest third newest and newest)."""
    stream: list[tuple[bool, int]] = [(True, ts) for ts in honest]
    for at, ts in sorted(outliers, reverse=True):
        stream.insert(min(at, len(stream)), (False, ts))
    got = robust_accepts([ts for _, ts in stream], LATENESS)
    robust_honest = [ok for (is_honest, _), ok in zip(stream, got, strict=True) if is_honest]
    for plain, robust in zip(plain_accepts(honest, LATENESS), robust_honest, strict=True):
        assert robust or not plain


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=100))
def test_the_watermark_never_moves_back_and_trails_the_third_newest(times: list[int]) -> None:
    top = new_top()
    seen: list[int] = []
    last = None
    for ts in times:
        confirm(top, ts)
        seen.append(ts)
        b = base(top)
        assert b == (sorted(seen)[-CONFIRMATIONS] if len(seen) >= CONFIRMATIONS else None)
        assert last is None or (b is not None and b >= last)
        last = b


def test_one_event_290_s_ahead_no_longer_sends_the_next_on_time_events_to_the_dlq() -> None:
    """The regression of the chaos runs: one event inside the 300 s future bound moved its partition's
    watermark and the next 80 on-time events went to the dead-letter topic as late."""
    now = 1_000_000.0
    guard = EventTimeGuard(max_future_ms=300_000, max_age_ms=86_400_000, allowed_lateness_ms=60_000,
                           clock=lambda: now)
    t0 = int(now * 1000) - 30_000
    for i in range(10):
        guard.check(("clicks", 0), t0 + i * 100)
    guard.check(("clicks", 0), int(now * 1000) + 290_000)  # a producer with a broken clock
    for i in range(80):
        guard.check(("clicks", 0), t0 + 1_000 + i * 100)  # all accepted: no InvalidEvent
    assert plain_accepts([t0, t0 + 320_000, t0 + 1_000], 60_000) == [True, True, False]  # what the old rule did
    with pytest.raises(InvalidEvent) as info:  # a truly late one is still refused, and says why
        guard.check(("clicks", 0), t0 - 70_000)
    assert info.value.reason is Reason.LATE and "3rd newest" in str(info.value)


def test_a_feature_view_is_not_pushed_by_one_outlier() -> None:
    view = FeatureView("v", "k", 1, source="s", ttl_ms=7_200_000, allowed_lateness_ms=60_000,
                       specs=(Feature("n", Agg.COUNT, Sliding(600_000), "events, 10 min"),))
    state = ViewState(view)
    t0 = 10_000_000
    statuses = [state.add({"event_id": f"e{i}", "k": "a", "ts_ms": t0 + i * 1_000}) for i in range(5)]
    for key in "ab":  # one outlier for another entity, one for this one (the old rule: all 20 after it late)
        statuses.append(state.add({"event_id": f"far-{key}", "k": key, "ts_ms": t0 + 290_000}))
    statuses += [state.add({"event_id": f"f{i}", "k": "a", "ts_ms": t0 + 5_000 + i * 1_000}) for i in range(20)]
    assert statuses.count(Status.ACCEPTED) == len(statuses) and state.late == 0
    assert state.values("a", at=t0 + 24_000) == (t0 + 24_000, [25.0])  # the outlier is after that time
