"""``weir replay``: a river dataset through Kafka and Weir's progressive learner, beside river's own evaluation.

It proves the learn path is faithful to river: each example of the dataset is
produced, in order, as one Avro record to the single-partition topic
``weir.replay``; a :class:`~streams.runtime.BatchRunner` runs
:class:`ReplayLearnStage`, which tests then trains the model with the same
:class:`~models.progressive.ProgressiveEvaluator` the learn stage uses; and
``river.evaluate.progressive_val_score`` runs the same model (same name,
hyperparameters and seed) on the same examples in the same order. The two
metrics are printed side by side; the last line is JSON with ``weir_metric``
and ``river_metric``.

Avro map keys are strings, so feature names are replayed as strings (river's
synthetic streams key features by position, ``0``, ``1``, …); river's run gets
the same string keys, so both models see identical inputs.

Run: ``.venv/bin/weir replay --dataset phishing --model logreg [--metric rocauc]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer
from river import datasets, evaluate
from river.datasets import synth

from models.online import SPECS, RiverLearner
from models.progressive import CLASSIFICATION_METRICS as METRICS
from models.progressive import ProgressiveEvaluator
from streams import topics as T
from streams.base import Message, Stage, StepResult
from streams.codec import AvroCodec, decoded
from streams.kafka import ensure_topics, producer_config
from streams.runtime import BatchRunner

log = logging.getLogger(__name__)

Example = tuple[dict[str, Any], Any]


def _phishing() -> Iterable[tuple[dict[Any, Any], Any]]:
    return datasets.Phishing()


def _sea_drift() -> Iterable[tuple[dict[Any, Any], Any]]:
    """SEA concepts 0 → 3 (abrupt-ish: a 200-example sigmoid) at example 2,500 of 5,000, with 10 % label noise."""
    stream = synth.ConceptDriftStream(stream=synth.SEA(seed=42, variant=0, noise=0.1),
                                      drift_stream=synth.SEA(seed=42, variant=3, noise=0.1),
                                      seed=1, position=2500, width=200)
    rows: Iterable[tuple[dict[Any, Any], Any]] = stream.take(5000)
    return rows


def _agrawal_drift() -> Iterable[tuple[dict[Any, Any], Any]]:
    """Agrawal classification function 0 → 2 at example 3,000 of 6,000 (a 500-example transition)."""
    stream = synth.ConceptDriftStream(stream=synth.Agrawal(classification_function=0, seed=7),
                                      drift_stream=synth.Agrawal(classification_function=2, seed=7),
                                      seed=3, position=3000, width=500)
    rows: Iterable[tuple[dict[Any, Any], Any]] = stream.take(6000)
    return rows


DATASETS: dict[str, Callable[[], Iterable[tuple[dict[Any, Any], Any]]]] = {
    "phishing": _phishing,
    "sea-drift": _sea_drift,
    "agrawal-drift": _agrawal_drift,
}
"""Datasets ``weir replay`` knows: river's bundled ``Phishing`` and two drifting synthetic streams."""


def examples(dataset: str, limit: int | None = None) -> list[Example]:
    """The dataset's examples, in order, feature names as strings (as Avro maps carry them)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    rows = itertools.islice(DATASETS[dataset](), limit)
    return [({str(k): float(v) for k, v in x.items()}, y) for x, y in rows]


def river_metric(rows: list[Example], model: str, metric: str, seed: int) -> float:
    """What river's own ``progressive_val_score`` gives for the same model on ``rows``."""
    pipeline = RiverLearner(model, seed=seed)._pipeline
    result = evaluate.progressive_val_score(iter(rows), pipeline, METRICS[metric]())  # type: ignore[arg-type]
    return float(result.get())


class ReplayStage(Stage):
    """Applies each ``weir.replay`` record of one run, in log order (:meth:`apply`); ``next_seq`` counts them."""

    topics = (T.REPLAY,)

    def __init__(self, run: str) -> None:
        self.run = run
        self.next_seq = 0
        self._codecs = {T.REPLAY: AvroCodec(T.REPLAY)}

    def apply(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        for _, record in decoded(batch, self._codecs, result):
            if record["run"] != self.run:
                continue  # an earlier run's records, still in the topic
            if record["seq"] != self.next_seq:
                raise RuntimeError(f"replay {self.run}: record {record['seq']} arrived, {self.next_seq} expected")
            self.apply(record)
            self.next_seq += 1
        return result

    def run_through(self, bootstrap: str, total: int, *, timeout_s: float,
                    progress: Callable[[int], None] | None = None) -> None:
        """Run this stage on the one partition of ``weir.replay`` (taken without a group: no join to wait
        for) until it has applied ``total`` records; ``progress`` is called with the count now and then."""
        runner = BatchRunner(self, bootstrap, group_id=f"weir-replay-{self.run}", max_batch=500, member=(0, 1))
        runner.start()
        try:
            deadline = time.monotonic() + timeout_s
            while self.next_seq < total:
                if runner.error is not None:
                    raise RuntimeError(f"replay stage failed: {runner.error!r}") from runner.error
                if time.monotonic() > deadline:
                    raise TimeoutError(f"replay: {self.next_seq} of {total} records in {timeout_s:.0f} s")
                if progress is not None:
                    progress(self.next_seq)
                time.sleep(0.05)
        finally:
            runner.stop()


class ReplayLearnStage(ReplayStage):
    """Tests then trains one learner on each ``weir.replay`` record of one run, in log order."""

    step_id = "replay-learn"

    def __init__(self, run: str, evaluator: ProgressiveEvaluator) -> None:
        super().__init__(run)
        self.evaluator = evaluator

    def apply(self, record: dict[str, Any]) -> None:
        x, y = record["x"], record["y"]
        self.evaluator.train(x, y, self.evaluator.test(x))


@dataclass(frozen=True)
class ReplayResult:
    dataset: str
    model: str
    metric: str
    examples: int
    weir_metric: float
    river_metric: float
    seconds: float

    def as_json(self) -> str:
        return json.dumps({"dataset": self.dataset, "model": self.model, "metric": self.metric,
                           "examples": self.examples, "weir_metric": self.weir_metric,
                           "river_metric": self.river_metric, "difference_pp": 100 * (self.weir_metric - self.river_metric),
                           "seconds": round(self.seconds, 2)})


def produce_replay(bootstrap: str, run: str, rows: Iterable[Example]) -> None:
    """Produce ``rows`` in order to the one partition of ``weir.replay`` as the records of ``run``."""
    ensure_topics(bootstrap, [T.REPLAY], 1)  # one partition: the rows' order is the log's order
    codec = AvroCodec(T.REPLAY)
    producer = Producer(producer_config(bootstrap, **{"linger.ms": 20}))
    for seq, (x, y) in enumerate(rows):
        producer.produce(T.REPLAY, codec.encode({"run": run, "seq": seq, "x": x, "y": y}), partition=0)
        if seq % 1000 == 0:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("replay: the broker did not acknowledge every example")


def replay(bootstrap: str, dataset: str, model: str, *, metric: str = "rocauc", seed: int = 42,
           limit: int | None = None, timeout_s: float = 300.0, progress: Callable[[str], None] | None = None
           ) -> ReplayResult:
    """Replay ``dataset`` through Kafka and the learner; compare with river (see the module docstring)."""
    if model not in SPECS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(SPECS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    t0 = time.monotonic()
    rows = examples(dataset, limit)
    run = uuid.uuid4().hex
    produce_replay(bootstrap, run, rows)
    stage = ReplayLearnStage(run, ProgressiveEvaluator(RiverLearner(model, seed=seed), metric))
    shown = [0]

    def show(done: int) -> None:
        if progress is not None and done - shown[0] >= 1000:
            shown[0] = done
            progress(f"  {done:,} / {len(rows):,} examples, progressive {metric} {stage.evaluator.value:.4f}")

    stage.run_through(bootstrap, len(rows), timeout_s=timeout_s, progress=show)
    return ReplayResult(dataset, model, metric, len(rows), stage.evaluator.value,
                        river_metric(rows, model, metric, seed), time.monotonic() - t0)


def _run(args: argparse.Namespace) -> int:
    from streams.settings import WeirSettings
    from streams.stack import Stack

    settings = WeirSettings()
    with Stack(settings, with_postgres=False) as endpoints:
        print(f"replaying {args.dataset} through Kafka and the {args.model} learner ...", flush=True)
        result = replay(endpoints.kafka_bootstrap, args.dataset, args.model, metric=args.metric, seed=args.seed,
                        limit=args.limit, progress=lambda line: print(line, flush=True))
    print(f"{result.examples:,} examples, progressive {result.metric}: weir {result.weir_metric:.6f}, "
          f"river {result.river_metric:.6f} (difference {100 * (result.weir_metric - result.river_metric):+.4f} "
          f"percentage points), {result.seconds:.1f} s")
    print(result.as_json())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("replay", help="stream a river dataset through Kafka and the learner; compare with river")
    p.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    p.add_argument("--model", required=True, choices=sorted(SPECS))
    p.add_argument("--metric", default="rocauc", choices=sorted(METRICS))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--limit", type=int, default=None, help="replay only the first N examples")
    p.set_defaults(handler=_run)
