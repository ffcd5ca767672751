"""The captum-shaped base class and the machinery every attribution method shares (layer 2: torch).

* :class:`Attribution` holds the forward function; methods subclass it (captum ``attr/_utils/attribution.py``).
* :func:`frozen_model` puts the model in eval mode with frozen parameters for one call and restores every module's
  training flag and every parameter's ``requires_grad`` afterwards, also when the call raises.
* :func:`mixed_precision` is the autocast context of a forward pass (bfloat16 on CUDA when supported, else float16;
  nothing on CPU). The model itself is never cast.
* :func:`split_on_oom` runs a list of cell-type chunks and, when one runs out of memory, splits it in halves and
  retries; a single cell type that still does not fit raises :class:`AttributionOutOfMemoryError`.
* :func:`format_targets` and :func:`format_genes` validate the ``target`` / ``genes`` arguments once, at the public
  boundary.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = [
    "Attribution",
    "AttributionOutOfMemoryError",
    "ForwardFunc",
    "batch_forward_oom",
    "TargetType",
    "format_genes",
    "format_inputs",
    "format_targets",
    "frozen_model",
    "is_out_of_memory",
    "mixed_precision",
    "split_on_oom",
]

#: A forward function: (N, G, H, W) float inputs -> (N, K, H, W) per-class logits. An ``nn.Module`` or any callable.
ForwardFunc = Callable[[Tensor], Tensor]
#: Cell-type (output channel) ids: one int, a sequence of ints or a 1-D integer tensor.
TargetType = int | Sequence[int] | Tensor

T = TypeVar("T")


class AttributionOutOfMemoryError(RuntimeError):
    """A single cell type does not fit in memory even after the chunk was split down to one type."""


class Attribution:
    """Base class of the attribution methods: holds the forward function.

    Parameters
    ----------
    forward_func : callable or nn.Module
        Maps (N, G, H, W) float inputs to (N, K, H, W) logits. When it is an ``nn.Module`` (or a bound method of one)
        the module is put in eval mode with frozen parameters for each call (:func:`frozen_model`).
    """

    def __init__(self, forward_func: ForwardFunc) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable (an nn.Module or a function), got {type(forward_func).__name__}")
        self.forward_func = forward_func

    @property
    def module(self) -> nn.Module | None:
        """The ``nn.Module`` behind ``forward_func`` (itself or the owner of a bound method), else None."""
        f = self.forward_func
        if isinstance(f, nn.Module):
            return f
        owner = getattr(f, "__self__", None)
        return owner if isinstance(owner, nn.Module) else None

    def attribute(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------- model handling
@contextlib.contextmanager
def frozen_model(module: nn.Module | None) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on every parameter for the duration of the block; then restore both.

    The training flag of *every* sub-module is saved and restored one by one (a model may keep some sub-modules in
    eval mode on purpose), as is the ``requires_grad`` flag of every parameter. In eval mode BatchNorm uses its running
    statistics and never updates them. ``None`` (a plain function) does nothing.
    """
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    try:
        module.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)


def mixed_precision(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Autocast for forward passes: bfloat16 on CUDA when supported, float16 otherwise; a no-op on CPU.

    Only the forward runs in reduced precision; the noise parameters and the losses stay float32, and the model's
    weights are never cast in place (reference defect 19).
    """
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# ----------------------------------------------------------------------------------------------- out of memory
def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and for RuntimeErrors whose message says "out of memory"."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, AttributionOutOfMemoryError):
        return False  # already final: never split again
    return (bool(oom_type) and isinstance(exc, oom_type)) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


@contextlib.contextmanager
def batch_forward_oom(what: str) -> Iterator[None]:
    """Turn an out-of-memory error of a forward pass over the plain batch into :class:`AttributionOutOfMemoryError`.

    Used around the passes that precede the chunked work (the clean prediction); they cannot be split further.
    """
    failure: str | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an out-of-memory error
        if not is_out_of_memory(exc):
            raise
        failure = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if failure is not None:
        raise AttributionOutOfMemoryError(
            f"{what} ran out of memory in a forward pass of the plain batch ({failure}); reduce the batch size "
            f"(--net_batch_size) or the patch size")


def split_on_oom(chunks: Sequence[Sequence[int]], run: Callable[[list[int]], T], *, what: str) -> Iterator[tuple[list[int], T]]:
    """Yield ``(chunk, run(chunk))`` for each chunk; a chunk that runs out of memory is split in halves and retried.

    Parameters
    ----------
    chunks : sequences of type positions (indices into the caller's target list), processed in order.
    run : computes one chunk; may raise an out-of-memory error (:func:`is_out_of_memory`).
    what : name used in log and error messages (e.g. ``"CID"``).

    Yields
    ------
    (chunk, result) : the positions actually computed together, in the original order, and their result.

    Raises
    ------
    AttributionOutOfMemoryError
        When a single type still runs out of memory. Nothing is ever skipped or returned as zeros.
    """
    pending = [list(c) for c in chunks if len(c)]
    while pending:
        chunk = pending.pop(0)
        failure: BaseException | None = None
        try:
            result = run(chunk)
        except Exception as exc:  # noqa: BLE001 - re-raised below unless it is an out-of-memory error
            if not is_out_of_memory(exc):
                raise
            failure = exc
        if failure is None:
            yield chunk, result
            continue
        message = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
        del failure  # drop the traceback (and the tensors its frames hold) before retrying
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(chunk) == 1:
            raise AttributionOutOfMemoryError(
                f"{what} ran out of memory for a single cell type ({message}); reduce the batch size "
                f"(--net_batch_size), the patch size or the number of target genes (--attr_n_gene)")
        half = len(chunk) // 2
        log.warning("%s: out of memory on a chunk of %d cell types; retrying as %d + %d", what, len(chunk), half,
                    len(chunk) - half)
        pending[:0] = [chunk[:half], chunk[half:]]


# ----------------------------------------------------------------------------------------------------- validation
def format_inputs(inputs: Tensor) -> Tensor:
    """Check ``inputs`` is a (B, G, H, W) floating tensor; return it as float32 (no copy when it already is)."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor of shape (B, G, H, W), got {type(inputs).__name__}")
    if inputs.ndim != 4 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must have shape (B, G, H, W) with B >= 1, got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be a floating tensor, got {inputs.dtype}; use inputs.float()")
    return inputs.detach().float()


def _as_index_tensor(value: TargetType, name: str, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids, got a {value.dtype} tensor; use .long()")
        t = value.detach().reshape(-1) if value.ndim == 0 else value.detach()
    elif isinstance(value, int):
        t = torch.tensor([value])
    else:
        try:
            t = torch.as_tensor(list(value), dtype=torch.int64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be an int, a sequence of ints or a 1-D integer tensor, got {value!r}") from exc
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int64)


def format_targets(target: TargetType, n_classes: int, device: torch.device) -> Tensor:
    """(T,) int64 class ids on ``device``; each in [0, n_classes) and distinct.

    Raises
    ------
    TypeError for non-integer ids; ValueError for an id out of range or a repeated id.
    """
    t = _as_index_tensor(target, "target", device)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_classes):
        raise ValueError(f"target ids must be output channels in [0, {n_classes}), got {t.tolist()}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"target ids must be distinct, got {t.tolist()}")
    return t


def format_genes(genes: TargetType | None, n_channels: int, device: torch.device) -> Tensor:
    """(n_gene,) int64 input-channel ids on ``device`` (all channels when None); in range, distinct, non-empty."""
    if genes is None:
        return torch.arange(n_channels, device=device)
    g = _as_index_tensor(genes, "genes", device)
    if g.numel() == 0:
        raise ValueError("genes must name at least one input channel")
    if int(g.min()) < 0 or int(g.max()) >= n_channels:
        raise ValueError(f"genes must be input channels in [0, {n_channels}), got {g.tolist()}")
    if g.unique().numel() != g.numel():
        raise ValueError(f"genes must be distinct, got {g.tolist()}")
    return g
