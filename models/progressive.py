"""Progressive (test-then-train) evaluation of an online learner, exactly as river computes it.

Each example is first *tested* (the learner predicts it) and later *trained*
(its label arrives: the metric is updated with the prediction made at test
time, then the learner learns the example). With the label right after the
test this is :func:`river.evaluate.progressive_val_score`; with delayed labels
it is river's delayed progressive validation, the prediction being the one
made when the example was served. The rules follow river 0.26's
``_progressive_validation``: for a classifier, metrics that need labels
(accuracy, F1) get ``predict_one`` (the most probable class), the others (ROC
AUC, log loss) get ``predict_proba_one``; an empty prediction (a model that
knows no class yet) updates no metric. A regressor's metrics (MAE, RMSE) get
``predict_one``.

>>> from models.online import RiverLearner
>>> ev = ProgressiveEvaluator(RiverLearner("logreg"), "accuracy")
>>> for i in range(100):
...     x = {"a": float(i % 2)}
...     ev.train(x, bool(i % 2), ev.test(x))
>>> ev.n, round(ev.value, 2)
(100, 0.99)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from river import metrics

from models.online import RiverLearner

__all__ = ["CLASSIFICATION_METRICS", "METRICS", "REGRESSION_METRICS", "Prediction", "ProgressiveEvaluator"]

CLASSIFICATION_METRICS: dict[str, Callable[[], metrics.base.Metric]] = {
    "accuracy": metrics.Accuracy,
    "rocauc": metrics.ROCAUC,
    "logloss": metrics.LogLoss,
    "f1": metrics.F1,
}
REGRESSION_METRICS: dict[str, Callable[[], metrics.base.Metric]] = {
    "mae": metrics.MAE,
    "rmse": metrics.RMSE,
}
METRICS = CLASSIFICATION_METRICS | REGRESSION_METRICS
"""Metric names the learn stage (and ``weir replay``, the classification ones) accept, and the river metric each
one is."""

Prediction = dict[Any, float] | Any  # what the metric is updated with: a proba dict, or a label


class ProgressiveEvaluator:
    """Test-then-train evaluation of one :class:`RiverLearner` under one metric (see the module docstring)."""

    def __init__(self, learner: RiverLearner, metric: str) -> None:
        allowed = REGRESSION_METRICS if learner.task == "regression" else CLASSIFICATION_METRICS
        if metric not in allowed:
            raise ValueError(f"unknown metric {metric!r} for a {learner.task} learner; choose one of {sorted(allowed)}")
        self.learner = learner
        self.metric_name = metric
        self.metric = METRICS[metric]()
        self._by_label = bool(getattr(self.metric, "requires_labels", True))
        self.n = 0  # examples the metric was updated with

    def test(self, x: dict[str, Any]) -> Prediction:
        """The prediction the metric will be updated with when ``x`` 's label arrives."""
        if self.learner.task == "regression":
            return self.learner.score(x)
        return self.prediction(self.learner.predict_proba_dict(x))

    def prediction(self, proba: dict[Any, float]) -> Prediction:
        """What the metric is updated with, from the learner's class probabilities (river's rule)."""
        if not self._by_label:
            return proba
        return max(proba, key=proba.__getitem__) if proba else None

    def train(self, x: dict[str, Any], y: Any, prediction: Prediction) -> None:
        """Update the metric with the test-time ``prediction``, then learn ``(x, y)``."""
        if prediction is not None and prediction != {}:
            self.metric.update(y, prediction)
            self.n += 1
        self.learner.learn_raw(x, y)

    @property
    def value(self) -> float:
        return float(self.metric.get())
