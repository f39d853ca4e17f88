"""Assembles the stages into one process: each stage on its own :class:`BatchRunner` thread.

ClickHouse's embedded engine is single-process, so the stages that use it
(sinks, retrain, the registry) live in the process that opened it; with
external services every stage can run in a process of its own
(``stages=...``) and scale out by consumer group.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from models.online import RiverLearner
from models.registry import ModelRegistry
from models.scorer import RuleScorer
from sinks.bronze import BronzeSink
from sinks.clickhouse import ClickHouse
from sinks.events import ClickHouseSink
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.dedup import RedisDedup
from streams.dlq import DlqGuard
from streams.event_time import EventTimeGuard
from streams.features.checkpoint import RedisSnapshots
from streams.features.definitions import FEATURE_NAMES
from streams.gcpolicy import StateFreezer
from streams.pseudonymize import Pseudonymizer
from streams.runtime import BatchRunner, Stage
from streams.serving.cache import ResponseCache
from streams.serving.resilience import OnlineFallback, ScoringChain
from streams.serving.routing import ModelSlot
from streams.stack import Endpoints
from streams.stages.drift import DriftStage
from streams.stages.features import FeaturesStage
from streams.stages.inference import InferenceStage
from streams.stages.ingest import IngestStage
from streams.stages.learn import SERVING_SNAPSHOT, LearnStage
from streams.stages.model_watch import ModelWatchStage
from streams.stages.retrain import RetrainScheduler, RetrainStage
from streams.state import SignedSnapshots

log = logging.getLogger(__name__)

ALL_STAGES = ("cdc", "ingest", "features", "inference", "learn", "drift", "retrain", "sinks")


@dataclass(frozen=True)
class PipelineConfig:
    """Plain values the stages need (the CLI fills them from :class:`WeirSettings`)."""

    data_dir: Path
    partitions: int = 4
    batch_max_size: int = 500
    batch_max_wait_ms: int = 5
    fetch_wait_ms: int = 10
    inference_max_batch: int = 256
    inference_max_wait_ms: int = 5
    inference_backend: str = "onnx"
    inference_model_timeout_ms: int = 500
    inference_model_cooldown_s: float = 5.0
    inference_redis_timeout_ms: int = 250
    inference_cache_ttl_s: int = 0
    canary_fraction: float = 0.1
    decision_threshold: float = 0.5
    audit_vectors: bool = True
    drift_delta: float = 0.002
    drift_cooldown: int = 1000
    retrain_cron: str = "*/30 * * * *"
    retrain_window_rows: int = 4000
    label_maturity_ms: int = 600_000
    bootstrap_rows: int = 600
    online_model: str = "logreg"
    seed: int = 0
    group_prefix: str = "weir"
    stages: tuple[str, ...] = ALL_STAGES
    dedup_horizon_ms: int = 900_000
    max_future_ms: int = 300_000
    max_age_ms: int = 7 * 86_400_000
    allowed_lateness_ms: int = 600_000
    pseudonym_key: bytes = field(default=b"weir-dev-pseudonym-key", repr=False)
    features_checkpoint_s: float = 5.0
    learn_checkpoint_s: float = 30.0
    online_challengers: tuple[tuple[str, str], ...] = ()  # (name, model) pairs, see WeirSettings
    dlq_max_ratio: float = 0.5
    dlq_window: int = 1000
    dlq_min_events: int = 200
    cdc_tables: tuple[str, ...] = tuple(T.CDC_TABLES)


def ingest_stage(c: PipelineConfig, redis_url: str) -> IngestStage:
    """The ingest stage as a pipeline runs it: dedup in Redis, event-time limits, PII tokens."""
    dedup = RedisDedup(redis.Redis.from_url(redis_url), c.dedup_horizon_ms)
    guard = EventTimeGuard(max_future_ms=c.max_future_ms, max_age_ms=c.max_age_ms,
                           allowed_lateness_ms=c.allowed_lateness_ms)
    return IngestStage(c.partitions, dedup=dedup, pseudonymizer=Pseudonymizer(c.pseudonym_key), event_time=guard)


def online_version(model: str) -> str:
    """The online model's version name: ``river-<name>``, or ``river-<hash>`` for a declared pipeline."""
    if "(" not in model:
        return f"river-{model}"
    return "river-" + hashlib.sha256(" ".join(model.split()).encode()).hexdigest()[:10]


@dataclass
class Pipeline:
    endpoints: Endpoints
    config: PipelineConfig
    runners: dict[str, BatchRunner] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    ch: ClickHouse | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _scheduler: RetrainScheduler | None = None
    cdc: Any = None

    def start(self) -> None:
        # Move everything imported so far (torch, scipy, river: ~260k objects) out of the collector's
        # reach: full collections over them took 31-38% of the features stage's time (load_tests/features.py).
        gc.collect()
        gc.freeze()
        c, e = self.config, self.endpoints
        wanted = set(c.stages)
        if wanted & {"sinks", "retrain"}:
            self.ch = ClickHouse(e.clickhouse_dsn)
            self.ch.ensure_schema()
        store = OnlineStore(e.redis_url) if "features" in wanted else None
        if "cdc" in wanted and e.postgres_dsn:
            self._start_cdc()
        if "ingest" in wanted:
            self._run(ingest_stage(c, e.redis_url), hot=True)
        if "features" in wanted:
            assert store is not None
            snapshots = RedisSnapshots.from_url(e.redis_url)  # window state survives a crash (docs/features.md)
            stage = FeaturesStage(store, snapshots=snapshots, checkpoint_every_s=c.features_checkpoint_s,
                                  after_commit_hook=StateFreezer())  # the windows: out of full GC scans
            self._run(stage, hot=True, max_batch=16)  # micro-batches of up to 500 events each
        if "inference" in wanted:
            self._start_inference()
        if "learn" in wanted:
            learner = RiverLearner(c.online_model, seed=c.seed)
            snaps = SignedSnapshots.from_url(e.redis_url, c.pseudonym_key)  # the model survives a restart
            challengers = {name: (RiverLearner(model, seed=c.seed), online_version(model))
                           for name, model in c.online_challengers}
            self._run(LearnStage(learner, online_version(c.online_model), snapshots=snaps, challengers=challengers,
                                 checkpoint_every_s=c.learn_checkpoint_s))
        if "drift" in wanted:
            self._run(DriftStage(c.drift_delta, cooldown=c.drift_cooldown))
        if "retrain" in wanted:
            assert self.ch is not None
            registry = ModelRegistry(self.ch.client, c.data_dir / "models")
            registry.ensure_schema()
            self._run(RetrainStage(self.ch, registry, window_rows=c.retrain_window_rows, seed=c.seed,
                                   label_maturity_ms=c.label_maturity_ms),
                      max_wait_ms=200)
            self.stages["registry"] = registry
            self._scheduler = RetrainScheduler(e.kafka_bootstrap, self.ch, registry, c.retrain_cron,
                                               bootstrap_rows=c.bootstrap_rows,
                                               label_maturity_ms=c.label_maturity_ms)
            self._scheduler.start()
        if "sinks" in wanted:
            assert self.ch is not None
            self._run(ClickHouseSink(self.ch), max_batch=5000)
            self._run(BronzeSink(self.ch, Pseudonymizer(c.pseudonym_key)), max_batch=5000)

    def _start_inference(self) -> None:
        c, e = self.config, self.endpoints
        slot = ModelSlot(RuleScorer(list(FEATURE_NAMES)))  # until model.events names a production version
        # read when the model fails: a hung Redis must cost it no more than it costs the features
        snapshots = SignedSnapshots.from_url(e.redis_url, c.pseudonym_key,
                                             timeout_s=c.inference_redis_timeout_ms / 1000)
        online = OnlineFallback(snapshots, SERVING_SNAPSHOT)
        chain = ScoringChain(online=online, timeout_s=c.inference_model_timeout_ms / 1000,
                             cooldown_s=c.inference_model_cooldown_s)
        cache = ResponseCache.from_url(e.redis_url, c.inference_cache_ttl_s) if c.inference_cache_ttl_s else None
        store = OnlineStore(e.redis_url, timeout_s=c.inference_redis_timeout_ms / 1000)
        stage = InferenceStage(store, slot, max_batch=c.inference_max_batch, threshold=c.decision_threshold,
                               chain=chain, cache=cache, audit_vectors=c.audit_vectors)
        # a weir.scoring message carries up to batch_max_size payments: the runner gathers messages (8 per consume
        # call) until they hold one inference batch or the inference max wait passed
        self._run(stage, hot=True, max_batch=8, max_wait_ms=c.inference_max_wait_ms)
        watch = ModelWatchStage(slot, canary_fraction=c.canary_fraction, backend=c.inference_backend)
        self._run(watch, group_id=f"{c.group_prefix}-model-watch-{time.time_ns()}", max_wait_ms=200)
        self.stages["slot"] = slot

    def _run(self, stage: Stage, *, hot: bool = False, group_id: str | None = None, max_batch: int | None = None,
             max_wait_ms: int | None = None) -> None:
        """Start ``stage`` on a runner. Hot-path stages (ingest, features, inference) use the
        configured batch wait (unless given) and fetch wait; the others fetch lazily (100 ms), sparing the broker."""
        c = self.config
        runner = BatchRunner(
            stage, self.endpoints.kafka_bootstrap,
            group_id=group_id or f"{c.group_prefix}-{stage.step_id}",
            max_batch=max_batch or c.batch_max_size,
            max_wait_ms=(max_wait_ms or c.batch_max_wait_ms) if hot else (max_wait_ms or 100),
            fetch_wait_ms=c.fetch_wait_ms if hot else 100,
            dlq_guard=DlqGuard(c.dlq_max_ratio, c.dlq_window, c.dlq_min_events),  # one per runner: it has state
        )
        runner.start()
        self.runners[stage.step_id] = runner
        self.stages[stage.step_id] = stage

    def _start_cdc(self) -> None:
        from streams.cdc import CdcConnector

        self.cdc = CdcConnector(self.endpoints.postgres_dsn, self.endpoints.kafka_bootstrap,
                                list(self.config.cdc_tables), partitions=self.config.partitions)
        self.cdc.setup()
        thread = threading.Thread(target=self._cdc_loop, name="stage-cdc", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _cdc_loop(self) -> None:
        try:
            self.cdc.run(self._stop)
        except BaseException as exc:
            self.stages["cdc_error"] = exc
            log.exception("CDC connector stopped")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every runner has joined its group and holds partitions (or raise)."""
        deadline = time.monotonic() + timeout
        for name, runner in self.runners.items():
            while not runner.ready.wait(0.2):
                self.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"stage {name} got no partitions within {timeout:.0f}s")

    def check(self) -> None:
        """Raise the first error a stage stopped with (the process should then stop)."""
        for name, runner in self.runners.items():
            if runner.error is not None:
                raise RuntimeError(f"stage {name} failed: {runner.error!r}") from runner.error
        if "cdc_error" in self.stages:
            raise RuntimeError(f"CDC connector failed: {self.stages['cdc_error']!r}")

    def stop(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.stop()
        for runner in self.runners.values():
            runner._stop.set()
        for runner in self.runners.values():
            runner.stop()
        for thread in self._threads:
            thread.join(30)
        if "retrain" in self.stages:
            self.stages["retrain"].close()
        if "inference" in self.stages:
            self.stages["inference"].close()
        if self.cdc is not None:
            self.cdc.close()
        if self.ch is not None:
            self.ch.close()

    def stats(self) -> dict[str, Any]:
        return {name: vars(r.stats) for name, r in self.runners.items()}
