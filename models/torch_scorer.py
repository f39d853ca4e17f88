"""Torch backend for the inference stage: a registered model's TorchScript companion.

:class:`TorchScorer` implements :class:`models.base.BatchScorer` on the file
:func:`models.export.export_torchscript` writes next to the ONNX artifact; it
gives the same scores as :class:`models.scorer.OnnxScorer` on that artifact
(``tests/test_scorer_backends.py`` holds them within 1e-5).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from models.base import InvalidModelInput
from models.export import TORCHSCRIPT_META
from models.scorer import _check_artifact, _check_matrix

__all__ = ["TorchScorer"]

log = logging.getLogger(__name__)


class TorchScorer:
    """Scores feature matrices with a TorchScript module written by :func:`models.export.export_torchscript`.

    The module maps float32 ``(n, F)`` to the score float32 ``(n,)``; ``F`` is
    read from the metadata saved with it (``n_features``). It runs on CUDA
    when ``prefer_gpu`` and ``torch.cuda.is_available()``, else on the CPU;
    ``provider`` is ``"torch-cuda"`` or ``"torch-cpu"``. ``predict`` runs under
    ``torch.inference_mode()`` and keeps no state between calls. With
    ``expected_sha256`` the file is checked before loading and a mismatch
    raises :class:`~models.base.ModelIntegrityError`; a missing file raises it too.

    ``threads`` is the CPU thread count the caller wants, but the scorer does
    not apply it: ``torch.set_num_threads`` is process-global, so setting it
    here would also change training and every other torch user in the
    process. The process owner sets it once at start-up (the retrain worker
    does, to 1); a different count is logged so the mismatch is visible.
    """

    def __init__(
        self,
        path: Path,
        version: str,
        *,
        prefer_gpu: bool = True,
        expected_sha256: str | None = None,
        threads: int = 1,
    ) -> None:
        if threads < 1:
            raise InvalidModelInput(f"threads must be >= 1, got {threads}")
        self.path = Path(path)
        self.version = version
        self.threads = threads
        _check_artifact(self.path, expected_sha256, "TorchScript")
        self._device = torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")
        self.provider: str = f"torch-{self._device.type}"
        extra = {TORCHSCRIPT_META: ""}
        # torch leaves jit.load untyped
        self._module = torch.jit.load(  # type: ignore[no-untyped-call]
            str(self.path), map_location=self._device, _extra_files=extra
        )
        self._module.eval()
        self.n_features = self._input_width(extra[TORCHSCRIPT_META])
        if self._device.type == "cpu" and torch.get_num_threads() != threads:
            log.info("%s: torch uses %d CPU threads in this process, %d asked; left as is (process-global)",
                     self.version, torch.get_num_threads(), threads)

    def _input_width(self, meta: str | bytes) -> int:
        try:
            width = json.loads(meta)["n_features"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidModelInput(
                f"{self.path}: no {TORCHSCRIPT_META!r} metadata with the feature width; "
                "export it with models.export.export_torchscript"
            ) from exc
        if not isinstance(width, int) or width < 1:
            raise InvalidModelInput(f"{self.path}: needs a fixed feature width, got {width!r}")
        return width

    def __repr__(self) -> str:
        return f"TorchScorer(version={self.version!r}, provider={self.provider!r}, path={str(self.path)!r})"

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The score per row of ``X`` (n, F) as float64 ``(n,)``; ``n == 0`` gives an empty array."""
        x = _check_matrix(X, self.n_features)
        n = x.shape[0]
        if n == 0:
            return np.empty(0, dtype=np.float64)
        with torch.inference_mode():
            scores = self._module(torch.from_numpy(x).to(self._device))
        if tuple(scores.shape) != (n,):
            raise InvalidModelInput(f"{self.path}: module returned shape {tuple(scores.shape)} for {n} rows")
        return np.asarray(scores.cpu().numpy(), dtype=np.float64)

    def warmup(self, batch_size: int = 64) -> None:
        """Run one dummy batch so the first real batch does not pay kernel selection and allocation."""
        self.predict(np.zeros((batch_size, self.n_features), dtype=np.float32))
