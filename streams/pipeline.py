"""Assembles a project's stages into one process: each stage on its own :class:`BatchRunner` thread.

The stages come from the project by construction: ingest over its sources,
features over its views, and per model an inference stage (with its model
watch) and a learn stage; drift and retrain serve every model. ClickHouse's
embedded engine is single-process, so the stages that use it (sinks,
retrain, the registry) live in the process that opened it; with external
services every stage can run in a process of its own (``stages=...``) and
scale out by consumer group.
"""

from __future__ import annotations

import contextlib
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
from sinks.bronze import BronzeSink
from sinks.clickhouse import ClickHouse
from sinks.events import ClickHouseSink
from sinks.redis_store import OnlineStore
from streams.base import Stage
from streams.dedup import RedisDedup
from streams.dlq import DlqGuard
from streams.event_time import EventTimeGuard
from streams.gcpolicy import StateFreezer
from streams.kafka import cluster_metadata, partition_counts
from streams.metrics import render
from streams.project.contracts import tables
from streams.project.spec import Model, Project
from streams.pseudonymize import Pseudonymizer
from streams.recovery import StatefulStage
from streams.runtime import BatchRunner
from streams.serving.cache import ResponseCache
from streams.serving.resilience import OnlineFallback, ScoringChain, rules_for
from streams.serving.routing import ModelSlot
from streams.stack import Endpoints
from streams.stages.drift import DriftStage
from streams.stages.features import FeaturesStage
from streams.stages.inference import InferenceStage
from streams.stages.ingest import IngestStage
from streams.stages.learn import LearnStage, serving_snapshot
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
    fuse: bool = True  # inference runs on the features runner when both are in this process (see Pipeline.start)
    inference_max_batch: int = 256
    inference_max_wait_ms: int = 5
    inference_backend: str = "onnx"
    inference_model_timeout_ms: int = 500
    inference_model_cooldown_s: float = 5.0
    inference_redis_timeout_ms: int = 250
    inference_cache_ttl_s: int = 0
    canary_fraction: float = 0.1
    audit_vectors: bool = True
    drift_delta: float = 0.002
    drift_cooldown: int | None = None  # labelled outcomes between drift retrains; None: each model's retrain policy
    retrain_cron: str = "*/30 * * * *"
    seed: int = 0
    group_prefix: str = "weir"
    stages: tuple[str, ...] = ALL_STAGES
    member: tuple[int, int] | None = None  # (index, count): hot-path stages take their share without a group
    dedup_horizon_ms: int = 900_000
    max_future_ms: int = 300_000
    max_age_ms: int = 7 * 86_400_000
    allowed_lateness_ms: int = 600_000
    pseudonym_key: bytes = field(default=b"weir-dev-pseudonym-key", repr=False)
    features_checkpoint_s: float = 5.0
    learn_checkpoint_s: float = 30.0
    dlq_max_ratio: float = 0.5
    dlq_window: int = 1000
    dlq_min_events: int = 200
    dlq_pause_s: float = 30.0


def ingest_stage(project: Project, c: PipelineConfig, redis_url: str) -> IngestStage:
    """The ingest stage as a pipeline runs it: dedup in Redis, event-time limits, PII tokens."""
    dedup = RedisDedup(redis.Redis.from_url(redis_url), c.dedup_horizon_ms)
    guard = EventTimeGuard(max_future_ms=c.max_future_ms, max_age_ms=c.max_age_ms,
                           allowed_lateness_ms=c.allowed_lateness_ms)
    return IngestStage(project, c.partitions, dedup=dedup, pseudonymizer=Pseudonymizer(c.pseudonym_key),
                       event_time=guard)


def online_version(model: str) -> str:
    """The online model's version name: ``river-<name>``, or ``river-<hash>`` for a declared pipeline."""
    if "(" not in model:
        return f"river-{model}"
    return "river-" + hashlib.sha256(" ".join(model.split()).encode()).hexdigest()[:10]


@dataclass
class Pipeline:
    """Every stage of ``project`` the config asks for (``stages``), each on its runner.

    ``stages`` maps each stage's step id (``ingest``, ``features``, ``inference-<model>``,
    ``learn-<model>``, ``drift``, ``retrain``, ``sink-clickhouse``, ``sink-bronze``,
    ``model-watch-<model>``) to its stage; ``runners`` likewise to its runner, except for a stage fused
    into another's runner (inference, with features in this process: ``runners['features'].fused``)."""

    project: Project
    endpoints: Endpoints
    config: PipelineConfig
    runners: dict[str, BatchRunner] = field(default_factory=dict)
    stages: dict[str, Any] = field(default_factory=dict)
    ch: ClickHouse | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _scheduler: RetrainScheduler | None = None
    cdc: Any = None
    cdc_health: dict[str, Any] = field(default_factory=lambda: {"state": "running", "failures": 0, "error": None})
    _last_states: dict[str, str] = field(default_factory=dict)
    _metadata: Any = None  # the cluster's, read once at start (its id and the topics' partitions)

    def start(self) -> None:
        # Move everything imported so far (torch, scipy, river: ~260k objects) out of the collector's
        # reach: full collections over them took 31-38% of the features stage's time (load_tests/features.py).
        gc.collect()
        gc.freeze()
        c, e, p = self.config, self.endpoints, self.project
        wanted = set(c.stages)
        if wanted & {"sinks", "retrain"}:
            self.ch = ClickHouse.for_project(e.clickhouse_dsn, p.name)  # the project's own database
            self.ch.ensure_schema(tables(p))
        if "cdc" in wanted and e.postgres_dsn and p.cdc_sources:
            self._start_cdc()
        if "ingest" in wanted:
            self._run(ingest_stage(p, c, e.redis_url), hot=True)
        inference = {m.name: self._start_inference(m) for m in p.models} if "inference" in wanted else {}
        fused: dict[str, list[Stage]] = {}
        if "features" in wanted:
            # window state survives a crash (docs/features.md)
            snapshots = SignedSnapshots.from_url(e.redis_url, c.pseudonym_key)
            stage = FeaturesStage(p, OnlineStore(e.redis_url), snapshots=snapshots,
                                  checkpoint_every_s=c.features_checkpoint_s,
                                  after_commit_hook=StateFreezer())  # the windows: out of full GC scans
            if c.fuse:  # inference takes the scoring records in memory: one broker hop less (docs/runtime.md)
                for scorer in inference.values():
                    if scorer.topics[0] in stage.scoring_topics:
                        fused.setdefault(scorer.topics[0], []).append(scorer)
            if stage.topics:
                self._run(stage, hot=True, max_batch=16, fused=fused)  # micro-batches of up to 500 events each
        on_features = {s.step_id for stages in fused.values() for s in stages}
        for model in p.models:
            own = inference.get(model.name)
            if own is not None and own.step_id not in on_features:
                # a scoring message carries up to batch_max_size events: the runner gathers messages (8 per
                # consume call) until they hold one inference batch or the inference max wait passed
                self._run(own, hot=True, max_batch=8, max_wait_ms=c.inference_max_wait_ms)
            if "learn" in wanted:
                self._start_learn(model)
        if "drift" in wanted and p.models:
            self._run(DriftStage(p, c.drift_delta, cooldown=c.drift_cooldown))
        if "retrain" in wanted and p.models:
            assert self.ch is not None
            registry = ModelRegistry(self.ch.client, c.data_dir / "models")
            registry.ensure_schema()
            self._run(RetrainStage(self.ch, registry, p, seed=c.seed), max_wait_ms=200)
            self.stages["registry"] = registry
            self._scheduler = RetrainScheduler(e.kafka_bootstrap, self.ch, registry, p, c.retrain_cron)
            self._scheduler.start()
        if "sinks" in wanted:
            assert self.ch is not None
            self._run(ClickHouseSink(self.ch, p, self.log_id()), max_batch=5000)
            self._run(BronzeSink(self.ch, Pseudonymizer(c.pseudonym_key), p, self.log_id()), max_batch=5000)

    def _start_learn(self, model: Model) -> None:
        c = self.config
        learner = RiverLearner(model.online_learner, seed=c.seed, task=model.task)
        snaps = SignedSnapshots.from_url(self.endpoints.redis_url, c.pseudonym_key)  # the model survives a restart
        challengers = {name: (RiverLearner(spec, seed=c.seed, task=model.task), online_version(spec))
                       for name, spec in model.challengers}
        self._run(LearnStage(self.project, model, learner, online_version(model.online_learner), snapshots=snaps,
                             challengers=challengers, checkpoint_every_s=c.learn_checkpoint_s))

    def _start_inference(self, model: Model) -> InferenceStage:
        """The model's inference stage (not started: see :meth:`start`) and its model watch (started)."""
        c, e = self.config, self.endpoints
        rules = rules_for(model)
        slot = ModelSlot(rules)  # until model.events names a production version
        # read when the model fails: a hung Redis must cost it no more than it costs the features
        snapshots = SignedSnapshots.from_url(e.redis_url, c.pseudonym_key,
                                             timeout_s=c.inference_redis_timeout_ms / 1000)
        online = OnlineFallback(snapshots, serving_snapshot(model), model.feature_names)
        chain = ScoringChain(rules, online=online, timeout_s=c.inference_model_timeout_ms / 1000,
                             cooldown_s=c.inference_model_cooldown_s)
        cache = ResponseCache.from_url(e.redis_url, c.inference_cache_ttl_s) if c.inference_cache_ttl_s else None
        store = OnlineStore(e.redis_url, timeout_s=c.inference_redis_timeout_ms / 1000)
        stage = InferenceStage(self.project, model, store, slot, max_batch=c.inference_max_batch, chain=chain,
                               cache=cache, audit_vectors=c.audit_vectors)
        self.stages[stage.step_id] = stage
        watch = ModelWatchStage(model, slot, canary_fraction=c.canary_fraction, backend=c.inference_backend)
        # every partition from the start in each process: no group to join (5-23 s on the embedded broker)
        self._run(watch, group_id=f"{c.group_prefix}-{watch.step_id}-{time.time_ns()}", max_wait_ms=200,
                  member=(0, 1))
        self.stages[f"slot-{model.name}"] = slot
        return stage

    def metadata(self) -> Any:
        """The Kafka cluster's metadata as at start (read once): see :func:`streams.kafka.cluster_metadata`."""
        if self._metadata is None:
            self._metadata = cluster_metadata(self.endpoints.kafka_bootstrap)
        return self._metadata

    def log_id(self) -> str:
        """The Kafka cluster's id, which names the log that offsets are positions in (a new one at each start of
        the embedded broker): in the sinks' keys and the stateful stages' snapshots."""
        return str(self.metadata().cluster_id or "")

    def log_changed(self) -> bool:
        """Whether the Kafka cluster now answering is another one than at start (an embedded broker restarted on
        its port): this process's positions and state belong to the old one. False when it cannot tell."""
        if self._metadata is None:
            return False
        try:
            now = cluster_metadata(self.endpoints.kafka_bootstrap, timeout=5.0).cluster_id
        except Exception:  # noqa: BLE001 - unreachable now: the runners retry, this check says nothing
            return False
        return str(now or "") != self.log_id()

    def _run(self, stage: Stage, *, hot: bool = False, group_id: str | None = None, max_batch: int | None = None,
             max_wait_ms: int | None = None, member: tuple[int, int] | None = None,
             fused: dict[str, list[Stage]] | None = None) -> None:
        """Start ``stage`` on a runner. Hot-path stages (ingest, features, inference) use the
        configured batch wait (unless given) and fetch wait, and the configured ``member`` share; the others
        fetch lazily (100 ms), sparing the broker."""
        c = self.config
        if isinstance(stage, StatefulStage):
            stage.log_id = self.log_id()
            stage.layout = partition_counts(self.metadata(), stage.topics)
        runner = BatchRunner(
            stage, self.endpoints.kafka_bootstrap,
            group_id=group_id or f"{c.group_prefix}-{stage.step_id}",
            max_batch=max_batch or c.batch_max_size,
            max_wait_ms=(max_wait_ms or c.batch_max_wait_ms) if hot else (max_wait_ms or 100),
            fetch_wait_ms=c.fetch_wait_ms if hot else 100,
            dlq_guard=DlqGuard(c.dlq_max_ratio, c.dlq_window, c.dlq_min_events),  # one per runner: it has state
            guard_pause_s=c.dlq_pause_s,
            member=member or (c.member if hot else None),
            fused=fused,
        )
        runner.start()
        self.runners[stage.step_id] = runner
        self.stages[stage.step_id] = stage

    def _start_cdc(self) -> None:
        from streams.cdc import CdcConnector

        tables = [f"{s.cdc.schema}.{s.cdc.table}" for s in self.project.cdc_sources if s.cdc is not None]
        self.cdc = CdcConnector(self.endpoints.postgres_dsn, self.endpoints.kafka_bootstrap, tables,
                                partitions=self.config.partitions)
        self.cdc.setup()
        thread = threading.Thread(target=self._cdc_loop, name="stage-cdc", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _cdc_loop(self) -> None:
        """Run the connector; when PostgreSQL or Kafka fails it, set it up again after a backoff (doubling to
        30 s) and go on from the slot's confirmed position: what was not acknowledged is sent again."""
        failures = 0
        while not self._stop.is_set():
            try:
                if failures:
                    self.cdc.setup()
                    log.warning("CDC connector running again after %d failed attempt(s)", failures)
                    failures = 0
                    self.cdc_health = {"state": "running", "failures": 0, "error": None}
                self.cdc.run(self._stop)
            except Exception as exc:  # noqa: BLE001 - retried: an outage must not end the connector
                failures += 1
                self.cdc_health = {"state": "retrying", "failures": failures, "error": f"{type(exc).__name__}: {exc}"}
                delay = min(30.0, 0.5 * 2 ** (failures - 1))
                log.warning("CDC connector: attempt %d failed (%s); next in %.1f s", failures, exc, delay)
                with contextlib.suppress(Exception):  # half-open already; set up anew next attempt
                    self.cdc.close()
                self._stop.wait(delay)
            else:
                return

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every runner has joined its group and holds partitions (or raise, with the stage's last
        error if it has one)."""
        deadline = time.monotonic() + timeout
        for name, runner in self.runners.items():
            while not runner.ready.wait(0.2):
                if time.monotonic() > deadline:
                    why = f": {runner.health()['error']}" if runner.health()["error"] else ""
                    raise TimeoutError(f"stage {name} got no partitions within {timeout:.0f}s{why}")

    def health(self) -> dict[str, Any]:
        """Every stage's (and the CDC connector's) state: ``ok`` is true when each is running."""
        stages = {name: runner.health() for name, runner in self.runners.items()}
        for host, runner in self.runners.items():  # a fused stage is as well as the runner it runs on
            for name, stats in runner.fused_stats.items():
                stages[name] = {k: v for k, v in stages[host].items() if k != "fused"} | {
                    "consumed": stats.consumed, "dead_lettered": stats.dead_lettered, "runs_on": host}
        if self.cdc is not None:
            stages["cdc"] = dict(self.cdc_health)
        return {"project": self.project.name, "ok": all(h["state"] == "running" for h in stages.values()),
                "stages": stages}

    def metrics(self) -> str:
        """Every runner's counters in the Prometheus text format (:mod:`streams.metrics`)."""
        out = {}
        for name, runner in self.runners.items():
            h = runner.health()
            out[name] = (h["state"], h["retries"], runner.stats)
            out.update({fused: (h["state"], h["retries"], stats) for fused, stats in runner.fused_stats.items()})
        return render(out)

    def check(self) -> dict[str, Any]:
        """Log each stage that changed state since the last call (a failing stage is retried, a stage the DLQ
        guard tripped pauses and resumes: neither stops the others); returns :meth:`health`."""
        health = self.health()
        for name, h in health["stages"].items():
            if self._last_states.get(name) != h["state"]:
                if h["state"] in ("retrying", "stopped", "paused"):
                    log.error("stage %s is %s: %s", name, h["state"], h["error"])
                elif self._last_states.get(name) in ("retrying", "stopped", "paused"):
                    log.warning("stage %s is %s again", name, h["state"])
                self._last_states[name] = h["state"]
        return health

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
        for model in self.project.models:
            inference = self.stages.get(f"inference-{model.name}")
            if inference is not None:
                inference.close()
        if self.cdc is not None:
            self.cdc.close()
        if self.ch is not None:
            self.ch.close()

    def stats(self) -> dict[str, Any]:
        out = {name: vars(r.stats) for name, r in self.runners.items()}
        out.update({name: vars(st) for r in self.runners.values() for name, st in r.fused_stats.items()})
        return out
