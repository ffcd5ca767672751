"""Aggregation of point embeddings per cell (docs/SEGCLR.md §2.9) and the point-coherence QC score."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["cell_mean", "coherence", "radius_mean"]


def _positions(point_cell: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(cell_ids, point_cell)
    if np.any(pos >= cell_ids.size) or np.any(cell_ids[np.minimum(pos, cell_ids.size - 1)] != point_cell):
        raise ValueError("every point's cell must be in cell_ids (sorted ascending)")
    return pos


def cell_mean(emb: np.ndarray, point_cell: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Per-cell mean of the point embeddings.

    Parameters
    ----------
    emb : (N, d) float point embeddings; point_cell : (N,) int64 cell of each point.
    cell_ids : (n_cells,) int64, sorted ascending; a cell without points gets NaN.

    Returns
    -------
    (n_cells, d) float32.

    Examples
    --------
    >>> cell_mean(np.array([[1.0], [3.0], [5.0]]), np.array([4, 4, 9]), np.array([4, 9])).ravel().tolist()
    [2.0, 5.0]
    """
    cell_ids = np.asarray(cell_ids, np.int64)
    pos = _positions(np.asarray(point_cell, np.int64), cell_ids)
    sums = np.zeros((cell_ids.size, emb.shape[1]), np.float64)
    np.add.at(sums, pos, emb)
    n = np.bincount(pos, minlength=cell_ids.size)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / n).astype(np.float32)


def radius_mean(emb: np.ndarray, xy: np.ndarray, point_cell: np.ndarray, radius: float) -> np.ndarray:
    """SegCLR-style aggregation: each point's embedding -> mean over the points of the same cell within ``radius``.

    ``radius = 0`` returns the points themselves; ``radius = inf`` (or larger than any cell) the cell mean at every
    point. Points of different cells are never mixed.

    Parameters
    ----------
    emb : (N, d) float; xy : (N, 2) float coordinates (same unit as ``radius``); point_cell : (N,) int64.

    Returns
    -------
    (N, d) float32.

    Examples
    --------
    >>> e = np.array([[0.0], [2.0], [10.0]]); xy = np.array([[0, 0], [1, 0], [1.5, 0]])
    >>> radius_mean(e, xy, np.array([1, 1, 2]), 5.0).ravel().tolist()  # point 2 is alone in its cell
    [1.0, 1.0, 10.0]
    """
    emb = np.asarray(emb, np.float64)
    point_cell = np.asarray(point_cell, np.int64)
    if radius <= 0 or len(emb) == 0:
        return emb.astype(np.float32)
    if not np.isfinite(radius):
        ids, inv = np.unique(point_cell, return_inverse=True)
        return cell_mean(emb, point_cell, ids)[inv]
    pairs = cKDTree(np.asarray(xy, np.float64)).query_pairs(radius, output_type="ndarray")
    if pairs.size:
        pairs = pairs[point_cell[pairs[:, 0]] == point_cell[pairs[:, 1]]]
    sums = emb.copy()
    n = np.ones(len(emb))
    if pairs.size:
        np.add.at(sums, pairs[:, 0], emb[pairs[:, 1]])
        np.add.at(sums, pairs[:, 1], emb[pairs[:, 0]])
        n += np.bincount(pairs.ravel(), minlength=len(emb))
    return (sums / n[:, None]).astype(np.float32)


def coherence(emb: np.ndarray, point_cell: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
    """Mean pairwise cosine similarity of the points of each cell (NaN for cells with fewer than 2 points).

    A merge of two different cells gives points that disagree, hence a lower coherence.

    Examples
    --------
    >>> e = np.array([[1.0, 0], [1, 0], [1, 0], [0, 1]])
    >>> coherence(e, np.array([1, 1, 2, 2]), np.array([1, 2])).round(6).tolist()
    [1.0, 0.0]
    """
    cell_ids = np.asarray(cell_ids, np.int64)
    pos = _positions(np.asarray(point_cell, np.int64), cell_ids)
    z = np.asarray(emb, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((cell_ids.size, z.shape[1]))
    np.add.at(sums, pos, z)
    n = np.bincount(pos, minlength=cell_ids.size).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((sums ** 2).sum(1) - n) / (n * (n - 1))  # |sum z|^2 = n + sum_{i != j} z_i . z_j
    out[n < 2] = np.nan
    return out
