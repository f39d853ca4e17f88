"""Inference alone: the inference stage against bare ONNX Runtime on the very same feature batches.

Set-up: the embedded stack; the ``user`` view written to Redis for all 20,000
customers (so every read hits); N payments (``--events``) produced once to
``weir.<project>.scoring.payments`` as the features stage emits them: Avro micro-batches of 64
payments per message (one per partition per up-to-500 ingested events), partitioned
by card, each payment carrying its ``card`` view in ``served``. The stage scores the
project's ``fraud`` model (``--project``, default the fraud shop: any project declaring
its ``payments`` source, ``card`` and ``user`` views and ``fraud`` model). Models
(``--model``), both random-but-seeded :class:`~models.train.ScoreMLP` s
exported with :func:`~models.export.export_onnx` and served by
``OnnxScorer(path, "bench-v1")`` (CUDA when present, else one CPU thread) in a
``ModelSlot``:

* ``fraud``: the production shape (the retrain stage's hidden layers, 32×16)
  over the 13 features.
* ``wide``: the same graph contract with hidden layers 2048×2048×2048
  (``--wide-hidden``; 8.4 M weights, 34 MB): a compute-bound model. Bare ONNX
  Runtime on one CPU thread of the 2-core AVX-512 development machine does
  ~13,000 rows/s at batch 256-512 and ~8,000 at batch 32 (the weights no longer
  stay in cache); 1024×1024×1024 did ~53,000, too cheap to stand for a model
  that dominates the stage.

1. **throughput grid**: for each ``--batch-sizes`` B (the stage's
   ``max_batch``: payments per ONNX run) × ``--max-waits`` W (the runner's
   ``max_wait_ms``), ``--reps`` times, alternately:

   * **weir**: a :class:`BatchRunner` running ``InferenceStage(project, fraud,
     OnlineStore(url), ModelSlot(scorer), max_batch=B)`` as the pipeline builds it (its fetch wait
     and DLQ guard, 8 messages per consume call; the stage counts payments per
     message, so the runner gathers until it holds the stage's ``max_units``
     payments or W passed) drains every message in a fresh consumer group:
     decode, one MGET per inference batch, the model, prediction,
     ``weir.scored`` and audit records produced, commit after flush.
     The clock starts when the group has assigned the partitions (each rep's
     groups join together beforehand, held paused: a join takes the embedded
     broker ~5 s) and stops when every message is consumed and the last flush
     and commit returned. events/s = payments scored / wall time. The scorer is
     wrapped to keep every matrix the stage ran and to time its ``predict``
     ("in stage": rows/s of the model inside the stage, thread hop included).
   * **ceiling**: exactly those matrices, in order, through a bare
     ``onnxruntime.InferenceSession`` of the same file with the scorer's
     options (same providers, one intra-op thread on CPU), looped for at least
     ``CEILING_MIN_S``: rows/s. ratio = weir / ceiling of the same rep.

   Latency in the grid is the **service time per gathered batch**: how long the
   stage's ``handle`` took per batch of messages the runner gathered (decode,
   Redis reads, the model runs, encoding the outputs; not the runner's produce,
   flush or commit), p50/p99.
   Source→prediction latency means nothing while a backlog drains.

2. **latency at half the rate**: at each model's best setting (highest median
   ratio, to 0.01; ties → events/s), on a fresh stack (the in-memory broker
   slows down as the grid's predictions pile up in it), the stage runs on its
   runner while another process produces 64-payment messages open-loop at
   0.5 × that setting's median events/s for ``--latency-seconds``, each payment
   stamped (event time and ``source_ms``) with its message's send time. A
   third process subscribes to ``predictions.fraud`` and takes arrival − event
   time per prediction (publish and fetch included: the honest figure); the
   records' own ``latency_ms`` (stamped at scoring) is reported too.

Prints per-rep figures, a table per model and the half-rate latencies; the last
line is one JSON object with ``peak_rss_mb`` (this process's: it ran every inference stage),
``events_per_s``, ``ceiling_events_per_s`` and
``ratio`` (medians at the best setting of the reported model: ``wide`` unless
``--model fraud``), ``p50_ms``/``p99_ms`` (subscriber, half rate),
``stage_p50_ms``/``stage_p99_ms`` (at scoring), ``rate_per_s`` (half rate
achieved), ``best_batch``, ``best_wait_ms``, ``model``, ``provider``, and the setting with the
highest events/s with its ratio (``fastest_events_per_s``, ``fastest_ratio``, ``fastest_batch``,
``fastest_wait_ms``: the best setting by ratio favours small batches, where bare ONNX Runtime is least
efficient); with
``--model both`` (the default) the same for the fraud model, prefixed ``fraud_``.

Why the production model cannot reach the ratio target on CPU: bare ONNX Runtime
runs the 32×16 MLP at 5-20 million rows/s (0.05-0.2 µs a row), while the stage
spends ~30-60 µs per payment around it (Avro decode, the Redis read and feature
rows, one Avro record per prediction, the ``weir.scored`` and audit records, the
hop to the model's thread), so its ratio stays below 0.005 at every setting. The
ratio measures the stage's overhead against model time; only a model whose
compute dominates, as ``wide`` does, can show what the stage costs around it.

``--quick`` is a ~1 minute run of both models on a small grid; ``--smoke`` a shorter one still (the fraud
model unless ``--model`` says otherwise, a few hundred payments, one cell, 2 s of latency; the wide model's
layers 256×256×256: figures meaningless, for tests).
Run: .venv/bin/python load_tests/inference.py [--model both] [--events 16000] [--reps 3] [--quick] [--project REF]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import multiprocessing as mp
import pstats
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from load_tests.common import add_project_option, child_setup, load_project, peak_rss_mb, require_shop
from models.export import INPUT_NAME, OUTPUT_NAME, export_onnx
from models.scorer import OnnxScorer, select_providers
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import Message, StepResult
from streams.codec import AvroCodec
from streams.dlq import DlqGuard
from streams.features.definitions import FeatureView, view_key
from streams.kafka import consumer_config, producer_config
from streams.pipeline import PipelineConfig
from streams.project.contracts import scoring_topic
from streams.project.spec import Model, Project
from streams.runtime import BatchRunner
from streams.settings import WeirSettings
from streams.stack import Endpoints, Stack
from streams.stages.inference import InferenceStage, ModelSlot

PAYMENTS_PER_MESSAGE = 64  # the features stage emits one weir.scoring message per partition per up-to-500 events
CUSTOMERS, CARDS, MERCHANTS = 20_000, 30_000, 80
START_MS = int(time.time() * 1000) - 3600 * 1000  # backlog event times start an hour ago (views live 2 h)
WIDE_HIDDEN = (2048, 2048, 2048)
CEILING_MIN_S = 0.5
CONSUME_MESSAGES = 8  # the runner's max_batch, as Pipeline._start_inference sets it: messages per consume call
SEED = 7
# (mean, std) per feature for the models' standardization, roughly the load's scale (unlisted: (0, 1));
# the weights are random, so only the graph's shape and cost matter
SCALE = {"card_count_1m": (2, 1), "card_amount_1m": (100, 150), "card_count_1h": (10, 6),
         "card_amount_1h": (300, 500), "card_distinct_merchants_1h": (5, 3), "user_clicks_30m": (20, 12),
         "user_searches_30m": (4, 2.5), "user_add_to_cart_30m": (2, 1.2), "user_new_device_logins_1h": (0.5, 0.5),
         "user_secs_since_login": (1800, 1000), "amount": (50, 80), "log_amount": (3.5, 1),
         "is_digital_goods": (0.5, 0.5)}
SCRIPT = "load_tests/inference.py"


@dataclass(frozen=True)
class Shop:
    """What this load test uses of the project: the fraud shop's model, its views and its topics."""

    project: Project
    model: Model
    card: FeatureView
    user: FeatureView
    scoring: str  # the topic the model's events are scored from (weir.<project>.scoring.payments)
    predictions: str  # the model's prediction topic (predictions.fraud)


SHOP: Shop  # set by setup(), in the main process and in every spawned one


def setup(ref: str, registry: str | None = None) -> Shop:
    """Load the project ``ref`` names (in a spawned process: then take schema ids from ``registry``)."""
    global SHOP
    project = load_project(ref) if registry is None else child_setup(ref, registry)
    require_shop(SCRIPT, project, sources=("payments",), views=("card", "user"), models=("fraud",))
    model = next(m for m in project.models if m.name == "fraud")
    views = {v.name: v for v in project.views}
    SHOP = Shop(project, model, views["card"], views["user"], scoring_topic(project, project.source(model.source)),
                model.prediction_topic)
    return SHOP


# ---------------------------------------------------------------------------------------------- load


def card_buckets(partitions: int) -> list[list[str]]:
    """The card ids of each partition (a message carries the payments of one partition)."""
    buckets: list[list[str]] = [[] for _ in range(partitions)]
    for c in range(CARDS):
        buckets[T.partition_for(f"c{c}", partitions)].append(f"c{c}")
    return buckets


def payment(rng: random.Random, event_id: str, card: str, ts_ms: int) -> dict[str, Any]:
    """One scoring event of the payments source, its card view attached (``served``) as the features stage does."""
    amount = round(rng.lognormvariate(3.5, 1.0), 2)
    n_1m, n_1h = rng.randrange(1, 4), rng.randrange(1, 20)
    card_values = [float(n_1m), amount * n_1m, float(n_1h), amount * n_1h, float(rng.randrange(1, n_1h + 1))]
    return {"event_id": event_id, "ts_ms": ts_ms, "source_ms": ts_ms, "payment_id": event_id, "card_id": card,
            "customer_id": f"u{rng.randrange(CUSTOMERS)}", "merchant_id": f"m{rng.randrange(MERCHANTS)}",
            "merchant_category": rng.choice(["retail", "digital_goods"]), "amount": amount, "device_id": None,
            "served": {view_key(SHOP.card): card_values}}


def message_items(rng: random.Random, buckets: list[list[str]], k: int, prefix: str, ts_ms: int) -> list[dict[str, Any]]:
    """The payments of message ``k`` (partition ``k % partitions``)."""
    cards = buckets[k % len(buckets)]
    first = k * PAYMENTS_PER_MESSAGE
    return [payment(rng, f"{prefix}{first + i}", rng.choice(cards), ts_ms + i) for i in range(PAYMENTS_PER_MESSAGE)]


def backlog(n_msgs: int, partitions: int) -> list[tuple[int, bytes]]:
    """The grid's load: (partition, Avro micro-batch of 64 payments)."""
    rng, codec, buckets = random.Random(1), AvroCodec(SHOP.scoring), card_buckets(partitions)
    return [(k % partitions, codec.encode({"items": message_items(rng, buckets, k, "p", START_MS + k * 200)}))
            for k in range(n_msgs)]


def produce(bootstrap: str, msgs: list[tuple[int, bytes]]) -> None:
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 20}))
    for i, (partition, value) in enumerate(msgs):
        producer.produce(SHOP.scoring, value, None, partition=partition)
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("load not acknowledged")


def seed_users(store: OnlineStore) -> None:
    """The user view of every customer, as of just before the backlog, so each read finds its value."""
    rng = random.Random(2)
    ids = [f"u{u}" for u in range(CUSTOMERS)]
    for i in range(0, CUSTOMERS, 1000):
        store.write(SHOP.user, ((u, START_MS - 60_000, [float(rng.randrange(40)), float(rng.randrange(8)),
                                                    float(rng.randrange(4)), float(rng.randrange(2)),
                                                    float(rng.randrange(3600))]) for u in ids[i:i + 1000]))


# ---------------------------------------------------------------------------------------------- models


def build_model(kind: str, directory: Path, wide: tuple[int, ...]) -> Path:
    """A seeded ScoreMLP of the kind's shape (``fraud``: the model's trainer's hidden layers; ``wide``: its
    hidden layers), exported as the stage serves it."""
    import torch  # here: the spawned load processes need no torch

    from models.train import ScoreMLP

    torch.manual_seed(SEED)
    names = SHOP.model.feature_names
    n = len(names)
    hidden = tuple(SHOP.model.trainer.hyperparameters()["hidden"]) if kind == "fraud" else wide
    mean, std = (torch.tensor([SCALE.get(f, (0, 1))[i] for f in names], dtype=torch.float32) for i in (0, 1))
    path = directory / f"{kind}.onnx"
    export_onnx(ScoreMLP(n, hidden, mean, std, task=SHOP.model.task).eval(), n, path)
    return path


def bare_session(path: Path, providers: list[str]) -> ort.InferenceSession:
    """A plain session with OnnxScorer's options: the ceiling's."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class Recording:
    """The served scorer, keeping a copy of every matrix the stage gave it (the ceiling replays them)
    and the wall time of its ``predict`` calls (the model's time inside the stage)."""

    def __init__(self, inner: OnnxScorer) -> None:
        self.inner = inner
        self.version = inner.version
        self.batches: list[npt.NDArray[np.float32]] = []
        self.predict_s = 0.0

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        self.batches.append(np.array(X, dtype=np.float32, copy=True))
        t0 = time.perf_counter()
        scores = self.inner.predict(X)
        self.predict_s += time.perf_counter() - t0
        return scores

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def ceiling(session: ort.InferenceSession, batches: list[npt.NDArray[np.float32]]) -> float:
    """Rows/s of bare ``session.run`` over ``batches`` in order, looped for at least CEILING_MIN_S."""
    session.run([OUTPUT_NAME], {INPUT_NAME: batches[0]})
    rows, t0 = 0, time.perf_counter()
    while True:
        for x in batches:
            session.run([OUTPUT_NAME], {INPUT_NAME: x})
            rows += len(x)
        elapsed = time.perf_counter() - t0
        if elapsed >= CEILING_MIN_S:
            return rows / elapsed


# ---------------------------------------------------------------------------------------------- the stage


class Timed:
    """The stage as its runner sees it, each ``handle`` timed; every other hook (``streams.base.Stage``) is the
    stage's own, through ``__getattr__`` (so this wrapper must not subclass ``Stage``, whose defaults would hide
    them)."""

    def __init__(self, stage: InferenceStage) -> None:
        self.stage = stage
        self.step_id = stage.step_id
        self.topics = stage.topics
        self.service_s: list[float] = []

    def handle(self, batch: list[Message]) -> StepResult:
        t0 = time.perf_counter()
        result = self.stage.handle(batch)
        self.service_s.append(time.perf_counter() - t0)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)


class ProfiledRunner(BatchRunner):
    """A runner whose batches run under cProfile (cProfile sees only the runner's thread)."""

    profile = cProfile.Profile()

    def run_once(self) -> int:
        self.profile.enable()
        try:
            return super().run_once()
        finally:
            self.profile.disable()


def make_runner(stage: Timed, endpoints: Endpoints, wait_ms: int, label: str, profile: bool = False) -> BatchRunner:
    """A runner as Pipeline._start_inference makes one, with the max wait of the setting and its own group."""
    c = PipelineConfig(data_dir=Path("."))
    cls = ProfiledRunner if profile else BatchRunner
    return cls(stage, endpoints.kafka_bootstrap, group_id=f"bench-inference-{label}-{time.time_ns()}",
               max_batch=CONSUME_MESSAGES, max_wait_ms=wait_ms, fetch_wait_ms=c.fetch_wait_ms,
               dlq_guard=DlqGuard(c.dlq_max_ratio, c.dlq_window, c.dlq_min_events))


@dataclass
class Joined:
    """A fresh stage on its runner in a fresh consumer group, held paused (joining takes Tansu ~5 s)."""

    runner: BatchRunner
    stage: Timed
    recorder: Recording


def join(endpoints: Endpoints, scorer: OnnxScorer, batch: int, wait_ms: int, label: str,
         profile: bool = False) -> Joined:
    recorder = Recording(scorer)
    # as the pipeline builds it; the arguments left out default to its config's timeouts, threshold, audit and no
    # cache (not to its online fallback or short Redis timeout, which only act when the model or Redis fails)
    stage = Timed(InferenceStage(SHOP.project, SHOP.model, OnlineStore(endpoints.redis_url), ModelSlot(recorder),
                                 max_batch=batch))
    runner = make_runner(stage, endpoints, wait_ms, label, profile)
    runner.paused.set()
    runner.start()
    return Joined(runner, stage, recorder)


@dataclass
class Drain:
    events_per_s: float
    elapsed: float
    service_ms: list[float]
    batches: list[npt.NDArray[np.float32]]
    model_rows_per_s: float  # rows / time in the scorer's predict, inside the stage


def drain(joined: Joined, n_msgs: int) -> Drain:
    """Release a joined runner on the backlog; time it until every message is consumed and committed."""
    runner = joined.runner
    if not runner.ready.wait(60):
        raise TimeoutError("the inference stage never got its partitions")
    t0 = time.perf_counter()
    runner.paused.clear()
    while runner.stats.consumed < n_msgs:
        if runner.error is not None:
            raise RuntimeError("the inference stage failed") from runner.error
        time.sleep(0.002)
    runner.stop()
    elapsed = time.perf_counter() - t0  # includes the final flush and commit
    joined.stage.stage.close()  # its model thread
    if runner.error is not None:
        raise RuntimeError("the inference stage failed") from runner.error
    rows = sum(len(x) for x in joined.recorder.batches)
    payments = n_msgs * PAYMENTS_PER_MESSAGE
    if runner.stats.dead_lettered or runner.stats.consumed != n_msgs or rows != payments:
        raise RuntimeError(f"consumed {runner.stats.consumed} of {n_msgs} messages, scored {rows} of {payments} "
                           f"payments, dead-lettered {runner.stats.dead_lettered}")
    by_model = getattr(joined.stage.stage, "counts", {}).get("model", payments)  # the rest: fallbacks
    if by_model != payments:
        raise RuntimeError(f"the model served {by_model} of {payments} payments (fallbacks, timeouts?)")
    return Drain(payments / elapsed, elapsed, [s * 1000 for s in joined.stage.service_s], joined.recorder.batches,
                 rows / joined.recorder.predict_s)


# ---------------------------------------------------------------------------------------------- grid


@dataclass
class Cell:
    batch: int
    wait_ms: int
    weir: list[float]
    ceiling: list[float]
    ratio: list[float]
    in_stage: list[float]
    p50: list[float]
    p99: list[float]

    def median(self, name: str) -> float:
        return float(statistics.median(getattr(self, name)))


def rep_of(endpoints: Endpoints, scorer: OnnxScorer, session: ort.InferenceSession, cells: list[Cell],
           n_msgs: int, rep: int, model: str) -> None:
    """One rep of the grid: weir then the ceiling, cell by cell."""
    # every cell's group joins at once (the joins wait on the broker, not the CPU); each drains in turn
    joined = [join(endpoints, scorer, c.batch, c.wait_ms, f"{model}-{c.batch}-{c.wait_ms}-{rep}") for c in cells]
    for cell, j in zip(cells, joined, strict=True):
        d = drain(j, n_msgs)
        top = ceiling(session, d.batches)
        p50, p99 = np.percentile(d.service_ms, [50, 99])
        for name, value in (("weir", d.events_per_s), ("ceiling", top), ("ratio", d.events_per_s / top),
                            ("in_stage", d.model_rows_per_s), ("p50", float(p50)), ("p99", float(p99))):
            getattr(cell, name).append(value)
        print(f"  rep {rep + 1} {model} batch {cell.batch:>3} wait {cell.wait_ms:>2} ms: weir "
              f"{d.events_per_s:>7,.0f}/s ({d.elapsed:.2f} s), ceiling {top:>10,.0f}/s, ratio "
              f"{d.events_per_s / top:.3f}; model in the stage {d.model_rows_per_s:>10,.0f} rows/s; "
              f"service p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)


def grid(endpoints: Endpoints, scorer: OnnxScorer, session: ort.InferenceSession, sizes: list[int],
         waits: list[int], n_msgs: int, reps: int, model: str) -> list[Cell]:
    cells = [Cell(b, w, [], [], [], [], [], []) for b in sizes for w in waits]
    for rep in range(reps):
        rep_of(endpoints, scorer, session, cells, n_msgs, rep, model)
        gc.collect()  # a stopped runner is a reference cycle (its consumer holds its callbacks): free its clients
    return cells


def best_cell(cells: list[Cell]) -> Cell:
    return max(cells, key=lambda c: (round(c.median("ratio"), 2), c.median("weir")))


def print_table(model: str, cells: list[Cell], reps: int) -> None:
    print(f"{model}: medians of {reps} rep(s). in stage: rows/s of the scorer's predict inside the stage; "
          f"service: the stage's handle per gathered batch (messages of {PAYMENTS_PER_MESSAGE} payments)")
    print(f"  {'batch':>5} {'wait ms':>7} {'events/s':>9} {'ceiling/s':>11} {'ratio':>6} {'in stage':>11} "
          f"{'service p50':>11} {'p99 ms':>7}")
    for c in cells:
        print(f"  {c.batch:>5} {c.wait_ms:>7} {c.median('weir'):>9,.0f} {c.median('ceiling'):>11,.0f} "
              f"{c.median('ratio'):>6.3f} {c.median('in_stage'):>11,.0f} {c.median('p50'):>11.2f} "
              f"{c.median('p99'):>7.2f}", flush=True)


def profile_cell(endpoints: Endpoints, scorer: OnnxScorer, cell: Cell, n_msgs: int, model: str) -> None:
    ProfiledRunner.profile = cProfile.Profile()
    drain(join(endpoints, scorer, cell.batch, cell.wait_ms, f"{model}-profile", profile=True), n_msgs)
    out = io.StringIO()
    pstats.Stats(ProfiledRunner.profile, stream=out).sort_stats("tottime").print_stats(20)
    print(f"profile, {model}, batch {cell.batch}, wait {cell.wait_ms} ms (the runner's thread):\n{out.getvalue()}",
          flush=True)


# ---------------------------------------------------------------------------------------------- half-rate latency


def paced(ref: str, bootstrap: str, registry: str, prefix: str, rate: float, n_msgs: int, partitions: int,
          out: Any) -> None:
    """In its own process: ``n_msgs`` messages open-loop at ``rate`` payments/s, each payment stamped
    (event time and ``source_ms``) with its message's send time. Puts the achieved payments/s."""
    setup(ref, registry)
    rng, codec, buckets = random.Random(3), AvroCodec(SHOP.scoring), card_buckets(partitions)
    msgs = [message_items(rng, buckets, k, prefix, 0) for k in range(n_msgs)]  # generated before the clock
    producer = Producer(producer_config(bootstrap))  # the features stage's producer settings
    # one message first, unmeasured: connections, metadata and producer ids (ours and the stage's) are set up
    warm = message_items(rng, buckets, 0, "warm-", int(time.time() * 1000))
    producer.produce(SHOP.scoring, codec.encode({"items": warm}), None, partition=0)
    producer.flush(30)
    time.sleep(1.0)
    interval = PAYMENTS_PER_MESSAGE / rate
    t0 = time.perf_counter()
    for k, items in enumerate(msgs):
        ahead = k * interval - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(ahead)
        now_ms = int(time.time() * 1000)
        for p in items:
            p["ts_ms"] = p["source_ms"] = now_ms
        producer.produce(SHOP.scoring, codec.encode({"items": items}), None, partition=k % partitions)
        producer.poll(0)
    sent_s = time.perf_counter() - t0
    producer.flush(60)
    out.put((n_msgs - 1) * PAYMENTS_PER_MESSAGE / max(sent_s, 1e-9))


def subscribe(ref: str, bootstrap: str, registry: str, prefix: str, expected: int, timeout_s: float, ready: Any,
              out: Any) -> None:
    """In its own process, a subscriber of predictions.fraud: per prediction of this phase, arrival − event
    time and the record's own latency_ms. Puts both lists."""
    setup(ref, registry)
    topic = SHOP.predictions
    codec = AvroCodec(topic)
    consumer = Consumer(consumer_config(bootstrap, f"bench-subscriber-{time.time_ns()}"))
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    consumer.consume(1, 0.5)  # connected and fetching
    ready.set()
    e2e: list[float] = []
    at_scoring: list[float] = []
    deadline = time.time() + timeout_s
    while len(e2e) < expected and time.time() < deadline:
        msgs = consumer.consume(10_000, 0.002)  # returns when it has 10,000 or the timeout passed,
        now_ms = time.time() * 1000  # so an arrival is late by at most ~2 ms
        for m in msgs:
            if m.error() is not None:
                continue
            rec = codec.decode(m.value())
            if rec["event_id"].startswith(prefix):
                e2e.append(now_ms - rec["event_ts"].timestamp() * 1000)  # timestamp-millis: a datetime
                at_scoring.append(rec["latency_ms"])
    consumer.close()
    out.put((e2e, at_scoring))


def latency(ref: str, endpoints: Endpoints, scorer: OnnxScorer, cell: Cell, rate: float, seconds: float,
            partitions: int, model: str) -> dict[str, float]:
    """Source → subscriber latency at ``rate`` payments/s, the stage on its runner at ``cell``'s setting."""
    stage = Timed(InferenceStage(SHOP.project, SHOP.model, OnlineStore(endpoints.redis_url), ModelSlot(scorer),
                                 max_batch=cell.batch))
    runner = make_runner(stage, endpoints, cell.wait_ms, f"{model}-latency")
    runner.start()
    n_msgs = max(2, round(rate * seconds / PAYMENTS_PER_MESSAGE))
    prefix = f"lat-{model}-"
    ctx = mp.get_context("spawn")
    results, sent, ready = ctx.Queue(), ctx.Queue(), ctx.Event()
    args = (ref, endpoints.kafka_bootstrap, endpoints.schema_registry_url, prefix)
    sub = ctx.Process(target=subscribe, args=(*args, n_msgs * PAYMENTS_PER_MESSAGE, seconds + 60, ready, results),
                      daemon=True)
    sub.start()
    if not runner.ready.wait(60) or not ready.wait(120):
        raise TimeoutError("the inference stage or the subscriber did not start")
    prod = ctx.Process(target=paced, args=(*args, rate, n_msgs, partitions, sent), daemon=True)
    prod.start()
    achieved = sent.get(timeout=seconds + 120)
    e2e, at_scoring = results.get(timeout=120)
    prod.join(10)
    sub.join(10)
    runner.stop()
    stage.stage.close()
    if runner.error is not None:
        raise RuntimeError("the inference stage failed") from runner.error
    if len(e2e) < n_msgs * PAYMENTS_PER_MESSAGE:
        raise RuntimeError(f"the subscriber saw {len(e2e)} of {n_msgs * PAYMENTS_PER_MESSAGE} predictions")
    (p50, p99), (s50, s99) = np.percentile(e2e, [50, 99]), np.percentile(at_scoring, [50, 99])
    print(f"{model} latency at half the best rate: target {rate:,.0f}/s, achieved {achieved:,.0f} payments/s for "
          f"{seconds:.0f} s ({len(e2e):,} predictions), batch {cell.batch}, wait {cell.wait_ms} ms: source → "
          f"subscriber p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 ≤ 50 ms); at scoring (the record's "
          f"latency_ms) p50 {s50:.1f} ms, p99 {s99:.1f} ms; handle p50 {np.percentile(stage.service_s, 50) * 1000:.1f}"
          f" ms over {len(stage.service_s):,} consumes", flush=True)
    return {"p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1), "stage_p50_ms": round(float(s50), 1),
            "stage_p99_ms": round(float(s99), 1), "rate_per_s": round(achieved)}


# ---------------------------------------------------------------------------------------------- main


def measure(endpoints: Endpoints, model: str, tmp: Path, args: argparse.Namespace, n_msgs: int
            ) -> tuple[OnnxScorer, Cell, Cell]:
    """The grid of one model (and its profile); returns the warm scorer, the best setting (by ratio) and the
    fastest (by events/s)."""
    path = build_model(model, tmp, tuple(args.wide_hidden))
    scorer = OnnxScorer(path, "bench-v1")
    scorer.warmup()
    session = bare_session(path, select_providers())  # what OnnxScorer asks for
    shape = args.wide_hidden if model == "wide" else "as in production"
    print(f"{model}: hidden {shape}, provider {scorer.provider}, {path.stat().st_size / 1e6:.1f} MB", flush=True)
    cells = grid(endpoints, scorer, session, args.batch_sizes, args.max_waits, n_msgs, args.reps, model)
    print_table(model, cells, args.reps)
    best = best_cell(cells)
    fastest = max(cells, key=lambda c: c.median("weir"))
    print(f"  best (ratio): batch {best.batch}, wait {best.wait_ms} ms; highest events/s: batch {fastest.batch}, "
          f"wait {fastest.wait_ms} ms ({fastest.median('weir'):,.0f}/s, ratio {fastest.median('ratio'):.3f})",
          flush=True)
    if args.profile:
        profile_cell(endpoints, scorer, best, n_msgs, model)
    return scorer, best, fastest


def summary(model: str, best: Cell, fastest: Cell, scorer: OnnxScorer, lat: dict[str, float]) -> dict[str, Any]:
    return {"events_per_s": round(best.median("weir")), "ceiling_events_per_s": round(best.median("ceiling")),
            "ratio": round(best.median("ratio"), 3), "best_batch": best.batch, "best_wait_ms": best.wait_ms,
            "fastest_events_per_s": round(fastest.median("weir")), "fastest_ratio": round(fastest.median("ratio"), 3),
            "fastest_batch": fastest.batch, "fastest_wait_ms": fastest.wait_ms,
            "model": model, "provider": scorer.provider} | lat


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("wide", "fraud", "both"), default=None,
                    help="the bench model(s) (default both; with --smoke, fraud)")
    ap.add_argument("--events", type=int, default=16_000, help="payments pre-produced (in messages of 64)")
    ap.add_argument("--batch-sizes", type=ints, default=[32, 128, 512], help="the stage's max_batch (payments)")
    ap.add_argument("--max-waits", type=ints, default=[1, 5, 20], help="the runner's max_wait_ms")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--latency-seconds", type=float, default=15.0)
    ap.add_argument("--wide-hidden", type=ints, default=list(WIDE_HIDDEN), help="the wide model's hidden layers")
    ap.add_argument("--profile", action="store_true", help="one more cProfile'd drain of each best setting")
    ap.add_argument("--quick", action="store_true", help="a ~1 minute run (small load, 2×1 grid, 1 rep)")
    ap.add_argument("--smoke", action="store_true",
                    help="a run of well under a minute: the fraud model (unless --model), tiny load, one cell, "
                         "1 rep (wide layers 256×256×256)")
    add_project_option(ap)
    args = ap.parse_args()
    if args.quick:
        args.events, args.batch_sizes, args.max_waits = 3200, [32, 512], [5]
        args.reps, args.latency_seconds = 1, 4.0
    if args.smoke:
        args.events, args.batch_sizes, args.max_waits = 640, [64], [5]
        args.reps, args.latency_seconds, args.wide_hidden = 1, 2.0, [256, 256, 256]
    args.model = args.model or ("fraud" if args.smoke else "both")
    return args


def main() -> None:
    args = parse_args()
    setup(args.project)
    models = ["wide", "fraud"] if args.model == "both" else [args.model]
    n_msgs = max(1, args.events // PAYMENTS_PER_MESSAGE)
    t_start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = WeirSettings(data_dir=Path(tmp) / "grid")
        with Stack(settings, SHOP.project, with_postgres=False) as endpoints:
            seed_users(OnlineStore(endpoints.redis_url))
            produce(endpoints.kafka_bootstrap, backlog(n_msgs, settings.partitions))
            print(f"inference alone: {n_msgs * PAYMENTS_PER_MESSAGE:,} payments in {n_msgs:,} messages of "
                  f"{PAYMENTS_PER_MESSAGE}, {CUSTOMERS:,} customers' user view in Redis; grid batch "
                  f"{args.batch_sizes} × wait {args.max_waits} ms, {args.reps} rep(s)", flush=True)
            gc.collect()
            gc.freeze()  # as Pipeline.start does: what is loaded so far stays out of the collector's full scans
            measured = {m: measure(endpoints, m, Path(tmp), args, n_msgs) for m in models}
            gc.collect()
        for model, (scorer, best, fastest) in measured.items():
            # a fresh stack: the in-memory broker slows down as the grid's predictions pile up in it (measured:
            # with 1.3 M records in predictions.fraud, the wide model's p99 at 3,000/s went from 32 to 333 ms)
            settings = WeirSettings(data_dir=Path(tmp) / f"latency-{model}")
            with Stack(settings, SHOP.project, with_postgres=False) as endpoints:
                seed_users(OnlineStore(endpoints.redis_url))
                lat = latency(args.project, endpoints, scorer, best, best.median("weir") / 2, args.latency_seconds,
                              settings.partitions, model)
                gc.collect()  # the runner's Kafka clients go before the broker does
            results[model] = summary(model, best, fastest, scorer, lat)
    for r in results.values():
        print(f"{r['model']}: best batch {r['best_batch']}, wait {r['best_wait_ms']} ms: {r['events_per_s']:,} "
              f"events/s vs bare ONNX Runtime {r['ceiling_events_per_s']:,} = ratio {r['ratio']} (target ≥ 0.7); "
              f"p99 {r['p99_ms']} ms at {r['rate_per_s']:,}/s (target ≤ 50 ms)")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    head = results["wide"] if "wide" in results else results[models[0]]
    extra = {f"fraud_{k}": v for k, v in results["fraud"].items() if k != "model"} if len(results) > 1 else {}
    rss = round(peak_rss_mb(), 1)  # this process ran every inference stage of the run (and the bare ONNX runs)
    print(f"peak RSS of this process (the inference stages and the bare ONNX Runtime runs): {rss:,} MiB")
    print(json.dumps(head | extra | {"peak_rss_mb": rss}))


if __name__ == "__main__":
    main()
