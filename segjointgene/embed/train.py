"""Contrastive training of the encoder and embedding inference (docs/SEGCLR.md §2.3, §2.7, §2.8)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .augment import apply_d4, draw_view_params
from .crops import CropBuilder
from .loss import collapse_metric, contrastive_topk, decorrelation_loss, nt_xent
from .model import SegCLRNet
from .sampling import CellPixels, batch_cells, sample_pairs

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "embed_points", "train_encoder"]


@dataclass(frozen=True)
class TrainResult:
    """The trained model (in eval mode) and its per-step log (step, loss, top1, top5, collapse, lr, seconds)."""

    model: SegCLRNet
    log: pd.DataFrame


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, total: int, warmup_fraction: float = 0.05) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to 0."""
    warm = max(1, int(round(warmup_fraction * total)))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def train_encoder(model: SegCLRNet, builder: CropBuilder, pixels: CellPixels, *, steps: int, batch_size: int,
                  lr: float = 1e-3, weight_decay: float = 1e-4, temperature: float = 0.1,
                  decorrelation: float = 0.0, max_pair_dist_px: float = 0.0, augment: bool = True,
                  rng: np.random.Generator | int | None = None, device: torch.device | str = "cpu",
                  log_every: int = 10, progress: bool = False) -> TrainResult:
    """Train ``model`` with NT-Xent on positive pairs of crops of the same cell.

    Each step draws ``batch_size`` distinct cells (each cell at most once per batch: a duplicate would be a false
    negative), two centre pixels per cell (:func:`~segjointgene.embed.sampling.sample_pairs`) and independent
    augmentations per view. AdamW with linear warm-up and cosine decay; no weight decay on biases and norms.

    Parameters
    ----------
    model : built by :func:`~segjointgene.embed.model.build_model` (its weights carry the torch randomness).
    builder : crop builder of the section; pixels : the training cells.
    steps, batch_size : optimisation steps and pairs per step (capped at the number of cells).
    rng : numpy Generator or seed: cell order, centres, augmentations (the only randomness besides the model).
    device : where the model runs; the crops are built on the CPU.

    Returns
    -------
    TrainResult, the model in eval mode.
    """
    rng = np.random.default_rng(rng)
    n_cells = pixels.ids.size
    if n_cells < 2:
        raise ValueError(f"contrastive training needs at least 2 cells, got {n_cells}")
    if batch_size > n_cells:
        log.warning("batch of %d pairs > %d training cells: using %d", batch_size, n_cells, n_cells)
        batch_size = n_cells
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    batches = batch_cells(n_cells, batch_size, rng)
    g = builder.inputs.n_genes
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="embed: contrastive training", leave=False)
    t0 = time.perf_counter()
    for step in range(steps):
        pos = next(batches)
        ids = pixels.ids[pos]
        ca, cb = sample_pairs(pixels, pos, rng, max_dist_px=max_pair_dist_px)
        if augment:
            pa, pb = draw_view_params(len(pos), g, rng), draw_view_params(len(pos), g, rng)
            xa, xb = builder.build(ids, ca, pa, rng=rng), builder.build(ids, cb, pb, rng=rng)
        else:
            xa, xb = builder.build(ids, ca), builder.build(ids, cb)
        x = torch.cat([xa, xb]).to(device)  # (2B, C, S, S): both views in one pass (shared norm statistics)
        emb, proj = model(x)
        n = len(pos)
        loss = nt_xent(proj[:n], proj[n:], temperature)
        if decorrelation > 0:
            loss = loss + decorrelation * decorrelation_loss(emb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            rows.append({"step": step, "loss": float(loss.detach()), "top1": contrastive_topk(proj[:n], proj[n:], 1),
                         "top5": contrastive_topk(proj[:n], proj[n:], 5), "collapse": collapse_metric(emb),
                         "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
            log.debug("embed step %d: %s", step, rows[-1])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    if bar is not None:
        bar.close()
    history = pd.DataFrame(rows)
    if len(history) > 1:
        first, last = history["collapse"].iloc[0], history["collapse"].iloc[-1]
        if last < 0.2 and last < 0.5 * first:  # fell during training (a low start is normal with group norm)
            log.warning("embedding collapse alarm: std x sqrt(d) fell from %.3f to %.3f", first, last)
    return TrainResult(model=model.eval(), log=history)


@torch.no_grad()
def embed_points(model: SegCLRNet, builder: CropBuilder, cell_ids: np.ndarray, centres: np.ndarray, *,
                 batch_size: int = 256, tta: int = 1, device: torch.device | str = "cpu") -> np.ndarray:
    """Embeddings of crops centred at points (no augmentation), averaged over ``tta`` D4 transforms.

    Parameters
    ----------
    cell_ids : (N,) int64 cell of each point; centres : (N, 2) int64 (row, col) pixel of each point.
    tta : 1, 2, 4 or 8: the first ``tta`` D4 elements (identity, quarter turns, then flips).

    Returns
    -------
    (N, embed_dim) float32 ndarray.
    """
    device = torch.device(device)
    model.to(device).eval()
    out = []
    for b in range(0, len(cell_ids), batch_size):
        x = builder.build(cell_ids[b:b + batch_size], centres[b:b + batch_size])
        acc = None
        for k in range(tta):
            xk = apply_d4(x, np.full(len(x), k)) if k else x
            e = model.embed(xk.to(device)).float().cpu()
            acc = e if acc is None else acc + e
        out.append((acc / tta).numpy())
    dim = model.spec.embed_dim
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)
