"""`weir replay`: river datasets through Kafka and Weir's progressive learner agree with river's own evaluation."""

from __future__ import annotations

import pytest

from models.online import RiverLearner
from models.progressive import CLASSIFICATION_METRICS as METRICS
from models.progressive import REGRESSION_METRICS, ProgressiveEvaluator
from streams import cli
from streams.replay import examples, replay, river_metric
from streams.stack import Endpoints

TOLERANCE = 0.001  # 0.1 percentage points


@pytest.mark.parametrize("metric", sorted(METRICS))
def test_the_evaluator_is_rivers_progressive_validation(metric: str) -> None:
    rows = examples("phishing", limit=600)
    ev = ProgressiveEvaluator(RiverLearner("hoeffding_adaptive", seed=3), metric)
    for x, y in rows:
        ev.train(x, y, ev.test(x))
    assert ev.value == river_metric(rows, "hoeffding_adaptive", metric, seed=3)


@pytest.mark.parametrize("metric", sorted(REGRESSION_METRICS))
def test_a_regressors_evaluator_is_rivers_progressive_validation(metric: str) -> None:
    from river import datasets, evaluate

    rows = list(datasets.TrumpApproval())
    ev = ProgressiveEvaluator(RiverLearner("linreg", seed=3, task="regression"), metric)
    for x, y in rows:
        ev.train(x, y, ev.test(x))
    reference = RiverLearner("linreg", seed=3, task="regression")._pipeline
    expected = evaluate.progressive_val_score(iter(rows), reference, REGRESSION_METRICS[metric]())
    assert ev.n == len(rows) and ev.value == pytest.approx(float(expected.get()), rel=1e-12)


def test_a_different_order_gives_a_different_metric() -> None:
    """The agreement below is not vacuous: the progressive metric depends on the order of the stream."""
    rows = examples("sea-drift", limit=3000)
    ev = ProgressiveEvaluator(RiverLearner("logreg"), "accuracy")
    for x, y in reversed(rows):
        ev.train(x, y, ev.test(x))
    assert abs(ev.value - river_metric(rows, "logreg", "accuracy", seed=42)) > TOLERANCE


@pytest.mark.parametrize(("dataset", "model", "metric", "limit"), [
    ("phishing", "logreg", "rocauc", None),
    ("phishing", "hoeffding_adaptive", "accuracy", None),
    ("sea-drift", "arf", "rocauc", 3000),
    ("agrawal-drift", "logreg", "logloss", None),
])
def test_replay_through_kafka_agrees_with_river(endpoints: Endpoints, dataset: str, model: str, metric: str,
                                                limit: int | None) -> None:
    result = replay(endpoints.kafka_bootstrap, dataset, model, metric=metric, limit=limit, timeout_s=240)
    assert result.examples == len(examples(dataset, limit))
    assert abs(result.weir_metric - result.river_metric) <= TOLERANCE, result
    assert 0.0 < result.river_metric


def test_the_cli_knows_the_datasets_models_and_metrics() -> None:
    args = cli.parser().parse_args(["replay", "--dataset", "phishing", "--model", "logreg", "--metric", "accuracy"])
    assert (args.dataset, args.model, args.metric, args.limit) == ("phishing", "logreg", "accuracy", None)
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["replay", "--dataset", "nope", "--model", "logreg"])
