"""Cell outlines as polygons: GeoJSON for QuPath and napari (layer 1.5: numpy, scikit-image).

:func:`cell_polygons` traces each cell of an instance mask (its largest 8-connected piece) along pixel edges
(``skimage.measure.find_contours`` at level 0.5 on the cell's padded crop), in pixel coordinates where pixel
``(r, c)`` spans ``[c, c + 1) x [r, r + 1)``: the frame of the spot coordinates. :func:`write_geojson` writes a
FeatureCollection with one Polygon per cell and its id, type and spot count as properties (QuPath's
``objectType`` / ``classification`` included, so QuPath imports them as cells with classes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .io import atomic_path

__all__ = ["cell_polygons", "write_geojson"]


def cell_polygons(instance: np.ndarray, *, scale: float = 1.0) -> dict[int, list[list[float]]]:
    """cell id -> closed ring ``[[x, y], ...]`` (first point repeated last), coordinates times ``scale``."""
    from skimage.measure import find_contours

    out = {}
    for i, sl in enumerate(ndimage.find_objects(instance), start=1):
        if sl is None:
            continue
        crop = np.pad(instance[sl] == i, 1)
        rings = find_contours(crop.astype(np.float32), 0.5)
        if not rings:
            continue
        ring = max(rings, key=len)  # the outer outline of the largest piece
        r0, c0 = sl[0].start - 1, sl[1].start - 1
        xy = np.stack([ring[:, 1] + c0 + 0.5, ring[:, 0] + r0 + 0.5], 1) * scale
        if not np.allclose(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        out[i] = np.round(xy, 3).tolist()
    return out


def write_geojson(path: str | os.PathLike, instance: np.ndarray, cells: pd.DataFrame, *, scale: float = 1.0,
                  unit: str = "pixel") -> Path:
    """FeatureCollection of the cells of ``cells`` (``cell, celltype, n_spots``) outlined in ``instance``."""
    rings = cell_polygons(instance, scale=scale)
    features = []
    for row in cells.itertuples(index=False):
        ring = rings.get(int(row.cell))
        if ring is None:
            continue
        features.append({"type": "Feature", "id": str(row.cell),
                         "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "cell", "cell": int(row.cell), "celltype": str(row.celltype),
                                        "n_spots": int(row.n_spots), "classification": {"name": str(row.celltype)}}})
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"type": "FeatureCollection", "unit": unit, "features": features}))
    return path
