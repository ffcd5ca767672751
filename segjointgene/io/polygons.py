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
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from .files import atomic_path
from .windows import WindowReader

__all__ = ["GeoJSONWriter", "PolygonLabels", "cell_polygons", "transcript_assignment", "write_geojson",
           "write_xenium_ranger"]


class PolygonLabels(WindowReader):
    """A label image drawn from polygons only where a window of it is read, so a section-sized frame is never held
    whole (a frame in the sense of :mod:`segjointgene.io.windows`).

    A pixel takes the id of a polygon that contains its centre (``skimage.draw.polygon``); where polygons overlap,
    the later one wins - the image that painting them in order would give.

    Parameters
    ----------
    ys, xs : vertex rows and columns (pixels) of all polygons, one after the other.
    starts : (m + 1,) offsets: polygon ``i`` has vertices ``starts[i]:starts[i + 1]``.
    ids : (m,) label of each polygon (> 0).
    shape : (H, W) of the frame.
    bucket : edge (pixels) of the grid that indexes which polygons reach a window.
    """

    def __init__(self, ys: np.ndarray, xs: np.ndarray, starts: np.ndarray, ids: np.ndarray, shape: tuple[int, int],
                 *, bucket: int = 256):
        self.ys, self.xs = np.asarray(ys, np.float64), np.asarray(xs, np.float64)
        self.starts, self.ids = np.asarray(starts, np.int64), np.asarray(ids, np.uint32)
        self.shape, self.dtype, self.ndim, self.bucket = (int(shape[0]), int(shape[1])), np.dtype(np.uint32), 2, bucket
        m = self.ids.size
        keep = np.diff(self.starts) >= 3  # a polygon needs three vertices
        first = self.starts[:-1][keep]
        b = [np.floor(np.clip(f.reduceat(v, first), 0, lim - 1) / bucket).astype(np.int64)
             for f, v, lim in ((np.minimum, self.ys, shape[0]), (np.maximum, self.ys, shape[0]),
                               (np.minimum, self.xs, shape[1]), (np.maximum, self.xs, shape[1]))] if first.size else []
        self._cols = -(-self.shape[1] // bucket)
        pairs = [(r * self._cols + c, i) for i, r0, r1, c0, c1 in zip(np.flatnonzero(keep), *b)
                 for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)] if m else []
        pairs = np.array(sorted(pairs), np.int64).reshape(-1, 2)
        self._key, self._poly = pairs[:, 0], pairs[:, 1]

    def _polygons_near(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Indices (in painting order) of the polygons whose bounding boxes reach the window."""
        parts = []
        for br in range(r0 // self.bucket, (r1 - 1) // self.bucket + 1):
            lo, hi = np.searchsorted(self._key, [br * self._cols + c0 // self.bucket,
                                                 br * self._cols + (c1 - 1) // self.bucket + 1])
            parts.append(self._poly[lo:hi])
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        from skimage.draw import polygon

        out = np.zeros((r1 - r0, c1 - c0), np.uint32)
        if out.size == 0:
            return out
        for i in self._polygons_near(r0, r1, c0, c1):
            s, e = self.starts[i], self.starts[i + 1]
            # in window coordinates (subtracting whole pixels is exact) and clipped to the window: 2-3x faster
            rr, cc = polygon(self.ys[s:e] - r0, self.xs[s:e] - c0, out.shape)
            out[rr, cc] = self.ids[i]
        return out


def cell_polygons(instance: np.ndarray, *, scale: float = 1.0, ids=None, origin: tuple[float, float] = (0.0, 0.0),
                  tolerance: float = 0.3) -> dict[int, list[list[float]]]:
    """cell id -> closed ring ``[[x, y], ...]`` (first point repeated last) of every cell of ``instance`` (or of those
    in ``ids``), for a mask whose top-left pixel is ``origin`` (y, x) of the frame, coordinates times ``scale``. Ids
    may be sparse and large (labels are compacted first). Vertices closer than ``tolerance`` px to the line of their
    neighbours are dropped (Douglas-Peucker): 3x fewer for a 12 500-px ellipse, the areas of it, a 3 x 3 square and a
    49-px disc unchanged (0.4 px would cut the square's corners)."""
    from skimage.measure import approximate_polygon, find_contours

    codes, labels = pd.factorize(np.asarray(instance).ravel())
    compact = (codes + 1).reshape(np.shape(instance))
    wanted = None if ids is None else {int(i) for i in ids}
    out = {}
    for code, sl in enumerate(ndimage.find_objects(compact), start=1):
        cell = int(labels[code - 1])
        if sl is None or cell == 0 or (wanted is not None and cell not in wanted):
            continue
        crop = np.pad(compact[sl] == code, 1)
        rings = find_contours(crop.astype(np.float32), 0.5)
        if not rings:
            continue
        ring = max(rings, key=len)  # the outer outline of the largest piece
        if tolerance > 0:
            ring = approximate_polygon(ring, tolerance)
        r0, c0 = sl[0].start - 1 + origin[0], sl[1].start - 1 + origin[1]
        xy = np.stack([ring[:, 1] + c0 + 0.5, ring[:, 0] + r0 + 0.5], 1) * scale
        if not np.allclose(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        out[cell] = np.round(xy, 3).tolist()
    return dict(sorted(out.items()))


class GeoJSONWriter:
    """A FeatureCollection written feature by feature (bounded memory), atomically: a context manager whose
    :meth:`add` takes cells (``cell, celltype, n_spots``) and their rings; feature ids ``<id_prefix><cell>``."""

    def __init__(self, path: str | os.PathLike, *, unit: str = "pixel", id_prefix: str = ""):
        self.path, self.unit, self.id_prefix, self.n = Path(path), unit, id_prefix, 0

    def __enter__(self) -> GeoJSONWriter:
        self._stack = ExitStack()  # the file is closed before the atomic rename (last in, first out)
        self._fh = self._stack.enter_context(open(self._stack.enter_context(atomic_path(self.path)), "w"))
        self._fh.write(f'{{"type": "FeatureCollection", "unit": {json.dumps(self.unit)}, "features": [')
        return self

    def add(self, cells: pd.DataFrame, rings: dict[int, list[list[float]]]) -> None:
        for row in cells.itertuples(index=False):
            ring = rings.get(int(row.cell))
            if ring is None:
                continue
            feature = {"type": "Feature", "id": f"{self.id_prefix}{row.cell}",
                       "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"objectType": "cell", "cell": int(row.cell), "celltype": str(row.celltype),
                                      "n_spots": int(row.n_spots), "classification": {"name": str(row.celltype)}}}
            self._fh.write((", " if self.n else "") + json.dumps(feature))
            self.n += 1

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            self._fh.write("]}")
        return self._stack.__exit__(*exc)


def write_geojson(path: str | os.PathLike, instance: np.ndarray, cells: pd.DataFrame, *, scale: float = 1.0,
                  unit: str = "pixel", rings: dict[int, list[list[float]]] | None = None, id_prefix: str = "") -> Path:
    """FeatureCollection of the cells of ``cells`` (``cell, celltype, n_spots``) outlined in ``instance`` (or
    given as ``rings`` from :func:`cell_polygons` at this ``scale``); feature ids ``<id_prefix><cell>``."""
    rings = cell_polygons(instance, scale=scale) if rings is None else rings
    with GeoJSONWriter(path, unit=unit, id_prefix=id_prefix) as writer:
        writer.add(cells, rings)
    return Path(path)


def transcript_assignment(transcript_id: np.ndarray, cell: np.ndarray, x: np.ndarray, y: np.ndarray, gene,
                          um_per_px: float) -> pd.DataFrame:
    """Rows of Xenium Ranger's ``transcript_assignment.csv`` (Baysor's columns: ``transcript_id, cell, is_noise,
    x, y, gene``; cell ids ``cell-<id>`` as strings, ``""`` for unassigned; x, y in microns)."""
    cell = np.asarray(cell, np.int64)
    return pd.DataFrame({"transcript_id": transcript_id, "cell": np.where(cell > 0, "cell-" + cell.astype(str), ""),
                         "is_noise": cell == 0, "x": np.asarray(x) * um_per_px, "y": np.asarray(y) * um_per_px,
                         "gene": np.asarray(gene)})


def write_xenium_ranger(folder: str | os.PathLike, instance: np.ndarray, nuclei: np.ndarray, cells: pd.DataFrame,
                        spots: pd.DataFrame, *, um_per_px: float, transcript_id: np.ndarray | None = None) -> Path:
    """The inputs of ``xeniumranger import-segmentation`` for a Xenium section, in ``folder``.

    * ``cells_label_mask.tif`` / ``nuclei_label_mask.tif``: uint32 label images in the morphology image's pixels
      (``--cells`` / ``--nuclei`` with ``--units=pixels``);
    * ``transcript_assignment.csv`` (Baysor's columns: ``transcript_id, cell, is_noise, x, y, gene``; cell ids as
      strings, ``""`` for unassigned) and ``viz_polygons.geojson`` (cell outlines in microns, the ``cell`` id as
      the feature id) for ``--transcript-assignment`` / ``--viz-polygons`` with ``--units=microns``.

    ``transcript_id`` is Xenium's id of every spot (in ``spots`` order); without it the row number is used.
    """
    from .files import write_csv, write_tif

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tif(folder / "cells_label_mask.tif", instance.astype(np.uint32))
    write_tif(folder / "nuclei_label_mask.tif", nuclei.astype(np.uint32))
    ids = transcript_id if transcript_id is not None else np.arange(len(spots))
    write_csv(folder / "transcript_assignment.csv", transcript_assignment(
        ids, spots["cell"].to_numpy(np.int64), spots["spotX"].to_numpy(), spots["spotY"].to_numpy(),
        spots["gene"].to_numpy(), um_per_px))
    # Xenium Ranger matches the polygons to the assignment's cell ids
    write_geojson(folder / "viz_polygons.geojson", instance, cells, scale=um_per_px, unit="micron", id_prefix="cell-")
    return folder
