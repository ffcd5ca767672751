"""The attribution the trainer asks for: the method of an :class:`~segjointgene.config.AttributionConfig`, run and
reduced on the device (:func:`summarize`).

This module sits above the methods (:mod:`.cid`, :mod:`.ig`) and their reductions (:mod:`.summary`): it imports them,
none of them imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._base import ForwardFunc
from .cid import CID
from .ig import IG
from .summary import AttributionSummary, needed_rows

if TYPE_CHECKING:  # config is layer 0, imported for annotations only
    from ..config import AttributionConfig

__all__ = ["summarize"]


def summarize(model: ForwardFunc, images: Tensor, labels: Tensor, targets: Tensor, genes: Tensor, *,
              config: AttributionConfig, generator: torch.Generator | None = None,
              context: Tensor | None = None, mixed_precision: bool = True) -> AttributionSummary | None:
    """Attribute a batch with the method of ``config`` and reduce it on the device.

    Parameters
    ----------
    model : nn.Module or callable, (N, G, H, W) -> (N, K, H, W) logits. Put in eval mode with frozen parameters for
        the call and restored afterwards.
    images : (B, G, H, W) float tensor.
    labels : (B, H, W) int tensor, the current class map (0 = background).
    targets : (T,) int64 tensor of cell-type ids (output channels), e.g. from :func:`select_targets`.
    genes : (n_gene,) int64 tensor of gene ids (input channels).
    config : AttributionConfig; ``method`` picks CID, IG or none, the ``cid_*`` / ``ig_*`` fields give the budget,
        ``cid_skip`` / ``cid_types`` what CID may leave out, ``cid_compile`` whether it compiles the network.
    generator : torch.Generator, required for CID (its noise), unused by IG.
    context : (B, H', W') int tensor, optional
        Class map of the window the label update reads around each patch (the patch enlarged by the label halo,
        with the neighbouring patches' current labels). With it CID leaves out the (sample, type) pairs nothing can
        use (:func:`needed_rows`, module docstring); without it every pair is computed.
    mixed_precision : autocast the forward passes on CUDA (the trainer's ``--amp``); ignored on CPU.

    Returns
    -------
    AttributionSummary, or None when ``config.method == "none"``.
    """
    if config.method == "none":
        return None
    if config.method == "CID":
        rows = None
        if context is not None and (config.cid_skip or config.cid_types == "local"):
            rows = needed_rows(context.to(images.device), targets, skip=config.cid_skip,
                               local_types=config.cid_types == "local")
        cid = CID(model, mixed_precision=mixed_precision, compile=config.cid_compile)
        return cid.summarize(images, labels, targets, genes=genes, n_steps=config.cid_n_steps, lr=config.cid_lr,
                             lambda_=config.cid_lambda, beta=config.cid_beta, stop=config.cid_stop,
                             init_log_sigma=config.cid_init_log_sigma, warm_start=config.cid_warm_start,
                             chunk_size=config.cid_chunk_size, generator=generator, rows=rows)
    if config.method == "IG":
        return IG(model, mixed_precision=mixed_precision).summarize(images, labels, targets, genes=genes, n_steps=config.ig_n_steps,
                                   chunk_size=config.cid_chunk_size)
    raise ValueError(f"config.method must be CID, IG or none, got {config.method!r}")
