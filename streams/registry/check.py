"""``weir schemas check``: Weir's ``schemas/`` and the project's schema folder obey the registry's rules.

Each folder ``<root>/<topic>/`` is one subject (``<topic>-value``) with files
``v1.avsc`` … ``vN.avsc``, numbered without gaps, and an optional file
``compatibility`` holding its level (default BACKWARD). Every version must
parse and be compatible with the earlier ones under that level, exactly as
the registry would check it on registration.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from streams.registry import compat

_VERSION_FILE = re.compile(r"^v([1-9][0-9]*)\.avsc$")


def subject_level(folder: Path) -> str:
    """The folder's compatibility level: its ``compatibility`` file, else BACKWARD; ``UnknownLevel``."""
    path = folder / "compatibility"
    if not path.exists():
        return compat.DEFAULT_LEVEL
    return compat.check_level(path.read_text().strip())


def _read_versions(folder: Path) -> tuple[dict[int, str], list[str]]:
    """Version number -> schema text of every ``vN.avsc`` that parses, and the problems of the rest."""
    texts: dict[int, str] = {}
    found: list[str] = []
    for path in sorted(folder.glob("*.avsc")):
        match = _VERSION_FILE.match(path.name)
        if match is None:
            found.append(f"{path.name}: not named v<N>.avsc")
            continue
        text = path.read_text()
        try:
            json.loads(text)
            compat.parse(text)
        except (ValueError, compat.SchemaParseError) as exc:
            found.append(f"{path.name}: does not parse: {exc}")
            continue
        texts[int(match.group(1))] = text
    return texts, found


def check_subject(folder: Path) -> tuple[int, list[str]]:
    """(number of versions, problems) of one subject folder; problems are prefixed ``<topic> v<N>:``."""
    topic = folder.name
    texts, found = _read_versions(folder)
    found = [f"{topic} {p}" for p in found]
    try:
        level = subject_level(folder)
    except compat.UnknownLevel as exc:
        return len(texts), found + [f"{topic}: {exc}"]
    numbers = sorted(texts)
    if not numbers and not found:
        found.append(f"{topic}: no v<N>.avsc files")
    if numbers and numbers != list(range(1, len(numbers) + 1)) and not found:
        found.append(f"{topic}: versions {numbers} are not numbered 1..{len(numbers)} without gaps")
    if found:
        return len(texts), found
    for n in numbers[1:]:
        earlier = [texts[k] for k in numbers if k < n]
        found += [f"{topic} v{n}: {m}"
                  for m in compat.problems(texts[n], earlier, level, versions=numbers[: n - 1], label="v{}")]
    return len(numbers), found


def check_repository(schema_dir: Path) -> list[str]:
    """Every problem of every subject folder under ``schema_dir``; empty when all are fine."""
    found: list[str] = []
    for folder in sorted(p for p in schema_dir.iterdir() if p.is_dir()):
        found += check_subject(folder)[1]
    return found


def _check(args: argparse.Namespace) -> int:
    if args.dir is not None:
        dirs: list[Path] = [args.dir]
    else:  # Weir's own and the project's
        from streams.project.load import project_of
        from streams.schemas import SCHEMA_DIR

        dirs = [SCHEMA_DIR, project_of(args).schemas]
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        print(f"{missing[0]}: not a directory")
        return 1
    folders = sorted(p for d in dirs for p in d.iterdir() if p.is_dir())
    results = [check_subject(folder) for folder in folders]
    found = [p for _, problems in results for p in problems]
    for problem in found:
        print(problem)
    if found:
        return 1
    print(f"ok: {len(folders)} subjects, {sum(n for n, _ in results)} versions")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``schemas check [--dir DIR]`` to a CLI; its handler (``args.handler(args) -> int``) is the exit code."""
    schemas = sub.add_parser("schemas", help="work with the Avro contracts: Weir's schemas/ and the project's")
    commands = schemas.add_subparsers(dest="schemas_command", required=True)
    check = commands.add_parser("check", help="check every subject's versions parse and are compatible")
    check.add_argument("--dir", type=Path, default=None,
                       help="one schema folder (default: Weir's schemas/ and the project's schemas folder)")
    check.set_defaults(handler=_check)
