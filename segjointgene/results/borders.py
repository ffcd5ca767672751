"""The genes that change across the borders of touching cell types (layer 1.5: numpy, pandas, scipy).

For every pair of cell types (a, b) that touch in the cell-type mask: the spots of type a within ``width`` px of a
pixel of type b (side a) and those of type b within ``width`` px of type a (side b). The export takes a typical cell
radius as the width (the cells on either side, not just the border pixels: 3 px recovered 0.75 of the simulated
markers, a radius (~8 px) 0.93, 15 px 0.98; ``benchmarks/border_genes.py``). Per gene, its share of the spots
on side a against side b: a two-proportion z-score (pooled variance; ``score`` > 0 favours a) and the log2 ratio of
the shares (half a spot added to each count). Genes are ranked by ``|score|``: the spatial prioritisation of
``border_genes.csv``, what decides which cell a border spot goes to. A spot's type is its cell's (the spot
assignment), its neighbourhood the mask's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["BORDER_COLUMNS", "border_expression", "near_types"]

BORDER_COLUMNS = ["type_a", "type_b", "gene", "score", "rank", "log2_ratio", "pval", "spots_a", "spots_b"]
#: A pair needs this many spots on each side to be ranked.
MIN_SIDE_SPOTS = 20


def near_types(classes: np.ndarray, x: np.ndarray, y: np.ndarray, n_classes: int, width: int) -> np.ndarray:
    """(n, n_classes) bool: which classes > 0 of the mask ``classes`` lie within ``width`` px (a square window) of
    each spot's pixel ``(floor(y), floor(x))``; spots outside the mask see none.

    Examples
    --------
    >>> m = np.array([[1, 1, 2, 2]])
    >>> near_types(m, np.array([0.5, 3.5]), np.array([0.2, 0.2]), 3, 1).astype(int).tolist()
    [[0, 1, 0], [0, 0, 1]]
    """
    h, w = classes.shape
    r, c = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    out = np.zeros((x.size, n_classes), bool)
    rows = np.flatnonzero(inside)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            rr, cc = r[rows] + dy, c[rows] + dx
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            found = classes[rr[ok], cc[ok]].astype(np.int64)
            out[rows[ok], found] = True
    out[:, 0] = False
    return out


def border_expression(classes: np.ndarray, spot_class: np.ndarray, x: np.ndarray, y: np.ndarray,
                      spot_gene: np.ndarray, genes: list[str], celltypes: list[str], *, width: int = 3,
                      min_side: int = MIN_SIDE_SPOTS) -> pd.DataFrame:
    """The ranking of the module docstring: one row per pair and gene, :data:`BORDER_COLUMNS`.

    Parameters
    ----------
    classes : (H, W) cell-type ids of the mask (0 = background).
    spot_class : (n,) type id of each spot's cell (0 = background).
    x, y, spot_gene : the spots (pixel ``(floor(y), floor(x))``) and their gene indices into ``genes``.
    celltypes : class names by id (index 0 = background).
    """
    n_classes, n_genes = len(celltypes), len(genes)
    near = near_types(classes, x, y, n_classes, width)
    spot_class = np.asarray(spot_class, np.int64)
    spot_gene = np.asarray(spot_gene, np.int64)
    parts = []
    for a in range(1, n_classes):
        for b in range(a + 1, n_classes):
            side_a = (spot_class == a) & near[:, b]
            side_b = (spot_class == b) & near[:, a]
            n_a, n_b = int(side_a.sum()), int(side_b.sum())
            if min(n_a, n_b) < min_side:
                continue
            k_a = np.bincount(spot_gene[side_a], minlength=n_genes).astype(np.float64)
            k_b = np.bincount(spot_gene[side_b], minlength=n_genes).astype(np.float64)
            pooled = (k_a + k_b) / (n_a + n_b)
            se = np.sqrt(np.maximum(pooled * (1 - pooled) * (1 / n_a + 1 / n_b), 1e-300))
            z = np.where(pooled > 0, (k_a / n_a - k_b / n_b) / se, 0.0)
            order = np.lexsort((np.arange(n_genes), -np.abs(z)))
            rank = np.empty(n_genes, np.int64)
            rank[order] = np.arange(1, n_genes + 1)
            parts.append(pd.DataFrame({
                "type_a": celltypes[a], "type_b": celltypes[b], "gene": genes, "score": z, "rank": rank,
                "log2_ratio": np.log2(((k_a + 0.5) / (n_a + 0.5 * n_genes)) / ((k_b + 0.5) / (n_b + 0.5 * n_genes))),
                "pval": 2 * stats.norm.sf(np.abs(z)), "spots_a": n_a, "spots_b": n_b}).sort_values("rank"))
    if not parts:
        return pd.DataFrame(columns=BORDER_COLUMNS)
    return pd.concat(parts, ignore_index=True)[BORDER_COLUMNS]
