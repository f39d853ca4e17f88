"""Drift detectors by name: declared per model and signal, refused with a reason when wrong, and replayed
through Kafka into the drift stage's own code path with the same alarms as river's detector."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.drift_detectors import InvalidDetector, Watched, parse_detector
from streams.drift_replay import read_values, replay_detector, river_alarms
from streams.project.load import validate
from streams.project.spec import Drift
from streams.stack import Endpoints
from streams.stages.drift import DriftDetector
from tests.conftest import FREE_PORTS, SHOP

ROOT = Path(__file__).resolve().parent.parent


def _streams() -> dict[str, tuple[list[float], list[float]]]:
    """name -> (continuous values, 0/1 values): a step, a slow ramp, and no change at all."""
    rng = random.Random(7)
    out = {}
    for name, shift in (("step", lambda i: 0.0 if i < 600 else 2.5), ("ramp", lambda i: max(0.0, i - 400) / 300),
                        ("none", lambda i: 0.0)):
        values = [rng.gauss(shift(i), 1.0) for i in range(1200)]
        rate = [0.1 + min(0.5, shift(i) / 4) for i in range(1200)]
        errors = [float(rng.random() < r) for r in rate]
        out[name] = (values, errors)
    return out


STREAMS = _streams()
DETECTORS = ["ADWIN(delta=0.002)", "PageHinkley(threshold=30)", "KSWIN(alpha=0.001)", "DDM()", "EDDM()",
             "HDDM_A()", "HDDM_W()"]


@pytest.mark.parametrize("text", DETECTORS)
def test_the_drift_stages_code_path_alarms_where_river_does(text: str, endpoints: Endpoints) -> None:
    """Every detector on a step, a ramp and a stationary stream, through Kafka into the stage's Watched."""
    spec = parse_detector(text)
    alarmed = 0
    for name, (values, errors) in STREAMS.items():
        stream = errors if spec.binary else values
        result = replay_detector(endpoints.kafka_bootstrap, spec, stream)
        assert result.weir_alarms == result.river_alarms == river_alarms(spec, stream), (name, result)
        alarmed += bool(result.river_alarms) and name != "none"
    assert alarmed  # the streams do make each detector alarm (the comparison is not between empty lists)


def test_weir_drift_replay_prints_both_and_ends_with_json(tmp_path: Path) -> None:
    import json
    import os

    values = tmp_path / "values.txt"
    values.write_text("\n".join(str(v) for v in STREAMS["step"][0]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")} | FREE_PORTS | {
        "WEIR_DATA_DIR": str(tmp_path / "weir")}
    done = subprocess.run([sys.executable, "-m", "streams.cli", "drift", "replay", "--detector",
                           "PageHinkley(threshold=30)", "--values", str(values)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["weir_alarms"] == last["river_alarms"] == river_alarms(parse_detector("PageHinkley(threshold=30)"),
                                                                       STREAMS["step"][0])
    assert last["weir_alarms"] and last["equal"] is True
    bad = subprocess.run([sys.executable, "-m", "streams.cli", "drift", "replay", "--detector", "DDM()",
                          "--values", str(values)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"weir drift replay: {values}:1: DDM takes 0 or 1, not "), bad.stderr


@pytest.mark.parametrize(("text", "why"), [
    ("KSWIN(window_size=10, stat_size=30)", "stat_size"), ("Adwin()", "'Adwin' is not one of ADWIN, PageHinkley"),
    ("ADWIN(delta=x)", "'x' is not a literal"), ("ADWIN(0.1)", "Name(keyword=value"),
    ("PageHinkley(nope=1)", "nope"), ("ADWIN(", "is not Name(arguments)")])
def test_a_wrong_declaration_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(InvalidDetector, match=rf"drift detector '{re.escape(text[:5])}.*{re.escape(why)}"):
        parse_detector(text)


def test_the_project_refuses_a_detector_that_does_not_fit_its_signal() -> None:
    from dataclasses import replace

    fraud = SHOP.models[0]
    shop = replace(SHOP, models=(replace(fraud, drift=Drift(error="DDM()", missed_positive="HDDM_W()",
                                                             score="EDDM()")),))
    problems = validate(shop)
    assert [p for p in problems if "drift" in p] == [
        (f"model {fraud.name}: drift.score 'EDDM()': EDDM takes 0/1 values, not scores; choose one of ADWIN, "
        "PageHinkley, KSWIN")]
    shop = replace(SHOP, models=(replace(fraud, drift=Drift(error="Page(x=1)")),))
    assert [p for p in validate(shop) if "drift" in p] == [
        (f"model {fraud.name}: drift.error: drift detector 'Page(x=1)': 'Page' is not one of ADWIN, PageHinkley, "
        "KSWIN, DDM, EDDM, HDDM_A, HDDM_W, FHDDM")]


def test_a_declared_detector_watches_the_models_signal() -> None:
    """A binary detector on the error signal sees decision errors; alerts are named after the detector."""
    detector = DriftDetector(0.002, min_samples=50, drift=Drift(error="DDM()"))
    rng = random.Random(3)
    alerts = []
    for i in range(3000):
        label = rng.random() < 0.3
        right = rng.random() < (0.95 if i < 1500 else 0.55)  # the model goes wrong half way
        score = (0.9 if label else 0.1) if right else (0.1 if label else 0.9)
        for alert in detector.update({"champion_version": "m-v1", "champion_score": score, "label": float(label)}):
            alerts.append((i, alert))
    errors = [(i, a) for i, a in alerts if a["detector"] == "ddm_error"]
    assert errors and all(i >= 1500 for i, _ in errors), alerts[:5]
    assert errors[0][1]["metric"] == "decision_error_rate" and errors[0][1]["value"] > errors[0][1]["threshold"]
    assert "(DDM())" in errors[0][1]["message"]


def test_values_are_checked_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "v.txt"
    path.write_text("1\n\n0.5\n")
    assert read_values(path, parse_detector("ADWIN()")) == [1.0, 0.5]
    path.write_text("1\nnan\n")
    with pytest.raises(ValueError, match=r"v.txt:2: ADWIN takes finite numbers, not nan"):
        read_values(path, parse_detector("ADWIN()"))
    path.write_text("1\nabc\n")
    with pytest.raises(ValueError, match=r"v.txt:2: 'abc' is not a number"):
        read_values(path, parse_detector("ADWIN()"))
    w = Watched(parse_detector("ADWIN()"))
    assert all(w.update(0.0) is None for _ in range(100)) and w.seen == 100
