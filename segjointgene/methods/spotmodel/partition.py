"""The spot model's territories refined into a pixel partition: a cellular Potts model (layer 1.6: numpy, skimage).

Every pixel belongs to one cell or to background, and every spot to its pixel's owner. Given the partition, a cell
emits spots at a uniform rate ``lambda_c`` per pixel, each with its own gene profile ``q_c`` (the Dirichlet posterior
of its spots around its type's profile, as in :mod:`segjointgene.methods.spotmodel.model`); background at ``lambda_0``
per pixel of tissue with the background profile. The energy of a partition is the negative Poisson log-likelihood of the
spots, plus ``smoothness`` for every pair of unlike 8-neighbours (the Potts term: boundaries are short), plus
``shape_weight * (m^2 - 4) / 4`` for every pixel of a cell, ``m`` the pixel's Mahalanobis radius in the cell's fitted
ellipse (negative inside that ellipse's edge, positive outside: the spot model's shape as a prior). A mixture of
Gaussian cells lets touching cells overlap and their tails compete with background; a partition tiles the tissue.

:func:`refine_partition` starts from a mask (the territories) and lowers the energy by iterated conditional modes on
the boundary pixels (in four interleaved sub-lattices, so that no two pixels updated together are neighbours),
re-estimating the rates and profiles after every sweep; pixels outside their own cell's ellipse are updated too
(background may take them though no neighbour is background). After the first sweep only the neighbours of the pixels
that changed are revisited (faster, spot accuracy within 0.001 of full sweeps: benchmarks/RESULTS.md). Fixed
pixels (the nuclei) keep their cell; a cell keeps only the parts connected to its fixed pixels. With a finite
``ambient_log_ratio`` a spot on a cell's pixel goes to background where background's intensity of its gene beats the
cell's by more than that log ratio (the mask does not change; off by default: benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.measure import label as connected_regions
from skimage.segmentation import find_boundaries

from segjointgene.constants import BACKGROUND

from .model import CellGeneCounts, CellModel, ellipse_distance2

__all__ = ["Partition", "PartitionConfig", "refine_partition"]

_EDGE2 = 4.0  # squared Mahalanobis radius of a uniform ellipse's edge


@dataclass(frozen=True)
class PartitionConfig:
    """Knobs of the partition (defaults measured on the hard simulator; see benchmarks/RESULTS.md)."""

    smoothness: float = 0.5  # energy per pair of unlike 8-neighbours
    shape_weight: float = 0.5  # weight of the fitted ellipse as a prior (0 = the spots and smoothness alone)
    sweeps: int = 10  # at most; stops earlier when no pixel changes
    ambient_log_ratio: float = float("inf")  # a spot on a cell's pixel goes to background when background explains
    # it better than the cell by more than this (log of the ratio of their intensities of its gene there; inf = off)


@dataclass(frozen=True)
class Partition:
    """The refined mask and each spot's cell under it (0 = background)."""

    mask: np.ndarray  # (H, W) int64 cell ids
    cell: np.ndarray  # (n,) int64
    n_sweeps: int


class _Grid:
    """An image padded by one pixel of ``fill`` (-1: outside), flat, with the offsets of the 8 neighbours."""

    def __init__(self, labels: np.ndarray, fill=-1):
        h, w = labels.shape
        self.shape, self.stride = (h, w), w + 2
        padded = np.full((h + 2, w + 2), fill, labels.dtype)
        padded[1:-1, 1:-1] = labels
        self.flat = padded.ravel()
        s = self.stride
        self.offsets = np.array([-s - 1, -s, -s + 1, -1, 1, s - 1, s, s + 1])

    def index(self, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return (r + 1) * self.stride + c + 1

    def image(self) -> np.ndarray:
        h, w = self.shape
        return self.flat.reshape(h + 2, w + 2)[1:-1, 1:-1]


def refine_partition(mask: np.ndarray, fixed: np.ndarray, model: CellModel, x: np.ndarray, y: np.ndarray,
                     gene: np.ndarray, *, evidence: np.ndarray | None = None,
                     config: PartitionConfig = PartitionConfig()) -> Partition:
    """Refine ``mask`` into the partition of lowest energy nearby (see the module docstring).

    Parameters
    ----------
    mask : (H, W) integer ndarray, cell ids of ``model`` (0 = background), e.g. its territories with the nuclei.
    fixed : (H, W) bool ndarray, pixels that keep their label (the nuclei).
    model : the fitted spot model (profiles, concentration and ellipses of its cells; its ``tissue_px``, the pixels
        of tissue, gives background's rate: its spots over the tissue outside cells).
    x, y : (n,) spot positions in the mask's frame (pixel ``(floor(y), floor(x))``); spots outside are background.
    gene : (n,) gene index.
    evidence : optional (n, 1 + T) extra log-evidence per spot for background and each type (as the spot model's).

    Deterministic: no randomness.
    """
    h, w = mask.shape
    m = len(model.ids)
    row_of = np.zeros(int(max(mask.max(initial=0), model.ids.max(initial=0))) + 1, np.int32)
    row_of[model.ids] = np.arange(1, m + 1)  # compact labels: 0 = background, 1 + row = cell
    grid = _Grid(row_of[mask])  # int32: a frame of tens of millions of pixels is copied a few times
    inside = (x >= 0) & (y >= 0) & (x < w) & (y < h)
    pix = np.where(inside, grid.index(np.floor(y).astype(np.int64).clip(0, h - 1),
                                      np.floor(x).astype(np.int64).clip(0, w - 1)), -1)
    ins = np.flatnonzero(inside)
    order = ins[np.argsort(pix[ins], kind="stable")]  # the spots inside, by pixel
    sorted_pix = pix[order]
    fixed_flat = _Grid(fixed.astype(bool), fill=False).flat
    colour = _Grid((np.indices((h, w), np.int8) % 2 * np.array([2, 1], np.int8)[:, None, None]).sum(0, np.int8)).flat
    ctx = _Context(model, gene, pix, evidence, config)
    sweep, square = 0, np.ones((3, 3), bool)
    # the first sweep visits the pixels on a boundary or beyond their cell's ellipse, and their neighbours (an
    # update earlier in the sweep can put them on a boundary); later sweeps only the neighbours of the pixels that
    # changed (the rates and profiles move little once the boundaries settle)
    active = find_boundaries(grid.image(), connectivity=2, mode="thick") | ctx.beyond_ellipse(grid)
    for sweep in range(1, config.sweeps + 1):
        ctx.update(grid.flat)
        visit = _Grid(ndimage.binary_dilation(active, square), fill=False).flat
        before = grid.flat.copy()
        for c in range(4):
            for chunk in np.array_split(np.flatnonzero(visit & (colour == c) & ~fixed_flat), _n_chunks(visit)):
                # (pixels of one sub-lattice are not neighbours: updating them chunk by chunk changes nothing)
                cand_pix = chunk[_on_boundary(grid, chunk) | ctx.beyond_ellipse_at(grid, chunk)]
                if cand_pix.size:
                    labels, energy = ctx.energies(grid, cand_pix, order, sorted_pix)
                    grid.flat[cand_pix] = labels[np.arange(cand_pix.size), energy.argmin(1)]
        active = (grid.flat != before).reshape(h + 2, w + 2)[1:-1, 1:-1]
        if not active.any():
            break
    grid.flat[grid.flat >= 0] = _connected_to_fixed(grid.image(), fixed).ravel()
    ids = np.concatenate([[BACKGROUND], model.ids]).astype(np.int64)
    out = np.where(fixed, mask, ids[grid.image()]).astype(np.int64)
    cell = np.zeros(x.size, np.int64)
    cell[inside] = out[np.floor(y[inside]).astype(np.int64), np.floor(x[inside]).astype(np.int64)]
    if np.isfinite(config.ambient_log_ratio):
        ctx.update(grid.flat)  # the rates and profiles of the final partition
        cell[ctx.ambient(config.ambient_log_ratio)] = BACKGROUND
    return Partition(mask=out, cell=cell, n_sweeps=sweep)


def _n_chunks(visit: np.ndarray, size: int = 1 << 16) -> int:
    """Chunks of at most ~``size`` pixels per sub-lattice (each pixel's 10 candidate labels cost ~1 kB at once)."""
    return max(1, -(-int(visit.sum()) // (4 * size)))


def _on_boundary(grid: _Grid, p: np.ndarray) -> np.ndarray:
    """Whether each pixel has an in-frame 8-neighbour of another label."""
    nb = grid.flat[p[:, None] + grid.offsets]
    return ((nb != grid.flat[p][:, None]) & (nb >= 0)).any(1)


class _Context:
    """The cells' rates and gene counts under the current partition, and the energy of a label at a pixel."""

    def __init__(self, model: CellModel, gene: np.ndarray, pix: np.ndarray, evidence: np.ndarray | None,
                 config: PartitionConfig):
        self.model, self.gene, self.pix, self.evidence, self.cfg = model, gene, pix, evidence, config
        self.cls = np.concatenate([[0], model.cls]).astype(np.int64)  # per compact label (0's is unused)

    def update(self, flat: np.ndarray) -> None:
        """The rates, counts and background profile of the partition ``flat`` (a :class:`_Grid`'s)."""
        m, n_genes = len(self.model.ids), self.model.profile.shape[1]
        self.spot_label = np.where(self.pix >= 0, flat[np.maximum(self.pix, 0)], 0)  # spots outside: background
        area = np.bincount(np.maximum(flat, 0), minlength=m + 1).astype(np.float64)
        area[0] = 0.0
        n = np.bincount(self.spot_label, minlength=m + 1).astype(np.float64)
        cell_px = max(area.sum(), 1.0)
        mean_rate = max(n[1:].sum() / cell_px, 1e-6)
        self.count = n
        self.rate = (n + 1.0) / (area + 1.0 / mean_rate)  # one pseudo-spot at the cells' mean rate
        self.rate[0] = max(n[0] / max(self.model.tissue_px - cell_px, 1.0), 1e-6)
        self.counts = CellGeneCounts.from_resp(self.spot_label[:, None], self.gene, np.ones((self.gene.size, 1)),
                                               m + 1, n_genes)
        bg = self.counts.lookup(np.zeros(n_genes, np.int64), np.arange(n_genes))
        self.bg_profile = (bg + 1.0) / (n[0] + n_genes)

    def energies(self, grid: _Grid, p: np.ndarray, order: np.ndarray, sorted_pix: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(b, 10) candidate labels of pixels ``p`` (own, the 8 neighbours', background) and their energies."""
        nb = grid.flat[p[:, None] + grid.offsets]  # (b, 8), -1 outside
        labels = np.concatenate([grid.flat[p][:, None], np.maximum(nb, 0), np.zeros((p.size, 1), np.int64)], 1)
        unlike = (nb[:, None, :] != labels[:, :, None]) & (nb[:, None, :] >= 0)
        energy = self.cfg.smoothness * unlike.sum(2) + self.rate[labels]
        # the label terms once per distinct label of a pixel (its 10 candidates hold 2-3 distinct labels)
        first = (labels[:, :, None] == labels[:, None, :]).argmax(2)  # (b, 10) column of each label's first copy
        i, j = np.nonzero(first == np.arange(labels.shape[1]))
        term = np.zeros(i.size)
        if self.cfg.shape_weight:
            term += self.cfg.shape_weight * self._shape(grid, p[i], labels[i, j][:, None])[:, 0]
        # the spots of these pixels
        lo, hi = np.searchsorted(sorted_pix, p), np.searchsorted(sorted_pix, p, side="right")
        k = (hi - lo)[i]
        if k.any():
            entry = np.repeat(np.arange(i.size), k)
            start = np.repeat(lo[i] - (np.cumsum(k) - k), k)  # each run's first spot, less its offset in the output
            spots = order[start + np.arange(entry.size)]
            np.add.at(term, entry, -self._spot_log_lik(spots, labels[i, j][entry][:, None])[:, 0])
        dense = np.zeros(labels.shape)
        dense[i, j] = term
        return labels, energy + np.take_along_axis(dense, first, 1)

    def ambient(self, log_ratio: float) -> np.ndarray:
        """(n,) bool: the spots of cells that background explains better, by a log ratio of their intensities of the
        spot's gene at its pixel above ``log_ratio`` (ambient spots on a cell's pixels, as a misread class)."""
        spots = np.flatnonzero(self.spot_label > 0)
        both = np.stack([self.spot_label[spots], np.zeros(spots.size, self.spot_label.dtype)], 1)
        ll = self._spot_log_lik(spots, both)
        out = np.zeros(self.spot_label.size, bool)
        out[spots[ll[:, 1] - ll[:, 0] > log_ratio]] = True
        return out

    def beyond_ellipse(self, grid: _Grid) -> np.ndarray:
        """(H, W) bool: the cells' pixels outside their own cell's ellipse edge (pixels that background may take,
        though no neighbour is background)."""
        out = np.zeros(grid.shape, bool)
        if self.cfg.shape_weight:
            r, c = np.nonzero(grid.image() > 0)
            for i in range(0, r.size, 1 << 18):  # in chunks: a section's cells cover millions of pixels
                sl = slice(i, i + (1 << 18))
                out[r[sl], c[sl]] = self.beyond_ellipse_at(grid, grid.index(r[sl], c[sl]))
        return out

    def beyond_ellipse_at(self, grid: _Grid, p: np.ndarray) -> np.ndarray:
        """Whether each pixel ``p`` (flat) is of a cell and outside that cell's ellipse edge."""
        if not self.cfg.shape_weight:
            return np.zeros(p.size, bool)
        return self._shape(grid, p, grid.flat[p][:, None])[:, 0] > 0

    def _shape(self, grid: _Grid, p: np.ndarray, labels: np.ndarray) -> np.ndarray:
        r, c = np.divmod(p, grid.stride)
        py, px = np.repeat(r - 0.5, labels.shape[1]), np.repeat(c - 0.5, labels.shape[1])  # pixel centres
        m2 = ellipse_distance2(self.model, np.maximum(labels.ravel() - 1, 0), py, px).reshape(labels.shape)
        return np.where(labels > 0, (m2 - _EDGE2) / _EDGE2, 0.0)

    def _spot_log_lik(self, spots: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """(s, j) log of each candidate label's intensity of each spot's gene (its own share left out)."""
        g = self.gene[spots][:, None]
        own = (labels == self.spot_label[spots][:, None]).astype(np.float64)
        a = self.model.concentration
        type_p = self.model.profile[self.cls[labels], g]
        if a > 0:
            n_cg = np.maximum(self.counts.lookup(labels, g) - own, 0.0)
            q = (n_cg + a * type_p) / (np.maximum(self.count[labels] - own, 0.0) + a)
        else:
            q = type_p
        q = np.where(labels > 0, q, self.bg_profile[g])
        out = np.log(self.rate[labels] * q)
        if self.evidence is not None:
            ev = self.evidence[spots]
            out += np.where(labels > 0, np.take_along_axis(ev[:, 1:], self.cls[labels], 1), ev[:, :1])
        return out


def _connected_to_fixed(compact: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """Each cell's parts that touch its fixed pixels (all of the largest part when it has none); the rest background."""
    regions = connected_regions(compact, background=0, connectivity=2)
    n_regions = int(regions.max())
    keep = np.zeros(n_regions + 1, bool)
    keep[np.unique(regions[fixed & (compact > 0)])] = True
    # cells without fixed pixels: their largest region
    size = np.bincount(regions.ravel(), minlength=n_regions + 1)
    owner = np.zeros(n_regions + 1, np.int64)
    owner[regions.ravel()] = compact.ravel()
    has_fixed = np.zeros(int(compact.max(initial=0)) + 1, bool)
    has_fixed[owner[keep]] = True
    free = np.flatnonzero((~has_fixed[owner]) & (np.arange(n_regions + 1) > 0))
    if free.size:
        by_owner = free[np.lexsort((-size[free], owner[free]))]
        first = np.r_[True, owner[by_owner][1:] != owner[by_owner][:-1]]
        keep[by_owner[first]] = True
    keep[0] = False
    return np.where(keep[regions], compact, 0)
