"""Augmentations of one view (docs/SEGCLR.md §2.5): parameters drawn in numpy, tensor transforms in torch.

Every view gets its own parameters; within a view the same geometric transform is applied to all channels.

====================  =====================================================================================
SegCLR                SegJointGene version (ranges are module constants)
====================  =====================================================================================
centre shift          the two centres are drawn from all pixels of the cell (see ``sampling.sample_pairs``)
flips + permutations  one of the 8 elements of the dihedral group D4 (:func:`apply_d4`)
EM grey values        gain on the gene channels x U(0.75, 1.25); contrast, brightness, gamma on DAPI only
(ST)                  binomial thinning of the spots (keep p ~ U(0.6, 1)); gene dropout (8 %); blur sigma 0-1 px
(segmentation)        the cell mask eroded or dilated by 1 px (or kept) with probability 1/3 each
====================  =====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ViewParams", "apply_d4", "draw_view_params", "gaussian_blur", "identity_params", "jitter_dapi"]

KEEP_PROB = (0.6, 1.0)
GENE_DROPOUT = 0.08
GAIN = (0.75, 1.25)
EXTRA_BLUR_PX = (0.0, 1.0)
DAPI_CONTRAST = (0.75, 1.25)
DAPI_BRIGHTNESS = (-0.25, 0.25)
DAPI_LOG2_GAMMA = (-1.0, 1.0)


@dataclass(frozen=True)
class ViewParams:
    """Augmentation parameters of N views.

    Attributes
    ----------
    keep_prob : (N,) float64 probability of keeping each spot (binomial thinning).
    gene_keep : (N, G) bool; False = the gene's channel is dropped (zeroed) in that view.
    mask_step : (N,) int64 in {-1, 0, 1}: erode, keep or dilate the cell mask by 1 px.
    extra_blur_px : (N,) float64 extra Gaussian sigma (raw pixels), combined in quadrature with the base blur.
    gain : (N,) float64 factor on the gene channels.
    dapi_contrast, dapi_brightness, dapi_gamma : (N,) float64; DAPI -> clip(d * contrast + brightness, 0, 1) ** gamma.
    d4 : (N,) int64 in 0..7: ``d4 % 4`` quarter turns, then a left-right flip when ``d4 >= 4``.
    """

    keep_prob: np.ndarray
    gene_keep: np.ndarray
    mask_step: np.ndarray
    extra_blur_px: np.ndarray
    gain: np.ndarray
    dapi_contrast: np.ndarray
    dapi_brightness: np.ndarray
    dapi_gamma: np.ndarray
    d4: np.ndarray

    def __len__(self) -> int:
        return int(self.keep_prob.size)


def identity_params(n: int, n_genes: int, *, d4: np.ndarray | None = None) -> ViewParams:
    """Parameters that change nothing (export), optionally with given D4 elements."""
    ones, zeros = np.ones(n), np.zeros(n)
    return ViewParams(keep_prob=ones, gene_keep=np.ones((n, n_genes), bool), mask_step=np.zeros(n, np.int64),
                      extra_blur_px=zeros, gain=ones, dapi_contrast=ones, dapi_brightness=zeros, dapi_gamma=ones,
                      d4=np.zeros(n, np.int64) if d4 is None else np.asarray(d4, np.int64))


def draw_view_params(n: int, n_genes: int, rng: np.random.Generator) -> ViewParams:
    """Random augmentation parameters of ``n`` views (ranges: module constants; all draws from ``rng``)."""
    return ViewParams(
        keep_prob=rng.uniform(*KEEP_PROB, n),
        gene_keep=rng.random((n, n_genes)) >= GENE_DROPOUT,
        mask_step=rng.integers(-1, 2, n),
        extra_blur_px=rng.uniform(*EXTRA_BLUR_PX, n),
        gain=rng.uniform(*GAIN, n),
        dapi_contrast=rng.uniform(*DAPI_CONTRAST, n),
        dapi_brightness=rng.uniform(*DAPI_BRIGHTNESS, n),
        dapi_gamma=2.0 ** rng.uniform(*DAPI_LOG2_GAMMA, n),
        d4=rng.integers(0, 8, n),
    )


def apply_d4(x: torch.Tensor, d4: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Apply one D4 element per sample to a (N, C, S, S) tensor (all channels of a sample alike).

    Element ``k``: ``k % 4`` counter-clockwise quarter turns, then a left-right flip when ``k >= 4``. The inverse of
    ``k < 4`` is ``(4 - k) % 4``; every ``k >= 4`` is its own inverse.

    Examples
    --------
    >>> x = torch.arange(4.).reshape(1, 1, 2, 2)
    >>> apply_d4(x, [1])[0, 0].tolist(), apply_d4(x, [4])[0, 0].tolist()
    ([[1.0, 3.0], [0.0, 2.0]], [[1.0, 0.0], [3.0, 2.0]])
    """
    d4 = np.asarray(d4, np.int64)
    out = x.clone()
    for k in np.unique(d4):
        sel = torch.as_tensor(np.flatnonzero(d4 == k))
        y = torch.rot90(x[sel], int(k) % 4, dims=(2, 3))
        if k >= 4:
            y = torch.flip(y, dims=(3,))
        out[sel] = y
    return out


def gaussian_blur(x: torch.Tensor, sigma: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Blur every channel of sample ``n`` of a (N, C, S, S) tensor with its own Gaussian ``sigma[n]`` (pixels).

    Zero padding (content outside the crop is unknown). ``sigma < 0.2`` leaves the sample unchanged.
    """
    sigma = torch.as_tensor(np.asarray(sigma, np.float64), dtype=torch.float64)
    n, c, h, w = x.shape
    if not bool((sigma >= 0.2).any()):
        return x
    radius = max(1, int(np.ceil(3.0 * float(sigma.max()))))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t[None, :] / sigma.clamp(min=1e-3)[:, None]) ** 2)  # (N, K)
    k = k / k.sum(1, keepdim=True)
    ident = torch.zeros_like(k)
    ident[:, radius] = 1.0
    k = torch.where((sigma >= 0.2)[:, None], k, ident).to(x.dtype)
    kk = k.repeat_interleave(c, 0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(y, kk[:, None, None, :], padding=(0, radius), groups=n * c)  # along columns
    y = F.conv2d(y, kk[:, None, :, None], padding=(radius, 0), groups=n * c)  # along rows
    return y.reshape(n, c, h, w)


def jitter_dapi(dapi: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """Grey-value jitter of a (N, S, S) DAPI stack in [0, 1]: clip(d * contrast + brightness, 0, 1) ** gamma."""
    f = lambda a: torch.as_tensor(a, dtype=dapi.dtype)[:, None, None]  # noqa: E731
    return (dapi * f(params.dapi_contrast) + f(params.dapi_brightness)).clamp(0.0, 1.0) ** f(params.dapi_gamma)
