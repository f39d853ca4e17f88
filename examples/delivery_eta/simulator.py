"""A simulated food-delivery service: orders and their deliveries, deterministic under a seed.

Pure generation, no I/O: :class:`DeliverySimulator` yields :class:`Order` and
:class:`Delivery` records (valid for the ``delivery.orders`` and
``delivery.completed`` schemas) in non-decreasing event time. A delivery
comes when its order is handed over, so a model's label (``minutes``) is
known 10 to 90 minutes of event time after the order it labels.

How long a delivery takes, in minutes::

    prep(restaurant) * (1 + 0.15 * orders the restaurant took in the last 15 min)
    + distance_km * minutes_per_km(zone) * (1.3 if raining)  + noise

The restaurant's recent load and its recent delivery times (feature views
over both streams) and the order's own distance and rain flag (request
features) explain most of it. **The injected shift**: after ``shift_at`` of
the orders, the city's traffic slows (``minutes_per_km`` times ``slowdown``,
plus ``extra_minutes`` at every hand-over), as a road closure would. A model
trained before it underestimates every delivery after it.

>>> sim = DeliverySimulator(DeliveryConfig(n_restaurants=5))
>>> evs = list(sim.events(300))
>>> len(evs) >= 300, sum(isinstance(e, Order) for e in evs) == sum(isinstance(e, Delivery) for e in evs)
(True, True)
>>> all(a.ts <= b.ts for a, b in zip(evs, evs[1:]))
True
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


@dataclass(frozen=True, slots=True)
class Order:
    """One order; ``record`` is valid for ``delivery.orders``."""

    record: dict[str, Any]

    @property
    def ts(self) -> datetime:
        ts: datetime = self.record["placed_at"]
        return ts


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery; ``record`` is valid for ``delivery.completed``."""

    record: dict[str, Any]

    @property
    def ts(self) -> datetime:
        ts: datetime = self.record["delivered_at"]
        return ts


DeliveryEvent = Order | Delivery

MAX_MINUTES = 150.0
"""The longest a delivery takes: the deliveries flushed at the end of a run lie at most this far past it."""


@dataclass(frozen=True)
class DeliveryConfig:
    """Every knob of the simulated service. ``orders_per_hour`` is in event time; ``shift_at`` a fraction of
    the orders."""

    seed: int = 7
    n_restaurants: int = 60
    n_customers: int = 4000
    n_couriers: int = 300
    n_zones: int = 8
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    orders_per_hour: float = 2000.0
    shift_at: float = 0.5
    slowdown: float = 1.6
    extra_minutes: float = 6.0
    rain_share: float = 0.25

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("DeliveryConfig.start must be timezone-aware")
        if not 0.0 <= self.shift_at <= 1.0:
            raise ValueError("shift_at is a fraction of the orders in [0, 1]")


@dataclass(frozen=True)
class _Restaurant:
    restaurant_id: str
    zone: int
    prep_minutes: float
    weight: float


class DeliverySimulator:
    """Generates the service's events; :attr:`shift_started_at` is the event time the shift began (once it has)."""

    def __init__(self, cfg: DeliveryConfig = DeliveryConfig()) -> None:
        self.cfg = cfg
        self.shift_started_at: datetime | None = None

    def events(self, n: int) -> Iterator[DeliveryEvent]:
        """Orders and deliveries in event-time order until ``n`` events are out, then the deliveries of the
        orders still in flight (at most :data:`MAX_MINUTES` later): every order gets its delivery. Each call
        restarts the world."""
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        self.shift_started_at = None
        restaurants = [_Restaurant(f"r{i:03d}", rng.randrange(cfg.n_zones), rng.uniform(6.0, 22.0),
                                   rng.lognormvariate(0.0, 0.6)) for i in range(cfg.n_restaurants)]
        weights = [r.weight for r in restaurants]
        per_km = [rng.uniform(2.2, 4.2) for _ in range(cfg.n_zones)]
        raining = [False] * cfg.n_zones
        recent: dict[str, deque[float]] = {r.restaurant_id: deque() for r in restaurants}
        gap_s = 3600.0 / cfg.orders_per_hour
        shift_order = int(cfg.shift_at * n / 2)
        pending: list[tuple[float, int, Delivery]] = []  # (delivery time, sequence, event)
        t, emitted, order_no = 0.0, 0, 0
        while emitted < n:
            t += rng.expovariate(1.0 / gap_s)
            while pending and pending[0][0] <= t and emitted < n:
                yield heapq.heappop(pending)[2]
                emitted += 1
            if emitted >= n:
                break
            if rng.random() < 0.01:  # the weather changes in one zone
                zone = rng.randrange(cfg.n_zones)
                raining[zone] = rng.random() < cfg.rain_share
            shifted = order_no >= shift_order
            if shifted and self.shift_started_at is None:
                self.shift_started_at = cfg.start + timedelta(seconds=t)
            restaurant = rng.choices(restaurants, weights)[0]
            load = recent[restaurant.restaurant_id]
            while load and load[0] < t - 900:
                load.popleft()
            load.append(t)
            distance = round(rng.uniform(0.4, 7.5), 2)
            items = 1 + int(rng.expovariate(1 / 2.5))
            rain = raining[restaurant.zone]
            minutes = restaurant.prep_minutes * (1 + 0.15 * (len(load) - 1))
            minutes += distance * per_km[restaurant.zone] * (cfg.slowdown if shifted else 1.0) * (1.3 if rain else 1.0)
            minutes += (cfg.extra_minutes if shifted else 0.0) + rng.gauss(0.0, 2.0)
            minutes = round(min(MAX_MINUTES, max(5.0, minutes)), 2)
            placed = cfg.start + timedelta(seconds=t)
            order_id = f"o{cfg.seed}-{order_no}"
            yield Order({"order_id": order_id, "placed_at": placed, "restaurant_id": restaurant.restaurant_id,
                         "customer_id": f"cust-{rng.randrange(cfg.n_customers)}", "zone_id": f"z{restaurant.zone}",
                         "distance_km": distance, "items": items, "basket_value": round(items * rng.uniform(6, 18), 2),
                         "raining": rain})
            emitted += 1
            order_no += 1
            done = t + minutes * 60
            heapq.heappush(pending, (done, order_no, Delivery({
                "order_id": order_id, "restaurant_id": restaurant.restaurant_id,
                "courier_id": f"courier-{rng.randrange(cfg.n_couriers)}",
                "delivered_at": cfg.start + timedelta(seconds=done), "minutes": minutes})))
        while pending:
            yield heapq.heappop(pending)[2]
