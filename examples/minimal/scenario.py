"""Machines reporting sensor readings, for ``weir demo``: each reading says whether its machine was faulty.

A machine is faulty when it runs hot (over 90 °C). **The injected change**:
after ``shift_at`` of the readings, a second failure mode appears: machines
that vibrate hard (over 8 mm/s) fail too, at any temperature. Readings go to
``sensor.readings`` as Avro in the Confluent wire format, keyed by sensor.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from confluent_kafka import Producer

from streams.codec import AvroCodec
from streams.kafka import DeliveryTracker, ensure_topics, flush_or_raise, produce_waiting, producer_config
from streams.project.spec import ScenarioRun

TOPIC = "sensor.readings"
SENSORS = 40
READINGS_PER_HOUR = 7200.0  # event time: two a second


class SensorScenario:
    """Readings of :data:`SENSORS` machines, paced in wall time."""

    events_per_hour = READINGS_PER_HOUR
    tail_s = 0.0

    def reset(self, postgres_dsn: str) -> None:
        """Nothing to forget: the machines keep no state outside Kafka."""

    def prepare(self, postgres_dsn: str, bootstrap: str, partitions: int) -> None:
        ensure_topics(bootstrap, [TOPIC], partitions)

    def run(self, postgres_dsn: str, bootstrap: str, *, events: int, rate: float | None, seed: int,
            shift_at: float, start: datetime, progress: Callable[[int], None],
            params: Mapping[str, str] | None = None) -> ScenarioRun:
        if params:
            raise ValueError(f"the sensors scenario takes no parameter (got {', '.join(sorted(params))})")
        rng = random.Random(seed)
        codec = AvroCodec(TOPIC)
        tracker = DeliveryTracker()
        producer = Producer(producer_config(bootstrap, **{"linger.ms": 5}))
        gap = timedelta(hours=1 / READINGS_PER_HOUR)
        shift, shift_wall = int(shift_at * events), None
        started = time.monotonic()
        for i in range(events):
            if i == shift:
                shift_wall = time.time()
            temperature = round(rng.gauss(70.0, 12.0), 2)
            vibration = round(abs(rng.gauss(3.0, 2.5)), 2)
            faulty = temperature > 90 or (i >= shift and vibration > 8)
            sensor = f"s{rng.randrange(SENSORS)}"
            record = {"reading_id": f"r{seed}-{i}", "sensor_id": sensor, "ts": start + i * gap,
                      "temperature": temperature, "vibration": vibration, "faulty": faulty}
            produce_waiting(producer, TOPIC, codec.encode(record), sensor.encode(), tracker)
            if i % 100 == 99:
                producer.poll(0)
                progress(i + 1)
                if rate is not None and (ahead := (i + 1) / rate - (time.monotonic() - started)) > 0:
                    time.sleep(ahead)
        flush_or_raise(producer, tracker, timeout=60.0)
        progress(events)
        shift_ms = int((start + shift * gap).timestamp() * 1000) if shift < events else None
        return ScenarioRun(events=events, requests=events, labels=events, shift_event_ms=shift_ms,
                           shift_wall_s=shift_wall, extra={"readings": events})
