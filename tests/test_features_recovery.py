"""The features stage survives crashes: kill -9 mid-stream, restart, and the values equal an uninterrupted run's.

The reference is the pure :class:`FeatureComputer`, one per input partition, fed
that partition's events in log order (the stage's state is partition-local).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from examples.fraud_shop.project import MINUTE
from examples.fraud_shop.project import card as CARD
from examples.fraud_shop.project import user as USER
from sinks.redis_store import unpack
from streams import topics as T
from streams.base import Message
from streams.codec import AvroCodec
from streams.features.aggregations import SnapshotError, plain_loads
from streams.features.definitions import FeatureView
from streams.kafka import consumer_config, ensure_topics, producer_config
from streams.recovery import OFFSET_BEGINNING
from streams.stack import Endpoints
from streams.stages.features import FeatureComputer, FeaturesStage, Touched, snapshot_definition
from streams.state import SignedSnapshots
from tests.conftest import SHOP

ROOT = Path(__file__).resolve().parent.parent
KEY = b"features-recovery-test-key"
PARTITIONS = 4
T0 = 1_700_000_000_000
EVENT_TYPES = ["page_view", "page_view", "search", "add_to_cart", "login", "checkout"]
VIEW = {"card": CARD, "user": USER}
VIEWS = (CARD, USER)
PAYMENTS, CLICKS, SCORING = ("weir.fraud_shop.silver.payments", "weir.fraud_shop.silver.clicks",
                             "weir.fraud_shop.scoring.payments")
FEATURE_LOG = T.internal(SHOP, T.I_FEATURE_LOG)

# ---------------------------------------------------------------- input


def events(tag: str, n: int = 3000, seed: int = 7) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Payments and clicks over ~3 h of event time: recurring entities, ~10% late events (up to 5 min),
    and "sparse" entities seen only at the start and the end, so TTL eviction happens mid-stream."""
    rng = random.Random(seed)
    payments: list[dict[str, Any]] = []
    clicks: list[dict[str, Any]] = []
    for i in range(n):
        ts = T0 + i * 3600 + (-rng.randrange(5 * MINUTE) if rng.random() < 0.1 else 0)
        edge = i < n // 10 or i > n - n // 10
        card = f"{tag}-c{rng.randrange(10) + 1000}" if edge and rng.random() < 0.3 else f"{tag}-c{rng.randrange(120)}"
        user = f"{tag}-u{rng.randrange(10) + 1000}" if edge and rng.random() < 0.3 else f"{tag}-u{rng.randrange(80)}"
        payments.append({"event_id": f"p{i}", "payment_id": f"p{i}", "card_id": card, "customer_id": user,
                         "merchant_id": f"m{rng.randrange(15)}", "merchant_category": "retail",
                         "amount": round(rng.lognormvariate(3, 1), 2), "device_id": None, "ts_ms": ts,
                         "source_ms": 0})
        clicks.append({"event_id": f"e{i}", "event_type": rng.choice(EVENT_TYPES), "user_id": user,
                       "session_id": f"s{i // 20}", "device_id": f"d{user}-{rng.randrange(3)}", "ts_ms": ts + 7,
                       "source_ms": 0, "amount": None})
    return payments, clicks


def micro_batches(items: list[dict[str, Any]], key: str, size: int = 20) -> dict[int, list[list[dict[str, Any]]]]:
    """As ingest emits them: per chunk of ``size`` events, one message per partition (by entity)."""
    out: dict[int, list[list[dict[str, Any]]]] = {p: [] for p in range(PARTITIONS)}
    for start in range(0, len(items), size):
        by_part: dict[int, list[dict[str, Any]]] = {}
        for item in items[start:start + size]:
            by_part.setdefault(T.partition_for(item[key], PARTITIONS), []).append(item)
        for p, group in by_part.items():
            out[p].append(group)
    return out


def reference_rows(payments: dict[int, list[list[dict[str, Any]]]], clicks: dict[int, list[list[dict[str, Any]]]]
                   ) -> dict[tuple[str, str, str], tuple[int, list[float]]]:
    """(view, entity, event id) -> the entity's (as-of ts, values) right after that event, uninterrupted."""
    rows: dict[tuple[str, str, str], tuple[int, list[float]]] = {}
    for p in range(PARTITIONS):
        for view, batches, key in (("card", payments, "card_id"), ("user", clicks, "user_id")):
            computer = FeatureComputer(VIEWS)
            source = "payments" if view == "card" else "clicks"
            for msg in batches[p]:
                for item in msg:
                    for _, entity, eid, ts, values in computer.add(source, item):
                        rows[(view, entity, eid)] = (ts, values)
    return rows


def feature_log(bootstrap: str, prefix: str) -> list[tuple[str, str, str, int, list[float]]]:
    """Every (view, entity, event id, ts, values) row of ``weir.feature_log`` about entities named ``prefix*``."""
    consumer = Consumer(consumer_config(bootstrap, f"read-{uuid.uuid4().hex}"))
    consumer.assign([TopicPartition(FEATURE_LOG, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    codec = AvroCodec(FEATURE_LOG)
    rows: list[tuple[str, str, str, int, list[float]]] = []
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < 3:
            msgs = consumer.consume(500, 0.2)
            if msgs:
                idle_since = time.monotonic()
            for m in msgs:
                if m.error() is not None:
                    continue
                rec = codec.decode(m.value())
                n = rec["n_features"]
                view = rec["view"].split(":")[0]
                for i, entity in enumerate(rec["entity_ids"]):
                    if entity.startswith(prefix):
                        rows.append((view, entity, rec["event_ids"][i], rec["ts_ms"][i],
                                     rec["values"][i * n:(i + 1) * n]))
    finally:
        consumer.close()
    return rows


def reference(payments: dict[int, list[list[dict[str, Any]]]],
              clicks: dict[int, list[list[dict[str, Any]]]]) -> tuple[Touched, Touched]:
    """The uninterrupted run: each partition's events through its own computer, in log order."""
    cards: Touched = {}
    users: Touched = {}
    for p in range(PARTITIONS):
        for source, batches, out, view in (("payments", payments, cards, CARD), ("clicks", clicks, users, USER)):
            computer = FeatureComputer(VIEWS)
            last: dict[FeatureView, Touched] = {}
            for msg in batches[p]:
                for item in msg:
                    computer.latest(computer.add(source, item), last)
            out.update(last.get(view, {}))
    return cards, users


# ---------------------------------------------------------------- pure


class RecordingStore:
    """Stands in for the online store in the pure tests: remembers what was written."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, int, list[float]]] = []

    def write(self, view: Any, rows: Any) -> int:
        got = [(view.name, k, ts, list(v)) for k, ts, v in rows]
        self.rows.extend(got)
        return len(got)


def _messages(topic: str, batches: dict[int, list[list[dict[str, Any]]]], codec: AvroCodec) -> list[Message]:
    return [Message(topic, p, off, None, codec.encode({"items": items}), 0)
            for p, msgs in batches.items() for off, items in enumerate(msgs)]


def _feed(computer: FeatureComputer, payments: list[dict[str, Any]], clicks: list[dict[str, Any]]
          ) -> dict[FeatureView, Touched]:
    last: dict[FeatureView, Touched] = {}
    for p, c in zip(payments, clicks, strict=True):
        computer.latest(computer.add("payments", p), last)
        computer.latest(computer.add("clicks", c), last)
    return last


def _decoded(state: list[tuple[str, bytes]]) -> list[Any]:
    """A computer's state as plain data (pickled bytes can differ with object sharing alone)."""
    out = []
    for name, blob in state:
        max_ts, next_sweep, lanes, derived = plain_loads(blob[16:])  # the view header is 16 bytes
        out.append((name, max_ts, next_sweep, [plain_loads(lane[38:]) for lane in lanes], derived))  # lane: 38
    return out


def test_snapshot_round_trip_continues_identically() -> None:
    payments, clicks = events("rt", n=1200)
    snaps = SignedSnapshots(DictRedis(), b"k")  # type: ignore[arg-type]
    live = FeatureComputer(VIEWS)
    half = len(payments) // 2
    _feed(live, payments[:half], clicks[:half])
    snaps.save("p", live.state(), snapshot_definition(VIEWS))
    restored = FeatureComputer.from_state(snaps.load("p", snapshot_definition(VIEWS)), VIEWS)
    # every entity's events, seen ids and devices, the watermarks and the next sweeps (TTL eviction's clock)
    assert _decoded(restored.state()) == _decoded(live.state())
    assert _feed(live, payments[half:], clicks[half:]) == _feed(restored, payments[half:], clicks[half:])
    assert _decoded(restored.state()) == _decoded(live.state())
    assert all(len(live.states[v]) == len(restored.states[v]) > 0 for v in live.states)


def test_a_view_state_refuses_foreign_definitions_and_code() -> None:
    live = FeatureComputer(VIEWS)
    _feed(live, *events("rf", n=50))
    (name, blob), user = live.state()
    evil = blob[:16] + pickle.dumps(os.getcwd)  # the view header, then a pickle that names a function
    with pytest.raises(SnapshotError, match="names"):
        FeatureComputer.from_state([(name, evil), user], VIEWS)
    with pytest.raises(SnapshotError, match="not hold"):
        FeatureComputer.from_state([("x", b"y")], VIEWS)
    changed = dataclasses.replace(CARD, ttl_ms=CARD.ttl_ms + 1)  # a view snapshot names its definition
    with pytest.raises(SnapshotError, match="another definition"):
        FeatureComputer.from_state(live.state(), (changed, USER))
    (name, blob), user = live.state()
    flipped = blob[:-20] + bytes([blob[-20] ^ 1]) + blob[-19:]  # a bit flip inside a lane's payload
    with pytest.raises(SnapshotError):
        FeatureComputer.from_state([(name, flipped), user], VIEWS)


def test_state_only_replay_produces_nothing_and_rebuilds_the_state() -> None:
    payments, clicks = events("rp", n=600)
    pay = micro_batches(payments, "card_id")
    clk = micro_batches(clicks, "user_id")
    msgs = (_messages(PAYMENTS, pay, AvroCodec(PAYMENTS))
            + _messages(CLICKS, clk, AvroCodec(CLICKS)))
    committed = {(PAYMENTS, 0): 10, (CLICKS, 1): 7}
    bad = Message(PAYMENTS, 0, 3, None, b"not avro", 0)
    msgs = [bad if (m.topic, m.partition, m.offset) == (PAYMENTS, 0, 3) else m for m in msgs]

    store = RecordingStore()
    stage = FeaturesStage(SHOP, store)  # type: ignore[arg-type]
    starts = stage.on_assign([(PAYMENTS, 0), (CLICKS, 1), (CLICKS, 2)],
                             {**committed, (CLICKS, 2): None})
    assert starts == {(PAYMENTS, 0): OFFSET_BEGINNING, (CLICKS, 1): OFFSET_BEGINNING}
    replay = [m for m in msgs if m.offset < committed.get((m.topic, m.partition), -1)]
    result = stage.handle(replay)
    assert result.produce == [] and result.rejected == [] and store.rows == []
    assert stage.replayed == len(replay)  # the undecodable one among them is skipped, not dead-lettered again

    # from the committed offset on, it is a normal run whose state includes the replayed events
    rest = [m for m in msgs if (m.topic, m.partition) in committed and m.offset >= committed[(m.topic, m.partition)]]
    result = stage.handle(rest)
    assert result.produce and not result.rejected
    ref_cards, ref_users = reference({0: [i for o, i in enumerate(pay[0]) if o != 3]} | {p: [] for p in (1, 2, 3)},
                                     {1: clk[1]} | {p: [] for p in (0, 2, 3)})
    last = {(view, k): (ts, v) for view, k, ts, v in store.rows}
    for k, (ts, _, v) in ref_cards.items():
        if (("card", k)) in last:
            assert last[("card", k)] == (ts, v)
    written_users = {k for view, k, _, _ in store.rows if view == "user"}
    assert written_users and all(last[("user", k)] == (ref_users[k][0], ref_users[k][2]) for k in written_users)


class DictRedis:
    """Stands in for Redis under :class:`SignedSnapshots` in the pure tests."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def snapshot_at(snaps: SignedSnapshots, tp: tuple[str, int]) -> int | None:
    """The offset the saved state of ``tp`` is after (None: no snapshot)."""
    saved = snaps.load(f"features:{tp[0]}:{tp[1]}", snapshot_definition(VIEWS))
    return None if saved is None else int(saved["positions"][tp])


def test_checkpoints_only_committed_state_on_the_clock() -> None:
    payments, _ = events("ck", n=200)
    msgs = _messages(PAYMENTS, micro_batches(payments, "card_id"), AvroCodec(PAYMENTS))
    p0 = [m for m in msgs if m.partition == 0]
    now = [100.0]
    memory = DictRedis()
    snaps = SignedSnapshots(memory, b"k")  # type: ignore[arg-type]
    stage = FeaturesStage(SHOP, RecordingStore(), snapshots=snaps, checkpoint_every_s=5,  # type: ignore[arg-type]
                          clock=lambda: now[0])
    stage.handle(p0[:4])
    stage.on_revoke([(PAYMENTS, 0)])  # handled but not committed (a lost commit): nothing saved
    assert memory.data == {}
    stage.handle(p0[:4])
    stage.after_commit({(PAYMENTS, 0): 4})
    assert memory.data == {}  # not due yet
    now[0] += 5
    stage.after_commit({})
    assert snapshot_at(snaps, (PAYMENTS, 0)) == 4
    stage.handle(p0[4:6])
    stage.after_commit({(PAYMENTS, 0): 6})
    stage.on_revoke([(PAYMENTS, 0)])  # clean handoff: saved at once, then dropped
    assert snapshot_at(snaps, (PAYMENTS, 0)) == 6 and stage.partitions == {}

    # the next owner restores it and replays nothing; a snapshot past the committed offset is not used
    other = FeaturesStage(SHOP, RecordingStore(), snapshots=snaps)  # type: ignore[arg-type]
    assert other.on_assign([(PAYMENTS, 0)], {(PAYMENTS, 0): 6}) == {(PAYMENTS, 0): 6}
    assert other.on_assign([(PAYMENTS, 0)], {(PAYMENTS, 0): 5}) == {(PAYMENTS, 0): OFFSET_BEGINNING}


def _log_rows(result: Any) -> list[tuple[str, str, str, int, list[float]]]:
    """The feature-log rows a stage's result produces: (view, entity, event id, as-of ts, values)."""
    rows = []
    for p in result.produce:
        if p.topic == FEATURE_LOG:
            rec = AvroCodec(FEATURE_LOG).decode(p.value)
            n = rec["n_features"]
            rows += [(rec["view"].split(":")[0], e, rec["event_ids"][i], rec["ts_ms"][i],
                      rec["values"][i * n:(i + 1) * n]) for i, e in enumerate(rec["entity_ids"])]
    return rows


def test_partitions_move_between_workers_with_their_state() -> None:
    """A rebalance hands half the partitions to a second worker after a lost commit: each restores the last
    snapshot, replays to the committed offset and goes on. Every row either worker writes, and the online
    store's final values, equal an uninterrupted run's; the re-processed messages produce the same rows."""
    payments, clicks = events("mv", n=1600)
    pay, clk = micro_batches(payments, "card_id"), micro_batches(clicks, "user_id")
    msgs = _messages(PAYMENTS, pay, AvroCodec(PAYMENTS)) + _messages(CLICKS, clk, AvroCodec(CLICKS))
    tps = sorted({(m.topic, m.partition) for m in msgs})
    ends = {tp: sum(1 for m in msgs if (m.topic, m.partition) == tp) for tp in tps}

    def part(lo: float, hi: float) -> list[Message]:
        return [m for m in msgs if ends[(m.topic, m.partition)] * lo <= m.offset < ends[(m.topic, m.partition)] * hi]

    expected = reference_rows(pay, clk)
    ref_cards, ref_users = reference(pay, clk)
    now = [0.0]
    snaps = SignedSnapshots(DictRedis(), b"k")  # type: ignore[arg-type]
    a_store, b_store = RecordingStore(), RecordingStore()
    a = FeaturesStage(SHOP, a_store, snapshots=snaps, checkpoint_every_s=10, clock=lambda: now[0])  # type: ignore[arg-type]
    b = FeaturesStage(SHOP, b_store, snapshots=snaps, checkpoint_every_s=10, clock=lambda: now[0])  # type: ignore[arg-type]
    assert a.on_assign(tps, dict.fromkeys(tps)) == {}  # a new group: nothing to restore
    rows = _log_rows(a.handle(part(0, 0.25)))
    now[0] = 10
    a.after_commit({})  # snapshot at 1/4
    rows += _log_rows(a.handle(part(0.25, 0.5)))
    a.after_commit({})  # committed at 1/2, no snapshot (not due)
    committed = {tp: sum(1 for m in part(0, 0.5) if (m.topic, m.partition) == tp) for tp in tps}
    rows += _log_rows(a.handle(part(0.5, 0.75)))  # processed and produced, but the commit is lost
    a.on_revoke(tps)
    assert a.partitions == {} and a.positions == {}

    moved = [tp for tp in tps if tp[1] % 2 == 1]
    stays = [tp for tp in tps if tp[1] % 2 == 0]
    starts = a.on_assign(stays, {tp: committed[tp] for tp in stays}) | b.on_assign(moved, {tp: committed[tp]
                                                                                         for tp in moved})
    assert starts == {tp: int(ends[tp] * 0.25) + (ends[tp] * 0.25 % 1 > 0) for tp in tps}  # the snapshot's
    assert a.restored == {f"features:{t}:{p}": "snapshot" for t, p in stays}
    rest = [m for m in msgs if m.offset >= starts[(m.topic, m.partition)]]
    for stage, own in ((a, stays), (b, moved)):
        result = stage.handle([m for m in rest if (m.topic, m.partition) in own])
        rows += _log_rows(result)
    assert a.replayed == sum(committed[tp] - starts[tp] for tp in stays)  # exactly S..C-1, produced nothing
    assert b.replayed == sum(committed[tp] - starts[tp] for tp in moved)

    wrong = [r for r in rows if expected[(r[0], r[1], r[2])] != (r[3], r[4])]
    assert not wrong, f"{len(wrong)} of {len(rows)} rows differ, e.g. {wrong[:2]}"
    assert {(v, k, eid) for v, k, eid, _, _ in rows} == set(expected)
    last = {(view, k): (ts, v) for view, k, ts, v in a_store.rows + b_store.rows}  # per entity: one worker
    assert {k: last[("card", k)] for k in ref_cards} == {k: (ts, v) for k, (ts, _, v) in ref_cards.items()}
    assert {k: last[("user", k)] for k in ref_users} == {k: (ts, v) for k, (ts, _, v) in ref_users.items()}


def test_values_do_not_depend_on_batching() -> None:
    """Late events: an entity's values are as of its newest event, however the messages were batched."""
    payments, _ = events("bt", n=800)
    msgs = _messages(PAYMENTS, micro_batches(payments, "card_id"), AvroCodec(PAYMENTS))
    finals = []
    for size in (1, 7, len(msgs)):
        store = RecordingStore()
        stage = FeaturesStage(SHOP, store)  # type: ignore[arg-type]
        for i in range(0, len(msgs), size):
            stage.handle(msgs[i:i + size])
        finals.append({k: (ts, v) for _, k, ts, v in store.rows})
    assert finals[0] == finals[1] == finals[2]


# ---------------------------------------------------------------- kill -9 against the real broker and Redis

WORKER = """
import json, sys, time
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
from streams import kafka, runtime, schemas
from streams.project.contracts import use_project
from streams.project.load import load
project = load("examples.fraud_shop.project:project")
use_project(project)
schemas.use_registry(cfg["registry"])
# small fetches, so the worker moves through every partition of both topics at once (not one after another)
runtime.consumer_config = lambda b, g, **o: kafka.consumer_config(b, g, **o, **{"max.partition.fetch.bytes": 4096})
from sinks.redis_store import OnlineStore
from streams.runtime import BatchRunner
from streams.stages.features import FeaturesStage
from streams.state import SignedSnapshots

snapshots = SignedSnapshots.from_url(cfg["redis"], cfg["key"].encode())
stage = FeaturesStage(project, OnlineStore(cfg["redis"]), snapshots=snapshots,
                      checkpoint_every_s=cfg["checkpoint_s"],
                      rename={"weir.fraud_shop.silver.clicks": cfg["clicks"],
                              "weir.fraud_shop.silver.payments": cfg["payments"]})
handle = stage.handle
def slow(batch):
    time.sleep(cfg["delay_s"])
    return handle(batch)
stage.handle = slow
runner = BatchRunner(stage, cfg["bootstrap"], group_id=cfg["group"], max_batch=cfg["max_batch"])
runner.start()
ends = {(t, int(p)): e for t, per in cfg["ends"].items() for p, e in per.items() if e > 0}
while True:
    if runner.error is not None:
        raise SystemExit(f"worker failed: {runner.error!r}")
    if all(stage.positions.get(tp, 0) >= e for tp, e in ends.items()):
        break
    time.sleep(0.02)
runner.stop()
if runner.error is not None:
    raise SystemExit(f"worker failed: {runner.error!r}")
print(json.dumps({"replayed": stage.replayed, "consumed": runner.stats.consumed}), flush=True)
"""


def _produce(bootstrap: str, topic: str, batches: dict[int, list[list[dict[str, Any]]]], codec: AvroCodec) -> None:
    producer = Producer(producer_config(bootstrap))
    for p, msgs in batches.items():
        for items in msgs:
            producer.produce(topic, codec.encode({"items": items}), partition=p)
    assert producer.flush(60) == 0


def _committed(consumer: Consumer, topics: list[str]) -> dict[tuple[str, int], int]:
    """The group's committed offsets (0 where none), read by a member that never joins it."""
    got = consumer.committed([TopicPartition(t, p) for t in topics for p in range(PARTITIONS)], timeout=10)
    return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in got}


def _worker(endpoints: Endpoints, cfg: dict[str, Any]) -> subprocess.Popen[str]:
    full = cfg | {"root": str(ROOT), "bootstrap": endpoints.kafka_bootstrap, "redis": endpoints.redis_url,
                  "registry": endpoints.schema_registry_url, "key": KEY.decode()}
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(full)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("lose_snapshots", [False, True], ids=["from-snapshot", "snapshot-deleted"])
def test_kill_9_mid_stream_then_restart_equals_uninterrupted(endpoints: Endpoints, lose_snapshots: bool) -> None:
    tag = uuid.uuid4().hex[:8]
    clicks_topic, payments_topic = f"t.{tag}.clicks", f"t.{tag}.payments"
    ensure_topics(endpoints.kafka_bootstrap, [clicks_topic, payments_topic], PARTITIONS)
    payments, clicks = events(tag)
    pay, clk = micro_batches(payments, "card_id"), micro_batches(clicks, "user_id")
    _produce(endpoints.kafka_bootstrap, payments_topic, pay, AvroCodec(PAYMENTS))
    _produce(endpoints.kafka_bootstrap, clicks_topic, clk, AvroCodec(CLICKS))
    ends = {payments_topic: {p: len(m) for p, m in pay.items()}, clicks_topic: {p: len(m) for p, m in clk.items()}}
    total = sum(e for per in ends.values() for e in per.values())
    group = f"recovery-{tag}"
    snaps = SignedSnapshots.from_url(endpoints.redis_url, KEY)
    topics = [clicks_topic, payments_topic]
    cfg = {"group": group, "clicks": clicks_topic, "payments": payments_topic, "ends": ends, "max_batch": 4}

    # 1. a slow worker, killed with SIGKILL after some commits and checkpoints, well before the end
    first = _worker(endpoints, cfg | {"delay_s": 0.05, "checkpoint_s": 0.3})
    watcher = Consumer(consumer_config(endpoints.kafka_bootstrap, group))
    deadline = time.monotonic() + 120
    try:
        while True:
            assert first.poll() is None, f"first worker exited early: {first.communicate()}"
            assert time.monotonic() < deadline, "first worker made no progress"
            done = _committed(watcher, topics)
            per_topic = {t: sum(o for (tt, _), o in done.items() if tt == t) / sum(ends[t].values()) for t in topics}
            saved = {t for t in topics for p in range(PARTITIONS) if snapshot_at(snaps, (t, p)) is not None}
            if sum(done.values()) >= total * 0.25 and min(per_topic.values()) >= 0.1 and len(saved) == 2:
                break
            time.sleep(0.05)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    committed = _committed(watcher, topics)
    watcher.close()
    assert 0 < sum(committed.values()) < total * 0.9, "killed too late to be mid-stream"
    saved_at = {}
    for t in topics:
        for p in range(PARTITIONS):
            if (at := snapshot_at(snaps, (t, p))) is not None:
                saved_at[(t, p)] = at
            if lose_snapshots:
                snaps.delete(f"features:{t}:{p}")
    assert all(s <= committed[tp] for tp, s in saved_at.items())

    # 2. a new worker in the same group finishes the stream
    second = _worker(endpoints, cfg | {"delay_s": 0.0, "checkpoint_s": 600.0})
    out, err = second.communicate(timeout=180)
    assert second.returncode == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    starts = {tp: 0 if lose_snapshots else saved_at.get(tp, 0) for tp in committed}
    assert report["replayed"] == sum(c - starts[tp] for tp, c in committed.items())  # exactly S..C-1
    assert report["consumed"] == report["replayed"] + total - sum(committed.values())
    # it stopped cleanly: on leaving the group it saved every partition's state at the end of its log
    final = {tp: at for tp in committed if (at := snapshot_at(snaps, tp)) is not None}
    assert final == {(t, p): e for t, per in ends.items() for p, e in per.items()}

    # 3. every feature-log row (the killed worker's and the new one's) has the values of an uninterrupted run,
    # in particular the rows computed right after the restart, which need the windows from before the crash
    expected = reference_rows(pay, clk)
    rows = feature_log(endpoints.kafka_bootstrap, f"{tag}-")
    wrong = [r for r in rows if expected[(r[0], r[1], r[2])] != (r[3], r[4])]
    assert not wrong, f"{len(wrong)} of {len(rows)} feature-log rows differ, e.g. {wrong[:2]}"
    # the last event of each partition not finished before the kill: its row can only come from the new worker
    after_restart = {(view, batches[p][-1][-1][key], batches[p][-1][-1]["event_id"])
                     for view, batches, key, t in (("card", pay, "card_id", payments_topic),
                                                   ("user", clk, "user_id", clicks_topic))
                     for p in range(PARTITIONS) if committed[(t, p)] < len(batches[p])}
    assert after_restart
    assert after_restart <= {(v, k, eid) for v, k, eid, _, _ in rows}  # the new worker wrote rows after C

    # 4. the online store holds what an uninterrupted run computes
    ref_cards, ref_users = reference(pay, clk)
    client = redis.Redis.from_url(endpoints.redis_url)
    for view, ref in ((CARD, ref_cards), (USER, ref_users)):
        keys = list(ref)
        got = [unpack(view, raw) for raw in client.mget([view.redis_key(k) for k in keys])]  # type: ignore[union-attr]
        mismatched = [k for k, g in zip(keys, got, strict=True)
                      if not g.found or (g.event_ts, g.values) != (ref[k][0], ref[k][2])]
        assert not mismatched, f"{view.name}: {len(mismatched)} of {len(keys)} differ, e.g. {mismatched[:3]}"


def test_each_payment_is_served_the_values_logged_for_it() -> None:
    """Three payments of one card in one message: each scoring record carries the card's values as of that
    payment, equal to its own feature-log row; the online store gets the last."""
    payments = [{"event_id": f"p{i}", "payment_id": f"p{i}", "card_id": "c1", "customer_id": "u1",
                 "merchant_id": f"m{i % 2}", "merchant_category": "retail", "amount": 10.0 * (i + 1),
                 "device_id": None, "ts_ms": T0 + 1000 * i, "source_ms": 0} for i in range(3)]
    store = RecordingStore()
    result = FeaturesStage(SHOP, store).handle(  # type: ignore[arg-type]
        [Message(PAYMENTS, 0, 0, None, AvroCodec(PAYMENTS).encode({"items": payments}), 0)])
    (scoring,) = [AvroCodec(SCORING).decode(p.value) for p in result.produce if p.topic == SCORING]
    (log,) = [AvroCodec(FEATURE_LOG).decode(p.value) for p in result.produce if p.topic == FEATURE_LOG]
    served = [item["served"]["card:v3"] for item in scoring["items"]]
    assert served == [[1.0, 10.0, 1.0, 10.0, 1.0], [2.0, 30.0, 2.0, 30.0, 2.0], [3.0, 60.0, 3.0, 60.0, 2.0]]
    assert log["event_ids"] == ["p0", "p1", "p2"] and log["ts_ms"] == [T0, T0 + 1000, T0 + 2000]
    assert [log["values"][i * 5:(i + 1) * 5] for i in range(3)] == served
    assert store.rows == [("card", "c1", T0 + 2000, served[-1])]
