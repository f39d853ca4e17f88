"""The fraud model's feature views: what is computed, over which window, per which entity.

The feature vector the models see is ``FEATURE_NAMES`` in this order: the
card view, the user view, then request features computed from the payment
itself. Streaming (features stage), serving (inference stage) and training
(retrain stage) all import these names, so they cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from streams.features.windows import Window

MINUTE = 60_000
HOUR = 60 * MINUTE
SINCE_LOGIN_CAP_S = 3600.0


@dataclass(frozen=True)
class FeatureView:
    """A named, versioned group of features of one entity, stored together online.

    ``docs`` says, per feature, what it aggregates over which window (the code
    that computes it is the view's state class below). ``fingerprint`` hashes the
    whole definition; a test pins it per (name, version), so a definition cannot
    change without its version changing — and with it the Redis keys.
    """

    name: str
    entity: str
    version: int
    features: tuple[str, ...]
    ttl_ms: int
    source: str = ""
    docs: tuple[str, ...] = ()
    owner: str = "fraud-team"
    description: str = ""

    def redis_key(self, entity_id: str) -> str:
        return f"weir:fv:{self.name}:v{self.version}:{entity_id}"

    @property
    def fingerprint(self) -> str:
        """SHA-256 (12 hex digits) of the definition, defaults included."""
        body = asdict(self) | {"defaults": [DEFAULTS.get(f, 0.0) for f in self.features]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


CARD = FeatureView(
    "card", "card_id", 1,
    ("card_count_1m", "card_amount_1m", "card_count_1h", "card_amount_1h", "card_distinct_merchants_1h"),
    ttl_ms=2 * HOUR,
    source="weir.payments",
    docs=("count of the card's payments, sliding 1 min", "sum of their amounts, sliding 1 min",
          "count of the card's payments, sliding 1 h", "sum of their amounts, sliding 1 h",
          "distinct merchants the card paid, sliding 1 h"),
    description="Velocity of one card: how often, how much and where it paid lately (the payment itself included).",
)
USER = FeatureView(
    "user", "user_id", 1,
    ("user_clicks_30m", "user_searches_30m", "user_add_to_cart_30m", "user_new_device_logins_1h",
     "user_secs_since_login"),
    ttl_ms=2 * HOUR,
    source="weir.clicks",
    docs=("count of the user's clickstream events, sliding 30 min", "count of its searches, sliding 30 min",
          "count of its add-to-cart events, sliding 30 min",
          "logins from a device the user was not seen with before, sliding 1 h",
          f"seconds since the user's last login, capped at {SINCE_LOGIN_CAP_S:.0f}"),
    description="What the user did on the site before paying (keyed by user id = the payment's customer id).",
)
VIEWS = (CARD, USER)
REQUEST = ("amount", "log_amount", "is_digital_goods")
FEATURE_NAMES: tuple[str, ...] = CARD.features + USER.features + REQUEST


@dataclass(slots=True)
class CardState:
    payments: Window = field(default_factory=lambda: Window(HOUR))

    def update(self, ts: int, amount: float, merchant_id: str) -> None:
        self.payments.add(ts, amount, merchant_id)

    def values(self, now: int) -> list[float]:
        p = self.payments
        return [float(p.count(now, MINUTE)), p.total(now, MINUTE), float(p.count(now, HOUR)), p.total(now, HOUR),
                float(p.distinct(now, HOUR))]


@dataclass(slots=True)
class UserState:
    clicks: Window = field(default_factory=lambda: Window(30 * MINUTE))
    new_device_logins: Window = field(default_factory=lambda: Window(HOUR))
    devices: set[str] = field(default_factory=set)
    last_login_ms: int | None = None

    MAX_DEVICES = 32

    def update(self, ts: int, event_type: str, device_id: str | None) -> None:
        self.clicks.add(ts, 1.0, event_type)
        if event_type != "login":
            return
        self.last_login_ms = ts if self.last_login_ms is None else max(self.last_login_ms, ts)
        if device_id is not None and device_id not in self.devices:
            if self.devices:  # the first device a user is seen with is not "new"
                self.new_device_logins.add(ts, 1.0)
            if len(self.devices) < self.MAX_DEVICES:
                self.devices.add(device_id)

    def values(self, now: int) -> list[float]:
        c = self.clicks
        since = SINCE_LOGIN_CAP_S if self.last_login_ms is None else min(
            SINCE_LOGIN_CAP_S, max(0.0, (now - self.last_login_ms) / 1000))
        return [float(c.count(now, 30 * MINUTE)), float(c.count_tag(now, 30 * MINUTE, "search")),
                float(c.count_tag(now, 30 * MINUTE, "add_to_cart")), float(self.new_device_logins.count(now, HOUR)),
                since]


def request_features(amount: float, merchant_category: str) -> list[float]:
    return [amount, math.log1p(max(amount, 0.0)), 1.0 if merchant_category == "digital_goods" else 0.0]


DEFAULTS: dict[str, float] = {name: 0.0 for name in FEATURE_NAMES} | {"user_secs_since_login": SINCE_LOGIN_CAP_S}
