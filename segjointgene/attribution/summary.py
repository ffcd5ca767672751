"""Device-side reductions of an attribution (the methods in :mod:`.cid` and :mod:`.ig` build them).

The full (B, T, n_gene, H, W) attribution of a batch is never kept for all cell types at once nor moved to the host:
each chunk of cell types is reduced on the device as soon as it is computed (SPEC §4, reference defect 21) into

* ``gene_sum`` (B, T, H, W): the score summed over the target genes, from which the label rule takes the per-pixel
  dominant cell type;
* ``type_gene_sum`` (T, n_gene) and ``type_pixels`` (T,): running sums over the pixels labelled with each target
  type, which the trainer adds up over batches for gene prioritization (mean score = sum / pixels).

Skipping work that nothing uses (``AttributionConfig.cid_skip`` / ``cid_types``): the label update reads the
attribution only at pixels within its reach of a labelled pixel, and the gene ranking only at labelled pixels. Given
the class map of the window the label update reads around each patch (the patch enlarged by the label halo,
``context``), :func:`needed_rows` marks the (sample, type) pairs worth computing:

* ``cid_skip``: a patch whose window holds no labelled pixel is skipped whole. No label can change there and it has
  no labelled pixel to rank genes on, so every result that is used is unchanged (its ``gene_sum`` is 0: "no
  information", which never blocks a label).
* ``cid_types="local"``: in the other patches only the target types that occur in the window are computed. These are
  the only types a pixel there can join (a candidate type is always the type of a labelled cell within reach), and
  the only ones with labelled pixels there, so ``type_gene_sum`` / ``type_pixels`` are unchanged; but the dominant
  attributed type at a pixel is then taken among them (the others are ``-inf``), not among all targets, so the label
  rule's attribution test can differ from ``"all"`` where a type absent from the neighbourhood would dominate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["AttributionSummary", "SummaryAccumulator", "check_labels", "check_rows", "needed_rows"]


@dataclass(frozen=True)
class AttributionSummary:
    """Per-batch reductions of an attribution; every tensor lives on the device of the input images.

    Attributes
    ----------
    gene_sum : (B, T, H, W) float32
        For each target type t (in the order of ``targets``), the attribution summed over the target genes at each
        pixel. CID: scores are ``-(pi e / 2) log sigma`` (larger = the type's output needs the genes there more).
        IG: absolute attributions. Pairs left out (:func:`needed_rows`): 0 everywhere in a sample left out whole
        (constant over types: no information), ``-inf`` for a type left out of a computed sample (never dominant).
    type_gene_sum : (T, n_gene) float64
        Sum, over the pixels whose label equals ``targets[t]``, of the attribution of each target gene.
    type_pixels : (T,) float64
        The number of those pixels (over the batch).
    n_steps : (B, T) int64
        CID: optimisation steps actually applied to each (sample, type), 0 for pairs left out; IG: its number of
        interpolation steps.
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


def check_rows(rows: Tensor, batch_size: int, n_targets: int, device: torch.device) -> Tensor:
    """Check ``rows`` is a (B, T) bool tensor of (sample, target type) pairs; return it on ``device``."""
    if not isinstance(rows, Tensor) or rows.dtype != torch.bool:
        raise TypeError(f"rows must be a (B, T) bool tensor, got {getattr(rows, 'dtype', type(rows).__name__)}")
    if tuple(rows.shape) != (batch_size, n_targets):
        raise ValueError(f"rows must have shape (B, T) = {(batch_size, n_targets)}, got {tuple(rows.shape)}")
    return rows.to(device)


def needed_rows(context: Tensor, targets: Tensor, *, skip: bool = True, local_types: bool = False) -> Tensor:
    """(B, T) bool: the (sample, target type) pairs whose attribution the label update or the gene ranking can use.

    Parameters
    ----------
    context : (B, H', W') int tensor
        Class map (0 = background) of the window the label update reads around each patch: the patch enlarged by
        the label halo, with the neighbouring patches' labels (the trainer's ``_SectionLabels.context``). The
        patch's own class map is enough only where no neighbour's cell can reach the patch.
    targets : (T,) int64 tensor of class ids.
    skip : leave out samples whose window holds no labelled pixel.
    local_types : in the other samples keep only the target types present in the window (module docstring).

    Examples
    --------
    >>> ctx = torch.zeros(3, 4, 4, dtype=torch.long); ctx[0, 1, 1] = 2; ctx[1, 0, 3] = 5
    >>> needed_rows(ctx, torch.tensor([2, 5, 7])).tolist()
    [[True, True, True], [True, True, True], [False, False, False]]
    >>> needed_rows(ctx, torch.tensor([2, 5, 7]), local_types=True).tolist()
    [[True, False, False], [False, True, False], [False, False, False]]
    """
    if context.ndim != 3 or context.is_floating_point():
        raise ValueError(f"context must be a (B, H, W) integer class map, got {tuple(context.shape)} {context.dtype}")
    b, t = context.shape[0], targets.numel()
    targets = targets.to(context.device)
    if local_types:
        flat = context.flatten(1)  # (B, H'W')
        return torch.stack([(flat == c).any(dim=1) for c in targets], dim=1) if t else torch.zeros(
            (b, 0), dtype=torch.bool, device=context.device)
    labelled = (context > 0).flatten(1).any(dim=1) if skip else torch.ones(b, dtype=torch.bool, device=context.device)
    return labelled[:, None].expand(b, t).clone()


class SummaryAccumulator:
    """Builds an :class:`AttributionSummary` from chunks of cell types (or of (sample, type) rows), on the device.

    Parameters
    ----------
    labels : (B, H, W) int tensor, class ids (0 = background).
    targets : (T,) int64 tensor of class ids.
    n_gene : number of target genes.
    computed : (B, T) bool tensor, optional: the pairs that will be added (all when None); the others keep the
        fill values of :class:`AttributionSummary`.
    """

    def __init__(self, labels: Tensor, targets: Tensor, n_gene: int, computed: Tensor | None = None) -> None:
        b, h, w = labels.shape
        t, dev = targets.numel(), labels.device
        self.labels, self.targets = labels, targets
        self.gene_sum = torch.zeros((b, t, h, w), dtype=torch.float32, device=dev)
        if computed is not None:  # a type left out of a computed sample is never the dominant one
            partial = computed.any(dim=1, keepdim=True) & ~computed  # (B, T)
            self.gene_sum.masked_fill_(partial[:, :, None, None], float("-inf"))
        self.type_gene_sum = torch.zeros((t, n_gene), dtype=torch.float64, device=dev)
        self.type_pixels = torch.stack([(labels == c).sum() for c in targets]).double() if t else torch.zeros(
            0, dtype=torch.float64, device=dev)
        self.n_steps = torch.zeros((b, t), dtype=torch.int64, device=dev)

    def add_rows(self, position: Tensor, sample: Tensor, scores: Tensor, n_steps: Tensor) -> None:
        """Reduce N (sample, type) rows: ``position`` / ``sample`` (N,) int64, ``scores`` (N, n_gene, H, W) float,
        ``n_steps`` (N,)."""
        self.gene_sum[sample, position] = scores.sum(dim=1).float()  # (N, H, W)
        mask = self.labels.index_select(0, sample) == self.targets[position].view(-1, 1, 1)  # (N, H, W)
        per_gene = torch.einsum("nghw,nhw->ng", scores.float(), mask.float())  # (N, n_gene)
        # accumulate=True: deterministic on CUDA too (rows of one type may come in one call)
        self.type_gene_sum.index_put_((position,), per_gene.double(), accumulate=True)
        self.n_steps[sample, position] = n_steps.to(torch.int64)

    def result(self) -> AttributionSummary:
        return AttributionSummary(self.gene_sum, self.type_gene_sum, self.type_pixels, self.n_steps)
