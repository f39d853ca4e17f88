"""A Weir project: what a team declares, as data, in one Python module.

A project names its **sources** (Kafka topics with Avro schemas, or
PostgreSQL tables streamed by CDC in the Debezium envelope), the **feature
views** computed from them (:class:`~streams.features.definitions.FeatureView`),
and its **models**: what each one scores, from which features (view features
looked up by a key of the scored event, and request features computed from
the event itself), what it learns from (a label stream joined by key, or a
field of the scored event), how it is trained, gated and served. Everything
Weir runs (ingest, features, inference, learning, drift, retraining, sinks)
is built from these objects; nothing outside the project names a field of
its use case. :mod:`streams.project.load` imports and validates a project.

The declarations are frozen dataclasses in the spirit of Feast's feature
repository and Chronon's GroupBy/Join: data, checked when loaded, with
fingerprints so that a definition cannot change under the same version.

>>> kitchen = FeatureView("kitchen", "restaurant_id", 1, source="orders", ttl_ms=7_200_000,
...                       specs=(Feature("orders_1h", Agg.COUNT, Sliding(3_600_000), "orders of the restaurant, 1 h"),))
>>> m = Model("eta", "regression", source="orders",
...           features=(ViewFeatures(kitchen), RequestFeature("distance_km", "distance_km")),
...           label=LabelStream("deliveries", key="order_id", value="minutes"))
>>> m.feature_names, m.prediction_topic, m.online_name, m.version_name(3)
(('orders_1h', 'distance_km'), 'predictions.eta', 'eta-online', 'eta-v3')
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, get_args

from models.gates import GatePolicy
from streams.features.aggregations import Agg, Hopping, Sliding, Tumbling
from streams.features.definitions import Feature, FeatureView, FirstSeen, canonical
from streams.project.expr import RowFn, compile_expr, guarded

__all__ = [
    "MLP",
    "TASKS",
    "Agg",
    "Cdc",
    "Drift",
    "Feature",
    "FeatureView",
    "FirstSeen",
    "GatePolicy",
    "Hopping",
    "LabelField",
    "LabelStream",
    "Model",
    "Project",
    "Range",
    "RequestFeature",
    "RetrainPolicy",
    "Rules",
    "Scenario",
    "ScenarioRun",
    "Sliding",
    "Source",
    "Task",
    "Tumbling",
    "ViewFeatures",
]

Task = Literal["binary", "regression"]
TASKS: tuple[str, ...] = get_args(Task)


def _fingerprint(obj: object) -> str:
    return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True).encode()).hexdigest()[:12]


# --- sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cdc:
    """The source is a PostgreSQL table, streamed by Weir's CDC connector (or Debezium) to ``cdc.<table>``
    in the Debezium envelope; the source's fields are the row's columns (the envelope's ``after``)."""

    table: str
    schema: str = "public"


@dataclass(frozen=True)
class Range:
    """A plausibility rule: ``field`` must lie within ``[low, high]`` (either bound optional, either one
    exclusive when ``low_inclusive``/``high_inclusive`` is False). A null value passes (``required``
    refuses nulls); NaN does not.

    >>> Range("amount", 0, 10, low_inclusive=False).violated(0.0), Range("amount", 0).violated(float("nan"))
    (True, True)
    """

    field: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def violated(self, value: float) -> bool:
        if math.isnan(value):  # NaN lies within no range
            return True
        low, high = self.low, self.high
        return ((low is not None and (value < low or (value == low and not self.low_inclusive)))
                or (high is not None and (value > high or (value == high and not self.high_inclusive))))

    def describe(self) -> str:
        lo = "(-inf" if self.low is None else f"{'[' if self.low_inclusive else '('}{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}{']' if self.high_inclusive else ')'}"
        return f"{lo}, {hi}"


@dataclass(frozen=True)
class Source:
    """A stream of events the project reads: a topic with Avro schemas (``<project schemas>/<topic>/v<N>.avsc``,
    subject ``<topic>-value``, every version kept) or, with ``cdc``, a table's changes.

    ``event_id`` names the field that identifies an event (the dedup key, kept end to end);
    ``event_time`` the field with its time (Avro ``timestamp-millis``, a long of epoch milliseconds, or an
    ISO-8601 string with offset, as Debezium writes ``timestamptz``; empty for a CDC source: the change's
    commit time, the envelope's ``source.ts_ms``); ``keys`` the entity key fields, the
    first of which partitions the source's internal topic (every view over the source is keyed by it).
    ``fields`` are what ingest keeps of each event (besides its id and time); ``required`` ones must be
    present and non-empty, and ``ranges`` are plausibility rules. PII stays marked in the schema
    (``"pii": true``): such fields travel as keyed tokens only.
    """

    name: str
    topic: str
    event_id: str
    keys: tuple[str, ...]
    fields: tuple[str, ...]
    event_time: str = ""
    required: tuple[str, ...] = ()
    ranges: tuple[Range, ...] = ()
    cdc: Cdc | None = None
    description: str = ""

    @property
    def partition_key(self) -> str:
        """The key that partitions the source's internal topic: every entity's events in one partition."""
        return self.keys[0]



# --- models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewFeatures:
    """Every feature of ``view`` in a model's vector, looked up by the scored event's field ``key``
    (default: the field named like the view's entity). Views over the scored source itself come with the
    event, computed as of it; the others are read from the online store as of the event's time."""

    view: FeatureView
    key: str = ""

    @property
    def key_field(self) -> str:
        return self.key or self.view.entity


@dataclass(frozen=True)
class RequestFeature:
    """A feature computed from the scored event itself: a declared expression over its fields
    (:mod:`streams.project.expr`), or a Python function of the event the project owns (``fn``; it runs in
    the hot path, once per scored event, and must return a float). ``default`` when it cannot be computed."""

    name: str
    expr: str = ""
    doc: str = ""
    default: float = 0.0
    fn: Callable[[Mapping[str, Any]], float] | None = field(default=None, compare=False)

    @cached_property
    def compute(self) -> RowFn:
        """The compiled feature: a function of one event (fields by name) giving a float."""
        if self.fn is not None:
            return guarded(self.fn, self.default)
        return compile_expr(self.expr, _AnyField(), self.default)

    def _canonical(self) -> dict[str, Any]:
        fn = "" if self.fn is None else f"{self.fn.__module__}.{self.fn.__qualname__}"
        return {"type": "RequestFeature", "name": self.name, "expr": self.expr, "default": self.default,
                "doc": self.doc, "fn": fn}


class _AnyField(frozenset[str]):
    """Every name is a field: the loader has checked the names against the source already."""

    def __contains__(self, item: object) -> bool:
        return True


@dataclass(frozen=True)
class LabelStream:
    """Labels on a stream of their own: ``source``'s field ``key`` holds the scored event's id, ``value`` the
    label (boolean for a binary model, a number for a regression). ``maturity_s``: retraining leaves out
    scored events younger than this before the newest label (their labels may not all be in yet);
    ``horizon_s``: a scored event still without its label after this much newer event time (or a label
    without its scored event) is given up."""

    source: str
    key: str
    value: str
    maturity_s: float = 0.0
    horizon_s: float = 86_400.0


@dataclass(frozen=True)
class LabelField:
    """The label is a field of the scored event itself: learnt from as soon as the event is scored."""

    field: str


@dataclass(frozen=True)
class MLP:
    """The batch trainer: a torch MLP on the model's feature vector, exported to ONNX.

    Standardization is inside the network; binary models get a sigmoid head trained with class weights
    (then calibrated back), regression models a linear head. ``window_rows``: the newest labelled events
    a retrain uses; ``min_rows``: fewer and it does not train; ``bootstrap_rows``: mature labels before
    the first model is trained."""

    hidden: tuple[int, ...] = (32, 16)
    max_epochs: int = 60
    patience: int = 6
    batch_size: int = 256
    lr: float = 3e-3
    val_fraction: float = 0.25
    window_rows: int = 4000
    min_rows: int = 300
    bootstrap_rows: int = 600

    def hyperparameters(self) -> dict[str, Any]:
        """What :func:`models.train.train_mlp` takes."""
        return {"hidden": list(self.hidden), "max_epochs": self.max_epochs, "patience": self.patience,
                "batch_size": self.batch_size, "lr": self.lr, "val_fraction": self.val_fraction}


@dataclass(frozen=True)
class Drift:
    """Which river drift detector watches each signal of a model's outcomes (docs/learning.md, "Drift"), as
    text ``Name(arguments)`` (:mod:`models.drift_detectors`): ``error`` (a binary model's absolute error, or
    whether its decision was wrong for a detector over 0/1 values; a regression's absolute error),
    ``missed_positive`` (a binary model's positives scored below the threshold, 0/1) and ``score`` (alert
    only). Empty: ``ADWIN(delta=WEIR_DRIFT_DELTA)`` for the error and the score, ``ADWIN(delta=0.05,
    clock=4)`` for the misses (positives are few: checked every 4, with a looser confidence)."""

    error: str = ""
    missed_positive: str = ""
    score: str = ""


@dataclass(frozen=True)
class RetrainPolicy:
    """When the drift stage asks for a model to be retrained, and how that run weighs the change
    (docs/learning.md, "Retraining after a drift").

    A retraining alert (the error or the miss rate went up, or a validation gap) places the change in event
    time; the request waits until ``min_new_labels`` mature labels of events at or after it are in (for a
    binary model also ``min_new_positives`` positives: a model trained on a handful of the new regime's rows
    learns little of it), and follows the previous request by at least ``cooldown_labels`` labelled outcomes.
    The run validates on the newest quarter of the rows after the change (the gates compare the candidate
    with the champion there) and trains on the rest, each row at or after the change weighed
    ``recency_weight`` times (1: not at all), so the new regime's few rows are not outvoted by the window's
    older ones. A candidate that fails its gates is not promoted: the champion keeps serving and an alert
    names the failed gates.

    ``every_labels`` (0: never) also retrains the model each time that many labelled outcomes followed the
    previous request, drift or not, carrying the latest change placed: a champion trained early (while
    windowed features were still filling, say) catches up without waiting for the wall-clock cron."""

    cooldown_labels: int = 500
    min_new_labels: int = 300
    min_new_positives: int = 10
    recency_weight: float = 3.0
    every_labels: int = 0


@dataclass(frozen=True)
class Monitor:
    """How the drift stage watches a model's inputs and score against the serving version's reference (its
    newest training rows; docs/learning.md, "Feature drift and data quality").

    Scored events fall in tumbling windows of ``window_s`` of event time, closed once an event ``grace_s``
    past their end arrives. Each closed window with at least ``min_rows`` rows of a version that has a
    reference is tested feature by feature and on the score (Evidently's default tests), and checked for
    data quality. Alerts: ``feature_drift`` when at least ``drift_share`` of the columns drifted (the
    features and the score, counted as one more column), ``data_quality`` when a feature's share of nulls reaches
    ``null_rate``, its share at its default exceeds the reference's by ``default_rate_increase``, or its
    share outside the reference's range reaches ``out_of_range_rate``. An alert is raised when a window
    crosses its threshold, not again while the same features stay past it."""

    window_s: float = 900.0
    grace_s: float = 60.0
    min_rows: int = 100
    drift_share: float = 0.5
    null_rate: float = 0.05
    default_rate_increase: float = 0.3
    out_of_range_rate: float = 0.1


@dataclass(frozen=True)
class Rules:
    """The fallback score before any model is trained (and when every model failed):
    ``sigmoid(bias + sum_i w_i * log1p(max(x_i, 0)))`` over the named features, for a binary model; for a
    regression, ``bias + sum_i w_i * x_i``."""

    weights: Mapping[str, float] = field(default_factory=dict)
    bias: float = 0.0

    def _canonical(self) -> dict[str, Any]:
        return {"type": "Rules", "weights": dict(sorted(self.weights.items())), "bias": self.bias.hex()}


@dataclass(frozen=True)
class Model:
    """A model the project serves: the events it scores, its features, its label and how it learns.

    ``source`` is the scored source; ``features`` its vector, in order (view features, then request
    features, in declaration order within each). ``online`` is the river learner that scores and learns
    every event (a name from :data:`models.online.SPECS`, or :data:`~models.online.REGRESSION_SPECS` for a
    regression, or a declared pipeline; default ``logreg`` / ``linreg``), ``challengers`` more
    online learners beside it (name -> learner). ``trainer`` builds the batch models that serve, gated by
    ``gates`` against the champion; ``threshold`` turns a binary model's score into its decision, the same
    one for inference, drift and retraining; ``drift`` names the detectors that watch its outcomes and
    ``retrain`` when a drift retrains it, ``monitor`` how its inputs and score are watched.
    ``fallback`` scores before a model exists. Predictions go to
    ``predictions`` (default ``predictions.<name>``), keyed by the scored event's field ``key`` (default the
    source's partition key; canaries are chosen by it), carrying the event's ``carry`` fields.
    """

    name: str
    task: Task
    source: str
    features: tuple[ViewFeatures | RequestFeature, ...]
    label: LabelStream | LabelField
    version: int = 1
    online: str = ""
    challengers: tuple[tuple[str, str], ...] = ()
    trainer: MLP = MLP()
    threshold: float = 0.5
    gates: GatePolicy = GatePolicy()
    drift: Drift = Drift()
    retrain: RetrainPolicy = RetrainPolicy()
    monitor: Monitor = Monitor()
    fallback: Rules = Rules()
    predictions: str = ""
    key: str = ""
    carry: tuple[str, ...] = ()
    description: str = ""

    @property
    def views(self) -> tuple[ViewFeatures, ...]:
        return tuple(f for f in self.features if isinstance(f, ViewFeatures))

    @property
    def request(self) -> tuple[RequestFeature, ...]:
        return tuple(f for f in self.features if isinstance(f, RequestFeature))

    @property
    def maturity_ms(self) -> int:
        """How much younger than the newest label an event may be and still count as labelled for training (its
        label stream's ``maturity_s``; a label field is mature at once)."""
        return int(self.label.maturity_s * 1000) if isinstance(self.label, LabelStream) else 0

    @property
    def online_learner(self) -> str:
        """The online learner's spec: the declared one, else the task's default."""
        from models.online import default_learner

        return self.online or default_learner(self.task)

    @property
    def metric(self) -> str:
        """The progressive metric the online learner and the champion are measured by (ROC AUC or MAE)."""
        return "rocauc" if self.task == "binary" else "mae"

    @cached_property
    def feature_defaults(self) -> tuple[float, ...]:
        """Each feature's value when it cannot be computed (an empty window, a failed expression), in
        :attr:`feature_names` order."""
        return tuple(float(s.default) for v in self.views for s in v.view.specs) + tuple(
            float(r.default) for r in self.request)

    @cached_property
    def feature_names(self) -> tuple[str, ...]:
        """The model's input vector, in order: every view's features, then the request features."""
        return tuple(n for v in self.views for n in v.view.features) + tuple(r.name for r in self.request)

    @property
    def prediction_topic(self) -> str:
        return self.predictions or f"predictions.{self.name}"

    @property
    def online_topic(self) -> str:
        """Where the online learner (and its challengers) publish their predictions."""
        return f"{self.prediction_topic}.online"

    @property
    def shadow_topic(self) -> str:
        """Where shadow versions publish their predictions (nothing else reads it as served)."""
        return f"predictions.shadow.{self.name}"

    @property
    def online_name(self) -> str:
        """The model name the online learner's predictions and metrics carry."""
        return f"{self.name}-online"

    def version_name(self, version: int) -> str:
        """How predictions name a registered version of this model."""
        return f"{self.name}-v{version}"

    @property
    def fingerprint(self) -> str:
        """SHA-256 (12 hex digits) of what a trained version of the model depends on: its name, task, scored
        source, features (views with their whole definitions, request features) and label. Changing any of
        them needs a new ``version`` (``weir plan`` refuses it otherwise); the rest (learners, trainer,
        threshold, gates, drift, retrain policy, monitor, fallback, topics) may change without one."""
        return _fingerprint({"name": self.name, "task": self.task, "source": self.source,
                             "features": self.features, "label": self.label})

    @property
    def definition(self) -> str:
        """``v<version>@<fingerprint>``: recorded in every trained version's lineage; only versions trained for
        the current definition serve."""
        return f"v{self.version}@{self.fingerprint}"


# --- the demo hook --------------------------------------------------------------------------------


@dataclass
class ScenarioRun:
    """What a scenario produced: the scored events (``requests``) and labels Weir must see through, the
    event and wall time its injected change began (if any), and figures of its own for the summary."""

    events: int
    requests: int
    labels: int
    shift_event_ms: int | None = None
    shift_wall_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Scenario(Protocol):
    """A project's event generator for ``weir demo``: writes its events where its sources read them.

    ``reset`` forgets what a previous run left in the scenario's own systems (called only when Weir's
    Kafka is the embedded, in-memory one); ``prepare`` creates what the sources need (tables, topics);
    ``run`` writes ``events`` events (``rate`` per second, None: as fast as possible; the injected change,
    if the scenario has one, after the fraction ``shift_at`` of them; the first at event time ``start``),
    calls ``progress`` with the number written so far, and returns once every one is durable. ``params``
    are the scenario's own knobs (``weir demo --param name=value``); an unknown one raises ``ValueError``.
    ``events_per_hour`` is how much event time its events span and ``tail_s`` how far past the last of them
    its final events may lie (labels that come later than what they label), so that a run can end before
    the wall clock (ingest refuses events from the future)."""

    events_per_hour: float
    tail_s: float

    def reset(self, postgres_dsn: str) -> None: ...

    def prepare(self, postgres_dsn: str, bootstrap: str, partitions: int) -> None: ...

    def run(self, postgres_dsn: str, bootstrap: str, *, events: int, rate: float | None, seed: int,
            shift_at: float, start: datetime, progress: Callable[[int], None],
            params: Mapping[str, str] | None = None) -> ScenarioRun: ...


# --- the project ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Project:
    """Everything a team declares: sources, feature views and models, plus an optional demo scenario.

    ``schemas`` is the folder with the project's topic schemas, one folder per topic (TopicNameStrategy:
    ``<topic>/v1.avsc``, ``v2.avsc``, … and an optional ``compatibility`` file, BACKWARD by default):
    every source topic's, and a model's prediction topic's when it declares one (else Weir's generic
    prediction schema serves)."""

    name: str
    schemas: Path
    sources: tuple[Source, ...]
    views: tuple[FeatureView, ...] = ()
    models: tuple[Model, ...] = ()
    description: str = ""
    scenario: Scenario | None = field(default=None, compare=False)

    def source(self, name: str) -> Source:
        return _named(self.sources, "source", name, self.name)

    def model(self, name: str) -> Model:
        return _named(self.models, "model", name, self.name)

    def view(self, name: str) -> FeatureView:
        return _named(self.views, "feature view", name, self.name)

    def source_of_topic(self, topic: str) -> Source | None:
        return next((s for s in self.sources if s.topic == topic), None)

    @property
    def cdc_sources(self) -> tuple[Source, ...]:
        return tuple(s for s in self.sources if s.cdc is not None)

    def public_topics(self) -> list[str]:
        """The project's public topics: every source's, every model's predictions, online and shadow ones."""
        out = [s.topic for s in self.sources]
        for m in self.models:
            out += [m.prediction_topic, m.online_topic, m.shadow_topic]
        return list(dict.fromkeys(out))

    def objects(self) -> Iterator[tuple[str, object]]:
        """Every declared object with a name for messages (``source orders``, ``view kitchen``, ``model eta``)."""
        for s in self.sources:
            yield f"source {s.name}", s
        for v in self.views:
            yield f"view {v.name}", v
        for m in self.models:
            yield f"model {m.name}", m


N = TypeVar("N", Source, Model, FeatureView)


def _named(items: tuple[N, ...], kind: str, name: str, project: str) -> N:
    """The item called ``name``; ``KeyError`` naming the project and the known names otherwise."""
    for item in items:
        if item.name == name:
            return item
    raise KeyError(f"project {project}: no {kind} named {name!r} ({kind}s: {', '.join(i.name for i in items)})")
