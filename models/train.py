"""Batch training of the fraud MLP with torch.

:func:`train_mlp` takes a point-in-time training set (features, labels, event
times), splits it by time, trains with class-imbalance weighting and early
stopping, and returns a self-contained :class:`FraudMLP` whose forward maps raw
float32 features to P(fraud) — standardization and sigmoid are inside, so the
exported ONNX graph needs no pre/post-processing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.base import InvalidModelInput
from models.metrics import roc_auc

__all__ = ["MIN_ROWS", "FraudMLP", "TrainResult", "pick_device", "train_mlp"]

MIN_ROWS = 50
"""Fewest rows :func:`train_mlp` accepts."""

ProgressFn = Callable[[int, float, float], None]
"""``progress(epoch, loss_train, loss_val)``, called after each epoch (1-based)."""


class FraudMLP(nn.Module):
    """MLP over raw features: ``(x - mean) / std -> [Linear, ReLU]* -> Linear -> sigmoid``.

    ``forward`` takes float32 ``(n, F)`` and returns P(fraud) as float32 ``(n,)``;
    ``logits`` returns the pre-sigmoid scores. ``mean``/``std`` are buffers, so
    they travel with ``state_dict`` and into the ONNX graph.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, n_features: int, hidden: Sequence[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        if mean.shape != (n_features,) or std.shape != (n_features,):
            raise InvalidModelInput(f"mean/std must have shape ({n_features},)")
        self.n_features = n_features
        self.register_buffer("mean", mean.to(torch.float32).clone())
        self.register_buffer("std", std.to(torch.float32).clone())
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores, shape ``(n,)``."""
        out: torch.Tensor = self.net((x - self.mean) / self.std)
        return out.squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """P(fraud), shape ``(n,)``."""
        return torch.sigmoid(self.logits(x))


@dataclass
class TrainResult:
    """Outcome of :func:`train_mlp`.

    ``module`` is on CPU in eval mode with the best (lowest validation loss)
    weights. ``metrics`` holds ``auc_val``, ``loss_val`` (class-weighted BCE on
    the validation split at the best epoch), ``best_epoch`` (1-based),
    ``n_train``, ``n_val``, ``pos_rate_train``, ``epochs_run``. ``curve`` has one
    ``(epoch, loss_train, loss_val, auc_val)`` per epoch run.
    """

    module: FraudMLP
    metrics: dict[str, float]
    curve: list[tuple[int, float, float, float]] = field(default_factory=list)
    device: str = "cpu"


@dataclass
class _Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validate(
    X: npt.NDArray[np.floating], y: npt.NDArray[np.generic], ts: npt.NDArray[np.generic], val_fraction: float
) -> None:
    if X.ndim != 2:
        raise InvalidModelInput(f"X must be 2-D (n, F), got shape {X.shape}")
    n = X.shape[0]
    if y.shape != (n,) or ts.shape != (n,):
        raise InvalidModelInput(f"shape mismatch: X {X.shape}, y {y.shape}, ts {ts.shape}; expected y and ts ({n},)")
    if n < MIN_ROWS:
        raise InvalidModelInput(f"need at least {MIN_ROWS} rows to train, got {n}")
    if not np.isfinite(X).all():
        raise InvalidModelInput(f"X contains {int((~np.isfinite(X)).sum())} NaN/inf values")
    if not np.isin(y, (0, 1)).all():
        raise InvalidModelInput("y must be binary (0/1 or bool)")
    if not 0.0 < val_fraction < 1.0:
        raise InvalidModelInput(f"val_fraction must be in (0, 1), got {val_fraction}")


def _time_split(
    X: npt.NDArray[np.floating], y: npt.NDArray[np.generic], ts: npt.NDArray[np.generic], val_fraction: float
) -> _Split:
    """Sort by event time; the latest ``val_fraction`` of rows is validation."""
    order = np.argsort(ts, kind="stable")
    n_val = max(1, round(len(order) * val_fraction))
    train_idx, val_idx = order[:-n_val], order[-n_val:]
    y_train = y[train_idx].astype(np.float32)
    if y_train.min() == y_train.max():
        raise InvalidModelInput(
            f"the training split has a single class (all {'fraud' if y_train[0] else 'legit'}); "
            "need both fraud and legit examples before the validation cut"
        )
    return _Split(
        x_train=torch.from_numpy(np.ascontiguousarray(X[train_idx], dtype=np.float32)),
        y_train=torch.from_numpy(y_train),
        x_val=torch.from_numpy(np.ascontiguousarray(X[val_idx], dtype=np.float32)),
        y_val=torch.from_numpy(y[val_idx].astype(np.float32)),
    )


def _build_module(split: _Split, hidden: Sequence[int], seed: int) -> FraudMLP:
    mean = split.x_train.mean(dim=0)
    std = split.x_train.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant columns pass through
    # Seed only what we build, without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FraudMLP(split.x_train.shape[1], hidden, mean, std)


def _train_epoch(
    module: FraudMLP,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
) -> float:
    module.train()
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        idx = perm[start : start + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module.logits(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / x.shape[0]


@torch.no_grad()
def _evaluate(module: FraudMLP, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    module.eval()
    logits = module.logits(x)
    loss = float(loss_fn(logits, y))
    auc = roc_auc(y.cpu().numpy().astype(bool), logits.cpu().numpy().astype(np.float64))
    return loss, auc


def calibrate_for_class_weight(module: FraudMLP, pos_weight: float) -> None:
    """Undo the class weighting's shift of the odds, so ``forward`` gives calibrated probabilities.

    Weighting each positive by ``w`` in the loss makes the model learn odds
    ``w`` times the true ones (its logits are ``log w`` too high); subtracting
    ``log w`` from the output bias removes exactly that, leaving the ranking
    (and the AUC) unchanged.
    """
    last = module.net[-1]
    assert isinstance(last, nn.Linear) and last.bias is not None
    with torch.no_grad():
        last.bias.sub_(math.log(pos_weight))


def train_mlp(
    X: npt.NDArray[np.floating],
    y: npt.NDArray[np.generic],
    ts: npt.NDArray[np.generic],
    *,
    seed: int = 0,
    hidden: Sequence[int] = (32, 16),
    max_epochs: int = 60,
    patience: int = 6,
    batch_size: int = 256,
    lr: float = 3e-3,
    val_fraction: float = 0.25,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train a :class:`FraudMLP` on ``X`` (n, F) float, binary ``y`` (n,), event times ``ts`` (n,).

    * Split: rows sorted by ``ts`` (stable); the last ``val_fraction`` is
      validation, so the model is judged on data later than it learnt from.
    * Standardization uses the TRAIN split's mean/std only (no leakage).
    * Imbalance: ``BCEWithLogitsLoss(pos_weight=n_neg/n_pos)`` on the train split;
      validation loss uses the same weighting. The returned model is then calibrated
      back (:func:`calibrate_for_class_weight`): its probabilities are not inflated by the weights.
    * Adam, shuffled minibatches; early stopping when validation loss has not
      improved for ``patience`` epochs; the best epoch's weights are restored.
    * Reproducible: same inputs and ``seed`` on CPU give identical weights
      (the global torch RNG is left untouched). CUDA kernels may differ in the
      last bits between runs.

    Raises :class:`~models.base.InvalidModelInput` (a ``ValueError``) for fewer
    than :data:`MIN_ROWS` rows, mismatched shapes, NaN/inf features,
    non-binary labels, or a single class in the training split.
    """
    X, y, ts = np.asarray(X), np.asarray(y), np.asarray(ts)
    _validate(X, y, ts, val_fraction)
    split = _time_split(X, y, ts, val_fraction)
    dev = pick_device(device)
    module = _build_module(split, hidden, seed).to(dev)
    n_pos = float(split.y_train.sum())
    pos_weight = torch.tensor((len(split.y_train) - n_pos) / n_pos, device=dev)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = split.x_train.to(dev), split.y_train.to(dev)
    xv, yv = split.x_val.to(dev), split.y_val.to(dev)

    curve: list[tuple[int, float, float, float]] = []
    best = (math.inf, math.nan, 0)  # (loss_val, auc_val, epoch)
    best_state = copy.deepcopy(module.state_dict())
    for epoch in range(1, max_epochs + 1):
        loss_train = _train_epoch(module, loss_fn, opt, xt, yt, batch_size, gen)
        loss_val, auc_val = _evaluate(module, loss_fn, xv, yv)
        curve.append((epoch, loss_train, loss_val, auc_val))
        if progress is not None:
            progress(epoch, loss_train, loss_val)
        if loss_val < best[0]:
            best = (loss_val, auc_val, epoch)
            best_state = copy.deepcopy(module.state_dict())
        elif epoch - best[2] >= patience:
            break

    module.load_state_dict(best_state)
    calibrate_for_class_weight(module, float(pos_weight))
    module = module.to("cpu").eval()
    metrics = {
        "auc_val": best[1],
        "loss_val": best[0],
        "best_epoch": float(best[2]),
        "epochs_run": float(len(curve)),
        "n_train": float(len(split.y_train)),
        "n_val": float(len(split.y_val)),
        "pos_rate_train": n_pos / len(split.y_train),
    }
    return TrainResult(module=module, metrics=metrics, curve=curve, device=str(dev))
