"""Throughput and latency of a project's ingest -> features -> inference on the embedded stack.

Two phases, one run:
1. drain: N events are produced first, then the stages start; events/s = N / time until every
   scored event has a prediction.
2. latency: a paced producer (another process) sends at half the drained rate for a while; a
   subscriber (another process) on the model's prediction topic takes, per prediction of this
   phase, its arrival time minus the scored event's produce time (the source message's Kafka
   timestamp, which the record carries as ``predicted_ts - latency_ms``): p50/p99 event produced
   -> prediction received, three hops and the publish included. The records' own ``latency_ms``
   (event produced -> prediction produced, stamped at scoring) is printed too.
Baseline, same run: one bare produce -> consume hop through the same broker at the same rate.

Projects (``--project``; the events come from a generator per project, chosen by its name):

* ``fraud_shop`` (the default, ``examples/fraud_shop``): clicks and Debezium payment envelopes,
  ~15% payments; each payment is scored by ``fraud``. Stages: ingest | features + inference.
* ``sensors`` (the minimal project, ``examples/minimal/project.py``): sensor readings, each one scored by
  ``fault``, whose label is a field of the reading, so its learn stage learns right after
  scoring. Stages: ingest | features + inference + learn; it also prints when learn had learnt
  every drained reading.

Where an event's time goes, per hop, from the Kafka timestamps of the records it passes (each stamped when
its stage produced it): ingest (source produced → silver produced), features (→ scoring produced),
inference (→ the prediction's predicted_ts), publish (→ received by the subscriber). Inference runs on the
features stage's runner when both are in one process (the scoring records handed over in memory, see
docs/runtime.md): the scoring record is then produced after inference ran, so the features hop includes
inference's time and the inference hop is about 0 (slightly negative). ``--unfused`` gives inference a
runner of its own reading the scoring topic, for an A/B.

``--procs 1`` runs every stage in one process, ``--procs 3`` three (learn, or inference, in its own).
``--smoke``: tiny sizes and short phases (well under a
minute; figures meaningless, for tests).

Prints figures; the last line is one JSON object with events_per_s, p50_ms, p99_ms (subscriber),
scoring_p50_ms, scoring_p99_ms (the records' latency_ms), the latency phase's rate, hops_p50_p99_ms (per
hop), whether inference was fused, the baseline and each stage process's peak RSS (peak_rss_mb, MiB).
Run: .venv/bin/python load_tests/pipeline.py [--events 200000] [--seconds 20] [--project REF]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer, TopicPartition

from load_tests.common import add_project_option, child_setup, fail, load_project, peak_rss_mb
from streams.codec import AvroCodec
from streams.kafka import consumer_config, producer_config
from streams.project.contracts import scoring_topic, silver_topic
from streams.project.spec import Project
from streams.settings import WeirSettings
from streams.stack import Endpoints, Stack

SCRIPT = "load_tests/pipeline.py"
STEP_MS = 20  # event time between two generated events (less when a phase must fit before now)
WARM_UP = 2000  # events produced (and scored) before the drain: every stage joined its group
LATENCY_PREFIX = "lat-"  # ids of the latency phase's events
# Event times start three hours ago (ingest refuses events from the future, older than its max age, or
# later than its allowed lateness behind the newest of their partition); the warm-up comes just before,
# the drain from START on, the latency phase after the drain. Child processes are spawned: they read the
# start the parent fixed, so every process agrees on it.
os.environ.setdefault("WEIR_BENCH_START_S", str(int(time.time()) - 3 * 3600))
START_MS = int(os.environ["WEIR_BENCH_START_S"]) * 1000

Event = tuple[str, bytes, bytes]  # topic, key, encoded value


# ---------------------------------------------------------------------------------------------- load


def _source(ts_ms: int, lsn: int) -> dict[str, object]:
    return {"version": "load", "connector": "postgresql", "name": "weir", "ts_ms": ts_ms, "snapshot": "false",
            "db": "postgres", "sequence": None, "schema": "public", "table": "payments", "txId": lsn, "lsn": lsn,
            "xmin": None}


class Load:
    """A project's events: which model scores them, the stage processes, and the generator."""

    model: ClassVar[str]  # the model whose predictions are counted and subscribed to
    stages: ClassVar[dict[int, list[tuple[str, ...]]]]  # the stage processes for --procs 1 and 2
    scored_name: ClassVar[str]  # what the scored events are called (plural)
    scored_topic: str  # the source topic of the scored events

    def __init__(self, project: Project) -> None:
        self.project = project.name
        model = project.model(self.model)
        self.predictions = model.prediction_topic
        source = project.source(model.source)
        # the internal topics a scored event passes on its way (each record stamped when its stage produced it)
        self.hops = (silver_topic(project, source), scoring_topic(project, source))

    def generate(self, n: int, seed: int, offset: int, prefix: str, t0_ms: float, step_ms: float) -> list[Event]:
        """n encoded events, ids ``prefix`` + kind + ``offset + k``, event times ``t0_ms + k * step_ms``."""
        raise NotImplementedError


class ShopLoad(Load):
    """The fraud shop: clicks and Debezium payment envelopes (~15% payments); payments are scored."""

    model = "fraud"
    stages: ClassVar[dict[int, list[tuple[str, ...]]]] = {
        1: [("ingest", "features", "inference")], 2: [("ingest",), ("features", "inference")],
        3: [("ingest",), ("features",), ("inference",)]}
    scored_name = "payments"
    PAYMENT_SHARE = 0.15

    def __init__(self, project: Project) -> None:
        super().__init__(project)
        self.clicks, self.payments = project.source("clicks").topic, project.source("payments").topic
        self.scored_topic = self.payments

    def generate(self, n: int, seed: int, offset: int, prefix: str, t0_ms: float, step_ms: float) -> list[Event]:
        """n encoded events: clicks and Debezium payment envelopes, event times from ``t0_ms``."""
        rng = random.Random(seed)
        clicks, cdc = AvroCodec(self.clicks), AvroCodec(self.payments)
        types = ["page_view", "page_view", "search", "add_to_cart", "login", "checkout"]
        out = []
        for k, i in enumerate(range(offset, offset + n)):
            ts = int(t0_ms + k * step_ms)
            user = f"u{rng.randrange(20_000)}"
            if rng.random() < self.PAYMENT_SHARE:
                pid = f"{prefix}p{i}"
                row = {"payment_id": pid, "order_id": f"o{i}", "customer_id": user,
                       "card_id": f"c{rng.randrange(30_000)}", "merchant_id": f"m{rng.randrange(80)}",
                       "merchant_category": rng.choice(["retail", "digital_goods"]),
                       "amount": round(rng.lognormvariate(3.5, 1.0), 2), "currency": "EUR", "status": "authorized",
                       "device_id": f"d{rng.randrange(40_000)}",
                       "created_at": datetime.fromtimestamp(ts / 1000, UTC).isoformat().replace("+00:00", "Z")}
                env = {"before": None, "after": row, "source": _source(ts, i), "op": "c", "ts_ms": ts}
                out.append((self.payments, pid.encode(), cdc.encode(env)))
            else:
                rec = {"event_id": f"{prefix}e{i}", "event_type": rng.choice(types), "user_id": user,
                       "session_id": f"s{i // 20}", "ts": ts, "device_id": f"d{rng.randrange(40_000)}", "ip": None,
                       "page": "/p", "query": None, "product_id": None, "amount": None}
                out.append((self.clicks, user.encode(), clicks.encode(rec)))
        return out


class SensorLoad(Load):
    """The minimal project: readings of 5,000 sensors; every reading is scored, its label is a field of it."""

    model = "fault"
    stages: ClassVar[dict[int, list[tuple[str, ...]]]] = {
        1: [("ingest", "features", "inference", "learn")], 2: [("ingest",), ("features", "inference", "learn")],
        3: [("ingest",), ("features", "inference"), ("learn",)]}
    scored_name = "readings"
    SENSORS = 5000

    def __init__(self, project: Project) -> None:
        super().__init__(project)
        self.scored_topic = self.readings = project.source("readings").topic

    def generate(self, n: int, seed: int, offset: int, prefix: str, t0_ms: float, step_ms: float) -> list[Event]:
        """n encoded readings, event times from ``t0_ms``; a machine over 90 °C or shaking over 35 mm/s is
        faulty (1% of the labels flipped)."""
        rng = random.Random(seed)
        codec = AvroCodec(self.readings)
        out = []
        for k, i in enumerate(range(offset, offset + n)):
            sensor = f"s{rng.randrange(self.SENSORS)}"
            temperature = round(min(149.0, max(-49.0, rng.gauss(70.0, 12.0))), 2)
            vibration = round(min(99.0, abs(rng.gauss(12.0, 9.0))), 2)
            faulty = (temperature > 90.0 or vibration > 35.0) != (rng.random() < 0.01)
            rec = {"reading_id": f"{prefix}r{i}", "sensor_id": sensor, "ts": int(t0_ms + k * step_ms),
                   "temperature": temperature, "vibration": vibration, "faulty": faulty}
            out.append((self.readings, sensor.encode(), codec.encode(rec)))
        return out


LOADS: dict[str, type[Load]] = {"fraud_shop": ShopLoad, "sensors": SensorLoad}  # by project name


def load_for(project: Project) -> Load:
    cls = LOADS.get(project.name)
    if cls is None:
        fail(SCRIPT, f"no event generator for project {project.name!r} (supported: {', '.join(LOADS)})")
    try:
        return cls(project)
    except KeyError as exc:  # a project of that name, but not of that shape
        fail(SCRIPT, f"the {project.name} event generator does not fit: {exc.args[0]}")


def produce(ref: str, endpoints: Endpoints, n: int, rate: float | None, seed: int, offset: int, prefix: str,
            t0_ms: float, step_ms: float, scored: Any) -> None:
    """Produce n events, as fast as possible or paced at ``rate``/s (encoded before the clock starts,
    so the load generator costs little CPU). Runs in a child process; stores the scored event count."""
    project = child_setup(ref, endpoints.schema_registry_url)
    load = load_for(project)
    events = load.generate(n, seed, offset, prefix, t0_ms, step_ms)
    producer = Producer(producer_config(endpoints.kafka_bootstrap, **{"linger.ms": 5}))
    producer.list_topics(timeout=10)  # connected before the clock starts: the first events do not wait for it
    t0 = time.perf_counter()
    for i, (topic, key, value) in enumerate(events):
        producer.produce(topic, value, key)
        if i % 1000 == 0:
            producer.poll(0)
        if rate and i % 10 == 0:
            ahead = i / rate - (time.perf_counter() - t0)
            if ahead > 0:
                time.sleep(ahead)
    if producer.flush(60):
        raise RuntimeError("load not acknowledged")
    scored.value = sum(1 for topic, _, _ in events if topic == load.scored_topic)


def fit_step(t0_ms: float, n: int) -> float:
    """Event time between events so that ``n`` of them from ``t0_ms`` end a minute before now."""
    room = time.time() * 1000 - 60_000 - t0_ms
    if room <= 0:
        raise RuntimeError("the phase would start in the future: fewer events, or start earlier")
    return min(STEP_MS, room / max(n, 1))


# ---------------------------------------------------------------------------------------------- measures


HOPS = ("ingest", "features", "inference", "publish")  # where an event's time goes, one stamp to the next


def subscribe(ref: str, endpoints: Endpoints, topic: str, hops: tuple[str, ...], expected: Any, ready: Any,
              stop: Any, out: Any) -> None:
    """In its own process, a subscriber of ``topic`` and of the internal ``hops`` topics (silver, scoring) from
    their current ends: per prediction of the latency phase, arrival − the scored event's produce time, the
    record's own latency_ms, and the time of each hop (:data:`HOPS`: source produced → silver produced by
    ingest → scoring produced by features → prediction stamped by inference → prediction received). Puts a
    dict of those lists once it has ``expected`` predictions (known when the producer is done) or ``stop``
    is set."""
    child_setup(ref, endpoints.schema_registry_url)
    codecs = {t: AvroCodec(t) for t in (topic, *hops)}
    consumer = Consumer(consumer_config(endpoints.kafka_bootstrap, f"bench-subscriber-{time.time_ns()}"))
    assignment = []
    for t in codecs:
        for p in consumer.list_topics(t, timeout=10).topics[t].partitions:
            end = consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
            assignment.append(TopicPartition(t, p, end))
    consumer.assign(assignment)
    consumer.consume(1, 0.5)  # connected and fetching
    ready.set()
    stamps: dict[str, dict[str, float]] = {t: {} for t in hops}  # hop topic -> event id -> produce time
    seen: list[tuple[str, float, float, float]] = []  # event id, source produced, prediction stamped, received
    while not stop.is_set() and not (expected.value and len(seen) >= expected.value):
        msgs = consumer.consume(10_000, 0.002)  # returns when it has 10,000 or the timeout passed,
        now_ms = time.time() * 1000  # so an arrival is late by at most ~2 ms
        for m in msgs:
            on = m.topic()
            if m.error() is not None or on is None:
                continue
            rec = codecs[on].decode(m.value())
            if on != topic:
                at = stamps[on]
                for item in rec["items"]:
                    at[item["event_id"]] = m.timestamp()[1]
            elif rec["event_id"].startswith(LATENCY_PREFIX):
                predicted_ms = rec["predicted_ts"].timestamp() * 1000
                seen.append((rec["event_id"], predicted_ms - rec["latency_ms"], predicted_ms, now_ms))
    consumer.close()
    result: dict[str, list[float]] = {"e2e": [], "at_scoring": [], **{h: [] for h in HOPS}}
    for event_id, source_ms, predicted_ms, received_ms in seen:
        result["e2e"].append(received_ms - source_ms)
        result["at_scoring"].append(predicted_ms - source_ms)
        between = [stamps[t].get(event_id) for t in hops]
        chain = [source_ms, *(x for x in between if x is not None), predicted_ms, received_ms]
        if len(chain) == len(HOPS) + 1:  # stamped at every hop
            for name, a, b in zip(HOPS, chain, chain[1:], strict=False):
                result[name].append(b - a)
    out.put(result)


def bare_hop(bootstrap: str, rate: float, seconds: float) -> tuple[float, float]:
    """Baseline in the same run: p50/p99 of one produce -> consume hop through the same broker at
    ``rate`` messages/s, with a bare confluent-kafka consumer and nothing else running."""
    from streams.kafka import ensure_topics

    ensure_topics(bootstrap, ["bench.hop"], 4)
    consumer = Consumer(consumer_config(bootstrap, "bench-hop"))
    consumer.assign([TopicPartition("bench.hop", p, 0) for p in range(4)])
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 5}))
    # both connected before the clock starts (else the first second's messages wait for the connections:
    # measured, that alone made this baseline's p99 400-900 ms instead of ~20)
    producer.list_topics(timeout=10)
    consumer.consume(1, 0.5)
    n, lats = max(1, int(rate * seconds)), []
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


def worker(ref: str, endpoints: Endpoints, tmp: Path, stages: tuple[str, ...], scored: Any, learned: Any,
           stop: Any, pause: Any, cpu: Any, rss: Any = None, fuse: bool = True) -> None:
    """A child process running some stages (``fuse``: inference on the features runner when both are here);
    reports scored (and learnt) events through shared values, and its peak RSS (MiB) into ``rss`` as it
    stops."""
    from streams.pipeline import Pipeline, PipelineConfig  # here: the load processes need none of it

    project = child_setup(ref, endpoints.schema_registry_url)  # a spawned process: take ids from the registry
    model = load_for(project).model
    config = PipelineConfig(data_dir=tmp, stages=stages, fuse=fuse)
    pipeline = Pipeline(project, endpoints, config)
    pipeline.start()
    inference = pipeline.stages.get(f"inference-{model}")
    learn = pipeline.stages.get(f"learn-{model}")
    try:
        paused = False
        while not stop.is_set():
            pipeline.check()
            if pause.is_set() != paused:
                paused = pause.is_set()
                for r in pipeline.runners.values():
                    (r.paused.set if paused else r.paused.clear)()
            if inference is not None:
                scored.value = inference.scored
            if learn is not None:
                learned.value = learn.learned
            time.sleep(0.02)  # the counts' resolution; more often cost the stages measurable CPU
        with cpu.get_lock():
            cpu.value += time.process_time()
        for name, r in pipeline.runners.items():
            st = r.stats
            print(f"  {name}: consumed {st.consumed}, batches {st.batches}, busy {st.busy_s:.1f}s, "
                  f"mean lag at consume {st.lag_ms_sum / max(st.consumed, 1):.1f} ms", getattr(r, "phases", None), flush=True)
    finally:
        pipeline.stop()
        if rss is not None:
            rss.value = peak_rss_mb()


@dataclass
class StageProcesses:
    """The stage processes of a run, one :func:`worker` per group of stages, and what they share: the scored and
    learnt counts, the stop and pause events, their CPU seconds and each one's peak RSS (MiB) by group name."""

    procs: list[Any]
    scored: Any
    learned: Any
    stop: Any
    pause: Any
    cpu: Any
    rss: dict[str, Any]

    @classmethod
    def start(cls, ctx: Any, ref: str, endpoints: Endpoints, tmp: Path,
              groups: list[tuple[str, ...]], *, fuse: bool = True) -> StageProcesses:
        shared = (ctx.Value("q", 0), ctx.Value("q", 0), ctx.Event(), ctx.Event(), ctx.Value("d", 0.0))
        rss = {"+".join(g): ctx.Value("d", 0.0) for g in groups}
        procs = [ctx.Process(target=worker, args=(ref, endpoints, tmp, g, *shared, rss["+".join(g)], fuse))
                 for g in groups]
        for p in procs:
            p.start()
        return cls(procs, *shared, rss)

    def peak_rss(self) -> dict[str, float]:
        """Each stage process's peak RSS (MiB), once it stopped."""
        return {name: round(v.value, 1) for name, v in self.rss.items()}


def wait_count(counter: Any, target: int, timeout: float, procs: list[Any], what: str = "predictions") -> float:
    """Seconds until ``counter`` reached ``target``."""
    t0 = time.perf_counter()
    while counter.value < target:
        if any(not p.is_alive() for p in procs):
            raise RuntimeError("a stage process died")
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"only {counter.value} of {target} {what} after {timeout:.0f}s")
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=None,
                    help="events/s for the latency phase (default: half the drained rate)")
    ap.add_argument("--procs", type=int, choices=(1, 2, 3), default=2,
                    help="1: all stages in one process; 2: ingest | the others; 3: ingest | features + inference | "
                         "learn (the minimal project), ingest | features | inference (the shop)")
    ap.add_argument("--unfused", action="store_true",
                    help="inference on a runner of its own, reading the scoring topic (default: on the features runner)")
    add_project_option(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, short phases: well under a minute")
    args = ap.parse_args()
    args.warm_up = WARM_UP
    if args.smoke:
        args.events, args.seconds, args.warm_up = 3000, 2.0, 300
    project = load_project(args.project)
    load = load_for(project)
    with tempfile.TemporaryDirectory() as tmp:
        settings = WeirSettings(data_dir=Path(tmp))
        stack = Stack(settings, project, with_postgres=False)
        endpoints = stack.start()
        try:
            run(endpoints, args, load, Path(tmp))
        finally:
            stack.stop()


def run(endpoints: Endpoints, args: argparse.Namespace, load: Load, tmp: Path) -> None:
    ctx = mp.get_context("spawn")
    ref, kafka = args.project, endpoints.kafka_bootstrap
    groups = load.stages[args.procs]
    flow = " | ".join("+".join(g) for g in groups)
    stages = StageProcesses.start(ctx, ref, endpoints, tmp, groups, fuse=not args.unfused)
    procs, scored, learned, stop, pause = stages.procs, stages.scored, stages.learned, stages.stop, stages.pause
    learns = any("learn" in g for g in groups)
    sub_stop, results = ctx.Event(), ctx.Queue()
    try:
        # warm-up: every stage joined its group and scored something (event times just before the drain's),
        # then pause and pre-produce
        count = ctx.Value("q", 0)
        t_warm = START_MS - args.warm_up * STEP_MS - 60_000
        w = ctx.Process(target=produce, args=(ref, endpoints, args.warm_up, None, 3, 10**9, "warm-", t_warm,
                                              STEP_MS, count))
        w.start(); w.join()
        wait_count(scored, count.value, 180, procs)
        warm = scored.value
        if learns:
            wait_count(learned, warm, 120, procs, "learnt")
        print(f"after warm-up: broker/redis CPU {services_cpu()}")
        pause.set()
        time.sleep(0.5)
        step = fit_step(START_MS, args.events)
        p = ctx.Process(target=produce, args=(ref, endpoints, args.events, None, 1, 0, "", START_MS, step, count))
        t0 = time.perf_counter()
        p.start(); p.join()
        total = count.value + warm
        print(f"pre-produced {args.events} events ({count.value} {load.scored_name}) in "
              f"{time.perf_counter() - t0:.1f}s")
        pause.clear()
        t_drain = time.perf_counter()
        drain_s = wait_count(scored, total, 600, procs)
        rate = args.events / drain_s
        print(f"drain: {args.events} events ({total - warm} {load.scored_name}) through {flow} in {drain_s:.1f}s = "
              f"{rate:,.0f} events/s ({args.procs} stage process(es))")
        learn_s = None
        if learns:
            wait_count(learned, total, 600, procs, "learnt")
            learn_s = time.perf_counter() - t_drain
            print(f"learn: every drained {load.scored_name[:-1]} learnt {learn_s:.1f}s after the drain began "
                  f"({args.events / learn_s:,.0f} events/s)")
        print(f"after drain: broker/redis CPU {services_cpu()}")
        half = args.rate or rate / 2
        n = max(1, int(half * args.seconds))
        t_lat = START_MS + args.events * step
        expected, ready = ctx.Value("q", 0), ctx.Event()
        sub = ctx.Process(target=subscribe, args=(ref, endpoints, load.predictions, load.hops, expected,
                                                  ready, sub_stop, results), daemon=True)
        sub.start()
        deadline = time.monotonic() + 120
        while not ready.wait(0.2):
            if not sub.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the subscriber did not start")
        q = ctx.Process(target=produce, args=(ref, endpoints, n, half, 2, args.events, LATENCY_PREFIX, t_lat,
                                              fit_step(t_lat, n), count))
        q.start(); q.join()
        expected.value = count.value
        wait_count(scored, total + count.value, 300, procs)
        try:
            seen = results.get(timeout=60)
        except queue.Empty:  # some predictions never came: take what it saw (checked below)
            sub_stop.set()
            seen = results.get(timeout=30)
        sub.join(10)
    finally:
        sub_stop.set()
        stop.set()
    for w in procs:
        w.join(60)
    e2e = seen["e2e"]
    if len(e2e) < expected.value:
        raise RuntimeError(f"the subscriber saw {len(e2e)} of {expected.value} predictions")
    (p50, p99), (s50, s99) = np.percentile(e2e, [50, 99]), np.percentile(seen["at_scoring"], [50, 99])
    print(f"latency at {half:,.0f} events/s for {args.seconds:.0f}s ({len(e2e)} {load.scored_name}): "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (event produced -> prediction received, three hops); at scoring "
          f"(the record's latency_ms) p50 {s50:.1f} ms, p99 {s99:.1f} ms")
    hops = {h: [round(float(x), 1) for x in np.percentile(seen[h], [50, 99])] for h in HOPS if seen[h]}
    print(f"  per hop, p50 / p99 ms ({len(seen[HOPS[0]])} events stamped at every hop): "
          + ", ".join(f"{h} {a} / {b}" for h, (a, b) in hops.items()))
    hop50, hop99 = bare_hop(kafka, half, min(args.seconds, 10))
    print(f"baseline, same broker, same rate: one bare produce -> consume hop p50 {hop50:.1f} ms, "
          f"p99 {hop99:.1f} ms")
    print(f"CPU seconds: stage processes {stages.cpu.value:.1f}, services {services_cpu()} (whole run)")
    peak = stages.peak_rss()
    print(f"peak RSS per stage process (MiB): {peak}")
    print(json.dumps({"project": load.project, "model": load.model, "events_per_s": round(rate),
                      "p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1),
                      "scoring_p50_ms": round(float(s50), 1), "scoring_p99_ms": round(float(s99), 1),
                      "latency_rate_events_per_s": round(half), "stage_processes": args.procs, "fused": not args.unfused,
                      "hops_p50_p99_ms": hops,
                      "bare_hop_p50_ms": round(hop50, 1), "bare_hop_p99_ms": round(hop99, 1),
                      "peak_rss_mb": peak}
                     | ({"learn_events_per_s": round(args.events / learn_s)} if learn_s else {})))


if __name__ == "__main__":
    main()
