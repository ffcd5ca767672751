"""The results of a tiled run, merged from its tiles with bounded memory (layer 2.65: numpy, pandas, tifffile).

:func:`merge_tiles` writes what an untiled run's export writes, from the tile files of :mod:`segjointgene.methods.tiled.tiles`:

* ``spots_assigned.csv``, ``cells.csv``, ``celltypes.csv``, ``cells.h5ad`` (spots in chunks; cells x genes sparse);
* ``instance_mask.tif`` / ``celltype_mask.tif`` / ``initial_instance_mask.tif`` (the nuclei) in the raw frame, as
  tiled TIFFs written one band of rows at a time;
* ``cells.geojson``: each cell outlined in the merged mask around the tile that holds its centre (that tile's core
  and a margin of the plan's overlap: a whole cell when it is smaller than the margin), streamed feature by feature;
* ``xenium_ranger/`` for a Xenium section (the masks as tiled TIFFs, ``transcript_assignment.csv`` in chunks,
  ``viz_polygons.geojson``), what ``xeniumranger import-segmentation`` takes;
* ``segjointgene.zarr`` when spatialdata is installed: the mask read lazily from the tiled TIFF, the spots from the
  CSV, the outlines and the AnnData (:func:`segjointgene.io.spatialstore.write_spatialdata`).

No step holds more than a band of tiles' masks (or 3 x 3 tiles, for the outlines) beside the per-spot arrays.
"""

from __future__ import annotations

import logging
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd

from segjointgene.constants import SPOTS_TABLE
from segjointgene.io.files import atomic_path, load_npz, write_csv
from segjointgene.io.metadata import DatasetMetadata
from segjointgene.io.polygons import GeoJSONWriter, cell_polygons, transcript_assignment
from segjointgene.io.runfolder import ResultFiles

from .tiles import Tile, patch_paths, result_path, tile_window

log = logging.getLogger(__name__)

__all__ = ["merge_tiles"]

#: Edge of the TIFF tiles of the merged masks.
TIFF_TILE = 256
_XENIUM_FILES = ("cells_label_mask.tif", "nuclei_label_mask.tif", "transcript_assignment.csv", "viz_polygons.geojson")


def merge_tiles(folder: Path, tiles: Sequence[Tile], meta: DatasetMetadata, data_dir: Path, out: Path,
                lut: np.ndarray, *, margin: int) -> pd.DataFrame:
    """Write the run's results from its tiles (see the module docstring); returns the cell table. ``margin``: the
    plan's overlap (px), which bounds a cell's reach from its centre."""
    from segjointgene.results.export import with_microns, write_anndata, xenium_transcript_ids
    from segjointgene.results.stitch import celltype_table, extend_lut

    out.mkdir(parents=True, exist_ok=True)
    spots = load_npz(data_dir / SPOTS_TABLE, ("gene", "x", "y"))
    spots["x"], spots["y"] = spots["x"].astype(np.float64), spots["y"].astype(np.float64)  # as the export's
    n = spots["x"].size
    cell, prob = np.zeros(n, np.int64), np.ones(n, np.float32)
    claims, claimed_spots = _claims(folder, tiles)
    parts, new_ids, new_classes = [], [], []
    for t in tiles:
        res = load_npz(result_path(folder, t), ("rows", "cell", "prob", "mask", "denovo_cell", "denovo_class"))
        cell[res["rows"]], prob[res["rows"]] = res["cell"], res["prob"]
        new_ids.append(res["denovo_cell"]), new_classes.append(res["denovo_class"])
        mask = _with_claims(res["mask"], claims.get(t.name))
        parts.append(_pixel_sums(mask, t.core[0] + meta.crop_offset[0], t.core[2] + meta.crop_offset[1]))
    rows, claim_cell, claim_prob = claimed_spots
    free = cell[rows] == 0  # a de novo cell's spots beyond its tile's core, where their home tile left background
    cell[rows[free]], prob[rows[free]] = claim_cell[free], claim_prob[free]
    lut = extend_lut(lut, np.concatenate(new_ids), np.concatenate(new_classes))
    cells = with_microns(_cell_table(pd.concat(parts), cell, lut, list(meta.celltypes)), meta, ("x", "y"))
    names = np.asarray(meta.celltypes, dtype=object)
    genes = np.asarray(meta.genes, dtype=object)
    _write_chunks(out / ResultFiles.SPOTS, lambda sl: with_microns(pd.DataFrame({
        "gene": genes[spots["gene"][sl]], "spotX": spots["x"][sl], "spotY": spots["y"][sl], "cell": cell[sl],
        "celltype": names[lut[cell[sl]]], "prob": prob[sl]}), meta, ("spotX", "spotY")), n)
    write_csv(out / ResultFiles.CELLS, cells)
    write_csv(out / ResultFiles.CELLTYPES, celltype_table(list(meta.celltypes)))
    _write_masks(folder, tiles, meta, out, lut, claims)
    _write_nuclei(data_dir, meta, out / ResultFiles.INITIAL_MASK)
    xenium = meta.extra.get("input_format") == "xenium" and meta.extra.get("um_per_px") is not None
    um = float(meta.extra["um_per_px"]) if xenium else None
    _write_outlines(folder, tiles, meta, out, cells, margin, um, claims)
    if xenium:
        xr = out / ResultFiles.XENIUM_RANGER
        shutil.copyfile(out / ResultFiles.INSTANCE_MASK, xr / "cells_label_mask.tif")
        shutil.copyfile(out / ResultFiles.INITIAL_MASK, xr / "nuclei_label_mask.tif")
        ids = xenium_transcript_ids(meta, data_dir)
        _write_chunks(xr / "transcript_assignment.csv", lambda sl: transcript_assignment(
            ids[sl] if ids is not None else np.arange(n)[sl], cell[sl], spots["x"][sl], spots["y"][sl],
            genes[spots["gene"][sl]], um), n)
        log.info("Xenium Ranger import files -> %s", xr)
    adata = write_anndata(out / ResultFiles.ANNDATA, cells, cell, spots["gene"].astype(np.int64), list(meta.genes),
                          {"tiles": len(tiles), "datasets_name": meta.datasets_name})
    _write_store(out, adata, um)
    return cells


# ------------------------------------------------------------------------------------------------ claims
def _claims(folder: Path, tiles: Sequence[Tile]) -> tuple[dict[str, tuple[np.ndarray, ...]], tuple[np.ndarray, ...]]:
    """The de novo cells' pixels and spots beyond their owners' cores (see :mod:`.tiles`): pixel claims by the tile
    whose core holds them (core-local rows, columns, ids), and the spot claims (rows, cells, probabilities)."""
    side = tiles[0].core[1] - tiles[0].core[0]
    by_pos = {(t.row, t.col): t for t in tiles}
    pixels: dict[str, list[np.ndarray]] = {}
    rows, cells, probs = [], [], []
    for t in tiles:
        c = load_npz(result_path(folder, t), ("claim_y", "claim_x", "claim_id", "claim_rows", "claim_cell",
                                              "claim_prob"))
        rows.append(c["claim_rows"]), cells.append(c["claim_cell"]), probs.append(c["claim_prob"])
        if not c["claim_y"].size:
            continue
        key = np.stack([c["claim_y"] // side, c["claim_x"] // side], 1)
        for pos in np.unique(key, axis=0).tolist():
            target = by_pos.get(tuple(pos))
            if target is None:
                continue
            sel = (key == pos).all(1)
            pixels.setdefault(target.name, []).append(np.stack(
                [c["claim_y"][sel] - target.core[0], c["claim_x"][sel] - target.core[2], c["claim_id"][sel]], 1))
    return ({k: tuple(np.concatenate(v).T) for k, v in pixels.items()},
            (np.concatenate(rows).astype(np.int64), np.concatenate(cells), np.concatenate(probs)))


def _with_claims(mask: np.ndarray, claim: tuple[np.ndarray, ...] | None) -> np.ndarray:
    """A tile's core mask with the claims on it taken where it is background."""
    if claim is None:
        return mask
    ys, xs, ids = claim
    mask = mask.copy()
    free = mask[ys, xs] == 0
    mask[ys[free], xs[free]] = ids[free]
    return mask


# ------------------------------------------------------------------------------------------------ tables
def _pixel_sums(mask: np.ndarray, y0: int, x0: int) -> pd.DataFrame:
    """Per cell of a core mask: pixel count and sums of the raw-frame pixel centres (y, x)."""
    ids, inverse, area = np.unique(mask.ravel(), return_inverse=True, return_counts=True)
    yy, xx = np.indices(mask.shape)
    return pd.DataFrame({"cell": ids.astype(np.int64), "area_px": area,
                         "sy": np.bincount(inverse, (yy.ravel() + y0 + 0.5)),
                         "sx": np.bincount(inverse, (xx.ravel() + x0 + 0.5))}).query("cell != 0")


def _cell_table(sums: pd.DataFrame, spot_cell: np.ndarray, lut: np.ndarray, celltypes: list[str]) -> pd.DataFrame:
    """``cell, celltype, x, y, area_px, n_spots``: one row per cell of the mask (the contract of ``cells.csv``)."""
    per = sums.groupby("cell", sort=True)[["area_px", "sy", "sx"]].sum()
    ids, n_spots = np.unique(spot_cell[spot_cell > 0], return_counts=True)
    spots = pd.Series(n_spots, index=ids).reindex(per.index, fill_value=0)
    return pd.DataFrame({"cell": per.index.to_numpy(np.int64),
                         "celltype": np.asarray(celltypes, dtype=object)[lut[per.index.to_numpy()]],
                         "x": (per["sx"] / per["area_px"]).to_numpy(), "y": (per["sy"] / per["area_px"]).to_numpy(),
                         "area_px": per["area_px"].to_numpy(np.int64), "n_spots": spots.to_numpy(np.int64)})


def _write_chunks(path: Path, rows: Callable[[slice], pd.DataFrame], n: int, chunk: int = 1 << 21) -> None:
    """A CSV of ``n`` rows made ``chunk`` at a time by ``rows(slice)``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for i in range(0, max(n, 1), chunk):
            rows(slice(i, i + chunk)).to_csv(fh, index=False, header=i == 0)


# ------------------------------------------------------------------------------------------------ masks
def _write_tiled_tif(path: Path, shape: tuple[int, int], dtype, raw_rows: Callable[[int, int], np.ndarray]) -> None:
    """A tiled, zlib-compressed TIFF of ``shape`` whose rows [r0, r1) are ``raw_rows(r0, r1)``, band by band."""
    import tifffile

    h, w = shape

    def tiles_of() -> Iterable[np.ndarray]:
        for r0 in range(0, h, TIFF_TILE):
            rows_img = raw_rows(r0, min(r0 + TIFF_TILE, h))
            for c0 in range(0, w, TIFF_TILE):
                tile = np.zeros((TIFF_TILE, TIFF_TILE), dtype)
                part = rows_img[:, c0:c0 + TIFF_TILE]
                tile[:part.shape[0], :part.shape[1]] = part
                yield tile

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, tiles_of(), shape=(h, w), dtype=dtype, tile=(TIFF_TILE, TIFF_TILE), compression="zlib")


def _padded_rows(meta: DatasetMetadata, r0: int, r1: int, band: Callable[[int, int], np.ndarray]) -> np.ndarray:
    """Raw-frame rows [r0, r1) (uint32) from ``band(p0, p1)``, padded-frame rows [p0, p1) over the padded width."""
    h, w = meta.raw_shape
    y0, x0 = meta.crop_offset
    out = np.zeros((r1 - r0, w), np.uint32)
    p0, p1 = max(r0 - y0, 0), min(r1 - y0, meta.padded_shape[0])
    if p1 > p0:
        rows = band(p0, p1)
        ww = min(w - x0, rows.shape[1])
        out[p0 + y0 - r0:p1 + y0 - r0, x0:x0 + ww] = rows[:, :ww]
    return out


class _Grid:
    """The tiles' core masks by grid cell, with a small cache; windows of the merged mask assembled from them."""

    def __init__(self, folder: Path, tiles: Sequence[Tile], claims: dict, keep: int = 12):
        self.folder, self.keep, self.claims = folder, keep, claims
        self.by_pos = {(t.row, t.col): t for t in tiles}
        self.side = tiles[0].core[1] - tiles[0].core[0]
        self.shape = (max(t.core[1] for t in tiles), max(t.core[3] for t in tiles))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def mask(self, t: Tile) -> np.ndarray:
        if t.name not in self._cache:
            self._cache[t.name] = _with_claims(load_npz(result_path(self.folder, t), ("mask",))["mask"],
                                               self.claims.get(t.name))
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        self._cache.move_to_end(t.name)
        return self._cache[t.name]

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The merged mask over [y0, y1) x [x0, x1) of the padded frame."""
        out = np.zeros((y1 - y0, x1 - x0), np.uint32)
        s = self.side
        for r in range(y0 // s, -(-y1 // s)):
            for c in range(x0 // s, -(-x1 // s)):
                t = self.by_pos.get((r, c))
                if t is None:
                    continue
                ty0, ty1, tx0, tx1 = t.core
                a, b, cc, d = max(y0, ty0), min(y1, ty1), max(x0, tx0), min(x1, tx1)
                if a < b and cc < d:
                    out[a - y0:b - y0, cc - x0:d - x0] = self.mask(t)[a - ty0:b - ty0, cc - tx0:d - tx0]
        return out


def _write_masks(folder: Path, tiles: Sequence[Tile], meta: DatasetMetadata, out: Path, lut: np.ndarray,
                 claims: dict) -> None:
    """The instance and cell-type masks in the raw frame."""
    grid = _Grid(folder, tiles, claims, keep=2 * (max(t.col for t in tiles) + 1))  # a band of tiles and the next

    def rows(r0: int, r1: int) -> np.ndarray:
        return _padded_rows(meta, r0, r1, lambda p0, p1: grid.window(p0, p1, 0, grid.shape[1]))

    class_dtype = np.uint8 if meta.n_classes <= 256 else np.uint16
    _write_tiled_tif(out / ResultFiles.INSTANCE_MASK, meta.raw_shape, np.uint32, rows)
    _write_tiled_tif(out / ResultFiles.CELLTYPE_MASK, meta.raw_shape, class_dtype,
                     lambda r0, r1: lut[rows(r0, r1)].astype(class_dtype))


def _write_nuclei(data_dir: Path, meta: DatasetMetadata, path: Path) -> None:
    """The nuclei (the patches' instance channel) in the raw frame."""
    paths, p = patch_paths(data_dir, meta), meta.patch_size
    width = meta.padded_shape[1]
    _write_tiled_tif(path, meta.raw_shape, np.uint32, lambda r0, r1: _padded_rows(
        meta, r0, r1, lambda p0, p1: tile_window(paths, p, (p0, p1, 0, width)).astype(np.uint32)))


# ------------------------------------------------------------------------------------------------ outlines
def _write_outlines(folder: Path, tiles: Sequence[Tile], meta: DatasetMetadata, out: Path, cells: pd.DataFrame,
                    margin: int, um_per_px: float | None, claims: dict) -> None:
    """``cells.geojson`` (pixels), and ``xenium_ranger/viz_polygons.geojson`` (microns) when ``um_per_px``: each
    cell traced in the merged mask over the core of the tile holding its centre and ``margin`` around it."""
    grid = _Grid(folder, tiles, claims)
    y0, x0 = meta.crop_offset
    cy = np.floor(cells["y"].to_numpy() - y0).astype(np.int64) // grid.side
    cx = np.floor(cells["x"].to_numpy() - x0).astype(np.int64) // grid.side
    found = 0
    viz = out / ResultFiles.XENIUM_RANGER / "viz_polygons.geojson"
    if um_per_px is not None:
        viz.parent.mkdir(parents=True, exist_ok=True)
    with GeoJSONWriter(out / ResultFiles.GEOJSON) as px_writer, \
            (GeoJSONWriter(viz, unit="micron", id_prefix="cell-") if um_per_px else nullcontext()) as um_writer:
        for t in tiles:
            mine = cells[(cy == t.row) & (cx == t.col)]
            if mine.empty:
                continue
            wy0, wx0 = max(t.core[0] - margin, 0), max(t.core[2] - margin, 0)
            window = grid.window(wy0, min(t.core[1] + margin, grid.shape[0]), wx0,
                                 min(t.core[3] + margin, grid.shape[1]))
            rings = cell_polygons(window, ids=mine["cell"].to_numpy(), origin=(wy0 + y0, wx0 + x0))
            found += len(rings)
            px_writer.add(mine, rings)
            if um_per_px:
                um_writer.add(mine, {c: np.round(np.asarray(r) * um_per_px, 3).tolist() for c, r in rings.items()})
    if found < len(cells):
        log.warning("%d of %d cells have no outline in cells.geojson (their centre lies outside them, or they reach "
                    "beyond the %d-px margin); the masks hold them", len(cells) - found, len(cells), margin)


def _write_store(out: Path, adata, um_per_px: float | None) -> None:
    """``segjointgene.zarr`` when spatialdata is installed, from the written results (the mask read lazily)."""
    from segjointgene.io.spatialstore import spatialdata_available, write_spatialdata_from_results

    if adata is None or not spatialdata_available():
        log.info("spatialdata is not installed: no %s (pip install segjointgene[spatialdata])", ResultFiles.SPATIALDATA)
        return
    write_spatialdata_from_results(out, adata, um_per_px=um_per_px)
