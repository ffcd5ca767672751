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

import copy
import logging
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import (
    Attribution,
    ForwardFunc,
    TargetType,
    batch_forward_oom,
    format_genes,
    format_inputs,
    format_targets,
    frozen_model,
    is_out_of_memory,
    mixed_precision,
    split_on_oom,
)
from .summary import AttributionSummary, SummaryAccumulator, check_labels, check_rows
from .targets import ClassLogitMap

log = logging.getLogger(__name__)

__all__ = ["CID", "CIDResult", "STOP_RULES", "SCORE_SCALE", "fold_batchnorm"]

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
    mixed_precision : run the forward passes under autocast on CUDA (bfloat16 when supported, else float16). Never
        on the CPU: bfloat16 autocast there kept the rankings but moved the dominant type at ~45 % of the pixels of a
        small trained UNet, too much for the label rule.
    check_every : check whether every row has stopped (one host synchronisation) every this many steps.
    fold_batchnorm : run the passes on a copy of the module whose Conv2d + BatchNorm2d pairs (consecutive members of
        an ``nn.Sequential``) are folded into single convolutions. In eval mode this is the same function (float32
        rounding apart) with fewer memory passes (~1.2x on CPU). A module without such pairs, or one that cannot be
        deep-copied, is used as it is. Ignored with ``compile``.
    compile : run the forward passes through ``torch.compile`` (compiled once per module and reused by later calls;
        when compiling fails, e.g. without a C++ compiler, a warning is logged and the module runs eagerly).

    Examples
    --------
    >>> net = torch.nn.Conv2d(3, 2, 3, padding=1)
    >>> res = CID(net).attribute(torch.rand(1, 3, 8, 8), [0, 1], genes=[0, 2], n_steps=3,
    ...                          generator=torch.Generator().manual_seed(0))
    >>> tuple(res.attributions.shape), res.n_steps.tolist()
    ((1, 2, 2, 8, 8), [[3, 3]])
    """

    def __init__(self, forward_func: ForwardFunc, *, mixed_precision: bool = True, check_every: int = 4,
                 fold_batchnorm: bool = True, compile: bool = False) -> None:
        super().__init__(forward_func)
        if int(check_every) < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.mixed_precision = bool(mixed_precision)
        self.fold_batchnorm = bool(fold_batchnorm)
        self.compile = bool(compile)
        self.check_every = int(check_every)

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
            for position, sample, s, n in self._run(x, classes, gene_ids, budget, base_seed, None):
                log_sigma[sample, position] = s
                steps[sample, position] = n
            return CIDResult(-SCORE_SCALE * log_sigma, log_sigma, steps)

    def summarize(self, inputs: Tensor, labels: Tensor, target: TargetType, *, genes: TargetType | None = None,
                  n_steps: int = 20, lr: float = 0.1, lambda_: float = 0.01, beta: float = 1.2, stop: str = "steps",
                  init_log_sigma: float = -5.0, warm_start: bool = True, chunk_size: int = 8,
                  generator: torch.Generator, rows: Tensor | None = None) -> AttributionSummary:
        """Like :meth:`attribute`, but reduced on the device chunk by chunk (the training-loop entry point).

        Parameters
        ----------
        labels : (B, H, W) int tensor, the current class map (0 = background).
        rows : (B, T) bool tensor, optional
            The (sample, target type) pairs to compute (e.g. from :func:`~segjointgene.attribution.needed_rows`);
            all when None. A pair that is left out is not optimised: its ``gene_sum`` is 0 when the whole sample is
            left out and ``-inf`` otherwise (never the dominant type; see :class:`AttributionSummary`), its
            ``n_steps`` 0. Every computed pair has exactly the value it has when all pairs are computed (rows do not
            interact and each sample's noise stream is the same), and ``type_gene_sum`` / ``type_pixels`` are
            unchanged as long as every pair whose sample has a pixel labelled with the type is computed.
        Others as :meth:`attribute`.

        Returns
        -------
        AttributionSummary on the device of ``inputs`` (see its docstring); the (B, T, n_gene, H, W) scores exist
        only one chunk of rows at a time and never leave the device.
        """
        with torch.inference_mode(False):  # ordinary tensors even under the caller's inference_mode()
            x, classes, gene_ids, budget, base_seed = self._prepare(inputs, target, genes, generator, n_steps, lr,
                                                                    lambda_, beta, stop, init_log_sigma, chunk_size,
                                                                    warm_start)
            labels = check_labels(labels, x)
            keep = check_rows(rows, x.shape[0], classes.numel(), x.device) if rows is not None else None
            acc = SummaryAccumulator(labels, classes, gene_ids.numel(), computed=keep)
            for position, sample, s, n in self._run(x, classes, gene_ids, budget, base_seed, keep):
                acc.add_rows(position, sample, -SCORE_SCALE * s, n)
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

    def _forward(self, device: torch.device) -> ForwardFunc:
        """The forward function of this call (inside :func:`frozen_model`): compiled, BN-folded or as given."""
        module = self.module
        if module is None or module is not self.forward_func:  # a plain function or a bound method: as given
            return self.forward_func
        if self.compile:
            return _CompiledForward(module)
        if self.fold_batchnorm:
            folded = fold_batchnorm(module)
            if folded is not module and device.type == "cuda":
                folded = folded.to(memory_format=torch.channels_last)
            return folded
        return module

    def _run(self, x: Tensor, classes: Tensor, genes: Tensor, budget: _Budget, base_seed: int,
             keep: Tensor | None) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Yield ``(position (N,), sample (N,), log_sigma (N, n_gene, H, W), n_steps (N,))`` chunk by chunk.

        Rows are (target position, sample) pairs in type-major order, all of them or those where ``keep`` (B, T) is
        true. A chunk holds whole types, as many as fit in ``chunk_size * B`` rows (with every pair kept: exactly
        ``chunk_size`` types); on out-of-memory it is split by types, down to a single type.
        """
        b, t = x.shape[0], classes.numel()
        if t == 0:
            return
        with frozen_model(self.module), torch.inference_mode(False):
            # clones are ordinary tensors even when the caller runs under torch.inference_mode()
            x, classes, genes = x.clone(), classes.clone(), genes.clone()
            forward = self._forward(x.device)
            with batch_forward_oom("CID"):
                clean = self._clean_logits(forward, x)  # (B, K, H, W)
                format_targets(classes, clean.shape[1], x.device)
                pairs = (keep.t() if keep is not None else torch.ones((t, b), dtype=torch.bool, device=x.device))
                if not bool(pairs.any()):
                    return
                shift = (self._start_levels(forward, x, clean, classes, genes, budget, base_seed + 1)
                         if budget.warm_start else torch.zeros(b, device=x.device))  # (B,)
            chunks = _type_chunks(pairs.sum(dim=1).tolist(), budget.chunk_size * b)  # one host sync per call
            logit_map = ClassLogitMap(forward)

            def run(types: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
                chosen = torch.as_tensor(types, device=x.device)
                pos, smp = pairs.index_select(0, chosen).nonzero(as_tuple=True)  # (N,) each, type-major
                pos = chosen[pos]
                y0 = clean[smp, classes[pos]].float()  # (N, H, W)
                s, n = self._optimise(logit_map, x, smp, classes[pos], y0, genes, shift, base_seed, budget)
                return pos, smp, s, n

            for _, result in split_on_oom(chunks, run, what="CID"):
                yield result

    def _clean_logits(self, forward: ForwardFunc, x: Tensor) -> Tensor:
        with torch.no_grad(), mixed_precision(x.device, self.mixed_precision):
            out = forward(x)
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"forward_func must map (B, G, H, W) = {tuple(x.shape)} to (B, K, H, W) logits with the "
                             f"same B, H, W; got {shape}")
        return out

    def _start_levels(self, forward: ForwardFunc, x: Tensor, clean: Tensor, classes: Tensor, genes: Tensor,
                      budget: _Budget, seed: int) -> Tensor:
        """(B,) warm-start shift of ``s`` per sample, shared by every target type, from one noisy forward.

        Near x the output MSE grows like sigma^2, so for a uniform noise level the objective MSE - lambda * s is
        optimal where 2 MSE = lambda: the shift is ``log(lambda / (2 MSE_0)) / 2`` with MSE_0 the output MSE at
        ``init_log_sigma``, averaged over the target types. One level per sample (not per type) keeps the types on
        an equal footing at every pixel, as a fixed start does, while making the start independent of the scale of
        the network's sensitivity. Clamped to +-``_MAX_JUMP``. Computed for every sample and every target type,
        also when only some (sample, type) rows are optimised, so that a computed row's start never depends on
        which rows are left out.
        """
        gen = torch.Generator(device=x.device).manual_seed(seed)
        eps = torch.randn((x.shape[0], genes.numel(), *x.shape[2:]), generator=gen, device=x.device)
        with torch.no_grad(), mixed_precision(x.device, self.mixed_precision):
            out = forward(x.index_add(1, genes, math.exp(budget.init_log_sigma) * eps))  # (B, K, H, W)
        mse0 = (out[:, classes].float() - clean[:, classes].float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        shift = 0.5 * torch.log(budget.lambda_ / (2 * mse0))
        return torch.nan_to_num(shift, nan=0.0, posinf=_MAX_JUMP, neginf=-_MAX_JUMP).clamp(-_MAX_JUMP, _MAX_JUMP)

    def _optimise(self, logit_map: ClassLogitMap, x: Tensor, sample: Tensor, row_class: Tensor, y0: Tensor,
                  genes: Tensor, shift: Tensor, seed: int, budget: _Budget) -> tuple[Tensor, Tensor]:
        """Optimise ``s`` for N (sample, type) rows in one batched pass.

        ``sample`` (N,) indexes the batch, ``row_class`` (N,) the output channel, ``y0`` (N, H, W) the clean logit
        maps. Returns (log_sigma (N, n_gene, H, W) float32, n_steps (N,) int64).
        """
        (b, _, h, w), n_gene, n = x.shape, genes.numel(), sample.numel()
        dev = x.device
        x_rep = x.index_select(0, sample)  # (N, G, H, W)
        if dev.type == "cuda":
            x_rep = x_rep.contiguous(memory_format=torch.channels_last)
        gen = torch.Generator(device=dev).manual_seed(seed)  # every chunk replays the call's stream from its start
        n_el = float(n_gene * h * w)

        s = (budget.init_log_sigma + shift.index_select(0, sample)).view(n, 1, 1, 1).expand(n, n_gene, h, w)
        s = s.to(torch.float32).contiguous()  # (N, n_gene, H, W)
        m, v = torch.zeros_like(s), torch.zeros_like(s)
        done = torch.zeros(n, dtype=torch.int64, device=dev)  # updates applied per row
        rule = _StopRule(budget, n, dev)
        for step in range(budget.n_steps):
            # the whole batch's noise, shared by the types of a sample: a row's noise never depends on the other rows
            eps = torch.randn((b, n_gene, h, w), generator=gen, device=dev).index_select(0, sample)  # (N, n_gene, H, W)
            s_var = s.detach().requires_grad_(True)
            with torch.enable_grad():
                sigma = s_var.exp()
                noisy = x_rep.index_add(1, genes, sigma * eps)  # noise on the target genes only
                with mixed_precision(dev, self.mixed_precision):
                    out = logit_map(noisy, row_class)  # (N, H, W) float32
                mse = (out - y0).pow(2).mean(dim=(1, 2))  # (N,)
                update = rule.observe(sigma.detach(), mse.detach())
                loss = (n_el * (mse - rule.lam * s_var.mean(dim=(1, 2, 3)))).sum()
                (grad,) = torch.autograd.grad(loss, s_var)
            s, m, v = _adam_step(s, m, v, grad, done, update, budget.lr)
            done = done + update.to(torch.int64)
            if budget.stop != "steps" and (step + 1) % self.check_every == 0 and not bool(rule.active.any()):
                break

        if log.isEnabledFor(logging.DEBUG):
            log.debug("CID chunk of %d rows: steps run min %d / mean %.1f / max %d of %d", n, int(done.min()),
                      float(done.float().mean()), int(done.max()), budget.n_steps)
        return s, done


class _StopRule:
    """Which rows take this step's update, per ``--CID_stop``; ``lam`` is each row's (adaptive for ``mse``) lambda.

    ``steps``: every row, every step. ``sigma`` (reference B): a row stops once its mean sigma exceeds ``beta`` times
    its start. ``mse`` (reference H): lambda adapts to keep the output-MSE ratio growing; a row takes the step on
    which its ratio passes ``beta``, then freezes.
    """

    def __init__(self, budget: _Budget, n: int, device: torch.device):
        self.budget = budget
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.lam = torch.full((n,), budget.lambda_, dtype=torch.float32, device=device)
        self.start: Tensor | None = None
        self.prev_ratio: Tensor | None = None

    def observe(self, sigma: Tensor, mse: Tensor) -> Tensor:
        """(N,) bool: the rows updated at this step, given sigma (before the update) and the output MSE."""
        budget = self.budget
        if budget.stop == "sigma":
            mean_sigma = sigma.mean(dim=(1, 2, 3))
            if self.start is None:
                self.start = mean_sigma
            else:
                self.active = self.active & ~(mean_sigma > budget.beta * self.start)
            return self.active
        if budget.stop == "mse":
            if self.start is None:
                self.start = mse.clamp_min(torch.finfo(torch.float32).tiny)
                ratio = torch.ones_like(mse)
            else:
                ratio = mse / self.start
                factor = torch.exp(_MSE_GAIN * (_MSE_GROWTH_TARGET - (ratio - self.prev_ratio))).clamp(0.5, 2.0)
                self.lam = torch.where(self.active, (self.lam * factor).clamp(*_LAMBDA_RANGE), self.lam)
            self.prev_ratio = ratio
            update = self.active  # this step's update still applies, then the row freezes
            self.active = self.active & ~(ratio > budget.beta)
            return update
        return self.active


def _adam_step(s: Tensor, m: Tensor, v: Tensor, grad: Tensor, done: Tensor, update: Tensor,
               lr: float) -> tuple[Tensor, Tensor, Tensor]:
    """Adam, vectorised over rows, applied only where ``update`` (frozen rows keep s, m, v exactly); ``done`` (N,)
    counts the updates each row has had."""
    b1, b2 = _ADAM_BETAS
    n = s.shape[0]
    t1 = (done + 1).to(torch.float32).view(n, 1, 1, 1)
    m_new = b1 * m + (1 - b1) * grad
    v_new = b2 * v + (1 - b2) * grad * grad
    step = lr * (m_new / (1 - b1**t1)) / ((v_new / (1 - b2**t1)).sqrt() + _ADAM_EPS)
    keep = update.view(n, 1, 1, 1)
    return torch.where(keep, s - step, s), torch.where(keep, m_new, m), torch.where(keep, v_new, v)


def _type_chunks(rows_per_type: list[int], max_rows: int) -> list[list[int]]:
    """Consecutive target positions grouped so that each group holds at most ``max_rows`` rows (a type with more
    rows than that forms a group alone); types without rows are left out.

    >>> _type_chunks([4, 4, 0, 2, 4, 1], 8)
    [[0, 1], [3, 4, 5]]
    """
    chunks: list[list[int]] = []
    rows = 0
    for t, count in enumerate(rows_per_type):
        if count == 0:
            continue
        if not chunks or rows + count > max_rows:
            chunks.append([])
            rows = 0
        chunks[-1].append(t)
        rows += count
    return chunks


# ---------------------------------------------------------------------------------------------- faster forwards
def fold_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of an eval-mode ``module`` with every Conv2d + BatchNorm2d pair of its ``nn.Sequential`` s folded.

    A folded pair is one convolution with ``w * gamma / sqrt(var + eps)`` and bias ``beta - mean * gamma /
    sqrt(var + eps)`` (+ the conv's own bias, scaled), followed by ``nn.Identity``: in eval mode the same function up
    to float rounding, without the BatchNorm pass. Returns ``module`` itself when it has no such pair, is in training
    mode, or cannot be deep-copied; the original is never changed.

    Examples
    --------
    >>> net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU()).eval()
    >>> folded = fold_batchnorm(net)
    >>> [type(m).__name__ for m in folded], bool(torch.allclose(folded(torch.ones(1, 2, 5, 5)),
    ...                                                          net(torch.ones(1, 2, 5, 5)), atol=1e-6))
    (['Conv2d', 'Identity', 'ReLU'], True)
    """
    def pairs(root: nn.Module) -> list[tuple[nn.Sequential, int]]:
        return [(seq, i) for seq in root.modules() if isinstance(seq, nn.Sequential) for i in range(len(seq) - 1)
                if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d)
                and not seq[i + 1].training and seq[i + 1].track_running_stats]

    if not pairs(module) or module.training:
        return module
    try:
        copy_ = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001 - any module that cannot be copied runs unfolded
        log.debug("fold_batchnorm: %s cannot be deep-copied (%s); running it unfolded", type(module).__name__, exc)
        return module
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq, i in pairs(copy_):
        seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1]).requires_grad_(False)
        seq[i + 1] = nn.Identity()
    return copy_


#: module -> its torch.compile'd forward, or None when compiling it failed (then it runs eagerly from then on).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _CompiledForward:
    """``torch.compile(module)``, compiled once per module; falls back to the eager module when compiling fails."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        if module not in _COMPILED:
            try:
                _COMPILED[module] = torch.compile(module)
            except Exception as exc:  # noqa: BLE001 - e.g. an unsupported platform; eager is always correct
                log.warning("CID: torch.compile is not available (%s); running the model eagerly", exc)
                _COMPILED[module] = None

    def __call__(self, x: Tensor) -> Tensor:
        compiled = _COMPILED.get(self.module)
        if compiled is not None:
            try:
                return compiled(x)
            except Exception as exc:  # noqa: BLE001 - compilation happens lazily, at the first call
                if is_out_of_memory(exc):
                    raise
                log.warning("CID: torch.compile failed (%s: %s); running the model eagerly", type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "")
                _COMPILED[self.module] = None
        return self.module(x)
