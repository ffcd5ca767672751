"""Raw section -> patch files (layer 1: numpy, scipy, scikit-image; no torch).

Steps (SPEC §2.1-2.2):

1. nuclei: the nucleus label image when there is one, else a seeded watershed of the DAPI image
   (:func:`seeded_watershed`); instance ids are section-global (= ``cell``), background 0, no offset;
2. crop to the bounding box of spots, centroids and nucleus pixels (+5 px margin), pad bottom/right to a multiple of
   the patch size (:func:`frame_geometry`);
3. per patch, in parallel worker processes, stream: spots within the patch enlarged by a halo, per-gene histogram,
   Gaussian filter, centre crop (:func:`gene_density`). The halo equals the Gaussian's radius, so the stitched
   patches equal the density of the whole section: continuous across patch borders. Memory is bounded by one
   patch's working set; no genes x H x W array is ever built;
4. each patch file is written atomically; ``metadata.json`` is written first with ``complete: false`` and rewritten
   with ``complete: true`` at the end, so an interrupted run resumes: patches already on disk are verified by
   content and kept, temporary files of a killed run are removed, and pool workers whose main process died stop
   at once.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse
from scipy import ndimage

from ..config import PreprocessConfig
from ..constants import (
    BACKGROUND,
    BACKGROUND_NAME,
    CELLS_TABLE,
    METADATA_FILE,
    PATCH_GLOB,
    PATCH_NAME,
    SPLITS,
    SPOTS_TABLE,
    PatchKeys,
)
from ..errors import DataError
from ..io.dapi import half_peak_foreground, smooth_dapi
from ..io.files import Section, load_npz, read_json, remove_stale_temps, save_npz, write_csv, write_json
from ..io.metadata import DatasetMetadata
from ..io.windows import BandCache, Frame, frame_bands, frame_block
from .geometry import FrameGeometry

log = logging.getLogger(__name__)

__all__ = [
    "density_halo",
    "frame_geometry",
    "gene_density",
    "preprocess_section",
    "seeded_watershed",
    "verify_patch",
]

METADATA_FORMAT = 1
#: Gaussian truncation in sigmas; the halo equals the filter radius so patches stitch exactly.
DENSITY_TRUNCATE = 3.0
CROP_MARGIN_PX = 5


def density_halo(sigma: float) -> int:
    """Halo (pixels) around a patch whose spots reach into it: the radius of the truncated Gaussian."""
    return int(DENSITY_TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def gene_density(rows: np.ndarray, cols: np.ndarray, genes: np.ndarray, n_genes: int, size: int, sigma: float,
                 *, halo: int | None = None) -> np.ndarray:
    """Per-gene spot density of one square window.

    Parameters
    ----------
    rows, cols : (n,) int arrays, pixel of each spot relative to the window's top-left corner; spots may lie up to
        ``halo`` pixels outside the window (they spill into it) and are ignored beyond that.
    genes : (n,) int array, channel of each spot.
    n_genes : number of channels G.
    size : window edge P.
    sigma : Gaussian sigma in pixels; 0 returns raw counts.
    halo : spill-over margin; defaults to :func:`density_halo` of ``sigma``.

    Returns
    -------
    (G, P, P) float32 ndarray. Each spot contributes a mass of 1 spread by a Gaussian truncated at
    ``DENSITY_TRUNCATE`` sigmas (zero outside the section), so a spot far from the edges integrates to 1.

    Examples
    --------
    >>> d = gene_density(np.array([16]), np.array([16]), np.array([1]), 2, 32, 2.0)
    >>> d.shape, round(float(d[1].sum()), 4), float(d[0].sum())
    ((2, 32, 32), 1.0, 0.0)
    """
    halo = density_halo(sigma) if halo is None else halo
    out = np.zeros((n_genes, size, size), np.float32)
    keep = (rows >= -halo) & (rows < size + halo) & (cols >= -halo) & (cols < size + halo)
    if sigma <= 0:
        keep &= (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        np.add.at(out, (genes[keep], rows[keep], cols[keep]), 1.0)
        return out
    rows, cols, genes = rows[keep] + halo, cols[keep] + halo, genes[keep]
    present, channel = np.unique(genes, return_inverse=True)
    if present.size == 0:
        return out
    edge = size + 2 * halo
    hist = np.zeros((present.size, edge, edge), np.float32)
    np.add.at(hist, (channel, rows, cols), 1.0)
    smooth = ndimage.gaussian_filter(hist, sigma=(0, sigma, sigma), mode="constant", truncate=DENSITY_TRUNCATE)
    out[present] = smooth[:, halo:halo + size, halo:halo + size]
    return out


def seeded_watershed(dapi: np.ndarray, cells: pd.DataFrame, *, seeds: str = "region") -> np.ndarray:
    """Nucleus masks from DAPI by a watershed seeded at the cell centroids.

    ``seeds="point"`` is the reference recipe (§4.1): Gaussian smoothing (sigma 1), foreground = smooth > 0.5 * Otsu,
    one marker pixel per cell at its truncated centroid, watershed of -smooth in the foreground; a centroid on a
    locally dim pixel (a nucleolus, a dim rim) is flooded from a brighter neighbour, a centroid just off the
    foreground gets nothing. ``seeds="region"`` (default) keeps the seeds: the foreground is also where a pixel
    reaches half of its neighbourhood's peak (dim nuclei under uneven illumination) above the background's noise,
    with holes filled (nucleoli); a centroid off the foreground snaps to the nearest foreground pixel within 6 px;
    each marker is a disc of 2 px split between neighbouring seeds by distance, so no seed starts as one pixel.

    Returns
    -------
    (H, W) int32 ndarray, ids = ``cell``, 0 = background.
    """
    from skimage.segmentation import watershed

    smooth, otsu = smooth_dapi(dapi)
    foreground = smooth > 0.5 * otsu
    yi = np.clip(cells["y"].to_numpy().astype(np.int64), 0, dapi.shape[0] - 1)
    xi = np.clip(cells["x"].to_numpy().astype(np.int64), 0, dapi.shape[1] - 1)
    ids = cells["cell"].to_numpy()
    if seeds == "region":
        foreground, yi, xi = _robust_foreground(smooth, otsu, yi, xi)
        markers = _seed_discs(dapi.shape, yi, xi, ids, radius=2) * foreground
    else:
        markers = np.zeros(dapi.shape, np.int32)
        markers[yi, xi] = ids
        markers[~foreground] = BACKGROUND
    labels = watershed(-smooth, markers, mask=foreground).astype(np.int32)
    area = np.bincount(labels.ravel(), minlength=int(ids.max(initial=0)) + 1)[ids]
    if (area < 20).any():
        log.warning("seeded watershed (%s seeds): %d of %d cell(s) got < 20 nucleus pixels (%d none)", seeds,
                    int((area < 20).sum()), ids.size, int((area == 0).sum()))
    return labels


def _seed_counts(area: np.ndarray, cells: pd.DataFrame) -> dict[str, int]:
    """How many cells got a nucleus of fewer than 20 pixels (or none): recorded in metadata.json."""
    ids = cells["cell"].to_numpy()
    area = np.pad(area, (0, max(0, int(ids.max(initial=0)) + 1 - area.size)))[ids]
    counts = {"n_seeds": int(ids.size), "n_seeds_under_20px": int((area < 20).sum()), "n_seeds_empty": int((area == 0).sum())}
    log.info("nuclei: %d of %d cells have < 20 pixels (%d none)", counts["n_seeds_under_20px"], ids.size,
             counts["n_seeds_empty"])
    return counts


def _robust_foreground(smooth: np.ndarray, otsu: float, yi: np.ndarray, xi: np.ndarray):
    """The half-peak foreground with holes filled; seeds snapped to the nearest foreground pixel within 6 px."""
    fg = ndimage.binary_fill_holes(half_peak_foreground(smooth, otsu))
    dist, (ny, nx) = ndimage.distance_transform_edt(~fg, return_indices=True)
    near = dist[yi, xi] <= 6.0
    return fg, np.where(near, ny[yi, xi], yi), np.where(near, nx[yi, xi], xi)


def _seed_discs(shape: tuple[int, int], yi: np.ndarray, xi: np.ndarray, ids: np.ndarray, radius: int) -> np.ndarray:
    """Marker image: a disc of ``radius`` around every seed, each pixel to its nearest seed."""
    point = np.zeros(shape, np.int32)
    point[yi, xi] = ids
    dist, (ny, nx) = ndimage.distance_transform_edt(point == 0, return_indices=True)
    return np.where(dist <= radius, point[ny, nx], 0).astype(np.int32)


def _nucleus_extent(nuclei: Frame) -> tuple[tuple[int, int, int, int] | None, np.ndarray]:
    """The (y0, x0, y1, x1) box of the nucleus pixels (inclusive; None without any) and the pixels of every label
    id (index = id), in one pass over the frame's row bands."""
    rows, cols, area = [], np.zeros(nuclei.shape[1], bool), np.zeros(1, np.int64)
    for r0, band in frame_bands(nuclei):
        hit = band != BACKGROUND
        rows.append(r0 + np.flatnonzero(hit.any(axis=1)))
        cols |= hit.any(axis=0)
        counts = np.bincount(band[hit].astype(np.int64))
        area = np.pad(area, (0, max(0, counts.size - area.size)))
        area[:counts.size] += counts
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    if rows.size == 0:
        return None, area
    cols = np.flatnonzero(cols)
    return (int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])), area


def frame_geometry(section: Section, box: tuple[int, int, int, int] | None, patch_size: int) -> FrameGeometry:
    """Crop box over spots, centroids and the nucleus pixels' ``box`` (:func:`_nucleus_extent`), with a margin,
    clipped to the raw frame."""
    h, w = section.shape
    ys = np.concatenate([section.spots["y"].to_numpy(), section.cells["y"].to_numpy()])
    xs = np.concatenate([section.spots["x"].to_numpy(), section.cells["x"].to_numpy()])
    y0, x0 = int(np.floor(ys.min())), int(np.floor(xs.min()))
    y1, x1 = int(np.floor(ys.max())), int(np.floor(xs.max()))
    if box is not None:
        y0, x0, y1, x1 = min(y0, box[0]), min(x0, box[1]), max(y1, box[2]), max(x1, box[3])
    y0, x0 = max(0, y0 - CROP_MARGIN_PX), max(0, x0 - CROP_MARGIN_PX)
    y1, x1 = min(h, y1 + 1 + CROP_MARGIN_PX), min(w, x1 + 1 + CROP_MARGIN_PX)
    return FrameGeometry(raw_shape=(h, w), y0=y0, x0=x0, height=y1 - y0, width=x1 - x0, patch_size=patch_size)


# ----------------------------------------------------------------------------------------------- patch worker
@dataclass
class _Job:
    """Everything a worker needs; set once before the pool forks (shared copy-on-write, never pickled per task)."""

    geometry: FrameGeometry
    spot_row: np.ndarray  # (n,) int64 patch-frame pixel row of each spot
    spot_col: np.ndarray
    spot_gene: np.ndarray  # (n,) int64 channel
    bucket_start: np.ndarray  # (n_rows * n_cols + 1,) spots sorted by the patch that holds them
    spot_order: np.ndarray
    nuclei: Frame  # raw frame (read a window at a time)
    dapi: Frame | None
    class_lut: np.ndarray  # cell id -> class id
    n_genes: int
    sigma: float
    halo: int
    store_density: bool = True  # False: patch files without the density image (rebuilt from the spots when read)


_JOB: _Job | None = None
#: In a pool worker: the pid of the process that started the pool (None in the main process).
_PARENT: int | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def _init_pool_worker(job: _Job) -> None:
    global _PARENT
    _init_worker(job)
    _PARENT = os.getppid()


def _raw_window(image, geo: FrameGeometry, r0: int, c0: int) -> np.ndarray:
    """The patch's (P, P) window of a raw-frame image; pixels outside the crop are 0."""
    p = geo.patch_size
    y0, x0 = geo.y0 + r0, geo.x0 + c0
    y1, x1 = geo.y0 + min(r0 + p, geo.height), geo.x0 + min(c0 + p, geo.width)
    out = np.zeros((p, p), np.float64 if not np.issubdtype(image.dtype, np.integer) else np.int64)
    out[:y1 - y0, :x1 - x0] = frame_block(image, y0, y1, x0, x1)
    return out


def _spots_near(job: _Job, row: int, col: int) -> np.ndarray:
    """Indices of the spots in the patch's own bucket and the neighbouring buckets the halo reaches."""
    n_rows, n_cols = job.geometry.grid
    reach = -(-job.halo // job.geometry.patch_size)
    parts = []
    for r in range(max(0, row - reach), min(n_rows, row + reach + 1)):
        lo = r * n_cols + max(0, col - reach)
        hi = r * n_cols + min(n_cols, col + reach + 1)
        parts.append(job.spot_order[job.bucket_start[lo]:job.bucket_start[hi]])
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def make_patch(job: _Job, row: int, col: int) -> dict[str, np.ndarray]:
    """The arrays of patch (row, col) (see ``PatchKeys``; no density image when the job does not store it)."""
    p = job.geometry.patch_size
    r0, c0 = row * p, col * p
    near = _spots_near(job, row, col)
    rr, cc, gg = job.spot_row[near] - r0, job.spot_col[near] - c0, job.spot_gene[near]
    inside = (rr >= 0) & (rr < p) & (cc >= 0) & (cc < p)
    counts = np.zeros((p, p), np.float32)
    np.add.at(counts, (rr[inside], cc[inside]), 1.0)
    instance = _raw_window(job.nuclei, job.geometry, r0, c0).astype(np.int32)
    label = job.class_lut[instance].astype(np.int32)
    dapi = (_raw_window(job.dapi, job.geometry, r0, c0) if job.dapi is not None else instance > 0).astype(np.float32)
    arrays = {PatchKeys.LABEL: label, PatchKeys.INSTANCE: instance, PatchKeys.SPOTS: counts, PatchKeys.DAPI: dapi}
    if job.store_density:
        arrays = {PatchKeys.IMAGE: gene_density(rr, cc, gg, job.n_genes, p, job.sigma, halo=job.halo), **arrays}
    return arrays


def stored_keys(store_density: bool) -> tuple[str, ...]:
    """The arrays of a patch file."""
    return PatchKeys.ALL if store_density else tuple(k for k in PatchKeys.ALL if k != PatchKeys.IMAGE)


#: Log-spaced bins (spots per pixel) of the histogram of total density at nucleus pixels.
_DENSITY_BINS = np.logspace(-7, 2, 901)


def _nuclear_density_hist(job: _Job, row: int, col: int, instance: np.ndarray) -> np.ndarray:
    """Histogram (over ``_DENSITY_BINS``) of the total spot density (all genes as one) at the patch's nucleus
    pixels."""
    p = job.geometry.patch_size
    near = _spots_near(job, row, col)
    total = gene_density(job.spot_row[near] - row * p, job.spot_col[near] - col * p, np.zeros(near.size, np.int64), 1,
                         p, job.sigma, halo=job.halo)[0]
    values = total[instance > 0]
    return np.histogram(np.clip(values, _DENSITY_BINS[0], _DENSITY_BINS[-1]), _DENSITY_BINS)[0]


def _write_patch(task: tuple[int, int, str]) -> np.ndarray:
    if _PARENT is not None and os.getppid() != _PARENT:
        # the main process was killed (kill -9, pre-emption): stop instead of finishing the chunk as an orphan
        os._exit(1)
    row, col, path = task
    arrays = make_patch(_JOB, row, col)
    save_npz(path, arrays)
    return _nuclear_density_hist(_JOB, row, col, arrays[PatchKeys.INSTANCE])


def _hist_median(hist: np.ndarray) -> float:
    """Median of a histogram over ``_DENSITY_BINS`` (geometric centre of the median bin); 0 when empty."""
    total = hist.sum()
    if total == 0:
        return 0.0
    i = int(np.searchsorted(np.cumsum(hist), total / 2))
    return float(np.sqrt(_DENSITY_BINS[i] * _DENSITY_BINS[i + 1]))


def verify_patch(path: str | os.PathLike, n_genes: int, patch_size: int, *,
                 store_density: bool = True) -> dict[str, np.ndarray]:
    """Load a patch file and check its keys, shapes, dtypes and finiteness; raise :class:`DataError` naming it.

    Returns the arrays.
    """
    arrays = load_npz(path, stored_keys(store_density))
    expect = {PatchKeys.IMAGE: (n_genes, patch_size, patch_size)}
    for key, arr in arrays.items():
        shape = expect.get(key, (patch_size, patch_size))
        if arr.shape != shape or arr.dtype != np.dtype(PatchKeys.DTYPES[key]):
            raise DataError(f"{path}: array '{key}' has shape {arr.shape} and dtype {arr.dtype}, expected {shape} "
                            f"{PatchKeys.DTYPES[key]}; re-run preprocessing")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DataError(f"{path}: array '{key}' contains NaN or infinite values; re-run preprocessing")
    return arrays


# ----------------------------------------------------------------------------------------------- driver
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _occupied(job: _Job) -> np.ndarray:
    """(n_rows, n_cols) bool: patches that hold a spot in their halo window or a nucleus pixel."""
    geo = job.geometry
    n_rows, n_cols = geo.grid
    p, h = geo.patch_size, job.halo
    occ = np.zeros((n_rows, n_cols), bool)
    # a spot marks every patch whose halo window contains it
    for dr in (-h, 0, h):
        for dc in (-h, 0, h):
            r = (job.spot_row + dr) // p
            c = (job.spot_col + dc) // p
            ok = (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
            occ[r[ok], c[ok]] = True
    for r0, band in frame_bands(job.nuclei):
        r, c = np.nonzero(band != BACKGROUND)
        r, c = r + r0 - geo.y0, c - geo.x0
        ok = (r >= 0) & (r < geo.height) & (c >= 0) & (c < geo.width)
        occ[r[ok] // p, c[ok] // p] = True
    return occ


def _split(names: list[str], test_fraction: float, seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    n_test = int(round(test_fraction * len(names)))
    if test_fraction > 0 and len(names) > 1:
        n_test = min(max(n_test, 1), len(names) - 1)
    test = {names[i] for i in order[:n_test]}
    return {"train": sorted(n for n in names if n not in test), "test": sorted(test)}


def _prepare_output(out_dir: Path, fingerprint: dict, overwrite: bool) -> dict | None:
    """Check what ``out_dir`` holds; return the old metadata when it is the same job (resume), else None."""
    meta_path = out_dir / METADATA_FILE
    has_patches = any((out_dir / s).glob(PATCH_GLOB) for s in SPLITS) if out_dir.exists() else False
    old = read_json(meta_path) if meta_path.is_file() else None
    if old is not None and old.get("fingerprint") == fingerprint:
        return old
    if old is None and not has_patches:
        return None
    if not overwrite:
        what = "a dataset preprocessed with different settings or inputs" if old else "patch files of unknown origin"
        raise DataError(f"{out_dir} already holds {what}; pass --overwrite to replace it or choose another --datasets_name")
    log.info("--overwrite: removing the previous dataset in %s", out_dir)
    for split in SPLITS:
        shutil.rmtree(out_dir / split, ignore_errors=True)
    meta_path.unlink(missing_ok=True)
    return None


def preprocess_section(section: Section, out_dir: str | os.PathLike, config: PreprocessConfig = PreprocessConfig(), *,
                       num_workers: int = 0, overwrite: bool = False, progress: bool = True,
                       extra_metadata: dict[str, Any] | None = None) -> DatasetMetadata:
    """Cut a validated section into patch files under ``out_dir/{train,test}/`` and write ``metadata.json``.

    Parameters
    ----------
    section : from :func:`segjointgene.io.files.read_section`.
    out_dir : dataset folder ``data/<datasets_name>``.
    config : patch size, density sigma, split.
    num_workers : worker processes (0 = in this process).
    overwrite : replace a dataset made from other inputs or settings (else that is an error).
    progress : show a progress bar.
    extra_metadata : merged into ``metadata.json`` (e.g. the dataset name).

    Returns
    -------
    The metadata (also written to ``out_dir/metadata.json``).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    source = {role: {"file": Path(path).name, "sha256": _sha256(path)} for role, path in section.files.items()}
    fingerprint = {"config": asdict(config), "sources": source, "format": METADATA_FORMAT}
    previous = _prepare_output(out_dir, fingerprint, overwrite)
    if section.nuclei is not None:
        nuclei, nucleus_source = section.nuclei, "label_image"
    else:
        log.info("no nucleus label image: seeded watershed of the DAPI image")
        nuclei = seeded_watershed(np.asarray(section.dapi), section.cells, seeds=config.nucleus_seeds)  # held whole
        nucleus_source = "dapi_watershed"
    box, area = _nucleus_extent(nuclei)
    extra_metadata = {**(extra_metadata or {}), **_seed_counts(area, section.cells)}
    job = _make_job(section, nuclei, box, config)
    cells_rc = _patches_to_write(job, config)
    names = [PATCH_NAME.format(row=r, col=c) for r, c in cells_rc]
    if not names:
        raise DataError(f"{section.files.get('spots')}: no patch holds a spot or a nucleus; nothing to preprocess")
    split = previous["split"] if previous else {**_split(names, config.test_fraction, config.split_seed),
                                                 "seed": config.split_seed, "test_fraction": config.test_fraction}
    metadata = _metadata(section, job, config, fingerprint, split, nucleus_source, len(names), extra_metadata)
    _write_dataset_tables(out_dir, section, job, metadata)
    split_of = {n: s for s in SPLITS for n in split[s]}
    paths = [(r, c, out_dir / split_of[name] / name) for (r, c), name in zip(cells_rc, names)]
    tasks, hist = _pending_patches(job, paths)
    hist += _run_tasks(job, tasks, num_workers, progress, tqdm)
    metadata["nuclear_density_median"] = _hist_median(hist)
    metadata["complete"] = True
    write_json(out_dir / METADATA_FILE, metadata)
    return DatasetMetadata.from_dict(metadata, source=str(out_dir / METADATA_FILE))


def _make_job(section: Section, nuclei: Frame, box: tuple[int, int, int, int] | None,
              config: PreprocessConfig) -> _Job:
    """The patch frame and the spots sorted by the patch that holds them (what every worker needs)."""
    geo = frame_geometry(section, box, config.patch_size)
    n_rows, n_cols = geo.grid
    gene_index = {g: i for i, g in enumerate(section.genes)}
    type_index = {t: i for i, t in enumerate([BACKGROUND_NAME, *section.celltypes])}
    cell_ids = section.cells["cell"].to_numpy()
    class_lut = np.zeros(int(cell_ids.max()) + 1, np.int32)
    class_lut[cell_ids] = [type_index[t] for t in section.cells["celltype"]]
    spot_row = np.floor(section.spots["y"].to_numpy()).astype(np.int64) - geo.y0
    spot_col = np.floor(section.spots["x"].to_numpy()).astype(np.int64) - geo.x0
    spot_gene = section.spots["gene"].map(gene_index).to_numpy().astype(np.int64)
    bucket = (spot_row // geo.patch_size) * n_cols + spot_col // geo.patch_size
    order = np.argsort(bucket, kind="stable")
    start = np.searchsorted(bucket[order], np.arange(n_rows * n_cols + 1))
    return _Job(geometry=geo, spot_row=spot_row, spot_col=spot_col, spot_gene=spot_gene, bucket_start=start,
                spot_order=order, nuclei=_cached(nuclei, config.patch_size),
                dapi=_cached(section.dapi, config.patch_size), class_lut=class_lut, n_genes=len(section.genes),
                sigma=config.density_sigma, halo=density_halo(config.density_sigma), store_density=config.store_density)


def _cached(frame: Frame | None, patch_size: int) -> Frame | None:
    """Window readers (not arrays) behind a band of 4 patch rows (see :class:`~segjointgene.io.windows.BandCache`)."""
    if frame is None or isinstance(frame, np.ndarray) or scipy.sparse.issparse(frame):
        return frame
    return BandCache(frame, rows=4 * patch_size)


def _patches_to_write(job: _Job, config: PreprocessConfig) -> list[tuple[int, int]]:
    """(row, col) of every patch with data (every patch with ``keep_empty``), in row-major order."""
    n_rows, n_cols = job.geometry.grid
    occupied = _occupied(job) if not config.keep_empty else np.ones((n_rows, n_cols), bool)
    return [(r, c) for r in range(n_rows) for c in range(n_cols) if occupied[r, c]]


def _metadata(section: Section, job: _Job, config: PreprocessConfig, fingerprint: dict, split: dict,
              nucleus_source: str, n_patches: int, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The content of ``metadata.json`` (``complete: false`` until every patch is written)."""
    from .. import __version__

    geo = job.geometry
    n_rows, n_cols = geo.grid
    return {
        "format_version": METADATA_FORMAT, "package_version": __version__, "complete": False,
        **(extra or {}), "fingerprint": fingerprint,
        "genes": section.genes, "celltypes": [BACKGROUND_NAME, *section.celltypes],
        "raw_shape": list(geo.raw_shape), "crop_offset": [geo.y0, geo.x0], "crop_shape": [geo.height, geo.width],
        "padded_shape": list(geo.padded), "patch_size": geo.patch_size, "grid": [n_rows, n_cols],
        "density_sigma": config.density_sigma, "density_halo": job.halo, "density_truncate": DENSITY_TRUNCATE,
        "density_stored": config.store_density,
        "has_dapi": section.dapi is not None, "nucleus_source": nucleus_source,
        "n_cells": int(len(section.cells)), "n_spots": int(len(section.spots)),
        "n_spots_outside": section.n_spots_outside, "n_patches": n_patches,
        "n_patches_skipped_empty": n_rows * n_cols - n_patches, "split": split,
    }


def _write_dataset_tables(out_dir: Path, section: Section, job: _Job, metadata: dict[str, Any]) -> None:
    """The folders, ``metadata.json`` (unfinished), ``cells.csv`` and ``spots.npz``; stale temporaries removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        (out_dir / s).mkdir(exist_ok=True)
    for folder in (out_dir, *(out_dir / s for s in SPLITS)):  # leftovers of a killed run (hidden, never read)
        remove_stale_temps(folder)
    write_json(out_dir / METADATA_FILE, metadata)
    cell_ids = section.cells["cell"].to_numpy()
    write_csv(out_dir / CELLS_TABLE, pd.DataFrame({
        "cell": cell_ids, "celltype_id": job.class_lut[cell_ids], "celltype": section.cells["celltype"],
        "x": section.cells["x"], "y": section.cells["y"]}))
    save_npz(out_dir / SPOTS_TABLE, {"gene": job.spot_gene.astype(np.int32), "x": section.spots["x"].to_numpy(),
                                     "y": section.spots["y"].to_numpy(),
                                     "row_in_file": np.asarray(section.spot_rows_in_file, np.int64)})


def _pending_patches(job: _Job, paths: list[tuple[int, int, Path]]) -> tuple[list[tuple[int, int, str]], np.ndarray]:
    """The patches still to write, and the nuclear-density histogram of the ones already complete (resume)."""
    tasks, n_kept = [], 0
    hist = np.zeros(len(_DENSITY_BINS) - 1, np.int64)
    for r, c, path in paths:
        if path.is_file():
            try:
                arrays = verify_patch(path, job.n_genes, job.geometry.patch_size, store_density=job.store_density)
                hist += _nuclear_density_hist(job, r, c, arrays[PatchKeys.INSTANCE])
                n_kept += 1
                continue
            except DataError as err:
                log.warning("re-writing %s (%s)", path, err)
        tasks.append((r, c, str(path)))
    if n_kept:
        log.info("resume: %d patch file(s) already complete, %d to write", n_kept, len(tasks))
    return tasks, hist


def _run_tasks(job: _Job, tasks: list[tuple[int, int, str]], num_workers: int, progress: bool, tqdm) -> np.ndarray:
    """Write the patches (in worker processes when ``num_workers``); returns the summed nuclear-density histogram."""
    hist = np.zeros(len(_DENSITY_BINS) - 1, np.int64)
    bar = tqdm(total=len(tasks), desc="patches", unit="patch", disable=not progress or not tasks, leave=False)
    try:
        if num_workers <= 0 or len(tasks) < 2:
            _init_worker(job)
            for task in tasks:
                hist += _write_patch(task)
                bar.update()
            return hist
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        # a ProcessPoolExecutor, not a multiprocessing.Pool: when a worker dies (out of memory, killed) the Pool
        # waits forever for its lost tasks, the executor raises BrokenProcessPool
        pool = ProcessPoolExecutor(num_workers, mp_context=mp.get_context(method), initializer=_init_pool_worker,
                                   initargs=(job,))
        try:
            for part in pool.map(_write_patch, tasks, chunksize=max(1, len(tasks) // (8 * num_workers))):
                hist += part
                bar.update()
        except BrokenProcessPool:
            _stop_pool(pool)
            raise RuntimeError("a preprocessing worker process died (out of memory or killed?); run the same "
                               "command again: the patches already written are kept") from None
        except BaseException:  # an error, Ctrl-C or SIGTERM in this process: stop the workers now, not at the end
            _stop_pool(pool)
            raise
        pool.shutdown(wait=True)
        return hist
    finally:
        bar.close()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the queued patches and end the workers at once. Killing is safe: a patch is written under a temporary
    name and renamed when complete, and the next run removes the temporary files."""
    processes = list(getattr(pool, "_processes", {}).values())  # the executor has no public handle on its workers
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.kill()
    for proc in processes:
        proc.join(timeout=5)


def patch_paths(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The patch files of a split, sorted by name."""
    return sorted(Path(data_dir, split).glob(PATCH_GLOB))
