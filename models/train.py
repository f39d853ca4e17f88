"""Batch training of a tabular MLP with torch, for a binary or a regression model.

:func:`train_mlp` takes a point-in-time training set (features, labels, event
times), splits it by time, trains with early stopping, and returns a
self-contained :class:`ScoreMLP` whose forward maps raw float32 features to the
model's score: a probability (sigmoid head, class-imbalance weighting, then
calibrated back) for ``task="binary"``, the predicted value (a linear head on a
standardized target) for ``task="regression"``. Standardization of the inputs
(and of a regression's target) is inside the network, so the exported ONNX
graph needs no pre/post-processing.
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

__all__ = ["MIN_ROWS", "TASKS", "ScoreMLP", "TrainResult", "pick_device", "train_mlp"]

MIN_ROWS = 50
"""Fewest rows :func:`train_mlp` accepts."""

TASKS = ("binary", "regression")

REGRESSION_CLAMP = 5.0
"""A regression's standardized inputs are clamped to this many training standard deviations."""

ProgressFn = Callable[[int, float, float], None]
"""``progress(epoch, loss_train, loss_val)``, called after each epoch (1-based)."""


class ScoreMLP(nn.Module):
    """MLP over raw features: ``(x - mean) / std -> [Linear, ReLU]* -> Linear -> head``.

    ``forward`` takes float32 ``(n, F)`` and returns float32 ``(n,)``: ``sigmoid`` of the
    logits for a binary model (``task="binary"``), ``y_mean + y_std * output`` for a regression.
    ``logits`` returns the pre-head outputs. ``mean``/``std`` (and ``y_mean``/``y_std``) are buffers,
    so they travel with ``state_dict`` and into the ONNX graph.

    A regression's standardized inputs are clamped to ``±REGRESSION_CLAMP``: its output is unbounded,
    and a feature that barely varied in the training window (a window still filling up) would otherwise
    be extrapolated linearly, tens of standard deviations out (measured on the delivery example: a model
    trained on the first hour of deliveries was 120 minutes off later, 17 with the clamp). A binary
    model's sigmoid bounds its output already.
    """

    mean: torch.Tensor
    std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(self, n_features: int, hidden: Sequence[int], mean: torch.Tensor, std: torch.Tensor,
                 task: str = "binary", y_mean: float = 0.0, y_std: float = 1.0) -> None:
        super().__init__()
        if mean.shape != (n_features,) or std.shape != (n_features,):
            raise InvalidModelInput(f"mean/std must have shape ({n_features},)")
        if task not in TASKS:
            raise InvalidModelInput(f"task {task!r} is not one of {', '.join(TASKS)}")
        self.n_features = n_features
        self.task = task
        self.register_buffer("mean", mean.to(torch.float32).clone())
        self.register_buffer("std", std.to(torch.float32).clone())
        self.register_buffer("y_mean", torch.tensor(float(y_mean), dtype=torch.float32))
        self.register_buffer("y_std", torch.tensor(float(y_std), dtype=torch.float32))
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-head outputs, shape ``(n,)`` (for a regression: the standardized prediction)."""
        z = (x - self.mean) / self.std
        if self.task == "regression":
            z = torch.clamp(z, -REGRESSION_CLAMP, REGRESSION_CLAMP)
        out: torch.Tensor = self.net(z)
        return out.squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The score, shape ``(n,)``: a probability (binary) or the predicted value (regression)."""
        z = self.logits(x)
        if self.task == "binary":
            return torch.sigmoid(z)
        return self.y_mean + self.y_std * z


@dataclass
class TrainResult:
    """Outcome of :func:`train_mlp`.

    ``module`` is on CPU in eval mode with the best (lowest validation loss)
    weights. ``metrics`` holds ``loss_val`` (the training loss on the validation
    split at the best epoch), ``best_epoch`` (1-based), ``n_train``, ``n_val``,
    ``epochs_run``, and for a binary model ``auc_val`` and ``pos_rate_train``, for a
    regression ``mae_val`` and ``rmse_val`` (in the label's units). ``curve`` has one
    ``(epoch, loss_train, loss_val, quality_val)`` per epoch run, the quality being
    the AUC (binary) or the MAE (regression).
    """

    module: ScoreMLP
    metrics: dict[str, float]
    curve: list[tuple[int, float, float, float]] = field(default_factory=list)
    device: str = "cpu"


@dataclass
class _Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    w_train: torch.Tensor
    w_val: torch.Tensor


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validate(
    X: npt.NDArray[np.floating], y: npt.NDArray[np.generic], ts: npt.NDArray[np.generic], val_fraction: float,
    task: str, weights: npt.NDArray[np.floating] | None = None,
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
    if task not in TASKS:
        raise InvalidModelInput(f"task {task!r} is not one of {', '.join(TASKS)}")
    if task == "binary" and not np.isin(y, (0, 1)).all():
        raise InvalidModelInput("y must be binary (0/1 or bool)")
    if task == "regression" and not np.isfinite(np.asarray(y, dtype=np.float64)).all():
        raise InvalidModelInput("y contains NaN/inf values")
    if not 0.0 < val_fraction < 1.0:
        raise InvalidModelInput(f"val_fraction must be in (0, 1), got {val_fraction}")
    if weights is not None and (weights.shape != (n,) or not np.isfinite(weights).all() or (weights <= 0).any()):
        raise InvalidModelInput(f"weights must be ({n},) positive finite numbers, got shape {weights.shape}")


def _time_split(
    X: npt.NDArray[np.floating], y: npt.NDArray[np.generic], ts: npt.NDArray[np.generic], val_fraction: float,
    task: str, weights: npt.NDArray[np.floating], val_after: int | None = None,
) -> _Split:
    """Sort by event time; the latest ``val_fraction`` of rows (of the rows at or after ``val_after``, if
    there are some) is validation."""
    order = np.argsort(ts, kind="stable")
    pool = len(order) if val_after is None else int((np.asarray(ts, dtype=np.int64) >= val_after).sum()) or len(order)
    n_val = max(1, round(pool * val_fraction))
    train_idx, val_idx = order[:-n_val], order[-n_val:]
    y_train = y[train_idx].astype(np.float32)
    if task == "binary" and y_train.min() == y_train.max():
        raise InvalidModelInput(
            f"the training split has a single class (all {'positive' if y_train[0] else 'negative'}); "
            "need both positive and negative examples before the validation cut"
        )
    return _Split(
        x_train=torch.from_numpy(np.ascontiguousarray(X[train_idx], dtype=np.float32)),
        y_train=torch.from_numpy(y_train),
        x_val=torch.from_numpy(np.ascontiguousarray(X[val_idx], dtype=np.float32)),
        y_val=torch.from_numpy(y[val_idx].astype(np.float32)),
        w_train=torch.from_numpy(weights[train_idx].astype(np.float32)),
        w_val=torch.from_numpy(weights[val_idx].astype(np.float32)),
    )


def _build_module(split: _Split, hidden: Sequence[int], seed: int, task: str) -> ScoreMLP:
    w = (split.w_train / split.w_train.sum()).unsqueeze(-1)  # standardize as the loss weighs the rows
    mean = (split.x_train * w).sum(dim=0)
    std = ((split.x_train - mean).pow(2) * w).sum(dim=0).sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant columns pass through
    y_mean, y_std = 0.0, 1.0
    if task == "regression":
        y_mean, y_std = float(split.y_train.mean()), float(split.y_train.std(unbiased=False))
        y_std = y_std if y_std > 1e-12 else 1.0
    # Seed only what we build, without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ScoreMLP(split.x_train.shape[1], hidden, mean, std, task, y_mean, y_std)


def _weighted(loss_fn: nn.Module, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The rows' losses (``loss_fn`` built with ``reduction="none"``), averaged with weights ``w``."""
    loss: torch.Tensor = (loss_fn(logits, y) * w).sum() / w.sum()
    return loss


def _train_epoch(
    module: ScoreMLP,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
) -> float:
    module.train()
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    total = 0.0
    for start in range(0, x.shape[0], batch_size):
        idx = perm[start : start + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = _weighted(loss_fn, module.logits(x[idx]), y[idx], w[idx])
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / x.shape[0]


@torch.no_grad()
def _evaluate(module: ScoreMLP, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
              w: torch.Tensor) -> tuple[float, float]:
    """(validation loss, quality): the AUC for a binary model, the MAE in the label's units for a regression."""
    module.eval()
    logits = module.logits(x)
    loss = float(_weighted(loss_fn, logits, y, w))
    if module.task == "binary":
        return loss, roc_auc(y.cpu().numpy().astype(bool), logits.cpu().numpy().astype(np.float64))
    pred = module.y_mean + module.y_std * logits
    target = module.y_mean + module.y_std * y
    return loss, float((pred - target).abs().mean())


def calibrate_for_class_weight(module: ScoreMLP, pos_weight: float) -> None:
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
    task: str = "binary",
    seed: int = 0,
    hidden: Sequence[int] = (32, 16),
    max_epochs: int = 60,
    patience: int = 6,
    batch_size: int = 256,
    lr: float = 3e-3,
    val_fraction: float = 0.25,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    weights: npt.NDArray[np.floating] | None = None,
    val_after: int | None = None,
) -> TrainResult:
    """Train a :class:`ScoreMLP` on ``X`` (n, F) float, labels ``y`` (n,), event times ``ts`` (n,).

    * Split: rows sorted by ``ts`` (stable); the last ``val_fraction`` is
      validation, so the model is judged on data later than it learnt from. With
      ``val_after`` (an event time, e.g. where a drift began), the last ``val_fraction``
      of the rows at or after it: the rest of the new regime's rows are trained on
      (as the newest quarter of the whole window, they could all be held out).
    * Standardization uses the TRAIN split's mean/std only (no leakage); a
      regression's target is standardized the same way (and un-standardized by
      the module's head).
    * Binary (``y`` 0/1): ``BCEWithLogitsLoss(pos_weight=n_neg/n_pos)`` on the train
      split; validation loss uses the same weighting. The returned model is then
      calibrated back (:func:`calibrate_for_class_weight`): its probabilities are
      not inflated by the weights. Regression: mean squared error on the
      standardized target.
    * ``weights`` (n,), positive: each row's weight in the losses, the class balance and the standardization
      (e.g. the rows after a drift weighed more: :class:`streams.project.spec.RetrainPolicy`); default 1.
    * Adam, shuffled minibatches; early stopping when validation loss has not
      improved for ``patience`` epochs; the best epoch's weights are restored.
    * Reproducible: same inputs and ``seed`` on CPU give identical weights
      (the global torch RNG is left untouched). CUDA kernels may differ in the
      last bits between runs.

    Raises :class:`~models.base.InvalidModelInput` (a ``ValueError``) for fewer
    than :data:`MIN_ROWS` rows, mismatched shapes, NaN/inf values, an unknown
    task, non-binary labels or a single class in the training split (binary).
    """
    X, y, ts = np.asarray(X), np.asarray(y), np.asarray(ts)
    w = np.ones(len(y), dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    _validate(X, y, ts, val_fraction, task, w)
    split = _time_split(X, y, ts, val_fraction, task, w, val_after)
    dev = pick_device(device)
    module = _build_module(split, hidden, seed, task).to(dev)
    xt, yt = split.x_train.to(dev), split.y_train.to(dev)
    xv, yv = split.x_val.to(dev), split.y_val.to(dev)
    wt, wv = split.w_train.to(dev), split.w_val.to(dev)
    pos_weight: torch.Tensor | None = None
    if task == "binary":
        w_pos = float((split.w_train * split.y_train).sum())
        pos_weight = torch.tensor((float(split.w_train.sum()) - w_pos) / w_pos, device=dev)
        loss_fn: nn.Module = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    else:  # train on the standardized target: the head scales back
        loss_fn = nn.MSELoss(reduction="none")
        yt, yv = (yt - module.y_mean) / module.y_std, (yv - module.y_mean) / module.y_std
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    curve: list[tuple[int, float, float, float]] = []
    best = (math.inf, math.nan, 0)  # (loss_val, quality_val, epoch)
    best_state = copy.deepcopy(module.state_dict())
    for epoch in range(1, max_epochs + 1):
        loss_train = _train_epoch(module, loss_fn, opt, xt, yt, wt, batch_size, gen)
        loss_val, quality_val = _evaluate(module, loss_fn, xv, yv, wv)
        curve.append((epoch, loss_train, loss_val, quality_val))
        if progress is not None:
            progress(epoch, loss_train, loss_val)
        if loss_val < best[0]:
            best = (loss_val, quality_val, epoch)
            best_state = copy.deepcopy(module.state_dict())
        elif epoch - best[2] >= patience:
            break

    module.load_state_dict(best_state)
    metrics = {"loss_val": best[0], "best_epoch": float(best[2]), "epochs_run": float(len(curve)),
               "n_train": float(len(split.y_train)), "n_val": float(len(split.y_val))}
    if pos_weight is not None:
        calibrate_for_class_weight(module, float(pos_weight))
        metrics |= {"auc_val": best[1], "pos_rate_train": float(split.y_train.mean())}
    else:
        with torch.no_grad():
            err = module.eval()(xv) - split.y_val.to(dev)
        metrics |= {"mae_val": float(err.abs().mean()), "rmse_val": float(err.pow(2).mean().sqrt())}
    module = module.to("cpu").eval()
    return TrainResult(module=module, metrics=metrics, curve=curve, device=str(dev))
