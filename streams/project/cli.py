"""``weir init DIR --template NAME``, ``weir plan`` and ``weir apply``: start a project, see what it would
change on the running stack, register it.

``init`` copies one of the repository's example projects (``examples/<name>``)
into ``DIR`` as a package of its own (its imports renamed to ``DIR``'s name),
with a README stub; ``weir --project DIR/project.py demo`` then runs it.
``plan`` validates the project and prints, against the stack ``weir up``
started (its ``endpoints.json``, or ``WEIR_KAFKA_BOOTSTRAP`` and
``WEIR_SCHEMA_REGISTRY_URL``), what applying it would change
(:mod:`streams.project.plan`); ``apply`` does it. Both exit 1 when something is
refused, with the reason.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import examples
from streams.project.load import project_of
from streams.project.plan import PlanRefused, applied_state, apply, make_plan
from streams.settings import WeirSettings
from streams.stack import EndpointNotFound, endpoint

EXAMPLES = Path(examples.__file__).resolve().parent


def templates() -> list[str]:
    """The examples a project can start from: every folder of ``examples/`` with a ``project.py``."""
    return sorted(p.parent.name for p in EXAMPLES.glob("*/project.py"))


def template_named(name: str) -> str:
    """The example ``name`` names: its folder, or the one folder it is a prefix of (``delivery`` -> ``delivery_eta``)."""
    known = templates()
    if name in known:
        return name
    matches = [t for t in known if t.startswith(name)]
    if len(matches) != 1:
        raise InitError(f"no template {name!r}; choose one of {', '.join(known)}")
    return matches[0]


class InitError(Exception):
    """``weir init`` cannot scaffold as asked; the message says why."""


def scaffold(target: Path, template: str) -> list[Path]:
    """Copy the example ``template`` into ``target`` (which must not exist, or be empty) as package
    ``target.name``; returns the files written."""
    folder = template_named(template)
    package = target.name
    if not package.isidentifier():
        raise InitError(f"{target}: the folder's name becomes the project's Python package, so it must be an "
                        f"identifier (letters, digits, _), not {package!r}")
    if target.exists() and any(target.iterdir()):
        raise InitError(f"{target} exists and is not empty")
    source = EXAMPLES / folder
    shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    old = f"examples.{folder}"
    written = []
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        if path.suffix == ".py":
            text = re.sub(rf"\b{re.escape(old)}\b", package, path.read_text())
            if path.name == "project.py":  # the project is named after its package
                text = re.sub(r'(\bProject\(\s*)"[^"]*"', rf'\1"{package}"', text, count=1)
            path.write_text(text)
        written.append(path)
    readme = target / "README.md"
    body = readme.read_text() if readme.exists() else ""
    readme.write_text(f"# {package}\n\nA Weir project scaffolded by `weir init {target} --template {template}` from "
                      f"the example `{old}`: declare your own sources, feature views and models in `project.py` "
                      f"and your topics' schemas under `schemas/` (see the repository's docs/projects.md).\n\n"
                      f"```sh\nweir --project {target}/project.py plan   # validate, and compare with a running "
                      f"stack\nweir --project {target}/project.py demo   # run it (if it keeps a scenario)\n```\n\n"
                      f"What the template said:\n\n{body}")
    if readme not in written:
        written.append(readme)
    return written


def _init(args: argparse.Namespace) -> int:
    try:
        written = scaffold(args.dir, args.template)
    except InitError as exc:
        print(f"weir init: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.dir} (template {args.template}); next:\n"
          f"  weir --project {args.dir}/project.py plan\n  weir --project {args.dir}/project.py demo")
    return 0


def _stack(args: argparse.Namespace) -> tuple[str, str] | None:
    """(Kafka bootstrap, registry URL) of the running stack, or None when none is known."""
    settings = WeirSettings()
    try:
        return (endpoint("kafka_bootstrap", args.bootstrap or settings.kafka_bootstrap, flag="--bootstrap"),
                endpoint("schema_registry_url", args.registry or settings.schema_registry_url, flag="--registry"))
    except EndpointNotFound:
        return None


def _plan(args: argparse.Namespace) -> int:
    project = project_of(args)  # validates: a ProjectError is printed by the CLI
    stack = _stack(args)
    if stack is None:
        plan = make_plan(project, None, None)
        print("no running stack found (start one with `weir up`, or pass --bootstrap and --registry): "
              "everything reads as new")
    else:
        plan = make_plan(project, stack[1], applied_state(stack[0], stack[1], project.name))
    print("\n".join(plan.lines()))
    return 1 if plan.refused else 0


def _apply(args: argparse.Namespace) -> int:
    project = project_of(args)
    stack = _stack(args)
    if stack is None:
        print("weir apply: error: no running stack found: start one with `weir up` (it applies the project "
              "itself), or pass --bootstrap and --registry", file=sys.stderr)
        return 2
    try:
        plan = apply(project, *stack)
    except PlanRefused as exc:
        print(f"weir apply: {exc}", file=sys.stderr)
        return 1
    print("\n".join(plan.lines()))
    print(f"applied project {project.name}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``init``, ``plan`` and ``apply`` (each sets ``handler(args) -> int``)."""
    init = sub.add_parser("init", help="scaffold a new project from an example")
    init.add_argument("dir", type=Path, help="the new project's folder (its name becomes its Python package)")
    init.add_argument("--template", default="minimal",
                      help=f"the example to start from: one of {', '.join(templates())} (or a prefix of one; "
                           "each has a README; default minimal)")
    init.set_defaults(handler=_init)
    for name, handler, doc in (("plan", _plan, "validate the project and print what applying it would change"),
                               ("apply", _apply, "register the project with the running stack")):
        p = sub.add_parser(name, help=doc)
        p.add_argument("--bootstrap", default=None, help="Kafka bootstrap (default: endpoints.json)")
        p.add_argument("--registry", default=None, help="schema registry URL (default: endpoints.json)")
        p.set_defaults(handler=handler)
