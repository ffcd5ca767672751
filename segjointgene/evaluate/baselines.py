"""Baseline segmentations built from the nuclei and the spots alone (layer 1.5: numpy, scipy, scikit-image; no torch).

Every baseline works in the raw pixel frame, starts from the nucleus masks the run started from and keeps their ids
(so spot-assignment accuracy compares ids directly):

* ``nuclei``: the nucleus masks themselves;
* ``expand_<k>``: the nuclei grown by ``k`` pixels into the background (:func:`expand_nuclei`, identical to
  ``skimage.segmentation.expand_labels``: each background pixel within ``k`` px, Euclidean, joins its nearest nucleus);
* ``density_watershed``: a watershed of the total spot density seeded by the nuclei, inside a foreground where the
  density exceeds a data-driven threshold (:func:`density_watershed`, :func:`density_threshold`).

The cell-type mask of a baseline gives each instance its nucleus type (:func:`celltype_mask`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..constants import BACKGROUND

log = logging.getLogger(__name__)

__all__ = [
    "NUCLEI",
    "WATERSHED",
    "NearestNucleus",
    "baseline_segmentations",
    "celltype_mask",
    "density_threshold",
    "density_watershed",
    "expand_name",
    "expand_nuclei",
    "nearest_nucleus",
    "spot_density",
]

NUCLEI = "nuclei"
WATERSHED = "density_watershed"
#: Gaussian truncation (in sigmas) of the density; the same as the per-gene density of the patches.
DENSITY_TRUNCATE = 3.0
#: Default foreground threshold of the density watershed, as a fraction of the median density over nucleus pixels.
DEFAULT_DENSITY_FRACTION = 0.5


def expand_name(radius_px: int) -> str:
    """Row name of the expansion baseline of ``radius_px`` pixels (``expand_5`` ...)."""
    return f"expand_{radius_px}"


def _check_nuclei(nuclei: np.ndarray) -> np.ndarray:
    nuclei = np.asarray(nuclei)
    if nuclei.ndim != 2:
        raise ValueError(f"nuclei must be a 2-D label image; got shape {nuclei.shape}")
    if not np.issubdtype(nuclei.dtype, np.integer):
        raise TypeError(f"nuclei has dtype {nuclei.dtype}; integer labels are needed (e.g. nuclei.astype(np.uint32))")
    if nuclei.size and np.issubdtype(nuclei.dtype, np.signedinteger) and nuclei.min() < 0:
        raise ValueError("nuclei has negative labels; labels are >= 0 with 0 = background")
    return nuclei


# ------------------------------------------------------------------------------------------------ expansion
@dataclass(frozen=True)
class NearestNucleus:
    """Distance to and label of the nearest nucleus pixel, for every pixel (one Euclidean distance transform).

    Attributes
    ----------
    distance : (H, W) float32, 0 on nucleus pixels (inf everywhere when there is no nucleus).
    label : (H, W) ndarray of the nuclei's dtype, the id of the nearest nucleus pixel.
    """

    distance: np.ndarray
    label: np.ndarray


def nearest_nucleus(nuclei: np.ndarray) -> NearestNucleus:
    """One distance transform shared by every expansion radius (the transform is the costly part).

    Ties between equidistant nuclei resolve as in ``scipy.ndimage.distance_transform_edt`` (and hence as in
    ``skimage.segmentation.expand_labels``, which uses the same call).
    """
    nuclei = _check_nuclei(nuclei)
    if not (nuclei != BACKGROUND).any():
        return NearestNucleus(np.full(nuclei.shape, np.inf, np.float32), np.zeros_like(nuclei))
    dist, idx = ndimage.distance_transform_edt(nuclei == BACKGROUND, return_indices=True)
    label = nuclei[idx[0], idx[1]]
    return NearestNucleus(distance=dist.astype(np.float32), label=label)


def expand_nuclei(nuclei: np.ndarray, radius_px: float, *, nearest: NearestNucleus | None = None) -> np.ndarray:
    """Grow every nucleus by ``radius_px`` pixels into the background, without overlap.

    Equal to ``skimage.segmentation.expand_labels(nuclei, radius_px)``: a background pixel within ``radius_px``
    (Euclidean) of a nucleus joins the nearest one; nucleus pixels keep their label. Pass ``nearest`` (from
    :func:`nearest_nucleus`) to reuse one distance transform for several radii.

    Parameters
    ----------
    nuclei : (H, W) integer ndarray, nucleus ids, 0 = background.
    radius_px : growth radius in pixels (>= 0).
    nearest : precomputed :func:`nearest_nucleus` of ``nuclei``.

    Returns
    -------
    (H, W) ndarray of the nuclei's dtype.

    Examples
    --------
    >>> n = np.zeros((1, 7), np.uint32); n[0, 0] = 1; n[0, 6] = 2
    >>> expand_nuclei(n, 2).tolist()
    [[1, 1, 1, 0, 2, 2, 2]]
    """
    if radius_px < 0:
        raise ValueError(f"radius_px must be >= 0; got {radius_px}")
    nearest = nearest_nucleus(nuclei) if nearest is None else nearest
    if nearest.label.shape != np.shape(nuclei):
        raise ValueError(f"nearest was computed for shape {nearest.label.shape}, not {np.shape(nuclei)}")
    return np.where(nearest.distance <= radius_px, nearest.label, BACKGROUND).astype(nearest.label.dtype)


# ------------------------------------------------------------------------------------------------ density watershed
def spot_density(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Total spot density of all genes: a spot histogram smoothed by a Gaussian (spots per pixel).

    A spot at ``(x, y)`` counts in pixel ``(floor(y), floor(x))``; spots outside the frame are ignored. The Gaussian is
    truncated at ``DENSITY_TRUNCATE`` sigmas with zero outside the frame, as for the patch densities, so a spot far
    from the edges integrates to 1.

    Parameters
    ----------
    x, y : (n,) float spot positions (x = column).
    shape : (H, W) of the frame.
    sigma : Gaussian sigma in pixels; 0 returns the raw counts.

    Returns
    -------
    (H, W) float32 ndarray.

    Examples
    --------
    >>> d = spot_density(np.array([10.5]), np.array([10.5]), (21, 21), 2.0)
    >>> round(float(d.sum()), 3), bool(d[10, 10] == d.max())
    (1.0, True)
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0; got {sigma}")
    h, w = shape
    rows, cols = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    ok = (rows >= 0) & (cols >= 0) & (rows < h) & (cols < w)
    counts = np.bincount(rows[ok] * w + cols[ok], minlength=h * w).astype(np.float32).reshape(h, w)
    if sigma == 0:
        return counts
    return ndimage.gaussian_filter(counts, sigma, mode="constant", truncate=DENSITY_TRUNCATE)


def density_threshold(density: np.ndarray, nuclei: np.ndarray, *, fraction: float = DEFAULT_DENSITY_FRACTION,
                      sigma: float = 5.0) -> float:
    """Foreground threshold of the density watershed: ``fraction`` x the median density over nucleus pixels.

    Why this rule: nuclei lie inside cells, so the median density over nucleus pixels estimates the spot density of
    cell interiors on this section (whatever the platform's detection efficiency). Across a straight border between a
    cell of uniform density and empty background, a Gaussian-smoothed density falls to exactly half the interior
    value at the border; ``fraction = 0.5`` therefore puts the foreground edge at the cell edge for isolated cells, and
    background noise (uniform, far sparser than cells) stays below it. Without nuclei, or when the nuclei hold no
    spots, the threshold falls back to half the peak density of one isolated spot, ``0.5 / (2 pi sigma^2)``, i.e. the
    foreground reaches about 1.2 sigma around lone spots.

    Parameters
    ----------
    density : (H, W) float, from :func:`spot_density`.
    nuclei : (H, W) integer nucleus ids, 0 = background.
    fraction : in (0, 1].
    sigma : the density's Gaussian sigma (used by the fallback only).

    Examples
    --------
    >>> round(density_threshold(np.array([[0.2, 0.4, 0.0]]), np.array([[1, 1, 0]])), 6)
    0.15
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    inside = np.asarray(nuclei) != BACKGROUND
    median = float(np.median(density[inside])) if inside.any() else 0.0
    if median > 0:
        return fraction * median
    fallback = 0.5 / (2 * np.pi * max(sigma, 0.5) ** 2)
    log.warning("density threshold: no spot density on nucleus pixels; falling back to %.3g (half a lone spot's peak)",
                fallback)
    return fallback


def density_watershed(nuclei: np.ndarray, density: np.ndarray, threshold: float) -> np.ndarray:
    """Watershed of the total spot density, seeded by the nuclei, restricted to ``density > threshold``.

    Cells flood outward from their whole nucleus masks (kept as they are) down the density, and meet along density
    valleys; a pixel joins a cell only if it is connected to that nucleus through foreground (``density > threshold``)
    pixels. Foreground that no nucleus reaches stays background.

    Parameters
    ----------
    nuclei : (H, W) integer ndarray, nucleus ids, 0 = background (the markers).
    density : (H, W) float, the total spot density (:func:`spot_density`).
    threshold : foreground threshold (:func:`density_threshold`).

    Returns
    -------
    (H, W) ndarray of the nuclei's dtype.

    Examples
    --------
    >>> n = np.array([[1, 0, 0, 0, 0, 2]], np.uint32)
    >>> d = np.array([[3.0, 2.0, 1.0, 0.5, 2.0, 3.0]])
    >>> density_watershed(n, d, 0.8).tolist()
    [[1, 1, 1, 0, 2, 2]]
    """
    from skimage.segmentation import watershed

    nuclei = _check_nuclei(nuclei)
    density = np.asarray(density)
    if density.shape != nuclei.shape:
        raise ValueError(f"density has shape {density.shape} but nuclei has {nuclei.shape}")
    ids = np.unique(nuclei[nuclei != BACKGROUND])
    if ids.size == 0:
        return np.zeros_like(nuclei)
    # watershed labels are int32 internally: work on compact ids and map back, so any id range is safe
    compact = np.zeros(nuclei.shape, np.int32)
    inside = nuclei != BACKGROUND
    compact[inside] = np.searchsorted(ids, nuclei[inside]) + 1
    mask = (density > threshold) | inside
    labels = watershed(-density.astype(np.float32, copy=False), markers=compact, mask=mask)
    lut = np.concatenate([[BACKGROUND], ids]).astype(nuclei.dtype)
    return lut[labels]


# ------------------------------------------------------------------------------------------------ types and all baselines
def celltype_mask(instance: np.ndarray, cell_ids: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Cell-type mask of an instance mask: every pixel takes the class of its cell (0 on background).

    Parameters
    ----------
    instance : (H, W) integer ndarray, cell ids, 0 = background.
    cell_ids, class_ids : (n,) integer arrays, the class of each cell (e.g. ``cells.csv`` ``cell`` and
        ``celltype_id``); cells missing from the table get class 0.

    Returns
    -------
    (H, W) int32 ndarray.

    Examples
    --------
    >>> celltype_mask(np.array([[0, 5, 9]]), np.array([5, 9]), np.array([2, 1])).tolist()
    [[0, 2, 1]]
    """
    instance = _check_nuclei(instance)
    cell_ids = np.asarray(cell_ids, np.int64)
    class_ids = np.asarray(class_ids, np.int32)
    if cell_ids.shape != class_ids.shape:
        raise ValueError(f"cell_ids ({cell_ids.size}) and class_ids ({class_ids.size}) differ in length")
    top = int(instance.max()) if instance.size else 0
    if top <= max(1 << 24, instance.size):  # a lookup table indexed by id
        lut = np.zeros(top + 1, np.int32)
        ok = cell_ids <= top
        lut[cell_ids[ok]] = class_ids[ok]
        return lut[instance]
    order = np.argsort(cell_ids)
    ids, cls = cell_ids[order], class_ids[order]
    pos = np.minimum(np.searchsorted(ids, instance), max(ids.size - 1, 0))
    return np.where((ids.size > 0) & (ids[pos] == instance), cls[pos] if ids.size else 0, 0).astype(np.int32)


def baseline_segmentations(nuclei: np.ndarray, x: np.ndarray, y: np.ndarray, *, sigma: float,
                           radii: Sequence[int] = (5, 10, 15),
                           density_fraction: float = DEFAULT_DENSITY_FRACTION) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, instance mask)`` of every baseline, one at a time (memory holds one or two whole-frame masks).

    Order: ``nuclei``, ``expand_<r>`` for each radius (one shared distance transform), ``density_watershed``.

    Parameters
    ----------
    nuclei : (H, W) integer nucleus ids (the run's initial masks), 0 = background.
    x, y : (n,) float spot positions in the same frame.
    sigma : Gaussian sigma of the total density (the dataset's ``density_sigma``).
    radii : expansion radii in pixels.
    density_fraction : see :func:`density_threshold`.

    Examples
    --------
    >>> n = np.zeros((16, 16), np.uint32); n[7:9, 7:9] = 3
    >>> [name for name, _ in baseline_segmentations(n, np.array([8.0]), np.array([8.0]), sigma=1.0, radii=(2,))]
    ['nuclei', 'expand_2', 'density_watershed']
    """
    nuclei = _check_nuclei(nuclei)
    yield NUCLEI, nuclei
    if radii:
        nearest = nearest_nucleus(nuclei)
        for r in radii:
            yield expand_name(int(r)), expand_nuclei(nuclei, r, nearest=nearest)
        del nearest
    density = spot_density(x, y, nuclei.shape, sigma)
    threshold = density_threshold(density, nuclei, fraction=density_fraction, sigma=sigma)
    log.info("density watershed: foreground where the total density > %.4g spots/px (%.0f%% of pixels)", threshold,
             100.0 * float((density > threshold).mean()))
    yield WATERSHED, density_watershed(nuclei, density, threshold)
