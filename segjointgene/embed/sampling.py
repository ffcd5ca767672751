"""Sampling units of the embeddings: the pixels of each cell, export points, positive pairs, batches (numpy).

The 2-D analogue of SegCLR's skeleton nodes (docs/SEGCLR.md §2.2-2.3): every cell of an instance mask owns its
pixels; the export points are a regular grid inside each cell plus one centre point; a positive pair is two pixels
of the same cell; a batch never holds a cell twice (a duplicate would be a false negative of NT-Xent).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..constants import BACKGROUND

log = logging.getLogger(__name__)

__all__ = ["CellPixels", "batch_cells", "cell_pixels", "export_points", "sample_pairs"]


@dataclass(frozen=True)
class CellPixels:
    """The pixels of every cell of an instance mask, grouped by cell.

    Attributes
    ----------
    ids : (n_cells,) int64 cell ids, ascending (background excluded).
    start : (n_cells + 1,) int64; the pixels of cell ``ids[i]`` are ``flat[start[i]:start[i + 1]]``.
    flat : (n_pixels,) int64 flat (row-major) pixel indices, grouped by cell, ascending within a cell.
    shape : (H, W) of the mask.
    """

    ids: np.ndarray
    start: np.ndarray
    flat: np.ndarray
    shape: tuple[int, int]

    @property
    def area(self) -> np.ndarray:
        """(n_cells,) int64 pixel count of each cell."""
        return np.diff(self.start)

    def index_of(self, cell_ids: np.ndarray) -> np.ndarray:
        """(n,) int64 position of each cell id in :attr:`ids` (ids must be present)."""
        return np.searchsorted(self.ids, np.asarray(cell_ids, np.int64))

    def centroids(self) -> np.ndarray:
        """(n_cells, 2) float64 (row, col) mean pixel position of each cell (pixel centres at +0.5)."""
        rows, cols = np.divmod(self.flat, self.shape[1])
        owner = np.repeat(np.arange(self.ids.size), self.area)
        n = np.maximum(self.area, 1)
        return np.stack([np.bincount(owner, rows, self.ids.size) / n,
                         np.bincount(owner, cols, self.ids.size) / n], 1) + 0.5

    def subset(self, keep: np.ndarray) -> CellPixels:
        """Only the cells where ``keep`` (n_cells,) bool is True."""
        keep = np.asarray(keep, bool)
        pieces = [self.flat[a:b] for a, b, k in zip(self.start[:-1], self.start[1:], keep) if k]
        area = self.area[keep]
        return CellPixels(ids=self.ids[keep], start=np.concatenate([[0], np.cumsum(area)]).astype(np.int64),
                          flat=np.concatenate(pieces) if pieces else np.zeros(0, np.int64), shape=self.shape)


def cell_pixels(instance: np.ndarray) -> CellPixels:
    """Group the pixels of an instance mask by cell.

    Parameters
    ----------
    instance : (H, W) integer ndarray, 0 = background.

    Returns
    -------
    CellPixels

    Examples
    --------
    >>> px = cell_pixels(np.array([[0, 2, 2], [5, 0, 2]]))
    >>> px.ids.tolist(), px.area.tolist(), px.flat.tolist()
    ([2, 5], [3, 1], [1, 2, 5, 3])
    """
    flat_mask = np.asarray(instance).ravel()
    fg = np.flatnonzero(flat_mask != BACKGROUND)
    labels = flat_mask[fg].astype(np.int64)
    order = np.argsort(labels, kind="stable")
    labels, fg = labels[order], fg[order]
    ids, first = np.unique(labels, return_index=True)
    start = np.concatenate([first, [labels.size]]).astype(np.int64)
    return CellPixels(ids=ids, start=start, flat=fg.astype(np.int64), shape=tuple(int(v) for v in instance.shape))


def export_points(pixels: CellPixels, *, stride_px: int, max_points: int,
                  rng: np.random.Generator | int | None = None) -> pd.DataFrame:
    """Points of every cell at which embeddings are computed and exported.

    Point 0 of a cell is its centre: the cell pixel closest to the cell's centroid (so every cell has a point, also
    a non-convex one). The others lie on a section-wide grid of stride ``stride_px`` (rows and columns
    ``= stride_px // 2 (mod stride_px)``) inside the cell. A cell with more than ``max_points`` points keeps the
    centre and a random subset of the grid points (drawn from ``rng``), in grid order.

    Parameters
    ----------
    pixels : from :func:`cell_pixels`.
    stride_px, max_points : grid stride and cap per cell (both >= 1).
    rng : numpy Generator or seed for the subsetting.

    Returns
    -------
    DataFrame with ``cell`` (int64), ``point_id`` (int64, 0 = centre), ``row``, ``col`` (int64 pixel), sorted by
    cell then point id.

    Examples
    --------
    >>> inst = np.zeros((6, 6), int); inst[:, :4] = 7
    >>> export_points(cell_pixels(inst), stride_px=3, max_points=10)[["point_id", "row", "col"]].values.tolist()
    [[0, 2, 1], [1, 1, 1], [2, 4, 1]]
    """
    rng = np.random.default_rng(rng)
    n_cells = pixels.ids.size
    width = pixels.shape[1]
    rows, cols = np.divmod(pixels.flat, width)
    owner = np.repeat(np.arange(n_cells), pixels.area)
    cent = pixels.centroids() - 0.5  # in pixel-index units
    d2 = (rows - cent[owner, 0]) ** 2 + (cols - cent[owner, 1]) ** 2
    # closest pixel per cell: sort by (owner, distance, flat index) and take each owner's first
    order = np.lexsort((pixels.flat, d2, owner))
    first = np.ones(order.size, bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    centre_flat = np.zeros(n_cells, np.int64)
    centre_flat[owner[order][first]] = pixels.flat[order][first]

    half = stride_px // 2
    on_grid = ((rows - half) % stride_px == 0) & ((cols - half) % stride_px == 0) & (pixels.flat != centre_flat[owner])
    g_owner, g_flat = owner[on_grid], pixels.flat[on_grid]
    g_start = np.searchsorted(g_owner, np.arange(n_cells + 1))
    out_cell, out_pid, out_flat = [], [], []
    for i in range(n_cells):
        grid = g_flat[g_start[i]:g_start[i + 1]]
        if grid.size > max_points - 1:
            grid = np.sort(rng.choice(grid, max_points - 1, replace=False)) if max_points > 1 else grid[:0]
        flat = np.concatenate([[centre_flat[i]], grid])
        out_cell.append(np.full(flat.size, pixels.ids[i]))
        out_pid.append(np.arange(flat.size))
        out_flat.append(flat)
    flat = np.concatenate(out_flat) if out_flat else np.zeros(0, np.int64)
    r, c = np.divmod(flat, width)
    return pd.DataFrame({"cell": np.concatenate(out_cell).astype(np.int64) if out_cell else np.zeros(0, np.int64),
                         "point_id": np.concatenate(out_pid).astype(np.int64) if out_pid else np.zeros(0, np.int64),
                         "row": r.astype(np.int64), "col": c.astype(np.int64)})


def batch_cells(n_cells: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless batches of cell positions ``0..n_cells-1``; a cell appears at most once per batch.

    Each epoch is a fresh permutation cut into batches of ``batch_size``; the remainder of an epoch that does not
    fill a batch is dropped (the next epoch reshuffles), so every batch holds distinct cells.

    Examples
    --------
    >>> it = batch_cells(5, 2, np.random.default_rng(0))
    >>> all(len(set(next(it).tolist())) == 2 for _ in range(10))
    True
    """
    if batch_size > n_cells:
        raise ValueError(f"batch_size={batch_size} exceeds the {n_cells} available cells")
    while True:
        perm = rng.permutation(n_cells)
        for b in range(n_cells // batch_size):
            yield perm[b * batch_size:(b + 1) * batch_size]


def sample_pairs(pixels: CellPixels, positions: np.ndarray, rng: np.random.Generator, *,
                 max_dist_px: float = 0.0, tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two centre pixels inside each given cell: a positive pair.

    The first centre is uniform over the cell's pixels; the second is uniform over the pixels within
    ``max_dist_px`` of the first (rejection sampling with ``tries`` draws; when all fail the second centre is the
    first). ``max_dist_px = 0`` means no limit. Drawing from every pixel of the cell also plays SegCLR's random
    centre shift.

    Parameters
    ----------
    pixels : from :func:`cell_pixels`.
    positions : (B,) int64 positions of the cells in ``pixels.ids``.
    rng : numpy Generator.

    Returns
    -------
    (rows_cols_a, rows_cols_b) : two (B, 2) int64 arrays of (row, col).
    """
    positions = np.asarray(positions, np.int64)
    start, area = pixels.start[positions], pixels.area[positions]
    a = pixels.flat[start + (rng.random(positions.size) * area).astype(np.int64)]
    b = pixels.flat[start + (rng.random(positions.size) * area).astype(np.int64)]
    if max_dist_px > 0:
        ar, ac = np.divmod(a, pixels.shape[1])
        ok = np.zeros(positions.size, bool)
        for _ in range(tries):
            br, bc = np.divmod(b, pixels.shape[1])
            ok |= (br - ar) ** 2 + (bc - ac) ** 2 <= max_dist_px ** 2
            if ok.all():
                break
            redraw = pixels.flat[start + (rng.random(positions.size) * area).astype(np.int64)]
            b = np.where(ok, b, redraw)
        br, bc = np.divmod(b, pixels.shape[1])
        ok |= (br - ar) ** 2 + (bc - ac) ** 2 <= max_dist_px ** 2
        b = np.where(ok, b, a)
    return (np.stack(np.divmod(a, pixels.shape[1]), 1).astype(np.int64),
            np.stack(np.divmod(b, pixels.shape[1]), 1).astype(np.int64))
