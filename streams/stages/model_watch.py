"""Hot swap and routing: follows ``model.events`` and keeps inference's :class:`ModelSet` current.

Runs in every inference process with a group id of its own, so it reads the
whole topic from the start and folds it into each version's latest stage
(a promotion to production archives the previous production version, as the
registry does). From that fold: the production version is the champion, the
newest canary version takes ``canary_fraction`` of the entities, and every
shadow version scores in shadow. A version is loaded (checksum verified) and
warmed on this stage's own thread, in the background of inference; only when
every scorer of the new set is ready is the set swapped in, atomically,
between two inference batches. A version that does not load is logged and
left out; the set keeps serving what it served. A version trained for another definition of the model
(its lineage's ``model_definition``: other features, another label) never serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.base import BatchScorer
from models.scorer import load_scorer
from streams import topics as T
from streams.base import Message, Stage, StepResult
from streams.codec import AvroCodec, decoded
from streams.project.spec import Model
from streams.serving.routing import ModelSet, ModelSlot

log = logging.getLogger(__name__)

SERVING_STAGES = ("production", "canary", "shadow")
Loader = Callable[[dict[str, Any]], BatchScorer]


def load_event_artifact(event: dict[str, Any], backend: str = "onnx") -> BatchScorer:
    """The scorer of a ``model.events`` record's artifact, loaded, checksum verified and warmed; named
    ``<model>-v<version>``."""
    scorer = load_scorer(Path(event["artifact_uri"]), f"{event['model_name']}-v{event['version']}", backend=backend,
                         expected_sha256=event["sha256"],
                         torch_sha256=(event.get("lineage") or {}).get("torchscript_sha256"))
    warmup = getattr(scorer, "warmup", None)
    if warmup is not None:
        warmup()
    return scorer


class ModelWatchStage(Stage):
    """Keeps one model's serving set current (see the module docstring). ``rename`` maps the default topic
    name to the one actually used (tests)."""

    def __init__(self, model: Model, slot: ModelSlot, *, canary_fraction: float = 0.1, backend: str = "onnx",
                 loader: Loader | None = None, rename: dict[str, str] | None = None) -> None:
        self.model = model
        self.step_id = f"model-watch-{model.name}"
        self.topics: tuple[str, ...] = ((rename or {}).get(T.MODEL_EVENTS, T.MODEL_EVENTS),)
        self.slot = slot
        self.canary_fraction = canary_fraction
        self.backend = backend
        self._load = loader or (lambda event: load_event_artifact(event, backend))
        self._in = {self.topics[0]: AvroCodec(T.MODEL_EVENTS)}
        self.stages: dict[int, dict[str, Any]] = {}  # version -> its latest model.events record
        self._loaded: dict[tuple[int, str], BatchScorer] = {}  # (version, sha256) -> scorer
        self._broken: set[tuple[int, str]] = set()
        self._foreign: set[int] = set()  # versions trained for another definition of the model

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        changed = False
        for _, event in decoded(batch, self._in, result):
            if event["model_name"] != self.model.name or \
                    event["stage"] not in (*SERVING_STAGES, "candidate", "archived"):
                continue  # another model, or a refused command (it changed nothing)
            trained_for = (event.get("lineage") or {}).get("model_definition")
            if trained_for != self.model.definition and event["stage"] in SERVING_STAGES:
                if event["version"] not in self._foreign:
                    self._foreign.add(event["version"])
                    log.warning("%s v%d was trained for definition %s; the project declares %s: not served",
                                self.model.name, event["version"], trained_for or "(unknown)", self.model.definition)
                continue
            if event["stage"] == "production":
                for other in self.stages.values():
                    if other["stage"] == "production" and other["version"] != event["version"]:
                        other["stage"] = "archived"
            self.stages[event["version"]] = dict(event)
            changed = True
        if changed:
            self.apply()
        return result

    def apply(self) -> None:
        """Build the set the fold asks for (loading what is new) and swap it in if it differs."""
        by_stage: dict[str, list[dict[str, Any]]] = {s: [] for s in SERVING_STAGES}
        for event in sorted(self.stages.values(), key=lambda e: e["version"]):
            if event["stage"] in by_stage:
                by_stage[event["stage"]].append(event)
        current = self.slot.models
        champion = self._scorer(by_stage["production"][-1]) if by_stage["production"] else None
        canary = self._scorer(by_stage["canary"][-1]) if by_stage["canary"] else None
        shadows = tuple(s for s in map(self._scorer, by_stage["shadow"]) if s is not None)
        new = ModelSet(champion or current.champion, canary, self.canary_fraction if canary else 0.0, shadows)
        if new.versions() != current.versions() or new.canary_fraction != current.canary_fraction:
            self.slot.swap(new)
            log.warning("inference now serves %s", new.versions())
        for key in [k for k in self._loaded if k[0] not in self.stages or
                    self.stages[k[0]]["stage"] not in SERVING_STAGES]:
            del self._loaded[key]  # no longer serving: let its session go

    def _scorer(self, event: dict[str, Any]) -> BatchScorer | None:
        key = (event["version"], event["sha256"])
        if key not in self._loaded and key not in self._broken:
            try:
                self._loaded[key] = self._load(event)
            except Exception as exc:  # a bad artifact must not stop serving what already serves
                self._broken.add(key)
                log.error("%s v%d (%s) not loaded, left out of serving: %s", self.model.name, event["version"],
                          event["stage"], exc)
        return self._loaded.get(key)
