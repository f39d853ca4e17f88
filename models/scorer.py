"""Batch scorers for the inference stage (implementations of :class:`models.base.BatchScorer`).

* :class:`OnnxScorer` — a registered model, run by ONNX Runtime (CUDA EP when
  a GPU is present, else one CPU thread).
* :class:`RuleScorer` — a fixed, hand-weighted fallback used before any model
  has been trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort  # ships no stubs: ignore_missing_imports in pyproject.toml

from models.base import InvalidModelInput, ModelIntegrityError
from models.export import INPUT_NAME, OUTPUT_NAME, sha256_file

__all__ = ["DEFAULT_RULE_BIAS", "DEFAULT_RULE_WEIGHTS", "OnnxScorer", "RuleScorer", "select_providers"]

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"


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


class OnnxScorer:
    """Scores feature matrices with an ONNX model exported by :func:`models.export.export_onnx`.

    The graph must have input ``"features"`` float32 ``(n, F)`` and output
    ``"score"`` float32 ``(n,)``. ``provider`` names the execution provider
    actually serving (the first one the session kept: CUDA may be dropped by
    onnxruntime at load time if the CUDA libraries are missing). On CPU the
    session uses ``intra_op_num_threads`` threads (default 1: the stages share
    a small machine, and micro-batches of an MLP gain little from more).
    ``predict`` is thread-safe (``InferenceSession.run`` is). With
    ``expected_sha256`` the file is checked before loading and a mismatch
    raises :class:`~models.base.ModelIntegrityError`; a missing file raises it too.
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
        if not self.path.is_file():
            raise ModelIntegrityError(f"ONNX model not found: {self.path}")
        if expected_sha256 is not None:
            actual = sha256_file(self.path)
            if actual != expected_sha256:
                raise ModelIntegrityError(
                    f"{self.path}: sha256 {actual} does not match the expected {expected_sha256}; refusing to load"
                )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_num_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=select_providers(prefer_gpu))
        self.provider: str = self._session.get_providers()[0]
        self.n_features = self._input_width()

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
        """P(fraud) per row of ``X`` (n, F) as float64 ``(n,)``; ``n == 0`` gives an empty array."""
        x = _check_matrix(X, self.n_features)
        if x.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        (scores,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return np.asarray(scores, dtype=np.float64).reshape(x.shape[0])

    def warmup(self, batch_size: int = 64) -> None:
        """Run one dummy batch so the first real batch does not pay session/kernel set-up."""
        self.predict(np.zeros((batch_size, self.n_features), dtype=np.float32))


DEFAULT_RULE_WEIGHTS: Mapping[str, float] = {
    "card_count_1m": 0.9,  # bursts of payments on one card
    "card_count_1h": 0.3,
    "card_distinct_merchants_1h": 0.6,  # card tested across many merchants
    "user_new_device_logins_1h": 1.2,  # account take-over
    "amount": 0.35,
    "is_digital_goods": 1.0,  # resellable, instantly delivered
    "user_clicks_30m": -0.3,  # browsing before buying looks human
}
"""Fallback weights per feature name, applied to ``log1p(max(x, 0))``. Hand-set, not learnt."""

DEFAULT_RULE_BIAS = -5.0
"""Intercept of the fallback: a payment with all-zero features scores ~0.7%."""


class RuleScorer:
    """Deterministic fallback scorer used before any trained model exists.

    ``score = sigmoid(bias + sum_i w_i * log1p(max(x_i, 0)))`` over the named
    features in ``weights`` (``log1p`` tames amounts and counts). With the
    default weights, names missing from ``feature_names`` are skipped, so the
    scorer works for any feature layout; explicit ``weights`` must all name
    known features. It is a crude prior, not a model: expect an AUC well above
    0.5 on obvious fraud patterns and nothing more.

    >>> s = RuleScorer(["amount", "is_digital_goods"])
    >>> p = s.predict(np.array([[10.0, 0.0], [900.0, 1.0]], dtype=np.float32))
    >>> bool(p[1] > p[0]), s.version
    (True, 'rules-0')
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        version: str = "rules-0",
        *,
        weights: Mapping[str, float] | None = None,
        bias: float = DEFAULT_RULE_BIAS,
    ) -> None:
        self.feature_names = list(feature_names)
        self.version = version
        self.bias = float(bias)
        index = {name: i for i, name in enumerate(self.feature_names)}
        if weights is None:
            chosen = {k: v for k, v in DEFAULT_RULE_WEIGHTS.items() if k in index}
        else:
            unknown = sorted(set(weights) - set(index))
            if unknown:
                raise InvalidModelInput(f"rule weights name unknown features: {unknown}")
            chosen = dict(weights)
        self.weights = chosen
        self._w = np.zeros(len(self.feature_names), dtype=np.float64)
        for name, w in chosen.items():
            self._w[index[name]] = w

    def __repr__(self) -> str:
        return f"RuleScorer(version={self.version!r}, weights={self.weights}, bias={self.bias})"

    def predict(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """P(fraud) per row as float64 ``(n,)``; NaN features count as 0."""
        x = _check_matrix(X, len(self.feature_names)).astype(np.float64)
        z = self.bias + np.log1p(np.clip(np.nan_to_num(x, nan=0.0, posinf=1e12), 0.0, None)) @ self._w
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))
