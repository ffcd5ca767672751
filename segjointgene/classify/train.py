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

__all__ = ["LENGTHSCALE_MULTIPLES", "FittedSNGP", "Prediction", "fit_sngp", "predict"]


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
    lengthscale_nll : GP length-scale -> validation NLL of each candidate tried (empty when it was fixed).
    """

    model: SNGPNet
    mean: np.ndarray
    std: np.ndarray
    classes: np.ndarray
    mean_field_factor: float
    history: list[tuple[float, float]]
    best_epoch: int
    lengthscale_nll: dict[float, float]


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


#: Multiples of the median-heuristic length-scale tried by ``gp_lengthscale = 0`` (the best validation NLL wins).
LENGTHSCALE_MULTIPLES = (1.0, 0.5, 0.25)


def _train_once(xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, k: int,
                config: ClassifyConfig, lengthscale: float | None, generator: torch.Generator,
                rng: np.random.Generator) -> tuple[SNGPNet, list[tuple[float, float]], int, float]:
    """One training run; ``lengthscale`` None = the median heuristic. Returns (model, history, best epoch, val NLL)."""
    model = SNGPNet(xt.shape[1], k, hidden=config.hidden, blocks=config.blocks, dropout=config.dropout,
                    spec_norm_bound=config.spec_norm_bound, gp_features=config.gp_features,
                    gp_lengthscale=lengthscale or 1.0, gp_ridge=config.gp_ridge, gp_layernorm=config.gp_layernorm,
                    generator=generator).to(xt.device)
    if model.gp is not None and lengthscale is None:  # median heuristic on the untrained network
        with torch.no_grad():
            model.gp.fit_lengthscale(model.hidden(xt[:512]))
    counts = torch.bincount(yt, minlength=k).double()
    weight = (counts.sum() / (k * counts.clamp(min=1))).float() if config.balance else None
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    best, best_state, best_epoch, wait, history = np.inf, None, 0, 0, []
    n = xt.shape[0]
    for epoch in range(config.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(n)).to(xt.device)
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
    return model.eval(), history, best_epoch, best


def fit_sngp(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
             config: ClassifyConfig = ClassifyConfig(), *, generator: torch.Generator | None = None,
             rng: np.random.Generator | int | None = None, device: str | torch.device = "cpu") -> FittedSNGP:
    """Train the SNGP classifier with early stopping, then accumulate the exact posterior precision.

    Parameters
    ----------
    x_train : (n, d) float features (e.g. the per-cell embeddings); y_train : (n,) labels (any hashable).
    x_val, y_val : validation rows (spatially held out) for early stopping; their labels must occur in training.
    config : architecture and optimisation (``ClassifyConfig``).
    generator : torch Generator for the weights, the random features and dropout (None: seeded from ``rng``).
    rng : numpy Generator or seed for the batch order.

    Returns
    -------
    FittedSNGP. Adam, class-balanced cross-entropy (``config.balance``) + ``l2 * |beta|^2`` on the output weights;
    the weights of the epoch with the lowest validation NLL are kept (patience ``config.patience``); then one pass
    over the training rows in eval mode accumulates ``P = ridge I + sum phi phi^T`` and inverts it.

    With ``config.gp_lengthscale = 0`` the GP length-scale is chosen on the validation NLL (in-distribution data
    only) among :data:`LENGTHSCALE_MULTIPLES` of the median heuristic (the median pairwise distance of the GP inputs
    of up to 512 training rows through the untrained network); every candidate starts from the same weights.
    """
    rng = np.random.default_rng(rng)
    if generator is None:
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    device = torch.device(device)
    classes = np.unique(np.asarray(y_train))
    if classes.size < 2:
        raise ValueError(f"a classifier needs at least 2 classes in training, got {classes.size}")
    lut = {c: i for i, c in enumerate(classes.tolist())}
    unknown = sorted(set(np.asarray(y_val).tolist()) - set(lut))
    if unknown:
        raise ValueError(f"validation labels {unknown[:5]} do not occur in training")
    yt = torch.as_tensor([lut[v] for v in np.asarray(y_train).tolist()], dtype=torch.int64).to(device)
    yv = torch.as_tensor([lut[v] for v in np.asarray(y_val).tolist()], dtype=torch.int64).to(device)
    mean = np.asarray(x_train, np.float64).mean(0).astype(np.float32)
    std = np.maximum(np.asarray(x_train, np.float64).std(0), 1e-6).astype(np.float32)
    xt, xv = _standardise(x_train, mean, std).to(device), _standardise(x_val, mean, std).to(device)
    k = classes.size
    g_state, rng_state = generator.get_state(), rng.bit_generator.state
    model, history, best_epoch, best = _train_once(xt, yt, xv, yv, k, config, config.gp_lengthscale or None,
                                                   generator, rng)
    tried: dict[float, float] = {}
    if model.gp is not None and config.gp_lengthscale == 0 and len(yv):
        median = float(model.gp.lengthscale)
        tried[median] = best
        for mult in LENGTHSCALE_MULTIPLES[1:]:
            generator.set_state(g_state)  # same initial weights and batch order for every candidate
            rng.bit_generator.state = rng_state
            cand = _train_once(xt, yt, xv, yv, k, config, median * mult, generator, rng)
            tried[median * mult] = cand[3]
            if cand[3] < best - 1e-6:
                model, history, best_epoch, best = cand
        log.info("SNGP: GP length-scale %.3g (validation NLL by length-scale: %s)", float(model.gp.lengthscale),
                 ", ".join(f"{ell:.3g}: {nll:.4f}" for ell, nll in tried.items()))
    n = xt.shape[0]
    if model.gp is not None:
        with torch.no_grad():
            model.gp.reset_precision()
            for b in range(0, n, 1024):
                model.gp.update_precision(model.hidden(xt[b:b + 1024]))
            model.gp.finalize()
    log.info("SNGP: %d classes, %d training rows, best epoch %d of %d (val NLL %.4f)", k, n, best_epoch,
             len(history), best)
    return FittedSNGP(model=model, mean=mean, std=std, classes=classes, mean_field_factor=config.mean_field_factor,
                      history=history, best_epoch=best_epoch, lengthscale_nll=tried)


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
