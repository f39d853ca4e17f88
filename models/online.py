"""Online (one-example-at-a-time) learners built on river.

:class:`RiverLearner` wraps one river pipeline chosen by name from
:data:`SPECS` (binary classifiers) or :data:`REGRESSION_SPECS`, or declared as
text (:func:`parse_pipeline`), as a project's model declares it. It satisfies
:class:`models.base.OnlineLearner`.

>>> learner = RiverLearner("logreg")
>>> learner.predict_proba_one({"amount": 1.0})
0.5
>>> for i in range(200):
...     learner.learn_one({"amount": float(i % 2)}, y=bool(i % 2))
>>> learner.predict_proba_one({"amount": 1.0}) > 0.5 > learner.predict_proba_one({"amount": 0.0})
True
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt
from river import base as river_base
from river import forest, linear_model, optim, preprocessing, tree

from models.base import InvalidModelInput

__all__ = ["REGRESSION_SPECS", "SPECS", "RiverLearner", "default_learner"]


class _RiverClassifier(Protocol):
    """The slice of river's estimator API used here (a ``Pipeline`` has it too; a regressor has no
    ``predict_proba_one``)."""

    def learn_one(self, x: dict[Any, Any], y: Any) -> Any: ...

    def predict_proba_one(self, x: dict[Any, Any]) -> dict[Any, float]: ...

    def predict_one(self, x: dict[Any, Any]) -> Any: ...


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


def _linreg(seed: int, lr: float = 0.01, l2: float = 0.0, intercept_lr: float = 0.05,
            clip_gradient: float = 10.0) -> _RiverClassifier:
    # The scaler's variance is tiny while few examples came in, so early scaled values can be huge; an
    # unclipped squared-loss gradient then blows the weights up for good (measured on the delivery example:
    # progressive MAE in the billions of minutes unclipped, 4.5 minutes clipped at 10). SGD is deterministic.
    del seed
    return preprocessing.StandardScaler() | linear_model.LinearRegression(
        optimizer=optim.SGD(lr), l2=l2, intercept_lr=intercept_lr, clip_gradient=clip_gradient
    )


def _hoeffding_adaptive_regressor(seed: int, **params: Any) -> Any:  # a regressor: no predict_proba_one
    return tree.HoeffdingAdaptiveTreeRegressor(seed=seed, **params)


def _arf_regressor(seed: int, n_models: int = 5, **params: Any) -> Any:
    return forest.ARFRegressor(seed=seed, n_models=n_models, **params)


SPECS: dict[str, Builder] = {
    "logreg": _logreg,
    "hoeffding_adaptive": _hoeffding_adaptive,
    "arf": _arf,
}
"""Named river pipelines for binary models. A builder takes ``seed`` plus its own keyword hyperparameters."""

REGRESSION_SPECS: dict[str, Builder] = {
    "linreg": _linreg,
    "hoeffding_adaptive": _hoeffding_adaptive_regressor,
    "arf": _arf_regressor,
}
"""Named river pipelines for regression models."""

TASK_SPECS = {"binary": SPECS, "regression": REGRESSION_SPECS}


def default_learner(task: str) -> str:
    """The named learner a model of ``task`` gets when it declares none."""
    return "logreg" if task == "binary" else "linreg"


# river modules a declared pipeline may name (classes are looked up in these modules only)
PIPELINE_MODULES = ("preprocessing", "linear_model", "tree", "forest", "ensemble", "naive_bayes", "neighbors",
                    "optim", "feature_extraction", "imblearn", "compose", "drift")


def parse_pipeline(spec: str, seed: int) -> _RiverClassifier:
    """Build a river pipeline declared as text: steps joined by ``|``, each ``module.Class(args)``.

    Arguments are Python literals or nested ``module.Class(...)`` calls; nothing
    else is evaluated (no names, attributes or expressions), and the modules are
    limited to :data:`PIPELINE_MODULES`. A class that takes ``seed`` gets the
    learner's seed unless the spec sets one.

    >>> p = parse_pipeline("preprocessing.StandardScaler() | linear_model.LogisticRegression("
    ...                    "optimizer=optim.SGD(0.05), l2=0.001)", seed=1)
    >>> type(p).__name__, [type(s).__name__ for s in p.steps.values()]
    ('Pipeline', ['StandardScaler', 'LogisticRegression'])
    """
    steps = [_build(_parse(part, spec), seed, spec) for part in spec.split("|")]
    model = steps[0]
    for step in steps[1:]:
        model = model | step
    return cast(_RiverClassifier, model)


def _parse(step: str, spec: str) -> ast.expr:
    try:
        return ast.parse(step.strip(), mode="eval").body
    except SyntaxError as exc:
        raise InvalidModelInput(f"pipeline {spec!r}: step {step.strip()!r} is not valid: {exc.msg}") from None


def _build(node: ast.expr, seed: int, spec: str) -> Any:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id in PIPELINE_MODULES):
        raise InvalidModelInput(f"pipeline {spec!r}: each step must be module.Class(...) with the module one of "
                                f"{', '.join(PIPELINE_MODULES)}; got {ast.unparse(node)!r}")
    module = importlib.import_module(f"river.{node.func.value.id}")
    cls = getattr(module, node.func.attr, None)
    if not isinstance(cls, type):
        raise InvalidModelInput(f"pipeline {spec!r}: river.{node.func.value.id} has no class {node.func.attr!r}")
    args = [_value(a, seed, spec) for a in node.args]
    kwargs = {k.arg: _value(k.value, seed, spec) for k in node.keywords if k.arg is not None}
    if "seed" not in kwargs and "seed" in inspect.signature(cls).parameters:
        kwargs["seed"] = seed
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidModelInput(f"pipeline {spec!r}: {cls.__name__}: {exc}") from exc


def _value(node: ast.expr, seed: int, spec: str) -> Any:
    if isinstance(node, ast.Call):
        return _build(node, seed, spec)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise InvalidModelInput(f"pipeline {spec!r}: {ast.unparse(node)!r} is neither a literal nor a "
                                "module.Class(...) call") from None


class RiverLearner:
    """A river learner for a binary model (a classifier, from :data:`SPECS`) or a regression (a regressor,
    from :data:`REGRESSION_SPECS`), selected by name or declared as a pipeline.

    Hyperparameters are fixed at construction (``model``, ``seed``, ``task`` and the
    spec's keyword ``params``); unknown spec names or parameters raise
    ``ValueError`` / ``TypeError`` immediately. Inputs are never mutated.
    Instances pickle with the default protocol (river models are picklable).
    """

    def __init__(self, model: str = "logreg", seed: int = 42, task: str = "binary", **params: Any) -> None:
        if task not in TASK_SPECS:
            raise InvalidModelInput(f"task {task!r} is not one of {', '.join(TASK_SPECS)}")
        self.model = model
        self.seed = seed
        self.task = task
        self.params = dict(params)
        specs = TASK_SPECS[task]
        if model in specs:
            self._pipeline: _RiverClassifier = specs[model](seed, **params)
        elif "(" in model:
            if params:
                raise InvalidModelInput("a declared pipeline carries its hyperparameters in its text, not in params")
            self._pipeline = parse_pipeline(model, seed)
        else:
            example = "linear_model.LogisticRegression()" if task == "binary" else "linear_model.LinearRegression()"
            raise InvalidModelInput(f"unknown online model {model!r} for a {task} model; choose one of "
                                    f"{sorted(specs)} or declare a pipeline, e.g. "
                                    f"'preprocessing.StandardScaler() | {example}'")
        kind, base = ("classifier", river_base.Classifier) if task == "binary" else ("regressor", river_base.Regressor)
        if not isinstance(self._pipeline, base):
            raise InvalidModelInput(f"online model {model!r} is not a {kind}, as a {task} model needs")
        self.n_learned = 0

    def __repr__(self) -> str:
        return (f"RiverLearner(model={self.model!r}, seed={self.seed}, task={self.task!r}, params={self.params}, "
                f"n_learned={self.n_learned})")

    def score(self, x: dict[str, Any]) -> float:
        """The model's score of ``x``: P(positive) in ``[0, 1]`` (binary), the predicted value (regression;
        0.0 before it has learnt anything)."""
        if self.task == "binary":
            return self.predict_proba_one(x)
        value = self._pipeline.predict_one(dict(x))
        v = 0.0 if value is None else float(value)
        return 0.0 if math.isnan(v) or math.isinf(v) else v

    def learn_one(self, x: dict[str, float], y: bool | float) -> None:
        """Update with one example (``y``: the positive class or not, or a regression's value); ``x`` is
        copied, never mutated."""
        self._pipeline.learn_one(dict(x), bool(y) if self.task == "binary" else float(y))
        self.n_learned += 1

    def predict_proba_one(self, x: dict[str, float]) -> float:
        """Return P(positive) in ``[0, 1]``; 0.0 while the model knows no positive class."""
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
        """Return :meth:`score` for each dict, as a float64 array in input order."""
        return np.fromiter((self.score(x) for x in xs), dtype=np.float64)

    def clone(self, **overrides: Any) -> RiverLearner:
        """Return an untrained learner with the same hyperparameters.

        ``overrides`` (e.g. ``seed=7``) replace individual hyperparameters,
        which is how a learner is re-seeded.
        """
        kwargs: dict[str, Any] = {"model": self.model, "seed": self.seed, "task": self.task, **self.params,
                                  **overrides}
        return RiverLearner(**kwargs)
