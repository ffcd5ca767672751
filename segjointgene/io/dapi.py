"""The DAPI image: smoothing, a foreground that survives uneven brightness, nuclei without centroids (layer 1.3:
numpy, scipy, scikit-image).

:func:`half_peak_foreground` is the global half-Otsu foreground of the reference recipe plus every pixel that reaches
half of its neighbourhood's peak above the background's noise, so dim nuclei under uneven illumination are kept;
:func:`detect_nuclei` finds nuclei in the DAPI alone (a watershed of the foreground's distance transform).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import ndimage

log = logging.getLogger(__name__)

__all__ = ["detect_nuclei", "half_peak_foreground", "smooth_dapi"]


def smooth_dapi(dapi: np.ndarray) -> tuple[np.ndarray, float]:
    """The DAPI smoothed by a Gaussian of sigma 1 and its Otsu threshold (the reference's first steps)."""
    from skimage.filters import gaussian, threshold_otsu

    smooth = gaussian(dapi.astype(np.float32), sigma=1.0, preserve_range=True)
    return smooth, float(threshold_otsu(smooth))


def half_peak_foreground(smooth: np.ndarray, otsu: float) -> np.ndarray:
    """smooth > 0.5 * Otsu, or above both 3 noise sigmas over the background and half the peak of its 11-px window
    (background level and noise: median and MAD of the pixels below Otsu). Holes are not filled here."""
    below = smooth[smooth < otsu]
    bg = float(np.median(below)) if below.size else 0.0
    noise = float(np.median(np.abs(below - bg))) * 1.4826 if below.size else 0.0
    local = smooth > np.maximum(bg + 3.0 * noise, 0.5 * ndimage.maximum_filter(smooth, size=11))
    return (smooth > 0.5 * otsu) | local


def detect_nuclei(dapi: np.ndarray, *, min_distance: int = 3, min_area: int = 8) -> tuple[np.ndarray, pd.DataFrame]:
    """Nuclei found in the DAPI image alone (no centroids): the half-peak foreground opened and its holes filled,
    split by the watershed of its distance transform from its maxima (``min_distance`` apart); pieces under
    ``min_area`` px dropped. Returns the label image and ``cell, x, y`` (pixel-centre centroids)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    fg = ndimage.binary_fill_holes(ndimage.binary_opening(half_peak_foreground(*smooth_dapi(dapi))))
    dist = ndimage.distance_transform_edt(fg)
    peaks = peak_local_max(dist, min_distance=min_distance, labels=ndimage.label(fg)[0], exclude_border=False)
    markers = np.zeros(dapi.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    area = np.bincount(labels.ravel())
    labels[area[labels] < min_area] = 0
    ids = np.unique(labels[labels > 0])
    relabel = np.zeros(int(labels.max()) + 1, np.uint32)
    relabel[ids] = np.arange(1, ids.size + 1)
    labels = relabel[labels]
    idx = np.arange(1, ids.size + 1)
    cy, cx = (np.asarray(ndimage.mean(g, labels, idx)) for g in np.indices(dapi.shape))
    log.info("found %d nuclei in the DAPI image (no centroids given)", ids.size)
    return labels, pd.DataFrame({"cell": idx, "x": cx + 0.5, "y": cy + 0.5})
