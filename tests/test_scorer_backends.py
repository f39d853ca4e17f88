"""Serving backends: ONNX Runtime (CPU, or CUDA with I/O binding) and torch (TorchScript companion),
both held to the torch module they were exported from; the companion in the registry (real chdb).

The GPU tests need a CUDA GPU with onnxruntime-gpu / a CUDA torch build; elsewhere they are skipped
and say why."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import torch

from models.base import BatchScorer, InvalidModelInput, ModelIntegrityError
from models.export import export_onnx, export_torchscript
from models.registry import ModelRegistry
from models.scorer import CUDA_EP, OnnxScorer, load_scorer
from models.torch_scorer import TorchScorer
from models.train import ScoreMLP

N_FEATURES = 7
TOL = 1e-5
"""Backend vs torch (float32 throughout). Measured on CPU: ONNX 1.2e-7 (300 rows; 3.6e-7 over 4,096),
TorchScript 0."""

ONNX_ON_CUDA = CUDA_EP in ort.get_available_providers()
TORCH_ON_CUDA = torch.cuda.is_available()
BATCHES = [1, 7, 256, 4096]


@pytest.fixture(scope="module")
def module() -> ScoreMLP:
    """An untrained MLP with fixed weights and standardization that matters (column scales 1 .. 1000); its
    weights are scaled up so its scores spread over (0, 1) (std 0.19 over :func:`features`, not 0.01)."""
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as it was
        torch.manual_seed(0)
        scale = torch.logspace(0, 3, N_FEATURES)
        mlp = ScoreMLP(N_FEATURES, [16, 8], mean=0.1 * scale, std=scale).eval()
    with torch.no_grad():
        for param in mlp.net.parameters():
            param.mul_(3.0)
    return mlp


@pytest.fixture(scope="module")
def artifacts(module: ScoreMLP, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """``(model.onnx, its sha256, the sha256 of its companion model.pt)``."""
    path = tmp_path_factory.mktemp("backends") / "model.onnx"
    pt_sha = export_torchscript(module, N_FEATURES, path.with_suffix(".pt"))
    return path, export_onnx(module, N_FEATURES, path), pt_sha


def features(n: int, seed: int = 3) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, N_FEATURES)) * np.logspace(0, 3, N_FEATURES)).astype(np.float32)


def torch_scores(module: ScoreMLP, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    with torch.no_grad():
        out: npt.NDArray[np.float32] = module(torch.from_numpy(X)).numpy()
    return out


def copy_of(artifacts: tuple[Path, str, str], folder: Path, *suffixes: str) -> Path:
    """The artifact files with the given suffixes, copied to ``folder``; returns the ONNX path there."""
    onnx_path = artifacts[0]
    for suffix in suffixes:
        shutil.copyfile(onnx_path.with_suffix(suffix), folder / f"model{suffix}")
    return folder / "model.onnx"


# -- both backends on CPU -------------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "provider"), [("onnx", "CPUExecutionProvider"), ("torch", "torch-cpu")])
def test_backend_scores_like_torch(module: ScoreMLP, artifacts: tuple[Path, str, str], backend: str,
                                   provider: str) -> None:
    path, onnx_sha, torch_sha = artifacts
    scorer = load_scorer(path, "fraud-v1", backend=backend, expected_sha256=onnx_sha, torch_sha256=torch_sha,
                         prefer_gpu=False)
    assert isinstance(scorer, BatchScorer) and scorer.version == "fraud-v1"
    assert scorer.provider == provider and scorer.n_features == N_FEATURES  # type: ignore[attr-defined]
    scorer.warmup()  # type: ignore[attr-defined]
    X = features(300)
    expected = torch_scores(module, X)
    assert expected.std() > 0.1  # scores spread over [0, 1]: agreeing with them is not vacuous
    for n in (0, 1, 2, 300):
        got = scorer.predict(X[:n])
        assert got.dtype == np.float64 and got.shape == (n,)
        np.testing.assert_allclose(got, expected[:n], rtol=0, atol=TOL)
    # row i scores the same alone as in a batch
    np.testing.assert_allclose(scorer.predict(X[41:42]), scorer.predict(X)[41:42], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_backend_rejects_a_wrong_width(artifacts: tuple[Path, str, str], backend: str) -> None:
    scorer = load_scorer(artifacts[0], "v", backend=backend, prefer_gpu=False)
    X = features(5)
    for bad in (X[:, :3], X[0], np.zeros((5, N_FEATURES + 1), dtype=np.float32)):
        with pytest.raises(InvalidModelInput, match=rf"\(n, {N_FEATURES}\)"):
            scorer.predict(bad)


def test_onnx_io_binding_gives_what_run_gives(module: ScoreMLP, artifacts: tuple[Path, str, str]) -> None:
    """The I/O-binding path predict takes on CUDA, run here bound to the CPU (the same calls, another device)."""
    scorer = OnnxScorer(artifacts[0], "v", prefer_gpu=False)
    for n in (1, 7, 256):
        X = features(n, seed=n)
        bound = scorer._run_bound(X, "cpu", 0)
        assert bound.shape == (n,)
        np.testing.assert_array_equal(bound, scorer.predict(X).astype(np.float32))
        np.testing.assert_allclose(bound, torch_scores(module, X), rtol=0, atol=TOL)


def test_torch_backend_needs_the_companion(artifacts: tuple[Path, str, str], tmp_path: Path) -> None:
    onnx_only = copy_of(artifacts, tmp_path, ".onnx")
    load_scorer(onnx_only, "fraud-v3", backend="onnx", prefer_gpu=False)
    with pytest.raises(ModelIntegrityError,
                       match=r"fraud-v3: .*model\.onnx was registered without a TorchScript companion .*model\.pt is "
                             r"missing.*retrain.*or serve with backend 'onnx'"):
        load_scorer(onnx_only, "fraud-v3", backend="torch", prefer_gpu=False)


def test_altered_artifacts_are_refused(artifacts: tuple[Path, str, str], tmp_path: Path) -> None:
    _, onnx_sha, torch_sha = artifacts
    path = copy_of(artifacts, tmp_path, ".onnx", ".pt")
    load_scorer(path, "v", backend="torch", expected_sha256=onnx_sha, torch_sha256=torch_sha, prefer_gpu=False)
    with open(path.with_suffix(".pt"), "ab") as fh:
        fh.write(b"\0")  # still a loadable zip: only the checksum can tell
    load_scorer(path, "v", backend="torch", prefer_gpu=False)
    with pytest.raises(ModelIntegrityError, match=r"model\.pt: sha256 .* does not match the expected"):
        load_scorer(path, "v", backend="torch", expected_sha256=onnx_sha, torch_sha256=torch_sha, prefer_gpu=False)
    # the ONNX artifact's recorded checksum is checked for the torch backend too
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx: sha256 .* does not match"):
        load_scorer(path, "v", backend="torch", expected_sha256="0" * 64, prefer_gpu=False)


def test_unknown_backend_is_a_value_error(artifacts: tuple[Path, str, str]) -> None:
    with pytest.raises(ValueError, match=r"unknown scoring backend 'tensorrt'; allowed: onnx, torch"):
        load_scorer(artifacts[0], "v", backend="tensorrt")


def test_torch_scorer_checks_its_file(module: ScoreMLP, artifacts: tuple[Path, str, str], tmp_path: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="TorchScript model not found"):
        TorchScorer(tmp_path / "missing.pt", "v")
    with pytest.raises(InvalidModelInput, match="threads"):
        TorchScorer(artifacts[0].with_suffix(".pt"), "v", threads=0)
    bare = tmp_path / "bare.pt"  # TorchScript without the width metadata export_torchscript adds
    traced = torch.jit.trace(module, (torch.zeros(2, N_FEATURES),))  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(bare))
    with pytest.raises(InvalidModelInput, match="feature width"):
        TorchScorer(bare, "v", prefer_gpu=False)


def test_export_torchscript_leaves_the_module_alone(module: ScoreMLP, tmp_path: Path) -> None:
    training = ScoreMLP(N_FEATURES, [4], mean=torch.zeros(N_FEATURES), std=torch.ones(N_FEATURES))
    assert training.training
    export_torchscript(training, N_FEATURES, tmp_path / "t.pt")
    assert training.training  # an eval copy was traced
    with pytest.raises(InvalidModelInput, match="n_features"):
        export_torchscript(module, 0, tmp_path / "zero.pt")


# -- the companion in the registry -----------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path, clickhouse_client: Any) -> ModelRegistry:
    reg = ModelRegistry(clickhouse_client, tmp_path / "artifacts")
    reg.ensure_schema()
    return reg


def test_registry_keeps_the_companion_next_to_the_artifact(module: ScoreMLP, artifacts: tuple[Path, str, str],
                                                           registry: ModelRegistry) -> None:
    path, _, torch_sha = artifacts
    companion = path.with_suffix(".pt")
    registry.register("fraud", path, metrics={}, lineage={})  # v1: no companion
    mv = registry.register("fraud", path, metrics={}, lineage={"torchscript_sha256": torch_sha},
                           companions=[companion])
    assert mv.path == registry.artifact_dir / "fraud" / "v2.onnx"
    assert sorted(p.name for p in mv.path.parent.iterdir()) == ["v1.onnx", "v2.onnx", "v2.pt"]
    assert mv.path.with_suffix(".pt").read_bytes() == companion.read_bytes()
    got = registry.get("fraud", 2)
    scorer = load_scorer(got.path, "fraud-v2", backend="torch", expected_sha256=got.sha256,
                         torch_sha256=got.lineage["torchscript_sha256"], prefer_gpu=False)
    X = features(50)
    np.testing.assert_allclose(scorer.predict(X), torch_scores(module, X), rtol=0, atol=TOL)
    with pytest.raises(ModelIntegrityError, match="without a TorchScript companion"):
        load_scorer(registry.get("fraud", 1).path, "fraud-v1", backend="torch")


def test_registry_refuses_unusable_companions(artifacts: tuple[Path, str, str], registry: ModelRegistry,
                                              tmp_path: Path) -> None:
    path = artifacts[0]
    other = tmp_path / "other.pt"
    shutil.copyfile(path.with_suffix(".pt"), other)
    for companions, message in [
        ([tmp_path / "missing.pt"], "does not exist"),
        ([path], "suffix other than .onnx"),
        ([tmp_path], "does not exist"),
        ([path.with_suffix(".pt"), other], "distinct suffixes"),
    ]:
        with pytest.raises(InvalidModelInput, match=message):
            registry.register("fraud", path, metrics={}, lineage={}, companions=companions)
    assert registry.list("fraud") == []
    assert not (registry.artifact_dir / "fraud").exists()  # nothing copied in


# -- GPU (skipped without one) ---------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "provider"), [
    pytest.param("onnx", CUDA_EP, marks=pytest.mark.skipif(
        not ONNX_ON_CUDA,
        reason="no CUDA GPU here: this onnxruntime build has no CUDAExecutionProvider (needs onnxruntime-gpu)")),
    pytest.param("torch", "torch-cuda", marks=pytest.mark.skipif(
        not TORCH_ON_CUDA, reason="no CUDA GPU here: torch.cuda.is_available() is False")),
])
def test_backend_on_cuda_scores_like_cpu(artifacts: tuple[Path, str, str], backend: str, provider: str) -> None:
    """ONNX: the CUDA EP with I/O binding; torch: the TorchScript module on cuda. Both against the CPU."""
    path, onnx_sha, torch_sha = artifacts
    gpu = load_scorer(path, "v", backend=backend, expected_sha256=onnx_sha, torch_sha256=torch_sha)
    cpu = load_scorer(path, "v", backend=backend, prefer_gpu=False)
    assert gpu.provider == provider  # type: ignore[attr-defined]
    if isinstance(gpu, OnnxScorer):
        assert gpu._cuda_device_id is not None  # predict takes the I/O-binding path
    gpu.warmup()  # type: ignore[attr-defined]
    for n in BATCHES:
        X = features(n, seed=n)
        got = gpu.predict(X)
        assert got.dtype == np.float64 and got.shape == (n,)
        np.testing.assert_allclose(got, cpu.predict(X), rtol=0, atol=TOL)
    assert gpu.predict(features(0)).shape == (0,)
