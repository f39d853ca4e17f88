"""A simulated online shop: clickstream events and database rows, deterministic under a seed.

Pure generation, no I/O: :class:`ShopSimulator` yields :class:`Click` records
(valid for the ``clickstream.events`` schema) and :class:`Row` changes for the shop's
Postgres tables (``examples/fraud_shop/shop.sql``), in non-decreasing event time.
:mod:`examples.fraud_shop.driver` writes them into Kafka and Postgres.

The payment mix is designed so the fraud features are informative:

=================  ========  ====================================================
pattern            is_fraud  what it looks like
=================  ========  ====================================================
legit              no        browsing session, then one checkout of ~20-150
                             (``big_ticket_share`` of them ~200-1000)
renewal            no        digital_goods, 100-300, no session, known device
card_testing       yes       5-15 payments of 0.50-5.00 at various merchants
                             within 1-2 minutes, no session, unknown device
account_takeover   yes       login from a new device, a few page views, then
                             1-2 payments of 300-2000 with that device
digital_cashout    yes       after the drift only: digital_goods, 300-600, no
                             session, known device (renewal-like, larger)
=================  ========  ====================================================

Users browse a lot (2000 customers, ~20k events per simulated hour), so a
pattern "without a session" still shows background clicks by the same user in
the last 30 minutes (~2 on average, against ~11 before a legit checkout).
A logistic regression on the card/user/payment features, trained before the
drift, scores AUC ~0.99 before it and ~0.85 after it; at the threshold of 1%
false positives before the drift it catches ~95% of fraud before and ~36%
after, ~2% of digital_cashout (seed 7, 100k events).

>>> sim = ShopSimulator(ShopConfig(n_customers=50, n_merchants=10))
>>> evs = list(sim.events(500, reference=False, flush_labels=False))
>>> len(evs)
500
>>> all(a.ts <= b.ts for a, b in zip(evs, evs[1:]))
True
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from typing import Any, Literal

PATTERNS = ("legit", "renewal", "card_testing", "account_takeover", "digital_cashout")
FRAUD_PATTERNS = frozenset({"card_testing", "account_takeover", "digital_cashout"})
DIGITAL = "digital_goods"
CATEGORIES = ("fashion", "electronics", "grocery", "home", "travel", "books", "sports")
COUNTRIES = ("US", "GB", "DE", "FR", "NL", "ES", "IT", "PL", "SE", "CA")
QUERIES = ("shoes", "laptop", "headphones", "jacket", "coffee", "lamp", "tent", "novel", "gift card", "phone case")

# Heap tags: what to do when an event leaves the heap.
_PLAIN, _PAYMENT, _FOLLOW_UP = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Click:
    """One clickstream event; ``record`` is valid for ``examples/fraud_shop/schemas/clickstream.events``."""

    record: dict[str, Any]

    @property
    def ts(self) -> datetime:
        """Event time (tz-aware UTC, millisecond precision)."""
        ts: datetime = self.record["ts"]
        return ts


@dataclass(frozen=True, slots=True)
class Row:
    """One row change for the shop's Postgres tables.

    ``row`` holds every column of ``table`` (an ``update`` carries the full new
    row; its key column is ``PRIMARY_KEYS[table]``). ``ts`` is
    the event time of the change. Payment rows (and their labels) carry ground
    truth in ``is_fraud`` and ``pattern``: these are not database columns.
    """

    table: str
    op: Literal["insert", "update"]
    row: dict[str, Any]
    ts: datetime
    is_fraud: bool | None = None
    pattern: str | None = None


ShopEvent = Click | Row

PRIMARY_KEYS: dict[str, str] = {
    "customers": "customer_id",
    "merchants": "merchant_id",
    "orders": "order_id",
    "payments": "payment_id",
    "payment_labels": "payment_id",
}


@dataclass(frozen=True)
class ShopConfig:
    """Every knob of the simulated shop. Durations are simulated seconds.

    ``fraud_rate`` is the target share of payments that are fraud (before and after
    the drift); ``fraud_mix_*`` split it between patterns by share of fraud
    *payments*. ``renewal_share`` is the share of legit payments that are
    subscription renewals. ``drift_at`` is a fraction of ``total`` events.
    """

    seed: int = 7
    n_customers: int = 2000
    n_merchants: int = 80
    n_products: int = 400
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    events_per_hour: float = 20_000.0
    drift_at: float = 0.55
    fraud_rate: float = 0.045
    fraud_mix_before: tuple[tuple[str, float], ...] = (("card_testing", 0.6), ("account_takeover", 0.4))
    fraud_mix_after: tuple[tuple[str, float], ...] = (
        ("digital_cashout", 0.6),
        ("card_testing", 0.25),
        ("account_takeover", 0.15),
    )
    renewal_share: float = 0.25
    big_ticket_share: float = 0.12
    browse_only_per_checkout: float = 0.3
    digital_merchant_share: float = 0.2
    subscriber_share: float = 0.35
    new_device_login_prob: float = 0.04
    capture_prob: float = 0.8
    capture_delay_s: tuple[float, float] = (20.0, 90.0)
    legit_label_delay_s: tuple[float, float] = (60.0, 180.0)
    fraud_label_delay_s: tuple[float, float] = (120.0, 600.0)
    click_gap_mean_s: float = 20.0
    card_testing_payments: tuple[int, int] = (5, 15)
    card_testing_span_s: tuple[float, float] = (60.0, 120.0)

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            raise ValueError("ShopConfig.start must be timezone-aware")
        if not 0.0 <= self.drift_at <= 1.0:
            raise ValueError("drift_at is a fraction of total events in [0, 1]")
        for name in ("fraud_mix_before", "fraud_mix_after"):
            for pattern, _ in getattr(self, name):
                if pattern not in FRAUD_PATTERNS:
                    raise ValueError(f"{name}: {pattern!r} is not a fraud pattern")


def _mean_floor_exp(mean: float) -> float:
    """E[floor(X)] for X ~ Exponential(mean)."""
    return 1.0 / (math.exp(1.0 / mean) - 1.0)


# Session shape: counts are floor(Exponential(mean)) plus a floor.
_PV_MEAN, _SEARCH_MEAN, _ATC_MEAN = 1.6, 1.0, 0.8
_LOGIN_PROB_BUY, _LOGIN_PROB_BROWSE = 0.5, 0.25
_ATC_PROB_BROWSE = 0.25


@dataclass
class _Customer:
    customer_id: str
    cards: list[str]
    devices: list[str]
    ip: str
    subscription: tuple[int, float] | None  # (merchant index, amount)


@dataclass(frozen=True)
class _Merchant:
    merchant_id: str
    category: str


@dataclass
class _Mix:
    """Episode kinds with cumulative weights, and the mean gap between episode starts."""

    kinds: list[str]
    cum: list[float]
    gap_ms: float


def _episode_mix(cfg: ShopConfig, fraud_mix: tuple[tuple[str, float], ...]) -> _Mix:
    """Turn payment shares into episode weights, and the clock rate into a mean episode gap."""
    legit = 1.0 - cfg.fraud_rate
    lo, hi = cfg.card_testing_payments
    payments_per_episode = {"card_testing": (lo + hi) / 2, "account_takeover": 1.5, "digital_cashout": 1.0}
    pay_rows = 3.0 + cfg.capture_prob  # order, payment, label, maybe capture
    pv, se = 1 + _mean_floor_exp(_PV_MEAN), _mean_floor_exp(_SEARCH_MEAN)
    events_per_episode = {
        "checkout": _LOGIN_PROB_BUY + pv + se + 1 + _mean_floor_exp(_ATC_MEAN) + 1 + pay_rows,
        "browse": _LOGIN_PROB_BROWSE + pv + se + _ATC_PROB_BROWSE,
        "renewal": pay_rows,
        "card_testing": payments_per_episode["card_testing"] * pay_rows,
        "account_takeover": 1 + 3 + 1.5 * (1 + pay_rows),
        "digital_cashout": pay_rows,
    }
    weights = {
        "checkout": legit * (1 - cfg.renewal_share),
        "browse": legit * (1 - cfg.renewal_share) * cfg.browse_only_per_checkout,
        "renewal": legit * cfg.renewal_share,
    }
    mix_total = sum(w for _, w in fraud_mix) or 1.0
    for pattern, w in fraud_mix:
        weights[pattern] = cfg.fraud_rate * w / mix_total / payments_per_episode[pattern]
    kinds = list(weights)
    total_w = sum(weights.values())
    mean_events = sum(weights[k] * events_per_episode[k] for k in kinds) / total_w
    return _Mix(kinds, list(accumulate(weights[k] for k in kinds)), mean_events * 3_600_000 / cfg.events_per_hour)


class _Deck:
    """Episode kinds drawn in shuffled blocks holding each kind's expected count (randomly rounded).

    Independent draws would make rare kinds (a card-testing burst is ~1 episode in
    400, yet ~10 payments) swing the fraud rate widely between seeds; blocks keep
    the mix close to its design while the order stays random.
    """

    BLOCK = 500

    def __init__(self, mix: _Mix, rng: random.Random) -> None:
        self.mix, self.rng = mix, rng
        self.cards: list[str] = []

    def draw(self) -> str:
        if not self.cards:
            mix, rng = self.mix, self.rng
            total = mix.cum[-1]
            prev = 0.0
            for kind, cum in zip(mix.kinds, mix.cum, strict=True):
                expected = (cum - prev) / total * self.BLOCK
                prev = cum
                self.cards += [kind] * int(expected + rng.random())
            rng.shuffle(self.cards)
        return self.cards.pop()


@dataclass
class _Heap:
    """Pending events ordered by (event time in ms, insertion order)."""

    items: list[tuple[int, int, ShopEvent, int]] = field(default_factory=list)
    seq: int = 0

    def push(self, ts_ms: int, event: ShopEvent, tag: int = _PLAIN) -> None:
        self.seq += 1
        heapq.heappush(self.items, (ts_ms, self.seq, event, tag))


class _Run:
    """The mutable world of one ``events()`` call: entities, clock, pending events."""

    def __init__(self, cfg: ShopConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.heap = _Heap()
        self.n = 0  # id counter shared by every generated entity
        self.prefix = f"{cfg.seed}-"
        self.merchants = self._make_merchants()
        self.digital = [i for i, m in enumerate(self.merchants) if m.category == DIGITAL] or [0]
        self.customers = self._make_customers()
        self.customer_cum = list(accumulate(min(self.rng.paretovariate(1.5), 20.0) for _ in self.customers))
        self.subscribers = [c for c in self.customers if c.subscription is not None] or self.customers[:1]
        self.products = [f"prod-{i:04d}" for i in range(cfg.n_products)]

    # ---- ids and time -------------------------------------------------------------------
    def next_id(self, kind: str) -> str:
        self.n += 1
        return f"{kind}-{self.prefix}{self.n:x}"

    def dt(self, ts_ms: int) -> datetime:
        return self.cfg.start + timedelta(milliseconds=ts_ms)

    def uniform_ms(self, bounds: tuple[float, float]) -> int:
        return int(self.rng.uniform(*bounds) * 1000)

    # ---- reference data -----------------------------------------------------------------
    def _make_merchants(self) -> list[_Merchant]:
        cfg, rng = self.cfg, self.rng
        n_digital = max(1, round(cfg.n_merchants * cfg.digital_merchant_share))
        cats = [DIGITAL] * n_digital + [CATEGORIES[i % len(CATEGORIES)] for i in range(cfg.n_merchants - n_digital)]
        rng.shuffle(cats)
        return [_Merchant(f"merch-{i:04d}", c) for i, c in enumerate(cats)]

    def _make_customers(self) -> list[_Customer]:
        cfg, rng = self.cfg, self.rng
        out = []
        for i in range(cfg.n_customers):
            cards = [f"card-{i:05d}-{k}" for k in range(1 + (rng.random() < 0.3))]
            devices = [f"dev-{i:05d}-{k}" for k in range(1 + (rng.random() < 0.3))]
            ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            sub = None
            if rng.random() < cfg.subscriber_share:
                sub = (rng.choice(self.digital), round(rng.uniform(100, 300)) - 0.01)
            out.append(_Customer(f"cust-{i:05d}", cards, devices, ip, sub))
        return out

    def reference_rows(self) -> Iterator[Row]:
        """Customers then merchants, as inserts at ``start``."""
        cfg, rng = self.cfg, self.rng
        t0 = cfg.start
        for c in self.customers:
            created = t0 - timedelta(milliseconds=rng.randrange(86_400_000, 900 * 86_400_000))
            row = {
                "customer_id": c.customer_id,
                "email": f"{c.customer_id}@example.com",
                "country": rng.choice(COUNTRIES),
                "created_at": created,
            }
            yield Row("customers", "insert", row, t0)
        for m in self.merchants:
            row = {
                "merchant_id": m.merchant_id,
                "name": f"{m.category.replace('_', ' ').title()} Shop {m.merchant_id[-4:]}",
                "category": m.category,
                "country": rng.choice(COUNTRIES),
            }
            yield Row("merchants", "insert", row, t0)

    # ---- building blocks ----------------------------------------------------------------
    def pick_customer(self) -> _Customer:
        r = self.rng.random() * self.customer_cum[-1]
        return self.customers[bisect(self.customer_cum, r)]

    def click(
        self, ts_ms: int, etype: str, c: _Customer, session: str, device: str | None, ip: str | None,
        page: str | None = None, query: str | None = None, product: str | None = None,
        amount: float | None = None,
    ) -> None:
        record = {
            "event_id": self.next_id("ev"),
            "event_type": etype,
            "user_id": c.customer_id,
            "session_id": session,
            "ts": self.dt(ts_ms),
            "device_id": device,
            "ip": ip,
            "page": page,
            "query": query,
            "product_id": product,
            "amount": amount,
        }
        self.heap.push(ts_ms, Click(record))

    def payment(
        self, ts_ms: int, c: _Customer, card: str, merchant: _Merchant, amount: float, device: str | None,
        pattern: str,
    ) -> None:
        """An order insert and a payment insert (status "authorized") at ``ts_ms``."""
        at = self.dt(ts_ms)
        order_id = self.next_id("ord")
        order = {"order_id": order_id, "customer_id": c.customer_id, "total": amount, "status": "placed",
                 "created_at": at}
        self.heap.push(ts_ms, Row("orders", "insert", order, at))
        pay = {
            "payment_id": self.next_id("pay"),
            "order_id": order_id,
            "customer_id": c.customer_id,
            "card_id": card,
            "merchant_id": merchant.merchant_id,
            "merchant_category": merchant.category,
            "amount": amount,
            "currency": "EUR",
            "status": "authorized",
            "device_id": device,
            "created_at": at,
        }
        fraud = pattern in FRAUD_PATTERNS
        self.heap.push(ts_ms, Row("payments", "insert", pay, at, fraud, pattern), _PAYMENT)

    def follow_ups(self, ts_ms: int, pay: Row) -> None:
        """Schedule the label (always) and the capture (sometimes) of a payment just emitted."""
        cfg, rng = self.cfg, self.rng
        if rng.random() < cfg.capture_prob:
            t = ts_ms + self.uniform_ms(cfg.capture_delay_s)
            captured = {**pay.row, "status": "captured"}
            self.heap.push(t, Row("payments", "update", captured, self.dt(t), pay.is_fraud, pay.pattern), _FOLLOW_UP)
        fraud = bool(pay.is_fraud)
        t = ts_ms + self.uniform_ms(cfg.fraud_label_delay_s if fraud else cfg.legit_label_delay_s)
        at = self.dt(t)
        label = {
            "payment_id": pay.row["payment_id"],
            "is_fraud": fraud,
            "reason": "chargeback" if fraud else "settled",
            "payment_created_at": pay.row["created_at"],
            "labelled_at": at,
        }
        self.heap.push(t, Row("payment_labels", "insert", label, at, fraud, pay.pattern), _FOLLOW_UP)

    def gap(self) -> int:
        return 2000 + int(self.rng.expovariate(1.0 / self.cfg.click_gap_mean_s) * 1000)

    def counts(self, pv_floor: int, atc_floor: int, atc_mean: float | None) -> list[str]:
        """The shuffled middle of a session: page views, searches, add-to-carts."""
        rng = self.rng
        n_pv = pv_floor + int(rng.expovariate(1 / _PV_MEAN))
        n_se = int(rng.expovariate(1 / _SEARCH_MEAN))
        if atc_mean is None:
            n_atc = int(rng.random() < _ATC_PROB_BROWSE)
        else:
            n_atc = atc_floor + int(rng.expovariate(1 / atc_mean))
        middle = ["page_view"] * (n_pv - 1) + ["search"] * n_se + ["add_to_cart"] * n_atc
        rng.shuffle(middle)
        return ["page_view", *middle] if n_pv else middle

    # ---- episodes -----------------------------------------------------------------------
    def session(self, t: int, buy: bool) -> None:
        """A legit browsing session; ``buy`` ends it with a checkout and a payment."""
        rng, cfg = self.rng, self.cfg
        c = self.pick_customer()
        sid = self.next_id("sess")
        device, ip = c.devices[0], c.ip
        if rng.random() < (_LOGIN_PROB_BUY if buy else _LOGIN_PROB_BROWSE):
            if rng.random() < cfg.new_device_login_prob:  # a new phone: legit, and known from now on
                device = self.next_id("dev")
                c.devices.insert(0, device)
            self.click(t, "login", c, sid, device, ip, page="/login")
            t += self.gap()
        for etype in self.counts(1, 1, _ATC_MEAN if buy else None):
            self.middle_click(t, etype, c, sid, device, ip)
            t += self.gap()
        if buy:
            amount = self.checkout_amount()
            self.click(t, "checkout", c, sid, device, ip, page="/checkout", amount=amount)
            merchant = self.merchants[rng.randrange(len(self.merchants))]
            self.payment(t + 50, c, rng.choice(c.cards), merchant, amount, device, "legit")

    def checkout_amount(self) -> float:
        """Mostly ~20-150; a share of big tickets (~200-1000) so that amount alone is no fraud signal."""
        rng, cfg = self.rng, self.cfg
        median, sigma = (450.0, 0.45) if rng.random() < cfg.big_ticket_share else (55.0, 0.6)
        return round(min(rng.lognormvariate(math.log(median), sigma), 5000.0), 2) or 0.99

    def middle_click(self, t: int, etype: str, c: _Customer, sid: str, device: str | None, ip: str | None) -> None:
        rng = self.rng
        if etype == "search":
            self.click(t, "search", c, sid, device, ip, page="/search", query=rng.choice(QUERIES))
        elif etype == "add_to_cart":
            product = rng.choice(self.products)
            self.click(t, "add_to_cart", c, sid, device, ip, page=f"/product/{product}", product=product)
        elif rng.random() < 0.5:
            product = rng.choice(self.products)
            self.click(t, "page_view", c, sid, device, ip, page=f"/product/{product}", product=product)
        else:
            self.click(t, "page_view", c, sid, device, ip, page=f"/category/{rng.choice(CATEGORIES)}")

    def renewal(self, t: int) -> None:
        c = self.rng.choice(self.subscribers)
        m_idx, amount = c.subscription or (self.digital[0], 99.99)
        self.payment(t, c, c.cards[0], self.merchants[m_idx], amount, c.devices[-1], "renewal")

    def card_testing(self, t: int) -> None:
        rng, cfg = self.rng, self.cfg
        c = rng.choice(self.customers)  # stolen card numbers hit anyone, not the most active users
        card = rng.choice(c.cards)
        device = self.next_id("dev")
        n = rng.randint(*cfg.card_testing_payments)
        span = self.uniform_ms(cfg.card_testing_span_s)
        for offset in sorted(rng.randrange(span) for _ in range(n)):
            merchant = self.merchants[rng.randrange(len(self.merchants))]
            amount = round(rng.uniform(0.5, 5.0), 2)
            self.payment(t + offset, c, card, merchant, amount, device, "card_testing")

    def account_takeover(self, t: int) -> None:
        rng = self.rng
        c = self.pick_customer()
        sid, device = self.next_id("sess"), self.next_id("dev")
        ip = f"203.0.113.{rng.randrange(1, 255)}"
        self.click(t, "login", c, sid, device, ip, page="/login")
        for _ in range(rng.randint(2, 4)):
            t += self.gap()
            self.middle_click(t, "page_view", c, sid, device, ip)
        card = rng.choice(c.cards)
        for _ in range(1 + (rng.random() < 0.5)):
            t += self.gap()
            amount = round(rng.uniform(300.0, 2000.0), 2)
            self.click(t, "checkout", c, sid, device, ip, page="/checkout", amount=amount)
            merchant = self.merchants[rng.randrange(len(self.merchants))]
            self.payment(t + 50, c, card, merchant, amount, device, "account_takeover")

    def digital_cashout(self, t: int) -> None:
        rng = self.rng
        c = rng.choice(self.customers)  # like renewals: any account, no session of its own
        merchant = self.merchants[rng.choice(self.digital)]
        amount = round(rng.uniform(300.0, 600.0), 2)
        self.payment(t, c, rng.choice(c.cards), merchant, amount, c.devices[-1], "digital_cashout")

    def start_episode(self, kind: str, t: int) -> None:
        if kind == "checkout":
            self.session(t, True)
        elif kind == "browse":
            self.session(t, False)
        elif kind == "renewal":
            self.renewal(t)
        elif kind == "card_testing":
            self.card_testing(t)
        elif kind == "account_takeover":
            self.account_takeover(t)
        else:
            self.digital_cashout(t)


class ShopSimulator:
    """Generates the shop's events for one :class:`ShopConfig`; deterministic under its seed.

    Only ``random.Random(config.seed)`` is used: no wall clock, no global state.
    ``truth`` maps payment_id -> (is_fraud, pattern) for every payment yielded by
    the latest ``events()`` call; ``drift_started_at`` is the event time of its
    first post-drift episode (``None`` if the drift was not reached).
    """

    def __init__(self, config: ShopConfig | None = None) -> None:
        self.config = config or ShopConfig()
        self.truth: dict[str, tuple[bool, str]] = {}
        self.drift_started_at: datetime | None = None

    def events(self, total: int, *, reference: bool = True, flush_labels: bool = True) -> Iterator[ShopEvent]:
        """Yield the shop's events in non-decreasing event time.

        Contract:
        - with ``reference``, first the reference rows (every customer, then every
          merchant, inserts with ``ts == config.start``); they do NOT count toward
          ``total``;
        - then exactly ``total`` timed events: clicks, orders, payments (insert
          "authorized", later sometimes update "captured") and payment_labels;
        - with ``flush_labels``, then the follow-ups still pending for payments
          already yielded (their labels and captures), in event time; they do NOT
          count toward ``total``. So every yielded payment gets exactly one label.
          Without it, those follow-ups are dropped.
        Episodes still in progress at the end (e.g. the rest of a session) are dropped.
        The drift starts with the first episode begun once ``drift_at * total``
        timed events were yielded, so every ``digital_cashout`` comes after that.
        Each call starts from the same world: same config and arguments, same sequence.
        """
        if total < 0:
            raise ValueError("total must be >= 0")
        run = _Run(self.config)
        self.truth = {}
        self.drift_started_at = None
        if reference:
            yield from run.reference_rows()
        yield from self._timed(run, total)
        if flush_labels:
            yield from self._flush(run)

    def _timed(self, run: _Run, total: int) -> Iterator[ShopEvent]:
        cfg, rng = self.config, run.rng
        before, after = _episode_mix(cfg, cfg.fraud_mix_before), _episode_mix(cfg, cfg.fraud_mix_after)
        drift_index = int(cfg.drift_at * total) if cfg.drift_at < 1.0 else total + 1
        mix, heap, truth = before, run.heap.items, self.truth
        deck = _Deck(before, rng)
        next_start = 0
        produced = 0
        while produced < total:
            if heap and heap[0][0] <= next_start:
                ts_ms, _, event, tag = heapq.heappop(heap)
                if tag == _PAYMENT:
                    assert isinstance(event, Row)
                    truth[event.row["payment_id"]] = (bool(event.is_fraud), event.pattern or "legit")
                    run.follow_ups(ts_ms, event)
                produced += 1
                yield event
                continue
            if mix is before and produced >= drift_index:
                mix, deck = after, _Deck(after, rng)
                self.drift_started_at = run.dt(next_start)
            run.start_episode(deck.draw(), next_start)
            next_start += 1 + int(rng.expovariate(1.0 / mix.gap_ms))

    @staticmethod
    def _flush(run: _Run) -> Iterator[ShopEvent]:
        heap = run.heap.items
        while heap:
            _, _, event, tag = heapq.heappop(heap)
            if tag == _FOLLOW_UP:
                yield event
