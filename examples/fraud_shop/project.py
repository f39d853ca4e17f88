"""The simulated fraud shop, declared as a Weir project: what ``make run`` runs.

Events: a clickstream topic written by the shop's front end, and the shop's
PostgreSQL tables streamed by CDC (customers, merchants, orders, payments,
payment labels). Every payment is scored by the ``fraud`` model as it
happens, from two feature views (the card's payment velocity, the user's
behaviour on the site before paying) and three request features; its label
arrives later (a chargeback or its absence, up to 10 minutes of event time
after the payment) on a table of its own.
"""

from __future__ import annotations

from pathlib import Path

from examples.fraud_shop.scenario import ShopScenario
from streams.project import (
    MLP,
    Agg,
    Cdc,
    Feature,
    FeatureView,
    FirstSeen,
    GatePolicy,
    LabelStream,
    Model,
    Project,
    Range,
    RequestFeature,
    RetrainPolicy,
    Rules,
    Sliding,
    Source,
    ViewFeatures,
)

MINUTE = 60_000
HOUR = 60 * MINUTE
MAX_AMOUNT = 1_000_000.0

clicks = Source(
    "clicks", "clickstream.events", event_id="event_id", event_time="ts", keys=("user_id",),
    fields=("event_type", "user_id", "session_id", "device_id", "amount"),
    required=("event_id", "user_id", "session_id"), ranges=(Range("amount", 0.0, MAX_AMOUNT),),
    description="What users do on the site: page views, searches, add-to-cart, logins, checkouts.",
)
payments = Source(
    "payments", "cdc.payments", cdc=Cdc("payments"), event_id="payment_id", event_time="created_at",
    keys=("card_id", "customer_id", "merchant_id"),
    fields=("payment_id", "card_id", "customer_id", "merchant_id", "merchant_category", "amount", "device_id"),
    required=("payment_id", "card_id", "customer_id", "merchant_id", "created_at"),
    ranges=(Range("amount", 0.0, MAX_AMOUNT, low_inclusive=False),),
    description="Card payments, as the shop's database records them: each one is scored.",
)
labels = Source(
    "labels", "cdc.payment_labels", cdc=Cdc("payment_labels"), event_id="payment_id", event_time="labelled_at",
    keys=("payment_id",), fields=("payment_id", "is_fraud", "payment_created_at"),
    required=("payment_id", "payment_created_at", "labelled_at"),
    description="A payment's outcome: fraud (a chargeback) or not, known minutes after the payment.",
)
customers = Source("customers", "cdc.customers", cdc=Cdc("customers"), event_id="customer_id",
                   keys=("customer_id",), fields=("customer_id", "country"))
merchants = Source("merchants", "cdc.merchants", cdc=Cdc("merchants"), event_id="merchant_id",
                   keys=("merchant_id",), fields=("merchant_id", "category", "country"))
orders = Source("orders", "cdc.orders", cdc=Cdc("orders"), event_id="order_id", event_time="created_at",
                keys=("customer_id",), fields=("order_id", "customer_id", "total", "status"))

card = FeatureView(
    "card", "card_id", 3, source="payments",
    specs=(
        Feature("card_count_1m", Agg.COUNT, Sliding(MINUTE), "count of the card's payments, sliding 1 min"),
        Feature("card_amount_1m", Agg.SUM, Sliding(MINUTE), "sum of their amounts, sliding 1 min", value="amount"),
        Feature("card_count_1h", Agg.COUNT, Sliding(HOUR), "count of the card's payments, sliding 1 h"),
        Feature("card_amount_1h", Agg.SUM, Sliding(HOUR), "sum of their amounts, sliding 1 h", value="amount"),
        Feature("card_distinct_merchants_1h", Agg.DISTINCT, Sliding(HOUR),
                "distinct merchants the card paid, sliding 1 h", distinct="merchant_id"),
    ),
    ttl_ms=2 * HOUR, owner="fraud-team",
    description="Velocity of one card: how often, how much and where it paid lately (the payment itself included).",
)
LOGIN = ("event_type", "login")
user = FeatureView(
    "user", "user_id", 3, source="clicks",
    specs=(
        Feature("user_clicks_30m", Agg.COUNT, Sliding(30 * MINUTE),
                "count of the user's clickstream events, sliding 30 min"),
        Feature("user_searches_30m", Agg.COUNT, Sliding(30 * MINUTE), "count of its searches, sliding 30 min",
                where=(("event_type", "search"),)),
        Feature("user_add_to_cart_30m", Agg.COUNT, Sliding(30 * MINUTE),
                "count of its add-to-cart events, sliding 30 min", where=(("event_type", "add_to_cart"),)),
        Feature("user_new_device_logins_1h", Agg.COUNT, Sliding(HOUR),
                "logins from a device the user was not seen logging in with before, sliding 1 h",
                where=(LOGIN, ("new_device", True))),
        Feature("user_secs_since_login", Agg.SINCE_LAST, Sliding(HOUR),
                "seconds since the user's last login; 3600 when none in the last hour", where=(LOGIN,),
                default=3600.0),
    ),
    ttl_ms=2 * HOUR, owner="fraud-team",
    derive=(FirstSeen("device_id", "new_device", where=(LOGIN,)),),
    description="What the user did on the site before paying (keyed by user id = the payment's customer id).",
)

fraud = Model(
    "fraud", "binary", source="payments",
    features=(
        ViewFeatures(card),
        ViewFeatures(user, key="customer_id"),  # a payment's customer is the clickstream's user
        RequestFeature("amount", "amount", "the payment's amount"),
        RequestFeature("log_amount", "log1p(max(amount, 0))", "log(1 + amount)"),
        RequestFeature("is_digital_goods", "merchant_category == 'digital_goods'",
                       "1 when the merchant sells digital goods (resellable, delivered at once)"),
    ),
    label=LabelStream("labels", key="payment_id", value="is_fraud", maturity_s=600.0),
    online="logreg", threshold=0.5,
    trainer=MLP(hidden=(32, 16), window_rows=4000, bootstrap_rows=600),
    gates=GatePolicy(auc_margin=0.02, max_p50_ms=10.0, ece_margin=0.05, max_ece=0.5),
    # the bootstrap champion learns the first hour, while its hour-long windows fill: retrain as labels come
    retrain=RetrainPolicy(every_labels=1500),
    fallback=Rules(weights={
        "card_count_1m": 0.9,  # bursts of payments on one card
        "card_count_1h": 0.3,
        "card_distinct_merchants_1h": 0.6,  # a card tested across many merchants
        "user_new_device_logins_1h": 1.2,  # account take-over
        "amount": 0.35,
        "is_digital_goods": 1.0,  # resellable, delivered at once
        "user_clicks_30m": -0.3,  # browsing before buying looks human
    }, bias=-5.0),  # a payment with all-zero features scores ~0.7%
    key="card_id", carry=("payment_id", "card_id", "customer_id"),
    description="Is this payment fraud? Scored as it happens; learns from chargebacks.",
)

project = Project(
    "fraud_shop", Path(__file__).parent / "schemas",
    sources=(clicks, payments, labels, customers, merchants, orders),
    views=(card, user), models=(fraud,),
    description="A simulated online shop with card fraud, delayed chargebacks and a concept drift.",
    scenario=ShopScenario(),
)
