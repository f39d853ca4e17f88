"""Inference: score every event of one model, micro-batched, routed, and answered even when a dependency fails.

Input: the ``weir.<project>.scoring.<source>`` micro-batches of the model's scored
source. The runner gathers messages across every assigned partition until
they hold ``PIPELINE_DEPTH`` batches of ``max_batch`` events
(``WEIR_INFERENCE_MAX_BATCH``; ``Stage.max_units``) or its max
wait passed (``WEIR_INFERENCE_MAX_WAIT_MS``: the longest an event waits for
its batch to fill); the stage pools their events and scores them in batches
of at most ``max_batch``. Per batch:

1. features: the views over the scored source come with each event; the
   others in one Redis round trip; request features from the event itself
   (:class:`~streams.serving.resilience.ServedFeatures`); Redis down gives
   last-known values or defaults, flagged ``degraded``;
2. routing: the :class:`~streams.serving.routing.ModelSet` read once (one
   version per route for the whole batch); each entity (the model's key) goes
   to the canary or the champion by a stable hash; one model run per route;
3. scoring through the response cache (when enabled) and the
   :class:`~streams.serving.resilience.ScoringChain` (model, else online learner, else rules);
4. shadows score the same batch and publish only to ``predictions.shadow.<model>``.

Model runs go to the chain's model thread; batches are pipelined (batch k's
model run overlaps batch k-1's encoding and batch k+1's feature read).

Outputs, in input order per partition: one ``predictions.<model>`` record per
event (keyed by the model's key) naming its route, model version, serving
path, decision (a binary model's) and degraded flag, with the fields the model
carries; a ``weir.scored`` batch per input partition with the served feature
vectors (the online learner's input); a
``weir.audit`` batch per input partition (ClickHouse ``prediction_audit``)
with the latency breakdown; every ``metrics_every_s`` the serving counters
to ``model.metrics``. The runner commits the input offsets only after all of
it is acknowledged.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from models.base import BatchScorer
from models.scorer import RuleScorer
from sinks.redis_store import OnlineStore
from streams import topics as T
from streams.base import Message, Produce, Stage, StepResult
from streams.codec import AvroCodec, decoded, leading_array_length
from streams.project.contracts import scoring_topic
from streams.project.spec import LabelField, Model, Project
from streams.serving.cache import ResponseCache, feature_hash
from streams.serving.resilience import (
    SERVED_BY_CACHE,
    SERVED_BY_MODEL,
    SERVED_BY_ONLINE,
    SERVED_BY_RULES,
    ScoringChain,
    ServedFeatures,
    Submitted,
    rules_for,
)
from streams.serving.routing import CANARY, CHAMPION, SHADOW, ModelSet, ModelSlot

__all__ = ["InferenceStage", "ModelSet", "ModelSlot"]

SERVED_PATHS = (SERVED_BY_MODEL, SERVED_BY_CACHE, SERVED_BY_ONLINE, SERVED_BY_RULES)
AUDIT_COLUMNS = ("event_ids", "entity_ids", "ts_ms", "queue_ms", "scores", "decisions", "model_versions", "routes",
                 "served_by", "degraded", "feature_hashes", "features")
PIPELINE_DEPTH = 4  # inference batches gathered per handle, so that their model runs overlap the stage's work


class Pending(NamedTuple):
    """An event waiting in an inference batch: its input partition, arrival time on the scoring topic, and
    the prediction's key."""

    partition: int
    arrived_ms: int
    event: dict[str, Any]
    key: str


@dataclass
class Served:
    """A batch's answers, row by row: score, serving path and version; plus the shadows' scores."""

    scores: npt.NDArray[np.float64]
    served_by: list[str]
    versions: list[str]
    routes: list[str]
    shadows: list[tuple[str, npt.NDArray[np.float64]]]

    def put(self, row: int, score: float, served_by: str, version: str) -> None:
        self.scores[row], self.served_by[row], self.versions[row] = score, served_by, version


@dataclass
class RouteRun:
    """One route's model run in a batch: its rows, those the cache did not answer (``todo``), their keys."""

    rows: list[int]
    todo: list[int]
    keys: list[str]
    run: Submitted | None


@dataclass
class Job:
    """An inference batch between its start (features read, runs submitted) and its finish (outputs)."""

    batch: list[Pending]
    X: npt.NDArray[np.float32]
    degraded: npt.NDArray[np.bool_]
    hashes: list[str]
    served: Served
    routes: list[RouteRun]
    shadows: list[Submitted]
    started_ms: float
    fetch_ms: float
    lookup_s: float


class InferenceStage(Stage):
    """Scores the events of one model of ``project`` (see the module docstring).

    ``slot`` holds the versions that serve (the rules until ``model.events`` names one); ``chain`` the
    fallbacks (by default: the model's rules); ``rename`` maps one of the project's topic names to the one
    actually used (tests run on topics of their own)."""

    def __init__(self, project: Project, model: Model, store: OnlineStore, slot: ModelSlot, *,
                 max_batch: int = 1024, chain: ScoringChain | None = None, cache: ResponseCache | None = None,
                 audit_vectors: bool = True, metrics_every_s: float = 10.0, clock: Callable[[], float] = time.time,
                 rename: dict[str, str] | None = None) -> None:
        names = rename or {}
        self.model = model
        self.step_id = f"inference-{model.name}"
        source = project.source(model.source)
        self.key_field = model.key or source.partition_key
        self.carry = tuple(n for n in model.carry if n not in (self.key_field, "event_id"))
        self.label_field = model.label.field if isinstance(model.label, LabelField) else None
        self.served = ServedFeatures(store, [(ref.view, ref.key_field) for ref in model.views],
                                     [r.compute for r in model.request])
        self.slot = slot
        self.max_batch = max_batch
        self.threshold: float | None = model.threshold if model.task == "binary" else None
        self.chain = chain or ScoringChain(rules_for(model))
        self.cache = cache
        self.audit_vectors = audit_vectors
        self.metrics_every_s = metrics_every_s
        self.clock = clock
        self.scored = 0
        self.counts: Counter[str] = Counter()  # served_by paths, routes, degraded rows, failed shadows
        self._next_metrics = clock() + metrics_every_s
        scoring = scoring_topic(project, source)
        self.topics: tuple[str, ...] = (names.get(scoring, scoring),)
        self._in = {self.topics[0]: AvroCodec(scoring)}
        own = {T.I_SCORED: T.internal(project, T.I_SCORED), T.I_AUDIT: T.internal(project, T.I_AUDIT)}
        self._out = {t: names.get(own.get(t, t), own.get(t, t))
                     for t in (model.prediction_topic, model.shadow_topic, T.I_SCORED, T.I_AUDIT, T.MODEL_METRICS)}
        self._pred = AvroCodec(model.prediction_topic)
        self._shadow = AvroCodec(model.shadow_topic)
        self._scored = AvroCodec(T.I_SCORED)
        self._audit = AvroCodec(T.I_AUDIT)
        self._metric = AvroCodec(T.MODEL_METRICS)

    def close(self) -> None:
        """Stop the model thread (after the runner stopped)."""
        self.chain.close()

    @property
    def max_units(self) -> int:
        """The runner gathers messages until they hold ``PIPELINE_DEPTH`` inference batches, or its max wait
        passed (see :attr:`streams.base.Stage.max_units`): batches pipeline only within one ``handle``."""
        return self.max_batch * PIPELINE_DEPTH

    def units(self, message: Message) -> int:
        return leading_array_length(message.value)

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        pending: list[Pending] = []
        key = self.key_field
        for msg, record in decoded(batch, self._in, result):
            pending.extend(Pending(msg.partition, msg.timestamp_ms, e, str(e.get(key) or "")) for e in record["items"])
        # pipelined: while the model thread runs batch k, this thread encodes batch k-1's outputs and reads
        # batch k+1's features (the model runtimes release the GIL); outputs stay in input order
        inflight: Job | None = None
        for start in range(0, len(pending), self.max_batch):
            job = self._start(pending[start:start + self.max_batch])
            if inflight is not None:
                self._finish(inflight, result)
            inflight = job
        if inflight is not None:
            self._finish(inflight, result)
        if self.clock() >= self._next_metrics:
            self._next_metrics = self.clock() + self.metrics_every_s
            result.produce.extend(self.metric_records())
        return result

    # --- one inference batch ---

    def _start(self, batch: list[Pending]) -> Job:
        """Read the batch's features, route it (one model set for the whole batch), answer what the cache
        can, and hand the model runs to the model thread."""
        started_ms = self.clock() * 1000
        t0 = time.perf_counter()
        X, degraded = self.served.fetch([p.event for p in batch])
        t1 = time.perf_counter()
        hashes = [feature_hash(row) for row in X]
        models = self.slot.models
        n = X.shape[0]
        served = Served(np.empty(n), [""] * n, [""] * n, [models.route(p.key) for p in batch], [])
        runs = []
        for route in (CHAMPION, CANARY):
            rows = [i for i, r in enumerate(served.routes) if r == route]
            if rows:
                runs.append(self._submit(models.serving(route), X if len(rows) == n else X[rows],
                                         [hashes[i] for i in rows], rows, served))
        shadows = [self.chain.submit(shadow, X) for shadow in models.shadows]
        return Job(batch, X, degraded, hashes, served, runs, shadows, started_ms, (t1 - t0) * 1000,
                   time.perf_counter() - t1)

    def _submit(self, model: BatchScorer, X: npt.NDArray[np.float32], hashes: list[str], rows: list[int],
                out: Served) -> RouteRun:
        """One route's run: the cache's answers go straight into ``out``; the rest is submitted."""
        todo = list(range(len(rows)))
        keys: list[str] = []
        if self.cache is not None and not isinstance(model, RuleScorer):
            keys = self.cache.keys(model.version, hashes)
            todo = []
            for j, hit in enumerate(self.cache.get(keys)):
                if hit is None:
                    todo.append(j)
                else:
                    out.put(rows[j], hit, SERVED_BY_CACHE, model.version)
        if not todo:
            return RouteRun(rows, todo, keys, None)
        return RouteRun(rows, todo, keys, self.chain.submit(model, X if len(todo) == len(rows) else X[todo]))

    def _finish(self, job: Job, result: StepResult) -> None:
        """Wait for the batch's runs (falling back where they failed), then produce its outputs."""
        served, model_s = job.served, job.lookup_s
        for route in job.routes:
            if route.run is None:
                continue
            scored = self.chain.result(route.run)
            model_s += scored.model_s
            for k, j in enumerate(route.todo):
                served.put(route.rows[j], float(scored.scores[k]), scored.served_by, scored.version)
            if self.cache is not None and route.keys and scored.served_by == SERVED_BY_MODEL:
                self.cache.put([route.keys[j] for j in route.todo], scored.scores.tolist())
        for run in job.shadows:
            shadow = self.chain.shadow(run)
            if shadow is None:
                self.counts["shadow_failed"] += len(job.batch)
            else:
                served.shadows.append((shadow.version, shadow.scores))
                model_s += shadow.model_s
        t0 = time.perf_counter()
        now_ms = int(self.clock() * 1000)
        result.produce.extend(self._outputs(job, now_ms))
        timings = {"fetch_ms": job.fetch_ms, "inference_ms": model_s * 1000,
                   "publish_ms": (time.perf_counter() - t0) * 1000}
        result.produce.extend(self._audit_batches(job, now_ms, timings))
        self.scored += len(job.batch)
        self.counts.update(served.served_by)
        self.counts.update(served.routes)
        self.counts["degraded"] += int(job.degraded.sum())

    # --- what a batch publishes ---

    def _decision(self, score: float) -> bool | None:
        return None if self.threshold is None else score >= self.threshold

    def _prediction(self, p: Pending, score: float, version: str, route: str, served_by: str,
                    degraded: bool, now_ms: int) -> dict[str, Any]:
        e = p.event
        out = {"event_id": e["event_id"], self.key_field: p.key}
        for name in self.carry:
            out[name] = e.get(name)
        out.update(score=score, model_name=self.model.name, model_version=version,
                   latency_ms=float(now_ms - e["source_ms"]), event_ts=e["ts_ms"], predicted_ts=now_ms,
                   decision=self._decision(score), threshold=self.threshold, route=route, served_by=served_by,
                   degraded=degraded)
        return out

    def _label(self, e: dict[str, Any]) -> float | None:
        if self.label_field is None:
            return None
        value = e.get(self.label_field)
        return None if value is None else float(value)

    def _outputs(self, job: Job, now_ms: int) -> list[Produce]:
        batch, X, degraded, served = job.batch, job.X, job.degraded, job.served
        produce: list[Produce] = []
        scored: dict[int, list[dict[str, Any]]] = {}
        pred_topic, shadow_topic = self._out[self.model.prediction_topic], self._out[self.model.shadow_topic]
        for i, p in enumerate(batch):
            score = float(served.scores[i])
            pred = self._prediction(p, score, served.versions[i], served.routes[i], served.served_by[i],
                                    bool(degraded[i]), now_ms)
            key = p.key.encode()
            produce.append(Produce(pred_topic, key, self._pred.encode(pred)))
            for version, scores in served.shadows:
                shadow = self._prediction(p, float(scores[i]), version, SHADOW, SERVED_BY_MODEL, bool(degraded[i]),
                                          now_ms)
                produce.append(Produce(shadow_topic, key, self._shadow.encode(shadow)))
            scored.setdefault(p.partition, []).append({
                "event_id": p.event["event_id"], "model_name": self.model.name, "entity_id": p.key,
                "ts_ms": p.event["ts_ms"], "features": X[i].tolist(), "score": score,
                "model_version": served.versions[i], "label": self._label(p.event),
            })
        topic = self._out[T.I_SCORED]
        for part, rows in scored.items():
            produce.append(Produce(topic, None, self._scored.encode({"items": rows}), partition=part))
        return produce

    def _audit_batches(self, job: Job, now_ms: int, timings: dict[str, float]) -> list[Produce]:
        """One columnar ``weir.audit`` record per input partition (arrays of primitives: cheap to encode)."""
        batch, X, degraded, served = job.batch, job.X, job.degraded, job.served
        per_part: dict[int, dict[str, Any]] = {}
        answers = [(served.scores, served.versions, served.routes, served.served_by)]
        answers += [(scores, [v] * len(batch), [SHADOW] * len(batch), [SERVED_BY_MODEL] * len(batch))
                    for v, scores in served.shadows]
        for i, (part, arrived_ms, e, key) in enumerate(batch):
            cols = per_part.get(part)
            if cols is None:
                cols = per_part[part] = {name: [] for name in AUDIT_COLUMNS} | {
                    "model_name": self.model.name, "n_features": X.shape[1], "threshold": self.threshold,
                    "predicted_ms": now_ms, **timings}
            for scores, versions, routes, paths in answers:
                score = float(scores[i])
                cols["event_ids"].append(e["event_id"])
                cols["entity_ids"].append(key)
                cols["ts_ms"].append(e["ts_ms"])
                cols["queue_ms"].append(max(0.0, job.started_ms - arrived_ms))
                cols["scores"].append(score)
                cols["decisions"].append(bool(self._decision(score)))
                cols["model_versions"].append(versions[i])
                cols["routes"].append(routes[i])
                cols["served_by"].append(paths[i])
                cols["degraded"].append(bool(degraded[i]))
                cols["feature_hashes"].append(job.hashes[i])
                if self.audit_vectors:
                    cols["features"].extend(X[i].tolist())
        topic = self._out[T.I_AUDIT]
        return [Produce(topic, None, self._audit.encode(cols), partition=part) for part, cols in per_part.items()]

    def metric_records(self) -> list[Produce]:
        """The serving counters as ``model.metrics`` records: the share of predictions per serving path and
        degraded, and the response cache's hit rate (``labels`` holds the count each share is over)."""
        now_ms = int(self.clock() * 1000)
        version = self.slot.current.version
        values: list[tuple[str, float, int]] = [
            (f"served_by_{path}", self.counts[path] / self.scored if self.scored else 0.0, self.scored)
            for path in SERVED_PATHS]
        values.append(("degraded", self.counts["degraded"] / self.scored if self.scored else 0.0, self.scored))
        if self.cache is not None:
            values.append(("cache_hit_rate", self.cache.hit_rate, self.cache.lookups))
        name = self.model.name
        return [Produce(self._out[T.MODEL_METRICS], name.encode(), self._metric.encode({
            "metric_id": f"inference:{name}:{metric}:{now_ms}", "ts": now_ms, "model_name": name,
            "model_version": version, "metric": metric, "value": value, "labels": count}))
            for metric, value, count in values]
