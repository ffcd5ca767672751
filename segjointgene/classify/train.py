"""Training of the SNGP classifier and its calibrated predictions (docs/SEGCLR.md §2.10b)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ClassifyConfig
from .sngp import SNGPNet, dempster_shafer, mean_field_logits

log = logging.getLogger(__name__)

__all__ = ["FittedSNGP", "Prediction", "fit_sngp", "predict"]


@dataclass(frozen=True)
class FittedSNGP:
    """A trained classifier with what prediction needs.

    Attributes
    ----------
    model : the network (eval mode, precision finalised).
    mean, std : (d,) float32 standardisation of the inputs (training statistics).
    classes : (K,) the label of each output, as given to :func:`fit_sngp`.
    mean_field_factor : lambda of the mean-field logits.
    history : per-epoch (train loss, validation loss); best_epoch : the epoch whose weights were kept.
    """

    model: SNGPNet
    mean: np.ndarray
    std: np.ndarray
    classes: np.ndarray
    mean_field_factor: float
    history: list[tuple[float, float]]
    best_epoch: int


@dataclass(frozen=True)
class Prediction:
    """Per-row outputs of :func:`predict` (n rows, K classes).

    Attributes
    ----------
    label : (n,) predicted class label; index : (n,) int64 its column.
    prob : (n, K) float32 softmax of the mean-field logits; probability : (n,) float32 its maximum.
    uncertainty : (n,) float32 Dempster-Shafer uncertainty of the mean-field logits (the OOD score).
    variance : (n,) float32 GP predictive variance (0 without the GP layer).
    max_softmax_raw : (n,) float32 maximum softmax of the raw logits (no mean-field).
    logits : (n, K) float32 raw logits.
    """

    label: np.ndarray
    index: np.ndarray
    prob: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray
    variance: np.ndarray
    max_softmax_raw: np.ndarray
    logits: np.ndarray


def _standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((np.asarray(x, np.float32) - mean) / std).astype(np.float32))


def fit_sngp(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             config: ClassifyConfig = ClassifyConfig(), *, generator: torch.Generator | None = None,
             rng: np.random.Generator | int | None = None, device: str | torch.device = "cpu") -> FittedSNGP:
    """Train the SNGP classifier with early stopping, then accumulate the exact posterior precision.

    Parameters
    ----------
    x_train : (n, d) float features (e.g. the per-cell embeddings); y_train : (n,) labels (any hashable).
    x_val, y_val : validation rows (spatially held out) for early stopping; their labels must occur in training.
    config : architecture and optimisation (``ClassifyConfig``).
    generator : torch Generator for the weights, the random features and dropout.
    rng : numpy Generator or seed for the batch order.

    Returns
    -------
    FittedSNGP. Adam, class-balanced cross-entropy (``config.balance``) + ``l2 * |beta|^2`` on the output weights;
    with ``config.gp_lengthscale = 0`` the GP length-scale is the median pairwise distance of the GP inputs of
    (up to 512) training rows through the untrained network; the weights of the epoch with the lowest validation
    NLL are kept (patience ``config.patience``); then one pass
    over the training rows in eval mode accumulates ``P = ridge I + sum phi phi^T`` and inverts it.
    """
    rng = np.random.default_rng(rng)
    device = torch.device(device)
    classes = np.unique(np.asarray(y_train))
    if classes.size < 2:
        raise ValueError(f"a classifier needs at least 2 classes in training, got {classes.size}")
    lut = {c: i for i, c in enumerate(classes.tolist())}
    unknown = sorted(set(np.asarray(y_val).tolist()) - set(lut))
    if unknown:
        raise ValueError(f"validation labels {unknown[:5]} do not occur in training")
    yt = torch.as_tensor([lut[v] for v in np.asarray(y_train).tolist()], dtype=torch.int64)
    yv = torch.as_tensor([lut[v] for v in np.asarray(y_val).tolist()], dtype=torch.int64)
    mean = np.asarray(x_train, np.float64).mean(0).astype(np.float32)
    std = np.maximum(np.asarray(x_train, np.float64).std(0), 1e-6).astype(np.float32)
    xt, xv = _standardise(x_train, mean, std).to(device), _standardise(x_val, mean, std).to(device)
    yt, yv = yt.to(device), yv.to(device)
    k = classes.size
    model = SNGPNet(xt.shape[1], k, hidden=config.hidden, blocks=config.blocks, dropout=config.dropout,
                    spec_norm_bound=config.spec_norm_bound, gp_features=config.gp_features,
                    gp_lengthscale=config.gp_lengthscale or 1.0, gp_ridge=config.gp_ridge, gp_layernorm=config.gp_layernorm,
                    generator=generator).to(device)
    if model.gp is not None and config.gp_lengthscale == 0:  # auto: median heuristic on the untrained network
        with torch.no_grad():
            ell = model.gp.fit_lengthscale(model.hidden(xt[:512]))
        log.debug("SNGP: GP length-scale %.3f (median heuristic)", ell)
    counts = torch.bincount(yt, minlength=k).double()
    weight = (counts.sum() / (k * counts.clamp(min=1))).float() if config.balance else None
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    best, best_state, best_epoch, wait, history = np.inf, None, 0, 0, []
    n = xt.shape[0]
    for epoch in range(config.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(n)).to(device)
        total = 0.0
        for b in range(0, n, config.batch_size):
            idx = order[b:b + config.batch_size]
            if idx.numel() < 2 and n >= 2:  # a batch of one: no information worth a step
                continue
            loss = F.cross_entropy(model(xt[idx]), yt[idx], weight=weight)
            loss = loss + config.l2 * (model.output_weight() ** 2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        model.eval()
        with torch.no_grad():
            val = float(F.cross_entropy(model(xv), yv)) if len(yv) else total / n
        history.append((total / n, val))
        if val < best - 1e-6:
            best, best_state, best_epoch, wait = val, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            wait += 1
            if wait >= config.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if model.gp is not None:
        with torch.no_grad():
            model.gp.reset_precision()
            for b in range(0, n, 1024):
                model.gp.update_precision(model.hidden(xt[b:b + 1024]))
            model.gp.finalize()
    log.info("SNGP: %d classes, %d training rows, best epoch %d of %d (val NLL %.4f)", k, n, best_epoch,
             len(history), best)
    return FittedSNGP(model=model, mean=mean, std=std, classes=classes, mean_field_factor=config.mean_field_factor,
                      history=history, best_epoch=best_epoch)


@torch.no_grad()
def predict(fitted: FittedSNGP, x: np.ndarray, *, batch_size: int = 4096) -> Prediction:
    """Calibrated predictions of (n, d) rows: mean-field probabilities, Dempster-Shafer uncertainty, variance."""
    model = fitted.model.eval()
    device = next(model.parameters()).device
    xs = _standardise(x, fitted.mean, fitted.std)
    logits, var = [], []
    for b in range(0, len(xs), batch_size):
        z, v = model.logits_and_variance(xs[b:b + batch_size].to(device))
        logits.append(z.cpu())
        var.append(v.cpu())
    k = fitted.classes.size
    z = torch.cat(logits) if logits else torch.zeros(0, k)
    v = torch.cat(var) if var else torch.zeros(0)
    zm = mean_field_logits(z, v, fitted.mean_field_factor)
    prob = torch.softmax(zm, 1)
    idx = prob.argmax(1).numpy().astype(np.int64)
    return Prediction(label=fitted.classes[idx], index=idx, prob=prob.numpy().astype(np.float32),
                      probability=prob.max(1).values.numpy().astype(np.float32),
                      uncertainty=dempster_shafer(zm).numpy().astype(np.float32),
                      variance=v.numpy().astype(np.float32),
                      max_softmax_raw=torch.softmax(z, 1).max(1).values.numpy().astype(np.float32),
                      logits=z.numpy().astype(np.float32))
