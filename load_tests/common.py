"""What every load test shares: the ``--project`` option and loading the project it names.

A project is loaded with :func:`streams.project.load.load` and made known to this process's schema
catalog (:func:`~streams.project.contracts.use_project`) before any codec is built; a spawned child
process does the same with the same reference, then ``schemas.use_registry`` (see :func:`child_setup`).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from streams import schemas
from streams.project.contracts import use_project
from streams.project.load import load
from streams.project.spec import Project

DEFAULT_PROJECT = "examples.fraud_shop.project:project"
SHOP = "fraud_shop"


def add_project_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--project", default=DEFAULT_PROJECT,
                    help=f"the project: package.module:attribute or path/to/project.py (default {DEFAULT_PROJECT})")


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
