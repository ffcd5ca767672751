"""Spatial gene prioritisation: the genes that decide the borders between touching cell types.

For each pair of cell types (a, b) that touch in the final labels, integrated gradients (zero baseline, a few
steps) of ``sum(logit_a - logit_b)`` over the border pixels of the pair (pixels of a within ``width`` px of b, and of
b within ``width`` px of a), summed over the genes' pixels and divided by the number of border pixels. A positive
score favours type a at the border, a negative one type b; genes are ranked by ``|score|``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

__all__ = ["BORDER_COLUMNS", "border_genes", "border_masks"]

BORDER_COLUMNS = ["type_a", "type_b", "gene", "score", "rank", "border_px"]


def border_masks(classes: torch.Tensor, width: int = 3) -> dict[tuple[int, int], torch.Tensor]:
    """(P, P) bool masks of the border pixels of every touching pair (a < b) of class ids > 0 of one label map."""
    present = [int(c) for c in torch.unique(classes) if c > 0]
    k = 2 * width + 1
    near = {c: F.max_pool2d((classes == c).float()[None, None], k, stride=1, padding=width)[0, 0] > 0
            for c in present}
    out = {}
    for a, b in itertools.combinations(sorted(present), 2):
        mask = ((classes == a) & near[b]) | ((classes == b) & near[a])
        if mask.any():
            out[(a, b)] = mask
    return out


def _pair_gradients(model: torch.nn.Module, image: torch.Tensor, pairs: list[tuple[tuple[int, int], torch.Tensor]],
                    n_steps: int) -> torch.Tensor:
    """(len(pairs), G) integrated gradients of each pair's summed logit difference over its border pixels."""
    alphas = (torch.arange(n_steps, dtype=image.dtype) + 0.5) / n_steps  # midpoint rule
    path = (alphas[:, None, None, None] * image[None]).requires_grad_(True)  # (S, G, P, P)
    logits = model(path).float()  # (S, K, P, P)
    out = []
    for i, ((a, b), mask) in enumerate(pairs):
        target = ((logits[:, a] - logits[:, b]) * mask).sum()
        (grad,) = torch.autograd.grad(target, path, retain_graph=i < len(pairs) - 1)
        out.append((grad.mean(0) * image).sum((1, 2)))
    return torch.stack(out)


def border_genes(model: torch.nn.Module, labels: Iterable[tuple[Any, torch.Tensor]],
                 image_of: Callable[[Any], torch.Tensor], genes: list[str], celltypes: list[str], *, width: int = 3,
                 n_steps: int = 4, max_patches: int = 24) -> pd.DataFrame:
    """Long table :data:`BORDER_COLUMNS` from ``(key, classes (P, P))`` label maps; the ``max_patches`` with the most
    border pixels are attributed, their ``image_of(key)`` (G, P, P) read only then. Rank 1 = the gene with the
    largest ``|score|`` of the pair."""
    candidates: list[tuple[int, int, Any, dict]] = []  # a min-heap of the max_patches best: bounded memory
    for i, (key, classes) in enumerate(labels):
        masks = border_masks(classes, width)
        if masks:
            item = (sum(int(m.sum()) for m in masks.values()), -i, key, masks)
            (heapq.heappush if len(candidates) < max_patches else heapq.heappushpop)(candidates, item)
    candidates.sort(key=lambda c: (-c[0], -c[1]))
    sums: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[tuple[int, int], int] = {}
    model.eval()
    for _, _, key, masks in candidates:
        pairs = list(masks.items())
        grads = _pair_gradients(model, image_of(key), pairs, n_steps).detach()
        for (pair, mask), g in zip(pairs, grads):
            sums[pair] = sums.get(pair, 0) + g
            counts[pair] = counts.get(pair, 0) + int(mask.sum())
    rows = []
    for (a, b), total in sorted(sums.items()):
        score = (total / counts[(a, b)]).numpy().astype(np.float64)
        order = np.argsort(-np.abs(score), kind="stable")
        rank = np.empty(len(genes), np.int64)
        rank[order] = np.arange(1, len(genes) + 1)
        rows.append(pd.DataFrame({"type_a": celltypes[a], "type_b": celltypes[b], "gene": genes, "score": score,
                                  "rank": rank, "border_px": counts[(a, b)]}).sort_values("rank"))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=BORDER_COLUMNS)
