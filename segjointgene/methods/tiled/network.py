"""The network of a tiled run (layer 2.6: torch, numpy): trained once on a sample of tiles, applied to every tile.

As in an untiled run of the spot model (:mod:`segjointgene.methods.segjointgene.trainer.spots`), the UNet learns the
engine's cells - the cell type of every pixel - from the spots' per-gene densities, and its posterior at the spots, as
likelihood ratios (:func:`segjointgene.methods.spotmodel.engine.network_evidence`), is added to the spot model when it
fits a tile. Here it learns from the engine's results on a few tiles drawn at random (weighted by their nuclei,
``--tile_network_tiles``) and is then applied to every tile by inference. It reads the spots, not stored density images
(a whole slide's would fit nowhere): its first layer is computed from them (:class:`SpotUNet`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segjointgene.preprocess.density import gaussian_kernel1d

from ..segjointgene.checkpoint import load_checkpoint, save_checkpoint
from ..segjointgene.labels import IGNORE
from ..segjointgene.unet import UNet

log = logging.getLogger(__name__)

__all__ = ["NetworkSpec", "TrainingWindow", "load_network", "patch_origins", "sample_tiles", "save_network",
           "spot_log_posterior", "train_network"]

#: Training patches per epoch: a fixed cost whatever the tiles' size (an untiled run's epoch is every patch).
PATCHES_PER_EPOCH = 64


@dataclass(frozen=True)
class NetworkSpec:
    """What fixes the network's shape and its images: genes G, classes K (0 = background), patch edge, density."""

    n_genes: int
    n_classes: int
    patch_size: int
    width: int
    sigma: float
    halo: int

    def build(self) -> SpotUNet:
        return SpotUNet(self)


class SpotUNet(nn.Module):
    """The UNet on a patch's per-gene Gaussian spot densities, its first 3 x 3 convolution computed from the spots.

    A convolution ``W`` of the densities ``K * S`` (Gaussian ``K``, spot counts ``S``) equals ``K * (W * S)``, and
    ``W * S`` stamps each spot's 3 x 3 weights of its gene around it: the first layer costs 9 x C values per spot and
    a C-channel blur, instead of building G density images and convolving them (C = ``width`` = 16, G = 300 genes:
    measured per 2048-px tile: 26.5 -> 10.1 s of inference under the same load). Unlike a convolution of a zero-padded patch image it sees the
    densities beyond the patch's edge (the spots within the halo); training and inference both use it.

    ``forward(spots, batch_size)``: ``spots`` (N, 4) int ``(sample, gene, row, col)``, rows and columns relative to
    the sample's patch (:func:`_batch_spots`); returns (B, K, P, P) logits.
    """

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        self.first = nn.Parameter(torch.empty(spec.width, spec.n_genes, 3, 3))
        nn.init.kaiming_uniform_(self.first, a=math.sqrt(5))  # as nn.Conv2d initialises its weight
        self.body = UNet(1, spec.n_classes, base_channels=spec.width)
        self.body.inc[0] = nn.Identity()  # replaced by the stamps
        kernel = gaussian_kernel1d(spec.sigma) if spec.sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    @property
    def reach(self) -> int:
        """How far (px) beyond the patch a spot still reaches into it."""
        return (self.kernel.numel() - 1) // 2 + 1

    def forward(self, spots: torch.Tensor, batch_size: int) -> torch.Tensor:
        return self.body(self.first_layer(spots, batch_size))

    def first_layer(self, spots: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B, C, P, P): the first convolution of the densities (before its BatchNorm)."""
        p, m, c = self.spec.patch_size, self.reach, self.spec.width
        side = p + 2 * m
        b, g, r, col = spots.long().unbind(1)
        # conv: y(q) = sum_d W[d] x(q + d), so a spot at s adds W[d] at q = s - d (d in {-1, 0, 1}^2)
        d = torch.arange(-1, 2, device=spots.device)
        rr = (r[:, None, None] - d[None, :, None] + m).expand(-1, 3, 3)
        cc = (col[:, None, None] - d[None, None, :] + m).expand(-1, 3, 3)
        ok = (rr >= 0) & (rr < side) & (cc >= 0) & (cc < side)  # (n, 3, 3)
        weights = self.first[:, g].permute(1, 2, 3, 0)  # (n, 3, 3, C): W[:, gene, dy + 1, dx + 1]
        z = self.first.new_zeros((batch_size, side, side, c)).index_put(
            (b[:, None, None].expand(-1, 3, 3)[ok], rr[ok], cc[ok]), weights[ok], accumulate=True)
        z = z.permute(0, 3, 1, 2)
        k = self.kernel.numel()
        z = F.conv2d(z, self.kernel.view(1, 1, k, 1).expand(c, 1, k, 1).contiguous(), groups=c)
        z = F.conv2d(z, self.kernel.view(1, 1, 1, k).expand(c, 1, 1, k).contiguous(), groups=c)
        off = m - (k - 1) // 2  # the blur (valid) dropped (k - 1) / 2 on each side
        return z[:, :, off:off + p, off:off + p]


@dataclass(frozen=True)
class TrainingWindow:
    """One tile's training data: its spots (window frame) and the class of every pixel of the window (``IGNORE``
    outside the part to learn, e.g. the tile's margin)."""

    x: np.ndarray
    y: np.ndarray
    gene: np.ndarray
    labels: np.ndarray  # (H, W) int64


def sample_tiles(weights: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` tiles drawn without replacement with probability proportional to ``weights`` (e.g. their
    nuclei), ascending; every tile with weight > 0 when there are no more than ``n`` of them.

    Examples
    --------
    >>> sample_tiles(np.array([0, 5, 0, 1]), 3, 0).tolist()
    [1, 3]
    """
    weights = np.asarray(weights, np.float64)
    cand = np.flatnonzero(weights > 0)
    if cand.size <= n:
        return cand
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(cand, size=n, replace=False, p=weights[cand] / weights[cand].sum()))


def patch_origins(shape: tuple[int, int], p: int) -> np.ndarray:
    """(n, 2) top-left corners of the ``p``-px patches covering a window of ``shape`` (the last ones reach past it).

    Examples
    --------
    >>> patch_origins((5, 3), 4).tolist()
    [[0, 0], [4, 0]]
    """
    ys, xs = np.arange(0, shape[0], p), np.arange(0, shape[1], p)
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)


def _batch_spots(x: np.ndarray, y: np.ndarray, gene: np.ndarray, origins: np.ndarray, p: int,
                 halo: int) -> torch.Tensor:
    """(N, 4) ``(sample, gene, row, col)`` rows of the spots within ``halo`` px of each patch (for batch_density)."""
    r, c = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    parts = []
    for i, (oy, ox) in enumerate(origins.tolist()):
        sel = np.flatnonzero((r >= oy - halo) & (r < oy + p + halo) & (c >= ox - halo) & (c < ox + p + halo))
        parts.append(np.stack([np.full(sel.size, i), gene[sel], r[sel] - oy, c[sel] - ox], 1))
    return torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else torch.zeros((0, 4), torch.int64)


def _forward(net: SpotUNet, x, y, gene, origins: np.ndarray) -> torch.Tensor:
    """The network's logits on the patches at ``origins`` of the window of the spots ``x, y, gene``."""
    return net(_batch_spots(x, y, gene, origins, net.spec.patch_size, net.reach), len(origins))


def _dihedral(spots: torch.Tensor, labels: torch.Tensor, p: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flip / 90-degree rotation of each sample's spots (pixel ``(r, c)`` of a ``p``-px patch) and
    labels, as :func:`segjointgene.preprocess.dataset.augment_patches` does to images."""
    codes = torch.randint(0, 8, (labels.shape[0],), generator=generator)
    code = codes[spots[:, 0]]
    r, c = spots[:, 2].clone(), spots[:, 3].clone()
    flip = (code & 4) > 0
    c = torch.where(flip, p - 1 - c, c)
    for _ in range(3):  # rot90 by k (counter-clockwise, as torch.rot90 on dims (-2, -1)): (r, c) -> (p - 1 - c, r)
        turn = (code & 3) > _
        r, c = torch.where(turn, p - 1 - c, r), torch.where(turn, r, c)
    out = []
    for i, k in enumerate(codes.tolist()):
        lab = labels[i].flip(-1) if k & 4 else labels[i]
        out.append(torch.rot90(lab, k & 3, dims=(-2, -1)))
    return torch.stack([spots[:, 0], spots[:, 1], r, c], 1), torch.stack(out)


def _label_patches(labels: np.ndarray, origins: np.ndarray, p: int) -> torch.Tensor:
    out = np.full((len(origins), p, p), IGNORE, np.int64)
    for i, (oy, ox) in enumerate(origins.tolist()):
        part = labels[oy:oy + p, ox:ox + p]
        out[i, :part.shape[0], :part.shape[1]] = part
    return torch.from_numpy(out)


def train_network(windows: Sequence[TrainingWindow], spec: NetworkSpec, *, epochs: int, batch_size: int, lr: float,
                  seed: int, augment: bool = True, per_epoch: int = PATCHES_PER_EPOCH) -> SpotUNet:
    """Train a UNet on the windows' patches (those with a labelled pixel): cross-entropy on the labelled pixels,
    Adam, ``epochs`` epochs of ``per_epoch`` patches drawn at random (seeded), random flips / rotations.
    Deterministic on CPU."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # e.g. the densities' scatter-add sums in a fixed order on any thread count
    try:
        return _train(windows, spec, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=augment,
                      per_epoch=per_epoch)
    finally:
        torch.use_deterministic_algorithms(was)


def _train(windows, spec: NetworkSpec, *, epochs, batch_size, lr, seed, augment, per_epoch) -> SpotUNet:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = spec.build()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    items = [(w, o) for w in windows for o in patch_origins(w.labels.shape, spec.patch_size)
             if (w.labels[o[0]:o[0] + spec.patch_size, o[1]:o[1] + spec.patch_size] != IGNORE).any()]
    if not items:
        raise ValueError("no labelled pixel in the training windows")
    t0 = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        total, pixels = 0.0, 0
        order = torch.randperm(len(items), generator=generator)[:per_epoch]
        for start in range(0, len(order), batch_size):
            chosen = [items[i] for i in order[start:start + batch_size].tolist()]
            spots = [_batch_spots(w.x, w.y, w.gene, o[None], spec.patch_size, net.reach) for w, o in chosen]
            spots = torch.cat([s.index_fill(1, torch.tensor([0]), i) for i, s in enumerate(spots)])
            labels = torch.cat([_label_patches(w.labels, o[None], spec.patch_size) for w, o in chosen])
            if augment:
                spots, labels = _dihedral(spots, labels, spec.patch_size, generator)
            loss = F.cross_entropy(net(spots, len(chosen)), labels, ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = int((labels != IGNORE).sum())
            total, pixels = total + loss.item() * n, pixels + n
        log.info("tile network: epoch %d of %d, loss %.4f (%d of %d patches, %.0f s)", epoch + 1, epochs,
                 total / max(pixels, 1), len(order), len(items), time.perf_counter() - t0)
    return net.eval()


def save_network(path, net: SpotUNet, spec: NetworkSpec, epochs: int) -> None:
    save_checkpoint(path, {"model": net.state_dict(), "epoch": int(epochs), "spec": spec.__dict__})


def load_network(path) -> tuple[SpotUNet, NetworkSpec]:
    """The network saved by :func:`save_network` (loaded with ``weights_only=True``), in eval mode."""
    state = load_checkpoint(path)
    spec = NetworkSpec(**state["spec"])
    net = spec.build()
    net.load_state_dict(state["model"])
    return net.eval(), spec


@torch.no_grad()
def spot_log_posterior(net: SpotUNet, spec: NetworkSpec, x: np.ndarray, y: np.ndarray, gene: np.ndarray,
                       shape: tuple[int, int], *, batch_size: int = 4) -> np.ndarray:
    """(n, K) float64 log posterior of the network at each spot of a window of ``shape`` (rows of zeros for spots
    outside it), predicted patch by patch over the window."""
    p = spec.patch_size
    out = np.zeros((x.size, spec.n_classes), np.float64)
    r, c = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    inside = (r >= 0) & (c >= 0) & (r < shape[0]) & (c < shape[1])
    key = np.where(inside, (r // p) * (-(-shape[1] // p)) + c // p, -1)
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(-(-shape[0] // p) * -(-shape[1] // p) + 1))
    origins = patch_origins(shape, p)
    for start in range(0, len(origins), batch_size):
        batch = origins[start:start + batch_size]
        keys = np.arange(start, start + len(batch))
        if all(bounds[k] == bounds[k + 1] for k in keys):  # no spot to read: skip the patches
            continue
        logp = torch.log_softmax(_forward(net, x, y, gene, batch).float(), 1).numpy()
        for lp, k, (oy, ox) in zip(logp, keys, batch.tolist()):
            sel = order[bounds[k]:bounds[k + 1]]
            out[sel] = lp[:, r[sel] - oy, c[sel] - ox].T
    return out
