"""The delivery service as ``weir demo`` drives it: the simulator's orders and deliveries produced to Kafka.

Both are plain Kafka topics (the ordering and courier apps publish their events;
no database): each event is encoded with its topic's registered schema in the
Confluent wire format, keyed by restaurant. ``params`` of a run
(``weir demo --param slowdown=2``): ``slowdown`` and ``extra_minutes``, the
injected shift's size (:class:`~examples.delivery_eta.simulator.DeliveryConfig`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime

from confluent_kafka import Producer

from examples.delivery_eta.simulator import MAX_MINUTES, Delivery, DeliveryConfig, DeliverySimulator, Order
from streams.codec import AvroCodec
from streams.kafka import DeliveryTracker, ensure_topics, flush_or_raise, produce_waiting, producer_config
from streams.project.spec import ScenarioRun

ORDERS, DELIVERIES = "delivery.orders", "delivery.completed"
_CHUNK = 100  # events between pacing and progress checks


class DeliveryScenario:
    """Orders and deliveries of the simulated service, paced in wall time."""

    events_per_hour = 2 * DeliveryConfig.orders_per_hour  # an order and its delivery
    tail_s = MAX_MINUTES * 60  # the deliveries of the last orders

    def reset(self, postgres_dsn: str) -> None:
        """Nothing to forget: the service keeps no state outside Kafka."""

    def prepare(self, postgres_dsn: str, bootstrap: str, partitions: int) -> None:
        ensure_topics(bootstrap, [ORDERS, DELIVERIES], partitions)

    def run(self, postgres_dsn: str, bootstrap: str, *, events: int, rate: float | None, seed: int,
            shift_at: float, start: datetime, progress: Callable[[int], None],
            params: Mapping[str, str] | None = None) -> ScenarioRun:
        given = dict(params or {})
        unknown = sorted(set(given) - {"slowdown", "extra_minutes"})
        if unknown:
            raise ValueError(f"the delivery service takes no parameter {', '.join(unknown)} "
                             "(it takes slowdown and extra_minutes)")
        sim = DeliverySimulator(DeliveryConfig(
            seed=seed, shift_at=shift_at, start=start,
            slowdown=float(given.get("slowdown", DeliveryConfig.slowdown)),
            extra_minutes=float(given.get("extra_minutes", DeliveryConfig.extra_minutes))))
        codecs = {Order: (ORDERS, AvroCodec(ORDERS)), Delivery: (DELIVERIES, AvroCodec(DELIVERIES))}
        tracker = DeliveryTracker()
        producer = Producer(producer_config(bootstrap, **{"linger.ms": 5}))
        counts = {Order: 0, Delivery: 0}
        shift_wall: float | None = None
        started = time.monotonic()
        n = 0
        for n, event in enumerate(sim.events(events), 1):
            topic, codec = codecs[type(event)]
            value = codec.encode(event.record)
            produce_waiting(producer, topic, value, event.record["restaurant_id"].encode(), tracker)
            counts[type(event)] += 1
            if shift_wall is None and sim.shift_started_at is not None:
                shift_wall = time.time()
            if n % _CHUNK == 0:
                producer.poll(0)
                progress(n)
                if rate is not None and (ahead := n / rate - (time.monotonic() - started)) > 0:
                    time.sleep(ahead)
        flush_or_raise(producer, tracker, timeout=60.0)
        progress(n)
        shift_ms = int(sim.shift_started_at.timestamp() * 1000) if sim.shift_started_at is not None else None
        return ScenarioRun(events=n, requests=counts[Order], labels=counts[Delivery], shift_event_ms=shift_ms,
                           shift_wall_s=shift_wall, extra={"orders": counts[Order], "deliveries": counts[Delivery]})
