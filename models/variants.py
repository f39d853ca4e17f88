"""Quantized variants of an exported model, measured side by side for the registry.

:func:`quantize_int8` derives an INT8 *dynamic* quantization of the FP32 graph
written by :func:`models.export.export_onnx`; :func:`evaluate_variants`
measures both (parity with torch, latency, accuracy, size) and
:func:`report_metrics` flattens the reports into registry metric keys.

Both variants keep the graph contract of :mod:`models.export` (input
``"features"`` float32 ``(n, F)``, output ``"score"`` float32 ``(n,)``), so
either loads in :class:`models.scorer.OnnxScorer`.

One behavioural difference matters to callers: the INT8 graph quantizes its
activations with a scale computed *per call* from the whole batch, so the
score of a row depends (slightly) on the other rows it is scored with. The
FP32 graph has no such coupling. The parity bound the tests check covers it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic  # no stubs: ignore_missing_imports
from torch import nn

from models.base import BatchScorer, InvalidModelInput
from models.export import INPUT_NAME, OUTPUT_NAME, max_abs_diff_vs_torch, sha256_file
from models.metrics import log_loss, roc_auc
from models.scorer import OnnxScorer

__all__ = [
    "QUANTIZED_OP_TYPES",
    "VariantName",
    "VariantReport",
    "evaluate_variant",
    "evaluate_variants",
    "initializer_bytes",
    "latency_ms",
    "quantize_int8",
    "report_metrics",
]

VariantName = Literal["fp32", "int8"]

QUANTIZED_OP_TYPES = ("MatMul", "Gemm")
"""Ops whose weights :func:`quantize_int8` quantizes: the only weighted ops of the MLP graph."""

WARMUP_RUNS = 10
"""Untimed calls before each latency measurement (session and kernel set-up)."""

Clock = Callable[[], int]
"""Monotonic clock in nanoseconds."""


def quantize_int8(fp32_path: Path, out_path: Path, *, reduce_range: bool = False) -> str:
    """Write an INT8 dynamic quantization of the FP32 graph ``fp32_path`` to ``out_path``; return its sha256.

    Weights of ``MatMul``/``Gemm`` (:data:`QUANTIZED_OP_TYPES`) become int8,
    per tensor, at write time; activations are quantized to uint8 at run time
    (``DynamicQuantizeLinear`` per call) feeding ``MatMulInteger``. The
    standardization (``Sub``/``Div``), ``Relu`` and ``Sigmoid`` stay FP32, so
    inputs and outputs keep the :mod:`models.export` contract, which is
    checked on the written file (:class:`~models.base.InvalidModelInput`
    otherwise) along with ``onnx.checker``.

    ``quant_pre_process`` is not run: ``quantize_dynamic`` already does ONNX
    shape inference, and on this graph pre-processing only folds one
    ``Constant`` and stores shape annotations (a larger file, identical
    outputs). ``quantize_dynamic`` therefore logs a "consider pre-processing"
    warning on the root logger; it is harmless here.

    ``reduce_range`` quantizes weights to 7 bits: onnxruntime's advice for x86
    CPUs without VNNI, where its u8s8 kernels can saturate.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        fp32_path,
        out_path,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        weight_type=QuantType.QInt8,
        reduce_range=reduce_range,
    )
    model = onnx.load(str(out_path))
    onnx.checker.check_model(model)
    _check_graph_contract(model, out_path)
    return sha256_file(out_path)


def _check_graph_contract(model: onnx.ModelProto, path: Path) -> None:
    """Input ``"features"`` float32 rank 2, output ``"score"`` float32 rank 1, nothing else."""
    float32 = onnx.TensorProto.FLOAT
    found = {"inputs": _signature(model.graph.input), "outputs": _signature(model.graph.output)}
    expected = {"inputs": [(INPUT_NAME, float32, 2)], "outputs": [(OUTPUT_NAME, float32, 1)]}
    if found != expected:
        raise InvalidModelInput(f"{path}: graph (name, elem_type, rank) is {found}, expected {expected}")


def _signature(values: Sequence[onnx.ValueInfoProto]) -> list[tuple[str, int, int]]:
    return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values]


def initializer_bytes(path: Path) -> int:
    """Bytes of the graph's stored tensors (weights, biases, scales): the part quantization shrinks.

    The rest of an ONNX file is graph structure (nodes and names), which
    quantization grows; for a small MLP that outweighs the weight saving.
    """
    graph = onnx.load(str(path)).graph
    return sum(int(numpy_helper.to_array(t).nbytes) for t in graph.initializer)


@dataclass(frozen=True)
class VariantReport:
    """Measurements of the ONNX variant at ``path`` of a model, as made by :func:`evaluate_variant`.

    ``max_abs_diff_vs_torch`` is ``max |P_onnx - P_torch|`` over the
    evaluation rows scored as one batch. ``p50_ms``/``p99_ms`` are latencies
    of one :meth:`OnnxScorer.predict` call on a batch of ``batch_size`` rows,
    CPU provider, one thread. ``roc_auc`` (``nan`` with a single class) and
    ``log_loss`` are of this variant's scores on the validation rows when the
    labels are binary (``nan`` otherwise); ``mae`` is their mean absolute error.
    """

    name: VariantName
    path: Path
    sha256: str
    size_bytes: int
    weight_bytes: int
    max_abs_diff_vs_torch: float
    p50_ms: float
    p99_ms: float
    roc_auc: float
    log_loss: float
    mae: float = math.nan


def latency_ms(
    scorer: BatchScorer,
    batch: npt.NDArray[np.float32],
    *,
    repeats: int,
    warmup: int = WARMUP_RUNS,
    clock: Clock = time.perf_counter_ns,
) -> tuple[float, float]:
    """``(p50, p99)`` in milliseconds of ``scorer.predict(batch)`` over ``repeats`` timed calls.

    ``warmup`` untimed calls come first. Blocks for all the calls; the figures
    are as noisy as the machine is busy, so they are for recording, not for
    asserting on. ``clock`` returns nanoseconds (injectable for tests).
    """
    if repeats < 1:
        raise InvalidModelInput(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        scorer.predict(batch)
    elapsed_ns = np.empty(repeats, dtype=np.float64)
    for i in range(repeats):
        start = clock()
        scorer.predict(batch)
        elapsed_ns[i] = clock() - start
    p50, p99 = np.percentile(elapsed_ns, [50.0, 99.0]) / 1e6
    return float(p50), float(p99)


def _batch_of(X: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """``size`` rows of ``X``, cycling through it when it has fewer."""
    return np.ascontiguousarray(np.take(X, np.arange(size) % X.shape[0], axis=0), dtype=np.float32)


def evaluate_variant(
    name: VariantName,
    module: nn.Module,
    path: Path,
    X_val: npt.NDArray[np.float32],
    y_val: npt.NDArray[np.generic],
    *,
    batch_size: int = 256,
    repeats: int = 200,
) -> VariantReport:
    """Measure the ONNX file at ``path`` against its torch ``module`` on ``(X_val, y_val)``.

    Loads the file in a CPU, single-thread :class:`OnnxScorer`; see
    :class:`VariantReport` for what each figure means. Blocks for about
    ``repeats + WARMUP_RUNS`` batch predictions.
    """
    path = Path(path)
    X_val = _check_eval_inputs(X_val, y_val, batch_size, repeats)
    scorer = OnnxScorer(path, version=name, prefer_gpu=False, intra_op_num_threads=1)
    p50, p99 = latency_ms(scorer, _batch_of(X_val, batch_size), repeats=repeats)
    scores = scorer.predict(X_val)
    binary = bool(np.isin(y_val, (0, 1)).all())
    return VariantReport(
        name=name,
        path=path,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        weight_bytes=initializer_bytes(path),
        max_abs_diff_vs_torch=max_abs_diff_vs_torch(module, path, X_val),
        p50_ms=p50,
        p99_ms=p99,
        roc_auc=roc_auc(y_val, scores) if binary else math.nan,
        log_loss=log_loss(y_val, scores) if binary else math.nan,
        mae=float(np.mean(np.abs(np.asarray(y_val, dtype=np.float64) - scores))),
    )


def _check_eval_inputs(
    X_val: npt.NDArray[np.float32], y_val: npt.NDArray[np.generic], batch_size: int, repeats: int
) -> npt.NDArray[np.float32]:
    """``X_val`` as C-contiguous float32, once its shape, ``y_val``'s and the counts are checked."""
    if batch_size < 1 or repeats < 1:
        raise InvalidModelInput(f"batch_size and repeats must be >= 1, got {batch_size} and {repeats}")
    x = np.asarray(X_val)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidModelInput(f"X_val must be a non-empty (n, F) matrix, got shape {x.shape}")
    if np.shape(y_val) != (x.shape[0],):
        raise InvalidModelInput(f"y_val shape {np.shape(y_val)} does not match X_val rows ({x.shape[0]},)")
    return np.ascontiguousarray(x, dtype=np.float32)


def evaluate_variants(
    module: nn.Module,
    fp32_path: Path,
    X_val: npt.NDArray[np.float32],
    y_val: npt.NDArray[np.generic],
    *,
    out_dir: Path,
    batch_size: int = 256,
    repeats: int = 200,
) -> list[VariantReport]:
    """Quantize ``fp32_path`` to INT8 in ``out_dir`` and return ``[fp32 report, int8 report]``.

    The INT8 file is written to ``out_dir / "<fp32 stem>.int8.onnx"``
    (overwritten if present; its report carries its path and sha256). The
    variants are measured one after the other on the same inputs, see
    :func:`evaluate_variant`; bad inputs raise
    :class:`~models.base.InvalidModelInput` before anything is written.
    Meant to run at registration, right after
    :func:`models.export.export_onnx`; :func:`report_metrics` turns the
    result into registry metrics.
    """
    _check_eval_inputs(X_val, y_val, batch_size, repeats)
    fp32_path = Path(fp32_path)
    int8_path = Path(out_dir) / f"{fp32_path.stem}.int8.onnx"
    quantize_int8(fp32_path, int8_path)
    return [
        evaluate_variant("fp32", module, fp32_path, X_val, y_val, batch_size=batch_size, repeats=repeats),
        evaluate_variant("int8", module, int8_path, X_val, y_val, batch_size=batch_size, repeats=repeats),
    ]


_METRIC_KEYS = {
    "size_bytes": "size_bytes",
    "weight_bytes": "weight_bytes",
    "max_abs_diff_vs_torch": "max_abs_diff",
    "p50_ms": "p50_ms",
    "p99_ms": "p99_ms",
    "roc_auc": "roc_auc",
    "log_loss": "log_loss",
    "mae": "mae",
}
"""Numeric :class:`VariantReport` field -> registry key suffix (``path``, ``sha256`` are not metrics)."""


def report_metrics(reports: Sequence[VariantReport]) -> dict[str, float]:
    """Flatten reports into ``{"<variant>_<metric>": value}``, the registry's metrics map.

    The result is meant for the ``metrics`` argument of
    :meth:`models.registry.ModelRegistry.register`.

    Raises :class:`~models.base.InvalidModelInput` when two reports share a name.

    >>> r = VariantReport("int8", Path("m.int8.onnx"), "ab" * 32, 5764, 1019, 0.03, 0.02, 0.05, 0.99, 0.08)
    >>> m = report_metrics([r])
    >>> m["int8_max_abs_diff"], m["int8_p99_ms"], len(m)
    (0.03, 0.05, 8)
    """
    names = [r.name for r in reports]
    if len(set(names)) != len(names):
        raise InvalidModelInput(f"duplicate variant names in {names}")
    metrics: dict[str, float] = {}
    for report in reports:
        for field_name, suffix in _METRIC_KEYS.items():
            metrics[f"{report.name}_{suffix}"] = float(getattr(report, field_name))
    return metrics
