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
import time
from pathlib import Path
from typing import NoReturn

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
