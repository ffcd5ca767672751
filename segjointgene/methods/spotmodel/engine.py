"""The spot-model engine on one window of a section (layer 1.7: numpy, scipy, skimage).

:func:`segment_window` is what ``--method spotmodel`` does before its network trains (and, given the network's
evidence, what it does after): measure whether the spots
resolve the cells (:func:`segjointgene.methods.spotmodel.densitycells.density_scale`); if so the density engine
(:mod:`segjointgene.methods.spotmodel.densitycells`, de novo cells typed by :func:`denovo_types`), else the spot model
(:mod:`segjointgene.methods.spotmodel.model`) refined into a pixel partition
(:mod:`segjointgene.methods.spotmodel.partition`). The tiled pipeline (:mod:`segjointgene.methods.tiled.tiles`) runs it
on every tile; the trainer (``methods/segjointgene/trainer/spots.py``) shares its settings (:func:`engine_configs`) and helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from segjointgene.constants import BACKGROUND
from segjointgene.errors import DataError

from .densitycells import DensityConfig, DensityScale, density_boundaries, density_cells
from .model import SpotModelConfig, fit_spot_model, territories
from .partition import PartitionConfig, refine_partition

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "Segmentation", "denovo_types", "density_segmentation", "engine_configs", "network_evidence",
           "reference_matrix", "segment_window", "shift_log_odds"]


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings (from ``--model_*``, see :func:`engine_configs`)."""

    spot: SpotModelConfig = SpotModelConfig()
    partition: PartitionConfig | None = PartitionConfig()  # None: the fitted ellipses are the cells
    density: DensityConfig = DensityConfig()
    boundaries: str = "auto"  # auto, density or partition (``--model_boundaries``)
    log_odds: float = 0.25  # added to the spot model's posterior of a partition's label (``prob``)


@dataclass(frozen=True)
class Segmentation:
    """One window's cells: mask, each spot's cell and probability, the de novo cells and their type indices."""

    mask: np.ndarray  # (H, W) int64 cell ids, 0 = background
    cell: np.ndarray  # (n,) int64
    prob: np.ndarray  # (n,) float32
    denovo_ids: np.ndarray  # (d,) int64
    denovo_types: np.ndarray  # (d,) int64 type index 0..T-1
    engine: str  # "density" or "partition"


def engine_configs(labels, reference: np.ndarray | None = None) -> EngineConfig:
    """The engine's settings from a :class:`~segjointgene.config.LabelUpdateConfig` (``--model_*``);
    ``--model_ambient auto`` is on with a reference."""
    spot = SpotModelConfig(shape_power=labels.model_shape_power, neighbour_weight=labels.model_neighbours,
                           temperature=labels.model_temperature, cell_profile=labels.model_cell_profile,
                           tissue_bin=labels.model_tissue_bin, size_from_nucleus=labels.model_nucleus_size)
    ambient = labels.model_ambient == "true" or (labels.model_ambient == "auto" and reference is not None)
    partition = (PartitionConfig(smoothness=labels.model_smoothness, shape_weight=labels.model_shape_weight,
                                 ambient_log_ratio=0.0 if ambient else float("inf"))
                 if labels.model_smoothness > 0 else None)
    return EngineConfig(spot=spot, partition=partition, boundaries=labels.model_boundaries,
                        log_odds=labels.model_partition_log_odds)


def reference_matrix(reference: pd.DataFrame, celltypes: list[str], genes: list[str], source: str) -> np.ndarray:
    """(types, genes) class means of ``reference`` (genes x types, as
    :func:`segjointgene.evaluate.scoring.load_reference` reads it) in the dataset's type and gene order; NaN rows for the types it does not name, 0 for genes it lacks.

    Raises
    ------
    DataError : the reference names none of the dataset's types, or none of its genes.
    """
    types = [t for t in celltypes if t in set(reference.columns.astype(str))]
    shared = [g for g in genes if g in set(reference.index.astype(str))]
    if not types or not shared:
        raise DataError(f"{source}: the reference names {len(types)} of the dataset's {len(celltypes)} cell types and "
                        f"{len(shared)} of its {len(genes)} genes; its columns must be the type names of the "
                        "celltype file (e.g. " + ", ".join(celltypes[:3]) + ") and its rows gene names")
    table = reference.copy()
    table.columns, table.index = table.columns.astype(str), table.index.astype(str)
    out = table.reindex(index=genes, columns=celltypes).T.to_numpy(np.float64)
    out[np.isin(celltypes, types)] = np.nan_to_num(out[np.isin(celltypes, types)], nan=0.0)
    log.info("reference %s: profiles of %d of %d cell types (%d of %d genes); the others from their spots", source,
             len(types), len(celltypes), len(shared), len(genes))
    return out


def network_evidence(log_post: np.ndarray, background_weight: float) -> np.ndarray:
    """(n, K) log-evidence for the spot model from the network's (n, K) log posterior at the spots (column 0 =
    background; rows of zeros = spots no patch predicted, which get no evidence).

    The posterior is split into which type, given a cell (``log p(t | cell)``), and cell versus background
    (``log p(bg) - log p(cell)``), each as a likelihood ratio against its mean over the spots; the second is
    weighted by ``background_weight``. With 1 this is the full posterior's ratio (up to a constant per spot); less
    trusts the network's call of where cells end less than its call of their types.
    """
    seen = log_post.any(1)
    cell = logsumexp(log_post[:, 1:], axis=1, keepdims=True)
    parts = np.concatenate([log_post[:, :1] - cell, log_post[:, 1:] - cell], 1)
    mean = logsumexp(parts[seen], axis=0) - np.log(max(int(seen.sum()), 1))
    out = parts - mean
    out[:, 0] *= background_weight
    out[~seen] = 0.0
    return out


def shift_log_odds(p: np.ndarray, delta: float) -> np.ndarray:
    """Probabilities with ``delta`` added to their log odds (0 and 1 stay; no division by zero).

    Examples
    --------
    >>> shift_log_odds(np.array([0.0, 0.25, 0.5, 1.0]), np.log(3.0)).round(3).tolist()
    [0.0, 0.5, 0.75, 1.0]
    """
    k = np.exp(delta)
    return (p * k / (1.0 + p * (k - 1.0))).astype(np.float32)


def denovo_types(spot_cell: np.ndarray, gene: np.ndarray, spot_type: np.ndarray, ids: np.ndarray, *, n_types: int,
                 n_genes: int) -> np.ndarray:
    """(d,) type index of each cell ``ids`` (cells without a nucleus): the type whose profile - one pseudo-count per
    gene plus the spots on the nuclei of the type (``spot_type`` >= 0) - explains the cell's spots best.

    Examples
    --------
    >>> spot_type = np.array([0, 0, 1, 1, -1, -1])  # two spots on a type-0 nucleus, two on a type-1 nucleus
    >>> gene = np.array([0, 0, 1, 1, 1, 1])
    >>> denovo_types(np.array([1, 1, 2, 2, 9, 9]), gene, spot_type, np.array([9]), n_types=2, n_genes=2).tolist()
    [1]
    """
    if ids.size == 0 or n_types <= 1:
        return np.zeros(ids.size, np.int64)
    on = spot_type >= 0
    profile = np.ones((n_types, n_genes))
    np.add.at(profile, (spot_type[on], gene[on]), 1.0)
    log_p = np.log(profile / profile.sum(1, keepdims=True))
    mine = np.isin(spot_cell, ids)
    counts = np.zeros((ids.size, n_genes))
    np.add.at(counts, (np.searchsorted(ids, spot_cell[mine]), gene[mine]), 1.0)
    return (counts @ log_p.T).argmax(1)


def spot_types(nuclei: np.ndarray, ids: np.ndarray, cls: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(n,) type index of the nucleus under each spot (-1: none, or a nucleus not in ``ids``)."""
    h, w = nuclei.shape
    r, c = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    ok = (r >= 0) & (c >= 0) & (r < h) & (c < w)
    on = np.zeros(x.size, np.int64)
    on[ok] = nuclei[r[ok], c[ok]]
    row = np.full(int(max(on.max(initial=0), ids.max(initial=0))) + 1, -1, np.int64)
    row[ids] = cls
    return np.where(on > 0, row[on], -1)


def density_segmentation(x: np.ndarray, y: np.ndarray, gene: np.ndarray, nuclei: np.ndarray, ids: np.ndarray,
                         cls: np.ndarray, scale: DensityScale, *, n_genes: int, n_types: int, first_new_id: int,
                         config: DensityConfig = DensityConfig()) -> Segmentation:
    """The density engine's cells (:func:`segjointgene.methods.spotmodel.densitycells.density_cells`), its de novo cells
    typed by :func:`denovo_types` (arguments as :func:`segment_window`)."""
    cells = density_cells(x, y, nuclei, scale=scale, first_new_id=first_new_id, config=config)
    types = denovo_types(cells.cell, np.asarray(gene, np.int64), spot_types(nuclei, ids, cls, x, y),
                         cells.denovo_ids, n_types=n_types, n_genes=n_genes)
    return Segmentation(mask=cells.mask, cell=cells.cell, prob=cells.prob, denovo_ids=cells.denovo_ids,
                        denovo_types=types, engine="density")


def segment_window(x: np.ndarray, y: np.ndarray, gene: np.ndarray, nuclei: np.ndarray, ids: np.ndarray,
                   cls: np.ndarray, *, n_genes: int, n_types: int, first_new_id: int,
                   reference: np.ndarray | None = None, config: EngineConfig = EngineConfig(),
                   evidence: Callable[[], np.ndarray] | None = None) -> Segmentation:
    """Segment the cells of one window with the spot-model engine (see the module docstring).

    Parameters
    ----------
    x, y : (n,) spot positions in the window's frame (pixel ``(floor(y), floor(x))``).
    gene : (n,) gene index.
    nuclei : (H, W) nucleus ids of the window, 0 = background.
    ids, cls : (m,) the cells (nucleus ids, ascending) and their type indices 0..n_types-1.
    first_new_id : id of the first de novo cell (above every id of the section).
    reference : optional (n_types, n_genes) class means (NaN rows: types it lacks).
    evidence : optional; returns (n, n_types + 1) log-evidence per spot for the spot model (e.g. a network's, see
        :func:`network_evidence`). Called only when the spot model runs (the density
        engine does not use it), so a costly source is not computed in vain.

    Deterministic: no randomness.
    """
    gene = np.asarray(gene, np.int64)
    scale = density_boundaries(x, y, nuclei, config.boundaries, config.density)
    if scale is not None:
        return density_segmentation(x, y, gene, nuclei, ids, cls, scale, n_genes=n_genes, n_types=n_types,
                                    first_new_id=first_new_id, config=config.density)
    extra = evidence() if evidence is not None else None
    fit = fit_spot_model(x, y, gene, nuclei, ids, cls, n_genes=n_genes, n_types=n_types, config=config.spot,
                         reference=reference, evidence=extra)
    none = np.zeros(0, np.int64)
    if fit.model is None:  # no cell or no spot
        return Segmentation(mask=np.asarray(nuclei, np.int64), cell=fit.cell, prob=fit.prob, denovo_ids=none,
                            denovo_types=none, engine="partition")
    mask = np.where(nuclei > 0, nuclei, territories(fit.model, nuclei.shape)).astype(np.int64)
    if config.partition is None:
        return Segmentation(mask=mask, cell=fit.cell, prob=fit.prob, denovo_ids=none, denovo_types=none,
                            engine="partition")
    part = refine_partition(mask, nuclei != BACKGROUND, fit.model, x, y, gene, evidence=extra,
                            config=config.partition)
    prob = shift_log_odds(fit.probability_of(part.cell), config.log_odds)
    return Segmentation(mask=part.mask, cell=part.cell, prob=prob, denovo_ids=none, denovo_types=none,
                        engine="partition")
