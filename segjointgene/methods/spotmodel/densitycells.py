"""Cells from the spot density where the spots are dense enough to show where cells end (layer 1.5: numpy, scipy,
scikit-image; no torch).

With thousands of spots per cell (MERFISH, high-efficiency panels) the total spot density is an image of the cells:
it is high over the cytoplasm, falls towards the cells' edges and dips where two cells touch. A shape prior fitted to
the spots (:mod:`segjointgene.methods.spotmodel.model`) then only gets in the way. Here the density, smoothed at the
finest scale that still holds :attr:`DensityConfig.spots_per_kernel` spots of a cell's interior, is flooded from the
nuclei (a seeded watershed) inside the foreground where it exceeds both a fraction of the cells' density and the level
of the background's spots; cells meet along the density's valleys. Density peaks at the cell scale whose basins hold no
nucleus and a cell's worth of spots become cells of their own (*de novo* cells, as Baysor and Proseg find them: a cell
whose nucleus is out of the plane or missed by the stain).

:func:`density_scale` measures whether the spots resolve the cells (``sigma <= max_scale x`` the typical cell radius);
:func:`density_cells` segments. Each spot takes its pixel's cell; its ``prob`` is the share of its nearest spots
that the same cell holds (1 inside a cell, about 1/2 on a border between two cells).

Measured on a real MERFISH field of view (benchmarks/real.py, benchmarks/RESULTS.md): spot accuracy 0.964 against
0.916 for the best nucleus expansion; thinned to a tenth of its spots (~1 500 per cell) 0.958; at ~440 per cell it
no longer beats the spot model, which is why :func:`density_scale` decides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from segjointgene.constants import BACKGROUND
from segjointgene.evaluate.baselines import density_watershed, spot_density

from .model import nucleus_stats, typical_radius

log = logging.getLogger(__name__)

__all__ = ["DensityCells", "DensityConfig", "DensityScale", "density_boundaries", "density_cells", "density_scale",
           "local_share"]


@dataclass(frozen=True)
class DensityConfig:
    """Knobs of the density engine (chosen on thinned copies of one real MERFISH field; benchmarks/RESULTS.md)."""

    spots_per_kernel: float = 100.0  # the smoothing Gaussian (area 4 pi sigma^2) holds this many spots of a cell
    max_scale: float = 0.25  # the density resolves cells when its sigma is at most this x the typical cell radius
    max_peak_ratio: float = 0.8  # ... and the spots crowd around the nuclei: the density a half to one radius out is
    # at most this fraction of that on the nuclei (a flat density has no valleys to split touching cells along)
    foreground: float = 0.1  # foreground: density above this fraction of the cells' mean density ...
    background_sd: float = 3.0  # ... and this many Poisson standard deviations above the background's density
    denovo: bool = True  # cells without a nucleus from dense foreground peaks far from every nucleus
    denovo_min_spots: float = 0.25  # a de novo cell holds at least this fraction of the median nucleated cell's spots
    denovo_scale: float = 0.3  # the peaks of cells are sought in the density at sigma = this x the cell radius ...
    denovo_dynamic: float = 0.05  # ... that rise at least this fraction of its median over the nuclei above the
    # saddle to a higher peak (h-maxima), and whose basins hold no nucleus
    share_k: int = 24  # nearest spots whose cells make a spot's probability

    def __post_init__(self) -> None:
        for name in ("spots_per_kernel", "max_scale", "foreground", "denovo_min_spots"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DensityConfig.{name} must be > 0; got {getattr(self, name)}")
        if self.background_sd < 0 or self.share_k < 1 or self.denovo_scale <= 0 or self.denovo_dynamic < 0:
            raise ValueError("DensityConfig.background_sd and denovo_dynamic must be >= 0, denovo_scale > 0 and "
                             "share_k >= 1")


@dataclass(frozen=True)
class DensityScale:
    """How dense the spots are, relative to the cells.

    Attributes
    ----------
    sigma : smoothing scale in pixels (at least 1).
    radius : a typical cell's radius in pixels (half the median distance between nearest nuclei).
    cell_rate : spots per pixel within ``radius`` of the nuclei (the cells' mean density).
    background_rate : spots per pixel of the tissue farther than ``2 radius`` from every nucleus (0 when none).
    peak_ratio : the density half a radius to a radius from the nuclei over the density on them (< 1: the spots
        crowd around the nuclei, as in real cells, so that density valleys lie between them).
    resolves : ``sigma <= max_scale x radius`` and ``peak_ratio <= max_peak_ratio``: the density shows the cells.
    """

    sigma: float
    radius: float
    cell_rate: float
    background_rate: float
    peak_ratio: float
    resolves: bool


@dataclass(frozen=True)
class DensityCells:
    """The segmentation: the mask, each spot's cell and probability, and the cells found without a nucleus."""

    mask: np.ndarray  # (H, W) int64 cell ids, 0 = background
    cell: np.ndarray  # (n,) int64, each spot's cell (its pixel's)
    prob: np.ndarray  # (n,) float32
    denovo_ids: np.ndarray  # (d,) int64 ids of the de novo cells (above every nucleus id)
    scale: DensityScale


def _radius_and_area(nuclei: np.ndarray) -> tuple[float, float]:
    """A typical cell's radius (half the median distance between nearest nuclei) and the nuclei's total area."""
    ids = np.unique(nuclei[nuclei != BACKGROUND])
    if ids.size == 0:
        return 1.0, 0.0
    centre, area = nucleus_stats(nuclei, ids)
    return typical_radius(centre, area), float(area.sum())


def density_boundaries(x: np.ndarray, y: np.ndarray, nuclei: np.ndarray, boundaries: str,
                       config: DensityConfig = DensityConfig()) -> DensityScale | None:
    """The density's scale when the density engine should draw the cells (``--model_boundaries``: ``density``
    always, ``auto`` when :attr:`DensityScale.resolves`), else None (the spot model's partition).

    ``auto`` first bounds the cells' density by the spots per pixel of nucleus (the pixels near nuclei include the
    nuclei): when even that bound cannot resolve the cells - sparse panels, e.g. CA1 - the frame-size distance
    transform of :func:`density_scale` is skipped.
    """
    if boundaries == "partition":
        return None
    if boundaries == "auto":
        radius, area = _radius_and_area(nuclei)
        h, w = nuclei.shape
        n = int(((x >= 0) & (y >= 0) & (x < w) & (y < h)).sum())
        bound = n / max(area, 1.0)
        if bound <= 0 or np.sqrt(config.spots_per_kernel / (4 * np.pi * bound)) > config.max_scale * radius:
            return None
    scale = density_scale(x, y, nuclei, config)
    return scale if boundaries == "density" or scale.resolves else None


def density_scale(x: np.ndarray, y: np.ndarray, nuclei: np.ndarray,
                  config: DensityConfig = DensityConfig()) -> DensityScale:
    """Measure the spots' density near and far from the nuclei and the finest scale that resolves cells.

    Parameters
    ----------
    x, y : (n,) float spot positions in the frame of ``nuclei`` (pixel ``(floor(y), floor(x))``).
    nuclei : (H, W) integer nucleus ids, 0 = background.

    Examples
    --------
    >>> nuc = np.zeros((40, 40), np.int32); nuc[8:12, 8:12] = 1; nuc[28:32, 28:32] = 2
    >>> yy, xx = np.mgrid[0:40:0.1, 0:40:0.1]
    >>> s = density_scale(xx.ravel(), yy.ravel(), nuc)  # 100 spots per pixel everywhere: no peaks at the nuclei
    >>> round(s.cell_rate), s.sigma, round(s.peak_ratio, 2), s.resolves
    (100, 1.0, 1.0, False)
    """
    counts = spot_density(x, y, nuclei.shape, 0.0)
    radius = _radius_and_area(nuclei)[0]
    dist = ndimage.distance_transform_edt(nuclei == BACKGROUND) if (nuclei != BACKGROUND).any() \
        else np.full(nuclei.shape, np.inf)
    near = dist <= radius
    cell_rate = float(counts[near].mean()) if near.any() else 0.0
    far = dist > 2 * radius
    background_rate = _tissue_rate(counts, far, radius)
    sigma = max(1.0, float(np.sqrt(config.spots_per_kernel / (4 * np.pi * max(cell_rate, 1e-12)))))
    on, ring = dist == 0, (dist >= radius / 2) & near
    peak_ratio = float(counts[ring].mean() / max(counts[on].mean(), 1e-12)) if on.any() and ring.any() else 1.0
    return DensityScale(sigma=sigma, radius=radius, cell_rate=cell_rate, background_rate=background_rate,
                        peak_ratio=peak_ratio, resolves=bool(cell_rate > 0 and sigma <= config.max_scale * radius
                                                             and peak_ratio <= config.max_peak_ratio))


def _tissue_rate(counts: np.ndarray, where: np.ndarray, radius: float) -> float:
    """Spots per pixel of ``where`` within bins (4 radii wide) that hold any spot: empty slide is not tissue."""
    side = max(int(round(4 * radius)), 1)
    h, w = counts.shape
    hb, wb = -(-h // side), -(-w // side)
    pad = np.zeros((hb * side, wb * side), counts.dtype)
    pad[:h, :w] = counts
    occupied = pad.reshape(hb, side, wb, side).sum((1, 3)) > 0
    tissue = np.repeat(np.repeat(occupied, side, 0), side, 1)[:h, :w] & where
    return float(counts[tissue].mean()) if tissue.any() else 0.0


def density_cells(x: np.ndarray, y: np.ndarray, nuclei: np.ndarray, *, scale: DensityScale | None = None,
                  first_new_id: int | None = None, config: DensityConfig = DensityConfig()) -> DensityCells:
    """Segment cells from the spot density (see the module docstring).

    Parameters
    ----------
    x, y : (n,) float spot positions in the frame of ``nuclei``; spots outside the frame are background.
    nuclei : (H, W) integer nucleus ids (the cells' ids), 0 = background; every nucleus keeps its pixels.
    scale : from :func:`density_scale` (measured here when None).
    first_new_id : the id of the first de novo cell (default ``nuclei.max() + 1``; must exceed every nucleus id).

    Returns
    -------
    DensityCells; de novo cells take ids ``first_new_id, first_new_id + 1, ...`` in the row-major order of their
    peaks.

    Deterministic: no randomness.
    """
    nuclei = np.asarray(nuclei)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = density_scale(x, y, nuclei, config) if scale is None else scale
    density = spot_density(x, y, nuclei.shape, scale.sigma)
    threshold = _foreground_threshold(scale, config)
    markers = nuclei.astype(np.int64)
    top = int(markers.max(initial=0))
    if first_new_id is not None:
        if first_new_id <= top:
            raise ValueError(f"first_new_id={first_new_id} must exceed every nucleus id (the largest is {top})")
        top = first_new_id - 1
    candidates = (_denovo_markers(x, y, nuclei, density > threshold, scale, config) if config.denovo
                  else np.zeros(nuclei.shape, np.int32))
    n_new = int(candidates.max(initial=0))
    markers[candidates > 0] = top + candidates[candidates > 0]
    mask = density_watershed(markers, density, threshold)
    cell = _cells_at(mask, x, y)
    denovo = np.arange(top + 1, top + 1 + n_new, dtype=np.int64)
    if n_new:  # too few spots for a cell: their markers go and the watershed is redone without them
        counts = np.bincount(cell, minlength=top + n_new + 1)
        nucleated = counts[np.unique(nuclei[nuclei != BACKGROUND])]
        floor = config.denovo_min_spots * float(np.median(nucleated)) if nucleated.size else 0.0
        weak = counts[denovo] < floor
        if weak.any():
            markers[np.isin(markers, denovo[weak])] = BACKGROUND
            mask = density_watershed(markers, density, threshold)
            cell = _cells_at(mask, x, y)
            kept = denovo[~weak]
            lut = np.arange(int(max(mask.max(initial=0), top)) + 1, dtype=np.int64)
            lut[kept] = top + 1 + np.arange(kept.size)  # contiguous ids for the kept ones
            mask, cell, denovo = lut[mask], lut[cell], top + 1 + np.arange(kept.size, dtype=np.int64)
    log.debug("density engine: sigma %.2f px (cell radius %.1f px, %.3g spots/px in cells, %.3g in background), "
             "foreground > %.3g spots/px, %d de novo cell(s)", scale.sigma, scale.radius, scale.cell_rate,
             scale.background_rate, threshold, denovo.size)
    return DensityCells(mask=mask.astype(np.int64), cell=cell, prob=local_share(x, y, cell, k=config.share_k),
                        denovo_ids=denovo, scale=scale)


def _foreground_threshold(scale: DensityScale, config: DensityConfig) -> float:
    """Above ``foreground x`` the cells' rate and ``background_sd`` Poisson deviations above the background's rate."""
    bg = scale.background_rate
    noise = np.sqrt(bg / (4 * np.pi * scale.sigma ** 2))  # sd of a Gaussian-smoothed Poisson field of rate bg
    return max(config.foreground * scale.cell_rate, bg + config.background_sd * noise)


def _denovo_markers(x: np.ndarray, y: np.ndarray, nuclei: np.ndarray, foreground: np.ndarray,
                    scale: DensityScale, config: DensityConfig) -> np.ndarray:
    """(H, W) int32 markers 1..d of the candidate cells without a nucleus: the foreground's density peaks at the cell
    scale (sigma = ``denovo_scale`` x the radius; peaks of dynamic ``denovo_dynamic`` x the nuclei's median density
    there, and 3 Poisson standard deviations, or more) whose basins hold no nucleus pixel. Each marker is its peak's
    plateau (its h-maximum)."""
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    inside = nuclei != BACKGROUND
    if not inside.any() or not foreground.any():
        return np.zeros(nuclei.shape, np.int32)
    sigma = max(config.denovo_scale * scale.radius, scale.sigma)
    coarse = spot_density(x, y, nuclei.shape, sigma)
    level = float(np.median(coarse[inside]))
    noise = np.sqrt(scale.cell_rate / (4 * np.pi * sigma ** 2))  # Poisson sd of the smoothed density in a cell
    peaks, n = ndimage.label(h_maxima(coarse, max(config.denovo_dynamic * level, 3 * noise)) & foreground)
    if n == 0:
        return np.zeros(nuclei.shape, np.int32)
    basins = watershed(-coarse, peaks, mask=foreground)
    nucleated = np.zeros(n + 1, bool)
    nucleated[np.unique(basins[inside])] = True
    nucleated[0] = True
    keep = np.flatnonzero(~nucleated)
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, keep.size + 1)
    return lut[peaks]


def _cells_at(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    r, c = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    inside = (r >= 0) & (c >= 0) & (r < h) & (c < w)
    out = np.zeros(x.size, np.int64)
    out[inside] = mask[r[inside], c[inside]]
    return out


def local_share(x: np.ndarray, y: np.ndarray, cell: np.ndarray, *, k: int = 24, chunk: int = 1 << 18) -> np.ndarray:
    """(n,) float32: the share of each spot's ``k`` nearest other spots that its cell (or background) holds.

    Examples
    --------
    >>> local_share(np.array([0.0, 1, 2, 10, 11]), np.zeros(5), np.array([1, 1, 2, 2, 2]), k=2).tolist()
    [0.5, 0.5, 0.0, 1.0, 1.0]
    """
    n = x.size
    k = min(k, n - 1)
    if k < 1:
        return np.ones(n, np.float32)
    pts = np.stack([x, y], 1)
    tree = cKDTree(pts)
    out = np.empty(n, np.float32)
    for i in range(0, n, chunk):
        _, idx = tree.query(pts[i:i + chunk], k=k + 1)
        out[i:i + chunk] = (cell[idx[:, 1:]] == cell[i:i + chunk, None]).mean(1)
    return out
