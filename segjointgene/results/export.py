"""Results of a run for the field's tools (SPEC §5; layer 2.5).

:func:`export_results` turns a label cache of a run folder ``checkpoints/<datasets_name>/<net_sub_suffix>/`` into the
contract files under ``<run>/results/``: whole-section masks in the raw coordinate frame (TIFF), the cell-type names,
every input spot with its cell and type, the per-cell table, an AnnData file, the gene ranking (when attribution ran)
and figures. :func:`write_gene_ranking` writes the ranking alone (the trainer calls it at each checkpoint save).

The export never imports torch: the label cache, the patch files and the dataset tables are read with numpy and
pandas, one patch at a time, so a 5471 x 7602 section exports with two section-size masks in memory at most.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..constants import CELLS_TABLE, METADATA_FILE, SPLITS, SPOTS_TABLE, PatchKeys
from ..errors import DataError, InputNotFoundError
from ..evaluate.metrics import cell_gene_counts
from ..io.files import atomic_path, load_npz, npz_headers, read_json, remove_stale_temps, write_csv, write_tif
from ..io.metadata import DatasetMetadata, load_metadata, read_metadata
from ..io.polygons import cell_polygons, write_geojson, write_xenium_ranger
from ..io.runfolder import FigureFiles, Paths, ResultFiles, RunFolder
from ..io.spatialstore import spatialdata_available, write_spatialdata
from .plots import (
    densest_window,
    display_factor,
    downsample_labels,
    downsample_mean,
    plot_dotplot,
    plot_gene_ranking_heatmap,
    plot_initial_vs_final,
    plot_section_overview,
    plot_training_curves,
    plot_zoom,
    spot_density,
)
from .ranking import differential_expression, rank_genes_groups_uns
from .stitch import (
    assign_spots,
    cell_table,
    celltype_table,
    class_map,
    extend_lut,
    stitch_label_cache,
    stitch_patch_channel,
)

log = logging.getLogger(__name__)

__all__ = [
    "GeneRanking",
    "available_epochs",
    "export_results",
    "gene_ranking_tables",
    "resolve_epoch",
    "run_export",
    "write_anndata",
    "write_gene_ranking",
    "with_microns",
    "xenium_transcript_ids",
]

_ATTR_KEYS = ("type_gene_sum", "type_pixels", "targets", "genes", "method")
#: Edge of the zoomed window of the figures (pixels).
ZOOM_PX = 300
#: Longer side of the whole-section overview (pixels).
OVERVIEW_PX = 1200


# ------------------------------------------------------------------------------------------------ gene ranking
@dataclass(frozen=True)
class GeneRanking:
    """Gene prioritization tables.

    Attributes
    ----------
    scores : DataFrame, cell types (index ``celltype``, in class-id order) x genes (columns, in channel order):
        mean attribution score per pixel of the type (``type_gene_sum / type_pixels``; NaN for a type without
        pixels). Larger = more important.
    ranking : long DataFrame ``celltype, gene, score, rank``; rank 1 = the type's most important gene; genes with
        equal scores are ranked in channel order; types without pixels are absent.
    """

    scores: pd.DataFrame
    ranking: pd.DataFrame


def gene_ranking_tables(type_gene_sum: np.ndarray, type_pixels: np.ndarray, targets: np.ndarray, genes: np.ndarray,
                        gene_names: Sequence[str], celltype_names: Sequence[str]) -> GeneRanking:
    """Mean score matrix and per-type ranks from attribution sums.

    Parameters
    ----------
    type_gene_sum : (T, n) float array, attribution summed over the pixels attributed to each target type.
    type_pixels : (T,) float array, number of pixels summed per type.
    targets : (T,) int array, class ids of the target cell types (index into ``celltype_names``).
    genes : (n,) int array, gene channel ids (index into ``gene_names``).
    gene_names, celltype_names : the dataset's genes (channel order) and classes (id order, 0 = background).

    Returns
    -------
    GeneRanking

    Examples
    --------
    >>> r = gene_ranking_tables(np.array([[2.0, 4.0], [6.0, 3.0]]), np.array([2.0, 3.0]), np.array([2, 1]),
    ...                         np.array([0, 2]), ["A", "B", "C"], ["background", "T1", "T2"])
    >>> r.scores
                A    C
    celltype          
    T1        2.0  1.0
    T2        1.0  2.0
    >>> r.ranking.to_dict("list")
    {'celltype': ['T1', 'T1', 'T2', 'T2'], 'gene': ['A', 'C', 'C', 'A'], 'score': [2.0, 1.0, 2.0, 1.0], 'rank': [1, 2, 1, 2]}
    """
    tgs = np.asarray(type_gene_sum, np.float64)
    pix = np.asarray(type_pixels, np.float64).ravel()
    tgt = np.asarray(targets).astype(np.int64).ravel()
    gen = np.asarray(genes).astype(np.int64).ravel()
    n_types, n_genes = len(celltype_names), len(gene_names)
    if tgs.ndim != 2 or tgs.shape != (tgt.size, gen.size) or pix.size != tgt.size:
        raise DataError(f"attribution sums have shape {tgs.shape}, type_pixels {pix.shape}, targets {tgt.shape}, "
                        f"genes {gen.shape}; expected (T, n), (T,), (T,), (n,)")
    if tgt.size and (tgt.min() < 0 or tgt.max() >= n_types) or gen.size and (gen.min() < 0 or gen.max() >= n_genes):
        raise DataError(f"attribution targets / genes out of range (cell-type ids 0..{n_types - 1}, gene ids "
                        f"0..{n_genes - 1}); the attribution belongs to another dataset")
    row_order = np.argsort(tgt, kind="stable")
    col_order = np.argsort(gen, kind="stable")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(pix[:, None] > 0, tgs / np.where(pix > 0, pix, 1.0)[:, None], np.nan)
    mean = mean[row_order][:, col_order]
    type_names = [celltype_names[t] for t in tgt[row_order]]
    gene_names = [gene_names[g] for g in gen[col_order]]
    scores = pd.DataFrame(mean, index=pd.Index(type_names, name="celltype"), columns=gene_names)

    parts = []
    for i, name in enumerate(type_names):
        row = mean[i]
        ok = np.flatnonzero(np.isfinite(row))
        if ok.size == 0:
            continue
        order = ok[np.argsort(-row[ok], kind="stable")]  # descending; ties keep channel order
        parts.append(pd.DataFrame({"celltype": name, "gene": [gene_names[g] for g in order], "score": row[order],
                                   "rank": np.arange(1, order.size + 1, dtype=np.int64)}))
    ranking = (pd.concat(parts, ignore_index=True) if parts else
               pd.DataFrame({"celltype": [], "gene": [], "score": [], "rank": []}).astype({"rank": np.int64}))
    return GeneRanking(scores=scores, ranking=ranking)


def write_gene_ranking(results_dir: str | os.PathLike, type_gene_sum: np.ndarray, type_pixels: np.ndarray,
                       targets: np.ndarray, genes: np.ndarray, metadata: DatasetMetadata, method: str, *,
                       figure: bool = True, title: str = "") -> GeneRanking:
    """Write ``gene_celltype_scores.csv``, ``gene_ranking.csv`` and the heat map under ``results_dir``.

    Parameters
    ----------
    results_dir : the run's ``results/`` folder (created when missing).
    type_gene_sum, type_pixels, targets, genes, metadata : see :func:`gene_ranking_tables`.
    method : attribution method (``"CID"`` or ``"IG"``), for the figure.
    figure : also draw ``figures/gene_ranking_heatmap.png``.
    title : figure title prefix (e.g. run and epoch).

    Returns
    -------
    GeneRanking (the tables written).
    """
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tables = gene_ranking_tables(type_gene_sum, type_pixels, targets, genes, metadata.genes, metadata.celltypes)
    write_csv(results_dir / ResultFiles.GENE_SCORES, tables.scores, index=True)
    write_csv(results_dir / ResultFiles.GENE_RANKING_ATTRIBUTION, tables.ranking)
    if figure:
        if tables.scores.notna().any(axis=None):
            plot_gene_ranking_heatmap(results_dir / ResultFiles.FIGURES / FigureFiles.RANKING, tables.scores,
                                      method=method, title=title)
        else:
            log.warning("gene ranking: no cell type has attributed pixels; heat map not drawn")
    return tables


def _read_attribution(path: Path) -> dict[str, Any]:
    arrays = load_npz(path, _ATTR_KEYS)
    return {**{k: arrays[k] for k in _ATTR_KEYS[:4]}, "method": str(arrays["method"])}


# ------------------------------------------------------------------------------------------------ run folder
def available_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Epochs with a label cache (``labels_cache_<epoch>.npz``) in a run folder, ascending."""
    return RunFolder(Path(run_dir)).label_cache_epochs()


def resolve_epoch(run_dir: str | os.PathLike, epoch: int | None = None) -> int:
    """The epoch to export: ``epoch`` when its label cache exists, the latest one when ``epoch`` is None.

    Raises
    ------
    InputNotFoundError : no run folder, no label cache at all, or none for ``epoch`` (the message lists the epochs
        that exist).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputNotFoundError(f"run folder {run_dir} not found; train first (--step_name=SegJointGene) or check "
                                 "--work_dir, --datasets_name and --net_sub_suffix")
    epochs = available_epochs(run_dir)
    if not epochs:
        raise InputNotFoundError(f"{run_dir}: no label cache (labels_cache_<epoch>.npz); the run saved no epoch yet")
    if epoch is None:
        return epochs[-1]
    if epoch not in epochs:
        raise InputNotFoundError(f"{run_dir}: no label cache for epoch {epoch} (--ckpt_load_epoch); saved epochs: "
                                 f"{', '.join(map(str, epochs))}")
    return epoch


def _data_dir(run: RunFolder, override: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    info = read_json(run.run_info) if run.run_info.is_file() else {}
    if override is not None:
        return Path(override), info
    if "data_dir" not in info:
        raise InputNotFoundError(f"{run.run_info} is missing or names no data_dir; pass the dataset folder explicitly")
    return Path(info["data_dir"]), info


def _load_dataset(data_dir: Path) -> tuple[DatasetMetadata, np.ndarray]:
    """metadata.json and the cell id -> cell-type id lookup of a preprocessed dataset (no torch needed)."""
    if read_metadata(data_dir) is None:
        raise InputNotFoundError(f"{data_dir / METADATA_FILE} not found: the run's dataset is missing; preprocess the "
                                 "section again (--step_name=preprocess_CA1) under the same --work_dir and "
                                 "--datasets_name")
    meta = load_metadata(data_dir)
    cells_path = data_dir / CELLS_TABLE
    if not cells_path.is_file():
        raise InputNotFoundError(f"{cells_path} not found: preprocess the section again")
    cells = pd.read_csv(cells_path)
    lut = np.zeros(int(cells["cell"].max()) + 1, np.int64)
    lut[cells["cell"].to_numpy()] = cells["celltype_id"].to_numpy()
    return meta, lut


def _with_denovo_cells(lut: np.ndarray, assignment: Path) -> np.ndarray:
    """The cell -> type lookup with the cells the run found without a nucleus (saved with its spot assignment)."""
    if not assignment.is_file() or "denovo_cell" not in npz_headers(assignment):
        return lut
    extra = load_npz(assignment, ("denovo_cell", "denovo_class"))
    ids = extra["denovo_cell"].astype(np.int64)
    if ids.size == 0:
        return lut
    if ids.min() < lut.size:
        raise DataError(f"{assignment}: de novo cell ids from {ids.min()} collide with the dataset's cell ids "
                        f"(up to {lut.size - 1}); the run belongs to another preprocessing of the section")
    return extend_lut(lut, ids, extra["denovo_class"])


def _cache_names(path: Path) -> dict[str, list[str]]:
    """split -> patch names of a label cache; a corrupt or truncated cache raises :class:`DataError` naming it."""
    keys = tuple(k for k in npz_headers(path) if k.endswith(".names"))
    return {k.removesuffix(".names"): [str(n) for n in v] for k, v in load_npz(path, keys).items()}


def _attribution_path(run: RunFolder, epoch: int) -> Path | None:
    """The attribution file of ``epoch``, else the latest one saved before it."""
    epochs = [e for e in run.attribution_epochs() if e <= epoch]
    return run.attribution(epochs[-1]) if epochs else None


def _areas(mask: np.ndarray) -> np.ndarray:
    """Pixel count of every id > 0 present in ``mask`` (row blocks: no full-size int64 temporary)."""
    counts = np.zeros(1, np.int64)
    for r in range(0, mask.shape[0], 512):
        block = np.bincount(mask[r:r + 512].ravel().astype(np.int64))
        if block.size > counts.size:
            block[:counts.size] += counts
            counts = block
        else:
            counts[:block.size] += block
    counts[0] = 0
    return counts[counts > 0]


@dataclass
class _Views:
    """Small arrays kept for the figures once a section-size mask is released."""

    factor: int
    window: tuple[int, int, int, int]
    final_small: np.ndarray | None = None
    final_crop: np.ndarray | None = None
    final_types_crop: np.ndarray | None = None
    initial_crop: np.ndarray | None = None
    initial_types_crop: np.ndarray | None = None
    initial_areas: np.ndarray | None = None
    background_small: np.ndarray | None = None
    background_crop: np.ndarray | None = None

    def crop(self, image: np.ndarray) -> np.ndarray:
        y0, x0, h, w = self.window
        return np.array(image[y0:y0 + h, x0:x0 + w])


def write_anndata(path: Path, cells: pd.DataFrame, spot_cell: np.ndarray, spot_gene: np.ndarray,
                   genes: list[str], uns: dict[str, Any], rank_genes_groups: dict | None = None):
    """cells x genes spot counts as ``.h5ad``; returns the AnnData, or None (and a logged hint) without anndata."""
    try:
        import anndata
    except ImportError:
        log.warning("anndata is not installed: %s was not written; install it with `pip install anndata` "
                    "(or `pip install segjointgene[dev]`) and run --step_name=export again", path.name)
        return None
    counts = cell_gene_counts(spot_cell, spot_gene, len(genes), cell_ids=cells["cell"].to_numpy()).astype(np.float32)
    obs = pd.DataFrame({"celltype": pd.Categorical(cells["celltype"]), "area_px": cells["area_px"].to_numpy(),
                        "n_spots": cells["n_spots"].to_numpy()}, index=cells["cell"].astype(str).to_numpy())
    obs.index.name = "cell"
    adata = anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    adata.obsm["spatial"] = cells[["x", "y"]].to_numpy(np.float64)
    if "x_um" in cells.columns:  # squidpy / Xenium Explorer work in the instrument's microns
        adata.obsm["spatial_um"] = cells[["x_um", "y_um"]].to_numpy(np.float64)
    adata.uns["segjointgene"] = uns
    if rank_genes_groups is not None:  # scanpy.get.rank_genes_groups_df(adata, None) reads it
        adata.uns["rank_genes_groups"] = rank_genes_groups
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return adata


# ------------------------------------------------------------------------------------------------ export
@dataclass
class _Export:
    """What the parts of one export share: the run, its dataset and the spots."""

    run: RunFolder
    epoch: int
    data_dir: Path
    meta: DatasetMetadata
    lut: np.ndarray  # cell id -> class id
    title: str
    sx: np.ndarray  # (n,) float64 spot positions, raw frame
    sy: np.ndarray
    spot_gene: np.ndarray  # (n,) int64
    views: _Views
    de: pd.DataFrame | None = None  # differential expression of the final cells

    @property
    def out(self) -> Path:
        return self.run.results

    @property
    def mask_dtype(self) -> type:
        return np.uint8 if self.meta.n_classes <= 256 else np.uint16


def export_results(run_dir: str | os.PathLike, *, epoch: int | None = None, figures: bool = True,
                   data_dir: str | os.PathLike | None = None) -> Path:
    """Write the results of one saved epoch of a run (SPEC §5) under ``<run_dir>/results/``.

    Parameters
    ----------
    run_dir : the run folder ``checkpoints/<datasets_name>/<net_sub_suffix>/``.
    epoch : epoch of the label cache to export (default: the latest saved).
    figures : also draw ``results/figures/*.png``.
    data_dir : the preprocessed dataset (default: ``data_dir`` of ``run.json``).

    Returns
    -------
    The results folder.

    Notes
    -----
    Files: ``instance_mask.tif`` (uint32 cell ids), ``celltype_mask.tif`` (uint8, or uint16 beyond 255 types) and
    ``initial_instance_mask.tif`` (uint32 nucleus ids), all in the raw coordinate frame; ``celltypes.csv``
    (``id,name``); ``spots_assigned.csv`` (every spot of the dataset's ``spots.npz`` in input-file order:
    ``gene,spotX,spotY,cell,celltype,prob,cell_mask,inside``; ``cell`` 0 = unassigned: the spot model's assignment
    with ``--label_update model`` (``prob`` its posterior probability), else the mask's cell (``prob`` 1);
    ``cell_mask`` the instance mask's cell at the spot; ``inside`` false for a spot outside the mask frame);
    ``cells.csv`` (``cell,celltype,x,y,area_px,n_spots``, one row per cell of the mask); ``cells.h5ad`` (when anndata is
    installed); ``gene_ranking.csv`` and ``gene_celltype_scores.csv`` (when an attribution file of this epoch or an earlier one exists; stale ones are removed otherwise); ``figures/*.png``.

    Patches listed in the metadata but absent from the label cache (a cache without its test split) keep their
    initial nucleus labels; this is logged.
    """
    start = time.perf_counter()
    run = RunFolder(Path(run_dir))
    ex = _open_export(run, resolve_epoch(run.path, epoch), data_dir)
    spot_cell, cells = _export_final_labels(ex, figures)
    _export_initial_labels(ex, figures)
    _export_gene_ranking(ex, figures)
    _export_border_genes(ex, spot_cell, cells)
    if figures:
        _export_figures(ex, cells, spot_cell)
    log.info("exported epoch %d of %s to %s in %.1f s", ex.epoch, run.path, ex.out, time.perf_counter() - start)
    return ex.out


def _open_export(run: RunFolder, epoch: int, data_dir: str | os.PathLike | None) -> _Export:
    data_dir, info = _data_dir(run, data_dir)
    meta, lut = _load_dataset(data_dir)
    lut = _with_denovo_cells(lut, run.spot_assignment(epoch))
    run.results.mkdir(parents=True, exist_ok=True)
    for folder in (run.results, run.figures):  # leftovers of a killed export (hidden, never read)
        remove_stale_temps(folder)
    title = f"{info.get('datasets_name', meta.datasets_name or data_dir.name)}/{run.path.name}, epoch {epoch}"
    spots = load_npz(data_dir / SPOTS_TABLE, ("gene", "x", "y"))
    sx, sy = spots["x"].astype(np.float64), spots["y"].astype(np.float64)
    views = _Views(factor=display_factor(meta.raw_shape, OVERVIEW_PX),
                   window=densest_window(sx, sy, meta.raw_shape, ZOOM_PX))
    return _Export(run=run, epoch=epoch, data_dir=data_dir, meta=meta, lut=lut, title=title, sx=sx, sy=sy,
                   spot_gene=spots["gene"].astype(np.int64), views=views)


def _final_instance(ex: _Export) -> np.ndarray:
    """The whole-section instance map of the label cache; patches the cache lacks keep their nuclei."""
    cache_path = ex.run.label_cache(ex.epoch)
    listed = {n for s in SPLITS for n in ex.meta.split[s]}
    cached = {n for names in _cache_names(cache_path).values() for n in names}
    stray = cached - listed
    if stray:
        raise DataError(f"{cache_path}: {len(stray)} patch(es) not in {ex.data_dir / METADATA_FILE} "
                        f"(e.g. {sorted(stray)[0]}); the cache belongs to another preprocessing of the section")
    instance = stitch_label_cache(cache_path, ex.meta, "instances", dtype=np.uint32)
    missing = listed - cached
    if missing:
        log.warning("%s lacks %d of %d patches (a split was not saved): they keep their initial nucleus labels",
                    cache_path.name, len(missing), len(listed))
        stitch_patch_channel(ex.data_dir, ex.meta, PatchKeys.INSTANCE, names=missing, out=instance)
    return instance


def _export_final_labels(ex: _Export, figures: bool) -> tuple[np.ndarray, pd.DataFrame]:
    """Masks, the spot and cell tables, the polygons and the AnnData of the final labels; returns (spot -> cell,
    cell table)."""
    meta, out = ex.meta, ex.out
    instance = _final_instance(ex)
    types = class_map(instance, ex.lut, ex.mask_dtype)
    write_tif(out / ResultFiles.INSTANCE_MASK, instance)
    write_tif(out / ResultFiles.CELLTYPE_MASK, types)
    write_csv(out / ResultFiles.CELLTYPES, celltype_table(list(meta.celltypes)))
    assigned = assign_spots(instance, ex.sx, ex.sy)
    spot_cell, prob = _spot_assignment(ex, assigned.values)
    cells = cell_table(instance, ex.lut, list(meta.celltypes), spot_cell)
    if figures:
        ex.views.final_small = downsample_labels(instance, ex.views.factor)
        ex.views.final_crop = ex.views.crop(instance)
        ex.views.final_types_crop = ex.views.crop(types)
    names = np.asarray(meta.celltypes, dtype=object)
    spots = pd.DataFrame({
        "gene": np.asarray(meta.genes, dtype=object)[ex.spot_gene], "spotX": ex.sx, "spotY": ex.sy, "cell": spot_cell,
        "celltype": names[ex.lut[spot_cell]], "prob": prob, "cell_mask": assigned.values, "inside": assigned.inside})
    rings = cell_polygons(instance)
    write_geojson(out / ResultFiles.GEOJSON, instance, cells, rings=rings)
    if meta.extra.get("input_format") == "xenium":
        _write_xenium_ranger(ex, instance, spots, cells)
    del types
    _log_outside(ex, assigned)
    write_csv(out / ResultFiles.SPOTS, with_microns(spots, meta, ("spotX", "spotY")))
    cells = with_microns(cells, meta, ("x", "y"))
    write_csv(out / ResultFiles.CELLS, cells)
    adata = _export_expression(ex, cells, spot_cell)
    _write_store(ex, instance, spots, rings, adata)
    return spot_cell, cells


def _write_store(ex: _Export, instance: np.ndarray, spots: pd.DataFrame, rings: dict, adata) -> None:
    """``segjointgene.zarr`` when spatialdata is installed (``pip install segjointgene[spatialdata]``)."""
    if adata is None or not spatialdata_available():
        log.info("spatialdata is not installed: no %s (pip install segjointgene[spatialdata])", ResultFiles.SPATIALDATA)
        return
    t0 = time.perf_counter()
    write_spatialdata(ex.out / ResultFiles.SPATIALDATA, instance=instance, spots=spots, rings=rings, adata=adata,
                      um_per_px=ex.meta.extra.get("um_per_px"))
    log.info("SpatialData store -> %s in %.1f s", ex.out / ResultFiles.SPATIALDATA, time.perf_counter() - t0)


def _log_outside(ex: _Export, assigned) -> None:
    n_out = int((~assigned.inside).sum())
    if n_out:
        log.warning("%d spot(s) lie outside the %d x %d mask frame: kept in %s with cell 0 and inside=false",
                    n_out, *ex.meta.raw_shape, ResultFiles.SPOTS)
    if ex.meta.n_spots_outside:
        log.info("%d spot(s) of the raw spot file lay outside the image and were dropped at preprocessing",
                 ex.meta.n_spots_outside)


def _export_expression(ex: _Export, cells: pd.DataFrame, spot_cell: np.ndarray):
    """Differential expression of the cells (kept for gene_ranking.csv) and the AnnData with it (returned; None
    without anndata)."""
    meta, genes = ex.meta, list(ex.meta.genes)
    t0 = time.perf_counter()
    ex.de = differential_expression(cell_gene_counts(spot_cell, ex.spot_gene, len(genes),
                                                     cell_ids=cells["cell"].to_numpy()),
                                    cells["celltype"].to_numpy(), genes)
    log.info("differential expression of %d cells x %d genes in %.1f s", len(cells), len(genes),
             time.perf_counter() - t0)
    return write_anndata(ex.out / ResultFiles.ANNDATA, cells, spot_cell, ex.spot_gene, genes,
                          {"epoch": int(ex.epoch), "datasets_name": meta.datasets_name, "run": ex.run.path.name},
                          rank_genes_groups_uns(ex.de) if len(ex.de) else None)


def _write_xenium_ranger(ex: _Export, instance: np.ndarray, spots: pd.DataFrame, cells: pd.DataFrame) -> None:
    """``results/xenium_ranger/``: what ``xeniumranger import-segmentation`` takes (see :mod:`.polygons`)."""
    tx_ids = xenium_transcript_ids(ex.meta, ex.data_dir)
    nuclei = stitch_patch_channel(ex.data_dir, ex.meta, PatchKeys.INSTANCE, dtype=np.uint32)
    folder = write_xenium_ranger(ex.out / ResultFiles.XENIUM_RANGER, instance, nuclei, cells, spots,
                                 um_per_px=float(ex.meta.extra["um_per_px"]), transcript_id=tx_ids)
    log.info("Xenium Ranger import files -> %s (xeniumranger import-segmentation --transcript-assignment "
             "transcript_assignment.csv --viz-polygons viz_polygons.geojson --units microns)", folder)


def xenium_transcript_ids(meta: DatasetMetadata, data_dir: Path) -> np.ndarray | None:
    """Xenium's ``transcript_id`` of every spot of the dataset (spots.npz order), when its transcripts file has one."""
    raw = Path(meta.raw_dir)
    source = meta.source_file("spots")
    if not (source and (raw / source).is_file() and (raw / source).suffix == ".parquet"):
        return None
    import pyarrow.parquet as pq

    if "transcript_id" not in pq.ParquetFile(raw / source).schema_arrow.names:
        return None
    rows = load_npz(data_dir / SPOTS_TABLE, ("row_in_file",))["row_in_file"].astype(np.int64)
    return pq.read_table(raw / source, columns=["transcript_id"]).column(0).to_numpy()[rows]


def with_microns(table: pd.DataFrame, meta: DatasetMetadata, columns: tuple[str, str]) -> pd.DataFrame:
    """``<x>_um, <y>_um`` columns in the platform's micron frame when the dataset came from an instrument folder."""
    um = meta.extra.get("um_per_px")
    if um is None:
        return table
    ox, oy = meta.extra.get("origin_um", (0.0, 0.0))
    return table.assign(**{f"{columns[0]}_um": ox + table[columns[0]] * um, f"{columns[1]}_um": oy + table[columns[1]] * um})


def _spot_assignment(ex: _Export, mask_cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell, probability) of every spot: the spot model's (``--label_update model``) when this epoch has one, else
    the mask's cell at the spot with probability 1 (a mask assignment has no posterior)."""
    path = ex.run.spot_assignment(ex.epoch)
    if not path.is_file():
        return mask_cell, np.ones(mask_cell.size, np.float32)
    saved = load_npz(path, ("cell", "prob"))
    if saved["cell"].shape != mask_cell.shape:
        raise DataError(f"{path}: {saved['cell'].size} spots but the dataset has {mask_cell.size}; the run belongs "
                        f"to another preprocessing of the section")
    return saved["cell"].astype(np.int64), saved["prob"].astype(np.float32)


def _export_initial_labels(ex: _Export, figures: bool) -> None:
    """The nuclei (the fixed core of the run) as a mask, and their views for the figures."""
    initial = stitch_patch_channel(ex.data_dir, ex.meta, PatchKeys.INSTANCE, dtype=np.uint32)
    write_tif(ex.out / ResultFiles.INITIAL_MASK, initial)
    if figures:
        views = ex.views
        views.initial_crop = views.crop(initial)
        views.initial_types_crop = ex.lut[views.initial_crop]
        views.initial_areas = _areas(initial)
        if not ex.meta.has_dapi:
            views.background_small = downsample_mean(initial > 0, views.factor)
            views.background_crop = (views.initial_crop > 0).astype(np.float32)


def _single_type(ex: _Export, what: str, *paths: Path) -> bool:
    """Whether fewer than two cell types hold cells; then say why there is no ``what`` and remove stale ``paths``."""
    types = sorted(set(ex.lut[ex.lut > 0].tolist()))
    if len(types) >= 2:
        return False
    names = ", ".join(ex.meta.celltypes[t] for t in types) or "none"
    log.warning("no %s: the section's cells are of %d cell type (%s); genes are ranked for a type against the "
                "others, which needs two or more types (give the nuclei several types, e.g. from a reference with "
                "--reference_csv at preprocessing)", what, len(types), names)
    for stale in paths:
        if stale.is_file():
            stale.unlink()
    return True


def _export_gene_ranking(ex: _Export, figures: bool) -> None:
    """``gene_ranking.csv`` (differential expression, plus the attribution's score and rank when an attribution ran
    up to this epoch) and the attribution's own files; stale attribution files are removed. Not written, with a
    warning that says why, when the cells are of one type."""
    if _single_type(ex, "gene ranking", ex.out / ResultFiles.GENE_RANKING, ex.out / ResultFiles.GENE_SCORES,
                    ex.out / ResultFiles.GENE_RANKING_ATTRIBUTION, ex.run.figure(FigureFiles.RANKING),
                    ex.run.figure(FigureFiles.DOTPLOT)):
        return
    if not len(ex.de) and _attribution_path(ex.run, ex.epoch) is None:
        log.warning("no gene ranking: no cell type has 2 or more cells beside cells of other types; a larger "
                    "section gives one")
        stale = ex.out / ResultFiles.GENE_RANKING
        if stale.is_file():
            stale.unlink()
        return
    ranking = ex.de.assign(attr_method="", attr_score=np.nan, attr_rank=np.nan)
    attr_path = _attribution_path(ex.run, ex.epoch)
    if attr_path is not None:
        attr = _read_attribution(attr_path)
        log.info("attribution ranking from %s (%s)", attr_path.name, attr["method"])
        tables = write_gene_ranking(ex.out, attr["type_gene_sum"], attr["type_pixels"], attr["targets"],
                                    attr["genes"], ex.meta, attr["method"], figure=figures, title=ex.title)
        own = tables.ranking.rename(columns={"score": "attr_score", "rank": "attr_rank"})
        ranking = ex.de.merge(own, on=["celltype", "gene"], how="left").assign(attr_method=attr["method"])
    else:
        log.info("no attribution ran up to epoch %d (no attribution_<epoch>.npz): ranking by expression only", ex.epoch)
        for stale in (ex.out / ResultFiles.GENE_RANKING_ATTRIBUTION, ex.out / ResultFiles.GENE_SCORES,
                      ex.run.figure(FigureFiles.RANKING)):
            if stale.is_file():
                log.info("removing %s of a later epoch", stale.relative_to(ex.out).as_posix())
                stale.unlink()
    write_csv(ex.out / ResultFiles.GENE_RANKING, ranking)
    if figures and len(ex.de):
        plot_dotplot(ex.run.figure(FigureFiles.DOTPLOT), ex.de, title=ex.title)


def _export_border_genes(ex: _Export, spot_cell: np.ndarray, cells: pd.DataFrame) -> None:
    """``border_genes.csv``: the genes that change across the borders of touching types (:mod:`.borders`, from the
    final spot assignment and cell-type mask, one typical cell radius deep); with the epoch's network, its integrated
    gradients of the two types' logit difference at their borders as ``ig_score`` / ``ig_rank`` columns."""
    import tifffile

    from ..methods.spotmodel.model import typical_radius
    from .borders import border_expression

    if _single_type(ex, "border genes", ex.out / ResultFiles.BORDER_GENES):
        return
    t0 = time.perf_counter()
    classes = tifffile.imread(ex.out / ResultFiles.CELLTYPE_MASK)
    radius = typical_radius(cells[["y", "x"]].to_numpy(np.float64), cells["area_px"].to_numpy(np.float64) / 4)
    table = border_expression(classes, ex.lut[spot_cell], ex.sx, ex.sy, ex.spot_gene, list(ex.meta.genes),
                              list(ex.meta.celltypes), width=max(3, int(round(radius))))
    del classes
    ig = _border_attribution(ex)
    if ig is not None and len(table):
        table = table.merge(ig[["type_a", "type_b", "gene", "score", "rank"]].rename(
            columns={"score": "ig_score", "rank": "ig_rank"}), on=["type_a", "type_b", "gene"], how="left")
    write_csv(ex.out / ResultFiles.BORDER_GENES, table)
    if table.empty:
        log.warning("no two cell types touch with >= 20 spots on each side of their border: %s has no rows",
                    ResultFiles.BORDER_GENES)
    log.info("border genes of %d type pairs in %.1f s", table[["type_a", "type_b"]].drop_duplicates().shape[0],
             time.perf_counter() - t0)


def _border_attribution(ex: _Export) -> pd.DataFrame | None:
    """The network's border attribution (:func:`segjointgene.attribution.border.border_genes`), or None when the
    epoch has no checkpoint."""
    import torch

    from ..attribution.border import border_genes
    from ..methods.segjointgene.checkpoint import load_checkpoint
    from ..methods.segjointgene.distributed import strip_module_prefix
    from ..methods.segjointgene.unet import UNet
    from ..preprocess.dataset import ImagePatchDataset, load_label_cache

    path = ex.run.checkpoint(ex.epoch)
    if not path.is_file():
        log.info("no %s: border genes without the network's attribution", path.name)
        return None
    state = load_checkpoint(path)
    width = int(state.get("config", {}).get("train", {}).get("net_width", 16))
    model = UNet(ex.meta.n_genes, ex.meta.n_classes, base_channels=width)
    model.load_state_dict(strip_module_prefix(state["model"]))
    cache = load_label_cache(ex.run.label_cache(ex.epoch))
    datasets = {split: ImagePatchDataset(ex.data_dir, split, metadata=ex.meta) for split in cache}
    index = {(split, n): i for split, ds in datasets.items() for i, n in enumerate(ds.names)}
    labels = ((key, torch.as_tensor(classes.astype(np.int64))) for split, part in cache.items()
              for key, classes in (((split, str(n)), c) for n, c in zip(part["names"], part["classes"]))
              if key in index)
    return border_genes(model, labels, lambda key: datasets[key[0]].read_image(index[key]), list(ex.meta.genes),
                        list(ex.meta.celltypes))


def _export_figures(ex: _Export, cells: pd.DataFrame, spot_cell: np.ndarray) -> None:
    if ex.meta.has_dapi:
        dapi = stitch_patch_channel(ex.data_dir, ex.meta, PatchKeys.DAPI, dtype=np.float32)
        ex.views.background_small = downsample_mean(dapi, ex.views.factor)
        ex.views.background_crop = ex.views.crop(dapi)
        del dapi
    _draw_figures(ex, cells, spot_cell)


def _draw_figures(ex: _Export, cells: pd.DataFrame, spot_cell: np.ndarray) -> None:
    views, meta, sx, sy, fig = ex.views, ex.meta, ex.sx, ex.sy, ex.run.figure
    bg_name = "DAPI" if meta.has_dapi else "nucleus mask"
    dim = 1.0 if meta.has_dapi else 0.5
    density = spot_density(sx, sy, meta.raw_shape, views.factor)
    plot_section_overview(fig(FigureFiles.OVERVIEW), views.final_small, views.background_small, density,
                          factor=views.factor, background_name=bg_name, n_cells=len(cells), window=views.window,
                          dim=dim, title=ex.title)
    y0, x0, h, w = views.window
    in_win = (sx >= x0) & (sx < x0 + w) & (sy >= y0) & (sy < y0 + h)
    plot_zoom(fig(FigureFiles.ZOOM), views.final_crop, views.initial_crop, views.background_crop,
              views.final_types_crop, np.stack([sx[in_win], sy[in_win]], axis=1), spot_cell[in_win] > 0,
              origin=(y0, x0), celltypes=list(meta.celltypes), background_name=bg_name, dim=dim, title=ex.title)
    plot_initial_vs_final(fig(FigureFiles.INITIAL_VS_FINAL), views.initial_crop, views.final_crop,
                          views.initial_types_crop, views.final_types_crop, views.initial_areas,
                          cells["area_px"].to_numpy(), origin=(y0, x0), title=ex.title)
    if ex.run.train_log.is_file():
        table = pd.read_csv(ex.run.train_log)
        if len(table):
            plot_training_curves(fig(FigureFiles.TRAINING), table, title=ex.title)
    else:
        log.info("no %s in %s: no training curves", RunFolder.TRAIN_LOG, ex.run.path)


def run_export(paths: Paths, *, epoch: int | None = None) -> int:
    """``--step_name=export``: write the results of ``--ckpt_load_epoch`` (``epoch``; default the latest saved).

    The dataset folder recorded in the run's ``run.json`` is used when it exists; otherwise ``data/<datasets_name>``
    under ``--work_dir``.
    """
    run = paths.run
    epoch = resolve_epoch(run.path, epoch)
    recorded = read_json(run.run_info).get("data_dir") if run.run_info.is_file() else None
    data_dir = None if recorded and Path(recorded, METADATA_FILE).is_file() else Path(paths.data_dir)
    if data_dir is not None and recorded:
        log.info("the dataset recorded in run.json (%s) is gone; using %s", recorded, data_dir)
    start = time.perf_counter()
    out = export_results(run.path, epoch=epoch, figures=True, data_dir=data_dir)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    print(f"exported epoch {epoch} of {run.path} in {time.perf_counter() - start:.1f} s -> {out}\n  "
          + "\n  ".join(files))
    return 0
