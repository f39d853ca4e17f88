"""Throughput and latency of ingest -> features -> inference on the embedded stack.

Two phases, one run:
1. drain: N events (clicks and Debezium payment envelopes, ~15% payments) are
   produced first, then the stages start; events/s = N / time until every
   payment has a prediction.
2. latency: a paced producer (another process) sends at half the drained
   rate for a while; p50/p99 is event produced -> prediction produced.

Prints figures; the last line is one JSON object with events_per_s, p50_ms, p99_ms.
Run: .venv/bin/python load_tests/pipeline.py [--events 200000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Producer

from streams import schemas
from streams import topics as T
from streams.codec import AvroCodec
from streams.kafka import producer_config
from streams.pipeline import Pipeline, PipelineConfig
from streams.settings import WeirSettings
from streams.stack import Stack

PAYMENT_SHARE = 0.15
# Event times start three hours ago (ingest refuses events from the future or older than its max age).
# Child processes are spawned: they read the start the parent fixed, so every process agrees on it.
os.environ.setdefault("WEIR_BENCH_START_S", str(int(time.time()) - 3 * 3600))
START = datetime.fromtimestamp(int(os.environ["WEIR_BENCH_START_S"]), UTC)


def _source(ts_ms: int, lsn: int) -> dict[str, object]:
    return {"version": "load", "connector": "postgresql", "name": "weir", "ts_ms": ts_ms, "snapshot": "false",
            "db": "postgres", "sequence": None, "schema": "public", "table": "payments", "txId": lsn, "lsn": lsn,
            "xmin": None}


def generate(n: int, seed: int, offset: int) -> list[tuple[str, bytes, bytes]]:
    """n encoded (topic, key, value) events: clicks and Debezium payment envelopes."""
    rng = random.Random(seed)
    clicks, cdc = AvroCodec(T.CLICKS), AvroCodec(T.CDC_PAYMENTS)
    types = ["page_view", "page_view", "search", "add_to_cart", "login", "checkout"]
    out = []
    for i in range(offset, offset + n):
        ts = START.timestamp() * 1000 + i * 20
        user = f"u{rng.randrange(20_000)}"
        if rng.random() < PAYMENT_SHARE:
            row = {"payment_id": f"p{i}", "order_id": f"o{i}", "customer_id": user,
                   "card_id": f"c{rng.randrange(30_000)}", "merchant_id": f"m{rng.randrange(80)}",
                   "merchant_category": rng.choice(["retail", "digital_goods"]),
                   "amount": round(rng.lognormvariate(3.5, 1.0), 2), "currency": "EUR", "status": "authorized",
                   "device_id": f"d{rng.randrange(40_000)}",
                   "created_at": datetime.fromtimestamp(ts / 1000, UTC).isoformat().replace("+00:00", "Z")}
            env = {"before": None, "after": row, "source": _source(int(ts), i), "op": "c", "ts_ms": int(ts)}
            out.append((T.CDC_PAYMENTS, row["payment_id"].encode(), cdc.encode(env)))
        else:
            rec = {"event_id": f"e{i}", "event_type": rng.choice(types), "user_id": user,
                   "session_id": f"s{i // 20}", "ts": int(ts), "device_id": f"d{rng.randrange(40_000)}", "ip": None,
                   "page": "/p", "query": None, "product_id": None, "amount": None}
            out.append((T.CLICKS, user.encode(), clicks.encode(rec)))
    return out


def produce(bootstrap: str, n: int, rate: float | None, seed: int, offset: int, payments: Any) -> None:
    """Produce n events, as fast as possible or paced at ``rate``/s (encoded before the clock starts,
    so the load generator costs little CPU). Runs in a child process; stores the payment count."""
    events = generate(n, seed, offset)
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 5}))
    t0 = time.perf_counter()
    for i, (topic, key, value) in enumerate(events):
        producer.produce(topic, value, key)
        if i % 1000 == 0:
            producer.poll(0)
        if rate and i % 10 == 0:
            ahead = i / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush(60)
    payments.value = sum(1 for topic, _, _ in events if topic == T.CDC_PAYMENTS)


def bare_hop(bootstrap: str, rate: float, seconds: float) -> tuple[float, float]:
    """Baseline in the same run: p50/p99 of one produce -> consume hop through the same broker at
    ``rate`` messages/s, with a bare confluent-kafka consumer and nothing else running."""
    from confluent_kafka import Consumer, TopicPartition

    from streams.kafka import consumer_config, ensure_topics

    ensure_topics(bootstrap, ["bench.hop"], 4)
    consumer = Consumer(consumer_config(bootstrap, "bench-hop"))
    consumer.assign([TopicPartition("bench.hop", p, 0) for p in range(4)])
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 5}))
    n, lats = int(rate * seconds), []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            for m in consumer.consume(500, 0.005):
                if m.error() is None:
                    lats.append(time.time() * 1000 - m.timestamp()[1])

    reader = threading.Thread(target=consume)
    reader.start()
    t0 = time.perf_counter()
    for i in range(n):
        producer.produce("bench.hop", b"x" * 150, str(i).encode())
        if i % 10 == 0:
            producer.poll(0)
            ahead = i / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
    producer.flush(30)
    deadline = time.time() + 30
    while len(lats) < n and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    reader.join()
    consumer.close()
    arr = np.array(lats)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def worker(endpoints: Any, tmp: Path, stages: tuple[str, ...], scored: Any, reset: Any, stop: Any,
           latencies: Any, pause: Any, cpu: Any) -> None:
    """A child process running some stages; reports scored payments and latencies through shared values."""
    schemas.use_registry(endpoints.schema_registry_url)  # a spawned process: take ids from the registry
    config = PipelineConfig(data_dir=tmp, stages=stages)
    pipeline = Pipeline(endpoints, config)
    pipeline.start()
    stage = pipeline.stages.get("inference")
    try:
        paused = False
        while not stop.is_set():
            pipeline.check()
            if pause.is_set() != paused:
                paused = pause.is_set()
                for r in pipeline.runners.values():
                    (r.paused.set if paused else r.paused.clear)()
            if stage is not None:
                if reset.is_set():
                    stage.latencies_ms.clear()
                    reset.clear()
                scored.value = stage.scored
            time.sleep(0.005)
        if stage is not None:
            latencies.put(list(stage.latencies_ms))
        with cpu.get_lock():
            cpu.value += time.process_time()
        for name, r in pipeline.runners.items():
            st = r.stats
            print(f"  {name}: consumed {st.consumed}, batches {st.batches}, busy {st.busy_s:.1f}s, "
                  f"mean lag at consume {st.lag_ms_sum / max(st.consumed, 1):.1f} ms", getattr(r, "phases", None), flush=True)
    finally:
        pipeline.stop()


def _wait(scored: Any, target: int, timeout: float, procs: list[Any]) -> float:
    """Seconds until ``target`` payments in all have been scored."""
    t0 = time.perf_counter()
    while scored.value < target:
        if any(not p.is_alive() for p in procs):
            raise RuntimeError("a stage process died")
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"only {scored.value} of {target} predictions after {timeout:.0f}s")
        time.sleep(0.005)
    return time.perf_counter() - t0


def services_cpu() -> dict[str, float]:
    """CPU seconds used so far by the embedded broker and Redis (children of this process)."""
    import psutil

    out: dict[str, float] = {}
    for child in psutil.Process().children(recursive=True):
        for name in ("tansu", "valkey"):
            if name in child.name():
                t = child.cpu_times()
                out[name] = round(out.get(name, 0.0) + t.user + t.system, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=None,
                    help="events/s for the latency phase (default: half the drained rate)")
    ap.add_argument("--procs", type=int, choices=(1, 2), default=2,
                    help="1: all stages in one process; 2: ingest | features+inference")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = WeirSettings(data_dir=Path(tmp))
        stack = Stack(settings, with_postgres=False)
        endpoints = stack.start()
        try:
            run(endpoints, args, Path(tmp))
        finally:
            stack.stop()


def run(endpoints: Any, args: argparse.Namespace, tmp: Path) -> None:
    ctx = mp.get_context("spawn")
    groups = [("ingest", "features", "inference")] if args.procs == 1 else [("ingest",), ("features", "inference")]
    scored, reset, stop, latencies = ctx.Value("q", 0), ctx.Event(), ctx.Event(), ctx.Queue()
    pause, cpu = ctx.Event(), ctx.Value("d", 0.0)
    procs = [ctx.Process(target=worker, args=(endpoints, tmp, g, scored, reset, stop, latencies, pause, cpu))
             for g in groups]
    for w in procs:
        w.start()
    try:
        # warm-up: every stage joined its group and scored something, then pause and pre-produce
        count = ctx.Value("q", 0)
        w = ctx.Process(target=produce, args=(endpoints.kafka_bootstrap, 2000, None, 3, 10**9, count))
        w.start(); w.join()
        _wait(scored, count.value, 120, procs)
        warm = scored.value
        print(f"after warm-up: broker/redis CPU {services_cpu()}")
        pause.set()
        time.sleep(0.5)
        p = ctx.Process(target=produce, args=(endpoints.kafka_bootstrap, args.events, None, 1, 0, count))
        t0 = time.perf_counter()
        p.start(); p.join()
        payments = count.value + warm
        print(f"pre-produced {args.events} events ({count.value} payments) in {time.perf_counter() - t0:.1f}s")
        pause.clear()
        drain_s = _wait(scored, payments, 600, procs)
        rate = args.events / drain_s
        print(f"drain: {args.events} events ({payments} payments) through ingest->features->inference "
              f"in {drain_s:.1f}s = {rate:,.0f} events/s ({args.procs} stage process(es))")
        print(f"after drain: broker/redis CPU {services_cpu()}")
        reset.set()
        half = args.rate or rate / 2
        n = int(half * args.seconds)
        q = ctx.Process(target=produce, args=(endpoints.kafka_bootstrap, n, half, 2, args.events, count))
        q.start(); q.join()
        _wait(scored, payments + count.value, 300, procs)
    finally:
        stop.set()
    lat = np.array(latencies.get(timeout=60))
    for w in procs:
        w.join(60)
    p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
    print(f"latency at {half:,.0f} events/s for {args.seconds:.0f}s ({len(lat)} payments): "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (event -> prediction, three hops)")
    hop50, hop99 = bare_hop(endpoints.kafka_bootstrap, half, min(args.seconds, 10))
    print(f"baseline, same broker, same rate: one bare produce -> consume hop p50 {hop50:.1f} ms, "
          f"p99 {hop99:.1f} ms")
    print(f"CPU seconds: stage processes {cpu.value:.1f}, services {services_cpu()} (whole run)")
    print(json.dumps({"events_per_s": round(rate), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1),
                      "latency_rate_events_per_s": round(half), "stage_processes": args.procs,
                      "bare_hop_p50_ms": round(hop50, 1), "bare_hop_p99_ms": round(hop99, 1)}))


if __name__ == "__main__":
    main()
