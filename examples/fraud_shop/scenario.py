"""The shop as ``weir demo`` drives it: the simulator's events written by the driver, the drift marked.

``params`` of a run (``weir demo --param fraud_rate=0.15``): ``fraud_rate``,
the share of payments that are fraud (default 0.045).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import psycopg

from examples.fraud_shop.driver import ShopDriver
from examples.fraud_shop.simulator import ShopConfig, ShopEvent, ShopSimulator
from streams.project.spec import ScenarioRun

SHOP_TABLES = ("payment_labels", "payments", "orders", "merchants", "customers", "weir_cdc_state")


class DriftMark:
    """Remembers the event time and the wall time at which the shop's drift began."""

    def __init__(self, sim: ShopSimulator) -> None:
        self.sim = sim
        self.event_ms: int | None = None
        self.wall: float | None = None

    def watch(self, events: Iterable[ShopEvent]) -> Iterator[ShopEvent]:
        for ev in events:
            if self.wall is None and self.sim.drift_started_at is not None:
                self.event_ms = int(self.sim.drift_started_at.timestamp() * 1000)
                self.wall = time.time()
            yield ev


class ShopScenario:
    """Clickstream to Kafka, customers, merchants, orders, payments and labels into PostgreSQL."""

    events_per_hour = ShopConfig.events_per_hour
    tail_s = max(ShopConfig.fraud_label_delay_s)  # the labels flushed at the end come up to this much later

    def reset(self, postgres_dsn: str) -> None:
        """Drop the shop's tables, its CDC slot, publication and snapshot record, so the seed's rows are new
        again (the shop's ids are deterministic: kept rows would make every insert a no-op, and no change
        would flow)."""
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = 'weir_cdc'")
            conn.execute("DROP PUBLICATION IF EXISTS weir_cdc")
            conn.execute(f"DROP TABLE IF EXISTS {', '.join(SHOP_TABLES)} CASCADE")

    def prepare(self, postgres_dsn: str, bootstrap: str, partitions: int) -> None:
        ShopDriver(postgres_dsn, bootstrap, partitions=partitions).prepare()

    def run(self, postgres_dsn: str, bootstrap: str, *, events: int, rate: float | None, seed: int,
            shift_at: float, start: datetime, progress: Callable[[int], None],
            params: Mapping[str, str] | None = None) -> ScenarioRun:
        params = dict(params or {})
        fraud_rate = float(params.pop("fraud_rate", ShopConfig.fraud_rate))
        if params:
            raise ValueError(f"the fraud shop takes no parameter {', '.join(sorted(params))} (it takes fraud_rate)")
        sim = ShopSimulator(ShopConfig(seed=seed, drift_at=shift_at, fraud_rate=fraud_rate, start=start))
        mark = DriftMark(sim)
        driver = ShopDriver(postgres_dsn, bootstrap, rate=rate)
        d = driver.run(mark.watch(sim.events(events)), progress=progress)
        extra: dict[str, Any] = {"clicks": d.clicks, "payments": d.payments, "fraud_payments": d.fraud_payments}
        return ScenarioRun(events=d.clicks + d.rows, requests=d.payments, labels=d.labels,
                           shift_event_ms=mark.event_ms, shift_wall_s=mark.wall, extra=extra)
