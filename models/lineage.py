"""What a model was made from: the code version recorded in its lineage.

``code_version()`` is ``git:<commit>[+dirty]`` when the source tree is a git
checkout with git available, else ``src:<sha256 of every .py file of the
weir packages>`` (12 hex digits): either names the code that trained a model.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "streams", "sinks")


@cache
def code_version() -> str:
    git = _git()
    return git if git is not None else f"src:{source_hash()}"


def source_hash() -> str:
    """SHA-256 (12 hex digits) over the path and bytes of every .py file of the packages, in path order."""
    h = hashlib.sha256()
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _git() -> str | None:
    if not (ROOT / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *PACKAGES], cwd=ROOT, capture_output=True,
                               text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"git:{commit}" + (f"+dirty:{source_hash()}" if dirty else "")
