"""Self-training (layer 3): ``train_one_epoch``, ``propagate`` and the epoch loop ``self_train`` (SPEC §3).

Per epoch: the network trains on the current labels of the train patches (epoch 0 is forward-only); after each
train batch, from ``--warmup_epochs`` on, the batch is *propagated*: one eval-mode forward with the just-updated
weights gives the predictions, attribution (CID / IG, from ``--attr_epoch``) is computed with the same weights, and
the label rule grows the labels, which go back into the shared label store. Test patches are propagated the same way
(transductive) after the training batches. Checkpoints and label caches are written every ``--save_interval``
epochs and at the end, as consistent pairs; ``train_log.csv`` gets one row per epoch.

Resuming from epoch E restores the weights, the optimizer, every random generator and the labels as they were at
the end of epoch E, and continues with epoch E+1: on CPU the result is bit-identical to an uninterrupted run.

Data-parallel (``torchrun --nproc_per_node=N main.py ...``; the plumbing is in :mod:`segjointgene.distributed`): the
network is wrapped in ``DistributedDataParallel``; ``DistributedSampler`` shards the train patches (shuffled from
``--random_seed`` and the epoch, identically on every rank) and the test patches. Each rank propagates only its own
patches of each batch (not the sampler's padding, which repeats another rank's); after every propagation step the
new labels of all ranks are gathered into every rank's label store, so all stores are identical whenever a step
reads neighbouring patches (``_SectionLabels.context``), an epoch ends or a cache is saved. Within a step every rank
sees the labels as they were after the previous step, across all ranks. Per-epoch tallies and the (type x gene)
attribution sums are summed over the ranks (the training loss and accuracy also count the few patches the sampler
repeats to even out the shards); rank 0 alone writes files, the others waiting for its status.
Guarantees: world size 1 (plain ``python main.py``) is the single-process run, unchanged; N ranks give a consistent
run that is deterministic for a fixed N and seed (given deterministic kernels), but not bit-identical to N = 1 (the
batches and the order of label updates differ). Checkpoints hold the unwrapped model, rank 0's random states as
``rng``, every rank's as ``rng_ranks`` and the ``world_size``: resuming with the same N continues every rank's
streams; with another N (a DDP run resumed by one process or the reverse) the weights, optimizer, labels and
attribution sums are restored exactly and rank 0 continues its streams, while the shuffling differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from . import __version__, distributed
from .attribution import select_targets, summarize
from .checkpoint import file_sha256, list_epochs, load_checkpoint, save_checkpoint
from .config import AttributionConfig, LabelUpdateConfig, RuntimeConfig, TrainConfig
from .constants import CELLS_TABLE, SPOTS_TABLE, RunFiles
from .dataset import (ImagePatchDataset, LabelStore, collate_spot_lists, load_label_cache, load_metadata, read_class_lut,
                      save_label_cache)
from .density import batch_images
from .errors import ConfigError, DataError, InputNotFoundError, UserError
from .io import load_npz, read_json, remove_stale_temps, save_npz, write_csv, write_json
from .labels import IGNORE, training_targets, update_labels
from .metrics import cell_calling_score
from .model import UNet, check_patch_size
from .stitch import stitch_patches

log = logging.getLogger(__name__)


__all__ = ["TrainResult", "nucleus_seeds", "propagate", "resolve_device", "run_training", "self_train", "train_one_epoch"]


# ------------------------------------------------------------------------------------------------ device, amp
def resolve_device(runtime: RuntimeConfig, *, local_rank: int | None = None) -> torch.device:
    """``--device auto`` -> CUDA (``--gpu_id``) when available, else CPU; an unavailable CUDA request is an error.

    Under ``torchrun`` (``local_rank`` given) each rank uses ``cuda:<local_rank>`` and ``--gpu_id`` is ignored; a fixed
    ``--device cuda:N`` is refused there (every rank would take the same GPU).
    """
    if runtime.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if runtime.device == "auto":
            return torch.device("cpu")
        raise ConfigError(f"--device={runtime.device}: CUDA is not available on this machine; use --device cpu or auto")
    if local_rank is not None:
        if runtime.device not in ("auto", "cuda"):
            raise ConfigError(f"--device={runtime.device}: under torchrun each rank uses cuda:LOCAL_RANK; use --device "
                              "cuda or auto (choose the GPUs with CUDA_VISIBLE_DEVICES)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} needs cuda:{local_rank}, but {torch.cuda.device_count()} CUDA "
                              "device(s) are visible; start at most that many processes per node (--nproc_per_node)")
        return torch.device("cuda", local_rank)
    if runtime.device == "auto" or runtime.device == "cuda":
        index = runtime.gpu_id
    else:
        index = int(runtime.device.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--gpu_id / --device: CUDA device {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


# ------------------------------------------------------------------------------------------------ losses
def _soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (reference §7), per sample then averaged; ignored pixels out."""
    keep = (labels != IGNORE)[:, None].float()
    probs = logits.float().softmax(1) * keep  # (B, K, H, W)
    onehot = F.one_hot(labels.clamp_min(0), probs.shape[1]).permute(0, 3, 1, 2).float() * keep
    inter = (probs * onehot).sum((2, 3))
    denom = probs.sum((2, 3)) + onehot.sum((2, 3))
    dice = (2 * inter + 1) / (denom + 1)  # (B, K)
    return 1 - dice[:, 1:].mean() if dice.shape[1] > 1 else dice.new_zeros(())


def _augment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random dihedral transform (flip + 90-degree rotation) of every image and its labels, per sample."""
    b = images.shape[0]
    codes = torch.randint(0, 8, (b,), generator=generator).tolist()
    out_i, out_l = [], []
    for i, code in enumerate(codes):
        img, lab = images[i], labels[i]
        if code & 4:
            img, lab = img.flip(-1), lab.flip(-1)
        k = code & 3
        out_i.append(torch.rot90(img, k, dims=(-2, -1)))
        out_l.append(torch.rot90(lab, k, dims=(-2, -1)))
    return torch.stack(out_i), torch.stack(out_l)


def _class_weights(stores: list[LabelStore], n_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights of the current labels, normalised to mean 1, clamped to [0.1, 10]."""
    counts = torch.zeros(n_classes, dtype=torch.float64)
    for store in stores:
        counts += torch.bincount(store.classes(store.instances).flatten(), minlength=n_classes).double()
    w = counts.sum() / counts.clamp_min(1)
    return (w / w.mean()).clamp(0.1, 10).float()


# ------------------------------------------------------------------------------------------------ epoch state
@dataclass
class _Tally:
    """Per-epoch sums, kept on the device (one host sync at the end of the epoch)."""

    device: torch.device
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, device=self.device, dtype=torch.float64)
        self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()

    def time(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def host(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.sums.items()} | self.seconds


@dataclass
class _Attr:
    """Attribution settings for the run: targets (network channels) and the running (type x gene) sums."""

    config: AttributionConfig
    genes: torch.Tensor  # (n_gene,) channel ids
    classes: torch.Tensor  # (T,) class ids
    generator: torch.Generator
    type_gene_sum: torch.Tensor | None = None  # (T, n_gene) float64 of the latest attributed epoch
    type_pixels: torch.Tensor | None = None
    epoch: int = -1


class _SectionLabels:
    """Every patch's current and fixed labels, addressable by grid position, to give label updates context.

    Label updates are local to a patch; without context a cell whose nucleus lies in one patch could never grow into
    the next one. :meth:`context` returns a batch's maps enlarged by a halo taken from the neighbouring patches'
    current labels (background where there is no patch).
    """

    def __init__(self, datasets: dict[str, ImagePatchDataset]):
        self.where: dict[tuple[int, int], tuple[ImagePatchDataset, int]] = {}
        for ds in datasets.values():
            for i, (y, x) in enumerate(ds.origins.tolist()):
                self.where[(y // ds.patch_size, x // ds.patch_size)] = (ds, i)
        self.patch_size = next(iter(datasets.values())).patch_size

    def context(self, origins: torch.Tensor, halo: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P+2h, P+2h) current instance and core maps around the patches with these origins (B, 2)."""
        p, h = self.patch_size, halo
        b = origins.shape[0]
        inst = torch.zeros((b, p + 2 * h, p + 2 * h), dtype=torch.int64)
        core = torch.zeros_like(inst)
        for i, (y, x) in enumerate(origins.tolist()):
            r, c = y // p, x // p
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    hit = self.where.get((r + dr, c + dc))
                    if hit is None:
                        continue
                    ds, j = hit
                    # the neighbour's part that falls inside the enlarged window
                    ys = slice(max(0, h + dr * p), min(p + 2 * h, h + (dr + 1) * p))
                    xs = slice(max(0, h + dc * p), min(p + 2 * h, h + (dc + 1) * p))
                    sy = slice(ys.start - (h + dr * p), ys.stop - (h + dr * p))
                    sx = slice(xs.start - (h + dc * p), xs.stop - (h + dc * p))
                    inst[i, ys, xs] = ds.labels.instances[j, sy, sx]
                    core[i, ys, xs] = ds.core[j, sy, sx]
        return inst, core


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ one epoch
def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    *, train_cfg: TrainConfig, step: bool, tally: _Tally, class_weights: torch.Tensor | None,
                    scaler: torch.amp.GradScaler | None, augment_generator: torch.Generator | None = None,
                    lut: torch.Tensor | None = None, density_floor: float = 0.0, after_batch=None,
                    images_of: Callable[[dict[str, Any]], torch.Tensor],
                    progress=None) -> None:
    """One pass over the training patches: forward, loss on the current labels, optimizer step when ``step``.

    Background pixels near labelled cells are left out of the loss (``--ignore_margin``); with ``augment_generator``
    each training patch is flipped / rotated at random (labels alike).

    ``after_batch(batch)`` is called after the step (the label propagation of that batch). ``images_of(batch)``
    gives the batch's density images on ``device`` (:func:`segjointgene.density.batch_images`).
    """
    model.train()
    for batch in loader:
        images = images_of(batch)
        labels = training_targets(batch["label"].to(device, non_blocking=True),
                                  lut[batch["core"]].to(device, non_blocking=True), images.sum(1),
                                  margin=train_cfg.ignore_margin, mode=train_cfg.train_targets,
                                  density_floor=density_floor)
        if step and augment_generator is not None:
            images, labels = _augment(images, labels, augment_generator)
        with _autocast(device, train_cfg.amp), torch.set_grad_enabled(step):
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, weight=class_weights, ignore_index=IGNORE)
            if train_cfg.loss == "ce_dice":
                loss = loss + _soft_dice_loss(logits, labels)
        if step:
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        n = (labels != IGNORE).sum()
        tally.add("loss_sum", loss.detach() * n)
        tally.add("correct", (logits.detach().argmax(1) == labels).sum())
        tally.add("pixels", n)
        if after_batch is not None:
            after_batch(batch)
        if progress is not None:
            progress.update()


def propagate(model: torch.nn.Module, batch: dict[str, Any], store: LabelStore, device: torch.device, *,
              label_cfg: LabelUpdateConfig, update: bool, attr: _Attr | None, label_generator: torch.Generator,
              amp: bool, tally: _Tally, seeds: torch.Tensor | None = None,
              section: _SectionLabels | None = None,
              images_of: Callable[[dict[str, Any]], torch.Tensor]) -> torch.Tensor | None:
    """Predict a batch with the current weights (eval mode), attribute, update its labels in ``store``.

    The label rule runs on the batch's patches enlarged by a halo of the neighbouring patches' current labels
    (``section``), so cells grow across patch borders; only the patches themselves are written back.

    Returns the (B, P, P) new instance labels on ``device`` (also written to ``store``), None when not ``update``.
    ``images_of`` as in :func:`train_one_epoch`.
    """
    images = images_of(batch)
    instance = batch["instance"].to(device, non_blocking=True)
    core = batch["core"].to(device, non_blocking=True)
    lut = store.class_lut.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(device, amp):
            logits = model(images).float()
    finally:
        model.train(was_training)
    h = label_cfg.expand_k * label_cfg.repeats if label_cfg.rule == "v1" else 2 * label_cfg.expand_k * label_cfg.repeats
    if section is not None:
        ctx_inst, ctx_core = (t.to(device, non_blocking=True) for t in section.context(batch["origin"], h))
    else:
        ctx_inst, ctx_core = F.pad(instance, (h,) * 4), F.pad(core, (h,) * 4)
    summary = None
    if attr is not None:
        _sync(device)
        t0 = time.perf_counter()
        # the window the label update reads lets CID leave out the patches (and types) nothing can use
        summary = summarize(model, images, lut[instance], targets=attr.classes, genes=attr.genes,
                            config=attr.config, generator=attr.generator, context=lut[ctx_inst], mixed_precision=amp)
        _sync(device)
        tally.time("attr_seconds", time.perf_counter() - t0)
        tally.add("attr_steps", summary.n_steps.double().mean() * len(images))
        tally.add("attr_samples", len(images))
        attr.type_gene_sum = summary.type_gene_sum if attr.type_gene_sum is None else attr.type_gene_sum + summary.type_gene_sum
        attr.type_pixels = summary.type_pixels if attr.type_pixels is None else attr.type_pixels + summary.type_pixels
    if not update:
        return None
    t0 = time.perf_counter()
    p = instance.shape[-1]
    pad = (h,) * 4
    attribution = F.pad(summary.gene_sum, pad, mode="replicate") if summary is not None else None
    origin = batch["origin"].to(device) - h
    result = update_labels(ctx_inst, ctx_core, F.pad(logits, pad, mode="replicate"), lut, config=label_cfg,
                           attribution=attribution, targets=attr.classes if summary is not None else None,
                           generator=label_generator, seeds=seeds, origin=origin if seeds is not None else None)
    new = result.instance[:, h:h + p, h:h + p]
    tally.time("label_seconds", time.perf_counter() - t0)
    for key, value in result.stats.items():
        tally.add(key, value)
    tally.add("n_relabelled", (new != instance).sum())
    store.update(batch["index"], new)
    return new


# ------------------------------------------------------------------------------------------------ scores
def _spot_positions(data_dir: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every spot in the padded patch frame."""
    spots = load_npz(data_dir / SPOTS_TABLE, ("x", "y"))
    y0, x0 = meta["crop_offset"]
    return spots["x"] - x0, spots["y"] - y0


def nucleus_seeds(data_dir: Path, meta: dict, datasets: dict[str, ImagePatchDataset], n_ids: int) -> torch.Tensor:
    """(n_ids, 3) float32 nucleus (y, x, r) of every cell id: centroid in the padded patch frame, equivalent radius
    sqrt(area / pi) of its core pixels; NaN for ids without a nucleus."""
    cells = pd.read_csv(data_dir / CELLS_TABLE)
    y0, x0 = meta["crop_offset"]
    area = sum(torch.bincount(ds.core.flatten().long(), minlength=n_ids).double() for ds in datasets.values())
    seeds = torch.full((n_ids, 3), float("nan"))
    ids = torch.as_tensor(cells["cell"].to_numpy())
    seeds[ids, 0] = torch.as_tensor(cells["y"].to_numpy() - y0, dtype=torch.float32)
    seeds[ids, 1] = torch.as_tensor(cells["x"].to_numpy() - x0, dtype=torch.float32)
    seeds[:, 2] = torch.sqrt(area[:n_ids] / torch.pi).float()
    return seeds


def _cell_calling(stores: list[LabelStore], meta: dict, spot_x: np.ndarray, spot_y: np.ndarray,
                  distance: int) -> tuple[float, int]:
    """Cell-calling score of the current labels stitched over the section, and the labelled pixel count."""
    canvas = stitch_patches({name: (inst > 0).numpy().astype(np.uint8) for store in stores
                             for name, inst in zip(store.names, store.instances)}, meta, dtype=np.uint8)
    return cell_calling_score(canvas, spot_x, spot_y, distance).score, int(canvas.sum())


# ------------------------------------------------------------------------------------------------ run folder
@dataclass(frozen=True)
class TrainResult:
    """What ``self_train`` did: the last epoch, the saved epochs and the log table."""

    last_epoch: int
    saved_epochs: list[int]
    log: pd.DataFrame
    run_dir: Path


def _generators(seed: int, device: torch.device, rank: int) -> dict[str, torch.Generator]:
    """The run's generators, seeded from ``--random_seed`` and the rank (rank 0 gets the single-process seeds).

    ``sampler`` shuffles the single-process loader; under DDP ``DistributedSampler(seed=--random_seed)`` shuffles,
    identically on every rank. ``augment``, ``attribution`` (CID noise) and ``labels`` (rule V2) differ by rank.
    """
    s = distributed.rank_seed(seed, rank)
    return {"sampler": torch.Generator().manual_seed(s), "augment": torch.Generator().manual_seed(s + 3),
            "attribution": torch.Generator(device).manual_seed(s + 1),
            "labels": torch.Generator(device).manual_seed(s + 2)}


def _rng_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    return {name: g.get_state() for name, g in generators.items()} | {"torch": torch.get_rng_state()}


def _restore_rng(generators: dict[str, torch.Generator], states: dict[str, torch.Tensor]) -> None:
    for name, g in generators.items():
        try:
            g.set_state(states[name].cpu())  # states load onto the training device; generators take CPU byte tensors
        except RuntimeError:  # a device generator saved on another device type (a CUDA run resumed on CPU, ...)
            log.warning("the '%s' random stream was saved on another device type; it restarts from --random_seed", name)
    torch.set_rng_state(states["torch"].cpu())


def _save(run_dir: Path, epoch: int, *, model, optimizer, scaler, stores: dict[str, LabelStore],
          rng_ranks: list[dict[str, torch.Tensor]], configs: dict, attr: _Attr | None, meta: dict,
          extra: dict[str, Any]) -> None:
    """Label cache, then the gene ranking, then the checkpoint that names the cache's sha256 (a consistent set).

    ``model`` is the unwrapped network (keys without DDP's ``module.``); ``rng_ranks`` holds every rank's generator
    states: rank 0's are the checkpoint's ``rng``, all of them ``rng_ranks`` when several processes trained.
    """
    cache = run_dir / RunFiles.LABEL_CACHE.format(epoch=epoch)
    save_label_cache(cache, stores)
    state = {
        "version": __version__, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {}, "config": configs,
        "rng": rng_ranks[0], "world_size": len(rng_ranks),
        "label_cache": {"file": cache.name, "sha256": file_sha256(cache)},
        "n_genes": len(meta["genes"]), "n_classes": len(meta["celltypes"]), **extra,
    }
    if len(rng_ranks) > 1:
        state["rng_ranks"] = rng_ranks
    if attr is not None and attr.type_gene_sum is not None:
        state["attribution"] = {"type_gene_sum": attr.type_gene_sum.cpu(), "type_pixels": attr.type_pixels.cpu(),
                                "epoch": attr.epoch}
        _write_attribution(run_dir, epoch, attr, meta)  # before the checkpoint: a saved epoch always has its ranking
    save_checkpoint(run_dir / RunFiles.CHECKPOINT.format(epoch=epoch), state)


def _write_attribution(run_dir: Path, epoch: int, attr: _Attr, meta: dict) -> None:
    arrays = {"type_gene_sum": attr.type_gene_sum.cpu().numpy(), "type_pixels": attr.type_pixels.cpu().numpy(),
              "targets": attr.classes.cpu().numpy(), "genes": attr.genes.cpu().numpy(),
              "method": np.asarray(attr.config.method), "epoch": np.asarray(attr.epoch)}
    save_npz(run_dir / f"attribution_{epoch}.npz", arrays)
    try:
        from .export import write_gene_ranking
    except ImportError:  # pragma: no cover - export is part of the package
        return
    write_gene_ranking(run_dir / RunFiles.RESULTS, arrays["type_gene_sum"], arrays["type_pixels"], arrays["targets"],
                       arrays["genes"], meta, attr.config.method)


def _append_log(run_dir: Path, rows: list[dict]) -> pd.DataFrame:
    table = pd.DataFrame(rows)
    write_csv(run_dir / RunFiles.TRAIN_LOG, table)
    return table


def _log_row(epoch: int, stats: dict[str, float], calling: float, foreground: int, seconds: float) -> dict:
    """One ``train_log.csv`` row from the epoch's (rank-summed) tallies."""
    return {
        "epoch": epoch, "loss": stats["loss_sum"] / max(stats["pixels"], 1),
        "pixel_acc": stats["correct"] / max(stats["pixels"], 1),
        "n_relabelled": int(stats.get("n_relabelled", 0)), "n_grown": int(stats.get("n_grown", 0)),
        "n_reassigned": int(stats.get("n_reassigned", 0)),
        "n_blocked_by_attribution": int(stats.get("n_blocked_by_attribution", 0)),
        "foreground_px": foreground, "cell_calling": calling,
        "attr_seconds": stats.get("attr_seconds", 0.0),
        "attr_steps_mean": stats["attr_steps"] / stats["attr_samples"] if stats.get("attr_samples") else 0.0,
        "label_seconds": stats.get("label_seconds", 0.0),
        "epoch_seconds": seconds,
    }


#: Tallies of wall-clock seconds: the slowest rank's, not the sum over ranks, goes to the log.
_WALL_KEYS = frozenset({"attr_seconds", "label_seconds"})


def _loader(ds: ImagePatchDataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None,
            num_workers: int, pin: bool, sampler: DistributedSampler | None = None) -> DataLoader:
    if sampler is not None:  # the sampler shards (and shuffles) by itself
        shuffle, generator = False, None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
                      num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin, drop_last=False,
                      collate_fn=collate_spot_lists if ds.spot_lists else None)


def _cache_images(ds_sizes: int, setting: str) -> bool:
    if setting != "auto":
        return setting == "yes"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return False
    return ds_sizes < total // 4


def _first_samples(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a collated batch (spot lists of ``collate_spot_lists``: the rows of those samples)."""
    return {k: v[v[:, 0] < n] if k == "spots" else v[:n] for k, v in batch.items()}


def _share_label_updates(store: LabelStore, indices: torch.Tensor, new: torch.Tensor | None, patch_size: int,
                         ctx: distributed.DistContext, *, capacity: int) -> None:
    """DDP: write every rank's new labels of this step into this rank's ``store`` (its own are there already).

    Called by every rank at every propagation step, also with nothing to send (``new`` None), so that each rank's
    store holds every patch's current labels before the next step reads neighbours or an epoch ends.
    """
    if not ctx.enabled:
        return
    if new is None:
        indices, new = indices[:0], torch.zeros((0, patch_size, patch_size), dtype=torch.int32)
    idx, labels = distributed.all_gather_label_updates(indices, new, ctx, capacity=capacity)
    store.update(idx, labels)


def _reduce_attribution(attr: _Attr, ctx: distributed.DistContext) -> None:
    """DDP: sum the epoch's (type x gene) attribution sums over the ranks, so every rank holds the section's."""
    if not ctx.enabled:
        return
    if attr.type_gene_sum is None:  # this rank attributed no patch of its own
        attr.type_gene_sum = torch.zeros((attr.classes.numel(), attr.genes.numel()), dtype=torch.float64,
                                         device=attr.classes.device)
        attr.type_pixels = torch.zeros(attr.classes.numel(), dtype=torch.float64, device=attr.classes.device)
    distributed.all_reduce_sum_(attr.type_gene_sum, ctx)
    distributed.all_reduce_sum_(attr.type_pixels, ctx)


def self_train(data_dir: str | os.PathLike, run_dir: str | os.PathLike, *, train_cfg: TrainConfig = TrainConfig(),
               label_cfg: LabelUpdateConfig = LabelUpdateConfig(), attr_cfg: AttributionConfig = AttributionConfig(),
               runtime: RuntimeConfig = RuntimeConfig(), resume_epoch: int | None = None, progress: bool = True,
               run_info: dict[str, Any] | None = None) -> TrainResult:
    """Self-train on a preprocessed dataset; write checkpoints, label caches, the log and the gene ranking.

    Parameters
    ----------
    data_dir : preprocessed dataset (``data/<datasets_name>``).
    run_dir : run folder (``checkpoints/<datasets_name>/<net_sub_suffix>``); created (with ``run_info`` as
        ``run.json``) once the data are open and a resume is restored, so a failed start leaves nothing behind.
    train_cfg, label_cfg, attr_cfg, runtime : settings (see ``config.py``).
    resume_epoch : continue after this saved epoch (weights, optimizer, generators, labels restored).
    progress : show a progress bar per epoch.
    run_info : written to ``run.json`` (rank 0) when the run starts.

    Notes
    -----
    Called by every rank of an open process group (``torchrun``), it trains data-parallel (see the module
    docstring); only rank 0 writes files.
    """
    from tqdm.auto import tqdm

    ctx = distributed.current()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    meta = load_metadata(data_dir)
    check_patch_size(int(meta["patch_size"]))
    device = resolve_device(runtime, local_rank=ctx.local_rank if ctx.enabled else None)
    n_genes, n_classes = len(meta["genes"]), len(meta["celltypes"])
    lut = read_class_lut(data_dir)
    p = int(meta["patch_size"])
    n_patches = sum(len(meta["split"][s]) for s in ("train", "test"))
    # every rank of a node keeps its own copy: count them all against the memory
    spot_lists = train_cfg.density_on_device
    cache = not spot_lists and _cache_images(n_patches * n_genes * p * p * 4 * ctx.local_world_size,
                                             train_cfg.cache_patches)
    splits = {s: ImagePatchDataset(data_dir, s, metadata=meta, class_lut=lut, cache_images=cache,
                                   spot_lists=spot_lists)
              for s in ("train", "test") if meta["split"][s]}
    if "train" not in splits:
        raise DataError(f"{data_dir}: the train split is empty; preprocess with a smaller --test_fraction")
    # a batch's images on the device: moved there, or built there from its spot lists
    images_of = functools.partial(batch_images, n_genes=n_genes, patch_size=p, sigma=splits["train"].density_sigma,
                                  halo=splits["train"].density_halo, device=device)
    stores = {s: ds.labels for s, ds in splits.items()}

    seed = runtime.random_seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UNet(n_genes, n_classes, base_channels=train_cfg.net_width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.net_lr, weight_decay=train_cfg.net_weight_decay)
    use_fp16 = device.type == "cuda" and train_cfg.amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_fp16 else None
    generators = _generators(seed, device, ctx.rank)

    # attribution targets: top genes by spot count, top cell types by nucleus pixels (background excluded)
    attr = None
    if attr_cfg.method != "none":
        gene_counts = np.bincount(load_npz(data_dir / SPOTS_TABLE, ("gene",))["gene"], minlength=n_genes)
        class_pixels = sum(torch.bincount(st.classes(st.instances).flatten(), minlength=n_classes) for st in stores.values())
        genes, classes = select_targets(torch.as_tensor(gene_counts, dtype=torch.float64), class_pixels,
                                        attr_cfg.n_gene, attr_cfg.n_celltype)
        attr = _Attr(config=attr_cfg, genes=genes.to(device), classes=classes.to(device), generator=generators["attribution"])

    configs = {"train": dataclasses.asdict(train_cfg), "labels": dataclasses.asdict(label_cfg),
               "attribution": dataclasses.asdict(attr_cfg), "runtime": dataclasses.asdict(runtime)}
    rows: list[dict] = []
    start = 0
    if resume_epoch is not None:
        start, rows = _resume(run_dir, resume_epoch, model=model, optimizer=optimizer, scaler=scaler, stores=stores,
                              generators=generators, meta=meta, attr=attr, device=device, ctx=ctx)
    # `net` trains (DDP averages its gradients); `model`, the same module unwrapped, predicts, attributes, is saved
    net = distributed.wrap_model(model, device, ctx)

    pin = device.type == "cuda"
    samplers = {s: distributed.shard_sampler(ds, ctx, shuffle=s == "train", seed=seed) if ctx.enabled else None
                for s, ds in splits.items()}
    train_loader = _loader(splits["train"], train_cfg.net_batch_size, shuffle=True, generator=generators["sampler"],
                           num_workers=runtime.num_workers, pin=pin, sampler=samplers["train"])
    test_loader = (_loader(splits["test"], train_cfg.net_batch_size, shuffle=False, generator=None,
                           num_workers=runtime.num_workers, pin=pin, sampler=samplers["test"])
                   if "test" in splits else None)
    spot_x, spot_y = _spot_positions(data_dir, meta)
    seeds = nucleus_seeds(data_dir, meta, splits, len(lut)).to(device)
    section = _SectionLabels(splits)
    saved = list_epochs(run_dir)
    extra = {"attr_targets": {"genes": attr.genes.cpu(), "classes": attr.classes.cpu()} if attr else {}}
    density_floor = train_cfg.background_density * meta.get("nuclear_density_median", 0.0)

    if ctx.is_main:  # everything checked: the run starts
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_info is not None:
            write_json(run_dir / RunFiles.RUN_INFO, run_info)
    for epoch in range(start, train_cfg.net_epoch + 1):
        t_epoch = time.perf_counter()
        tally = _Tally(device)
        update = epoch >= max(1, train_cfg.warmup_epochs)
        attribute = (attr is not None and epoch >= attr_cfg.start_epoch
                     and (epoch - attr_cfg.start_epoch) % attr_cfg.every == 0)
        if attribute:
            attr.type_gene_sum, attr.type_pixels, attr.epoch = None, None, epoch
        weights = _class_weights(list(stores.values()), n_classes).to(device) if train_cfg.loss == "ce_dice" else None
        passes = train_cfg.passes_per_epoch if epoch > 0 else 1
        n_batches = passes * len(train_loader) + ((len(test_loader) if test_loader else 0) if (update or attribute) else 0)
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{train_cfg.net_epoch}", unit="batch", leave=False,
                   disable=not (progress and ctx.is_main))

        def step(batch: dict[str, Any], split: str, cursor: distributed.ShardCursor) -> None:
            """Propagate this rank's own patches of a batch, then share the new labels with every rank."""
            own = cursor.own(len(batch["index"]))
            distributed.broadcast_buffers(model, ctx)  # every rank predicts with rank 0's BatchNorm statistics
            new = None
            if own:
                part = batch if own == len(batch["index"]) else _first_samples(batch, own)
                new = propagate(model, part, stores[split], device, label_cfg=label_cfg, update=update,
                                attr=attr if attribute else None, label_generator=generators["labels"],
                                amp=train_cfg.amp, tally=tally, seeds=seeds, section=section, images_of=images_of)
            if update:
                _share_label_updates(stores[split], batch["index"][:own], new, p, ctx,
                                     capacity=train_cfg.net_batch_size)

        for pass_i in range(passes):
            last = pass_i == passes - 1
            if samplers["train"] is not None:
                samplers["train"].set_epoch(epoch * train_cfg.passes_per_epoch + pass_i)
            cursor = distributed.ShardCursor(len(splits["train"]), ctx)
            train_one_epoch(net, train_loader, optimizer, device, train_cfg=train_cfg, step=epoch > 0, tally=tally,
                            class_weights=weights, scaler=scaler,
                            augment_generator=generators["augment"] if train_cfg.augment else None,
                            lut=stores["train"].class_lut, density_floor=density_floor, images_of=images_of,
                            after_batch=(functools.partial(step, split="train", cursor=cursor)
                                         if last and (update or attribute) else None),
                            progress=bar)
        if test_loader is not None and (update or attribute):
            cursor = distributed.ShardCursor(len(splits["test"]), ctx)
            for batch in test_loader:
                step(batch, "test", cursor)
                bar.update()
        bar.close()

        # the section's totals on every rank; then rank 0 scores, logs and saves while the others wait for its status
        stats = distributed.reduce_metrics(tally.host(), ctx, max_keys=_WALL_KEYS)
        if attribute:
            _reduce_attribution(attr, ctx)
        due = epoch % train_cfg.save_interval == 0 or epoch == train_cfg.net_epoch
        rng_ranks = distributed.gather_objects(_rng_states(generators), ctx) if due else None

        def finish() -> dict:
            calling, foreground = _cell_calling(list(stores.values()), meta, spot_x, spot_y, train_cfg.pixel_distance)
            row = _log_row(epoch, stats, calling, foreground, time.perf_counter() - t_epoch)
            _append_log(run_dir, [*rows, row])
            log.info("epoch %d: loss %.4f, pixel acc %.3f, relabelled %d px, cell-calling %.3f, attribution %.1f s, "
                     "epoch %.1f s", epoch, row["loss"], row["pixel_acc"], row["n_relabelled"], row["cell_calling"],
                     row["attr_seconds"], row["epoch_seconds"])
            if rng_ranks is not None:
                _save(run_dir, epoch, model=model, optimizer=optimizer, scaler=scaler, stores=stores,
                      rng_ranks=rng_ranks, configs=configs, attr=attr, meta=meta, extra=extra)
            return row

        rows.append(distributed.run_on_main(finish, ctx))
        if due:
            saved.append(epoch)
    return TrainResult(last_epoch=train_cfg.net_epoch, saved_epochs=sorted(set(saved)), log=pd.DataFrame(rows),
                       run_dir=run_dir)


def _resume(run_dir: Path, epoch: int, *, model, optimizer, scaler, stores: dict[str, LabelStore], generators,
            meta: dict, attr: _Attr | None, device: torch.device,
            ctx: distributed.DistContext = distributed.SINGLE) -> tuple[int, list[dict]]:
    """Restore the state at the end of ``epoch``; returns the first epoch to run and the earlier log rows."""
    epochs = list_epochs(run_dir)
    if epoch not in epochs:
        have = ", ".join(map(str, epochs)) or "none"
        raise InputNotFoundError(f"--ckpt_load_epoch={epoch}: {run_dir} has no checkpoint + label cache for that epoch "
                                 f"(saved epochs: {have})")
    path = run_dir / RunFiles.CHECKPOINT.format(epoch=epoch)
    state = load_checkpoint(path, map_location=device)
    n_genes, n_classes = len(meta["genes"]), len(meta["celltypes"])
    if state.get("n_genes") != n_genes or state.get("n_classes") != n_classes:
        raise DataError(f"{path}: checkpoint of a run with {state.get('n_genes')} genes and {state.get('n_classes')} "
                        f"classes, but this dataset has {n_genes} genes and {n_classes} classes; it belongs to another "
                        "dataset - choose another --net_sub_suffix or --datasets_name")
    cache = run_dir / state["label_cache"]["file"]
    if not cache.is_file() or file_sha256(cache) != state["label_cache"]["sha256"]:
        raise DataError(f"{cache}: missing or not the label cache saved with {path.name}; resume from another epoch")
    try:
        model.load_state_dict(distributed.strip_module_prefix(state["model"]))
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err).strip())
        raise DataError(f"{path}: does not fit this network ({detail[:160]}); it was trained with other settings "
                        "(e.g. --net_width)") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    cached = load_label_cache(cache)
    for split, store in stores.items():
        if split not in cached:
            raise DataError(f"{cache}: no labels for the {split} split")
        store.load_state_dict(cached[split], source=str(cache))
    _restore_rank_rng(generators, state, ctx)
    if attr is not None and "attribution" in state:
        attr.type_gene_sum = state["attribution"]["type_gene_sum"].to(device)
        attr.type_pixels = state["attribution"]["type_pixels"].to(device)
        attr.epoch = int(state["attribution"]["epoch"])
    log_path = run_dir / RunFiles.TRAIN_LOG
    rows = []
    if log_path.is_file():
        try:
            table = pd.read_csv(log_path)
            rows = table[table["epoch"] <= epoch].to_dict("records")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{log_path}: unreadable ({type(err).__name__}); delete it to resume without the earlier "
                            "log rows") from None
    log.info("resumed from %s (epoch %d); continuing with epoch %d", path.name, epoch, epoch + 1)
    return epoch + 1, rows


def _restore_rank_rng(generators: dict[str, torch.Generator], state: dict[str, Any],
                      ctx: distributed.DistContext) -> None:
    """Each rank continues its own random streams when the checkpoint has them (same world size); otherwise rank 0
    continues the saved rank-0 streams and the other ranks keep their fresh ``(--random_seed, rank)`` streams."""
    saved_world = int(state.get("world_size", 1))
    per_rank = state.get("rng_ranks")
    if saved_world == ctx.world_size and per_rank is not None:
        _restore_rng(generators, per_rank[ctx.rank])
    elif ctx.is_main:
        _restore_rng(generators, state["rng"])
    if saved_world != ctx.world_size:
        log.info("checkpoint of a %d-process run resumed by %d process(es): weights, optimizer, labels and attribution "
                 "sums are restored exactly; the patch shuffling and the other ranks' random streams differ from an "
                 "uninterrupted run", saved_world, ctx.world_size)


# ------------------------------------------------------------------------------------------------ CLI body
_RUN_PATTERNS = ("net_*.pt", "labels_cache_*.npz", "attribution_*.npz", RunFiles.TRAIN_LOG, RunFiles.RUN_INFO)


def _prepare_run_dir(run_dir: Path, data_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to replace another run without ``--overwrite``; check a resume's dataset. Writes nothing but the removal
    of a killed run's hidden temporary files (and, with ``--overwrite``, of the previous run)."""
    if run_dir.is_dir():
        remove_stale_temps(run_dir)
    held = [p for pattern in _RUN_PATTERNS for p in run_dir.glob(pattern)]
    if resume:
        info = run_dir / RunFiles.RUN_INFO
        if info.is_file():
            recorded = read_json(info).get("data_dir")
            if recorded and Path(recorded) != data_dir.resolve():
                raise DataError(f"{info}: this run was trained on {recorded}, not {data_dir.resolve()}; "
                                "choose the matching --datasets_name")
        return
    if held and not overwrite:
        raise UserError(f"{run_dir} already holds a run ({len(held)} files, e.g. {held[0].name}); resume it with "
                        "--if_load_ckpt=True, pass --overwrite to start over, or choose another --net_sub_suffix")
    if held:
        log.info("--overwrite: removing the previous run in %s", run_dir)
        for p in held:
            p.unlink()
        shutil.rmtree(run_dir / RunFiles.RESULTS, ignore_errors=True)


def _open_run(args: Any, cfg: dict[type, Any], paths: Any) -> int | None:
    """Check the run folder (nothing is created yet); returns the epoch to resume from (None: a new run)."""
    load_metadata(paths.data_dir)
    run_dir = Path(paths.run_dir)
    resume_epoch = None
    if args.if_load_ckpt:
        epochs = list_epochs(run_dir)
        if not epochs:
            raise InputNotFoundError(f"--if_load_ckpt: {run_dir} holds no checkpoint to resume from")
        resume_epoch = args.ckpt_load_epoch if args.ckpt_load_epoch is not None else epochs[-1]
    _prepare_run_dir(run_dir, Path(paths.data_dir), resume=resume_epoch is not None,
                     overwrite=cfg[RuntimeConfig].overwrite)
    return resume_epoch


def _run_info(cfg: dict[type, Any], paths: Any, meta: dict, *, world_size: int) -> dict[str, Any]:
    """The content of ``run.json``."""
    return {"datasets_name": paths.datasets_name, "data_dir": str(Path(paths.data_dir).resolve()),
            "raw_dir": meta.get("raw_dir", ""), "package_version": __version__, "world_size": world_size,
            "config": {name: dataclasses.asdict(cfg[cls]) for name, cls in
                       (("train", TrainConfig), ("labels", LabelUpdateConfig), ("attribution", AttributionConfig),
                        ("runtime", RuntimeConfig))}}


def _export_and_report(result: TrainResult, datasets_name: str, minutes: float) -> None:
    from .export import export_results

    results = export_results(result.run_dir, epoch=result.last_epoch)
    last = result.log.iloc[-1]
    print(f"trained {datasets_name} to epoch {result.last_epoch} in {minutes:.1f} min: loss {last['loss']:.4f}, "
          f"pixel acc {last['pixel_acc']:.3f}, cell-calling {last['cell_calling']:.3f}\n"
          f"checkpoints: {result.run_dir} (epochs {', '.join(map(str, result.saved_epochs))})\nresults: {results}")


@contextlib.contextmanager
def _main_rank_logs(ctx: distributed.DistContext) -> Iterator[None]:
    """Info messages from rank 0 only (the other ranks still report warnings and errors)."""
    logger = logging.getLogger(__name__.rpartition(".")[0] or __name__)
    before = logger.level
    if not ctx.is_main:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


def run_training(args: Any, cfg: dict[type, Any], paths: Any) -> int:
    """The ``SegJointGene`` step: check the run folder, train, export the results.

    Under ``torchrun`` every rank runs this: rank 0 checks and prepares the run folder and tells the others its
    decision (an error there stops every rank with its message), all ranks train their shards, rank 0 exports the
    results while the others wait.
    """
    runtime: RuntimeConfig = cfg[RuntimeConfig]
    train_cfg: TrainConfig = cfg[TrainConfig]
    env = distributed.from_env()
    device = resolve_device(runtime, local_rank=env.local_rank if env.enabled else None)
    with (distributed.process_group(env, device, timeout_s=train_cfg.ddp_timeout_min * 60) as ctx,
          _main_rank_logs(ctx)):
        resume_epoch = distributed.run_on_main(lambda: _open_run(args, cfg, paths), ctx)
        info = _run_info(cfg, paths, load_metadata(paths.data_dir), world_size=ctx.world_size)
        start = time.perf_counter()
        result = self_train(paths.data_dir, paths.run_dir, train_cfg=train_cfg, label_cfg=cfg[LabelUpdateConfig],
                            attr_cfg=cfg[AttributionConfig], runtime=runtime, resume_epoch=resume_epoch,
                            progress=not args.quiet, run_info=info)
        minutes = (time.perf_counter() - start) / 60
        distributed.run_on_main(lambda: _export_and_report(result, paths.datasets_name, minutes), ctx)
    return 0
