"""Gene-density images built on the training device from per-patch spot lists (layer 2: torch).

A patch's density image (``image`` in the patch files, SPEC §2.2) is a per-gene histogram of the spots in the patch
enlarged by a halo, smoothed by a Gaussian truncated at ``DENSITY_TRUNCATE`` sigmas and cropped to the patch
(:func:`segjointgene.preprocess.pipeline.gene_density`). Kept as spot lists, a whole section fits in memory (CA1 3-1
left: ~10^5 (gene, row, col) triples instead of 1114 x 92 x 128 x 128 floats) and the images are rebuilt per batch on
the device by :func:`batch_density`.

The Gaussian is separable and the spots are sparse, so each spot's contribution is the outer product of two 1-D
kernel windows, ``w(y - row) * w(x - col)``, added into its (sample, gene) plane. This is the same sum that the
histogram + ``scipy.ndimage.gaussian_filter`` pipeline computes (weights from the same normalised kernel, zero
beyond the truncation radius), in another order: results agree to float32 rounding (~1e-7 relative). It needs
``n_spots * P^2`` multiply-adds instead of ``n_genes * (P + 2 halo) * P * (2 radius + 1)`` for a dense separable
filter: ~40x fewer on CA1 (about 150 spots per patch) and still fewer up to several thousand spots per patch.
Everything is elementwise (no TF32 matmul or convolution), and the sums use ``index_put_(accumulate=True)``, which
has a deterministic CUDA implementation under ``torch.use_deterministic_algorithms(True)``.

Spot-list layout (:data:`SPOT_COLUMNS`): an (N, 4) integer tensor of rows ``(sample, gene, row, col)``, ``row`` /
``col`` relative to the patch's top-left pixel; spots up to ``halo`` pixels outside the patch spill into it, spots
further out are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .pipeline import density_halo

__all__ = ["SPOT_COLUMNS", "batch_density", "batch_images", "gaussian_kernel1d"]

#: Columns of a spot list (an (N, 4) integer tensor).
SPOT_COLUMNS = ("sample", "gene", "row", "col")

#: Spots whose (P x P) outer products are summed at once: bounds the temporary to ~64 MiB of float32 at P = 128.
_BLOCK_ELEMENTS = 1 << 24


def gaussian_kernel1d(sigma: float, *, device: torch.device | str | None = None) -> Tensor:
    """The normalised 1-D Gaussian that preprocessing uses, ``(2 r + 1,)`` float32 with ``r = density_halo(sigma)``.

    Weights ``exp(-x^2 / (2 sigma^2))`` for ``x = -r..r``, divided by their sum (in float64, as scipy's
    ``gaussian_filter(..., truncate=DENSITY_TRUNCATE)`` does), then cast to float32.

    Examples
    --------
    >>> k = gaussian_kernel1d(1.0)
    >>> k.shape, round(float(k.sum()), 6), bool(k[3] == k.max())
    (torch.Size([7]), 1.0, True)
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 for a Gaussian kernel, got {sigma}")
    radius = density_halo(sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 * (x / sigma) ** 2)
    return (phi / phi.sum()).to(device=device, dtype=torch.float32)


def _validate(spots: Tensor, batch_size: int, n_genes: int, patch_size: int, sigma: float) -> None:
    if not isinstance(spots, Tensor):
        raise TypeError(f"spots must be an (N, 4) integer torch.Tensor (sample, gene, row, col), got {type(spots).__name__}")
    if spots.is_floating_point() or spots.is_complex() or spots.dtype == torch.bool:
        raise TypeError(f"spots must hold integers (sample, gene, row, col), got {spots.dtype}; use .long()")
    if spots.ndim != 2 or spots.shape[1] != len(SPOT_COLUMNS):
        raise ValueError(f"spots must have shape (N, 4) with columns {SPOT_COLUMNS}, got {tuple(spots.shape)}")
    if batch_size < 1 or n_genes < 1 or patch_size < 1:
        raise ValueError(f"batch_size, n_genes and patch_size must be >= 1, got {batch_size}, {n_genes}, {patch_size}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    if spots.shape[0]:
        lo, hi = spots[:, :2].amin(0).tolist(), spots[:, :2].amax(0).tolist()
        if lo[0] < 0 or hi[0] >= batch_size:
            raise ValueError(f"spot sample indices must lie in [0, {batch_size}), got {lo[0]}..{hi[0]}")
        if lo[1] < 0 or hi[1] >= n_genes:
            raise ValueError(f"spot gene indices must lie in [0, {n_genes}), got {lo[1]}..{hi[1]}")


def batch_density(spots: Tensor, batch_size: int, n_genes: int, patch_size: int, sigma: float, *,
                  halo: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Per-gene spot density of a batch of patches, built on ``device`` from their spot lists.

    Parameters
    ----------
    spots : (N, 4) integer tensor
        One row per spot, ``(sample, gene, row, col)`` (:data:`SPOT_COLUMNS`); ``row``, ``col`` relative to the
        sample's patch (its top-left pixel is (0, 0)). Spots up to ``halo`` pixels outside the patch spill into it.
    batch_size : number of patches B (samples without spots get an all-zero image).
    n_genes : number of channels G.
    patch_size : patch edge P.
    sigma : Gaussian sigma (pixels) of the dataset (``metadata['density_sigma']``); 0 gives raw counts of the
        spots inside the patch.
    halo : spill-over margin; defaults to :func:`segjointgene.preprocess.pipeline.density_halo` of ``sigma`` (what
        preprocessing used; a larger value changes nothing because the kernel is zero beyond its radius).
    device : where to build the images (default: the device of ``spots``).

    Returns
    -------
    (B, G, P, P) float32 tensor on ``device``; equal, within float32 rounding, to
    :func:`segjointgene.preprocess.pipeline.gene_density` of each sample's spots (the ``image`` array of the patch files).

    Raises
    ------
    TypeError, ValueError
        Non-integer spots, a wrong shape, sample or gene indices out of range, a negative sigma.

    Examples
    --------
    >>> spots = torch.tensor([[0, 1, 16, 16], [1, 0, -2, 5]])    # sample 1's spot lies 2 px above its patch
    >>> img = batch_density(spots, 2, 3, 32, 2.0)
    >>> img.shape, round(float(img[0, 1].sum()), 4), float(img[0, 0].sum()), bool(img[1, 0, 0, 5] > 0)
    (torch.Size([2, 3, 32, 32]), 1.0, 0.0, True)
    """
    _validate(spots, batch_size, n_genes, patch_size, sigma)
    device = torch.device(device) if device is not None else spots.device
    p = patch_size
    out = torch.zeros((batch_size * n_genes, p * p), dtype=torch.float32, device=device)  # (B*G, P*P)
    spots = spots.to(device=device, dtype=torch.int64, non_blocking=True)
    group = spots[:, 0] * n_genes + spots[:, 1]  # (N,) plane of each spot
    rows, cols = spots[:, 2], spots[:, 3]
    if sigma <= 0:
        inside = (rows >= 0) & (rows < p) & (cols >= 0) & (cols < p)
        flat = rows[inside] * p + cols[inside]
        out.index_put_((group[inside], flat), torch.ones_like(flat, dtype=torch.float32), accumulate=True)
        return out.view(batch_size, n_genes, p, p)

    kernel = gaussian_kernel1d(sigma, device=device)  # (2r+1,)
    radius = (kernel.numel() - 1) // 2
    reach = min(radius, density_halo(sigma) if halo is None else int(halo))
    near = (rows >= -reach) & (rows < p + reach) & (cols >= -reach) & (cols < p + reach)
    group, rows, cols = group[near], rows[near], cols[near]
    axis = torch.arange(p, device=device)
    block = max(1, _BLOCK_ELEMENTS // (p * p))
    for start in range(0, group.numel(), block):
        sl = slice(start, start + block)
        w_rows = _window(kernel, axis[None, :] - rows[sl, None], radius)  # (n, P) weight of each output row
        w_cols = _window(kernel, axis[None, :] - cols[sl, None], radius)  # (n, P)
        planes = (w_rows[:, :, None] * w_cols[:, None, :]).reshape(-1, p * p)  # (n, P*P)
        out.index_put_((group[sl],), planes, accumulate=True)
    return out.view(batch_size, n_genes, p, p)


def batch_images(batch: Mapping[str, Tensor], *, n_genes: int, patch_size: int, sigma: float,
                 halo: int | None = None, device: torch.device | str) -> Tensor:
    """(B, G, P, P) float32 density images of a collated batch, on ``device``.

    A spot-list batch (``ImagePatchDataset(..., spot_lists=True)`` collated by
    :func:`segjointgene.preprocess.dataset.collate_spot_lists`, key ``spots``) is built there by :func:`batch_density`;
    an image batch (key ``image``) is moved there (``non_blocking``: from pinned memory the copy overlaps compute on CUDA).

    Parameters
    ----------
    batch : dict with ``spots`` (N, 4) int and ``index`` (B,), or ``image`` (B, G, P, P) float32.
    n_genes, patch_size, sigma, halo : the dataset's (``dataset.n_genes``, ``dataset.patch_size``,
        ``dataset.density_sigma``, ``dataset.density_halo``).
    device : the training device.
    """
    if "spots" not in batch:
        return batch["image"].to(device, non_blocking=True)
    spots = batch["spots"].to(device, non_blocking=True)
    return batch_density(spots, len(batch["index"]), n_genes, patch_size, sigma, halo=halo, device=device)


def _window(kernel: Tensor, offset: Tensor, radius: int) -> Tensor:
    """``kernel[offset + radius]`` where ``|offset| <= radius``, else 0; any shape of integer offsets."""
    inside = offset.abs() <= radius
    return torch.where(inside, kernel[(offset + radius).clamp(0, 2 * radius)], kernel.new_zeros(()))
