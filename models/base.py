"""Interfaces of the ``models`` package; every implementation depends only on these.

Two kinds of model serve the scoring path:

* :class:`OnlineLearner` — learns one labelled example at a time (river style).
  Used by the ``learn`` stage on delayed labels.
* :class:`BatchScorer` — scores a float32 matrix of feature vectors at once.
  Used by the ``inference`` stage on micro-batches (ONNX Runtime, or the rule
  fallback before any model exists).

Feature vectors have a fixed length ``F = len(feature_names)``, defined by the
feature stage; nothing in this package hard-codes it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["BatchScorer", "InvalidModelInput", "ModelIntegrityError", "OnlineLearner"]


class InvalidModelInput(ValueError):
    """Training or scoring input that cannot be used (shape, NaN, one class...).

    A ``ValueError`` subclass, so callers may catch either.
    """


class ModelIntegrityError(RuntimeError):
    """A stored model artifact does not match its recorded checksum (or is missing)."""


@runtime_checkable
class OnlineLearner(Protocol):
    """A binary classifier that learns one example at a time.

    Contract:

    * ``learn_one`` and ``predict_proba_one`` never mutate ``x``; keys missing
      from ``x`` are treated by the learner as absent features, not errors.
    * ``predict_proba_one`` returns P(positive) as a float in ``[0, 1]``; before
      any example has been learnt it returns a constant (0.0 is allowed).
    * Calls are synchronous, CPU-bound and not thread-safe: one learner is
      owned by one stage worker.
    * Hyperparameters are set only through ``__init__``; ``clone()`` returns a
      fresh, untrained learner with the same hyperparameters and seed; a
      learner pickles and unpickles to one that predicts identically.
    """

    def learn_one(self, x: dict[str, float], y: bool) -> None:
        """Update the model with one labelled example (``y`` True = the positive class)."""
        ...

    def predict_proba_one(self, x: dict[str, float]) -> float:
        """Return P(positive | x) in ``[0, 1]``."""
        ...

    def clone(self) -> OnlineLearner:
        """Return an untrained copy with identical hyperparameters and seed."""
        ...


@runtime_checkable
class BatchScorer(Protocol):
    """Scores a batch of feature vectors.

    Contract:

    * ``X`` is a C-contiguous ``float32`` array of shape ``(n, F)``, columns in
      the order of the feature stage's ``feature_names``; ``n`` may be 0.
    * ``predict`` returns a float array of shape ``(n,)`` holding the score (a
      binary model's probability in ``[0, 1]``, a regression's predicted value),
      row ``i`` scoring ``X[i]``; it is a pure function of ``X``
      (no state carried between calls) and blocks until done.
    * ``version`` identifies the model that produced the scores; it is written
      on every prediction so a score can be traced to its model.
    """

    version: str

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Return the score for each row of ``X``."""
        ...
