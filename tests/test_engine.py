"""Compiled feature views against a brute-force evaluation of their declarations.

The reference reads nothing but the :class:`FeatureView`: for each entity, at
its newest accepted event, every feature is computed from scratch over the
accepted events in its window that match its conditions. Streams are random,
out of order (some past the allowed lateness), with duplicates, missing values
and entities idle past the TTL.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.features.aggregations import Agg, Hopping, Sliding, Status, Tumbling
from examples.fraud_shop.project import card as CARD
from examples.fraud_shop.project import user as USER
from streams.features.definitions import Feature, FeatureView, FirstSeen
from streams.features.engine import ViewState, compile_lanes

LOGIN = ("type", "login")
SINK = FeatureView(
    "sink", "k", 1, source="s",
    specs=(
        Feature("n", Agg.COUNT, Sliding(60_000), "all events"),
        Feature("sum_a", Agg.SUM, Tumbling(30_000), "amounts", value="amount"),
        Feature("mean_a_login", Agg.MEAN, Hopping(60_000, 20_000), "login amounts", value="amount",
                where=(LOGIN,), default=-1.0),
        Feature("std_a", Agg.STD, Sliding(45_000), "amounts", value="amount", default=-1.0),
        Feature("min_a", Agg.MIN, Sliding(45_000), "amounts", value="amount", default=-1.0),
        Feature("max_a_new", Agg.MAX, Sliding(60_000), "amounts on new devices", value="amount",
                where=(LOGIN, ("new", True)), default=-1.0),
        Feature("last_a", Agg.LAST, Sliding(60_000), "newest amount", value="amount", default=-1.0),
        Feature("login_devices", Agg.DISTINCT, Sliding(60_000), "devices logged in with", distinct="device",
                where=(LOGIN,)),
        Feature("types", Agg.DISTINCT, Tumbling(20_000), "event types", distinct="type"),
        Feature("since_search", Agg.SINCE_LAST, Sliding(60_000), "since the last search", where=(("type", "search"),),
                default=60.0),
        Feature("n_new", Agg.COUNT, Sliding(30_000), "new-device logins", where=(LOGIN, ("new", True))),
    ),
    ttl_ms=70_000,
    allowed_lateness_ms=5_000,
    derive=(FirstSeen("device", "new", where=(LOGIN,), remember=3),),
)

event_st = st.tuples(
    st.sampled_from("abc"),  # entity
    st.integers(-8_000, 30_000),  # time step (negative: out of order)
    st.sampled_from(["login", "search", "view"]),
    st.sampled_from(["d1", "d2", "d3", "d4", "d5", None]),
    st.one_of(st.none(), st.floats(-100, 100, allow_nan=False)),
    st.integers(0, 9),  # 0: re-deliver an earlier event
)


def _stream(raw: list[tuple[str, int, str, str | None, float | None, int]]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    ts = 1_000_000
    for i, (k, step, kind, device, amount, dup) in enumerate(raw):
        if dup == 0 and events:
            events.append(events[step % len(events)])
            continue
        ts = max(0, ts + step)
        events.append({"event_id": f"e{i}", "k": k, "ts_ms": ts, "type": kind, "device": device, "amount": amount})
    return events


def reference(view: FeatureView, events: list[dict[str, Any]]) -> list[tuple[Status, list[float] | None]]:
    """Brute force from the declaration: per event, whether it is accepted and, if so, its entity's features
    as of the event's own time, computed from scratch over the events accepted so far."""
    accepted: list[dict[str, Any]] = []
    out: list[tuple[Status, list[float] | None]] = []
    times: list[int] = []  # accepted event times: the watermark is the third newest minus the lateness
    seen_ids: set[tuple[str, str]] = set()
    devices: dict[str, tuple[int, list[Any]]] = {}  # per FirstSeen (one here): entity -> (newest ts, known)
    for e in events:
        if len(times) >= 3 and e["ts_ms"] < sorted(times)[-3] - view.allowed_lateness_ms:
            out.append((Status.LATE, None))
            continue
        e = dict(e)
        for rule in view.derive:
            e[rule.out] = False
            v = e.get(rule.field)
            if all(e.get(f) == x for f, x in rule.where) and v is not None:
                last, known = devices.get(e[view.entity], (None, []))
                if last is None or e["ts_ms"] - last > view.ttl_ms:
                    devices[e[view.entity]] = (e["ts_ms"], [v])
                else:
                    e[rule.out] = v not in known
                    devices[e[view.entity]] = (max(last, e["ts_ms"]),
                                               known + [v] if e[rule.out] and len(known) < rule.remember else known)
        if (e[view.entity], e["event_id"]) in seen_ids:
            out.append((Status.DUPLICATE, None))  # ids are never evicted while not late
            continue
        seen_ids.add((e[view.entity], e["event_id"]))
        accepted.append(e)
        times.append(e["ts_ms"])
        mine = [(i, a) for i, a in enumerate(accepted) if a[view.entity] == e[view.entity]]
        out.append((Status.ACCEPTED, [_feature(f, mine, e["ts_ms"]) for f in view.specs]))
    return out


def _feature(f: Feature, mine: list[tuple[int, dict[str, Any]]], now: int) -> float:
    start = f.window.start(now)
    rows = [(i, e) for i, e in mine if start <= e["ts_ms"] <= now and all(e.get(k) == v for k, v in f.where)]
    if f.value is not None:
        rows = [(i, e) for i, e in rows if isinstance(e[f.value], float) and math.isfinite(e[f.value])]
    if not rows:
        return 0.0 if f.agg in (Agg.COUNT, Agg.SUM, Agg.DISTINCT) else f.default
    xs = [e[f.value] for _, e in rows] if f.value else []
    if f.agg is Agg.COUNT:
        return float(len(rows))
    if f.agg is Agg.SUM:
        return math.fsum(xs)
    if f.agg is Agg.MEAN:
        return math.fsum(xs) / len(xs)
    if f.agg is Agg.STD:
        mean = math.fsum(xs) / len(xs)
        return math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / len(xs))
    if f.agg is Agg.MIN:
        return min(xs)
    if f.agg is Agg.MAX:
        return max(xs)
    if f.agg is Agg.LAST:
        return float(max(rows, key=lambda r: (r[1]["ts_ms"], r[0]))[1][f.value])
    if f.agg is Agg.DISTINCT:
        return float(len({str(e[f.distinct] or "") for _, e in rows}))
    earlier = [e["ts_ms"] for _, e in rows if e["ts_ms"] < now]  # since_last: the newest event before now
    return (now - max(earlier)) / 1000 if earlier else f.default


@settings(max_examples=300, deadline=None)
@given(st.lists(event_st, max_size=60))
def test_compiled_view_matches_its_declaration(raw: list[tuple[str, int, str, str | None, float | None, int]]) -> None:
    events = _stream(raw)
    state = ViewState(SINK)
    for e, (status, values) in zip(events, reference(SINK, events), strict=True):
        assert state.add(e) is status
        if values is None:
            continue
        got = state.values(e["k"], at=e["ts_ms"])
        assert got is not None and got[0] == e["ts_ms"]
        for f, a, b in zip(SINK.specs, got[1], values, strict=True):
            # std from exactly rounded sums of x and x²: absolute error below ~1e-7 * max|x| (|x| <= 100 here)
            assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-5 if f.agg is Agg.STD else 1e-6), (f.name, a, b)


def test_the_lanes_share_storage_where_the_fields_allow() -> None:
    assert [len(lane.features) for lane in compile_lanes(USER)] == [4, 1]  # one lane tagged by event type
    assert [(lane.value, lane.tag) for lane in compile_lanes(CARD)] == [(None, "merchant_id"), ("amount", None)]


def test_user_view_new_device_logins_and_time_since_login() -> None:
    state = ViewState(USER)
    clicks = [(0, "login", "d1"),  # the first device is the user's own
              (60_000, "page_view", None), (120_000, "login", "d2"),  # a new device
              (150_000, "login", "d1"), (180_000, "search", None)]
    for i, (ts, kind, device) in enumerate(clicks):
        assert state.add({"event_id": f"e{i}", "user_id": "u", "ts_ms": ts, "event_type": kind,
                          "device_id": device}) is Status.ACCEPTED
    assert state.values("u") == (180_000, [5.0, 1.0, 0.0, 1.0, 30.0])
    # the watermark: the third newest event time (120 s) minus the lateness
    late = {"event_id": "old", "user_id": "u", "ts_ms": 120_000 - USER.allowed_lateness_ms - 1,
            "event_type": "search", "device_id": None}
    assert state.add(late) is Status.LATE and state.late == 1
    assert state.add({"event_id": "e4", "user_id": "u", "ts_ms": 180_000, "event_type": "search",
                      "device_id": None}) is Status.DUPLICATE
    assert state.values("u") == (180_000, [5.0, 1.0, 0.0, 1.0, 30.0])
    # idle for more than the TTL: devices are forgotten, and the next login's device is the user's own again
    assert state.add({"event_id": "e9", "user_id": "u", "ts_ms": 180_000 + USER.ttl_ms + 1,
                      "event_type": "login", "device_id": "d3"}) is Status.ACCEPTED
    # (the login itself is not the one before it: no login in the hour before, the feature's default)
    assert state.values("u") == (180_000 + USER.ttl_ms + 1, [1.0, 0.0, 0.0, 0.0, 3600.0])


def test_every_lane_drops_entities_idle_past_the_ttl_at_the_views_watermark() -> None:
    """A pre-filtered lane (new-device logins) whose filter stops matching still forgets its entities once the
    view's watermark passes their TTL: its own watermark only moves with its matches."""
    state = ViewState(USER)
    for i in range(50):  # each user logs in from a second device: a new-device login each
        for j, device in enumerate(("d0", "d1")):
            state.add({"event_id": f"l{i}-{j}", "user_id": f"u{i}", "ts_ms": 1_000 * i + j, "event_type": "login",
                       "device_id": device})
    assert len(state) == 50
    later = 50_000 + 2 * USER.ttl_ms
    for k in range(20):  # then only page views, two TTLs later
        state.add({"event_id": f"p{k}", "user_id": f"v{k}", "ts_ms": later + 1_000 * k, "event_type": "page_view",
                   "device_id": None})
    assert len(state) == 20  # the 20 new users: every lane dropped the 50 idle ones
