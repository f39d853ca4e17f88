"""Does the learning loop notice a drift, and does the served model recover? ``weir demo`` runs, each alone.

Runs the project's demo (``weir demo``, every stage on the embedded stack, each run in a fresh data directory
on free ports) for ``--seeds`` seeds with the scenario's injected change, once more with a CPU hog pinned to
one of the machine's cores (detection must not depend on load), and once without any change (``--drift-at
1.0``: a stationary run, where no drift alert may come). Per run it prints, from the demo's summary:

- drift alerts before and after the drift point (by the event time each was raised at) and the model alerts
  (a validation gap, failed gates: a model falling short of its promise, not a change of the data);
- the detection delay of the first drift alert after the drift, in event-time seconds and in labels;
- the champion's and the online learner's AUC before and after the drift, and over the last third of the run;
- retrains and promotions after the drift;
- the event-time windows whose inputs were tested against the serving version's reference, and the
  feature-drift and data-quality alerts they raised (counted among the drift alerts above when of kind drift).

Then the targets: every drifting run alerts after the drift and none before it; the champion's AUC over the
last third is at least the online learner's minus 0.02; the stationary run raises no drift alert. Exit
status 0 whatever the figures (a benchmark, not a test). ``--smoke`` (what ``make test`` runs): one small
run with the hog and one stationary, unthrottled: it checks that everything runs, not the figures.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's packages

from load_tests.common import PeakRss, add_project_option, load_project

ROOT = Path(__file__).resolve().parent.parent
FREE_PORTS = {v: "0" for v in ("WEIR_KAFKA_PORT", "WEIR_REDIS_PORT", "WEIR_POSTGRES_PORT",
                               "WEIR_SCHEMA_REGISTRY_PORT", "WEIR_HEALTH_PORT")}
MARGIN = 0.02  # the champion's AUC over the last third may trail the online learner's by this much


@dataclass(frozen=True)
class Run:
    name: str
    seed: int
    hog: bool = False
    drift: bool = True


def weir() -> str:
    here = ROOT / ".venv" / "bin" / "weir"
    return str(here) if here.is_file() else "weir"


def hog() -> subprocess.Popen[bytes]:
    """A busy loop pinned to core 0 (the stages' and the trainer's share of the machine halves on 2 cores)."""
    code = (f"import os\nos.sched_setaffinity(0, {{0}})\nwhile os.getppid() == {os.getpid()}:\n"
            "    for _ in range(1_000_000):\n        pass\n")  # ends by itself once this process is gone
    return subprocess.Popen([sys.executable, "-c", code])


def demo(run: Run, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One ``weir demo`` in its own data directory; its summary."""
    summary = work / f"{run.name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIR_")} | FREE_PORTS | {
        "WEIR_DATA_DIR": str(work / run.name)}
    argv = [weir(), "--project", args.project, "demo", "--seed", str(run.seed), "--events", str(args.events),
            "--rate", str(args.rate), "--summary-json", str(summary), "--no-progress"]
    if not run.drift:
        argv += ["--drift-at", "1.0"]
    busy = hog() if run.hog else None
    started = time.perf_counter()
    try:
        with PeakRss(os.getpid()) as rss:  # weir demo and the services it starts
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if done.returncode != 0 or not summary.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"drift.py: weir demo ({run.name}) failed with exit {done.returncode}:\n{tail}")
    out: dict[str, Any] = json.loads(summary.read_text())
    out["wall_s"] = round(time.perf_counter() - started, 1)
    out["peak_rss_mb"] = {k: v for k, v in rss.peaks.items() if k != "python"}  # not this script, nor the hog
    return out


def row(run: Run, s: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (None where the summary has none: e.g. no drift, no alert after it)."""
    q = "mae" if "mae_champion_last_third" in s else "auc"
    keys = ("alerts_before_drift", "alerts_after_drift", "detection_delay_s", "detection_delay_labels",
            f"{q}_champion_before_drift", f"{q}_online_before_drift", f"{q}_champion_after_drift",
            f"{q}_online_after_drift", f"{q}_champion_last_third", f"{q}_online_last_third",
            "retrains_after_drift", "promotions_after_drift")
    out = {"run": run.name, "seed": run.seed, "hog": run.hog, "drift": run.drift, **{k: s.get(k) for k in keys},
           "drift_alerts": s.get("drift_alerts"), "model_alerts": s.get("model_alerts", []),
           "detected_by": s.get("detected_by"), "input_windows": s.get("input_windows"), "input_alerts": s.get("input_alerts", []), "wall_s": s["wall_s"],
           "peak_rss_mb": s["peak_rss_mb"]}
    return out


def recovered(r: dict[str, Any]) -> bool | None:
    """The champion's quality over the last third within MARGIN of the online learner's (AUC: not below it by
    more; MAE, a regression's: not above it by more than the fraction MARGIN)."""
    q = quality(r)
    champion, online = r.get(f"{q}_champion_last_third"), r.get(f"{q}_online_last_third")
    if champion is None or online is None:
        return None
    return bool(champion >= online - MARGIN if q == "auc" else champion <= online * (1 + MARGIN))


def quality(r: dict[str, Any]) -> str:
    return "mae" if any(k.startswith("mae_") for k in r) else "auc"


def fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def table(rows: list[dict[str, Any]]) -> None:
    q = quality(rows[0])
    cols = [("run", "run"), ("before", "alerts_before_drift"), ("after", "alerts_after_drift"),
            ("delay s", "detection_delay_s"), ("delay labels", "detection_delay_labels"),
            ("champ before", f"{q}_champion_before_drift"), ("online before", f"{q}_online_before_drift"),
            ("champ after", f"{q}_champion_after_drift"), ("online after", f"{q}_online_after_drift"),
            ("champ last 1/3", f"{q}_champion_last_third"), ("online last 1/3", f"{q}_online_last_third"),
            ("retrains", "retrains_after_drift"), ("input windows", "input_windows")]
    print(" | ".join(h for h, _ in cols) + " | detected by | model alerts | input alerts")
    for r in rows:
        print(" | ".join(fmt(r.get(k)) for _, k in cols) + f" | {fmt(r.get('detected_by'))} | "
              + (", ".join(r["model_alerts"]) or "-") + " | "
              + ("; ".join(r["input_alerts"]) or "-"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_project_option(ap)
    ap.add_argument("--seeds", type=int, default=5, help="drifting runs, seeds 1..N (default 5)")
    ap.add_argument("--events", type=int, default=60_000, help="scenario events per run (default 60000)")
    ap.add_argument("--rate", type=float, default=800.0, help="events per second, 0 = unthrottled (default 800)")
    ap.add_argument("--smoke", action="store_true",
                    help="one small unthrottled run with the hog and one stationary: checks that it runs")
    args = ap.parse_args()
    load_project(args.project)  # a bad reference stops here, in one line
    if args.smoke:
        args.events, args.rate = 6000, 0.0
        runs = [Run("hog-1", 1, hog=True), Run("stationary-1", 1, drift=False)]
    else:
        runs = [Run(f"seed-{s}", s) for s in range(1, args.seeds + 1)]
        runs += [Run("hog-1", 1, hog=True), Run("stationary-1", 1, drift=False)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="weir-drift-") as tmp:
        for run in runs:
            print(f"{run.name}: weir demo --seed {run.seed} --events {args.events} --rate {args.rate:g}"
                  + (" (CPU hog on core 0)" if run.hog else "") + ("" if run.drift else " --drift-at 1.0"),
                  flush=True)
            rows.append(row(run, demo(run, args, Path(tmp))))
            print(f"  done in {rows[-1]['wall_s']} s; peak RSS (MiB) {rows[-1]['peak_rss_mb']}", flush=True)
    table(rows)
    drifting = [r for r in rows if r["drift"]]
    stationary = [r for r in rows if not r["drift"]]
    delays = [r["detection_delay_s"] for r in drifting if r["detection_delay_s"] is not None]
    targets = {
        "runs_alerting_after_drift": f"{sum(1 for r in drifting if (r['alerts_after_drift'] or 0) > 0)}/{len(drifting)}",
        "runs_alerting_before_drift": f"{sum(1 for r in drifting if (r['alerts_before_drift'] or 0) > 0)}/{len(drifting)}",
        "runs_champion_recovered": f"{sum(1 for r in drifting if recovered(r))}/{len(drifting)}",
        "stationary_drift_alerts": sum(r["drift_alerts"] or 0 for r in stationary),
        "median_detection_delay_s": statistics.median(delays) if delays else None,
    }
    print("targets: alert after the drift in every run, never before; champion's AUC over the last third >= the "
          f"online learner's - {MARGIN}; no drift alert on the stationary run")
    for k, v in targets.items():
        print(f"  {k}: {v}")
    print(json.dumps({"events": args.events, "rate": args.rate, **targets, "runs": rows}))


if __name__ == "__main__":
    main()
