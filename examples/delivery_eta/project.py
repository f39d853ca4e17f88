"""A food-delivery service's ETA, declared as a Weir project: a regression with delayed numeric labels.

Events: the ordering app publishes each order to ``delivery.orders`` and the
courier app each hand-over to ``delivery.completed`` (plain Kafka topics, keyed
by restaurant). Every order is scored by the ``eta`` model as it is placed
(predicted minutes to delivery) from two feature views of its restaurant (its
recent orders, its recent delivery times) and the order itself; its label, the
actual minutes, arrives with the delivery 10 to 150 minutes of event time
later. ``weir --project examples.delivery_eta.project:project demo`` runs it,
with a slowdown of the city's traffic injected half way.
"""

from __future__ import annotations

from pathlib import Path

from examples.delivery_eta.scenario import DeliveryScenario
from streams.project import (
    MLP,
    Agg,
    Feature,
    FeatureView,
    GatePolicy,
    LabelStream,
    Model,
    Project,
    Range,
    RequestFeature,
    Rules,
    Sliding,
    Source,
    ViewFeatures,
)

MINUTE = 60_000
HOUR = 60 * MINUTE

orders = Source(
    "orders", "delivery.orders", event_id="order_id", event_time="placed_at", keys=("restaurant_id",),
    fields=("order_id", "restaurant_id", "zone_id", "distance_km", "items", "basket_value", "raining"),
    required=("order_id", "restaurant_id", "zone_id"),
    ranges=(Range("distance_km", 0.0, 50.0), Range("items", 1, 100), Range("basket_value", 0.0, 10_000.0)),
    description="Orders as they are placed: each one gets an ETA.",
)
deliveries = Source(
    "deliveries", "delivery.completed", event_id="order_id", event_time="delivered_at",
    keys=("restaurant_id", "order_id"), fields=("order_id", "restaurant_id", "minutes"),
    required=("order_id", "restaurant_id"), ranges=(Range("minutes", 0.0, 600.0),),
    description="Hand-overs: how long each order took, the ETA model's label.",
)

kitchen = FeatureView(
    "kitchen", "restaurant_id", 1, source="orders",
    specs=(
        Feature("orders_15m", Agg.COUNT, Sliding(15 * MINUTE), "orders the restaurant took, sliding 15 min"),
        Feature("orders_1h", Agg.COUNT, Sliding(HOUR), "orders the restaurant took, sliding 1 h"),
        Feature("items_15m", Agg.SUM, Sliding(15 * MINUTE), "items in them, sliding 15 min", value="items"),
        Feature("distance_1h", Agg.MEAN, Sliding(HOUR), "their mean distance, sliding 1 h", value="distance_km"),
    ),
    ttl_ms=2 * HOUR, owner="logistics",
    description="How busy a restaurant's kitchen is (the order itself included).",
)
recent = FeatureView(
    "recent", "restaurant_id", 1, source="deliveries",
    specs=(
        Feature("minutes_1h", Agg.MEAN, Sliding(HOUR), "mean delivery minutes of the restaurant, sliding 1 h",
                value="minutes", default=30.0),
        Feature("minutes_max_1h", Agg.MAX, Sliding(HOUR), "its slowest delivery, sliding 1 h", value="minutes",
                default=30.0),
        Feature("deliveries_1h", Agg.COUNT, Sliding(HOUR), "its deliveries, sliding 1 h"),
    ),
    ttl_ms=3 * HOUR, allowed_lateness_ms=30 * MINUTE, owner="logistics",
    description="How long the restaurant's deliveries took lately (known only once they are handed over).",
)

eta = Model(
    "eta", "regression", source="orders",
    features=(
        ViewFeatures(kitchen),
        ViewFeatures(recent),  # read from the online store: deliveries handed over before the order
        RequestFeature("distance_km", "distance_km", "road distance to the customer"),
        RequestFeature("items", "items"),
        RequestFeature("basket_value", "basket_value"),
        RequestFeature("raining", "raining", "1 when it rains in the zone"),
        RequestFeature("rain_km", "distance_km if raining else 0", "distance ridden in the rain"),
    ),
    label=LabelStream("deliveries", key="order_id", value="minutes", maturity_s=5400.0, horizon_s=4 * 3600.0),
    online="linreg",
    trainer=MLP(hidden=(32, 16), window_rows=4000, bootstrap_rows=600),
    gates=GatePolicy(mae_margin=0.05, max_p50_ms=10.0),
    fallback=Rules(weights={"distance_km": 3.0, "items": 0.5, "minutes_1h": 0.3}, bias=10.0),  # minutes
    key="restaurant_id", carry=("zone_id",),
    description="Minutes from placing an order to its hand-over, predicted when it is placed.",
)

project = Project(
    "delivery_eta", Path(__file__).parent / "schemas",
    sources=(orders, deliveries), views=(kitchen, recent), models=(eta,),
    description="A simulated food-delivery service whose traffic slows down half way.",
    scenario=DeliveryScenario(),
)
