"""The embed pipeline on arrays: prepare the crops, train the encoder, embed every cell's points, aggregate.

:func:`embed_section` is what ``--step_name=embed`` runs after reading the files; the pieces are public so that an
evaluation can re-use a trained encoder on another instance mask (e.g. with merged cells).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from ..config import EmbedConfig
from ..constants import BACKGROUND
from .aggregate import cell_mean, coherence, radius_mean
from .crops import ChannelStats, CropBuilder, SectionInputs, auto_crop_px, cell_counts, fit_channel_stats
from .model import SegCLRNet, build_model
from .sampling import CellPixels, cell_pixels, export_points
from .train import embed_points, train_encoder

log = logging.getLogger(__name__)

__all__ = ["EmbedRun", "Embeddings", "compute_embeddings", "embed_section", "make_builder", "make_encoder"]

#: Cells whose centres sample the RMS of the gene channels.
_STATS_SAMPLE = 512


@dataclass(frozen=True)
class Embeddings:
    """Point and cell embeddings of one instance mask.

    Attributes
    ----------
    points : DataFrame ``cell, point_id, row, col, x_um, y_um, compartment`` (one row per point).
    point_emb : (N, d) float32 embedding of each point.
    point_agg : (N, d) float32 radius-aggregated embedding of each point (== point_emb when the radius is 0).
    cells : DataFrame ``cell, x, y`` (centroid, raw pixels), ``x_um, y_um, area_px, n_points, coherence``.
    cell_emb : (n_cells, d) float32 mean of the cell's point embeddings.
    counts : (n_cells, G) float32 spot counts per cell (the count-vector view of the same cells).
    """

    points: pd.DataFrame
    point_emb: np.ndarray
    point_agg: np.ndarray
    cells: pd.DataFrame
    cell_emb: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class EmbedRun:
    """Everything :func:`embed_section` produced: the model, its crop builder, the training log, the embeddings."""

    model: SegCLRNet
    builder: CropBuilder
    train_log: pd.DataFrame
    embeddings: Embeddings


def make_builder(inputs: SectionInputs, config: EmbedConfig, *, rng: np.random.Generator | int | None = None,
                 stats: ChannelStats | None = None, crop_px: int | None = None) -> CropBuilder:
    """A crop builder for ``inputs``: crop size (``config.crop_px`` or auto) and channel statistics (fitted here
    on up to 512 cell centres drawn from ``rng`` unless given, e.g. those of a trained model)."""
    rng = np.random.default_rng(rng)
    if crop_px is None:
        crop_px = config.crop_px or auto_crop_px(ndimage.find_objects(inputs.instance))
    if stats is None:
        pixels = cell_pixels(inputs.instance)
        counts = cell_counts(inputs, pixels.ids)
        pick = np.sort(rng.choice(pixels.ids.size, min(_STATS_SAMPLE, pixels.ids.size), replace=False))
        centres = np.rint(pixels.centroids()[pick] - 0.5).astype(np.int64)
        # a centroid outside a non-convex cell still gives a crop of the cell
        stats = fit_channel_stats(inputs, pixels.ids[pick], centres, n_pcs=config.gene_pcs, crop_px=crop_px,
                                  input_px=config.input_px, blur_sigma_px=config.blur_sigma_px, counts=counts)
    return CropBuilder(inputs, stats, crop_px=crop_px, input_px=config.input_px, mask_mode=config.mask_mode,
                       blur_sigma_px=config.blur_sigma_px)


def make_encoder(builder: CropBuilder, config: EmbedConfig, *, generator: torch.Generator | None = None) -> SegCLRNet:
    """An untrained encoder of ``config.preset`` for the builder's channels (norm ``auto``: batch norm when a step
    holds at least 8 pairs, else group norm)."""
    norm = config.norm if config.norm != "auto" else ("batch" if config.batch_size >= 8 else "group")
    return build_model(config.preset, builder.in_channels, embed_dim=config.embed_dim, proj_dim=config.proj_dim,
                       norm=norm, generator=generator)


def compute_embeddings(model: SegCLRNet, builder: CropBuilder, config: EmbedConfig, *,
                       rng: np.random.Generator | int | None = None, device: str | torch.device = "cpu",
                       pixels: CellPixels | None = None) -> Embeddings:
    """Embed the points of every cell of ``builder.inputs.instance`` and aggregate them per cell.

    Points: :func:`~segjointgene.embed.sampling.export_points` (stride ``config.point_stride_px``, at most
    ``config.max_points``, subsets drawn from ``rng``). Coordinates in micrometres are pixel centres times
    ``config.pixel_size_um``; a point is ``nucleus`` when it lies in the cell's own nucleus, else ``cytoplasm``
    (``unknown`` without nuclei).
    """
    inputs = builder.inputs
    pixels = pixels or cell_pixels(inputs.instance)
    pts = export_points(pixels, stride_px=config.point_stride_px, max_points=config.max_points, rng=rng)
    centres = pts[["row", "col"]].to_numpy()
    emb = embed_points(model, builder, pts["cell"].to_numpy(), centres, batch_size=config.infer_batch,
                       tta=config.tta, device=device)
    px = config.pixel_size_um
    pts["x_um"] = (pts["col"] + 0.5) * px
    pts["y_um"] = (pts["row"] + 0.5) * px
    if inputs.nuclei is not None:
        own = inputs.nuclei[pts["row"].to_numpy(), pts["col"].to_numpy()] == pts["cell"].to_numpy()
        pts["compartment"] = np.where(own, "nucleus", "cytoplasm")
    else:
        pts["compartment"] = "unknown"
    agg = radius_mean(emb, pts[["x_um", "y_um"]].to_numpy(), pts["cell"].to_numpy(), config.agg_radius_um)
    ids = pixels.ids
    cent = pixels.centroids()  # (row, col) + 0.5
    cells = pd.DataFrame({"cell": ids, "x": cent[:, 1], "y": cent[:, 0], "x_um": cent[:, 1] * px,
                          "y_um": cent[:, 0] * px, "area_px": pixels.area,
                          "n_points": np.bincount(np.searchsorted(ids, pts["cell"].to_numpy()), minlength=ids.size),
                          "coherence": coherence(emb, pts["cell"].to_numpy(), ids)})
    return Embeddings(points=pts, point_emb=emb, point_agg=agg, cells=cells,
                      cell_emb=cell_mean(emb, pts["cell"].to_numpy(), ids), counts=cell_counts(inputs, ids))


def embed_section(inputs: SectionInputs, config: EmbedConfig, *, seed: int = 0, device: str | torch.device = "cpu",
                  train: bool = True, progress: bool = False) -> EmbedRun:
    """Train an encoder on a section and embed all its cells (the whole ``embed`` step on arrays).

    Deterministic for a fixed ``seed`` on the CPU: numpy draws come from ``default_rng(seed)`` (one child stream
    each for the channel statistics, the training and the export points), torch draws from a generator seeded
    with ``seed``. ``train=False`` gives the untrained-encoder baseline with the same initial weights.
    """
    if np.asarray(inputs.instance).max(initial=BACKGROUND) == BACKGROUND:
        raise ValueError("the instance mask holds no cell")
    stats_rng, train_rng, point_rng = np.random.default_rng(seed).spawn(3)
    builder = make_builder(inputs, config, rng=stats_rng)
    generator = torch.Generator().manual_seed(seed)
    model = make_encoder(builder, config, generator=generator)
    pixels = cell_pixels(inputs.instance)
    history = pd.DataFrame()
    if train:
        eligible = pixels.subset(pixels.area >= config.min_area_px)
        log.info("embed: training %s encoder on %d cells (crop %d px -> %d, %d channels, %s) for %d steps",
                 config.preset, eligible.ids.size, builder.crop_px, builder.input_px, builder.in_channels,
                 config.mask_mode, config.steps)
        result = train_encoder(model, builder, eligible, steps=config.steps, batch_size=config.batch_size,
                               lr=config.lr, weight_decay=config.weight_decay, temperature=config.temperature,
                               decorrelation=config.decorrelation, max_pair_dist_px=config.max_pair_dist_px,
                               augment=config.augment, rng=train_rng, device=device, progress=progress)
        model, history = result.model, result.log
    model.eval()
    emb = compute_embeddings(model, builder, config, rng=point_rng, device=device, pixels=pixels)
    return EmbedRun(model=model, builder=builder, train_log=history, embeddings=emb)
