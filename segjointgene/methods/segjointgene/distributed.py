"""Data-parallel plumbing for ``torchrun`` (layer 2: torch.distributed; imports no trainer).

``torchrun --nproc_per_node=N main.py ...`` starts N processes whose environment names their place in the job
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). This module turns
that environment into a :class:`DistContext`, opens and closes the process group (NCCL on CUDA, each rank on
``cuda:LOCAL_RANK``; Gloo on CPU) and provides the few collective operations the self-training loop needs:

* :func:`run_on_main` runs a function on rank 0 only (the only rank that writes files) and broadcasts its result, or
  its error, so that a failure on rank 0 stops every rank with the same message instead of leaving them waiting;
* :func:`all_gather_label_updates` gives every rank every rank's new patch labels (the label stores stay identical);
* :func:`reduce_metrics`, :func:`all_reduce_sum_`, :func:`gather_objects`, :func:`broadcast_buffers`, :func:`barrier`;
* :func:`shard_sampler` and :class:`ShardCursor`: patches sharded with ``DistributedSampler``, and which samples of a
  rank's shard are its own rather than the sampler's padding (padding repeats patches another rank already has).

A plain ``python main.py`` run (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) opens no process group: every function here is
then the identity (or runs its argument) and the caller's single-process behaviour is unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from segjointgene import errors
from segjointgene.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DistContext",
    "ShardCursor",
    "all_gather_label_updates",
    "all_reduce_sum_",
    "backend_for",
    "barrier",
    "broadcast_buffers",
    "current",
    "from_env",
    "gather_objects",
    "process_group",
    "rank_seed",
    "reduce_metrics",
    "run_on_main",
    "shard_sampler",
    "strip_module_prefix",
    "unwrap",
    "wrap_model",
]

T = TypeVar("T")

#: Environment variables ``torchrun`` sets that a multi-process run cannot do without.
_REQUIRED_ENV = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel job.

    Attributes
    ----------
    rank : global rank, 0 .. world_size - 1 (rank 0 writes every file).
    world_size : number of processes (1 = a plain single-process run).
    local_rank : rank on this node; the CUDA device index of the rank.
    local_world_size : processes on this node.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when several processes train together (a process group is or will be open)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes checkpoints, caches, logs and results."""
        return self.rank == 0


SINGLE = DistContext()


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; launch with torchrun, which sets "
                          "it") from None


def from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """The job layout ``torchrun`` put in the environment (``SINGLE`` when ``WORLD_SIZE`` is unset or 1).

    Raises
    ------
    ConfigError : ``WORLD_SIZE > 1`` without the other variables a process group needs, or inconsistent values.
    """
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    missing = [name for name in _REQUIRED_ENV if not env.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start multi-process training with "
                          "torchrun (e.g. torchrun --nproc_per_node=2 main.py ...), which sets them")
    rank, local_rank = _env_int(env, "RANK", 0), _env_int(env, "LOCAL_RANK", 0)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise ConfigError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, "
                          f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world}")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def current() -> DistContext:
    """The context of the open process group (``SINGLE`` when none is open or it holds one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return SINGLE
    world = dist.get_world_size()
    local_rank = _env_int(os.environ, "LOCAL_RANK", dist.get_rank())
    local_world = _env_int(os.environ, "LOCAL_WORLD_SIZE", world)
    return DistContext(rank=dist.get_rank(), world_size=world, local_rank=local_rank, local_world_size=local_world)


def backend_for(device: torch.device) -> str:
    """``nccl`` for a CUDA training device, ``gloo`` for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(ctx: DistContext, device: torch.device, *, timeout_s: float | None = None) -> Iterator[DistContext]:
    """Open the process group of ``ctx`` for training on ``device``; close it on exit.

    Nothing happens for a single-process context, nor when the caller already opened a group (it is then left
    open). On CUDA the device of the rank (``cuda:LOCAL_RANK``, resolved by the caller) becomes the current device
    before NCCL starts, so collectives and ``pin_memory`` use it. ``timeout_s``: how long a collective may wait for
    the slowest rank (e.g. while rank 0 writes the results) before the job fails (torch's default when None).
    """
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    if not ctx.enabled or dist.is_initialized():
        yield current() if ctx.enabled else SINGLE
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run without torchrun")
    backend = backend_for(device)
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise ConfigError("this PyTorch build has no NCCL: multi-GPU training needs a CUDA build of PyTorch "
                              "(or run on CPU with --device cpu, which uses gloo)")
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    log.debug("rank %d/%d: %s process group open on %s", ctx.rank, ctx.world_size, backend, device)
    finished = False
    try:
        yield current()
        finished = True
    finally:
        if finished:  # no rank closes its connections while another still uses them
            barrier(ctx)
        # After an error NCCL's teardown can block on ranks that are still in a collective: leave it to the exit
        # (torchrun then stops the other ranks). Gloo's is local and must run before the interpreter finalizes.
        if finished or backend == "gloo":
            gc.collect()  # drop objects still holding the group (e.g. a DDP reducer in a reference cycle)
            dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must live for collectives of the open group: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ seeds, sampling
def rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's generators: ``seed`` itself on rank 0 (as in a single-process run), a distinct well-mixed
    63-bit value derived from ``(seed, rank)`` on the other ranks.

    Examples
    --------
    >>> rank_seed(1234, 0)
    1234
    >>> rank_seed(1234, 1) == rank_seed(1234, 1) != rank_seed(1234, 2)
    True
    """
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), int(rank)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def shard_sampler(dataset: Dataset, ctx: DistContext, *, shuffle: bool, seed: int) -> DistributedSampler:
    """A ``DistributedSampler`` giving this rank its share of ``dataset`` (padded so every rank gets as many samples;
    see :class:`ShardCursor`). Shuffling depends on ``seed`` and ``set_epoch`` only, identically on every rank."""
    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle, seed=seed,
                              drop_last=False)


class ShardCursor:
    """Tells, batch after batch of one pass over a :func:`shard_sampler` shard, how many samples are this rank's own.

    ``DistributedSampler`` lays out the (shuffled) items, repeats the first ones until the count is a multiple of the
    world size, and deals them out round-robin: rank ``r`` gets positions ``r, r + W, r + 2W, ...``. Positions past
    ``n_items`` are padding: copies of items another rank processes in the same pass. A rank owns its samples at
    positions below ``n_items``; they always come first in its shard.

    Examples
    --------
    >>> cursor = ShardCursor(5, DistContext(rank=1, world_size=2))  # rank 1 gets positions 1, 3, 5 (5 = padding)
    >>> cursor.own(2), cursor.own(1)
    (2, 0)
    """

    def __init__(self, n_items: int, ctx: DistContext):
        self.limit = len(range(ctx.rank, n_items, ctx.world_size))
        self.seen = 0

    def own(self, batch_len: int) -> int:
        """Number of leading samples of the next batch (of ``batch_len``) that this rank owns."""
        n = max(0, min(batch_len, self.limit - self.seen))
        self.seen += batch_len
        return n


# ------------------------------------------------------------------------------------------------ collectives
def run_on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank.

    Rank 0's outcome is broadcast first: when ``fn`` raises there, every rank raises too (a
    :class:`~segjointgene.errors.UserError` of the same class and message, anything else as ``RuntimeError``), so an
    error on the writing rank stops the job cleanly. ``fn``'s result must be picklable. Single-process: ``fn()``.
    """
    if not ctx.enabled:
        return fn()
    payload: list[Any] = [None]
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            payload = [("ok", fn())]
        except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = err
            payload = [("error", type(err).__name__, str(err))]
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    status = payload[0]
    if status[0] == "ok":
        return status[1]
    _, name, message = status
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.UserError):
        raise cls(message)
    raise RuntimeError(f"rank 0 stopped the run ({name}: {message})")


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if ctx.enabled:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def reduce_metrics(values: Mapping[str, float], ctx: DistContext, *, max_keys: frozenset[str] | set[str] = frozenset()
                   ) -> dict[str, float]:
    """Sum per-rank metrics over the ranks (the maximum for ``max_keys``, e.g. wall-clock seconds).

    A key missing on some ranks counts as 0 there (or is left out of the maximum). Single process: a copy.
    """
    out: dict[str, float] = {}
    for part in gather_objects(dict(values), ctx):
        for key, value in part.items():
            if key in max_keys:
                out[key] = max(out.get(key, value), value)
            else:
                out[key] = out.get(key, 0.0) + value
    return out


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place (every rank gets the total) and return it."""
    if not ctx.enabled:
        return tensor
    dev = _comm_device()
    if tensor.device == dev:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        buf = tensor.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        tensor.copy_(buf)
    return tensor


def all_gather_label_updates(indices: torch.Tensor, labels: torch.Tensor, ctx: DistContext, *,
                             capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's label updates of one step, concatenated in rank order.

    Parameters
    ----------
    indices : (b,) integer tensor, patch indices (within one split) this rank updated; b <= ``capacity``.
    labels : (b, P, P) integer tensor, their new instance labels (any device).
    capacity : the largest b of any rank in this step (the batch size): messages are padded to it.

    Returns
    -------
    (n,) int64 and (n, P, P) int32 CPU tensors, n = the sum of every rank's b. Single process: the inputs, on CPU.
    """
    if not ctx.enabled:
        return indices.long().cpu(), labels.to(device="cpu", dtype=torch.int32)
    b, p = labels.shape[0], labels.shape[-1]
    if b > capacity:
        raise ValueError(f"{b} label updates exceed the capacity {capacity} of the gather")
    dev = _comm_device()
    idx = torch.full((capacity,), -1, dtype=torch.int64, device=dev)
    idx[:b] = indices.to(dev)
    lab = torch.zeros((capacity, p, p), dtype=torch.int32, device=dev)
    lab[:b] = labels.to(device=dev, dtype=torch.int32)
    idx_all = [torch.empty_like(idx) for _ in range(ctx.world_size)]
    lab_all = [torch.empty_like(lab) for _ in range(ctx.world_size)]
    dist.all_gather(idx_all, idx)
    dist.all_gather(lab_all, lab)
    flat_idx, flat_lab = torch.cat(idx_all), torch.cat(lab_all)  # (W * capacity,), (W * capacity, P, P)
    keep = flat_idx >= 0
    return flat_idx[keep].cpu(), flat_lab[keep].cpu()


def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so that eval-mode predictions agree."""
    if not ctx.enabled:
        return
    dev = _comm_device()
    with torch.no_grad():
        for buf in module.buffers():
            if buf.device == dev:
                dist.broadcast(buf, src=0)
            else:
                tmp = buf.to(dev)
                dist.broadcast(tmp, src=0)
                buf.copy_(tmp)


# ------------------------------------------------------------------------------------------------ model
def wrap_model(model: nn.Module, device: torch.device, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(model)`` on the rank's device (``model`` itself in a single process).

    The wrapper broadcasts rank 0's parameters and buffers at construction and averages gradients in ``backward``;
    the unwrapped module (:func:`unwrap`) is what checkpoints, evaluation and attribution use.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=device.index if ids else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A state dict with the ``module.`` prefix of a saved DDP wrapper removed (unchanged when there is none).

    Examples
    --------
    >>> strip_module_prefix({"module.head.weight": 1, "module.head.bias": 2})
    {'head.weight': 1, 'head.bias': 2}
    """
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)
