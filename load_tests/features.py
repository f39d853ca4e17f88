"""Features alone: the features stage's throughput, and the online store's read latency under writes.

1. **throughput**: N events are produced first as ingest emits them (Avro
   micro-batches on ``weir.<project>.silver.clicks``, partitioned by user, and
   ``weir.<project>.silver.payments``, by card: one message per partition per 500 ingested
   events; ~85% clicks). Then, alternately, ``--reps`` times each:

   * **weir**: a :class:`BatchRunner` running :class:`FeaturesStage` exactly as
     the pipeline builds it (``max_batch=16`` messages, the hot-path waits, a
     DLQ guard) drains both topics: decode, windows, one Redis write per view
     per batch, feature-log and scoring records produced, commit after flush.
     The clock starts when the group has assigned the partitions and stops
     when every message is consumed and the last flush and commit returned.
     Events/s counts events, not messages. The store's writes are timed
     (packing included) to give Redis's share of the wall time, and
     ``gc.callbacks`` time the cyclic garbage collector. (The runner is held
     paused until the group assigned its partitions; the batches run as in the pipeline.)
   * **no redis**: the same, with a store that drops the writes: the stage's
     ceiling if Redis writes cost nothing.

2. **read latency**: a 30-feature view, 10,000 entities written first. While
   another process writes random entities of that view at ``--write-rate``
   entity writes/s (batches of 100, paced), the main process reads batches of
   1, 32 and 256 random entities with :meth:`OnlineStore.read` (keys, MGET,
   unpack) and, interleaved in random order in the same loop, with a bare
   redis-py ``MGET`` of the same keys returning bytes (keys prebuilt, no
   unpacking): the transport's floor. ``perf_counter_ns`` around each call.

3. **state per entity**: per view, the state the stage keeps for the throughput's events (a
   ``FeatureComputer``, the stage's pure part, fed them alone under ``tracemalloc``): entities held,
   bytes per entity in memory and in a snapshot; then events two TTLs of event time later, after
   which the view must hold only their entity (idle entities are dropped after its ``ttl_ms``).

Prints the figures per rep; the last line is one JSON object with
``events_per_s`` (weir, median), ``no_redis_events_per_s``, ``redis_write_share``,
``handle_share`` (the stage's ``handle``), ``gc_share``, ``no_freezer_events_per_s`` (with ``--gc-baseline``),
``fetch_p50_ms_<n>``/``fetch_p99_ms_<n>`` and ``raw_fetch_p50_ms_<n>``/``raw_fetch_p99_ms_<n>``
for n in 1, 32, 256, ``write_rate_per_s`` (the background rate achieved), per view ``entities_<view>``,
``state_bytes_per_entity_<view>``, ``snapshot_bytes_per_entity_<view>`` and ``entities_after_ttl_<view>``,
and the process's ``peak_rss_mb``.
``--profile`` adds one cProfile'd weir rep and prints its top functions; ``--gc-baseline`` adds
a third variant to each rep, weir without the :class:`~streams.gcpolicy.StateFreezer` the
pipeline gives the stage (the growing window state then stays in the cyclic collector's full
scans), to show what the collector costs the stage.

The events are the fraud shop's (``--project``, default the shop: any project declaring its ``clicks``
and ``payments`` sources and ``card`` and ``user`` views); the stage computes the project's views.
``--smoke``: a few thousand events, one rep, a few hundred reads (well under a minute; figures
meaningless, for tests).
Run: .venv/bin/python load_tests/features.py [--events 100000] [--reps 3] [--reads 3000] [--write-rate 20000]
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
import tracemalloc
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import redis
from confluent_kafka import Producer

from load_tests.common import add_project_option, load_project, peak_rss_mb, require_shop
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.codec import AvroCodec
from streams.dlq import DlqGuard
from streams.features.aggregations import Agg, Sliding
from streams.features.definitions import HOUR, Feature, FeatureView
from streams.gcpolicy import StateFreezer
from streams.kafka import producer_config
from streams.pipeline import PipelineConfig
from streams.project.contracts import silver_topic
from streams.project.spec import Project
from streams.pseudonymize import Pseudonymizer
from streams.runtime import BatchRunner
from streams.settings import WeirSettings
from streams.stack import Endpoints, Stack
from streams.stages.features import FeatureComputer, FeaturesStage

START_MS = int(time.time() * 1000) - 3 * 3600 * 1000  # event times start three hours ago and increase
PAYMENT_SHARE = 0.15
INGEST_BATCH = 500  # events per ingest batch: one output message per partition per batch
BENCH_VIEW = FeatureView("bench30", "entity", 1, source="bench", ttl_ms=2 * HOUR,  # 30 features, for read latency
                         specs=tuple(Feature(f"f{i}", Agg.COUNT, Sliding(HOUR), "bench") for i in range(30)))
BATCH_SIZES = (1, 32, 256)
WRITE_BATCH = 100  # entities per background write
TTL_PROBES = 200  # events of new entities two TTLs later, to show the view drops every earlier one


# ---------------------------------------------------------------------------------------------- throughput


def messages(project: Project, n: int, partitions: int, seed: int = 1) -> list[tuple[str, int, bytes]]:
    """``n`` events as ingest's output messages: (topic, partition, Avro micro-batch)."""
    rng = random.Random(seed)
    pseudo = Pseudonymizer(PipelineConfig(data_dir=Path(".")).pseudonym_key)  # device ids arrive tokenized
    clicks = silver_topic(project, project.source("clicks"))
    payments = silver_topic(project, project.source("payments"))
    codecs = {clicks: AvroCodec(clicks), payments: AvroCodec(payments)}
    types = ["page_view", "page_view", "search", "add_to_cart", "login", "checkout"]
    out: list[tuple[str, int, bytes]] = []
    for start in range(0, n, INGEST_BATCH):
        groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
        for i in range(start, min(start + INGEST_BATCH, n)):
            ts = START_MS + i * 20
            u = rng.randrange(20_000)  # 20,000 users, two devices each; 30,000 cards; 80 merchants
            if rng.random() < PAYMENT_SHARE:
                card = f"c{rng.randrange(30_000)}"
                item: dict[str, Any] = {
                    "event_id": f"p{i}", "ts_ms": ts, "source_ms": ts + 50, "payment_id": f"p{i}", "card_id": card,
                    "customer_id": f"u{u}", "merchant_id": f"m{rng.randrange(80)}",
                    "merchant_category": rng.choice(["retail", "digital_goods"]),
                    "amount": round(rng.lognormvariate(3.5, 1.0), 2), "device_id": pseudo.token(f"d{u}-{rng.randrange(2)}")}
                groups[(payments, T.partition_for(card, partitions))].append(item)
            else:
                event_type = rng.choice(types)
                item = {"event_id": f"e{i}", "ts_ms": ts, "source_ms": ts + 50, "event_type": event_type,
                        "user_id": f"u{u}", "session_id": f"s{i // 20}",
                        "device_id": pseudo.token(f"d{u}-{rng.randrange(2)}"),
                        "amount": round(rng.uniform(5, 200), 2) if event_type == "checkout" else None}
                groups[(clicks, T.partition_for(item["user_id"], partitions))].append(item)
        out.extend((topic, p, codecs[topic].encode({"items": items})) for (topic, p), items in groups.items())
    return out


def produce(bootstrap: str, msgs: list[tuple[str, int, bytes]]) -> None:
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 20}))
    for i, (topic, partition, value) in enumerate(msgs):
        producer.produce(topic, value, None, partition=partition)
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("load not acknowledged")


class TimedStore(OnlineStore):
    """The online store, timing its writes (packing and the round trip), or dropping them."""

    def __init__(self, url: str, *, drop: bool = False) -> None:
        super().__init__(url)
        self.drop = drop
        self.write_s = 0.0
        self.rows = 0

    def write(self, view: FeatureView, rows: Iterable[tuple[str, int, Sequence[float]]]) -> int:
        t0 = time.perf_counter()
        n = sum(1 for _ in rows) if self.drop else super().write(view, rows)
        self.write_s += time.perf_counter() - t0
        self.rows += n
        return n


class ProfiledRunner(BatchRunner):
    """A runner whose batches run under cProfile (not its paused wait; cProfile sees only the thread
    that enabled it, which is the runner's)."""

    profile = cProfile.Profile()

    def run_once(self) -> int:
        self.profile.enable()
        try:
            return super().run_once()
        finally:
            self.profile.disable()


class GcTimer:
    """Wall time spent in the cyclic garbage collector (any thread), via ``gc.callbacks``."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.collections = 0
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._t0
            self.collections += info["generation"] == 2

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def stage_run(project: Project, endpoints: Endpoints, n_events: int, n_msgs: int, label: str, *,
              drop: bool = False, profile: bool = False, freezer: bool = True) -> dict[str, float]:
    """One drain of every pre-produced message by a fresh features stage in a fresh consumer group.

    ``freezer`` False: without the pipeline's :class:`StateFreezer` (the baseline of ``--gc-baseline``)."""
    gc.unfreeze()  # the previous rep's state, frozen after its commits by the stage's StateFreezer
    gc.collect()  # the previous reps' stages (window state for every entity) must not weigh on this one's GC
    c = PipelineConfig(data_dir=Path("."))
    store = TimedStore(endpoints.redis_url, drop=drop)
    # as Pipeline.start builds it
    stage = FeaturesStage(project, store, after_commit_hook=StateFreezer() if freezer else None)
    runner_cls = ProfiledRunner if profile else BatchRunner
    runner = runner_cls(  # as Pipeline.start builds the features runner
        stage, endpoints.kafka_bootstrap, group_id=f"bench-features-{label}-{time.time_ns()}", max_batch=16,
        max_wait_ms=c.batch_max_wait_ms, fetch_wait_ms=c.fetch_wait_ms,
        dlq_guard=DlqGuard(c.dlq_max_ratio, c.dlq_window, c.dlq_min_events))
    runner.paused.set()
    runner.start()
    if not runner.ready.wait(60):
        raise TimeoutError("the features stage never got its partitions")
    gc_timer = GcTimer()
    t0 = time.perf_counter()
    runner.paused.clear()
    while runner.stats.consumed < n_msgs:
        if runner.error is not None:
            raise RuntimeError("the features stage failed") from runner.error
        time.sleep(0.002)
    runner.stop()
    elapsed = time.perf_counter() - t0  # includes the final flush and commit
    gc_timer.close()
    if runner.error is not None:
        raise RuntimeError("the features stage failed") from runner.error
    if runner.stats.dead_lettered or runner.stats.consumed != n_msgs:
        raise RuntimeError(f"consumed {runner.stats.consumed} of {n_msgs}, dead-lettered {runner.stats.dead_lettered}")
    return {"events_per_s": n_events / elapsed, "write_share": store.write_s / elapsed,
            "handle_share": runner.stats.busy_s / elapsed, "gc_share": gc_timer.total_s / elapsed,
            "full_gcs": gc_timer.collections, "rows_per_write_s": store.rows / max(store.write_s, 1e-9),
            "rows": store.rows, "elapsed": elapsed}


def throughput(project: Project, endpoints: Endpoints, n_events: int, reps: int, partitions: int, profile: bool,
               gc_baseline: bool) -> dict[str, float]:
    msgs = messages(project, n_events, partitions)
    produce(endpoints.kafka_bootstrap, msgs)
    print(f"features alone: {n_events:,} events in {len(msgs):,} micro-batch messages "
          f"({n_events / len(msgs):.0f} events each), {reps} reps, medians:", flush=True)
    weir, bare, share, handle, gcs, frozen = [], [], [], [], [], []
    for rep in range(reps):
        w = stage_run(project, endpoints, n_events, len(msgs), f"weir{rep}")
        b = stage_run(project, endpoints, n_events, len(msgs), f"noredis{rep}", drop=True)
        weir.append(w["events_per_s"])
        bare.append(b["events_per_s"])
        f = stage_run(project, endpoints, n_events, len(msgs), f"nofreezer{rep}", freezer=False) if gc_baseline else None
        share.append(w["write_share"])
        handle.append(w["handle_share"])
        gcs.append(w["gc_share"])
        print(f"  rep {rep + 1}: weir {w['events_per_s']:,.0f} events/s ({w['elapsed']:.2f} s; handle "
              f"{w['handle_share']:.0%} of wall, Redis writes {w['write_share']:.0%}: {w['rows']:,} rows at "
              f"{w['rows_per_write_s']:,.0f} rows/s; GC {w['gc_share']:.0%}, {w['full_gcs']} full), "
              f"no redis {b['events_per_s']:,.0f} events/s", flush=True)
        if f is not None:
            frozen.append(f["events_per_s"])
            print(f"         weir without the StateFreezer {f['events_per_s']:,.0f} events/s "
                  f"(GC {f['gc_share']:.0%}, {f['full_gcs']} full)", flush=True)
    if profile:
        stage_run(project, endpoints, n_events, len(msgs), "profile", profile=True)
        out = io.StringIO()
        stats = pstats.Stats(ProfiledRunner.profile, stream=out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
        print(out.getvalue(), flush=True)
    return {"events_per_s": round(statistics.median(weir)), "no_redis_events_per_s": round(statistics.median(bare)),
            "redis_write_share": round(statistics.median(share), 3),
            "handle_share": round(statistics.median(handle), 3), "gc_share": round(statistics.median(gcs), 3)} | (
        {"no_freezer_events_per_s": round(statistics.median(frozen))} if frozen else {})


# ---------------------------------------------------------------------------------------------- state per entity


def state_size(project: Project, msgs: list[tuple[str, int, bytes]]) -> dict[str, float]:
    """Per view, what the features stage holds per entity after the throughput's events: the view's state built
    from them alone in a :class:`FeatureComputer` (the stage's own; every partition's in one) under
    ``tracemalloc`` (bytes allocated per entity held) and its snapshot's bytes per entity; then copies of its
    newest events as new entities two TTLs of event time later (each filtered lane keeps its own watermark,
    moved by its own kind of event), after which every earlier entity is past its TTL and must be dropped:
    the state is bounded by the entities active within one TTL."""
    source_of = {silver_topic(project, s): s.name for s in project.sources}
    codecs = {topic: AvroCodec(topic) for topic in {topic for topic, _, _ in msgs}}
    items = [(source_of[topic], item) for topic, _, value in msgs for item in codecs[topic].decode(value)["items"]]
    out: dict[str, float] = {}
    for view in project.views:
        mine = [item for source, item in items if source == view.source]
        gc.collect()
        tracemalloc.start()
        computer = FeatureComputer([view])
        for item in mine:
            computer.add(view.source, item, values=False)
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        state = computer.states[view.name]
        held, snapshot = len(state), len(state.snapshot())
        far = max(item["ts_ms"] for item in mine) + 2 * view.ttl_ms
        probes = mine[-TTL_PROBES:]  # copies of the newest events: every filtered lane sees its own kind
        for k, item in enumerate(probes):
            computer.add(view.source, {**item, view.entity: f"ttl-probe-{k}", "event_id": f"ttl-{k}", "ts_ms": far + k})
        stale = len(state) - len(probes)
        out |= {f"entities_{view.name}": held, f"state_bytes_per_entity_{view.name}": round(used / held),
                f"snapshot_bytes_per_entity_{view.name}": round(snapshot / held),
                f"entities_after_ttl_{view.name}": stale}
        print(f"  state of view {view.name}: {held:,} entities, {used / held:,.0f} B each in memory, "
              f"{snapshot / held:,.0f} B each in a snapshot; {stale} of them held once the watermark passed "
              f"their TTL ({view.ttl_ms / 3_600_000:g} h)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- read latency


def writer(url: str, entities: int, rate: float, started: Any, stop: Any, written: Any) -> None:
    """Background load, in its own process: random entities of the bench view at ``rate``/s, paced."""
    store, rng = OnlineStore(url), random.Random(7)
    ts = START_MS
    t0, sent = time.perf_counter(), 0
    started.set()
    while not stop.is_set():
        ahead = sent / rate - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(ahead)
        ts += 1
        rows = [(f"ent{rng.randrange(entities)}", ts, [rng.random() for _ in range(30)]) for _ in range(WRITE_BATCH)]
        sent += store.write(BENCH_VIEW, rows)
        written.value = sent


def pct(xs: list[int], q: float) -> float:
    return round(float(np.percentile(np.asarray(xs), q)) / 1e6, 3)


def read_latency(endpoints: Endpoints, entities: int, reads: int, rate: float) -> dict[str, float]:
    store, rng = OnlineStore(endpoints.redis_url), random.Random(3)
    ids = [f"ent{i}" for i in range(entities)]
    for i in range(0, entities, 1000):
        store.write(BENCH_VIEW, ((e, START_MS, [rng.random() for _ in range(30)]) for e in ids[i:i + 1000]))
    raw = redis.Redis.from_url(endpoints.redis_url, socket_timeout=5, socket_connect_timeout=5)
    ctx = mp.get_context("spawn")
    started, stop, written = ctx.Event(), ctx.Event(), ctx.Value("q", 0)
    proc = ctx.Process(target=writer, args=(endpoints.redis_url, entities, rate, started, stop, written), daemon=True)
    proc.start()
    try:
        if not started.wait(60):
            raise TimeoutError("the writer process did not start")
        time.sleep(0.5)  # let it reach its pace
        lat: dict[str, list[int]] = {f"{kind}_{n}": [] for kind in ("store", "raw") for n in BATCH_SIZES}
        kinds = list(lat)
        print(f"read latency: {entities:,} entities × 30 features, {reads:,} reads per batch size, while another "
              f"process writes {rate:,.0f} entities/s:", flush=True)
        w0, t0 = written.value, time.perf_counter()
        for r in range(reads):
            rng.shuffle(kinds)
            for kind in kinds:
                how, size = kind.split("_")
                batch = rng.sample(ids, int(size))
                if how == "store":
                    requests = [(BENCH_VIEW, e) for e in batch]
                    s = time.perf_counter_ns()
                    got = store.read(requests)
                    lat[kind].append(time.perf_counter_ns() - s)
                    if not all(g.found for g in got):
                        raise RuntimeError("an entity written before the reads was not found")
                else:
                    keys = [BENCH_VIEW.redis_key(e) for e in batch]
                    s = time.perf_counter_ns()
                    raw.mget(keys)
                    lat[kind].append(time.perf_counter_ns() - s)
            if r and r % 1000 == 0:
                print(f"  {r:,} reads each, store p99 for 1: {pct(lat['store_1'], 99)} ms", flush=True)
        write_rate = (written.value - w0) / (time.perf_counter() - t0)
    finally:
        stop.set()
        proc.join(10)
    out: dict[str, float] = {}
    for n in BATCH_SIZES:
        out |= {f"fetch_p50_ms_{n}": pct(lat[f"store_{n}"], 50), f"fetch_p99_ms_{n}": pct(lat[f"store_{n}"], 99),
                f"raw_fetch_p50_ms_{n}": pct(lat[f"raw_{n}"], 50), f"raw_fetch_p99_ms_{n}": pct(lat[f"raw_{n}"], 99)}
        print(f"  {n:>3} entities: OnlineStore.read p50 {out[f'fetch_p50_ms_{n}']} ms, p99 {out[f'fetch_p99_ms_{n}']}"
              f" ms; raw MGET p50 {out[f'raw_fetch_p50_ms_{n}']} ms, p99 {out[f'raw_fetch_p99_ms_{n}']} ms", flush=True)
    print(f"  background writes achieved: {write_rate:,.0f} entities/s", flush=True)
    return out | {"write_rate_per_s": round(write_rate)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="events pre-produced for the throughput reps")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--entities", type=int, default=10_000, help="entities of the 30-feature view")
    ap.add_argument("--reads", type=int, default=3000, help="reads per batch size (and as many raw ones)")
    ap.add_argument("--write-rate", type=float, default=20_000, help="background entity writes/s during reads")
    ap.add_argument("--profile", action="store_true", help="one more weir rep under cProfile; print the top")
    ap.add_argument("--gc-baseline", action="store_true",
                    help="a third variant per rep: weir without the StateFreezer (full GC scans of the state)")
    add_project_option(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one rep: a run of well under a minute")
    args = ap.parse_args()
    if args.smoke:
        args.events, args.reps, args.entities, args.reads, args.write_rate = 4000, 1, 1000, 200, 2000
    project = load_project(args.project)
    require_shop("load_tests/features.py", project, sources=("clicks", "payments"), views=("card", "user"))
    with tempfile.TemporaryDirectory() as tmp:
        settings = WeirSettings(data_dir=Path(tmp) / "stack")
        with Stack(settings, project, with_postgres=False) as endpoints:
            tput = throughput(project, endpoints, args.events, args.reps, settings.partitions, args.profile, args.gc_baseline)
            reads = read_latency(endpoints, args.entities, args.reads, args.write_rate)
    state = state_size(project, messages(project, args.events, settings.partitions))
    print(f"features: {tput['events_per_s']:,} events/s (target ≥ 30,000; {tput['no_redis_events_per_s']:,} without "
          f"Redis writes, which take {tput['redis_write_share']:.0%} of the wall time); fetch p99 for 1 entity "
          f"{reads['fetch_p99_ms_1']} ms (target ≤ 2 ms; raw MGET {reads['raw_fetch_p99_ms_1']} ms)")
    rss = {"peak_rss_mb": round(peak_rss_mb(), 1)}  # the process ran the stage, the reads and the state builds
    print(f"peak RSS of this process (every features stage of the run, the reads, the state builds): "
          f"{rss['peak_rss_mb']:,} MiB")
    print(json.dumps(tput | reads | state | rss))


if __name__ == "__main__":
    main()
