"""The load tests still run: each script in ``--smoke`` mode (tiny sizes, every phase once) exits 0 and ends
with its one JSON line. Nothing about speed is asserted: these are benchmarks, run here only so that they
cannot silently rot when the code they measure changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
MINIMAL = "examples/minimal/project.py"  # the minimal project of docs/projects.md
TIMEOUT_S = 600  # a smoke run takes well under a minute alone; generous for a loaded machine


@pytest.mark.parametrize("argv", [
    ["load_tests/ingest.py"],
    ["load_tests/features.py"],
    ["load_tests/inference.py"],
    ["load_tests/pipeline.py"],
    ["load_tests/pipeline.py", "--project", MINIMAL],
    ["load_tests/chaos.py"],  # its --smoke also asserts its oracle: nothing lost, duplicates identical, no orphan
    ["load_tests/common.py"],  # what they share: loading a project
    ["load_tests/drift.py"],  # two small demos: one under a CPU hog, one without a drift
    ["load_tests/minimal.py"],  # the minimal project through Weir and through a bare hand-written loop
], ids=["ingest", "features", "inference", "pipeline-shop", "pipeline-minimal", "chaos", "common", "drift",
        "minimal"])
def test_load_test_runs_in_smoke_mode(argv: list[str]) -> None:
    python = str(PYTHON) if PYTHON.is_file() else sys.executable
    done = subprocess.run([python, *argv, "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, (f"exit {done.returncode}\nstdout:\n{done.stdout[-4000:]}\n"
                                  f"stderr:\n{done.stderr[-4000:]}")
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{done.stderr[-4000:]}"
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict) and figures
