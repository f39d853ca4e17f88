"""Ingest alone: Weir's ingest stage against a bare confluent-kafka loop doing the least the job needs.

For each input kind (clickstream events; Debezium payment changes) N events
are produced first. Then, alternately, ``--reps`` times each:

* **weir**: a :class:`BatchRunner` running :class:`IngestStage` exactly as the
  pipeline builds it (Avro decode with schema resolution, validation, event-time
  checks, pseudonymization, dedup in Redis, micro-batch encode, produce, commit
  after flush) drains the topic; the clock starts when the group has assigned
  the partitions.
* **ceiling**: one consumer (assign, no group) with a bare loop: fastavro
  decode, required-field check, one micro-batch encode per partition per
  batch, produce, final flush. No dedup, no pseudonymization, no event time,
  no commits.

It also measures the CDC connector alone (``--cdc-rows``, 0 to skip): rows
inserted into PostgreSQL in transactions of 1,000, then the time until the
connector has published every change and Kafka acknowledged it (decoding
``pgoutput``, Debezium envelope, Avro, produce, slot advance).

Prints the figures per rep; the last line is one JSON object with
``events_per_s`` (Weir, clicks, median), ``ceiling_events_per_s``, ``ratio``,
the same for CDC changes through ingest (``cdc_*``),
``connector_changes_per_s`` and ``peak_rss_mb`` (this process's: it ran every ingest stage).

The events are the fraud shop's (``--project``, default the shop: any project declaring its ``clicks``
and ``payments`` sources). ``--smoke``: a few thousand events, one rep, a small CDC run (well under a
minute; figures meaningless, for tests).
Run: .venv/bin/python load_tests/ingest.py [--events 300000] [--reps 3] [--cdc-rows 50000] [--project REF]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastavro
from confluent_kafka import Consumer, Producer, TopicPartition

from load_tests.common import add_project_option, load_project, peak_rss_mb, require_shop
from streams.codec import AvroCodec
from streams.kafka import consumer_config, ensure_topics, producer_config
from streams.pipeline import PipelineConfig, ingest_stage
from streams.project.contracts import silver_topic
from streams.project.spec import Project, Source
from streams.runtime import BatchRunner
from streams.settings import WeirSettings
from streams.stack import Endpoints, Stack

START_MS = int(time.time() * 1000) - 3 * 3600 * 1000  # three hours ago: inside ingest's age limits


def clicks(source: Source, n: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    rng, codec = random.Random(seed), AvroCodec(source.topic)
    types = ["page_view", "page_view", "search", "add_to_cart", "login", "checkout"]
    out = []
    for i in range(n):
        u = rng.randrange(20_000)  # 20,000 users, each with one of its two devices and its own address
        user = f"u{u}"
        rec = {"event_id": f"e{i}", "event_type": rng.choice(types), "user_id": user, "session_id": f"s{i // 20}",
               "ts": START_MS + i * 20, "device_id": f"d{u}-{rng.randrange(2)}", "ip": f"10.{u // 250}.{u % 250}.7",
               "page": "/p", "query": None, "product_id": None, "amount": None}
        out.append((user.encode(), codec.encode(rec)))
    return out


def changes(source: Source, n: int, seed: int = 2) -> list[tuple[bytes, bytes]]:
    rng, codec = random.Random(seed), AvroCodec(source.topic)
    out = []
    for i in range(n):
        ts = START_MS + i * 20
        row = {"payment_id": f"p{i}", "order_id": f"o{i}", "customer_id": f"u{rng.randrange(20_000)}",
               "card_id": f"c{rng.randrange(30_000)}", "merchant_id": f"m{rng.randrange(80)}",
               "merchant_category": "retail", "amount": round(rng.lognormvariate(3.5, 1.0), 2), "currency": "EUR",
               "status": "authorized", "device_id": f"d{rng.randrange(40_000)}",
               "created_at": datetime.fromtimestamp(ts / 1000, UTC).isoformat()}
        block = {"version": "load", "connector": "postgresql", "name": "weir", "ts_ms": ts, "snapshot": "false",
                 "db": "postgres", "sequence": None, "schema": "public", "table": "payments", "txId": i, "lsn": i,
                 "xmin": None}
        env = {"before": None, "after": row, "source": block, "op": "c", "ts_ms": ts}
        out.append((row["payment_id"].encode(), codec.encode(env)))
    return out


def produce(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 20}))
    for i, (key, value) in enumerate(events):
        producer.produce(topic, value, key)
        if i % 10_000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("load not acknowledged")


def weir_run(project: Project, endpoints: Endpoints, topic: str, n: int, rep: int, tmp: Path) -> float:
    """Events/s of the ingest stage draining ``n`` events of ``topic`` (its own fresh consumer group)."""
    stage = ingest_stage(project, PipelineConfig(data_dir=tmp), endpoints.redis_url)  # as the pipeline builds it
    stage.topics = (topic,)
    runner = BatchRunner(stage, endpoints.kafka_bootstrap, group_id=f"bench-ingest-{topic}-{rep}-{time.time_ns()}",
                         max_batch=500, max_wait_ms=5, fetch_wait_ms=10)
    runner.paused.set()
    runner.start()
    if not runner.ready.wait(60):
        raise TimeoutError("ingest never got its partitions")
    t0 = time.perf_counter()
    runner.paused.clear()
    while runner.stats.consumed < n:
        if runner.error is not None:
            raise RuntimeError("ingest failed") from runner.error
        time.sleep(0.002)
    runner.stop()
    elapsed = time.perf_counter() - t0  # includes the final flush and commit
    if stage.counts["accepted"] != n:
        raise RuntimeError(f"ingest accepted {stage.counts['accepted']} of {n}: {dict(stage.counts)}")
    return n / elapsed


def ceiling_run(bootstrap: str, project: Project, source: Source, n: int, partitions: int) -> float:
    """Events/s of the bare decode → validate → produce loop over the same ``n`` events."""
    topic, cdc = source.topic, source.cdc is not None
    reader = AvroCodec(topic).subject.parsed
    out_codec = AvroCodec(silver_topic(project, source))
    required = ("event_id", "user_id", "session_id") if not cdc else ("payment_id", "card_id")
    consumer = Consumer(consumer_config(bootstrap, "bench-ceiling", **{"fetch.wait.max.ms": 10}))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    producer = Producer(producer_config(bootstrap))
    t0, seen = time.perf_counter(), 0
    while seen < n:
        groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for m in consumer.consume(500, 0.005):
            if m.error() is not None:
                continue
            seen += 1
            body = io.BytesIO(m.value())
            body.seek(5)
            rec = fastavro.schemaless_reader(body, reader, reader)
            row = rec if not cdc else rec["after"]
            if all(row.get(f) for f in required):
                groups[m.partition()].append(_item(cdc, row, m.timestamp()[1]))
        for p, items in groups.items():
            producer.produce("bench.ceiling", out_codec.encode({"items": items}), partition=p)
        producer.poll(0)
    producer.flush(60)
    elapsed = time.perf_counter() - t0
    consumer.close()
    return n / elapsed


def _item(cdc: bool, r: dict[str, Any], source_ms: int) -> dict[str, Any]:
    """The silver record of a click or a payment row (the fields the shop's sources keep)."""
    if not cdc:
        return {"event_id": r["event_id"], "ts_ms": int(r["ts"].timestamp() * 1000), "source_ms": source_ms,
                "event_type": r["event_type"], "user_id": r["user_id"], "session_id": r["session_id"],
                "device_id": r["device_id"], "amount": r["amount"]}
    return {"event_id": r["payment_id"], "ts_ms": int(datetime.fromisoformat(r["created_at"]).timestamp() * 1000),
            "source_ms": source_ms, "payment_id": r["payment_id"], "card_id": r["card_id"],
            "customer_id": r["customer_id"], "merchant_id": r["merchant_id"],
            "merchant_category": r["merchant_category"], "amount": r["amount"], "device_id": r["device_id"]}


def connector_run(endpoints: Endpoints, rows: int) -> float:
    """Changes/s of the CDC connector publishing ``rows`` inserts already committed in PostgreSQL."""
    import psycopg

    from examples.fraud_shop.driver import ShopDriver
    from streams.cdc import CdcConnector

    ShopDriver(endpoints.postgres_dsn, endpoints.kafka_bootstrap).prepare()
    connector = CdcConnector(endpoints.postgres_dsn, endpoints.kafka_bootstrap, ["payments"], slot="bench_slot",
                             publication="bench_pub", max_changes=5000)
    connector.setup()
    with psycopg.connect(endpoints.postgres_dsn, autocommit=True) as conn:
        for start in range(0, rows, 1000):
            conn.execute(
                "INSERT INTO payments SELECT 'bench-' || i, 'o', 'c', 'card-' || (i %% 3000), 'm', 'retail', "
                "(i %% 500) + 0.99, 'EUR', 'authorized', 'dev-' || (i %% 7000), now() "
                "FROM generate_series(%s::int, %s::int) AS i", (start, min(start + 1000, rows) - 1))
    t0 = time.perf_counter()
    while connector.stats.changes_published < rows:
        if connector.poll_once() == 0:
            time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    connector.close()
    return rows / elapsed


def measure(project: Project, endpoints: Endpoints, source: Source, n: int, reps: int, partitions: int,
            tmp: Path) -> dict[str, float]:
    topic = source.topic
    weir, ceiling = [], []
    for rep in range(reps):
        ceiling.append(ceiling_run(endpoints.kafka_bootstrap, project, source, n, partitions))
        weir.append(weir_run(project, endpoints, topic, n, rep, tmp))
        print(f"  {topic} rep {rep + 1}: weir {weir[-1]:,.0f}/s, ceiling {ceiling[-1]:,.0f}/s", flush=True)
    w, c = statistics.median(weir), statistics.median(ceiling)
    return {"events_per_s": round(w), "ceiling_events_per_s": round(c), "ratio": round(w / c, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="clickstream events (CDC changes: half as many)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cdc-rows", type=int, default=50_000, help="rows for the CDC connector alone (0: skip)")
    add_project_option(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one rep: a run of well under a minute")
    args = ap.parse_args()
    if args.smoke:
        args.events, args.reps, args.cdc_rows = 4000, 1, 2000
    project = load_project(args.project)
    require_shop("load_tests/ingest.py", project, sources=("clicks", "payments"))
    click_source, payment_source = project.source("clicks"), project.source("payments")
    with tempfile.TemporaryDirectory() as tmp:
        settings = WeirSettings(data_dir=Path(tmp) / "stack")
        with Stack(settings, project, with_postgres=args.cdc_rows > 0) as endpoints:
            ensure_topics(endpoints.kafka_bootstrap, ["bench.ceiling"], settings.partitions)
            n_cdc = args.events // 2
            produce(endpoints.kafka_bootstrap, click_source.topic, clicks(click_source, args.events))
            produce(endpoints.kafka_bootstrap, payment_source.topic, changes(payment_source, n_cdc))
            print(f"ingest alone, {args.events:,} clicks and {n_cdc:,} CDC changes, {args.reps} reps, "
                  "medians:", flush=True)
            click = measure(project, endpoints, click_source, args.events, args.reps, settings.partitions, Path(tmp))
            cdc = measure(project, endpoints, payment_source, n_cdc, args.reps, settings.partitions, Path(tmp))
            connector = round(connector_run(endpoints, args.cdc_rows)) if args.cdc_rows else None
            print(f"  CDC connector: {connector:,} changes/s (PostgreSQL → Kafka, acknowledged)" if connector
                  else "  CDC connector: skipped", flush=True)
    print(f"clicks: weir {click['events_per_s']:,}/s vs ceiling {click['ceiling_events_per_s']:,}/s "
          f"(ratio {click['ratio']}); CDC changes: weir {cdc['events_per_s']:,}/s vs ceiling "
          f"{cdc['ceiling_events_per_s']:,}/s (ratio {cdc['ratio']})")
    rss = round(peak_rss_mb(), 1)  # this process ran every ingest stage of the run (and its ceiling loops)
    print(f"peak RSS of this process (the ingest stages and the ceiling loops): {rss:,} MiB")
    print(json.dumps(click | {f"cdc_{k}": v for k, v in cdc.items()} | {"connector_changes_per_s": connector,
                                                                          "peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
