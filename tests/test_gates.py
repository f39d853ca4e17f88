"""Promotion gates: each check, the margins, and no pass for lack of evidence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.gates import GatePolicy, decide, expected_calibration_error

GOOD = {"auc_val": 0.91, "champion_auc_val": 0.92, "p50_ms": 0.8, "ece_val": 0.06, "champion_ece_val": 0.05}
POLICY = GatePolicy(auc_margin=0.02, max_p50_ms=5.0, ece_margin=0.05, max_ece=0.3)


def test_a_candidate_within_every_margin_passes() -> None:
    d = decide(GOOD, POLICY)
    assert d.passed and d.failed() == "" and d.as_metrics()["gates_passed"] == 1.0
    assert decide({k: v for k, v in GOOD.items() if not k.startswith("champion")}, POLICY).passed  # no champion yet


@pytest.mark.parametrize(("change", "gate", "words"), [
    ({"auc_val": 0.89}, "quality", "0.0300 below the champion's 0.9200"),
    ({"p50_ms": 5.5}, "latency", "over the 5.00 ms budget"),
    ({"ece_val": 0.11}, "calibration", "worse than the champion's"),
    ({"ece_val": 0.31, "champion_ece_val": 0.30}, "calibration", "over the 0.3000 limit"),
    ({"auc_val": math.nan}, "quality", "not measured"),
    ({"p50_ms": None}, "latency", "not measured"),
])
def test_a_failed_gate_blocks_and_says_why(change: dict[str, float | None], gate: str, words: str) -> None:
    metrics = {k: v for k, v in (GOOD | change).items() if v is not None}
    d = decide(metrics, POLICY)
    assert not d.passed and d.as_metrics()[f"gate_{gate}"] == 0.0 and d.as_metrics()["gates_passed"] == 0.0
    assert d.failed().startswith(f"{gate}: ") and words in d.failed()


def test_expected_calibration_error_against_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    p = rng.uniform(size=5000)
    y = rng.uniform(size=5000) < p  # calibrated by construction
    assert expected_calibration_error(y, p) < 0.03
    assert abs(expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) - 0.2) < 0.05  # over-confident by 0.2
    assert math.isnan(expected_calibration_error([], []))
