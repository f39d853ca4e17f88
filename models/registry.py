"""Model registry: ONNX artifacts on disk, their versions and stages in ClickHouse.

One table row per ``(name, version)``, in a ``ReplacingMergeTree`` keyed on
``(name, version)`` with a ``revision`` counter: a stage change inserts the
row again with ``revision + 1`` and reads use ``FINAL``, so the newest revision
wins without ``ALTER ... UPDATE`` mutations. Artifacts are copied to
``artifact_dir/<name>/v<N>.onnx`` and checked against their sha256 on load;
companion files (the TorchScript export, ``v<N>.pt``) are copied next to it.

Concurrency: version numbers are allocated as ``max + 1`` by a read then an
insert, so there must be ONE writer per model name (the retrain stage).
Readers may run anywhere.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, get_args

from models.base import InvalidModelInput, ModelIntegrityError
from models.export import sha256_file

__all__ = ["FIRST_REVISION", "STAGES", "ModelRegistry", "ModelVersion", "Stage"]

FIRST_REVISION: Final = 1  # a version's registration; each stage change adds one

Stage = Literal["candidate", "shadow", "canary", "production", "archived"]
STAGES: Final[tuple[str, ...]] = get_args(Stage)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SUFFIX_RE = re.compile(r"^\.[A-Za-z0-9_-]{1,16}$")
_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
_COLUMNS: Final[list[str]] = [
    "name", "version", "revision", "stage", "artifact_uri", "sha256", "created_at", "metrics", "lineage",
]


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version. ``created_at`` is timezone-aware UTC;
    ``artifact_uri`` is an absolute file path."""

    name: str
    version: int
    stage: str
    artifact_uri: str
    sha256: str
    created_at: datetime
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    revision: int = FIRST_REVISION

    @property
    def path(self) -> Path:
        """The artifact as a :class:`~pathlib.Path`."""
        return Path(self.artifact_uri)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidModelInput(f"model name {name!r} must match {_NAME_RE.pattern}")
    return name


def _check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise InvalidModelInput(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    return stage


class ModelRegistry:
    """Registry over a clickhouse-connect ``client`` and a local ``artifact_dir``.

    Methods block on ClickHouse round trips. Every method that returns a
    version for loading (:meth:`get`, :meth:`latest`, :meth:`verify`) checks
    the artifact's sha256 and raises :class:`~models.base.ModelIntegrityError`
    if it differs or the file is gone. ``clock`` returns an aware datetime
    (injected so tests control ``created_at``).
    """

    def __init__(
        self,
        client: Any,
        artifact_dir: Path,
        *,
        table: str = "model_registry",
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not _TABLE_RE.match(table):
            raise InvalidModelInput(f"table name {table!r} is not a plain identifier")
        self.client = client
        self.artifact_dir = Path(artifact_dir).resolve()
        self.table = table
        self.clock = clock

    # -- schema ---------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create the registry table if it does not exist (idempotent)."""
        self.client.command(
            f"""CREATE TABLE IF NOT EXISTS {self.table} (
                name String,
                version UInt32,
                revision UInt32,
                stage LowCardinality(String),
                artifact_uri String,
                sha256 FixedString(64),
                created_at DateTime64(6, 'UTC'),
                metrics Map(String, Float64),
                lineage Map(String, String)
            ) ENGINE = ReplacingMergeTree(revision)
            ORDER BY (name, version)"""
        )

    # -- writes ---------------------------------------------------------------

    def register(
        self,
        name: str,
        artifact: Path,
        *,
        metrics: Mapping[str, float],
        lineage: Mapping[str, str],
        stage: Stage | str = "candidate",
        companions: Sequence[Path] = (),
    ) -> ModelVersion:
        """Copy ``artifact`` in as the next version of ``name`` and record it.

        The file is copied atomically (temp file + rename) to
        ``artifact_dir/<name>/v<N>.onnx`` with ``N = max existing + 1`` before
        the row is written, so a recorded row always has its file. Each of
        ``companions`` (other forms of the same model, e.g. its TorchScript
        export) is copied the same way, first, to ``v<N>`` with its own suffix
        (``model.pt`` -> ``v<N>.pt``); suffixes must differ from each other and
        from ``.onnx``. The registry records no checksum for a companion: the
        caller puts it in ``lineage``. Registering straight into
        ``"production"`` archives the previous production version in the
        same insert.
        """
        _check_name(name)
        _check_stage(stage)
        src = Path(artifact)
        if not src.is_file():
            raise InvalidModelInput(f"artifact {src} does not exist or is not a file")
        extra = _check_companions(companions)
        version = self._max_version(name) + 1
        for companion in extra:
            self._copy_in(companion, name, version, companion.suffix)
        dest = self._copy_in(src, name, version, ".onnx")
        mv = ModelVersion(
            name=name,
            version=version,
            stage=stage,
            artifact_uri=str(dest),
            sha256=sha256_file(dest),
            created_at=self._now(),
            metrics={str(k): float(v) for k, v in metrics.items()},
            lineage={str(k): str(v) for k, v in lineage.items()},
        )
        self._insert([*self._demotions(mv), mv])
        return mv

    def set_stage(self, name: str, version: int, stage: Stage | str) -> ModelVersion:
        """Move ``name``/``version`` to ``stage``; returns the updated version.

        Promoting to ``"production"`` archives the current production version
        of that name; both rows go in one insert (one atomic block).
        """
        _check_stage(stage)
        current = self._get_row(name, version)
        if current.stage == stage:
            return current
        updated = _with(current, stage=stage, revision=current.revision + 1)
        self._insert([*self._demotions(updated), updated])
        return updated

    # -- reads ----------------------------------------------------------------

    def list(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first (no checksum verification)."""
        rows = self.client.query(
            f"SELECT {', '.join(_COLUMNS)} FROM {self.table} FINAL "
            "WHERE name = {name:String} ORDER BY version",
            parameters={"name": _check_name(name)},
        ).result_rows
        return [_from_row(r) for r in rows]

    def get(self, name: str, version: int) -> ModelVersion:
        """The given version, its artifact verified; ``KeyError`` if unknown."""
        return self.verify(self._get_row(name, version))

    def latest(self, name: str, stage: Stage | str = "production") -> ModelVersion | None:
        """The highest version of ``name`` in ``stage`` (artifact verified), or ``None``."""
        _check_stage(stage)
        in_stage = [mv for mv in self.list(name) if mv.stage == stage]
        return self.verify(in_stage[-1]) if in_stage else None

    def verify(self, mv: ModelVersion) -> ModelVersion:
        """Return ``mv`` if its artifact exists with the recorded sha256, else raise ModelIntegrityError."""
        path = mv.path
        if not path.is_file():
            raise ModelIntegrityError(f"{mv.name} v{mv.version}: artifact {path} is missing")
        actual = sha256_file(path)
        if actual != mv.sha256:
            raise ModelIntegrityError(
                f"{mv.name} v{mv.version}: artifact {path} has sha256 {actual}, registry recorded {mv.sha256}; "
                "the file was modified or replaced after registration"
            )
        return mv

    # -- internals ------------------------------------------------------------

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise InvalidModelInput("registry clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    def _max_version(self, name: str) -> int:
        rows = self.client.query(
            f"SELECT max(version) FROM {self.table} WHERE name = {{name:String}}", parameters={"name": name}
        ).result_rows
        return int(rows[0][0] or 0) if rows else 0

    def _get_row(self, name: str, version: int) -> ModelVersion:
        for mv in self.list(name):
            if mv.version == version:
                return mv
        raise KeyError(f"model {name!r} has no version {version}")

    def _demotions(self, promoted: ModelVersion) -> builtins.list[ModelVersion]:
        if promoted.stage != "production":
            return []
        return [
            _with(mv, stage="archived", revision=mv.revision + 1)
            for mv in self.list(promoted.name)
            if mv.stage == "production" and mv.version != promoted.version
        ]

    def _copy_in(self, src: Path, name: str, version: int, suffix: str) -> Path:
        folder = self.artifact_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"v{version}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".v{version}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def _insert(self, versions: builtins.list[ModelVersion]) -> None:
        rows = [
            [mv.name, mv.version, mv.revision, mv.stage, mv.artifact_uri, mv.sha256, mv.created_at,
             mv.metrics, mv.lineage]
            for mv in versions
        ]
        self.client.insert(self.table, rows, column_names=_COLUMNS)


def _check_companions(companions: Sequence[Path]) -> builtins.list[Path]:
    paths = [Path(c) for c in companions]
    for path in paths:
        if not path.is_file():
            raise InvalidModelInput(f"companion {path} does not exist or is not a file")
        if not _SUFFIX_RE.match(path.suffix) or path.suffix == ".onnx":
            raise InvalidModelInput(f"companion {path} needs a suffix other than .onnx (like .pt)")
    suffixes = [p.suffix for p in paths]
    if len(set(suffixes)) != len(suffixes):
        raise InvalidModelInput(f"companions need distinct suffixes, got {suffixes}")
    return paths


def _with(mv: ModelVersion, **changes: Any) -> ModelVersion:
    return replace(mv, **changes)


def _from_row(row: tuple[Any, ...]) -> ModelVersion:
    name, version, revision, stage, uri, sha, created_at, metrics, lineage = row
    if isinstance(sha, bytes):
        sha = sha.decode()
    if created_at.tzinfo is None:  # chdb returns naive datetimes for DateTime64(.., 'UTC')
        created_at = created_at.replace(tzinfo=UTC)
    return ModelVersion(
        name=name, version=int(version), stage=str(stage), artifact_uri=uri, sha256=sha,
        created_at=created_at.astimezone(UTC), metrics={k: float(v) for k, v in metrics.items()},
        lineage=dict(lineage), revision=int(revision),
    )
