"""Encoder inputs: crops of a section centred at points inside cells, with the masking modes (docs/SEGCLR.md §2.4).

A crop is a ``crop_px`` window of the raw frame centred on a pixel of one cell, binned to ``input_px`` bins. Its
channels, in order:

- gene channels: spot counts per bin (spots rasterised directly from the spot table, so the section is never held
  as a G x H x W array), ``log1p``, optionally projected on eigengenes (principal components of the per-cell
  expression), scaled to unit RMS inside cells, blurred by ``blur_sigma_px``;
- DAPI (percentile-normalised to [0, 1]) or, without a DAPI image, the binary nucleus mask;
- the cell's mask (modes ``channel`` and ``masked+channel``).

Masking (modes ``masked`` and ``masked+channel``): spots and DAPI outside the cell's mask dilated by 1 px are
dropped, so the content is the cell's own (SegCLR's ``masked_em``).

Zero stays "no transcripts": the gene channels are scaled but not centred, so masking and zero padding at the
section border agree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..constants import BACKGROUND
from .augment import ViewParams, apply_d4, gaussian_blur, identity_params, jitter_dapi

log = logging.getLogger(__name__)

__all__ = ["MASK_MODES", "ChannelStats", "CropBuilder", "SectionInputs", "auto_crop_px", "cell_counts",
           "fit_channel_stats", "normalise_dapi"]

MASK_MODES = ("masked+channel", "masked", "channel", "none")
#: The content mask is the cell mask dilated by this many pixels (tolerates boundary errors of the segmentation).
CONTENT_DILATE_PX = 1


@dataclass(frozen=True)
class SectionInputs:
    """What the encoder sees of a section, in the raw pixel frame (x = column, y = row).

    Attributes
    ----------
    instance : (H, W) integer cell ids, 0 = background.
    dapi : (H, W) float32 in [0, 1]: normalised DAPI, or the binary nucleus mask without DAPI.
    has_dapi : whether ``dapi`` is a stain (grey-value augmentation applies) or a mask.
    spot_gene : (n,) int64 gene index of each spot (0..G-1).
    spot_row, spot_col : (n,) int64 pixel of each spot (``floor(y)``, ``floor(x)``).
    genes : gene names (channel order).
    nuclei : (H, W) integer nucleus ids or None (only used to label points nucleus / cytoplasm).
    """

    instance: np.ndarray
    dapi: np.ndarray
    has_dapi: bool
    spot_gene: np.ndarray
    spot_row: np.ndarray
    spot_col: np.ndarray
    genes: list[str]
    nuclei: np.ndarray | None = None

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @classmethod
    def from_arrays(cls, instance: np.ndarray, spot_gene: np.ndarray, spot_x: np.ndarray, spot_y: np.ndarray,
                    genes: list[str], *, dapi: np.ndarray | None = None,
                    nuclei: np.ndarray | None = None) -> SectionInputs:
        """Build from raw-frame arrays: spots as float x / y, DAPI as any numeric image (normalised here).

        Without ``dapi`` the DAPI channel is the binary nucleus mask (``nuclei > 0``; zeros when no nuclei).
        Spots outside the frame are dropped.
        """
        instance = np.asarray(instance)
        h, w = instance.shape
        row = np.floor(np.asarray(spot_y, np.float64)).astype(np.int64)
        col = np.floor(np.asarray(spot_x, np.float64)).astype(np.int64)
        inside = (row >= 0) & (col >= 0) & (row < h) & (col < w)
        if dapi is not None:
            image, has = normalise_dapi(dapi), True
        else:
            image = (nuclei > BACKGROUND).astype(np.float32) if nuclei is not None else np.zeros((h, w), np.float32)
            has = False
        return cls(instance=instance, dapi=image, has_dapi=has, spot_gene=np.asarray(spot_gene, np.int64)[inside],
                   spot_row=row[inside], spot_col=col[inside], genes=list(genes), nuclei=nuclei)


def normalise_dapi(dapi: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the DAPI image clipped to its ``low``..``high`` percentiles (at most ~1M pixels
    sampled on a regular grid for the percentiles)."""
    dapi = np.asarray(dapi, np.float32)
    step = max(1, int(np.sqrt(dapi.size / 1e6)))
    lo, hi = np.percentile(dapi[::step, ::step], [low, high])
    return np.clip((dapi - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def cell_counts(inputs: SectionInputs, cell_ids: np.ndarray) -> np.ndarray:
    """(n_cells, G) float32 spot counts per cell: spots whose pixel lies in the cell's mask."""
    cell_ids = np.asarray(cell_ids, np.int64)
    g = inputs.n_genes
    if cell_ids.size == 0:
        return np.zeros((0, g), np.float32)
    owner = inputs.instance[inputs.spot_row, inputs.spot_col].astype(np.int64)
    pos = np.minimum(np.searchsorted(cell_ids, owner), cell_ids.size - 1)
    ok = (owner != BACKGROUND) & (cell_ids[pos] == owner)
    flat = pos[ok] * g + inputs.spot_gene[ok]
    return np.bincount(flat, minlength=cell_ids.size * g).reshape(cell_ids.size, g).astype(np.float32)


def auto_crop_px(instance_objects: list, *, factor: float = 1.25, lo: int = 16, hi: int = 256) -> int:
    """Crop edge of the cell view: ``factor`` x the 90th percentile of the cells' bounding-box extent, even.

    Parameters
    ----------
    instance_objects : ``scipy.ndimage.find_objects`` of the instance mask (None entries are skipped).
    """
    extent = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in instance_objects if s is not None]
    if not extent:
        return lo
    crop = int(np.ceil(factor * np.percentile(extent, 90) / 2.0)) * 2
    return int(np.clip(crop, lo, hi))


@dataclass(frozen=True)
class ChannelStats:
    """Section-level normalisation of the gene channels (fitted once, stored with the model).

    Attributes
    ----------
    projection : (G, k) float32 gene -> channel map (identity when no eigengenes are used).
    scale : (k,) float32 factor of each channel (1 / its RMS inside cells, floored).
    """

    projection: np.ndarray
    scale: np.ndarray

    @property
    def n_channels(self) -> int:
        return int(self.projection.shape[1])


class CropBuilder:
    """Builds encoder inputs (N, C, input_px, input_px) from cell ids, centre pixels and view parameters.

    Parameters
    ----------
    inputs : the section.
    stats : gene-channel normalisation (:func:`fit_channel_stats`); None = identity projection, unit scale.
    crop_px : window edge in raw pixels; input_px : bins per edge of the encoder input.
    mask_mode : one of :data:`MASK_MODES`.
    blur_sigma_px : base Gaussian sigma of the gene channels in raw pixels.
    """

    def __init__(self, inputs: SectionInputs, stats: ChannelStats | None, *, crop_px: int, input_px: int,
                 mask_mode: str = "masked+channel", blur_sigma_px: float = 1.0) -> None:
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={mask_mode!r}: choose one of {', '.join(MASK_MODES)}")
        self.inputs = inputs
        g = inputs.n_genes
        self.stats = stats or ChannelStats(np.eye(g, dtype=np.float32), np.ones(g, np.float32))
        self.crop_px, self.input_px = int(crop_px), int(input_px)
        self.mask_mode = mask_mode
        self.blur_sigma_px = float(blur_sigma_px)
        # spots bucketed by crop-sized tiles: a window overlaps at most 4 tiles
        h, w = inputs.instance.shape
        self._tile = self.crop_px
        self._tiles_x = w // self._tile + 1
        key = (inputs.spot_row // self._tile) * self._tiles_x + inputs.spot_col // self._tile
        self._order = np.argsort(key, kind="stable")
        self._tile_start = np.searchsorted(key[self._order], np.arange((h // self._tile + 1) * self._tiles_x + 1))

    @property
    def masked(self) -> bool:
        return self.mask_mode in ("masked", "masked+channel")

    @property
    def mask_channel(self) -> bool:
        return self.mask_mode in ("channel", "masked+channel")

    @property
    def in_channels(self) -> int:
        """Channels of a built crop: gene channels + DAPI (+ mask)."""
        return self.stats.n_channels + 1 + int(self.mask_channel)

    # --------------------------------------------------------------------------------------------- numpy part
    def _windows(self, image: np.ndarray, origins: np.ndarray) -> np.ndarray:
        """(N, c, c) windows of ``image`` at (row, col) ``origins``, zero outside the frame."""
        c = self.crop_px
        h, w = image.shape
        out = np.zeros((len(origins), c, c), image.dtype)
        for i, (r0, c0) in enumerate(origins):
            ra, rb, ca, cb = max(r0, 0), min(r0 + c, h), max(c0, 0), min(c0 + c, w)
            if ra < rb and ca < cb:
                out[i, ra - r0:rb - r0, ca - c0:cb - c0] = image[ra:rb, ca:cb]
        return out

    def _spots_in(self, origins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(view index, spot index) of every spot in each window."""
        t, c = self._tile, self.crop_px
        views, spots = [], []
        for i, (r0, c0) in enumerate(origins):
            parts = []
            for tr in range(max(r0, 0) // t, max(r0 + c - 1, 0) // t + 1):
                for tc in range(max(c0, 0) // t, max(c0 + c - 1, 0) // t + 1):
                    k = tr * self._tiles_x + tc
                    if 0 <= k < self._tile_start.size - 1:
                        parts.append(self._order[self._tile_start[k]:self._tile_start[k + 1]])
            if parts:
                idx = np.concatenate(parts)
                views.append(np.full(idx.size, i, np.int64))
                spots.append(idx)
        if not spots:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(views), np.concatenate(spots)

    def _raw(self, cell_ids: np.ndarray, centres: np.ndarray, params: ViewParams, rng: np.random.Generator | None):
        """Counts (N, G, s, s), cell mask (N, c, c) and DAPI (N, c, c) of the windows (float32)."""
        n, g, s, c = len(cell_ids), self.inputs.n_genes, self.input_px, self.crop_px
        origins = np.asarray(centres, np.int64) - c // 2
        mask = self._windows(self.inputs.instance, origins) == np.asarray(cell_ids)[:, None, None]
        if np.any(params.mask_step != 0):  # segmentation-robustness: erode / dilate the cell mask by 1 px
            dil = ndimage.maximum_filter(mask, size=(1, 3, 3), mode="constant")
            ero = ndimage.minimum_filter(mask, size=(1, 3, 3), mode="constant")
            step = params.mask_step[:, None, None]
            mask = np.where(step > 0, dil, np.where(step < 0, ero, mask))
        content = mask
        for _ in range(CONTENT_DILATE_PX):
            content = ndimage.maximum_filter(content, size=(1, 3, 3), mode="constant")
        dapi = self._windows(self.inputs.dapi, origins)
        if self.masked:
            dapi = dapi * content

        view, spot = self._spots_in(origins)
        rr = self.inputs.spot_row[spot] - origins[view, 0]
        cc = self.inputs.spot_col[spot] - origins[view, 1]
        keep = (rr >= 0) & (rr < c) & (cc >= 0) & (cc < c)
        view, spot, rr, cc = view[keep], spot[keep], rr[keep], cc[keep]
        gene = self.inputs.spot_gene[spot]
        keep = params.gene_keep[view, gene]
        if rng is not None and np.any(params.keep_prob < 1.0):  # binomial thinning, spot by spot
            keep &= rng.random(view.size) < params.keep_prob[view]
        if self.masked:
            keep &= content[view, rr, cc]
        view, gene, rr, cc = view[keep], gene[keep], rr[keep], cc[keep]
        br, bc = rr * s // c, cc * s // c  # bin of each spot
        flat = ((view * g + gene) * s + br) * s + bc
        counts = np.bincount(flat, minlength=n * g * s * s).reshape(n, g, s, s).astype(np.float32)
        return counts, mask.astype(np.float32), dapi.astype(np.float32)

    # --------------------------------------------------------------------------------------------- torch part
    def build(self, cell_ids: np.ndarray, centres: np.ndarray, params: ViewParams | None = None, *,
              rng: np.random.Generator | None = None) -> torch.Tensor:
        """Encoder inputs of N views.

        Parameters
        ----------
        cell_ids : (N,) int64 id of the cell each view belongs to.
        centres : (N, 2) int64 (row, col) centre pixel of each view (inside its cell).
        params : augmentation parameters (None = none: the export path).
        rng : numpy Generator for the spot thinning (needed when ``params.keep_prob < 1``).

        Returns
        -------
        (N, C, input_px, input_px) float32 tensor, C = :attr:`in_channels`.
        """
        n = len(cell_ids)
        if params is None:
            params = identity_params(n, self.inputs.n_genes)
        counts, mask, dapi = self._raw(np.asarray(cell_ids, np.int64), centres, params, rng)
        s = self.input_px
        gain = torch.as_tensor(params.gain, dtype=torch.float32)[:, None, None, None]
        x = torch.log1p(torch.from_numpy(counts)) * gain  # (N, G, s, s)
        proj = torch.from_numpy(self.stats.projection * self.stats.scale[None, :])  # (G, k)
        x = torch.einsum("ngij,gk->nkij", x, proj)  # (N, k, s, s)
        bin_px = self.crop_px / s
        sigma = np.sqrt(self.blur_sigma_px ** 2 + params.extra_blur_px ** 2) / bin_px
        x = gaussian_blur(x, sigma)
        m = F.adaptive_avg_pool2d(torch.from_numpy(mask)[:, None], s)  # (N, 1, s, s) area fraction
        d = torch.from_numpy(dapi)
        if self.inputs.has_dapi:
            d = jitter_dapi(d, params)
        d = F.adaptive_avg_pool2d(d[:, None], s)
        parts = [x, d] + ([m] if self.mask_channel else [])
        out = torch.cat(parts, 1)  # (N, C, s, s)
        return apply_d4(out, params.d4) if np.any(params.d4 != 0) else out


def fit_channel_stats(inputs: SectionInputs, cell_ids: np.ndarray, centres: np.ndarray, *, n_pcs: int,
                      crop_px: int, input_px: int, blur_sigma_px: float, counts: np.ndarray | None = None,
                      floor: float = 0.1) -> ChannelStats:
    """Fit the gene-channel normalisation of a section.

    With more genes than ``n_pcs``, the projection holds the first ``n_pcs`` principal axes of the per-cell
    expression (log1p of library-size-normalised counts, centred), each signed so that its largest loading is
    positive; otherwise it is the identity. Then each channel is scaled to unit root-mean-square over the in-cell
    bins of un-augmented crops at the given centres (the scale is floored at ``floor`` x the median RMS so that a
    nearly silent channel is not blown up).

    Parameters
    ----------
    inputs : the section.
    cell_ids : (N,) int64 and centres (N, 2) int64: sample crops for the RMS (e.g. a few hundred cell centres).
    counts : (n_cells, G) per-cell counts for the PCA (all cells of the section); computed when None.
    """
    g = inputs.n_genes
    if g > n_pcs:
        if counts is None:
            from .sampling import cell_pixels

            counts = cell_counts(inputs, cell_pixels(inputs.instance).ids)
        total = counts.sum(1, keepdims=True)
        expr = np.log1p(counts / np.maximum(total, 1.0) * max(float(np.median(total)), 1.0))
        expr = expr - expr.mean(0)
        _, _, vt = np.linalg.svd(expr.astype(np.float64), full_matrices=False)
        proj = vt[:n_pcs].T  # (G, k)
        if proj.shape[1] < n_pcs:  # fewer cells than components: pad with zero channels
            proj = np.pad(proj, ((0, 0), (0, n_pcs - proj.shape[1])))
        sign = np.sign(proj[np.abs(proj).argmax(0), np.arange(proj.shape[1])])
        proj = (proj * np.where(sign == 0, 1.0, sign)).astype(np.float32)
    else:
        proj = np.eye(g, dtype=np.float32)
    k = proj.shape[1]
    builder = CropBuilder(inputs, ChannelStats(proj, np.ones(k, np.float32)), crop_px=crop_px, input_px=input_px,
                          mask_mode="masked+channel", blur_sigma_px=blur_sigma_px)
    sq, n_bins = np.zeros(k), 0
    for b in range(0, len(cell_ids), 128):
        x = builder.build(cell_ids[b:b + 128], centres[b:b + 128])
        inside = x[:, -1] > 0.5  # (n, s, s) bins mostly inside the cell (last channel = mask fraction)
        vals = x[:, :k].permute(1, 0, 2, 3)[:, inside]  # (k, n_inside)
        sq += (vals.double() ** 2).sum(1).numpy()
        n_bins += int(inside.sum())
    rms = np.sqrt(sq / max(n_bins, 1))
    positive = rms[rms > 0]
    floor_value = floor * (float(np.median(positive)) if positive.size else 1.0)
    scale = (1.0 / np.maximum(rms, max(floor_value, 1e-6))).astype(np.float32)
    return ChannelStats(projection=proj, scale=scale)
