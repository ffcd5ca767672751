"""What is attributed: target selection and the forward wrappers that turn a segmentation net into targets.

* :func:`select_targets` picks the target genes (input channels) and cell types (output channels) (SPEC §3).
* :class:`ClassLogitMap` returns one cell type's logit map per row, (N, H, W): the output CID keeps close to clean.
* :class:`MaskedClassSum` returns one cell type's logits summed over a fixed pixel mask per row, (N,): the scalar
  integrated gradients explains (captum's ``agg_segmentation_wrapper`` pattern).
* :func:`prediction_masks` fixes that mask from the clean prediction.

Rows of a batch may ask for different cell types: the wrappers take a per-row class id, so all cell types of a chunk
run in one batched forward pass (inputs replicated per type, type-major: row ``t * B + b``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import ForwardFunc

__all__ = ["ClassLogitMap", "MaskedClassSum", "prediction_masks", "select_targets"]


def _top_ids(values: Tensor, n: int) -> Tensor:
    """Ids of the ``n`` largest values, descending; ties go to the lower id (a stable sort)."""
    order = torch.sort(values, descending=True, stable=True).indices
    return order[:n].to(torch.int64)


def select_targets(gene_totals: Tensor, class_pixels: Tensor, n_gene: int, n_celltype: int) -> tuple[Tensor, Tensor]:
    """Target genes and cell types of the attribution (SPEC §3, reference §10.1 without its +1 offset).

    Parameters
    ----------
    gene_totals : (G,) float or int tensor
        Total density of each input channel over the training set.
    class_pixels : (K,) int or float tensor
        Pixel count of each class in the current labels; index 0 is background and never selected.
    n_gene, n_celltype : int >= 1
        How many to select; capped at what exists.

    Returns
    -------
    genes : (min(n_gene, G),) int64 tensor on ``gene_totals``' device
        Channel ids by total, descending; ties go to the lower id. Channels with a zero total can be selected when
        fewer than ``n_gene`` channels have spots.
    classes : (min(n_celltype, K'),) int64 tensor on ``class_pixels``' device
        Class ids by pixel count, descending, ties to the lower id, among the K' non-background classes that have at
        least one pixel (a class without pixels has no territory to grow and no pixels to rank genes on). Empty
        when no non-background class has pixels.

    Raises
    ------
    TypeError, ValueError
        For a non-tensor or non-1-D input, or ``n_gene`` / ``n_celltype`` below 1.

    Examples
    --------
    >>> genes, classes = select_targets(torch.tensor([1.0, 5.0, 5.0, 0.0]), torch.tensor([900, 3, 0, 7]), 2, 5)
    >>> genes.tolist(), classes.tolist()
    ([1, 2], [3, 1])
    """
    for name, t in (("gene_totals", gene_totals), ("class_pixels", class_pixels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}; use torch.as_tensor(...)")
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    for name, n in (("n_gene", n_gene), ("n_celltype", n_celltype)):
        if int(n) < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    genes = _top_ids(gene_totals.double(), int(n_gene))
    counts = class_pixels.double().clone()
    if counts.numel():
        counts[0] = -1.0  # background is never a target
    present = int((counts > 0).sum())
    classes = _top_ids(counts, min(int(n_celltype), present))
    return genes, classes


class ClassLogitMap:
    """Forward wrapper: the logit map of one cell type per row.

    Parameters
    ----------
    forward_func : (N, G, H, W) -> (N, K, H, W) logits.

    Call
    ----
    ``wrapper(x, classes)`` with ``x`` (N, G, H, W) and ``classes`` (N,) int64 returns (N, H, W) float32:
    ``forward_func(x)[n, classes[n]]``.
    """

    def __init__(self, forward_func: ForwardFunc) -> None:
        self.forward_func = forward_func

    def __call__(self, x: Tensor, classes: Tensor) -> Tensor:
        logits = self.forward_func(x)  # (N, K, H, W)
        index = classes.view(-1, 1, 1, 1).expand(-1, 1, *logits.shape[2:])
        return logits.gather(1, index)[:, 0].float()  # (N, H, W)


class MaskedClassSum:
    """Forward wrapper: one cell type's logits summed over a fixed pixel mask, one scalar per row.

    Call
    ----
    ``wrapper(x, mask, classes)`` with ``x`` (N, G, H, W), ``mask`` (N, H, W) bool and ``classes`` (N,) int64 returns
    (N,) float32: ``sum(forward_func(x)[n, classes[n]] * mask[n])``. captum repeats ``mask`` and ``classes`` (passed
    as ``additional_forward_args``) along the batch for each interpolation step.
    """

    def __init__(self, forward_func: ForwardFunc) -> None:
        self.logit_map = ClassLogitMap(forward_func)

    def __call__(self, x: Tensor, mask: Tensor, classes: Tensor) -> Tensor:
        return (self.logit_map(x, classes) * mask).sum(dim=(1, 2))  # (N,)


def prediction_masks(logits: Tensor, classes: Tensor) -> Tensor:
    """Pixels predicted as each target class; all pixels of a sample where the class is never predicted.

    Parameters
    ----------
    logits : (B, K, H, W) float tensor, the clean prediction.
    classes : (T,) int64 tensor of class ids.

    Returns
    -------
    (T, B, H, W) bool tensor.
    """
    pred = logits.argmax(dim=1)  # (B, H, W)
    mask = pred.unsqueeze(0) == classes.view(-1, 1, 1, 1)  # (T, B, H, W)
    empty = ~mask.flatten(2).any(dim=2)  # (T, B)
    return mask | empty[:, :, None, None]

