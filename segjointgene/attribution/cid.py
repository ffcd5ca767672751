"""CID: computational information discarding (SPEC §4, reference §11).

For an input x (B, G, H, W), a target cell type c and the target genes, CID learns a log-noise map
``s`` (n_gene, H, W) per (sample, type), ``sigma = exp(s)``, that minimises

    MSE(f_c(x + sigma * eps), f_c(x)) - lambda * mean(s),        eps ~ N(0, I) fresh at every step,

where the noise is added to the target genes' channels only (the other channels stay clean) and ``f_c`` is the
logit map of type c (:class:`~segjointgene.attribution.targets.ClassLogitMap`). A gene that the type's output needs
at a pixel tolerates little noise there; the score is ``-(pi e / 2) * s`` (reference §11; a monotone function of
sigma, larger = more needed; it is not the Gaussian entropy, reference defect 18, which does not change rankings).

Near x the objective is solved by ``sigma_i^2 = lambda / (2 n_gene a_i)`` with ``a_i`` the squared sensitivity
of the output map to input element i, so a converged score orders elements by ``log a_i``; an input element the
output ignores gets a gradient of ``-lambda`` only and its ``s`` rises by ``lr`` at every step, so it ends lowest.

Where the optimisation starts matters with a budget of ~20 steps. Adam moves every ``s`` by about ``lr`` per step,
so from the reference's fixed start (log sigma = -5) 20 steps at lr 0.1 travel at most 2 units of log sigma. When the
optimum lies further away (a network whose output is weakly sensitive to the genes), every element is still rising
in lock-step when the budget ends and the scores differ only in their 4th-5th decimals. The default ``warm_start``
therefore first moves each sample to the optimum of a *uniform* noise level, estimated from one noisy forward
(``s0 + log(lambda / (2 MSE_0)) / 2``, one level per sample shared by all target types so that the types stay
comparable at every pixel); the steps then only have to separate the elements around it. ``warm_start=False``
reproduces the reference's start.

Implementation
--------------
* All cell types of a chunk run in one batched pass: the inputs are replicated per type, type-major (row
  ``t * B + b``), and each row's loss only depends on its own ``s`` (the model is in eval mode, so rows do not
  interact through BatchNorm).
* The loss of each row is scaled by its number of noise elements (``n_gene * H * W``): the minimiser is unchanged,
  but the gradients are O(lambda) instead of O(lambda / n_el), so Adam's epsilon (1e-8) does not damp the steps.
* Adam is written out, vectorised over rows, with a per-row step count and an ``active`` mask: a finished row's
  ``s`` and moments are left exactly as they were (the reference only zeroed the gradient, which lets momentum keep
  moving it; defect 17).
* Noise (common random numbers across cell types): the caller's generator gives one 62-bit seed per call; at step k
  every cell type sees the same noise ``eps_k`` (B, n_gene, H, W), drawn from a generator seeded with that seed, and
  each chunk replays the stream from its start. Comparisons between cell types at a pixel (the label rule's
  dominant type) are then not blurred by independent noise (measured: per-pixel dominant type agrees more often
  across seeds and with the true sensitivities), and the result for a type does not depend on how the types are
  chunked, on their order, or on an out-of-memory split.
* Stop rules (per row): ``steps`` runs all ``n_steps``; ``sigma`` (reference B) freezes a row once its mean sigma,
  before the step's update, exceeds ``beta`` times its starting value; ``mse`` (reference H) measures the output MSE
  ratio against step 0, adapts lambda per row (``lambda *= clamp(exp(50 (0.01 - d_ratio)), 0.5, 2)``, clamped to
  [1e-3, 1e3]) and freezes a row right after the update of the step whose ratio exceeds ``beta``. Whether every row
  is finished is checked on the host only every ``check_every`` steps; nothing else leaves the device in the loop.
* Mixed precision: the forward passes run under autocast on CUDA (bfloat16 when supported); ``s``, the moments and
  the losses stay float32; the model is never cast.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ._base import (Attribution, ForwardFunc, TargetType, batch_forward_oom, format_genes, format_inputs, format_targets,
                    frozen_model, mixed_precision, split_on_oom)
from .summary import AttributionSummary, SummaryAccumulator, check_labels
from .targets import ClassLogitMap

log = logging.getLogger(__name__)

__all__ = ["CID", "CIDResult", "STOP_RULES", "SCORE_SCALE"]

#: Stop rules of :meth:`CID.attribute` (``--CID_stop``).
STOP_RULES = ("steps", "mse", "sigma")
#: attribution = -SCORE_SCALE * log sigma (reference §11).
SCORE_SCALE = math.pi * math.e / 2

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_MAX_JUMP = 10.0  # largest warm-start shift of log sigma (outputs that ignore the genes would ask for +inf)
_LAMBDA_RANGE = (1e-3, 1e3)  # adaptive lambda clamp of the mse rule (reference H)
_MSE_GROWTH_TARGET = 0.01  # the mse rule aims at 1 % growth of the MSE ratio per step
_MSE_GAIN = 50.0


@dataclass(frozen=True)
class CIDResult:
    """Result of :meth:`CID.attribute`.

    Attributes
    ----------
    attributions : (B, T, n_gene, H, W) float32, ``-(pi e / 2) * log_sigma``; larger = more needed.
    log_sigma : (B, T, n_gene, H, W) float32, the optimised log-noise.
    n_steps : (B, T) int64, optimisation steps applied to each (sample, type) before it stopped.
    """

    attributions: Tensor
    log_sigma: Tensor
    n_steps: Tensor


@dataclass(frozen=True)
class _Budget:
    n_steps: int
    lr: float
    lambda_: float
    beta: float
    stop: str
    init_log_sigma: float
    chunk_size: int
    warm_start: bool


def _check_budget(n_steps: int, lr: float, lambda_: float, beta: float, stop: str, init_log_sigma: float,
                  chunk_size: int, warm_start: bool) -> _Budget:
    if int(n_steps) < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not lambda_ >= 0:
        raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {', '.join(STOP_RULES)}, got {stop!r}")
    if stop != "steps" and not beta > 1:
        raise ValueError(f"beta must be > 1 (a growth ratio) for stop={stop!r}, got {beta}")
    if not math.isfinite(init_log_sigma):
        raise ValueError(f"init_log_sigma must be finite, got {init_log_sigma}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _Budget(int(n_steps), float(lr), float(lambda_), float(beta), stop, float(init_log_sigma), int(chunk_size),
                   bool(warm_start))


class CID(Attribution):
    """Computational information discarding (captum-shaped).

    Parameters
    ----------
    forward_func : nn.Module or callable, (N, G, H, W) -> (N, K, H, W) logits. An ``nn.Module`` is put in eval mode
        with frozen parameters for each call; its training flags and ``requires_grad`` flags are restored afterwards
        (also on errors), so BatchNorm statistics never change.
    mixed_precision : run the forward passes under autocast on CUDA (ignored on CPU).
    check_every : check whether every row has stopped (one host synchronisation) every this many steps.

    Examples
    --------
    >>> net = torch.nn.Conv2d(3, 2, 3, padding=1)
    >>> res = CID(net).attribute(torch.rand(1, 3, 8, 8), [0, 1], genes=[0, 2], n_steps=3,
    ...                          generator=torch.Generator().manual_seed(0))
    >>> tuple(res.attributions.shape), res.n_steps.tolist()
    ((1, 2, 2, 8, 8), [[3, 3]])
    """

    def __init__(self, forward_func: ForwardFunc, *, mixed_precision: bool = True, check_every: int = 4) -> None:
        super().__init__(forward_func)
        if int(check_every) < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.mixed_precision = bool(mixed_precision)
        self.check_every = int(check_every)
        self._logit_map = ClassLogitMap(forward_func)

    # ---------------------------------------------------------------------------------------------- public API
    def attribute(self, inputs: Tensor, target: TargetType, *, genes: TargetType | None = None, n_steps: int = 20,
                  lr: float = 0.1, lambda_: float = 0.01, beta: float = 1.2, stop: str = "steps",
                  init_log_sigma: float = -5.0, warm_start: bool = True, chunk_size: int = 8,
                  generator: torch.Generator) -> CIDResult:
        """CID scores of the target genes for each target cell type, for small inputs (tests, notebooks).

        Parameters
        ----------
        inputs : (B, G, H, W) float tensor; the work runs on its device.
        target : cell-type ids (output channels): an int, a sequence or a (T,) int tensor; distinct.
        genes : input channels that receive noise and get scores, (n_gene,) distinct ids; all channels when None.
        n_steps : maximum optimisation steps.
        lr : Adam learning rate of ``s = log sigma``.
        lambda_ : weight of the noise-entropy term ``-mean(s)``.
        beta : stop ratio of the ``sigma`` and ``mse`` rules (> 1).
        stop : ``"steps"``, ``"mse"`` or ``"sigma"`` (module docstring).
        init_log_sigma : starting value of ``s`` (with ``warm_start``: where the probe measures the output MSE).
        warm_start : before the first step, move each row's ``s`` to the optimum of a uniform noise level,
            ``s0 + log(lambda / (2 MSE_0)) / 2`` with MSE_0 the output MSE of one noisy forward at ``s0`` (module
            docstring). Off: start at ``init_log_sigma`` everywhere, as the reference does.
        chunk_size : cell types optimised together in one batched pass (memory ~ chunk_size * B forward passes).
        generator : torch.Generator, source of all the noise (any device); required.

        Returns
        -------
        CIDResult with ``attributions`` and ``log_sigma`` (B, T, n_gene, H, W) float32 and ``n_steps`` (B, T) int64,
        all on the device of ``inputs``. Memory: the whole (B, T, n_gene, H, W) result is kept; use
        :meth:`summarize` in training loops.

        Raises
        ------
        TypeError, ValueError
            Bad inputs, ids or budget; a forward output that is not (B, K, H, W).
        AttributionOutOfMemoryError
            A single cell type does not fit in memory (chunks are split and retried first).
        """
        with torch.inference_mode(False):  # ordinary tensors even under the caller's inference_mode()
            x, classes, gene_ids, budget, base_seed = self._prepare(inputs, target, genes, generator, n_steps, lr,
                                                                    lambda_, beta, stop, init_log_sigma, chunk_size,
                                                                    warm_start)
            b, _, h, w = x.shape
            t = classes.numel()
            log_sigma = torch.empty((b, t, gene_ids.numel(), h, w), dtype=torch.float32, device=x.device)
            steps = torch.zeros((b, t), dtype=torch.int64, device=x.device)
            for positions, (s, n) in self._run(x, classes, gene_ids, budget, base_seed):
                log_sigma[:, positions] = s.transpose(0, 1)
                steps[:, positions] = n.transpose(0, 1)
            return CIDResult(-SCORE_SCALE * log_sigma, log_sigma, steps)

    def summarize(self, inputs: Tensor, labels: Tensor, target: TargetType, *, genes: TargetType | None = None,
                  n_steps: int = 20, lr: float = 0.1, lambda_: float = 0.01, beta: float = 1.2, stop: str = "steps",
                  init_log_sigma: float = -5.0, warm_start: bool = True, chunk_size: int = 8,
                  generator: torch.Generator) -> AttributionSummary:
        """Like :meth:`attribute`, but reduced on the device chunk by chunk (the training-loop entry point).

        Parameters
        ----------
        labels : (B, H, W) int tensor, the current class map (0 = background).
        Others as :meth:`attribute`.

        Returns
        -------
        AttributionSummary on the device of ``inputs`` (see its docstring); the (B, T, n_gene, H, W) scores exist
        only one chunk of types at a time and never leave the device.
        """
        with torch.inference_mode(False):  # ordinary tensors even under the caller's inference_mode()
            x, classes, gene_ids, budget, base_seed = self._prepare(inputs, target, genes, generator, n_steps, lr,
                                                                    lambda_, beta, stop, init_log_sigma, chunk_size,
                                                                    warm_start)
            acc = SummaryAccumulator(check_labels(labels, x), classes, gene_ids.numel())
            for positions, (s, n) in self._run(x, classes, gene_ids, budget, base_seed):
                acc.add(positions, -SCORE_SCALE * s, n)
            return acc.result()

    # ------------------------------------------------------------------------------------------------ internals
    def _prepare(self, inputs, target, genes, generator, n_steps, lr, lambda_, beta, stop, init_log_sigma,
                 chunk_size, warm_start) -> tuple[Tensor, Tensor, Tensor, _Budget, int]:
        """Validate and format once; draw the call's base seed from ``generator``."""
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) so that the "
                            f"CID noise is reproducible, got {type(generator).__name__}")
        x = format_inputs(inputs)
        budget = _check_budget(n_steps, lr, lambda_, beta, stop, init_log_sigma, chunk_size, warm_start)
        gene_ids = format_genes(genes, x.shape[1], x.device)
        # The number of classes is only known from the network's output: validated in _run's clean forward.
        classes = format_targets(target, 2**62, x.device)
        base_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return x, classes, gene_ids, budget, base_seed

    def _run(self, x: Tensor, classes: Tensor, genes: Tensor, budget: _Budget,
             base_seed: int) -> Iterator[tuple[list[int], tuple[Tensor, Tensor]]]:
        """Yield ``(positions, (log_sigma (Tc, B, n_gene, H, W), n_steps (Tc, B)))`` chunk by chunk."""
        t = classes.numel()
        if t == 0:
            return
        with frozen_model(self.module), torch.inference_mode(False):
            # clones are ordinary tensors even when the caller runs under torch.inference_mode()
            x, classes, genes = x.clone(), classes.clone(), genes.clone()
            with batch_forward_oom("CID"):
                clean = self._clean_logits(x)  # (B, K, H, W)
                format_targets(classes, clean.shape[1], x.device)
                shift = (self._start_levels(x, clean, classes, genes, budget, base_seed + 1) if budget.warm_start
                         else torch.zeros(x.shape[0], device=x.device))  # (B,)
            chunks = [list(range(i, min(i + budget.chunk_size, t))) for i in range(0, t, budget.chunk_size)]

            def run(positions: list[int]) -> tuple[Tensor, Tensor]:
                pos = torch.as_tensor(positions, device=x.device)
                y0 = clean[:, classes[pos]].transpose(0, 1).float()  # (Tc, B, H, W)
                return self._optimise(x, classes[pos], y0, genes, shift, base_seed, budget)

            yield from split_on_oom(chunks, run, what="CID")

    def _clean_logits(self, x: Tensor) -> Tensor:
        with torch.no_grad(), mixed_precision(x.device, self.mixed_precision):
            out = self.forward_func(x)
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"forward_func must map (B, G, H, W) = {tuple(x.shape)} to (B, K, H, W) logits with the "
                             f"same B, H, W; got {shape}")
        return out

    def _start_levels(self, x: Tensor, clean: Tensor, classes: Tensor, genes: Tensor, budget: _Budget,
                      seed: int) -> Tensor:
        """(B,) warm-start shift of ``s`` per sample, shared by every target type, from one noisy forward.

        Near x the output MSE grows like sigma^2, so for a uniform noise level the objective MSE - lambda * s is
        optimal where 2 MSE = lambda: the shift is ``log(lambda / (2 MSE_0)) / 2`` with MSE_0 the output MSE at
        ``init_log_sigma``, averaged over the target types. One level per sample (not per type) keeps the types on
        an equal footing at every pixel, as a fixed start does, while making the start independent of the scale of
        the network's sensitivity. Clamped to +-``_MAX_JUMP``.
        """
        gen = torch.Generator(device=x.device).manual_seed(seed)
        eps = torch.randn((x.shape[0], genes.numel(), *x.shape[2:]), generator=gen, device=x.device)
        with torch.no_grad(), mixed_precision(x.device, self.mixed_precision):
            out = self.forward_func(x.index_add(1, genes, math.exp(budget.init_log_sigma) * eps))  # (B, K, H, W)
        mse0 = (out[:, classes].float() - clean[:, classes].float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        shift = 0.5 * torch.log(budget.lambda_ / (2 * mse0))
        return torch.nan_to_num(shift, nan=0.0, posinf=_MAX_JUMP, neginf=-_MAX_JUMP).clamp(-_MAX_JUMP, _MAX_JUMP)

    def _optimise(self, x: Tensor, classes: Tensor, y0: Tensor, genes: Tensor, shift: Tensor, seed: int,
                  budget: _Budget) -> tuple[Tensor, Tensor]:
        """Optimise ``s`` for the Tc types of one chunk in one batched pass.

        Returns (log_sigma (Tc, B, n_gene, H, W) float32, n_steps (Tc, B) int64).
        """
        tc, (b, _, h, w), n_gene = classes.numel(), x.shape, genes.numel()
        dev, n = x.device, classes.numel() * x.shape[0]
        b1, b2 = _ADAM_BETAS
        x_rep = x.repeat(tc, 1, 1, 1)  # (N, G, H, W), row t * B + b
        row_class = classes.repeat_interleave(b)  # (N,)
        y0 = y0.reshape(n, h, w)  # (N, H, W)
        gen = torch.Generator(device=dev).manual_seed(seed)  # every chunk replays the call's stream from its start
        n_el = float(n_gene * h * w)

        s = (budget.init_log_sigma + shift.view(1, b, 1, 1, 1)).expand(tc, b, n_gene, h, w)
        s = s.reshape(n, n_gene, h, w).to(torch.float32)  # (N, n_gene, H, W)
        m, v = torch.zeros_like(s), torch.zeros_like(s)
        done = torch.zeros(n, dtype=torch.int64, device=dev)  # updates applied per row
        active = torch.ones(n, dtype=torch.bool, device=dev)
        lam = torch.full((n,), budget.lambda_, dtype=torch.float32, device=dev)
        start = prev_ratio = None

        for step in range(budget.n_steps):
            eps = torch.randn((b, n_gene, h, w), generator=gen, device=dev)  # shared by the chunk's types
            s_var = s.detach().requires_grad_(True)
            with torch.enable_grad():
                sigma = s_var.exp()
                noise = (sigma.view(tc, b, n_gene, h, w) * eps).view(n, n_gene, h, w)  # (N, n_gene, H, W)
                noisy = x_rep.index_add(1, genes, noise)  # noise on the target genes only
                with mixed_precision(dev, self.mixed_precision):
                    out = self._logit_map(noisy, row_class)  # (N, H, W) float32
                mse = (out - y0).pow(2).mean(dim=(1, 2))  # (N,)
                update = active
                if budget.stop == "sigma":
                    mean_sigma = sigma.detach().mean(dim=(1, 2, 3))  # before this step's update
                    if start is None:
                        start = mean_sigma
                    else:
                        active = active & ~(mean_sigma > budget.beta * start)
                    update = active
                elif budget.stop == "mse":
                    cur = mse.detach()
                    if start is None:
                        start = cur.clamp_min(torch.finfo(torch.float32).tiny)
                        ratio = torch.ones_like(cur)
                    else:
                        ratio = cur / start
                        factor = torch.exp(_MSE_GAIN * (_MSE_GROWTH_TARGET - (ratio - prev_ratio))).clamp(0.5, 2.0)
                        lam = torch.where(active, (lam * factor).clamp(*_LAMBDA_RANGE), lam)
                    prev_ratio = ratio
                    update = active  # this step's update still applies, then the row freezes
                    active = active & ~(ratio > budget.beta)
                loss = (n_el * (mse - lam * s_var.mean(dim=(1, 2, 3)))).sum()
                (grad,) = torch.autograd.grad(loss, s_var)

            # Adam, vectorised over rows, applied only where `update` (frozen rows keep s, m, v exactly).
            t1 = (done + 1).to(torch.float32).view(n, 1, 1, 1)
            m_new = b1 * m + (1 - b1) * grad
            v_new = b2 * v + (1 - b2) * grad * grad
            step_ = budget.lr * (m_new / (1 - b1**t1)) / ((v_new / (1 - b2**t1)).sqrt() + _ADAM_EPS)
            keep = update.view(n, 1, 1, 1)
            s = torch.where(keep, s - step_, s)
            m = torch.where(keep, m_new, m)
            v = torch.where(keep, v_new, v)
            done = done + update.to(torch.int64)
            if budget.stop != "steps" and (step + 1) % self.check_every == 0 and not bool(active.any()):
                break

        if log.isEnabledFor(logging.DEBUG):
            log.debug("CID chunk of %d types x %d samples: steps run min %d / mean %.1f / max %d of %d", tc, b,
                      int(done.min()), float(done.float().mean()), int(done.max()), budget.n_steps)
        return s.view(tc, b, n_gene, h, w), done.view(tc, b)
