"""Integrated gradients on the cell-type target wrapper (``--attr_method IG``, reference §11.4), via captum.

For each target cell type c, the explained scalar of a sample is the sum of c's logits over the pixels the clean
prediction assigns to c (all pixels when c is predicted nowhere in that sample), from a zero baseline
(:class:`~segjointgene.attribution.targets.MaskedClassSum`). The cell types of a chunk run together: inputs are
replicated per type and the per-row mask and class id are passed to captum as ``additional_forward_args``.
Unlike the reference (defect 20) the model runs in eval mode with frozen parameters, so BatchNorm statistics are
untouched, and its state is restored afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ._base import (
    Attribution,
    ForwardFunc,
    TargetType,
    batch_forward_oom,
    format_genes,
    format_inputs,
    format_targets,
    frozen_model,
    mixed_precision,
    split_on_oom,
)
from .summary import AttributionSummary, SummaryAccumulator, check_labels
from .targets import MaskedClassSum, prediction_masks

log = logging.getLogger(__name__)

__all__ = ["IG", "IGResult"]


@dataclass(frozen=True)
class IGResult:
    """Result of :meth:`IG.attribute`.

    Attributes
    ----------
    attributions : (B, T, n_gene, H, W) float32, signed integrated gradients of the target genes' channels.
    convergence_delta : (B, T) float32, captum's completeness error over *all* input channels: the sum of the
        attributions minus (F(x) - F(0)) for the masked logit sum F; small when ``n_steps`` is large enough.
    """

    attributions: Tensor
    convergence_delta: Tensor


class IG(Attribution):
    """Integrated gradients of a cell type's masked logit sum (wraps ``captum.attr.IntegratedGradients``).

    Parameters
    ----------
    forward_func : nn.Module or callable, (N, G, H, W) -> (N, K, H, W) logits; an ``nn.Module`` is put in eval mode
        with frozen parameters for the call and restored afterwards.
    mixed_precision : autocast the forward passes on CUDA (ignored on CPU).
    """

    def __init__(self, forward_func: ForwardFunc, *, mixed_precision: bool = True) -> None:
        super().__init__(forward_func)
        self.mixed_precision = bool(mixed_precision)

    def attribute(self, inputs: Tensor, target: TargetType, *, genes: TargetType | None = None, n_steps: int = 16,
                  chunk_size: int = 8, internal_batch_size: int | None = None,
                  method: str = "gausslegendre") -> IGResult:
        """Signed IG attributions of the target genes for each target cell type.

        Parameters
        ----------
        inputs : (B, G, H, W) float tensor.
        target : cell-type ids (output channels): an int, a sequence or a (T,) int tensor; distinct.
        genes : input channels to return, (n_gene,) distinct ids; all channels when None.
        n_steps : interpolation steps between the zero baseline and the input.
        chunk_size : cell types attributed together.
        internal_batch_size : rows per forward/backward pass inside captum; default one interpolation step of a
            chunk (``chunk * B`` rows), which bounds memory like one CID step.
        method : captum's integral approximation (``gausslegendre``, ``riemann_trapezoid``, ...).

        Returns
        -------
        IGResult on the device of ``inputs``.
        """
        with torch.inference_mode(False):  # ordinary tensors even under the caller's inference_mode()
            x, classes, gene_ids = self._prepare(inputs, target, genes, n_steps, chunk_size)
            b, _, h, w = x.shape
            t = classes.numel()
            attr = torch.empty((b, t, gene_ids.numel(), h, w), dtype=torch.float32, device=x.device)
            delta = torch.empty((b, t), dtype=torch.float32, device=x.device)
            for positions, (a, d) in self._run(x, classes, gene_ids, n_steps, chunk_size, internal_batch_size, method):
                attr[:, positions] = a.transpose(0, 1)
                delta[:, positions] = d.transpose(0, 1)
            return IGResult(attr, delta)

    def summarize(self, inputs: Tensor, labels: Tensor, target: TargetType, *, genes: TargetType | None = None,
                  n_steps: int = 16, chunk_size: int = 8, internal_batch_size: int | None = None,
                  method: str = "gausslegendre") -> AttributionSummary:
        """Device-side reductions of the **absolute** IG attributions (as the reference consumed them).

        Absolute values because the label rule and gene ranking ask how much a gene matters for a type, whatever
        the sign; ``n_steps`` of the summary is ``n_steps`` everywhere. Parameters as :meth:`attribute`, plus
        ``labels`` (B, H, W) int class map.
        """
        with torch.inference_mode(False):  # ordinary tensors even under the caller's inference_mode()
            x, classes, gene_ids = self._prepare(inputs, target, genes, n_steps, chunk_size)
            acc = SummaryAccumulator(check_labels(labels, x), classes, gene_ids.numel())
            b = x.shape[0]
            for positions, (a, _) in self._run(x, classes, gene_ids, n_steps, chunk_size, internal_batch_size, method):
                pos = torch.as_tensor(positions, device=x.device).repeat_interleave(b)  # rows in type-major order
                sample = torch.arange(b, device=x.device).repeat(len(positions))
                acc.add_rows(pos, sample, a.abs().flatten(0, 1), torch.full_like(pos, n_steps))
            return acc.result()

    # ------------------------------------------------------------------------------------------------ internals
    def _prepare(self, inputs, target, genes, n_steps, chunk_size) -> tuple[Tensor, Tensor, Tensor]:
        if int(n_steps) < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        x = format_inputs(inputs)
        return x, format_targets(target, 2**62, x.device), format_genes(genes, x.shape[1], x.device)

    def _run(self, x: Tensor, classes: Tensor, genes: Tensor, n_steps: int, chunk_size: int,
             internal_batch_size: int | None, method: str):
        """Yield ``(positions, (attributions (Tc, B, n_gene, H, W), delta (Tc, B)))`` chunk by chunk."""
        try:
            from captum.attr import IntegratedGradients
        except ImportError as exc:  # pragma: no cover - captum is a declared dependency
            raise ImportError("--attr_method IG needs captum: pip install captum") from exc
        t = classes.numel()
        if t == 0:
            return
        b = x.shape[0]
        target_sum = MaskedClassSum(self.forward_func)
        amp = self.mixed_precision

        def wrapped(inp: Tensor, mask: Tensor, cls: Tensor) -> Tensor:
            with mixed_precision(inp.device, amp):
                return target_sum(inp, mask, cls)  # (N,) float32

        with frozen_model(self.module), torch.inference_mode(False):
            x, classes, genes = x.clone(), classes.clone(), genes.clone()  # ordinary tensors under inference_mode()
            with torch.no_grad(), mixed_precision(x.device, amp), batch_forward_oom("IG"):
                clean = self.forward_func(x)  # (B, K, H, W)
            if not isinstance(clean, Tensor) or clean.ndim != 4 or clean.shape[0] != b or clean.shape[2:] != x.shape[2:]:
                raise ValueError(f"forward_func must map (B, G, H, W) = {tuple(x.shape)} to (B, K, H, W) logits")
            format_targets(classes, clean.shape[1], x.device)
            masks = prediction_masks(clean, classes)  # (T, B, H, W)
            del clean
            ig = IntegratedGradients(wrapped, multiply_by_inputs=True)
            chunks = [list(range(i, min(i + chunk_size, t))) for i in range(0, t, chunk_size)]

            def run(positions: list[int]) -> tuple[Tensor, Tensor]:
                pos = torch.as_tensor(positions, device=x.device)
                tc = len(positions)
                rows = x.repeat(tc, 1, 1, 1)  # (Tc*B, G, H, W), row t * B + b
                mask = masks[pos].reshape(tc * b, *x.shape[2:])  # (Tc*B, H, W)
                cls = classes[pos].repeat_interleave(b)  # (Tc*B,)
                attr, delta = ig.attribute(rows, baselines=torch.zeros_like(rows), additional_forward_args=(mask, cls),
                                           n_steps=int(n_steps), method=method,
                                           internal_batch_size=internal_batch_size or tc * b,
                                           return_convergence_delta=True)
                attr = attr.detach()[:, genes].float().view(tc, b, genes.numel(), *x.shape[2:])
                return attr, delta.detach().float().view(tc, b)

            yield from split_on_oom(chunks, run, what="IG")
