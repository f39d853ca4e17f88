"""Promotion gates: may a candidate model replace the champion?

A candidate is judged on metrics measured at registration, on the *same*
validation window for the candidate and the champion (the newest part of the
candidate's training set, by event time):

* **quality**, a binary model: ``auc_val`` (ROC AUC) not below the champion's
  ``champion_auc_val`` by more than ``auc_margin``; a regression: ``mae_val``
  (mean absolute error) not above the champion's ``champion_mae_val`` by more
  than the fraction ``mae_margin`` of it; with no champion the check passes (the
  first model has nothing to lose to);
* **latency**: ``p50_ms`` (scoring a batch of 256 on CPU with ONNX Runtime, median of 200 calls) within
  ``max_p50_ms``. The median, not the p99: the p99 of a few hundred sub-millisecond calls measures the
  machine's scheduling while it trains and streams (a couple of 20 ms preemptions), not the model;
* **calibration** (a binary model): ``ece_val`` (expected calibration error, 10
  equal-width bins) not above the champion's ``champion_ece_val`` by more than
  ``ece_margin``, and never above ``max_ece``.

A metric that was not measured fails its check: a gate never passes for lack
of evidence.

>>> d = decide({"auc_val": 0.90, "champion_auc_val": 0.93, "p50_ms": 1.0, "ece_val": 0.05,
...             "champion_ece_val": 0.04}, GatePolicy(auc_margin=0.02))
>>> d.passed
False
>>> print(d.failed())
quality: auc_val 0.9000 is 0.0300 below the champion's 0.9300 (allowed: 0.0200)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["Check", "GateDecision", "GatePolicy", "decide", "expected_calibration_error"]


@dataclass(frozen=True)
class GatePolicy:
    """The thresholds a model's candidates are held to (a project declares them per model)."""

    auc_margin: float = 0.02
    max_p50_ms: float = 10.0
    ece_margin: float = 0.05
    max_ece: float = 0.5
    mae_margin: float = 0.05


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failed(self) -> str:
        """The failed checks, one sentence each ("" when all passed)."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)

    def summary(self) -> str:
        return "; ".join(f"{c.name} {'ok' if c.passed else 'FAILED'}: {c.detail}" for c in self.checks)

    def as_metrics(self) -> dict[str, float]:
        """1.0/0.0 per check, for the registry's metrics map."""
        return {f"gate_{c.name}": 1.0 if c.passed else 0.0 for c in self.checks} | {
            "gates_passed": 1.0 if self.passed else 0.0}


def _measured(metrics: Mapping[str, float], key: str) -> float | None:
    v = metrics.get(key)
    return None if v is None or math.isnan(v) else float(v)


def _quality(m: Mapping[str, float], p: GatePolicy) -> Check:
    auc = _measured(m, "auc_val")
    if auc is None:
        return Check("quality", False, "auc_val was not measured")
    champion = _measured(m, "champion_auc_val")
    if champion is None:
        return Check("quality", True, f"auc_val {auc:.4f}, no champion to compare with")
    if auc >= champion - p.auc_margin:
        return Check("quality", True, f"auc_val {auc:.4f} vs the champion's {champion:.4f} on the same window")
    return Check("quality", False, f"auc_val {auc:.4f} is {champion - auc:.4f} below the champion's {champion:.4f} "
                                   f"(allowed: {p.auc_margin:.4f})")


def _regression_quality(m: Mapping[str, float], p: GatePolicy) -> Check:
    mae = _measured(m, "mae_val")
    if mae is None:
        return Check("quality", False, "mae_val was not measured")
    champion = _measured(m, "champion_mae_val")
    if champion is None:
        return Check("quality", True, f"mae_val {mae:.4g}, no champion to compare with")
    if mae <= champion * (1 + p.mae_margin):
        return Check("quality", True, f"mae_val {mae:.4g} vs the champion's {champion:.4g} on the same window")
    return Check("quality", False, f"mae_val {mae:.4g} is above the champion's {champion:.4g} by more than "
                                   f"{p.mae_margin:.0%}")


def _latency(m: Mapping[str, float], p: GatePolicy) -> Check:
    p50 = _measured(m, "p50_ms")
    if p50 is None:
        return Check("latency", False, "p50_ms was not measured")
    ok = p50 <= p.max_p50_ms
    return Check("latency", ok, f"p50 {p50:.3f} ms {'within' if ok else 'over'} the {p.max_p50_ms:.2f} ms budget")


def _calibration(m: Mapping[str, float], p: GatePolicy) -> Check:
    ece = _measured(m, "ece_val")
    if ece is None:
        return Check("calibration", False, "ece_val was not measured")
    if ece > p.max_ece:
        return Check("calibration", False, f"ece_val {ece:.4f} over the {p.max_ece:.4f} limit")
    champion = _measured(m, "champion_ece_val")
    if champion is not None and ece > champion + p.ece_margin:
        return Check("calibration", False, f"ece_val {ece:.4f} is {ece - champion:.4f} worse than the champion's "
                                           f"{champion:.4f} (allowed: {p.ece_margin:.4f})")
    return Check("calibration", True, f"ece_val {ece:.4f}" + (f" vs the champion's {champion:.4f}" if champion is not None
                                                               else ""))


def decide(metrics: Mapping[str, float], policy: GatePolicy = GatePolicy(), task: str = "binary") -> GateDecision:
    """Every gate's verdict on a candidate's registration metrics (``task``: the model's, binary or regression)."""
    if task == "regression":
        return GateDecision((_regression_quality(metrics, policy), _latency(metrics, policy)))
    return GateDecision((_quality(metrics, policy), _latency(metrics, policy), _calibration(metrics, policy)))


def expected_calibration_error(y: npt.ArrayLike, proba: npt.ArrayLike, bins: int = 10) -> float:
    """Mean |observed positive rate − mean predicted probability| over equal-width bins, weighted by bin size.

    >>> expected_calibration_error([0, 1, 0, 1], [0.0, 1.0, 0.0, 1.0])
    0.0
    """
    yv, pv = np.asarray(y, dtype=np.float64), np.clip(np.asarray(proba, dtype=np.float64), 0.0, 1.0)
    if len(yv) == 0:
        return math.nan
    idx = np.minimum((pv * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.sum() * abs(yv[mask].mean() - pv[mask].mean())
    return float(total / len(yv))
