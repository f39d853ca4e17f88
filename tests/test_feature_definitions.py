"""Feature views as code: versions pinned to definitions, and `weir features list|describe`."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import pytest
import redis

from sinks.redis_store import OnlineStore
from streams.features import cli
from streams.features.aggregations import Agg, Sliding
from examples.fraud_shop.project import MINUTE
from examples.fraud_shop.project import card as CARD
from examples.fraud_shop.project import project as SHOP
from examples.fraud_shop.project import user as USER
from streams.features.definitions import Feature, FeatureView
from streams.features.engine import ViewState
from streams.stack import Endpoints

VIEWS = SHOP.views
DEFAULTS = {f.name: f.default for v in VIEWS for f in v.specs}

# Each view's definition at its version. A failing entry means a definition changed without a new version:
# bump the view's `version` (its Redis keys change with it, so old values are not read as new) and pin it here.
PINNED = {("card", 1): "124520fa345c", ("user", 1): "ebf137b1b3cb",  # hand-written windows
          ("card", 2): "90dcfd5ff44d", ("user", 2): "4cf40d73b908",  # declared, compiled; late events refused
          ("card", 3): "6bd7ca4322e6", ("user", 3): "f092be8169be"}  # declared in the shop's project (source names)


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_a_definition_cannot_change_without_its_version(view: FeatureView) -> None:
    assert PINNED.get((view.name, view.version)) == view.fingerprint, (
        f"view {view.name!r} v{view.version} changed (fingerprint {view.fingerprint}): bump its version")


def test_every_part_of_a_definition_is_in_its_fingerprint() -> None:
    first = CARD.specs[0]
    for change in ({"ttl_ms": CARD.ttl_ms + 1}, {"specs": CARD.specs[:-1]}, {"source": "x"},
                   {"entity": "customer_id"}, {"allowed_lateness_ms": 1}, {"derive": USER.derive},
                   {"specs": (dataclasses.replace(first, window=Sliding(2 * MINUTE)), *CARD.specs[1:])},
                   {"specs": (dataclasses.replace(first, where=(("merchant_id", "m1"),)), *CARD.specs[1:])},
                   {"specs": (dataclasses.replace(first, doc="other"), *CARD.specs[1:])},
                   {"specs": (first, dataclasses.replace(CARD.specs[1], value="fee"), *CARD.specs[2:])}):
        assert dataclasses.replace(CARD, **change).fingerprint != CARD.fingerprint, change
    assert all(v.source and v.description and all(f.doc for f in v.specs) for v in VIEWS)
    assert {f for v in VIEWS for f in v.features} <= set(DEFAULTS)


def test_definitions_that_cannot_be_computed_are_refused() -> None:
    with pytest.raises(ValueError, match="needs value field"):
        Feature("x", Agg.SUM, Sliding(MINUTE), "no field")
    with pytest.raises(ValueError, match="distinct field"):
        Feature("x", Agg.DISTINCT, Sliding(MINUTE), "no field")
    with pytest.raises(ValueError, match="unique"):
        dataclasses.replace(CARD, specs=CARD.specs[:1] * 2)
    with pytest.raises(ValueError, match="ttl_ms"):  # TTL shorter than lateness + the longest window
        ViewState(dataclasses.replace(CARD, ttl_ms=CARD.allowed_lateness_ms))


def test_list_and_describe(capsys: pytest.CaptureFixture[str], endpoints: Endpoints) -> None:
    assert cli._list(argparse.Namespace(project=None)) == 0
    out = capsys.readouterr().out
    assert all(f"v{v.version}" in out and v.fingerprint in out for v in VIEWS)
    store = OnlineStore(endpoints.redis_url)
    event_ts = int(time.time() * 1000) - 60_000
    store.write(CARD, [(f"fresh-{i}", event_ts + i, [1.0] * len(CARD.features)) for i in range(5)])
    args = argparse.Namespace(name="card", redis=endpoints.redis_url, sample=100_000, project=None)
    assert cli._describe(args) == 0
    out = capsys.readouterr().out
    assert "card_distinct_merchants_1h" in out and "weir:fv:card:v3:<card_id>" in out
    assert "newest values as of event time" in out and "last written" in out


def test_freshness_reads_the_newest_event_and_write_times(endpoints: Endpoints) -> None:
    view = dataclasses.replace(CARD, name=f"fresh{time.time_ns()}")
    client: Any = redis.Redis.from_url(endpoints.redis_url)
    assert cli.freshness(client, view, 10, 0) == "  online: no values stored"
    OnlineStore(endpoints.redis_url).write(view, [("a", 1_000, [0.0] * 5), ("b", 3_600_000, [0.0] * 5)])
    line = cli.freshness(client, view, 10, int(time.time() * 1000) + 2_000)
    assert "2 entities sampled" in line and "1970-01-01 01:00:00Z" in line


def test_missing_and_stale_values_come_back_as_defaults_with_a_flag(endpoints: Endpoints) -> None:
    view = dataclasses.replace(CARD, name=f"stale{time.time_ns()}")
    store = OnlineStore(endpoints.redis_url)
    store.write(view, [("fresh", 10 * 3_600_000, [1.0] * 5), ("old", 10 * 3_600_000 - view.ttl_ms - 1, [2.0] * 5)])
    now = 10 * 3_600_000
    fresh, old, missing = store.read([(view, "fresh"), (view, "old"), (view, "none")], as_of=[now] * 3)
    defaults = [DEFAULTS[f] for f in view.features]
    assert (fresh.values, fresh.found, fresh.stale) == ([1.0] * 5, True, False)
    assert (old.values, old.found, old.stale) == (defaults, True, True)
    assert (missing.values, missing.found, missing.stale) == (defaults, False, False)
    assert store.read([(view, "old")])[0].values == [2.0] * 5  # without as_of: as stored
