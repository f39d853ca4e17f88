"""The minimal project through Weir against a bare hand-written confluent-kafka loop doing the same work.

The minimal project (``examples/minimal/project.py``): one Avro source keyed by sensor, one view over a 60 s
sliding window written to Redis, the label in each event, a river ``StandardScaler | LogisticRegression``
online learner that scores then learns every event, Avro predictions. One run, the same pre-produced readings
(load_tests/pipeline.py's generator and seeds: 5,000 sensors), measured one after the other (never sharing the
CPU):

* **weir**: the stages as load_tests/pipeline.py runs them, ingest | features + inference | learn (three
  processes; ``--procs 2``: learn shares the features process), drain N readings; events/s = N / time
  from unpausing them until learn had learnt every one (until inference had scored every one is printed
  too).
* **bare**: one process, its own consumer group on the same topic from its beginning, a loop as a careful
  engineer would write it: ``consume(500)``, per event decode the Avro value (Confluent wire format,
  fastavro), update the sensor's 60 s window held in a dict (count, mean temperature, max vibration, seconds
  since the previous reading), write the sensor's values to Redis (a redis-py pipeline of the event's
  commands, executed per event), compute the request features, river ``predict_proba_one`` then
  ``learn_one`` (the model's online learner, built as Weir builds it), encode an Avro prediction (the
  model's online prediction schema), produce it; then commit the batch asynchronously. Events/s from the
  first of the N readings processed to the last (the final flush is printed apart); its positions must
  have moved by N, so every reading was processed exactly once.

Both first process the same warm-up readings (untimed): every stage and the bare loop joined its group,
and both learners learnt them. The Weir stages are stopped before the bare loop drains. Prints both rates,
their ratio (weir / bare; the issue's target is >= 2.0) and each process's peak RSS (``ru_maxrss``), where
the Weir stages' time went (their runners' stats) and the broker's and Redis's CPU per phase; the last line
is one JSON object with events, weir_events_per_s, weir_scored_events_per_s, bare_events_per_s, ratio and
peak_rss_mb per process. ``--smoke``: 3,000 readings (well under a minute; figures meaningless, for tests).
Run: .venv/bin/python load_tests/minimal.py [--events 100000] [--project examples/minimal/project.py]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import queue
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastavro
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from load_tests.common import add_project_option, child_setup, load_project, peak_rss_mb
from load_tests.pipeline import (
    START_MS,
    STEP_MS,
    WARM_UP,
    Load,
    StageProcesses,
    fit_step,
    load_for,
    produce,
    services_cpu,
    wait_count,
)
from models.online import SPECS, parse_pipeline
from sinks.redis_store import pack
from streams.codec import AvroCodec
from streams.kafka import consumer_config, ensure_topics, producer_config
from streams.settings import WeirSettings
from streams.stack import Endpoints, Stack

MINIMAL = "examples.minimal.project:project"
BARE_OUT = "bench.minimal.predictions"  # where the bare loop's predictions go (no stage reads it)
SEED = 0  # the online learner's, as PipelineConfig.seed (logistic regression by SGD is deterministic anyway)
WINDOW_MS = 60_000  # the view's sliding window (examples/minimal/project.py)
NO_PREVIOUS_S = 60.0  # secs_since_last without a previous reading in the window (the feature's default)
HOT_C = 90.0  # the request feature hot: temperature > 90
BATCH = 500  # messages per consume, as Weir's runners take them


# ---------------------------------------------------------------------------------------------- bare


class SensorWindow:
    """One sensor's readings over the last minute of event time, oldest first, and their temperatures' sum."""

    __slots__ = ("readings", "temperature_sum")

    def __init__(self) -> None:
        self.readings: deque[tuple[int, float, float]] = deque()
        self.temperature_sum = 0.0

    def add(self, ts: int, temperature: float, vibration: float) -> tuple[float, float, float, float]:
        """Add a reading (in event-time order); the window ``(ts - 60 s, ts]`` after it: count, mean
        temperature, max vibration, and seconds since the previous reading in it."""
        readings = self.readings
        while readings and readings[0][0] <= ts - WINDOW_MS:
            self.temperature_sum -= readings.popleft()[1]
        since = (ts - readings[-1][0]) / 1000 if readings else NO_PREVIOUS_S
        readings.append((ts, temperature, vibration))
        self.temperature_sum += temperature
        n = len(readings)
        return float(n), self.temperature_sum / n, max(r[2] for r in readings), since


def bare(ref: str, endpoints: Endpoints, warm: int, n: int, ready: Any, go: Any, out: Any) -> None:
    """In its own process: the bare loop over the topic's ``warm`` warm-up readings (untimed), then, once
    ``go`` is set, over the ``n`` drained ones (timed). Puts its figures on ``out``."""
    project = child_setup(ref, endpoints.schema_registry_url)
    load = load_for(project)
    model = project.model(load.model)
    view = model.views[0].view
    topic = load.scored_topic
    source, prediction = AvroCodec(topic), AvroCodec(model.online_topic)  # their schemas and registry ids
    reader, header = source.subject.parsed, b"\0" + source.schema_id.to_bytes(4, "big")  # magic byte, id
    writer, out_header = prediction.subject.parsed, b"\0" + prediction.schema_id.to_bytes(4, "big")
    spec = model.online_learner
    learner = SPECS[spec](SEED) if spec in SPECS else parse_pipeline(spec, SEED)
    model_name, version, threshold = model.online_name, f"{spec}-bare", model.threshold
    windows: dict[str, SensorWindow] = {}
    store = redis.Redis.from_url(endpoints.redis_url)
    ttl_ms = view.ttl_ms
    consumer = Consumer(consumer_config(endpoints.kafka_bootstrap, f"bench-bare-{time.time_ns()}",
                                        **{"enable.auto.offset.store": True}))
    ensure_topics(endpoints.kafka_bootstrap, [BARE_OUT], len(consumer.list_topics(topic, timeout=10)
                                                             .topics[topic].partitions))
    producer = Producer(producer_config(endpoints.kafka_bootstrap))
    consumer.subscribe([topic])

    def process(msgs: list[Any]) -> int:
        """The batch's readings, each to the end (one prediction produced); returns how many."""
        done = 0
        for m in msgs:
            if m.error() is not None:
                raise KafkaException(m.error())
            value = m.value()
            if value[:5] != header:
                raise ValueError(f"{topic} [{m.partition()}] @{m.offset()}: not the schema this loop reads")
            body = io.BytesIO(value)
            body.seek(5)
            r = cast(dict[str, Any], fastavro.schemaless_reader(body, reader, None))
            sensor, temperature = r["sensor_id"], r["temperature"]
            ts = int(r["ts"].timestamp() * 1000)
            window = windows.get(sensor)
            if window is None:
                window = windows[sensor] = SensorWindow()
            count, mean_t, max_v, since = window.add(ts, temperature, r["vibration"])
            now_ms = int(time.time() * 1000)
            pipe = store.pipeline(transaction=False)
            pipe.set(view.redis_key(sensor), pack(view, ts, now_ms, (count, mean_t, max_v, since)), px=ttl_ms)
            pipe.execute()
            x = {"readings_1m": count, "mean_temperature_1m": mean_t, "max_vibration_1m": max_v,
                 "secs_since_last": since, "temperature": temperature,
                 "hot": 1.0 if temperature > HOT_C else 0.0}
            score = learner.predict_proba_one(x).get(True, 0.0)
            if r["faulty"] is not None:
                learner.learn_one(x, r["faulty"])
            buf = io.BytesIO()
            buf.write(out_header)
            fastavro.schemaless_writer(buf, writer, {
                "event_id": r["reading_id"], "sensor_id": sensor, "score": score, "model_name": model_name,
                "model_version": version, "latency_ms": float(now_ms - m.timestamp()[1]), "event_ts": ts,
                "predicted_ts": now_ms, "decision": score >= threshold, "threshold": threshold})
            producer.produce(BARE_OUT, buf.getvalue(), sensor.encode())
            done += 1
        producer.poll(0)
        if msgs:
            consumer.commit(asynchronous=True)
        return done

    seen = 0
    while seen < warm:  # only the warm-up readings are on the topic yet
        seen += process(consumer.consume(BATCH, 0.1))
    assignment = consumer.assignment()
    consumer.pause(assignment)
    ready.set()
    while not go.wait(0.5):
        consumer.consume(1, 0)  # paused: nothing comes, but the group sees it alive
    start = {tp.partition: tp.offset for tp in consumer.position(assignment)}
    consumer.resume(assignment)
    cpu0 = time.process_time()
    msgs = consumer.consume(BATCH, 10)
    t0 = time.perf_counter()
    seen += process(msgs)
    while seen < warm + n:
        seen += process(consumer.consume(BATCH, 0.1))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    t1 = time.perf_counter()
    if producer.flush(60):
        raise RuntimeError("predictions not acknowledged")
    flush_s = time.perf_counter() - t1
    try:
        consumer.commit(asynchronous=False)  # what the last asynchronous commits may not have done yet
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:  # they had: nothing left to commit
            raise
    moved = sum(tp.offset - start[tp.partition] for tp in consumer.position(assignment))
    consumer.close()
    if seen != warm + n or moved != n:  # a message processed twice would leave another one unread
        raise RuntimeError(f"the bare loop processed {seen} of {warm + n} readings, its positions moved by "
                           f"{moved} of {n}")
    out.put({"events_per_s": n / elapsed, "seconds": elapsed, "flush_s": flush_s, "cpu_s": cpu,
             "rss_mb": peak_rss_mb()})


# ---------------------------------------------------------------------------------------------- run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="readings drained by each")
    add_project_option(ap, MINIMAL)
    ap.add_argument("--procs", type=int, choices=(2, 3), default=3,
                    help="Weir's stage processes: 2: ingest | features + inference + learn; 3: ingest | features + "
                         "inference | learn")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: well under a minute")
    args = ap.parse_args()
    args.warm_up = WARM_UP
    if args.smoke:
        args.events, args.warm_up = 3000, 300
    project = load_project(args.project)
    load = load_for(project)
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(WeirSettings(data_dir=Path(tmp)), project, with_postgres=False)
        t0 = time.perf_counter()
        endpoints = stack.start()
        print(f"stack up in {time.perf_counter() - t0:.1f}s", flush=True)
        try:
            run(endpoints, args, load, Path(tmp))
        finally:
            stack.stop()


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    """The broker's and Redis's CPU seconds since ``before``."""
    return {k: round(v - before.get(k, 0.0), 1) for k, v in services_cpu().items()}


def gather(results: Any, loop: Any, timeout: float) -> dict[str, float]:
    """The bare loop's figures, once it put them on ``results``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return cast(dict[str, float], results.get(timeout=0.5))
        except queue.Empty:
            if not loop.is_alive():
                raise RuntimeError(f"the bare loop ended (exit {loop.exitcode}) without its figures") from None
    raise TimeoutError(f"the bare loop gave no figures in {timeout:.0f}s")


def run(endpoints: Endpoints, args: argparse.Namespace, load: Load, tmp: Path) -> None:
    ctx = mp.get_context("spawn")
    ref, n = args.project, args.events
    groups = load.stages[args.procs]
    stages = StageProcesses.start(ctx, ref, endpoints, tmp, groups)
    procs, scored, learned, stop, pause = stages.procs, stages.scored, stages.learned, stages.stop, stages.pause
    ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    count = ctx.Value("q", 0)
    loop: Any = None
    try:
        # warm-up: the same readings for both, event times just before the drain's (as load_tests/pipeline.py)
        t0 = time.perf_counter()
        t_warm = START_MS - args.warm_up * STEP_MS - 60_000
        w = ctx.Process(target=produce, args=(ref, endpoints, args.warm_up, None, 3, 10**9, "warm-", t_warm,
                                              STEP_MS, count))
        w.start()
        w.join()
        warm = count.value
        loop = ctx.Process(target=bare, args=(ref, endpoints, warm, n, ready, go, results), daemon=True)
        loop.start()
        wait_count(scored, warm, 180, procs)
        wait_count(learned, warm, 120, procs, "learnt")
        deadline = time.monotonic() + 120
        while not ready.wait(0.2):
            if not loop.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the bare loop did not get through the warm-up")
        print(f"warm-up: {warm} {load.scored_name} through both (stages and the bare loop joined their groups) "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
        pause.set()
        time.sleep(0.5)
        step = fit_step(START_MS, n)
        p = ctx.Process(target=produce, args=(ref, endpoints, n, None, 1, 0, "", START_MS, step, count))
        t0 = time.perf_counter()
        p.start()
        p.join()
        print(f"pre-produced {n} {load.scored_name} in {time.perf_counter() - t0:.1f}s "
              f"(after {warm} warm-up ones, processed by both)", flush=True)
        before = services_cpu()
        pause.clear()
        drain_s = wait_count(scored, warm + n, 600, procs)
        learn_s = drain_s + wait_count(learned, warm + n, 600, procs, "learnt")
        weir_cpu = cpu_since(before)
        stop.set()
        for w in procs:
            w.join(60)
        before = services_cpu()
        go.set()
        b = gather(results, loop, 600)
        bare_cpu = cpu_since(before)
        loop.join(30)
    finally:
        stop.set()
        go.set()
        if loop is not None and loop.is_alive():
            loop.terminate()
    weir_rate, bare_rate = n / learn_s, b["events_per_s"]
    ratio = weir_rate / bare_rate
    peak = {f"weir_{name}": v for name, v in stages.peak_rss().items()} | {"bare": round(b["rss_mb"], 1)}
    flow = " | ".join("+".join(g) for g in groups)
    print(f"weir: {n} {load.scored_name} through {flow}: scored in {drain_s:.1f}s "
          f"({n / drain_s:,.0f} events/s), learnt in {learn_s:.1f}s = {weir_rate:,.0f} events/s; "
          f"broker/redis CPU {weir_cpu}; stage processes {stages.cpu.value:.1f} CPU s (warm-up included)")
    print(f"bare: {n} {load.scored_name}, one process, first to last processed in {b['seconds']:.1f}s = "
          f"{bare_rate:,.0f} events/s ({b['cpu_s']:.1f} CPU s; final flush {b['flush_s'] * 1000:.0f} ms "
          f"after); broker/redis CPU {bare_cpu}")
    print(f"ratio weir / bare: {ratio:.2f} (target >= 2.0)")
    print("peak RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in peak.items()))
    print(json.dumps({"project": load.project, "events": n, "weir_events_per_s": round(weir_rate),
                      "weir_scored_events_per_s": round(n / drain_s), "bare_events_per_s": round(bare_rate),
                      "ratio": round(ratio, 3), "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
