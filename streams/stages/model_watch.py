"""Hot swap: follows ``model.events`` and switches inference to each new production version.

Runs in every inference process with a group id of its own, so it reads the
whole topic from the start and ends on the newest production version. The
new ONNX session is loaded and warmed before the swap; the swap happens
between inference batches (see :class:`streams.stages.inference.ModelSlot`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from models.scorer import OnnxScorer
from streams import topics as T
from streams.base import Message, StepResult
from streams.codec import AvroCodec, decoded
from streams.stages.inference import MODEL_NAME, ModelSlot, model_version_name

log = logging.getLogger(__name__)


class ModelWatchStage:
    step_id = "model-watch"
    topics = (T.MODEL_EVENTS,)

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot
        self._in = {T.MODEL_EVENTS: AvroCodec(T.MODEL_EVENTS)}
        self._version = 0

    def handle(self, batch: list[Message]) -> StepResult:
        result = StepResult()
        newest = None
        for _, event in decoded(batch, self._in, result):
            if event["model_name"] == MODEL_NAME and event["stage"] == "production" and event["version"] > self._version:
                newest = event
        if newest is not None:
            scorer = OnnxScorer(Path(newest["artifact_uri"]), model_version_name(newest["version"]),
                                expected_sha256=newest["sha256"])
            scorer.warmup()
            self.slot.swap(scorer)
            self._version = newest["version"]
            log.warning("inference now serves %s (%s)", scorer.version, scorer.provider)
        return result
