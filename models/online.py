"""Online (one-example-at-a-time) learners built on river.

:class:`RiverLearner` wraps one river pipeline chosen by name from
:data:`SPECS`. It satisfies :class:`models.base.OnlineLearner`.

>>> learner = RiverLearner("logreg")
>>> learner.predict_proba_one({"amount": 1.0})
0.5
>>> for i in range(200):
...     learner.learn_one({"amount": float(i % 2)}, y=bool(i % 2))
>>> learner.predict_proba_one({"amount": 1.0}) > 0.5 > learner.predict_proba_one({"amount": 0.0})
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from river import forest, linear_model, optim, preprocessing, tree

from models.base import InvalidModelInput

__all__ = ["SPECS", "RiverLearner"]



class _RiverClassifier(Protocol):
    """The slice of river's classifier API used here (a ``Pipeline`` has it too)."""

    def learn_one(self, x: dict[Any, Any], y: Any) -> Any: ...

    def predict_proba_one(self, x: dict[Any, Any]) -> dict[Any, float]: ...


Builder = Callable[..., _RiverClassifier]


def _logreg(seed: int, lr: float = 0.05, l2: float = 0.0, intercept_lr: float = 0.05) -> _RiverClassifier:
    # Scaling first keeps plain SGD stable on raw amounts/counts; a constant,
    # fairly high learning rate (no decay) lets the model follow drift quickly.
    # SGD is deterministic, so ``seed`` is unused here.
    del seed
    return preprocessing.StandardScaler() | linear_model.LogisticRegression(
        optimizer=optim.SGD(lr), l2=l2, intercept_lr=intercept_lr
    )


def _hoeffding_adaptive(seed: int, **params: Any) -> _RiverClassifier:
    return tree.HoeffdingAdaptiveTreeClassifier(seed=seed, **params)


def _arf(seed: int, n_models: int = 5, **params: Any) -> _RiverClassifier:
    return forest.ARFClassifier(seed=seed, n_models=n_models, **params)


SPECS: dict[str, Builder] = {
    "logreg": _logreg,
    "hoeffding_adaptive": _hoeffding_adaptive,
    "arf": _arf,
}
"""Named river pipelines. A builder takes ``seed`` plus its own keyword hyperparameters."""


class RiverLearner:
    """A river classifier for binary fraud labels, selected by name from :data:`SPECS`.

    Hyperparameters are fixed at construction (``model``, ``seed`` and the
    spec's keyword ``params``); unknown spec names or parameters raise
    ``ValueError`` / ``TypeError`` immediately. Inputs are never mutated.
    Instances pickle with the default protocol (river models are picklable).
    """

    def __init__(self, model: str = "logreg", seed: int = 42, **params: Any) -> None:
        if model not in SPECS:
            raise InvalidModelInput(f"unknown online model {model!r}; choose one of {sorted(SPECS)}")
        self.model = model
        self.seed = seed
        self.params = dict(params)
        self._pipeline: _RiverClassifier = SPECS[model](seed, **params)
        self.n_learned = 0

    def __repr__(self) -> str:
        return f"RiverLearner(model={self.model!r}, seed={self.seed}, params={self.params}, n_learned={self.n_learned})"

    def learn_one(self, x: dict[str, float], y: bool) -> None:
        """Update with one example; ``x`` is copied, never mutated."""
        self._pipeline.learn_one(dict(x), bool(y))
        self.n_learned += 1

    def predict_proba_one(self, x: dict[str, float]) -> float:
        """Return P(fraud) in ``[0, 1]``; 0.0 while the model knows no positive class."""
        proba = self._pipeline.predict_proba_one(dict(x))
        p = float(proba.get(True, 0.0))
        return 0.0 if math.isnan(p) else min(1.0, max(0.0, p))

    def predict_proba_dict(self, x: dict[str, Any]) -> dict[Any, float]:
        """The pipeline's own class probabilities (``{}`` before it knows a class), as river gives them."""
        return self._pipeline.predict_proba_one(dict(x))

    def learn_raw(self, x: dict[str, Any], y: Any) -> None:
        """Learn with ``y`` as given (any class label river accepts), for datasets replayed as river has them."""
        self._pipeline.learn_one(dict(x), y)
        self.n_learned += 1

    def learn_many(self, xs: Sequence[dict[str, float]], ys: Sequence[bool]) -> None:
        """Learn each ``(x, y)`` pair in order (a loop over :meth:`learn_one`)."""
        if len(xs) != len(ys):
            raise InvalidModelInput(f"learn_many: {len(xs)} feature dicts but {len(ys)} labels")
        for x, y in zip(xs, ys):
            self.learn_one(x, y)

    def predict_many(self, xs: Iterable[dict[str, float]]) -> npt.NDArray[np.float64]:
        """Return P(fraud) for each dict, as a float64 array in input order."""
        return np.fromiter((self.predict_proba_one(x) for x in xs), dtype=np.float64)

    def clone(self, **overrides: Any) -> RiverLearner:
        """Return an untrained learner with the same hyperparameters.

        ``overrides`` (e.g. ``seed=7``) replace individual hyperparameters,
        which is how a learner is re-seeded.
        """
        kwargs: dict[str, Any] = {"model": self.model, "seed": self.seed, **self.params, **overrides}
        return RiverLearner(**kwargs)
