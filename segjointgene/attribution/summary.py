"""Device-side reductions of an attribution, and the entry point the trainer calls.

The full (B, T, n_gene, H, W) attribution of a batch is never kept for all cell types at once nor moved to the host:
each chunk of cell types is reduced on the device as soon as it is computed (SPEC §4, reference defect 21) into

* ``gene_sum`` (B, T, H, W): the score summed over the target genes, from which the label rule takes the per-pixel
  dominant cell type;
* ``type_gene_sum`` (T, n_gene) and ``type_pixels`` (T,): running sums over the pixels labelled with each target
  type, which the trainer adds up over batches for gene prioritization (mean score = sum / pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._base import ForwardFunc

if TYPE_CHECKING:  # config is layer 0, imported for annotations only
    from ..config import AttributionConfig

log = logging.getLogger(__name__)

__all__ = ["AttributionSummary", "summarize"]


@dataclass(frozen=True)
class AttributionSummary:
    """Per-batch reductions of an attribution; every tensor lives on the device of the input images.

    Attributes
    ----------
    gene_sum : (B, T, H, W) float32
        For each target type t (in the order of ``targets``), the attribution summed over the target genes at each
        pixel. CID: scores are ``-(pi e / 2) log sigma`` (larger = the type's output needs the genes there more).
        IG: absolute attributions.
    type_gene_sum : (T, n_gene) float64
        Sum, over the pixels whose label equals ``targets[t]``, of the attribution of each target gene.
    type_pixels : (T,) float64
        The number of those pixels (over the batch).
    n_steps : (B, T) int64
        CID: optimisation steps actually applied to each (sample, type); IG: its number of interpolation steps.
    """

    gene_sum: Tensor
    type_gene_sum: Tensor
    type_pixels: Tensor
    n_steps: Tensor


def check_labels(labels: Tensor, inputs: Tensor) -> Tensor:
    """Check ``labels`` is a (B, H, W) integer class map matching ``inputs`` (B, G, H, W); return it on their device."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor (B, H, W) of class ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer class map, got {labels.dtype}; use labels.long()")
    want = (inputs.shape[0], *inputs.shape[2:])
    if tuple(labels.shape) != want:
        raise ValueError(f"labels must have shape (B, H, W) = {want} to match the images, got {tuple(labels.shape)}")
    return labels.to(inputs.device)


class SummaryAccumulator:
    """Builds an :class:`AttributionSummary` from chunks of cell types, on the device.

    Parameters
    ----------
    labels : (B, H, W) int tensor, class ids (0 = background).
    targets : (T,) int64 tensor of class ids.
    n_gene : number of target genes.
    """

    def __init__(self, labels: Tensor, targets: Tensor, n_gene: int) -> None:
        b, h, w = labels.shape
        t, dev = targets.numel(), labels.device
        self.labels, self.targets = labels, targets
        self.gene_sum = torch.zeros((b, t, h, w), dtype=torch.float32, device=dev)
        self.type_gene_sum = torch.zeros((t, n_gene), dtype=torch.float64, device=dev)
        self.type_pixels = torch.zeros(t, dtype=torch.float64, device=dev)
        self.n_steps = torch.zeros((b, t), dtype=torch.int64, device=dev)

    def add(self, positions: list[int], scores: Tensor, n_steps: Tensor) -> None:
        """Reduce one chunk: ``scores`` (Tc, B, n_gene, H, W) float, ``n_steps`` (Tc, B) for target positions."""
        pos = torch.as_tensor(positions, dtype=torch.int64, device=scores.device)
        self.gene_sum[:, pos] = scores.sum(dim=2).transpose(0, 1).float()  # (B, Tc, H, W)
        mask = self.labels.unsqueeze(0) == self.targets[pos].view(-1, 1, 1, 1)  # (Tc, B, H, W)
        per_gene = torch.einsum("tbghw,tbhw->tg", scores.float(), mask.float())  # (Tc, n_gene)
        self.type_gene_sum[pos] = per_gene.double()
        self.type_pixels[pos] = mask.flatten(1).sum(dim=1).double()
        self.n_steps[:, pos] = n_steps.transpose(0, 1).to(torch.int64)

    def result(self) -> AttributionSummary:
        return AttributionSummary(self.gene_sum, self.type_gene_sum, self.type_pixels, self.n_steps)


def summarize(model: ForwardFunc, images: Tensor, labels: Tensor, targets: Tensor, genes: Tensor, *,
              config: AttributionConfig, generator: torch.Generator | None = None) -> AttributionSummary | None:
    """Attribute a batch with the method of ``config`` and reduce it on the device.

    Parameters
    ----------
    model : nn.Module or callable, (N, G, H, W) -> (N, K, H, W) logits. Put in eval mode with frozen parameters for
        the call and restored afterwards.
    images : (B, G, H, W) float tensor.
    labels : (B, H, W) int tensor, the current class map (0 = background).
    targets : (T,) int64 tensor of cell-type ids (output channels), e.g. from :func:`select_targets`.
    genes : (n_gene,) int64 tensor of gene ids (input channels).
    config : AttributionConfig; ``method`` picks CID, IG or none, the ``cid_*`` / ``ig_*`` fields give the budget.
    generator : torch.Generator, required for CID (its noise), unused by IG.

    Returns
    -------
    AttributionSummary, or None when ``config.method == "none"``.
    """
    if config.method == "none":
        return None
    if config.method == "CID":
        from .cid import CID

        return CID(model).summarize(images, labels, targets, genes=genes, n_steps=config.cid_n_steps,
                                    lr=config.cid_lr, lambda_=config.cid_lambda, beta=config.cid_beta,
                                    stop=config.cid_stop, init_log_sigma=config.cid_init_log_sigma,
                                    warm_start=config.cid_warm_start, chunk_size=config.cid_chunk_size, generator=generator)
    if config.method == "IG":
        from .ig import IG

        return IG(model).summarize(images, labels, targets, genes=genes, n_steps=config.ig_n_steps,
                                   chunk_size=config.cid_chunk_size)
    raise ValueError(f"config.method must be CID, IG or none, got {config.method!r}")
