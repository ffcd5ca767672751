"""The ``evaluate`` step: score a run and the baselines on one section (layer 2.5).

Every method is scored by the same code (:func:`score_segmentation`, :func:`score_assignment`) in the raw pixel frame:

* always (no truth needed): ``cell_calling`` (reference §13.4, ring width = ``--pixel_distance``; n/a when no spot
  lies on the ring, e.g. cells that fill a dense tissue), ``spots_in_cells``
  (fraction of spots inside a cell / assigned to one), ``n_cells``, ``mean_area_px``; ``MECR`` with a cell-type x gene
  reference profile (``--reference_csv``; for a simulated section without one, its ``markers.csv`` expression table);
* against a ground-truth folder (simulated sections, SPEC §6): spot-assignment accuracy over all spots / cell-borne
  spots / noise spots, gene mIoU (matched mean and the penalised variant), instance F1 / AP / precision / recall at
  IoU 0.5 and 0.75, and the pixel mIoU / Dice of cell types over all pixels and over true foreground only.

Methods (rows): ``ours`` (the run's ``results/``: masks, and its own spot assignment when ``spots_assigned.csv``
has one; then ``ours_mask`` scores the masks alone), ``nuclei``, ``expand_<k>``, ``density_watershed`` (see
:mod:`segjointgene.evaluate.baselines`), plus ``pciseq`` when the raw spots file has a ``pciseq_cell`` column (the real
CA1 section): that row is a spot assignment without masks, so only its mask-free metrics are filled.

:func:`evaluate_masks` is the library entry point (arrays in, a table out); :func:`run_evaluate` is the CLI step.

Columns (details in :mod:`segjointgene.evaluate.metrics`):

================  ====================================================================================================
spot_acc          fraction of spots whose cell (mask value at the spot's pixel) is the true cell (0 for noise)
spot_acc_cell     the same over spots of a true cell; ``spot_acc_noise``: over noise spots (fraction left unassigned)
noise_out         fraction of the noise spots outside every true cell that are left unassigned
gene_mIoU         mean over cells matched by mask IoU (greedy, one-to-one) of the Jaccard of their spot sets
gene_mIoU_pen     the same sum divided by the number of true cells (unmatched true cells count 0)
F1@t, AP@t        instance F1 and TP / (TP + FP + FN) at IoU >= t (t = 0.5, 0.75); ``P@0.5``, ``R@0.5``
type_mIoU/Dice    pixel IoU / Dice of cell types, mean over foreground classes, all pixels; ``_fg``: truth > 0 only
cell_calling      spots inside cells / spots on a ring of ``--pixel_distance`` px around them
spots_in_cells    fraction of spots inside a cell (or assigned to one)
MECR              mean over mutually exclusive gene pairs of #cells with both / #cells with either (lower is better)
neg_purity        share of the spots in typed cells that are not negative markers of the cell's type (reference)
n_cells           instances present; ``mean_area_px``: their mean area
================  ====================================================================================================
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import EvaluateConfig, Settings
from ..constants import BACKGROUND, CELLS_TABLE, METADATA_FILE, SPOTS_TABLE, TRUTH_SUFFIX, RawFiles, TruthFiles
from ..errors import ColumnError, DataError, InputNotFoundError
from ..io.files import load_npz, write_csv
from ..io.metadata import DatasetMetadata, load_metadata, read_metadata
from ..io.runfolder import Paths, ResultFiles, RunFolder
from . import baselines as B
from . import metrics as M

log = logging.getLogger(__name__)

__all__ = [
    "ALWAYS_COLUMNS",
    "OURS",
    "PCISEQ",
    "TRUTH_COLUMNS",
    "Spots",
    "Truth",
    "evaluate_masks",
    "expansion_curve",
    "load_reference",
    "load_truth",
    "markdown_table",
    "run_evaluate",
    "score_assignment",
    "score_segmentation",
]

OURS = "ours"
OURS_MASK = "ours_mask"
PCISEQ = "pciseq"
PCISEQ_COLUMN = "pciseq_cell"
IOU_THRESHOLDS = (0.5, 0.75)

#: Columns filled with a ground truth, in table order.
TRUTH_COLUMNS = (
    "spot_acc", "spot_acc_cell", "spot_acc_noise", "noise_out", "gene_mIoU", "gene_mIoU_pen",
    "F1@0.5", "AP@0.5", "F1@0.75", "AP@0.75", "P@0.5", "R@0.5",
    "type_mIoU", "type_Dice", "type_mIoU_fg", "type_Dice_fg",
)
#: Columns filled for every method (MECR only with a reference profile).
ALWAYS_COLUMNS = ("cell_calling", "spots_in_cells", "MECR", "neg_purity", "n_cells", "mean_area_px")
#: Columns that need a reference profile.
_REFERENCE_COLUMNS = ("MECR", "neg_purity")
_INT_COLUMNS = ("n_cells",)


@dataclass(frozen=True)
class Spots:
    """The spots of a section in the raw frame.

    Attributes
    ----------
    x, y : (n,) float64 positions in pixels (x = column); a spot lies in pixel ``(floor(y), floor(x))``.
    gene : (n,) int32 gene channel, an index into ``genes``.
    genes : gene names in channel order.
    """

    x: np.ndarray
    y: np.ndarray
    gene: np.ndarray
    genes: tuple[str, ...]


@dataclass(frozen=True)
class Truth:
    """Ground truth of a simulated section.

    Attributes
    ----------
    instance : (H, W) integer whole-cell ids (the ids of the nuclei), 0 = background.
    celltype : (H, W) integer class ids (0 = background, 1..K in the dataset's ``celltypes`` order).
    spot_cell : (n_spots,) int64 true cell of every spot (0 = background noise), in the order of :class:`Spots`.
    """

    instance: np.ndarray
    celltype: np.ndarray
    spot_cell: np.ndarray


# ------------------------------------------------------------------------------------------------ scoring
def _truth_scores(instance: np.ndarray, celltype: np.ndarray | None, spot_cell: np.ndarray, spots: Spots,
                  truth: Truth, n_classes: int, mask_cell: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    acc = M.spot_accuracy(spot_cell, truth.spot_cell)
    out.update(spot_acc=acc.overall, spot_acc_cell=acc.cell_spots, spot_acc_noise=acc.noise_spots)
    true_at_spot = M.cells_at_spots(truth.instance, spots.x, spots.y)
    out["noise_out"] = M.noise_left_out(spot_cell, truth.spot_cell, true_at_spot)
    match = M.match_instances(M.instance_overlap(instance, truth.instance))
    # gene mIoU as in reference §13.5: both spot sets from the masks (the spot's pixel in each instance mask)
    gene = M.gene_miou(mask_cell, true_at_spot, match)
    out.update({"gene_mIoU": gene.mean, "gene_mIoU_pen": gene.penalised})
    for t in IOU_THRESHOLDS:
        d = M.detection_scores(match, t)
        out.update({f"F1@{t}": d.f1, f"AP@{t}": d.ap, f"P@{t}": d.precision, f"R@{t}": d.recall})
    if celltype is not None:
        whole = M.celltype_scores(truth.celltype, celltype, n_classes)
        fg = M.celltype_scores(truth.celltype, celltype, n_classes, truth_foreground_only=True)
        out.update(type_mIoU=whole.miou, type_Dice=whole.mdice, type_mIoU_fg=fg.miou, type_Dice_fg=fg.mdice)
    return out


def _mecr(spot_cell: np.ndarray, spots: Spots, pairs: list[tuple[str, str]] | None) -> float:
    if pairs is None:
        return float("nan")
    counts = M.cell_gene_counts(spot_cell, spots.gene, len(spots.genes))
    return M.mecr(counts, list(spots.genes), pairs).value


def _purity(spot_cell: np.ndarray, spots: Spots, reference: pd.DataFrame | None,
            cell_types: Mapping[int, str] | None, fraction: float) -> float:
    if reference is None or cell_types is None:
        return float("nan")
    return M.negative_marker_purity(spot_cell, spots.gene, cell_types, list(spots.genes), reference,
                                    fraction=fraction)


def score_segmentation(instance: np.ndarray, celltype: np.ndarray | None, spots: Spots, *, truth: Truth | None = None,
                       pairs: list[tuple[str, str]] | None = None, n_classes: int | None = None,
                       pixel_distance: int = 5, spot_cell: np.ndarray | None = None,
                       reference: pd.DataFrame | None = None, cell_types: Mapping[int, str] | None = None,
                       mecr_fraction: float = 0.1) -> dict[str, float]:
    """Every metric of one segmentation (masks in the raw frame).

    Parameters
    ----------
    instance : (H, W) integer cell ids, 0 = background.
    celltype : (H, W) integer class ids or None (then the cell-type columns are NaN).
    spots : the section's spots.
    truth : ground truth, or None for the metrics without truth only.
    pairs : mutually exclusive gene pairs (:func:`segjointgene.evaluate.metrics.exclusive_gene_pairs`) for MECR, or
    None. n_classes : number of classes including background (default: from the largest class id seen).
    pixel_distance : ring width of the cell-calling score.
    spot_cell : the method's own spot assignment (e.g. the spot model's), which then replaces the mask's cell at
        each spot in the spot metrics (accuracies, noise_out, MECR, spots_in_cells); gene mIoU stays the masks'
        (reference §13.5). Default: the mask's cell at each spot.
    reference, cell_types : the reference profile and cell id -> type name, for ``neg_purity``
        (:func:`segjointgene.evaluate.metrics.negative_marker_purity` at ``mecr_fraction``).

    Returns
    -------
    dict metric name -> value (NaN where a metric does not apply).
    """
    mask_cell = M.cells_at_spots(instance, spots.x, spots.y)
    spot_cell = mask_cell if spot_cell is None else spot_cell
    ids, areas = M.label_areas(instance)
    row: dict[str, float] = {
        "cell_calling": M.cell_calling_score(instance, spots.x, spots.y, pixel_distance).score,
        "spots_in_cells": M.assigned_fraction(spot_cell),
        "MECR": _mecr(spot_cell, spots, pairs),
        "neg_purity": _purity(spot_cell, spots, reference, cell_types, mecr_fraction),
        "n_cells": float(ids.size),
        "mean_area_px": float(areas.mean()) if areas.size else float("nan"),
    }
    if truth is not None:
        if truth.instance.shape != np.shape(instance):
            raise DataError(f"the truth masks have shape {truth.instance.shape} but the segmentation has "
                            f"{np.shape(instance)}; both must be in the raw frame of the section")
        if n_classes is None:
            n_classes = int(max(truth.celltype.max(initial=0), 0 if celltype is None else celltype.max(initial=0))) + 1
        row.update(_truth_scores(instance, celltype, spot_cell, spots, truth, n_classes, mask_cell))
    return row


def score_assignment(spot_cell: np.ndarray, spots: Spots, *, truth: Truth | None = None,
                     pairs: list[tuple[str, str]] | None = None, reference: pd.DataFrame | None = None,
                     cell_types: Mapping[int, str] | None = None, mecr_fraction: float = 0.1) -> dict[str, float]:
    """The metrics that a spot-to-cell assignment without masks supports (e.g. pciSeq's ``pciseq_cell``).

    ``spots_in_cells`` is the fraction of spots assigned to a cell (not the cell-calling score, which needs a mask:
    see :func:`segjointgene.evaluate.metrics.assigned_fraction`); ``MECR`` with ``pairs``; with a truth, the
    spot-assignment accuracies (ids must be the nucleus ids). Mask-based metrics are NaN.
    """
    spot_cell = np.asarray(spot_cell, np.int64)
    if spot_cell.shape != spots.x.shape:
        raise DataError(f"the assignment has {spot_cell.size} spots but the section has {spots.x.size}")
    row = {"spots_in_cells": M.assigned_fraction(spot_cell), "MECR": _mecr(spot_cell, spots, pairs),
           "neg_purity": _purity(spot_cell, spots, reference, cell_types, mecr_fraction),
           "n_cells": float(np.unique(spot_cell[spot_cell != BACKGROUND]).size)}
    if truth is not None:
        acc = M.spot_accuracy(spot_cell, truth.spot_cell)
        row.update(spot_acc=acc.overall, spot_acc_cell=acc.cell_spots, spot_acc_noise=acc.noise_spots,
                   noise_out=M.noise_left_out(spot_cell, truth.spot_cell,
                                              M.cells_at_spots(truth.instance, spots.x, spots.y)))
    return row


def _columns(has_truth: bool) -> list[str]:
    return [*(TRUTH_COLUMNS if has_truth else ()), *ALWAYS_COLUMNS]


def _table(rows: dict[str, dict[str, float]], has_truth: bool, has_reference: bool) -> pd.DataFrame:
    columns = [c for c in _columns(has_truth) if has_reference or c not in _REFERENCE_COLUMNS]
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)
    table.index.name = "method"
    return table


def evaluate_masks(masks: Mapping[str, tuple[np.ndarray, np.ndarray | None]], spots: Spots, truth: Truth | None = None,
                   reference: pd.DataFrame | None = None, *, assignments: Mapping[str, np.ndarray] | None = None,
                   n_classes: int | None = None, pixel_distance: int = 5,
                   mecr_fraction: float = 0.1, cell_types: Mapping[int, str] | None = None) -> pd.DataFrame:
    """Score several segmentations (and optionally mask-free spot assignments) of one section.

    Parameters
    ----------
    masks : method name -> (instance mask, cell-type mask or None), (H, W) integer arrays in the raw frame.
    spots : the section's spots (raw frame).
    truth : ground truth, or None.
    reference : cell-type x gene reference profile (index = gene names, one column per type) for MECR, or None.
    assignments : method name -> (n_spots,) cell id of every spot (0 = none), scored with :func:`score_assignment`.
    n_classes : number of classes including background (default: inferred from the masks).
    pixel_distance : ring width of the cell-calling score.
    mecr_fraction : the expression fraction of :func:`segjointgene.evaluate.metrics.exclusive_gene_pairs`.
    cell_types : cell id -> type name (reference columns), for ``neg_purity``; None leaves it NaN.

    Returns
    -------
    DataFrame, one row per method (index ``method``), one column per metric (:data:`TRUTH_COLUMNS` with a truth,
    then :data:`ALWAYS_COLUMNS`; MECR and neg_purity only with a reference).

    Examples
    --------
    >>> inst = np.zeros((8, 8), np.uint32); inst[2:6, 2:6] = 1
    >>> spots = Spots(np.array([3.0, 4.0, 7.0]), np.array([3.0, 4.0, 7.0]), np.array([0, 1, 1], np.int32), ("a", "b"))
    >>> t = evaluate_masks({"perfect": (inst, inst)}, spots, Truth(inst, inst, np.array([1, 1, 0])))
    >>> t.loc["perfect", ["spot_acc", "gene_mIoU", "F1@0.75", "type_mIoU"]].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    pairs = M.exclusive_gene_pairs(reference, fraction=mecr_fraction) if reference is not None else None
    rows = {}
    for name, (instance, celltype) in masks.items():
        rows[name] = score_segmentation(instance, celltype, spots, truth=truth, pairs=pairs, n_classes=n_classes,
                                        pixel_distance=pixel_distance, reference=reference, cell_types=cell_types,
                                        mecr_fraction=mecr_fraction)
    for name, spot_cell in (assignments or {}).items():
        rows[name] = score_assignment(spot_cell, spots, truth=truth, pairs=pairs, reference=reference,
                                      cell_types=cell_types, mecr_fraction=mecr_fraction)
    return _table(rows, truth is not None, reference is not None)


def markdown_table(table: pd.DataFrame, *, transpose: bool = True, digits: int = 3) -> str:
    """A markdown table of an evaluation table (metrics as rows and methods as columns when ``transpose``).

    Examples
    --------
    >>> print(markdown_table(pd.DataFrame({"F1@0.5": [1.0, 0.25]}, index=pd.Index(["a", "b"], name="method"))))
    | metric | a | b |
    |---|---:|---:|
    | F1@0.5 | 1.000 | 0.250 |
    """
    def fmt(col: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        if col in _INT_COLUMNS:
            return str(int(round(float(v))))
        if col == "mean_area_px":
            return f"{float(v):.1f}"
        return f"{float(v):.{digits}f}"

    if transpose:
        head = ["metric", *map(str, table.index)]
        body = [[c, *(fmt(c, table.at[m, c]) for m in table.index)] for c in table.columns]
    else:
        head = [table.index.name or "method", *map(str, table.columns)]
        body = [[str(m), *(fmt(c, table.at[m, c]) for c in table.columns)] for m in table.index]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ loading
def load_reference(path: str | Path) -> pd.DataFrame:
    """Read a cell-type x gene reference profile: a gene column plus one numeric column per cell type.

    The gene column is the first of ``gene``, ``gene_name``, ``genes``, ``Gene`` present, else the first column
    (e.g. the class means ``pciseq_inputs/test_scRNAseq.csv`` of the CA1 data).

    Returns
    -------
    DataFrame, index = gene names, columns = cell types, float64 values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"--reference_csv {path}: file not found; give a CSV with a gene column and one "
                                 "column per cell type (mean expression)")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the reference profile ({err})") from None
    gene_col = next((c for c in ("gene", "gene_name", "genes", "Gene") if c in table.columns), table.columns[0])
    values = table.drop(columns=[gene_col])
    bad = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if bad or values.shape[1] == 0:
        raise ColumnError(f"{path}: the reference needs a gene column ('{gene_col}' used) and numeric columns, one per "
                          f"cell type; non-numeric: {', '.join(map(str, bad[:5])) or 'no type columns at all'}")
    if table[gene_col].duplicated().any():
        dup = table[gene_col][table[gene_col].duplicated()].iloc[0]
        raise DataError(f"{path}: gene {dup!r} appears more than once in column '{gene_col}'")
    if not np.isfinite(values.to_numpy(float)).all() or (values.to_numpy(float) < 0).any():
        raise DataError(f"{path}: the reference values must be finite and >= 0 (mean expression per type)")
    return values.set_axis(table[gene_col].astype(str).to_numpy()).astype(np.float64)


def _read_csv(path: Path, columns: tuple[str, ...], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputNotFoundError(f"{path}: {what} not found")
    table = pd.read_csv(path, low_memory=False)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ColumnError(f"{path}: missing column(s) {', '.join(missing)} (found {', '.join(map(str, table.columns))})")
    return table


def _read_mask(path: Path, shape: tuple[int, int], fix: str) -> np.ndarray:
    import tifffile

    if not path.is_file():
        raise InputNotFoundError(f"{path} not found; {fix}")
    try:
        mask = tifffile.imread(path)
    except Exception as err:  # any reader failure is a bad file for the user
        raise DataError(f"{path}: cannot read the mask ({type(err).__name__}: {err}); {fix}") from None
    mask = np.squeeze(mask)
    if mask.shape != tuple(shape):
        raise DataError(f"{path} has shape {mask.shape} but the section's raw frame is {tuple(shape)}; {fix}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{path} has dtype {mask.dtype}; an integer label image is needed")
    return mask


def load_truth(truth_dir: str | Path, *, shape: tuple[int, int], celltypes: list[str], rows_in_file: np.ndarray,
               genes: list[str] | None = None, spot_gene: np.ndarray | None = None) -> Truth:
    """Read a ground-truth folder written by ``simulate`` (``instance_mask.tif``, ``cells_truth.csv``,
    ``spots_truth.csv``).

    Parameters
    ----------
    truth_dir : the folder (``<raw_dir>_truth``).
    shape : (H, W) raw frame of the section.
    celltypes : the dataset's class names in id order (index 0 = background).
    rows_in_file : (n,) row of every kept spot in the raw spots file (``spots.npz['row_in_file']``); the truth spot
        table has the raw file's rows in the same order.
    genes, spot_gene : when given, the truth rows are checked to hold the same genes as the spots (a truth folder of
        another section is an error, not a silent mismatch).
    """
    truth_dir = Path(truth_dir)
    fix = "re-run --step_name=simulate to re-create the truth folder"
    instance = _read_mask(truth_dir / TruthFiles.INSTANCE_MASK, shape, fix)
    cells = _read_csv(truth_dir / TruthFiles.CELLS, ("cell", "celltype"), "the true cell table")
    class_of = {name: i for i, name in enumerate(celltypes)}
    unknown = sorted(set(cells["celltype"].astype(str)) - set(class_of))
    if unknown:
        raise DataError(f"{truth_dir / TruthFiles.CELLS}: cell type(s) {', '.join(unknown[:5])} are not in the "
                        f"dataset's metadata; the truth folder does not belong to this dataset")
    celltype = B.celltype_mask(instance, cells["cell"].to_numpy(np.int64),
                               cells["celltype"].astype(str).map(class_of).to_numpy(np.int32))
    spots = _read_csv(truth_dir / TruthFiles.SPOTS, ("gene", "cell"), "the true spot table")
    rows = np.asarray(rows_in_file, np.int64)
    if rows.size and rows.max() >= len(spots):
        raise DataError(f"{truth_dir / TruthFiles.SPOTS} has {len(spots)} rows but the section's spots file has at "
                        f"least {rows.max() + 1}; the truth folder does not belong to this section")
    if genes is not None and spot_gene is not None:
        named = np.asarray(genes, dtype=object)[np.asarray(spot_gene)]
        if not np.array_equal(spots["gene"].astype(str).to_numpy()[rows], named.astype(str)):
            raise DataError(f"{truth_dir / TruthFiles.SPOTS}: its genes differ from the section's spots row by row; "
                            "the truth folder does not belong to this section")
    return Truth(instance=instance, celltype=celltype, spot_cell=spots["cell"].to_numpy(np.int64)[rows])


def _markers_reference(truth_dir: Path) -> pd.DataFrame | None:
    """The simulated expression table (type x gene rates) as a reference profile, when the truth folder has one."""
    path = truth_dir / TruthFiles.MARKERS
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    if not {"celltype", "gene", "rate"} <= set(table.columns):
        return None
    return table.pivot(index="gene", columns="celltype", values="rate").astype(np.float64)


# ------------------------------------------------------------------------------------------------ the CLI step
def _raw_dirs(raw_dir: str | None, paths: Paths, metadata: DatasetMetadata) -> list[Path]:
    """Candidate raw folders, most specific first: --raw_dir, the one preprocessing recorded, the default path."""
    out = []
    if raw_dir:
        out.append(Path(raw_dir))
    if metadata.raw_dir:
        out.append(Path(metadata.raw_dir))
    out.append(Path(paths.raw_dir))
    return out


def _truth_dir(cfg: EvaluateConfig, raw_dirs: list[Path]) -> Path | None:
    if cfg.truth_dir:
        path = Path(cfg.truth_dir)
        if not (path / TruthFiles.INSTANCE_MASK).is_file():
            raise InputNotFoundError(f"--truth_dir {path}: no {TruthFiles.INSTANCE_MASK} there; give the folder that "
                                     "--step_name=simulate wrote beside the raw section (<raw_dir>_truth)")
        return path
    for raw in raw_dirs:
        candidate = raw.with_name(raw.name + TRUTH_SUFFIX)
        if (candidate / TruthFiles.INSTANCE_MASK).is_file():
            return candidate
    return None


def _pciseq_assignment(raw_dirs: list[Path], metadata: DatasetMetadata, rows_in_file: np.ndarray, *,
                       column: str = PCISEQ_COLUMN) -> np.ndarray | None:
    """pciSeq's spot -> cell assignment (``column`` ``pciseq_cell``; or its ``pciseq_prob``) from the raw spots file,
    when it has that column."""
    name = metadata.source_file("spots")
    for raw in raw_dirs:
        # the file preprocessing read (by name); only without that record, the one spots file of the folder
        hits = [raw / name] if name else sorted(raw.glob(RawFiles.SPOTS))
        if len(hits) != 1 or not hits[0].is_file():
            continue
        header = pd.read_csv(hits[0], nrows=0).columns
        if column not in header:
            return None
        values = pd.read_csv(hits[0], usecols=[column])[column].to_numpy()
        if rows_in_file.size and rows_in_file.max() >= values.size:
            log.warning("%s has fewer rows than the preprocessed spots; pciSeq row skipped", hits[0])
            return None
        values = np.nan_to_num(values.astype(np.float64), nan=0)
        return (values if column != PCISEQ_COLUMN else values.astype(np.int64))[rows_in_file]
    return None


def _celltypes_lut(results: Path, celltypes: list[str]) -> np.ndarray | None:
    """Map the run's class ids (``celltypes.csv``) onto the dataset's; None when they agree or the file is absent."""
    path = results / ResultFiles.CELLTYPES
    if not path.is_file():
        return None
    table = _read_csv(path, ("id", "name"), "the class-name table of the run")
    index = {name: i for i, name in enumerate(celltypes)}
    unknown = sorted(set(table["name"].astype(str)) - set(index))
    if unknown:
        raise DataError(f"{path}: class name(s) {', '.join(unknown[:5])} are not in the dataset's metadata; the run does "
                        "not belong to this dataset")
    ids = table["id"].to_numpy(np.int64)
    lut = np.zeros(int(ids.max(initial=0)) + 1, np.int32)
    lut[ids] = table["name"].astype(str).map(index).to_numpy(np.int32)
    return None if np.array_equal(lut, np.arange(lut.size)) else lut


def _score_ranking(results: Path, truth_dir: Path | None) -> pd.DataFrame | None:
    """Score the gene rankings (attribution, differential expression, border genes) against the truth folder's
    ``markers.csv`` when both exist: precision of the top m (m = the type's markers, or the pair's for border
    genes); write the table (one row per ranking and cell type or pair)."""
    if truth_dir is None or not (truth_dir / TruthFiles.MARKERS).is_file():
        return None
    markers = pd.read_csv(truth_dir / TruthFiles.MARKERS)
    tables = []
    for source, name in (("attribution", ResultFiles.GENE_RANKING_ATTRIBUTION), ("expression", ResultFiles.GENE_RANKING)):
        if (results / name).is_file():
            table = M.ranking_marker_precision(pd.read_csv(results / name), markers)
            if not table.empty:
                tables.append(table.assign(ranking=source).reset_index().set_index(["ranking", "celltype"]))
    if (results / ResultFiles.BORDER_GENES).is_file():
        table = M.border_marker_precision(pd.read_csv(results / ResultFiles.BORDER_GENES), markers)
        if not table.empty:
            tables.append(table.assign(ranking="border").reset_index().set_index(["ranking", "celltype"]))
    if not tables:
        return None
    table = pd.concat(tables)
    write_csv(results / ResultFiles.RANKING_EVALUATION, table, index=True)
    return table


@dataclass(frozen=True)
class _Section:
    """What the evaluate step reads of a dataset: metadata, spots, nucleus types, truth and reference."""

    meta: DatasetMetadata
    spots: Spots
    rows_in_file: np.ndarray
    cell_ids: np.ndarray
    class_ids: np.ndarray
    raw_dirs: list[Path]
    truth_dir: Path | None
    truth: Truth | None
    pairs: list[tuple[str, str]] | None
    reference_name: str
    reference: pd.DataFrame | None = None

    def nucleus_types(self) -> dict[int, str]:
        """Nucleus id -> type name (the baselines' cells)."""
        names = np.asarray(self.meta.celltypes, dtype=object)
        return dict(zip(self.cell_ids.tolist(), names[self.class_ids].tolist()))


def _dataset_metadata(paths: Paths) -> DatasetMetadata:
    if read_metadata(paths.data_dir) is None:
        raise InputNotFoundError(f"{Path(paths.data_dir) / METADATA_FILE} not found; run --step_name=preprocess_CA1 "
                                 f"for --datasets_name={paths.datasets_name} first")
    return load_metadata(paths.data_dir)


def _read_evaluation_inputs(settings: Settings, paths: Paths, meta: DatasetMetadata) -> _Section:
    ecfg, data_dir = settings.evaluate, Path(paths.data_dir)
    table = load_npz(data_dir / SPOTS_TABLE, ("gene", "x", "y", "row_in_file"))
    spots = Spots(x=table["x"].astype(np.float64), y=table["y"].astype(np.float64), gene=table["gene"].astype(np.int32),
                  genes=meta.genes)
    rows_in_file = table["row_in_file"].astype(np.int64)
    cells = _read_csv(data_dir / CELLS_TABLE, ("cell", "celltype_id"), "the dataset's cell table")
    raw_dirs = _raw_dirs(settings.step.raw_dir, paths, meta)
    truth_dir = _truth_dir(ecfg, raw_dirs)
    truth = None
    if truth_dir is not None:
        truth = load_truth(truth_dir, shape=meta.raw_shape, celltypes=list(meta.celltypes), rows_in_file=rows_in_file,
                           genes=list(meta.genes), spot_gene=spots.gene)
        log.info("ground truth: %s", truth_dir)
    else:
        log.info("no ground-truth folder: metrics without truth only")
    reference, reference_name = None, ""
    if ecfg.reference_csv:
        reference, reference_name = load_reference(ecfg.reference_csv), ecfg.reference_csv
    elif truth_dir is not None:
        reference = _markers_reference(truth_dir)
        reference_name = str(truth_dir / TruthFiles.MARKERS) if reference is not None else ""
    pairs = M.exclusive_gene_pairs(reference, fraction=ecfg.mecr_fraction) if reference is not None else None
    if pairs is not None:
        in_panel = sum(a in set(meta.genes) and b in set(meta.genes) for a, b in pairs)
        log.info("MECR: %d mutually exclusive gene pairs from %s (%d with both genes in the panel)", len(pairs),
                 reference_name, in_panel)
    return _Section(meta=meta, spots=spots, rows_in_file=rows_in_file, cell_ids=cells["cell"].to_numpy(np.int64),
                    class_ids=cells["celltype_id"].to_numpy(np.int32), raw_dirs=raw_dirs, truth_dir=truth_dir,
                    truth=truth, pairs=pairs, reference_name=reference_name, reference=reference)


def _run_masks(results: Path, sec: _Section, fix: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The run's instance mask and (with a truth) its cell-type mask in the dataset's class ids."""
    meta = sec.meta
    instance = _read_mask(results / ResultFiles.INSTANCE_MASK, meta.raw_shape, fix)
    if sec.truth is None:
        return instance, None
    celltype = _read_mask(results / ResultFiles.CELLTYPE_MASK, meta.raw_shape, fix)
    lut = _celltypes_lut(results, list(meta.celltypes))
    top = int(celltype.max(initial=0))
    if top >= (meta.n_classes if lut is None else lut.size):
        raise DataError(f"{results / ResultFiles.CELLTYPE_MASK} holds class id {top}, beyond the "
                        f"{'ids of ' + ResultFiles.CELLTYPES if lut is not None else 'dataset classes'}; {fix}")
    return instance, (lut[celltype] if lut is not None else celltype)


def _run_assignment(results: Path, sec: _Section) -> np.ndarray | None:
    """The run's own spot assignment (``spots_assigned.csv`` with a ``prob`` column: the spot model's), else None."""
    path = results / ResultFiles.SPOTS
    if not path.is_file():
        return None
    table = pd.read_csv(path, usecols=lambda c: c in ("cell", "prob", "cell_mask"))
    if "prob" not in table.columns or "cell_mask" not in table.columns or len(table) != sec.spots.x.size:
        return None
    if np.array_equal(table["cell"].to_numpy(), table["cell_mask"].to_numpy()):
        return None
    return table["cell"].to_numpy(np.int64)


def _score_all(results: Path, sec: _Section, ecfg: EvaluateConfig, pixel_distance: int, fix: str) -> pd.DataFrame:
    """One row per method: the run, the baselines of its nuclei, pciSeq when the raw spots carry its assignment."""
    rows: dict[str, dict[str, float]] = {}

    nucleus_types = sec.nucleus_types()

    def score(name: str, instance: np.ndarray, celltype: np.ndarray | None, spot_cell=None, types=nucleus_types) -> None:
        t0 = time.perf_counter()
        rows[name] = score_segmentation(instance, celltype, sec.spots, truth=sec.truth, pairs=sec.pairs,
                                        n_classes=sec.meta.n_classes, pixel_distance=pixel_distance,
                                        spot_cell=spot_cell, reference=sec.reference, cell_types=types,
                                        mecr_fraction=ecfg.mecr_fraction)
        log.info("scored %s in %.1f s", name, time.perf_counter() - t0)

    masks = _run_masks(results, sec, fix)
    own = _run_assignment(results, sec)
    own_types = _run_cell_types(results)
    score(OURS, *masks, spot_cell=own, types=own_types)
    if own is not None:
        score(OURS_MASK, *masks, types=own_types)
    nuclei = _read_mask(results / ResultFiles.INITIAL_MASK, sec.meta.raw_shape, fix)
    for name, mask in B.baseline_segmentations(nuclei, sec.spots.x, sec.spots.y, sigma=sec.meta.density_sigma,
                                               radii=ecfg.radii(), density_fraction=ecfg.density_fraction):
        score(name, mask, B.celltype_mask(mask, sec.cell_ids, sec.class_ids) if sec.truth is not None else None)
    pciseq = _pciseq_assignment(sec.raw_dirs, sec.meta, sec.rows_in_file)
    if pciseq is not None:
        rows[PCISEQ] = score_assignment(pciseq, sec.spots, truth=sec.truth, pairs=sec.pairs, reference=sec.reference,
                                        cell_types=nucleus_types, mecr_fraction=ecfg.mecr_fraction)
    return _table(rows, sec.truth is not None, sec.pairs is not None)


def _run_cell_types(results: Path) -> dict[int, str] | None:
    """Cell id -> type name of the run (``cells.csv``; it lists the de novo cells the nuclei lack)."""
    path = results / ResultFiles.CELLS
    if not path.is_file():
        return None
    table = pd.read_csv(path, usecols=lambda c: c in ("cell", "celltype"))
    return dict(zip(table["cell"].tolist(), table["celltype"].astype(str).tolist())) if "celltype" in table else None


#: Expansion radii (px) of the coverage-MECR curve of the nuclei grown by each.
CURVE_RADII = tuple(range(0, 31, 2))


def expansion_curve(nuclei: np.ndarray, spots: Spots, pairs: list[tuple[str, str]], *,
                    radii: tuple[int, ...] = CURVE_RADII) -> pd.DataFrame:
    """Coverage against MECR of the nuclei expanded by each of ``radii`` (px): ``coverage, threshold (the radius),
    MECR``, the curve a spot assignment is compared with when there is no truth."""
    genes = list(spots.genes)
    nearest = B.nearest_nucleus(nuclei)
    rows = []
    for r in radii:
        cell = M.cells_at_spots(B.expand_nuclei(nuclei, r, nearest=nearest), spots.x, spots.y)
        rows.append((M.assigned_fraction(cell), float(r),
                     M.mecr(M.cell_gene_counts(cell, spots.gene, len(genes)), genes, pairs).value))
    return pd.DataFrame(rows, columns=["coverage", "threshold", "MECR"])


def coverage_curves(results: Path, sec: _Section, nuclei: np.ndarray) -> pd.DataFrame:
    """Coverage against MECR (:func:`segjointgene.evaluate.metrics.mecr_curve`): the run's spots left out from the
    lowest ``prob`` up, the nuclei expanded by :data:`CURVE_RADII`, and pciSeq's ``pciseq_prob`` when the raw spots have it.

    Returns
    -------
    DataFrame ``method, coverage, threshold, MECR`` (threshold: the probability cut, or the radius in px).
    """
    genes, gene = list(sec.spots.genes), sec.spots.gene
    parts = []
    path = results / ResultFiles.SPOTS
    table = pd.read_csv(path, usecols=lambda c: c in ("cell", "prob")) if path.is_file() else pd.DataFrame()
    if len(table) == gene.size and "prob" in table:
        parts.append(M.mecr_curve(table["cell"].to_numpy(np.int64), table["prob"].to_numpy(np.float64), gene, genes,
                                  sec.pairs).assign(method=OURS))
    parts.append(expansion_curve(nuclei, sec.spots, sec.pairs).assign(method="expansion"))
    pciseq = _pciseq_assignment(sec.raw_dirs, sec.meta, sec.rows_in_file, column="pciseq_prob")
    if pciseq is not None:
        cell = _pciseq_assignment(sec.raw_dirs, sec.meta, sec.rows_in_file)
        parts.append(M.mecr_curve(cell, pciseq, gene, genes, sec.pairs).assign(method=PCISEQ))
    curve = pd.concat(parts, ignore_index=True)
    return curve[["method", "coverage", "threshold", "MECR"]]


def _curve_notes(curve: pd.DataFrame) -> list[str]:
    """One line: the run's MECR against the expansion curve's at the same coverage (whole assignment, and at
    pciSeq's coverage when pciSeq ran)."""
    expansion = curve[curve["method"] == "expansion"]
    notes = []
    for method in (OURS, PCISEQ):
        own = curve[curve["method"] == method]
        if not len(own):
            continue
        full = own.iloc[-1]
        ref = M.interpolate_curve(expansion, float(full["coverage"]))
        notes.append(f"coverage-MECR: {method} puts {full['coverage']:.3f} of the spots in cells at MECR "
                     f"{full['MECR']:.4f}; nucleus expansion at that coverage {ref:.4f} "
                     f"({'below' if full['MECR'] < ref else 'above'} by {abs(ref - full['MECR']):.4f})")
    return notes


def run_evaluate(settings: Settings, paths: Paths) -> int:
    """``--step_name=evaluate``: score the run in ``<run_dir>/results/`` and every baseline; write
    ``results/evaluation.csv`` and print a markdown table (metrics as rows, methods as columns)."""
    start = time.perf_counter()
    ecfg, pixel_distance, results = settings.evaluate, settings.train.pixel_distance, paths.run.results
    fix = (f"run --step_name=SegJointGene (it writes {RunFolder.RESULTS}/ at the end of training) or "
           f"--step_name=export for a saved epoch, with --datasets_name={paths.datasets_name} "
           f"--net_sub_suffix={paths.run.path.name}")
    meta = _dataset_metadata(paths)
    for name in (ResultFiles.INSTANCE_MASK, ResultFiles.CELLTYPE_MASK, ResultFiles.INITIAL_MASK):
        if not (results / name).is_file():
            raise InputNotFoundError(f"{results / name} not found; {fix}")
    sec = _read_evaluation_inputs(settings, paths, meta)
    out = _score_all(results, sec, ecfg, pixel_distance, fix)
    results.mkdir(parents=True, exist_ok=True)
    write_csv(results / ResultFiles.EVALUATION, out, index=True)
    notes = [f"truth: {sec.truth_dir}" if sec.truth_dir else "truth: none (metrics without ground truth only)",
             f"cell_calling ring: {pixel_distance} px"]
    if sec.pairs is not None:
        notes.append(f"MECR: {len(sec.pairs)} exclusive gene pairs from {sec.reference_name} "
                     f"(fraction {ecfg.mecr_fraction})")
    if PCISEQ in out.index:
        notes.append("pciseq: a spot assignment without masks (spots_in_cells = fraction of spots assigned)")
    if sec.pairs is not None:
        curve = coverage_curves(results, sec, _read_mask(results / ResultFiles.INITIAL_MASK, meta.raw_shape, fix))
        write_csv(results / ResultFiles.COVERAGE_MECR, curve)
        notes += _curve_notes(curve) + [f"coverage-MECR curves -> {results / ResultFiles.COVERAGE_MECR}"]
    print(markdown_table(out))
    ranking = _score_ranking(results, sec.truth_dir)
    if ranking is not None:
        scores = ranking.groupby(level="ranking")[["precision_at_m", "chance"]].mean()
        notes.append("gene rankings vs the simulated markers, precision of the top-m genes: " + ", ".join(
            f"{src} {row.precision_at_m:.2f} (chance {row.chance:.2f})" for src, row in scores.iterrows())
            + f" -> {results / ResultFiles.RANKING_EVALUATION}")
    print("\n".join(notes))
    print(f"evaluation of {len(out)} methods in {time.perf_counter() - start:.1f} s -> {results / ResultFiles.EVALUATION}")
    return 0
