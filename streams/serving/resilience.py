"""Inference keeps answering when a dependency fails.

* :class:`Breaker`: after a failure, a dependency is skipped for a cool-down,
  then tried again (one probe); the first success closes it. Recovery is
  automatic and logged once per outage.
* :class:`ServedFeatures`: the batch's feature matrix in one Redis round trip;
  when Redis fails or its breaker is open, each missing view comes from the
  entity's last-known values (kept in a bounded map) or the view's defaults,
  and the row is flagged ``degraded``. Never a stall: the store's socket
  timeout bounds a hung Redis, and the breaker stops paying it per batch.
* :class:`ScoringChain`: the routed model, run with a timeout; when it raises,
  times out or returns non-finite scores, the online learner's score (its
  newest signed snapshot, :class:`OnlineFallback`); without one, the rule
  score. Every prediction names the path that served it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import redis

from models.base import BatchScorer, InvalidModelInput
from models.scorer import RuleScorer
from sinks.redis_store import OnlineStore
from streams.features.definitions import FeatureView, view_key
from streams.project.expr import RowFn
from streams.project.spec import Model
from streams.state import SignedSnapshots, StateError

__all__ = [
    "SERVED_BY_CACHE",
    "SERVED_BY_MODEL",
    "SERVED_BY_ONLINE",
    "SERVED_BY_RULES",
    "Breaker",
    "OnlineFallback",
    "OnlineScorer",
    "Scored",
    "ScoringChain",
    "ServedFeatures",
    "Submitted",
    "rules_for",
]

log = logging.getLogger(__name__)

R = TypeVar("R")

SERVED_BY_MODEL = "model"
SERVED_BY_CACHE = "cache"
SERVED_BY_ONLINE = "online"
SERVED_BY_RULES = "rules"


class Breaker:
    """A circuit breaker: ``allow()`` is False for ``cooldown_s`` after a failure, then lets one probe through."""

    def __init__(self, name: str, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.failures = 0
        self.outages = 0
        self._open_until: float | None = None

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def allow(self) -> bool:
        return self._open_until is None or self.clock() >= self._open_until

    def failed(self, why: object) -> None:
        self.failures += 1
        if self._open_until is None:
            self.outages += 1
            log.warning("%s failed (%s): falling back; retried every %.1f s", self.name, why, self.cooldown_s)
        self._open_until = self.clock() + self.cooldown_s

    def succeeded(self) -> None:
        if self._open_until is not None:
            log.warning("%s recovered", self.name)
            self._open_until = None

    def attempt(self, call: Callable[[], R]) -> R | None:
        """``call()`` unless the breaker is open; None when it is open or the call raised a Redis error
        (counted as a failure)."""
        if not self.allow():
            return None
        try:
            value = call()
        except redis.RedisError as exc:
            self.failed(type(exc).__name__)
            return None
        self.succeeded()
        return value


class ServedFeatures:
    """The served feature matrix of a batch of scored events, degraded rather than stalled when Redis fails.

    ``views`` are the model's views with the event field holding each one's entity id, in vector order;
    ``request`` its request features (functions of the event), after them. A view whose values the
    features stage attached to the event (``served``) is taken from there; the others are read from the
    online store as of the event's time, in one ``MGET`` for the whole batch.
    """

    def __init__(self, store: OnlineStore, views: Sequence[tuple[FeatureView, str]], request: Sequence[RowFn] = (),
                 *, breaker: Breaker | None = None, last_known_limit: int = 200_000) -> None:
        self.store = store
        self.views = tuple(views)
        self.request = tuple(request)
        self.width = sum(len(v.features) for v, _ in self.views) + len(self.request)
        self.breaker = breaker or Breaker("online feature store (Redis)")
        self.last_known: dict[tuple[str, str], list[float]] = {}
        self.last_known_limit = last_known_limit

    def fetch(self, events: Sequence[dict[str, Any]]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """``(X, degraded)``: X is ``(n, width)`` float32 (the model's vector), ``degraded[i]`` marks row i
        served without the online store. An event without a view's key gets the view's defaults."""
        parts: list[list[list[float] | None]] = []
        requests: list[tuple[FeatureView, str]] = []
        slots: list[tuple[int, int]] = []
        as_of: list[int] = []
        for i, p in enumerate(events):
            served = p.get("served") or {}
            row: list[list[float] | None] = []
            for j, (view, field) in enumerate(self.views):
                values = served.get(view_key(view))
                if values is None or len(values) != len(view.features):
                    entity = p.get(field)
                    if entity is None:
                        values = view.defaults
                    else:
                        requests.append((view, str(entity)))
                        slots.append((i, j))
                        as_of.append(p["ts_ms"])
                row.append(values)
            parts.append(row)
        degraded = np.zeros(len(events), dtype=np.bool_)
        got = self._read(requests, as_of)
        if got is None:
            for (i, j), (view, entity) in zip(slots, requests, strict=True):
                parts[i][j] = self.last_known.get((view_key(view), entity), view.defaults)
                degraded[i] = True
        else:
            for (i, j), (view, entity), values in zip(slots, requests, got, strict=True):
                parts[i][j] = values
                self._remember(view_key(view), entity, values)
        request = self.request
        rows = [[x for values in row for x in values or ()] + [f(p) for f in request]
                for row, p in zip(parts, events, strict=True)]
        return np.asarray(rows, dtype=np.float32).reshape(len(events), self.width), degraded

    def _read(self, requests: list[tuple[FeatureView, str]], as_of: list[int]) -> list[list[float]] | None:
        if not requests:
            return []
        stored = self.breaker.attempt(lambda: self.store.read(requests, as_of=as_of))
        return None if stored is None else [s.values for s in stored]

    def _remember(self, view: str, entity: str, values: list[float]) -> None:
        if len(self.last_known) >= self.last_known_limit:
            del self.last_known[next(iter(self.last_known))]  # the oldest entry (insertion order)
        self.last_known[(view, entity)] = values


class OnlineScorer:
    """A river learner as a :class:`BatchScorer` (a frozen copy: it does not learn here); ``names`` are
    the model's feature names, in vector order."""

    def __init__(self, learner: Any, version: str, names: Sequence[str]) -> None:
        self.learner = learner
        self.version = version
        self.names = tuple(names)

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        names = self.names
        return np.asarray(self.learner.predict_many(dict(zip(names, map(float, row))) for row in X),
                          dtype=np.float64)


class OnlineFallback:
    """The learn stage's newest online model, read from its signed serving snapshot when needed.

    Loaded lazily (the first time the chain falls back) and refreshed at most every
    ``refresh_s``; a Redis or signature failure keeps the copy already held (or none).
    ``features`` are the model's feature names, in vector order."""

    def __init__(self, snapshots: SignedSnapshots, name: str, features: Sequence[str], *, refresh_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.snapshots = snapshots
        self.name = name
        self.features = tuple(features)
        self.refresh_s = refresh_s
        self.clock = clock
        self._scorer: OnlineScorer | None = None
        self._next_refresh = 0.0

    def scorer(self) -> OnlineScorer | None:
        if self.clock() >= self._next_refresh:
            self._next_refresh = self.clock() + self.refresh_s
            try:
                state = self.snapshots.load(self.name)
            except (redis.RedisError, StateError) as exc:
                log.warning("online fallback: snapshot %s not loaded (%s)", self.name, type(exc).__name__)
            else:
                if isinstance(state, dict) and "learner" in state:
                    self._scorer = OnlineScorer(state["learner"], str(state["version"]), self.features)
        return self._scorer


@dataclass(frozen=True, slots=True)
class Scored:
    scores: npt.NDArray[np.float64]
    served_by: str
    version: str
    model_s: float = 0.0  # the model run's own time, as the model thread measured it


class _Worker:
    """One daemon thread running model calls in order, so the stage's thread can prepare and encode other
    batches meanwhile (onnxruntime and torch release the GIL) and can give up on a call after a timeout (a
    hung call keeps its thread; a new worker takes over; daemon threads never block exit)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any] | None]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="inference-model", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if fut is None:  # stop()
                return
            started = time.perf_counter()
            try:
                value = fn()
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result((value, time.perf_counter() - started))

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """The future of ``(fn(), seconds it took)``."""
        fut: Future[Any] = Future()
        self._jobs.put((fn, fut))
        return fut

    def stop(self) -> None:
        """End the thread once the runs already submitted are done."""
        self._jobs.put((lambda: None, None))


@dataclass
class Submitted:
    """A model run handed to the model thread (``future`` None: the model is skipped, see :class:`Breaker`)."""

    model: BatchScorer
    X: npt.NDArray[np.float32]
    future: Future[Any] | None
    done: Scored | None = None


class ScoringChain:
    """Scores a batch with the routed model; on failure or timeout, the online learner; else the rules.

    ``submit`` hands the run to the model thread and returns at once; ``result`` waits for it (at most
    ``timeout_s``) and falls back when it failed. One :class:`Breaker` per model version: a failed version
    is skipped for ``cooldown_s``, then probed.
    """

    def __init__(self, rules: BatchScorer, online: OnlineFallback | None = None, *,
                 timeout_s: float = 0.5, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rules = rules
        self.online = online
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.breakers: dict[str, Breaker] = {}
        self._worker = _Worker()

    def close(self) -> None:
        self._worker.stop()

    def submit(self, model: BatchScorer, X: npt.NDArray[np.float32]) -> Submitted:
        if isinstance(model, RuleScorer):
            return Submitted(model, X, None, Scored(model.predict(X), SERVED_BY_RULES, model.version))
        if not self._breaker(model.version).allow():
            return Submitted(model, X, None)
        return Submitted(model, X, self._worker.submit(lambda: model.predict(X)))

    def result(self, run: Submitted) -> Scored:
        if run.done is not None:
            return run.done
        scored = self._wait(run)
        return scored if scored is not None else self.fallback(run.X)

    def shadow(self, run: Submitted) -> Scored | None:
        """A shadow's scores, or None when it failed (a shadow serves nobody: no fallback)."""
        return self._wait(run)

    def _wait(self, run: Submitted) -> Scored | None:
        if run.future is None:
            return None
        breaker = self._breaker(run.model.version)
        try:
            value, seconds = run.future.result(self.timeout_s)
            scores = np.asarray(value, dtype=np.float64)
            if scores.shape != (run.X.shape[0],) or not np.all(np.isfinite(scores)):
                raise InvalidModelInput(f"model returned shape {scores.shape} or non-finite scores for "
                                        f"{run.X.shape[0]} rows")
        except TimeoutError:
            self._worker = _Worker()  # the hung call keeps the old thread; later calls get a fresh one
            breaker.failed(f"no answer within {self.timeout_s * 1000:.0f} ms")
            return None
        except Exception as exc:  # any model failure: the request is still answered
            breaker.failed(_why(exc))
            return None
        breaker.succeeded()
        return Scored(scores, SERVED_BY_MODEL, run.model.version, seconds)

    def _breaker(self, version: str) -> Breaker:
        if version not in self.breakers:
            self.breakers[version] = Breaker(f"model {version}", self.cooldown_s, self.clock)
        return self.breakers[version]

    def fallback(self, X: npt.NDArray[np.float32]) -> Scored:
        online = self.online.scorer() if self.online is not None else None
        if online is not None:
            try:
                scores = online.predict(X)
                if np.all(np.isfinite(scores)):  # a binary learner's scores are probabilities already
                    return Scored(scores, SERVED_BY_ONLINE, online.version)
            except Exception as exc:  # a broken snapshot must not take the last resort with it
                log.warning("online fallback failed (%s): rule score", _why(exc))
        return Scored(self.rules.predict(X), SERVED_BY_RULES, self.rules.version)


def rules_for(model: Model) -> RuleScorer:
    """The rule scorer a model declares as its fallback (:class:`~streams.project.spec.Rules`)."""
    return RuleScorer(model.feature_names, weights=dict(model.fallback.weights), bias=model.fallback.bias,
                      link="logistic" if model.task == "binary" else "identity")


def _why(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__

