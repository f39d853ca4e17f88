"""Export a scoring module to ONNX and check it against torch.

The graph contract (what :class:`models.scorer.OnnxScorer` relies on):
input ``"features"`` float32 ``(n, F)`` with a dynamic batch axis, output
``"score"`` float32 ``(n,)`` = the score, opset :data:`OPSET`.

The same module is also saved as TorchScript (:func:`export_torchscript`), the
companion file :class:`models.torch_scorer.TorchScorer` serves: same input and
output, its feature width in the saved metadata :data:`TORCHSCRIPT_META`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort  # ships no stubs: ignore_missing_imports in pyproject.toml
import torch
from torch import nn

from models.base import InvalidModelInput

__all__ = [
    "INPUT_NAME", "OPSET", "OUTPUT_NAME", "TORCHSCRIPT_META", "export_onnx", "export_torchscript",
    "max_abs_diff_vs_torch", "sha256_file",
]

INPUT_NAME = "features"
OUTPUT_NAME = "score"
OPSET = 17
TORCHSCRIPT_META = "weir.json"
"""Name of the extra file in a TorchScript export holding ``{"n_features": F}``."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_onnx(module: nn.Module, n_features: int, path: Path) -> str:
    """Write ``module`` (raw features -> the score) to ``path`` as ONNX; return the file's sha256.

    The module is exported in eval mode on CPU (it is not moved or modified:
    a CPU copy is traced when it lives elsewhere). The written model is
    checked with ``onnx.checker``. Uses the TorchScript exporter
    (``dynamo=False``): it needs no ``onnxscript`` and gives a plain, stable
    graph for an MLP.
    """
    if n_features < 1:
        raise InvalidModelInput(f"n_features must be >= 1, got {n_features}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_module = _cpu_eval_copy(module)
    dummy = torch.zeros(2, n_features, dtype=torch.float32)
    with warnings.catch_warnings():
        # The legacy exporter announces its own deprecation on every call.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*feature will be removed.*")
        torch.onnx.export(
            cpu_module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    return sha256_file(path)


def export_torchscript(module: nn.Module, n_features: int, path: Path) -> str:
    """Write ``module`` (raw features -> the score) to ``path`` as TorchScript; return the file's sha256.

    Like :func:`export_onnx`, a CPU eval copy is traced (``torch.jit.trace``:
    the graph must not branch on its input, which an MLP does not) and the
    module is left as it is. ``n_features`` is saved with it (the extra file
    :data:`TORCHSCRIPT_META`) so the loader knows the input width.
    """
    if n_features < 1:
        raise InvalidModelInput(f"n_features must be >= 1, got {n_features}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(2, n_features, dtype=torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(_cpu_eval_copy(module), (dummy,))  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_META: json.dumps({"n_features": n_features})})
    return sha256_file(path)


def _cpu_eval_copy(module: nn.Module) -> nn.Module:
    params = list(module.parameters()) + list(module.buffers())
    on_cpu = all(t.device.type == "cpu" for t in params)
    if on_cpu and not module.training:
        return module

    return copy.deepcopy(module).to("cpu").eval()


def max_abs_diff_vs_torch(module: nn.Module, path: Path, X: npt.NDArray[np.float32]) -> float:
    """Largest ``|torch(X) - onnxruntime_cpu(X)|`` over all rows (0.0 for an empty ``X``)."""
    x = np.ascontiguousarray(X, dtype=np.float32)
    with torch.no_grad():
        expected = _cpu_eval_copy(module)(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    if got.shape != expected.shape:
        raise InvalidModelInput(f"ONNX output shape {got.shape} != torch output shape {expected.shape}")
    if x.shape[0] == 0:
        return 0.0
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
