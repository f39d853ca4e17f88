"""Batch scorers for the inference stage (implementations of :class:`models.base.BatchScorer`).

* :class:`OnnxScorer` — a registered model, run by ONNX Runtime (CUDA EP with
  I/O binding when a GPU is present, else one CPU thread).
* :class:`models.torch_scorer.TorchScorer` — the same model's TorchScript
  companion, run by torch (the alternative backend).
* :class:`RuleScorer` — a fixed, hand-weighted fallback used before any model
  has been trained (the weights are the project's).

:func:`load_scorer` picks the backend for a registered model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # ships no stubs: ignore_missing_imports in pyproject.toml

from models.base import BatchScorer, InvalidModelInput, ModelIntegrityError
from models.export import INPUT_NAME, OUTPUT_NAME, sha256_file

__all__ = ["BACKENDS", "OnnxScorer", "RuleScorer", "load_scorer", "select_providers"]

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

CUDA_OPTIONS: Final[dict[str, str]] = {"use_tf32": "0"}
"""CUDA EP options: full float32 matmuls. TF32 (on by default from Ampere) rounds inputs to 10 mantissa
bits, which would move scores by ~1e-4, past the 1e-5 parity with torch on CPU; a micro-batch MLP gains
nothing from it."""

BACKENDS: Final[tuple[str, ...]] = ("onnx", "torch")
"""What :func:`load_scorer` can serve a registered model with."""


def select_providers(prefer_gpu: bool = True) -> list[str]:
    """``[CUDA, CPU]`` when ``prefer_gpu`` and this onnxruntime build has the CUDA EP, else ``[CPU]``."""
    if prefer_gpu and CUDA_EP in ort.get_available_providers():
        return [CUDA_EP, CPU_EP]
    return [CPU_EP]


def _check_matrix(X: npt.ArrayLike, n_features: int) -> npt.NDArray[np.float32]:
    x = np.asarray(X)
    if x.ndim != 2 or x.shape[1] != n_features:
        raise InvalidModelInput(f"expected a (n, {n_features}) feature matrix, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_artifact(path: Path, expected_sha256: str | None, kind: str) -> None:
    """Raise :class:`ModelIntegrityError` if ``path`` is missing or (with ``expected_sha256``) differs."""
    if not path.is_file():
        raise ModelIntegrityError(f"{kind} model not found: {path}")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise ModelIntegrityError(
                f"{path}: sha256 {actual} does not match the expected {expected_sha256}; refusing to load"
            )


class OnnxScorer:
    """Scores feature matrices with an ONNX model exported by :func:`models.export.export_onnx`.

    The graph must have input ``"features"`` float32 ``(n, F)`` and output
    ``"score"`` float32 ``(n,)``. ``provider`` names the execution provider
    actually serving (the first one the session kept: CUDA may be dropped by
    onnxruntime at load time if the CUDA libraries are missing). On CPU the
    session uses ``intra_op_num_threads`` threads (default 1: the stages share
    a small machine, and micro-batches of an MLP gain little from more).
    When CUDA serves (full float32: :data:`CUDA_OPTIONS`), ``predict`` uses
    I/O binding: the batch is copied to the GPU once, the output is bound on
    the GPU (onnxruntime allocates it: the batch size is known only at run
    time) and copied back once, instead of leaving both copies to ``run``.
    ``predict`` is thread-safe (``InferenceSession.run`` is, and each call
    binds its own ``IOBinding``). With ``expected_sha256`` the file is checked
    before loading and a mismatch raises
    :class:`~models.base.ModelIntegrityError`; a missing file raises it too.
    """

    def __init__(
        self,
        path: Path,
        version: str,
        *,
        prefer_gpu: bool = True,
        intra_op_num_threads: int = 1,
        expected_sha256: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.version = version
        _check_artifact(self.path, expected_sha256, "ONNX")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_num_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = [(p, CUDA_OPTIONS) if p == CUDA_EP else p for p in select_providers(prefer_gpu)]
        self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        self.provider: str = self._session.get_providers()[0]
        self.n_features = self._input_width()
        self._cuda_device_id: int | None = self._cuda_device() if self.provider == CUDA_EP else None

    def _cuda_device(self) -> int:
        """The GPU the CUDA EP runs on (its ``device_id`` option; 0 unless configured)."""
        options: dict[str, Any] = self._session.get_provider_options().get(CUDA_EP, {})
        return int(options.get("device_id", 0))

    def _input_width(self) -> int:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise InvalidModelInput(
                f"{self.path}: graph must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        width = inputs[INPUT_NAME].shape[1]
        if not isinstance(width, int):
            raise InvalidModelInput(f"{self.path}: input {INPUT_NAME!r} needs a fixed feature width, got {width!r}")
        return width

    def __repr__(self) -> str:
        return f"OnnxScorer(version={self.version!r}, provider={self.provider!r}, path={str(self.path)!r})"

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The score per row of ``X`` (n, F) as float64 ``(n,)``; ``n == 0`` gives an empty array."""
        x = _check_matrix(X, self.n_features)
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        if self._cuda_device_id is not None:
            scores = self._run_bound(x, "cuda", self._cuda_device_id)
        else:
            (scores,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return np.asarray(scores, dtype=np.float64).reshape(x.shape[0])

    def _run_bound(
        self, x: npt.NDArray[np.float32], device_type: str, device_id: int
    ) -> npt.NDArray[np.float32]:
        """One run with I/O binding on ``device_type``/``device_id`` (``"cuda"`` when serving on a GPU;
        ``"cpu"`` works too, which is how CI without a GPU exercises this path)."""
        binding = self._session.io_binding()  # one per call: an IOBinding holds per-run state
        features = ort.OrtValue.ortvalue_from_numpy(x, device_type, device_id)  # the one host -> device copy
        binding.bind_ortvalue_input(INPUT_NAME, features)
        binding.bind_output(OUTPUT_NAME, device_type, device_id)  # allocated on the device by onnxruntime
        self._session.run_with_iobinding(binding)
        (scores,) = binding.copy_outputs_to_cpu()  # the one device -> host copy
        return np.asarray(scores, dtype=np.float32)

    def warmup(self, batch_size: int = 64) -> None:
        """Run one dummy batch so the first real batch does not pay session/kernel set-up."""
        self.predict(np.zeros((batch_size, self.n_features), dtype=np.float32))


def load_scorer(
    path: Path,
    version: str,
    *,
    backend: str = "onnx",
    expected_sha256: str | None = None,
    torch_sha256: str | None = None,
    prefer_gpu: bool = True,
) -> BatchScorer:
    """The scorer for a registered model: its ONNX artifact ``path`` run by ``backend``.

    ``"onnx"``: an :class:`OnnxScorer` on ``path``. ``"torch"``: a
    :class:`~models.torch_scorer.TorchScorer` on the TorchScript companion
    registered next to it, ``path.with_suffix(".pt")``. ``expected_sha256`` is
    the ONNX artifact's recorded checksum (the registry's ``sha256``), checked
    for both backends; ``torch_sha256`` is the companion's (the lineage's
    ``torchscript_sha256``), checked when given. A missing file or a mismatch
    raises :class:`~models.base.ModelIntegrityError`; an unknown ``backend``
    raises ``ValueError``. Both scorers use the GPU when ``prefer_gpu`` and one
    is usable, else the CPU.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ValueError(f"unknown scoring backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "onnx":
        return OnnxScorer(path, version, prefer_gpu=prefer_gpu, expected_sha256=expected_sha256)
    # Imported here: models.torch_scorer imports this module (the shared input and artifact checks).
    from models.torch_scorer import TorchScorer

    _check_artifact(path, expected_sha256, "ONNX")
    companion = path.with_suffix(".pt")
    if not companion.is_file():
        raise ModelIntegrityError(
            f"{version}: {path} was registered without a TorchScript companion ({companion} is missing); "
            "retrain to produce one, or serve with backend 'onnx'"
        )
    return TorchScorer(companion, version, prefer_gpu=prefer_gpu, expected_sha256=torch_sha256)


class RuleScorer:
    """Deterministic fallback scorer used before any trained model exists (and when every model failed).

    ``link="logistic"`` (a binary model): ``score = sigmoid(bias + sum_i w_i * log1p(max(x_i, 0)))``
    over the named features in ``weights`` (``log1p`` tames amounts and counts); ``link="identity"``
    (a regression): ``score = bias + sum_i w_i * x_i``. Every weight must name a feature of
    ``feature_names``. It is a crude prior, not a model: the weights are a person's, not learnt.

    >>> s = RuleScorer(["amount", "is_digital_goods"], weights={"amount": 0.35, "is_digital_goods": 1.0}, bias=-5)
    >>> p = s.predict(np.array([[10.0, 0.0], [900.0, 1.0]], dtype=np.float32))
    >>> bool(p[1] > p[0]), s.version
    (True, 'rules-0')
    >>> RuleScorer(["eta"], weights={"eta": 2.0}, bias=1.0, link="identity").predict(np.array([[3.0]], np.float32))
    array([7.])
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        version: str = "rules-0",
        *,
        weights: Mapping[str, float] | None = None,
        bias: float = 0.0,
        link: str = "logistic",
    ) -> None:
        if link not in ("logistic", "identity"):
            raise InvalidModelInput(f"rule link {link!r} is not logistic or identity")
        self.feature_names = list(feature_names)
        self.version = version
        self.bias = float(bias)
        self.link = link
        index = {name: i for i, name in enumerate(self.feature_names)}
        chosen = dict(weights or {})
        unknown = sorted(set(chosen) - set(index))
        if unknown:
            raise InvalidModelInput(f"rule weights name unknown features: {unknown}")
        self.weights = chosen
        self._w = np.zeros(len(self.feature_names), dtype=np.float64)
        for name, w in chosen.items():
            self._w[index[name]] = w

    def __repr__(self) -> str:
        return f"RuleScorer(version={self.version!r}, weights={self.weights}, bias={self.bias}, link={self.link!r})"

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """The rule score per row as float64 ``(n,)``; NaN features count as 0."""
        x = np.nan_to_num(_check_matrix(X, len(self.feature_names)).astype(np.float64), nan=0.0, posinf=1e12,
                          neginf=-1e12)
        if self.link == "identity":
            return np.asarray(self.bias + x @ self._w, dtype=np.float64)
        z = self.bias + np.log1p(np.clip(x, 0.0, None)) @ self._w
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))
