"""Segmentation metrics (layer 1.5: numpy, scipy, pandas; no torch).

Pure functions, arrays in and numbers (or small frozen dataclasses) out. They score a whole-section segmentation in
the raw pixel frame against a ground truth (simulated sections) or, without one, by its spots (real sections).

Conventions shared by every function:

* label value 0 is background, for instance masks and cell-type masks alike; instance ids are arbitrary
  non-negative integers (they need not be contiguous);
* a spot at float position ``(x, y)`` lies in pixel ``(floor(y), floor(x))`` (row, column), as everywhere in the
  project; a spot outside the frame lies in no cell (cell 0);
* spots are identified by their index in the spot table, so two spots of the same gene at the same position are two
  spots (the reference keyed spots by rounded position and gene and merged such duplicates: REFERENCE.md §16.4).

Ground-truth metrics (SPEC §6): :func:`celltype_scores` (pixel mIoU / Dice of cell types),
:func:`instance_overlap` + :func:`match_instances` + :func:`detection_scores` (instance precision / recall / F1 / AP),
:func:`gene_miou` (REFERENCE.md §13.5) and :func:`spot_accuracy`. Metrics without truth:
:func:`cell_calling_score` (REFERENCE.md §13.4), :func:`assigned_fraction` and :func:`mecr`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse
from scipy import ndimage

from ..constants import BACKGROUND

log = logging.getLogger(__name__)

__all__ = [
    "CellCalling",
    "ClassScores",
    "DetectionScores",
    "GeneIoU",
    "InstanceOverlap",
    "MECR",
    "Matching",
    "SpotAccuracy",
    "assigned_fraction",
    "calibration_error",
    "cell_calling_score",
    "cell_gene_counts",
    "cells_at_spots",
    "celltype_scores",
    "class_scores",
    "confusion_matrix",
    "detection_scores",
    "exclusive_gene_pairs",
    "gene_miou",
    "instance_overlap",
    "interpolate_curve",
    "label_areas",
    "match_instances",
    "mecr",
    "mecr_curve",
    "negative_marker_purity",
    "reliability",
    "spot_accuracy",
]

#: Pixels per block of the chunked pixel loops (bounds the temporary memory on whole-section masks).
_BLOCK_PX = 1 << 22
#: Denominator guard of the cell-calling score (reference §13.4).
_EPS = 1e-6


# ------------------------------------------------------------------------------------------------ validation
def _check_label_image(name: str, image: np.ndarray, ndim: int = 2) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D label image; got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.integer) or image.dtype == bool):
        raise TypeError(f"{name} has dtype {image.dtype}; integer labels are needed (e.g. image.astype(np.uint32))")
    if image.size and np.issubdtype(image.dtype, np.signedinteger) and image.min() < 0:
        raise ValueError(f"{name} has negative labels (min {image.min()}); labels are >= 0 with 0 = background")
    return image


def _check_same_shape(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {a.shape} but {b_name} has {b.shape}; both must share one pixel frame")


def _check_spots(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spot coordinates x and y differ in length ({x.size} vs {y.size})")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spot coordinates contain NaN or infinite values")
    return x, y


# ------------------------------------------------------------------------------------------------ spots -> cells
def cells_at_spots(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Label of the pixel under every spot.

    Parameters
    ----------
    mask : (H, W) integer ndarray, 0 = background.
    x, y : (n,) float arrays, spot positions in pixels (x = column, y = row); the spot lies in pixel
        ``(floor(y), floor(x))``.

    Returns
    -------
    (n,) int64 ndarray: the label under each spot; 0 for spots outside the frame.

    Examples
    --------
    >>> m = np.array([[0, 7], [3, 3]], np.uint32)
    >>> cells_at_spots(m, np.array([1.9, 0.2, 5.0]), np.array([0.5, 1.0, 0.0])).tolist()
    [7, 3, 0]
    """
    mask = _check_label_image("mask", mask)
    x, y = _check_spots(x, y)
    rows = np.floor(y).astype(np.int64)
    cols = np.floor(x).astype(np.int64)
    inside = (rows >= 0) & (cols >= 0) & (rows < mask.shape[0]) & (cols < mask.shape[1])
    out = np.zeros(x.size, np.int64)
    out[inside] = mask[rows[inside], cols[inside]]
    return out


# ------------------------------------------------------------------------------------------------ cell types
def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int, *, where: np.ndarray | None = None) -> np.ndarray:
    """Pixel confusion matrix by bincount (rows = truth class, columns = predicted class).

    Parameters
    ----------
    truth, pred : integer ndarrays of one shape, class ids in ``0 .. n_classes - 1`` (0 = background).
    n_classes : number of classes K, background included.
    where : optional boolean ndarray of the same shape; only these pixels are counted.

    Returns
    -------
    (K, K) int64 ndarray; ``hist[g, p]`` = number of pixels of truth class g predicted as p.

    Raises
    ------
    ValueError : shapes differ, or a class id is outside ``0 .. n_classes - 1``.

    Examples
    --------
    >>> confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3).tolist()
    [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    _check_same_shape("truth", truth, "pred", pred)
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1; got {n_classes}")
    for name, a in (("truth", truth), ("pred", pred)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} holds class ids {a.min()}..{a.max()} outside 0..{n_classes - 1}; "
                             "pass the number of classes including background as n_classes")
    t, p = truth.ravel(), pred.ravel()
    w = None if where is None else np.asarray(where, bool).ravel()
    if w is not None and w.size != t.size:
        raise ValueError(f"where has {w.size} pixels but truth has {t.size}")
    hist = np.zeros(n_classes * n_classes, np.int64)
    for start in range(0, t.size, _BLOCK_PX):  # chunked: bounded temporaries on whole-section masks
        sl = slice(start, start + _BLOCK_PX)
        code = t[sl].astype(np.int64) * n_classes + p[sl]
        if w is not None:
            code = code[w[sl]]
        hist += np.bincount(code, minlength=n_classes * n_classes)
    return hist.reshape(n_classes, n_classes)


@dataclass(frozen=True)
class ClassScores:
    """Per-class and mean IoU / Dice over the foreground classes.

    Attributes
    ----------
    miou, mdice : means over foreground classes (1..K-1) whose denominator is > 0; NaN when there is none.
    iou, dice : (K,) float64, per class (NaN where the denominator is 0); index 0 (background) is included for
        reference but never enters the means.
    """

    miou: float
    mdice: float
    iou: np.ndarray
    dice: np.ndarray


def class_scores(hist: np.ndarray) -> ClassScores:
    """IoU and Dice per class from a confusion matrix; means over the foreground classes 1..K-1.

    ``IoU_c = hist[c, c] / (row_c + col_c - hist[c, c])`` and ``Dice_c = 2 hist[c, c] / (row_c + col_c)``
    (reference §13.2-13.3). A class absent from both truth and prediction has an undefined score and is left out of
    the means; when every foreground class is absent the means are NaN.

    Examples
    --------
    >>> s = class_scores(np.array([[5, 1, 0], [0, 3, 1], [0, 0, 2]]))
    >>> round(s.miou, 4), round(s.mdice, 4)  # class 1: 3/5, class 2: 2/3
    (0.6333, 0.775)
    """
    hist = np.asarray(hist, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
        raise ValueError(f"hist must be a square (K, K) confusion matrix; got shape {hist.shape}")
    diag = np.diag(hist)
    total = hist.sum(0) + hist.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(total - diag > 0, diag / (total - diag), np.nan)
        dice = np.where(total > 0, 2 * diag / total, np.nan)
    fg_iou, fg_dice = iou[1:], dice[1:]
    miou = float(np.nanmean(fg_iou)) if np.isfinite(fg_iou).any() else float("nan")
    mdice = float(np.nanmean(fg_dice)) if np.isfinite(fg_dice).any() else float("nan")
    return ClassScores(miou=miou, mdice=mdice, iou=iou, dice=dice)


def celltype_scores(truth: np.ndarray, pred: np.ndarray, n_classes: int, *,
                    truth_foreground_only: bool = False) -> ClassScores:
    """Pixel mIoU and Dice of cell types (mean over the foreground classes 1..K-1).

    Parameters
    ----------
    truth, pred : (H, W) integer ndarrays of class ids, 0 = background.
    n_classes : K, background included.
    truth_foreground_only : count only pixels with ``truth > 0`` (the reference's "global mIoU", §13.3). It then
        ignores foreground predicted on true background, so growth into empty tissue costs nothing. The default counts
        every pixel: a foreground class predicted on true background enlarges that class's union and lowers its
        score.

    Examples
    --------
    >>> t = np.array([[1, 1, 0, 0]]); p = np.array([[1, 1, 1, 1]])
    >>> celltype_scores(t, p, 2).miou, celltype_scores(t, p, 2, truth_foreground_only=True).miou
    (0.5, 1.0)
    """
    where = np.asarray(truth) > BACKGROUND if truth_foreground_only else None
    return class_scores(confusion_matrix(truth, pred, n_classes, where=where))


# ------------------------------------------------------------------------------------------------ instances
@dataclass(frozen=True)
class InstanceOverlap:
    """Sparse overlap table of two instance masks.

    Attributes
    ----------
    pred_labels, pred_area : (n_pred,) int64, the predicted ids present (> 0, ascending) and their pixel counts.
    truth_labels, truth_area : (n_truth,) int64, the same for the truth.
    pair_pred, pair_truth : (n_pairs,) int64, ids of every (pred, truth) pair that shares at least one pixel.
    intersection : (n_pairs,) int64, shared pixels of each pair.
    iou : (n_pairs,) float64, ``intersection / (area_pred + area_truth - intersection)``.
    """

    pred_labels: np.ndarray
    pred_area: np.ndarray
    truth_labels: np.ndarray
    truth_area: np.ndarray
    pair_pred: np.ndarray
    pair_truth: np.ndarray
    intersection: np.ndarray
    iou: np.ndarray


def label_areas(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids > 0 present in a label image (ascending) and their pixel counts.

    Parameters
    ----------
    mask : (H, W) integer ndarray, 0 = background.

    Returns
    -------
    ids, areas : (n,) int64 arrays.

    Examples
    --------
    >>> [a.tolist() for a in label_areas(np.array([[0, 9, 9], [2, 0, 9]]))]
    [[2, 9], [1, 3]]
    """
    mask = _check_label_image("mask", mask)
    flat = mask.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= max(1 << 20, 4 * flat.size):  # a dense count is cheaper than sorting
        counts = np.bincount(flat, minlength=top + 1) if flat.size else np.zeros(1, np.int64)
        ids = np.flatnonzero(counts)
        ids = ids[ids != BACKGROUND]
        return ids.astype(np.int64), counts[ids].astype(np.int64)
    ids, counts = np.unique(flat, return_counts=True)
    keep = ids != BACKGROUND
    return ids[keep].astype(np.int64), counts[keep].astype(np.int64)


def _compact(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each of ``values`` in the sorted ``ids`` (all values are present in ``ids``), as int64."""
    top = int(ids[-1]) if ids.size else 0
    if top <= max(1 << 20, 4 * values.size):  # a lookup table is O(n); searchsorted is O(n log n)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(ids.size)
        return lut[values]
    return np.searchsorted(ids, values).astype(np.int64)


def instance_overlap(pred: np.ndarray, truth: np.ndarray) -> InstanceOverlap:
    """IoU of every overlapping (predicted, true) instance pair, from a sparse joint histogram.

    Only pixels where both masks are foreground are paired, and pairs are counted by sorting their codes, so memory
    scales with the overlapping pixels, never with ``n_pred x n_truth`` (10^4 cells on a 5000 x 7600 frame take about
    a second).

    Parameters
    ----------
    pred, truth : (H, W) integer ndarrays, instance ids, 0 = background.

    Returns
    -------
    InstanceOverlap

    Examples
    --------
    >>> p = np.array([[1, 1, 0], [2, 2, 2]]); t = np.array([[5, 5, 5], [0, 6, 6]])
    >>> ov = instance_overlap(p, t)
    >>> ov.pair_pred.tolist(), ov.pair_truth.tolist(), ov.iou.round(3).tolist()
    ([1, 2], [5, 6], [0.667, 0.667])
    """
    pred = _check_label_image("pred", pred)
    truth = _check_label_image("truth", truth)
    _check_same_shape("pred", pred, "truth", truth)
    p_ids, p_area = label_areas(pred)
    t_ids, t_area = label_areas(truth)
    n_t = max(t_ids.size, 1)
    run_codes, run_lengths = [], []
    p_flat, t_flat = pred.ravel(), truth.ravel()
    for start in range(0, p_flat.size, _BLOCK_PX):
        sl = slice(start, start + _BLOCK_PX)
        both = (p_flat[sl] != BACKGROUND) & (t_flat[sl] != BACKGROUND)
        p = _compact(p_flat[sl][both], p_ids)  # compact indices: no overflow for any ids
        t = _compact(t_flat[sl][both], t_ids)
        code = p * n_t + t
        # run-length encode along raster order first: neighbouring pixels share their pair, so the sort below sees
        # about one entry per cell crossing per row instead of one per pixel
        starts = np.flatnonzero(np.concatenate([[True], code[1:] != code[:-1]])) if code.size else np.zeros(0, np.int64)
        run_codes.append(code[starts])
        run_lengths.append(np.diff(np.append(starts, code.size)))
    all_codes = np.concatenate(run_codes) if run_codes else np.zeros(0, np.int64)
    code, inverse = np.unique(all_codes, return_inverse=True)
    inter = np.bincount(inverse.ravel(), weights=np.concatenate(run_lengths) if run_lengths else None,
                        minlength=code.size).astype(np.int64)
    pi, ti = np.divmod(code, n_t)
    union = p_area[pi] + t_area[ti] - inter
    return InstanceOverlap(pred_labels=p_ids, pred_area=p_area, truth_labels=t_ids, truth_area=t_area,
                           pair_pred=p_ids[pi], pair_truth=t_ids[ti], intersection=inter.astype(np.int64),
                           iou=inter / np.maximum(union, 1))


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of predicted to true instances.

    Attributes
    ----------
    pred, truth : (n_matched,) int64, ids of the matched pairs, in order of decreasing IoU.
    iou : (n_matched,) float64 mask IoU of each matched pair.
    n_pred, n_truth : number of predicted and true instances (ids present in each mask).
    """

    pred: np.ndarray
    truth: np.ndarray
    iou: np.ndarray
    n_pred: int
    n_truth: int


def match_instances(overlap: InstanceOverlap) -> Matching:
    """Greedy one-to-one matching in order of decreasing mask IoU (reference §13.5); every pair with IoU > 0 is eligible.

    Ties are broken by the smaller predicted id, then the smaller true id, so the result is deterministic. Any pair with
    IoU > 0.5 is the best partner of both of its members, so greedy and optimal (Hungarian) matching agree on every
    pair above 0.5; below 0.5 greedy may pair suboptimally.

    Examples
    --------
    >>> p = np.array([[1, 1, 1, 1]]); t = np.array([[4, 4, 4, 9]])   # one cell over two true cells
    >>> m = match_instances(instance_overlap(p, t))
    >>> m.pred.tolist(), m.truth.tolist(), m.iou.tolist(), m.n_pred, m.n_truth
    ([1], [4], [0.75], 1, 2)
    """
    order = np.lexsort((overlap.pair_truth, overlap.pair_pred, -overlap.iou))
    used_p: set[int] = set()
    used_t: set[int] = set()
    keep = []
    for k in order.tolist():
        if overlap.iou[k] <= 0:
            break
        p, t = int(overlap.pair_pred[k]), int(overlap.pair_truth[k])
        if p in used_p or t in used_t:
            continue
        used_p.add(p)
        used_t.add(t)
        keep.append(k)
    keep_a = np.asarray(keep, dtype=np.int64)
    return Matching(pred=overlap.pair_pred[keep_a], truth=overlap.pair_truth[keep_a], iou=overlap.iou[keep_a],
                    n_pred=int(overlap.pred_labels.size), n_truth=int(overlap.truth_labels.size))


@dataclass(frozen=True)
class DetectionScores:
    """Instance detection scores at one IoU threshold.

    Attributes
    ----------
    threshold : the IoU a matched pair needs to count as a true positive (``iou >= threshold``).
    tp, fp, fn : true positives (matched pairs at or above the threshold), false positives (other predictions),
        false negatives (other true instances).
    precision, recall, f1 : ``tp / n_pred``, ``tp / n_truth``, ``2 tp / (n_pred + n_truth)``.
    ap : ``tp / (tp + fp + fn)``: the "average precision" of cellpose ``metrics.average_precision`` and of the
        StarDist / DSB 2018 evaluations (a Jaccard of the detections), not the area under a precision-recall curve.

    With no predicted and no true instance every score is 1.0; otherwise an empty denominator gives 0.0.
    """

    threshold: float
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    ap: float


def detection_scores(matching: Matching, threshold: float) -> DetectionScores:
    """Precision, recall, F1 and AP of a matching at an IoU threshold.

    Examples
    --------
    >>> m = Matching(np.array([1, 2]), np.array([1, 2]), np.array([0.9, 0.6]), n_pred=3, n_truth=2)
    >>> s = detection_scores(m, 0.75)
    >>> s.tp, s.fp, s.fn, round(s.f1, 3), round(s.ap, 3)
    (1, 2, 1, 0.4, 0.25)
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]; got {threshold}")
    tp = int((matching.iou >= threshold).sum())
    fp, fn = matching.n_pred - tp, matching.n_truth - tp
    if matching.n_pred == 0 and matching.n_truth == 0:
        return DetectionScores(threshold, 0, 0, 0, 1.0, 1.0, 1.0, 1.0)

    def ratio(a: int, b: int) -> float:
        return a / b if b > 0 else 0.0

    return DetectionScores(threshold=threshold, tp=tp, fp=fp, fn=fn, precision=ratio(tp, matching.n_pred),
                           recall=ratio(tp, matching.n_truth), f1=ratio(2 * tp, matching.n_pred + matching.n_truth),
                           ap=ratio(tp, tp + fp + fn))


# ------------------------------------------------------------------------------------------------ spot-based truth metrics
@dataclass(frozen=True)
class GeneIoU:
    """Gene mIoU: Jaccard of the spot sets of matched cells (SPEC §6, reference §13.5).

    Attributes
    ----------
    mean : mean Jaccard over the matched pairs (reference definition: unmatched cells are not penalised, so a method
        that finds only its easy cells is not punished for the rest). 0.0 when nothing is matched (1.0 when both
        masks are empty).
    penalised : the sum of the matched Jaccards divided by the number of true cells, i.e. every unmatched true cell
        counts 0. Merges (a true cell left without a partner) and missed cells lower it; the mean does not see them.
    jaccard : (n_pairs,) float64, per matched pair, in the order of the matching.
    n_pairs, n_truth : matched pairs and true cells.
    """

    mean: float
    penalised: float
    jaccard: np.ndarray
    n_pairs: int
    n_truth: int


def _lookup_counts(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How often each of ``ids`` occurs in ``values``."""
    uniq, counts = np.unique(values, return_counts=True)
    if uniq.size == 0:
        return np.zeros(ids.size, np.int64)
    pos = np.minimum(np.searchsorted(uniq, ids), uniq.size - 1)
    return np.where(uniq[pos] == ids, counts[pos], 0).astype(np.int64)


def gene_miou(pred_spot_cell: np.ndarray, truth_spot_cell: np.ndarray, matching: Matching) -> GeneIoU:
    """Per matched cell pair, the Jaccard index of the two sets of spots; mean over pairs, and a penalised variant.

    The spot set of a cell is the set of spot indices whose cell is that id (cell 0 = no cell, never a set). In the
    reference definition both sets come from the masks (the spot's pixel in the predicted and in the true instance
    mask); pass ``cells_at_spots(mask, x, y)`` for each. A pair whose two sets are both empty scores 1.

    Parameters
    ----------
    pred_spot_cell, truth_spot_cell : (n_spots,) integer arrays, the predicted and the true cell of every spot.
    matching : the instance matching (usually by mask IoU, :func:`match_instances`).

    Returns
    -------
    GeneIoU

    Examples
    --------
    >>> m = Matching(np.array([1, 2]), np.array([1, 2]), np.array([0.8, 0.5]), n_pred=2, n_truth=3)
    >>> g = gene_miou(np.array([1, 1, 2, 2, 0]), np.array([1, 1, 1, 2, 3]), m)
    >>> g.jaccard.tolist(), g.mean, round(g.penalised, 3)   # cell 1: {0,1} vs {0,1,2}; cell 2: {2,3} vs {3}
    ([0.6666666666666666, 0.5], 0.5833333333333333, 0.389)
    """
    p = np.asarray(pred_spot_cell).astype(np.int64, copy=False).ravel()
    t = np.asarray(truth_spot_cell).astype(np.int64, copy=False).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred_spot_cell has {p.size} spots but truth_spot_cell has {t.size}")
    n_pairs = int(matching.pred.size)
    if n_pairs == 0:
        empty = matching.n_truth == 0 and matching.n_pred == 0
        return GeneIoU(mean=1.0 if empty else 0.0, penalised=1.0 if empty else 0.0, jaccard=np.zeros(0),
                       n_pairs=0, n_truth=matching.n_truth)
    size_p = _lookup_counts(matching.pred, p[p != BACKGROUND])
    size_t = _lookup_counts(matching.truth, t[t != BACKGROUND])
    both = (p != BACKGROUND) & (t != BACKGROUND)
    # joint code of each spot's (pred index, truth id): pairs are looked up among the matched ones only
    pair_code = {(a, b): i for i, (a, b) in enumerate(zip(matching.pred.tolist(), matching.truth.tolist()))}
    inter = np.zeros(n_pairs, np.int64)
    if both.any():
        pairs, counts = np.unique(np.stack([p[both], t[both]], 1), axis=0, return_counts=True)
        for (a, b), c in zip(pairs.tolist(), counts.tolist()):
            i = pair_code.get((a, b))
            if i is not None:
                inter[i] = c
    union = size_p + size_t - inter
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return GeneIoU(mean=float(jac.mean()), penalised=float(jac.sum() / max(matching.n_truth, n_pairs)),
                   jaccard=jac, n_pairs=n_pairs, n_truth=matching.n_truth)


@dataclass(frozen=True)
class SpotAccuracy:
    """Spot-assignment accuracy.

    Attributes
    ----------
    overall : fraction of all spots whose predicted cell equals the true cell (0 for background noise).
    cell_spots : the same over spots whose true cell is > 0 (NaN when there is none).
    noise_spots : over background-noise spots (true cell 0): the fraction left unassigned (NaN when there is none).
    n_cell_spots, n_noise_spots : the counts behind the two partial accuracies.
    """

    overall: float
    cell_spots: float
    noise_spots: float
    n_cell_spots: int
    n_noise_spots: int


def spot_accuracy(pred_cell: np.ndarray, true_cell: np.ndarray) -> SpotAccuracy:
    """Fraction of spots assigned to their true cell (REFERENCE.md §13.7 proposes it; no version implements it).

    Predicted and true ids must share one id space; in this project both are the nucleus ids (``cell`` of the
    section), so no matching is needed.

    Parameters
    ----------
    pred_cell, true_cell : (n_spots,) integer arrays, 0 = no cell / background noise.

    Examples
    --------
    >>> a = spot_accuracy(np.array([1, 2, 0, 0, 3]), np.array([1, 1, 0, 2, 0]))
    >>> a.overall, a.cell_spots, a.noise_spots
    (0.4, 0.3333333333333333, 0.5)
    """
    p = np.asarray(pred_cell).ravel()
    t = np.asarray(true_cell).ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred_cell has {p.size} spots but true_cell has {t.size}")
    ok = p == t
    cell = t != BACKGROUND
    n_cell, n_noise = int(cell.sum()), int((~cell).sum())
    return SpotAccuracy(overall=float(ok.mean()) if ok.size else float("nan"),
                        cell_spots=float(ok[cell].mean()) if n_cell else float("nan"),
                        noise_spots=float(ok[~cell].mean()) if n_noise else float("nan"),
                        n_cell_spots=n_cell, n_noise_spots=n_noise)


# ------------------------------------------------------------------------------------------------ metrics without truth
@dataclass(frozen=True)
class CellCalling:
    """Cell-calling score and its counts.

    Attributes
    ----------
    score : ``n_inside / (n_ring + 1e-6)`` (reference §13.4); NaN (undefined) when the ring holds no spot.
    n_inside : spots on foreground pixels (mask > 0).
    n_ring : spots on the ring: background pixels within ``pixel_distance`` (Chebyshev) of the foreground.
    """

    score: float
    n_inside: int
    n_ring: int


def cell_calling_score(mask: np.ndarray, x: np.ndarray, y: np.ndarray, pixel_distance: int) -> CellCalling:
    """Spots inside cells relative to spots on a ring just outside them (reference §13.4).

    inside = ``mask > 0``; ring = binary dilation of inside by a ``(2d+1) x (2d+1)`` square, minus inside;
    score = spots inside / (spots on the ring + 1e-6). High when the cells contain the spots and their borders sit
    where spots become sparse; it rewards growth only while the grown area holds more spots than the ring it pushes
    outward.

    When the ring holds no spot the score is undefined and returned as NaN. The reference returns 0 there, which
    ranks a segmentation that leaves no spot near its borders (e.g. cells filling a dense tissue) below every other;
    ``n_inside / 1e-6`` would be just as meaningless the other way. Read ``n_inside`` and ``n_ring`` then.

    Parameters
    ----------
    mask : (H, W) integer ndarray (instance or class ids), 0 = background.
    x, y : (n,) float spot positions (pixel ``(floor(y), floor(x))``); spots outside the frame count nowhere.
    pixel_distance : ring width d >= 1 in pixels.

    Examples
    --------
    >>> m = np.zeros((7, 7), np.uint32); m[3, 3] = 1
    >>> c = cell_calling_score(m, np.array([3.5, 3.2, 4.5, 6.5]), np.array([3.5, 3.9, 4.5, 6.5]), 1)
    >>> c.n_inside, c.n_ring, round(c.score, 3)
    (2, 1, 2.0)
    """
    mask = _check_label_image("mask", mask)
    x, y = _check_spots(x, y)
    if pixel_distance < 1:
        raise ValueError(f"pixel_distance must be >= 1; got {pixel_distance}")
    inside = mask != BACKGROUND
    # a rectangular maximum filter is separable (two 1-D passes): fast on whole-section masks
    grown = ndimage.maximum_filter(inside.view(np.uint8), size=2 * pixel_distance + 1, mode="constant", cval=0)
    ring = (grown != 0) & ~inside
    at = cells_at_spots(inside.view(np.uint8), x, y) != 0
    rows = np.floor(y).astype(np.int64)
    cols = np.floor(x).astype(np.int64)
    ok = (rows >= 0) & (cols >= 0) & (rows < mask.shape[0]) & (cols < mask.shape[1])
    on_ring = np.zeros(x.size, bool)
    on_ring[ok] = ring[rows[ok], cols[ok]]
    n_in, n_ring = int(at.sum()), int(on_ring.sum())
    return CellCalling(score=n_in / (n_ring + _EPS) if n_ring > 0 else float("nan"), n_inside=n_in, n_ring=n_ring)


def noise_left_out(pred_cell: np.ndarray, true_cell: np.ndarray, true_cell_at_pixel: np.ndarray) -> float:
    """Fraction of the noise spots (true cell 0) lying outside every true cell that are left unassigned (NaN if
    there are none): background kept as background.

    >>> noise_left_out(np.array([0, 3, 0, 2]), np.array([0, 0, 0, 2]), np.array([0, 0, 1, 2]))
    0.5
    """
    sel = (np.asarray(true_cell) == BACKGROUND) & (np.asarray(true_cell_at_pixel) == BACKGROUND)
    return float((np.asarray(pred_cell)[sel] == BACKGROUND).mean()) if sel.any() else float("nan")


def reliability(prob: np.ndarray, right: np.ndarray, edges=(0.0, 0.5, 0.7, 0.9, 0.97, 1.0)) -> pd.DataFrame:
    """Reliability table of per-spot probabilities: per bin ``[edges[i], edges[i+1])`` (the last one closed), the
    spots, their mean probability and the fraction of them that is right.

    >>> p, right = np.array([.6, .6, .95, .99]), np.array([1, 0, 1, 1])
    >>> reliability(p, right, edges=(.5, .9, 1))  # doctest: +NORMALIZE_WHITESPACE
                spots  mean_prob  fraction_right
    bin
    [0.5, 0.9)      2       0.60             0.5
    [0.9, 1]        2       0.97             1.0
    """
    prob, right = np.asarray(prob, np.float64), np.asarray(right, bool)
    edges = np.asarray(edges, np.float64)
    which = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, edges.size - 2)
    rows = {}
    for i in range(edges.size - 1):
        sel = which == i
        name = f"[{edges[i]:g}, {edges[i + 1]:g}{']' if i == edges.size - 2 else ')'}"
        rows[name] = {"spots": int(sel.sum()), "mean_prob": float(prob[sel].mean()) if sel.any() else float("nan"),
                      "fraction_right": float(right[sel].mean()) if sel.any() else float("nan")}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("bin")


def calibration_error(prob: np.ndarray, right: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of per-spot probabilities: over ``n_bins`` equal-width bins, the spot-weighted
    mean of ``|fraction right - mean probability|``.

    >>> round(calibration_error(np.array([0.9, 0.9, 0.6, 0.6]), np.array([1, 0, 1, 0])), 3)  # (0.4 + 0.1) / 2
    0.25
    """
    prob, right = np.asarray(prob, np.float64), np.asarray(right, np.float64)
    which = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    n = np.bincount(which, minlength=n_bins)
    gap = np.abs(np.bincount(which, right, n_bins) - np.bincount(which, prob, n_bins))
    return float(gap.sum() / max(n.sum(), 1))


def assigned_fraction(spot_cell: np.ndarray) -> float:
    """Fraction of spots assigned to a cell (cell id > 0).

    This is the mask-free counterpart of cell calling for methods that assign spots without drawing a mask (e.g.
    pciSeq's ``pciseq_cell``). It is **not** the cell-calling score: it has no ring and no notion of a border, and it
    can be pushed to 1 by assigning every spot. For a mask, pass ``cells_at_spots(mask, x, y)`` to get the fraction of
    spots that fall inside cells, which is comparable across masks and assignments.

    Examples
    --------
    >>> assigned_fraction(np.array([0, 3, 3, 5]))
    0.75
    """
    c = np.asarray(spot_cell).ravel()
    return float((c != BACKGROUND).mean()) if c.size else float("nan")


def cell_gene_counts(spot_cell: np.ndarray, spot_gene: np.ndarray, n_genes: int, *,
                     cell_ids: np.ndarray | None = None) -> scipy.sparse.csr_matrix:
    """Cell x gene spot counts.

    Parameters
    ----------
    spot_cell : (n,) integer array, cell of each spot (0 = none; those spots are ignored).
    spot_gene : (n,) integer array, gene channel of each spot in ``0 .. n_genes - 1``.
    n_genes : number of genes G.
    cell_ids : the rows, in this order (cells without spots give zero rows; spots of other cells are ignored);
        default: every cell that holds a spot, ids ascending.

    Returns
    -------
    (n_cells, G) int64 CSR matrix.

    Examples
    --------
    >>> cell_gene_counts(np.array([2, 2, 0, 7]), np.array([0, 1, 1, 1]), 2).toarray().tolist()
    [[1, 1], [0, 1]]
    >>> cell_gene_counts(np.array([2, 2, 0, 7]), np.array([0, 1, 1, 1]), 2, cell_ids=np.array([7, 2, 5])).toarray().tolist()
    [[0, 1], [1, 1], [0, 0]]
    """
    c = np.asarray(spot_cell).astype(np.int64, copy=False).ravel()
    g = np.asarray(spot_gene).astype(np.int64, copy=False).ravel()
    if c.shape != g.shape:
        raise ValueError(f"spot_cell has {c.size} spots but spot_gene has {g.size}")
    if g.size and (g.min() < 0 or g.max() >= n_genes):
        raise ValueError(f"spot_gene holds channels {g.min()}..{g.max()} outside 0..{n_genes - 1}")
    if cell_ids is None:
        keep = c != BACKGROUND
        cells, row = np.unique(c[keep], return_inverse=True)
    else:
        cells = np.asarray(cell_ids, np.int64)
        row_of = np.full(int(max(cells.max(initial=0), c.max(initial=0))) + 1, -1, np.int64)
        row_of[cells] = np.arange(cells.size)
        row = row_of[np.maximum(c, 0)]
        keep = (c != BACKGROUND) & (row >= 0)
        row = row[keep]
    data = np.ones(int(keep.sum()), np.int64)
    return scipy.sparse.csr_matrix((data, (row, g[keep])), shape=(cells.size, n_genes))


def exclusive_gene_pairs(profile: pd.DataFrame, *, fraction: float = 0.1) -> list[tuple[str, str]]:
    """Mutually exclusive gene pairs of a cell-type x gene reference profile.

    A gene counts as *expressed* in a type when its mean expression there reaches ``fraction`` of its highest mean
    over all types. Two genes are mutually exclusive when no type expresses both, i.e. their expressed-type sets are
    disjoint. Genes that no type expresses (all zero) take part in no pair. The rule is relative per gene, so it does
    not depend on the platform's detection efficiency; a smaller ``fraction`` is stricter (fewer, cleaner pairs).

    Parameters
    ----------
    profile : DataFrame, index = gene names, one column per cell type, non-negative mean expression (e.g. the class
        means of a single-cell reference).
    fraction : in (0, 1].

    Returns
    -------
    list of (gene, gene) name pairs, each pair once, in the order of the profile's rows.

    Examples
    --------
    >>> ref = pd.DataFrame({"A": [10.0, 0.0, 5.0], "B": [0.5, 8.0, 5.0]}, index=["g1", "g2", "g3"])
    >>> exclusive_gene_pairs(ref)
    [('g1', 'g2')]
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    values = profile.to_numpy(dtype=np.float64)
    if values.size and (not np.isfinite(values).all() or values.min() < 0):
        raise ValueError("the reference profile must hold finite, non-negative expression values")
    top = values.max(axis=1) if values.size else np.zeros(len(profile))
    expressed = (values >= fraction * top[:, None]) & (top[:, None] > 0)
    shared = expressed.astype(np.int64) @ expressed.T.astype(np.int64)  # types expressing both genes
    ok = top > 0
    i, j = np.triu_indices(len(profile), 1)
    sel = (shared[i, j] == 0) & ok[i] & ok[j]
    names = [str(g) for g in profile.index]
    return [(names[a], names[b]) for a, b in zip(i[sel].tolist(), j[sel].tolist())]


@dataclass(frozen=True)
class MECR:
    """Mutually exclusive co-expression rate.

    Attributes
    ----------
    value : mean over the scored pairs of (cells expressing both genes) / (cells expressing at least one); NaN when
        no pair is scored. Lower is better: a cell that mixes spots of neighbours co-expresses exclusive markers.
    n_pairs : pairs scored (both genes in the panel and at least one cell expressing one of them).
    per_pair : DataFrame ``gene_a, gene_b, n_both, n_any, rate``.
    """

    value: float
    n_pairs: int
    per_pair: pd.DataFrame


def mecr(counts: np.ndarray | scipy.sparse.spmatrix, genes: list[str], pairs: list[tuple[str, str]], *,
         min_count: int = 1) -> MECR:
    """Mutually exclusive co-expression rate of a cell x gene count matrix.

    A cell expresses a gene when it holds at least ``min_count`` of its spots. For each pair (a, b) of mutually
    exclusive genes (:func:`exclusive_gene_pairs`), rate = #cells expressing both / #cells expressing a or b; MECR is
    the mean rate over pairs. It works from counts alone, so it scores masks (spots counted per cell with
    :func:`cell_gene_counts` of ``cells_at_spots``) and mask-free spot assignments alike. It grows with the number of
    spots per cell, so compare methods on the same section only.

    Parameters
    ----------
    counts : (n_cells, G) integer array or sparse matrix.
    genes : the G gene names of the columns.
    pairs : gene-name pairs; pairs with a gene missing from ``genes`` are skipped, and so are pairs that no cell
        expresses.
    min_count : spots a cell needs to express a gene.

    Examples
    --------
    >>> counts = np.array([[3, 0, 1], [2, 1, 0], [0, 4, 0]])   # cells x genes g1, g2, g3
    >>> r = mecr(counts, ["g1", "g2", "g3"], [("g1", "g2")])
    >>> r.value, r.per_pair[["n_both", "n_any"]].values.tolist()
    (0.3333333333333333, [[1, 3]])
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1; got {min_count}")
    index = {g: i for i, g in enumerate(genes)}
    m = scipy.sparse.csc_matrix(counts)
    if m.shape[1] != len(genes):
        raise ValueError(f"counts has {m.shape[1]} gene columns but {len(genes)} gene names were given")
    expr = (m >= min_count).astype(np.int64)  # (n_cells, G) 0/1
    n_expr = np.asarray(expr.sum(axis=0)).ravel()
    both = (expr.T @ expr).toarray() if expr.shape[0] else np.zeros((len(genes), len(genes)), np.int64)
    rows = []
    for a, b in pairs:
        if a not in index or b not in index:
            continue
        i, j = index[a], index[b]
        n_both = int(both[i, j])
        n_any = int(n_expr[i] + n_expr[j] - n_both)
        if n_any > 0:
            rows.append((a, b, n_both, n_any, n_both / n_any))
    table = pd.DataFrame(rows, columns=["gene_a", "gene_b", "n_both", "n_any", "rate"])
    return MECR(value=float(table["rate"].mean()) if len(table) else float("nan"), n_pairs=len(table), per_pair=table)


def mecr_curve(spot_cell: np.ndarray, prob: np.ndarray, spot_gene: np.ndarray, genes: list[str],
               pairs: list[tuple[str, str]], *, coverages: Sequence[float] | None = None) -> pd.DataFrame:
    """Coverage against MECR as the spots of low probability are left out of their cells.

    For each target coverage c, the spots assigned to a cell are kept in it from the highest ``prob`` down until a
    fraction c of all spots is kept; the rest count as unassigned. A method whose ``prob`` ranks its right
    assignments first traces a curve below that of a less certain one; compare it with :func:`expansion_curve`.

    Parameters
    ----------
    spot_cell : (n,) int cell of each spot (0 = none).
    prob : (n,) float, the probability of that assignment.
    spot_gene : (n,) int gene index into ``genes``.
    genes, pairs : as :func:`mecr`.
    coverages : target fractions of all spots (default: 20 steps up to the method's own coverage, which ends it).

    Returns
    -------
    DataFrame ``coverage, threshold, MECR`` (coverage ascending; the last row is the whole assignment).

    Examples
    --------
    >>> cell, prob = np.array([1, 1, 2, 2]), np.array([0.9, 0.2, 0.8, 0.7])
    >>> curve = mecr_curve(cell, prob, np.array([0, 1, 0, 0]), ["a", "b"], [("a", "b")], coverages=[0.5])
    >>> curve[["coverage", "MECR"]].values.tolist()
    [[0.5, 0.0], [1.0, 0.5]]
    """
    cell, prob = np.asarray(spot_cell, np.int64), np.asarray(prob, np.float64)
    n = max(cell.size, 1)
    assigned = np.flatnonzero(cell != BACKGROUND)
    order = assigned[np.argsort(-prob[assigned], kind="stable")]
    full = order.size / n
    if coverages is None:
        coverages = np.linspace(full / 20, full, 20)[:-1]
    rows = []
    for c in [*(c for c in coverages if c < full), full]:
        k = int(round(c * n))
        kept = np.zeros(cell.size, np.int64)
        kept[order[:k]] = cell[order[:k]]
        value = mecr(cell_gene_counts(kept, spot_gene, len(genes)), genes, pairs).value
        rows.append((k / n, float(prob[order[k - 1]]) if k else 1.0, value))
    return pd.DataFrame(rows, columns=["coverage", "threshold", "MECR"])


def interpolate_curve(curve: pd.DataFrame, coverage: float) -> float:
    """MECR of a coverage curve at ``coverage`` (linear between its points; NaN outside its range).

    Examples
    --------
    >>> interpolate_curve(pd.DataFrame({"coverage": [0.2, 0.6], "MECR": [0.01, 0.03]}), 0.5)
    0.025
    """
    c = curve.sort_values("coverage")
    x, y = c["coverage"].to_numpy(float), c["MECR"].to_numpy(float)
    if not x.size or coverage < x[0] - 1e-9 or coverage > x[-1] + 1e-9:
        return float("nan")
    return round(float(np.interp(coverage, x, y)), 12)


def negative_marker_purity(spot_cell: np.ndarray, spot_gene: np.ndarray, cell_type: Mapping[int, str],
                           genes: list[str], profile: pd.DataFrame, *, fraction: float = 0.1) -> float:
    """The share of the spots in typed cells that are not *negative markers* of their cell's type.

    A gene is a negative marker of type t when the reference expresses it elsewhere but not in t: its mean in t is
    below ``fraction`` of its highest mean over the types (the expression rule of :func:`exclusive_gene_pairs`).
    A cell that takes its neighbours' spots collects their markers, which are negative markers of its own type; a
    purity of 1 means no such spot. Cells of a type the reference lacks, and spots not in a cell, are not scored.

    Parameters
    ----------
    spot_cell, spot_gene : (n,) each spot's cell (0 = none) and gene index into ``genes``.
    cell_type : cell id -> type name (a column of ``profile``).
    profile : reference, index = gene names, one column per type (:func:`segjointgene.evaluate.scoring.load_reference`).

    Returns
    -------
    float in [0, 1]; NaN when no spot is scored.

    Examples
    --------
    >>> ref = pd.DataFrame({"A": [5.0, 0.0], "B": [0.0, 5.0]}, index=["a", "b"])
    >>> negative_marker_purity(np.array([1, 1, 1, 2]), np.array([0, 0, 1, 1]), {1: "A", 2: "B"}, ["a", "b"], ref)
    0.75
    """
    values = profile.to_numpy(np.float64)
    top = values.max(1, keepdims=True)
    negative = (values < fraction * top) & (top > 0)  # (genes of the profile, types)
    row = {g: i for i, g in enumerate(profile.index.astype(str))}
    col = {t: j for j, t in enumerate(profile.columns.astype(str))}
    gene_row = np.array([row.get(g, -1) for g in genes])
    cell, gene = np.asarray(spot_cell, np.int64), np.asarray(spot_gene, np.int64)
    ids = np.array(sorted(k for k, t in cell_type.items() if str(t) in col), np.int64)
    type_col = np.array([col[str(cell_type[k])] for k in ids], np.int64)
    pos = np.minimum(np.searchsorted(ids, cell), max(ids.size - 1, 0))
    scored = (cell != BACKGROUND) & (ids.size > 0) & (ids[pos] == cell) & (gene_row[gene] >= 0)
    if not scored.any():
        return float("nan")
    neg = negative[gene_row[gene[scored]], type_col[pos[scored]]]
    return float(1.0 - neg.mean())


# ---------------------------------------------------------------------------------------------------------------------
# Gene ranking against known markers


def ranking_marker_precision(ranking: pd.DataFrame, markers: pd.DataFrame) -> pd.DataFrame:
    """How well a per-type gene ranking recovers known marker genes.

    Parameters
    ----------
    ranking : long table ``celltype, gene, rank`` (rank 1 = most important), e.g. ``results/gene_ranking.csv``.
    markers : table ``celltype, gene, is_marker`` (e.g. a simulated section's ``markers.csv``).

    Returns
    -------
    DataFrame indexed by cell type with ``n_markers`` (m), ``precision_at_m`` (fraction of the type's markers among
    its top-m ranked genes), ``chance`` (m / number of ranked genes: the expected precision of a random ranking) and
    ``mean_marker_rank``. Types without markers or without a ranking are left out.

    Examples
    --------
    >>> ranking = pd.DataFrame({"celltype": ["A"] * 4, "gene": ["g1", "g2", "g3", "g4"], "rank": [1, 2, 3, 4]})
    >>> markers = pd.DataFrame({"celltype": ["A", "A"], "gene": ["g1", "g3"], "is_marker": [True, True]})
    >>> ranking_marker_precision(ranking, markers).loc["A", ["precision_at_m", "chance", "mean_marker_rank"]].tolist()
    [0.5, 0.5, 2.0]
    """
    rows = {}
    marker_sets = markers[markers["is_marker"].astype(bool)].groupby("celltype")["gene"].apply(set)
    for celltype, part in ranking.groupby("celltype"):
        wanted = marker_sets.get(celltype)
        if not wanted:
            continue
        part = part.sort_values("rank")
        m = len(wanted)
        ranked = part["gene"].tolist()
        in_panel = [g for g in wanted if g in set(ranked)]
        rows[celltype] = {
            "n_markers": m,
            "precision_at_m": len(set(ranked[:m]) & wanted) / m,
            "chance": m / len(ranked),
            "mean_marker_rank": float(part[part["gene"].isin(in_panel)]["rank"].mean()) if in_panel else float("nan"),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "celltype"
    return table


def border_marker_precision(border: pd.DataFrame, markers: pd.DataFrame) -> pd.DataFrame:
    """Per pair of a ``border_genes.csv`` table: the fraction of the two types' markers (m of them) among the pair's
    top-m genes (``precision_at_m``) and the chance level m / number of genes; indexed by ``celltype`` = "a|b".

    >>> border = pd.DataFrame({"type_a": ["A"] * 3, "type_b": ["B"] * 3, "gene": ["g1", "g2", "g3"],
    ...                        "rank": [1, 2, 3]})
    >>> markers = pd.DataFrame({"celltype": ["A", "B"], "gene": ["g1", "g3"], "is_marker": [True, True]})
    >>> border_marker_precision(border, markers)["precision_at_m"].tolist()
    [0.5]
    """
    sets = markers[markers["is_marker"].astype(bool)].groupby("celltype")["gene"].apply(set)
    rows = {}
    for (a, b), part in border.groupby(["type_a", "type_b"]):
        wanted = sets.get(a, set()) | sets.get(b, set())
        if not wanted:
            continue
        ranked = part.sort_values("rank")["gene"].tolist()
        rows[f"{a}|{b}"] = {"n_markers": len(wanted), "precision_at_m": len(set(ranked[:len(wanted)]) & wanted) / len(wanted),
                            "chance": len(wanted) / len(ranked), "mean_marker_rank": float("nan")}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "celltype"
    return table
