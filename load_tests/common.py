"""What every load test shares: the ``--project`` option and loading the project it names.

A project is loaded with :func:`streams.project.load.load` and made known to this process's schema
catalog (:func:`~streams.project.contracts.use_project`) before any codec is built; a spawned child
process does the same with the same reference, then ``schemas.use_registry`` (see :func:`child_setup`).

Run as a script, it measures what every load test and every ``weir`` command pays first: loading and
validating a project (the first load, with its imports, then the median of ``--reps`` more), and checks the
shop guard; ``--smoke`` (what ``make test`` runs) does 3 reps. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repository's packages

from streams import schemas  # noqa: E402
from streams.project.contracts import use_project  # noqa: E402
from streams.project.load import load  # noqa: E402
from streams.project.spec import Project  # noqa: E402

DEFAULT_PROJECT = "examples.fraud_shop.project:project"
SHOP = "fraud_shop"


def add_project_option(ap: argparse.ArgumentParser, default: str = DEFAULT_PROJECT) -> None:
    ap.add_argument("--project", default=default,
                    help=f"the project: package.module:attribute or path/to/project.py (default {default})")


def load_project(ref: str) -> Project:
    """The project ``ref`` names, validated and known to this process's schema catalog."""
    project = load(ref)
    use_project(project)
    return project


def child_setup(ref: str, registry: str) -> Project:
    """In a spawned process: the project, then codecs that take their ids from the registry."""
    project = load_project(ref)
    schemas.use_registry(registry)
    return project


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_KEPT_OPTIONS = ("--stages", "--member", "--workers")  # what tells one weir process of a run from another


def _label(proc: psutil.Process) -> str:
    """A process by what it runs: ``weir up --workers 2``, ``weir worker --stages ingest --member 1/2``, ``weir
    demo``, or its executable's name (tansu, valkey-server, postgres)."""
    cmd = proc.cmdline()
    if "streams.cli" in cmd:
        args = cmd[cmd.index("streams.cli") + 1:]
    elif scripts := [i for i, arg in enumerate(cmd[:2]) if Path(arg).name == "weir"]:  # bin/weir, or python bin/weir
        args = cmd[scripts[0] + 1:]
    else:
        return str(proc.name())
    words, i = ["weir"], 0
    while i < len(args):
        if not args[i].startswith("-"):
            words.append(args[i])  # the command
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            if args[i] in _KEPT_OPTIONS:
                words += args[i:i + 2]
            i += 1  # the option's value
        i += 1
    return " ".join(words)


def _vm_hwm_mb(pid: int) -> float | None:
    """The process's peak RSS so far (``VmHWM``), in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakRss:
    """Peak RSS (MiB) of a process and of each of its descendants, by :func:`_label` (the largest where several
    share one), sampled every ``every_s`` while they run. Each sample reads the kernel's high-water mark
    (``VmHWM``), so it is the process's peak up to then: only what a process gains in its last ``every_s``
    before exiting can be missed."""

    def __init__(self, pid: int, every_s: float = 1.0) -> None:
        self.pid, self.every_s = pid, every_s
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.every_s):
                return

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                label, peak = _label(proc), _vm_hwm_mb(proc.pid)
            except psutil.Error:
                continue
            if peak is not None and peak > self.peaks.get(label, 0.0):
                self.peaks[label] = round(peak, 1)


def fail(script: str, message: str) -> NoReturn:
    """Stop with one line on stderr (exit status 2)."""
    print(f"{script}: {message}", file=sys.stderr)
    raise SystemExit(2)


def require_shop(script: str, project: Project, *, sources: tuple[str, ...] = (), views: tuple[str, ...] = (),
                 models: tuple[str, ...] = ()) -> None:
    """This load test generates the fraud shop's events: stop with one line unless ``project`` declares the
    shop's objects it uses (by name)."""
    missing = [f"source {n!r}" for n in sources if n not in {s.name for s in project.sources}]
    missing += [f"view {n!r}" for n in views if n not in {v.name for v in project.views}]
    missing += [f"model {n!r}" for n in models if n not in {m.name for m in project.models}]
    if missing:
        fail(script, f"it generates the fraud shop's events ({SHOP}); project {project.name} has no "
                     f"{', '.join(missing)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_project_option(ap)
    ap.add_argument("--reps", type=int, default=20, help="warm loads to take the median of")
    ap.add_argument("--smoke", action="store_true", help="3 reps")
    args = ap.parse_args()
    reps = 3 if args.smoke else args.reps
    started = time.perf_counter()
    project = load_project(args.project)
    first_ms = (time.perf_counter() - started) * 1000
    warm = []
    for _ in range(reps):
        started = time.perf_counter()
        load_project(args.project)
        warm.append((time.perf_counter() - started) * 1000)
    shop = project.name == SHOP
    if shop:  # the guard the shop-only load tests use passes for the shop itself
        require_shop("common.py", project, sources=tuple(s.name for s in project.sources),
                     views=tuple(v.name for v in project.views), models=tuple(m.name for m in project.models))
    print(f"project {project.name}: {len(project.sources)} sources, {len(project.views)} views, "
          f"{len(project.models)} models; first load {first_ms:.1f} ms (imports included), then median "
          f"{statistics.median(warm):.2f} ms over {reps} loads")
    print(json.dumps({"project": project.name, "first_load_ms": round(first_ms, 1),
                      "load_median_ms": round(statistics.median(warm), 2), "reps": reps, "shop_guard": shop}))


if __name__ == "__main__":
    main()
