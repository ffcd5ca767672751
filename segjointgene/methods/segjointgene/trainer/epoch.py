"""One epoch of self-training, as an object: train a batch, propagate it, attribute it, end the epoch, save.

:meth:`EpochRunner.run_epoch` is the method of the paper in one screen: every training batch is trained on; in the
last pass over the training patches, once labels may change (``--warmup_epochs``) or attribution is due, the batch is
then *propagated*: predicted in eval mode with the just-updated weights, attributed (CID / IG) with the same
weights, and its labels grown by the label rule; the test patches are propagated the same way (transductive). The
epoch ends with the section's tallies, the log row and, every ``--save_interval`` epochs, a saved state.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from segjointgene import interrupt
from segjointgene.attribution import AttributionSummary, summarize
from segjointgene.config import AttributionConfig, LabelUpdateConfig, TrainConfig
from segjointgene.io.files import write_csv
from segjointgene.io.metadata import DatasetMetadata
from segjointgene.io.runfolder import RunFolder
from segjointgene.preprocess.dataset import LabelStore, augment_patches

from .. import distributed
from ..labels import IGNORE, reach, training_targets, update_labels
from .section import SectionLabels, cell_calling
from .spots import SpotEngine
from .state import TrainingState, rng_states

log = logging.getLogger(__name__)

#: Tallies of wall-clock seconds: the slowest rank's, not the sum over ranks, goes to the log.
_WALL_KEYS = frozenset({"attr_seconds", "label_seconds"})


def autocast(device: torch.device, enabled: bool):
    """bf16 (else fp16) autocast on CUDA when ``enabled``; nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


# ------------------------------------------------------------------------------------------------ losses
def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (reference §7), per sample then averaged; ignored pixels out."""
    keep = (labels != IGNORE)[:, None].float()
    probs = logits.float().softmax(1) * keep  # (B, K, H, W)
    onehot = F.one_hot(labels.clamp_min(0), probs.shape[1]).permute(0, 3, 1, 2).float() * keep
    inter = (probs * onehot).sum((2, 3))
    denom = probs.sum((2, 3)) + onehot.sum((2, 3))
    dice = (2 * inter + 1) / (denom + 1)  # (B, K)
    return 1 - dice[:, 1:].mean() if dice.shape[1] > 1 else dice.new_zeros(())


def class_weights(stores: list[LabelStore], n_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights of the current labels, normalised to mean 1, clamped to [0.1, 10]."""
    counts = torch.zeros(n_classes, dtype=torch.float64)
    for store in stores:
        counts += torch.bincount(store.classes(store.instances).flatten(), minlength=n_classes).double()
    w = counts.sum() / counts.clamp_min(1)
    return (w / w.mean()).clamp(0.1, 10).float()


# ------------------------------------------------------------------------------------------------ epoch state
@dataclass
class Tally:
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


@dataclass(frozen=True)
class EpochPlan:
    """What an epoch does: optimizer steps, label updates, attribution, passes, class weights."""

    epoch: int
    step: bool  # optimizer steps (epoch 0 is forward-only)
    update: bool  # labels may change
    attribute: bool  # attribution is computed (and the ranking sums restart)
    passes: int
    weights: torch.Tensor | None

    @property
    def propagate(self) -> bool:
        return self.update or self.attribute


@dataclass(frozen=True)
class RunContext:
    """What stays fixed during a run: settings, data, device, the section's labels and the output folder."""

    train_cfg: TrainConfig
    label_cfg: LabelUpdateConfig
    attr_cfg: AttributionConfig
    meta: DatasetMetadata
    run: RunFolder
    device: torch.device
    ctx: distributed.DistContext
    section: SectionLabels
    seeds: torch.Tensor  # (M, 3) nucleus (y, x, r), on the device
    spot_x: np.ndarray  # spots in the padded patch frame, for the cell-calling score
    spot_y: np.ndarray
    density_floor: float
    images_of: Callable[[dict[str, Any]], torch.Tensor]  # a batch's (B, G, P, P) images on the device
    configs: dict[str, dict]  # the settings as plain dicts, for checkpoints
    extra: dict[str, Any]  # further checkpoint entries (attribution targets)
    spots: SpotEngine | None = None  # --label_update model: the spot model and its evidence

    @property
    def train_targets(self) -> str:
        """The model rule's labels are whole territories: the network learns them all."""
        return "current" if self.spots is not None else self.train_cfg.train_targets


class EpochRunner:
    """Runs the epochs of one self-training run (single process or one rank of a DDP job).

    ``net`` trains (DDP averages its gradients); ``state.model``, the same module unwrapped, predicts, attributes and
    is saved. ``rows`` are the log rows so far.
    """

    def __init__(self, rc: RunContext, state: TrainingState, net: torch.nn.Module, *, train_loader: DataLoader,
                 test_loader: DataLoader | None, samplers: dict[str, DistributedSampler | None],
                 rows: list[dict], progress: bool):
        self.rc, self.state, self.net = rc, state, net
        self.train_loader, self.test_loader, self.samplers = train_loader, test_loader, samplers
        self.rows, self.progress = rows, progress
        self.halo = reach(rc.label_cfg)

    # ------------------------------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int) -> dict:
        """Train, propagate and attribute every batch of one epoch, then end it; returns its log row."""
        t_epoch = time.perf_counter()
        plan = self.plan(epoch)
        tally = Tally(self.rc.device)
        bar = self._progress_bar(plan)
        for pass_i in range(plan.passes):
            propagate = plan.propagate and pass_i == plan.passes - 1
            cursor = self._start_pass(epoch, pass_i)
            self.net.train()
            for batch in batches(self.train_loader):
                self.train_batch(batch, plan, tally)
                if propagate:
                    self.propagate_batch(batch, "train", cursor, plan, tally)
                bar.update()
        if plan.propagate and self.test_loader is not None:
            cursor = distributed.ShardCursor(len(self.test_loader.dataset), self.rc.ctx)
            for batch in batches(self.test_loader):
                self.propagate_batch(batch, "test", cursor, plan, tally)
                bar.update()
        bar.close()
        return self.end_epoch(plan, tally, t_epoch)

    def plan(self, epoch: int) -> EpochPlan:
        cfg, attr = self.rc.train_cfg, self.state.attr
        acfg = self.rc.attr_cfg
        attribute = (attr is not None and epoch >= acfg.start_epoch and (epoch - acfg.start_epoch) % acfg.every == 0)
        if attribute:
            attr.start_epoch(epoch)
        weights = (class_weights(list(self.state.stores.values()), self.rc.meta.n_classes).to(self.rc.device)
                   if cfg.loss == "ce_dice" else None)
        update = epoch >= max(1, cfg.warmup_epochs)
        if self.rc.spots is not None:  # the model rule refits once, with the trained network
            update = epoch == cfg.net_epoch and epoch >= 1
        return EpochPlan(epoch=epoch, step=epoch > 0, update=update, attribute=attribute,
                         passes=cfg.passes_per_epoch if epoch > 0 else 1, weights=weights)

    def _progress_bar(self, plan: EpochPlan):
        from tqdm.auto import tqdm

        n_test = len(self.test_loader) if self.test_loader else 0
        n_batches = plan.passes * len(self.train_loader) + (n_test if plan.propagate else 0)
        return tqdm(total=n_batches, desc=f"epoch {plan.epoch}/{self.rc.train_cfg.net_epoch}", unit="batch",
                    leave=False, disable=not (self.progress and self.rc.ctx.is_main))

    def _start_pass(self, epoch: int, pass_i: int) -> distributed.ShardCursor:
        if self.samplers["train"] is not None:
            self.samplers["train"].set_epoch(epoch * self.rc.train_cfg.passes_per_epoch + pass_i)
        return distributed.ShardCursor(len(self.train_loader.dataset), self.rc.ctx)

    # ------------------------------------------------------------------------------------------ a batch
    def train_batch(self, batch: dict[str, Any], plan: EpochPlan, tally: Tally) -> None:
        """Forward, loss on the current labels, optimizer step (when ``plan.step``).

        Background pixels near labelled cells are left out of the loss (``--ignore_margin``); training patches are
        flipped / rotated at random (``--augment``, labels alike).
        """
        rc, cfg, state = self.rc, self.rc.train_cfg, self.state
        images = rc.images_of(batch)
        lut = state.stores["train"].class_lut
        labels = training_targets(batch["label"].to(rc.device, non_blocking=True),
                                  lut[batch["core"]].to(rc.device, non_blocking=True), images.sum(1),
                                  margin=cfg.ignore_margin, mode=rc.train_targets, density_floor=rc.density_floor)
        if plan.step and cfg.augment:
            images, labels = augment_patches(images, labels, state.generators["augment"])
        with autocast(rc.device, cfg.amp), torch.set_grad_enabled(plan.step):
            logits = self.net(images)
            loss = F.cross_entropy(logits.float(), labels, weight=plan.weights, ignore_index=IGNORE)
            if cfg.loss == "ce_dice":
                loss = loss + soft_dice_loss(logits, labels)
        if plan.step:
            self._optimizer_step(loss)
        n = (labels != IGNORE).sum()
        tally.add("loss_sum", loss.detach() * n)
        tally.add("correct", (logits.detach().argmax(1) == labels).sum())
        tally.add("pixels", n)

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        optimizer, scaler = self.state.optimizer, self.state.scaler
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def propagate_batch(self, batch: dict[str, Any], split: str, cursor: distributed.ShardCursor, plan: EpochPlan,
                        tally: Tally) -> None:
        """Predict, attribute and grow the labels of this rank's own patches of a batch; share them with every rank."""
        ctx = self.rc.ctx
        own = cursor.own(len(batch["index"]))
        distributed.broadcast_buffers(self.state.model, ctx)  # every rank predicts with rank 0's BatchNorm statistics
        new = None
        if own:
            part = batch if own == len(batch["index"]) else _first_samples(batch, own)
            images = self.rc.images_of(part)
            logits = self.predict(images)
            grow = plan.update and self.rc.spots is None
            window = self.label_window(part) if plan.attribute or grow else None
            summary = self.attribute(images, part, window, tally) if plan.attribute else None
            if grow:
                new = self.grow_labels(part, self.state.stores[split], logits, window, summary, tally)
            elif plan.update:  # the model rule: the network's posterior at the spots, for the refit
                self.rc.spots.add_evidence(part["origin"], logits)
        if plan.update and self.rc.spots is None:  # the model rule's refit writes every rank's labels itself
            _share_label_updates(self.state.stores[split], batch["index"][:own], new, self.rc.meta.patch_size, ctx,
                                 capacity=self.rc.train_cfg.net_batch_size)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K, P, P) float32 logits of the current weights in eval mode (the training mode is restored)."""
        model = self.state.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(self.rc.device, self.rc.train_cfg.amp):
                return model(images).float()
        finally:
            model.train(was_training)

    def label_window(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P+2h, P+2h) current instance and core maps of the patches enlarged by the label rule's reach ``h``,
        from the neighbouring patches' labels: what the label update reads."""
        device = self.rc.device
        return tuple(t.to(device, non_blocking=True) for t in self.rc.section.context(batch["origin"], self.halo))

    def attribute(self, images: torch.Tensor, batch: dict[str, Any], window: tuple[torch.Tensor, torch.Tensor],
                  tally: Tally) -> AttributionSummary:
        """CID / IG of the batch with the current weights, reduced on the device; adds to the ranking sums.

        The label window lets CID leave out the patches (and types) nothing can use.
        """
        attr, device = self.state.attr, self.rc.device
        lut = self.state.stores["train"].class_lut.to(device)
        instance = batch["instance"].to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        summary = summarize(self.state.model, images, lut[instance], targets=attr.classes, genes=attr.genes,
                            config=attr.config, generator=attr.generator, context=lut[window[0]],
                            mixed_precision=self.rc.train_cfg.amp)
        _sync(device)
        tally.time("attr_seconds", time.perf_counter() - t0)
        tally.add("attr_steps", summary.n_steps.double().mean() * len(images))
        tally.add("attr_samples", len(images))
        attr.add(summary.type_gene_sum, summary.type_pixels)
        return summary

    def grow_labels(self, batch: dict[str, Any], store: LabelStore, logits: torch.Tensor,
                    window: tuple[torch.Tensor, torch.Tensor], summary: AttributionSummary | None,
                    tally: Tally) -> torch.Tensor:
        """Apply the label rule on the label window and write the patches' new labels to ``store``; returns them
        (B, P, P) on the device."""
        rc, h = self.rc, self.halo
        t0 = time.perf_counter()
        instance = batch["instance"].to(rc.device, non_blocking=True)
        lut = store.class_lut.to(rc.device)
        p, pad = instance.shape[-1], (h,) * 4
        attribution = F.pad(summary.gene_sum, pad, mode="replicate") if summary is not None else None
        origin = batch["origin"].to(rc.device) - h
        result = update_labels(window[0], window[1], F.pad(logits, pad, mode="replicate"), lut, config=rc.label_cfg,
                               attribution=attribution,
                               targets=self.state.attr.classes if summary is not None else None,
                               generator=self.state.generators["labels"], seeds=rc.seeds, origin=origin)
        new = result.instance[:, h:h + p, h:h + p]
        tally.time("label_seconds", time.perf_counter() - t0)
        for key, value in result.stats.items():
            tally.add(key, value)
        tally.add("n_relabelled", (new != instance).sum())
        store.update(batch["index"], new)
        return new

    # ------------------------------------------------------------------------------------------ the epoch's end
    def end_epoch(self, plan: EpochPlan, tally: Tally, t_epoch: float) -> dict:
        """The section's totals on every rank; then rank 0 scores, logs and saves while the others wait."""
        ctx, cfg = self.rc.ctx, self.rc.train_cfg
        stats = distributed.reduce_metrics(tally.host(), ctx, max_keys=_WALL_KEYS)
        if plan.update and self.rc.spots is not None:  # every rank refits: the labels stay identical
            t0 = time.perf_counter()
            stats["n_relabelled"] = float(self.rc.spots.refit_with_network(ctx))
            stats["label_seconds"] = stats.get("label_seconds", 0.0) + time.perf_counter() - t0
        if plan.attribute:
            self.state.attr.reduce(ctx)
        due = plan.epoch % cfg.save_interval == 0 or plan.epoch == cfg.net_epoch
        rng_ranks = distributed.gather_objects(rng_states(self.state.generators), ctx) if due else None
        row = distributed.run_on_main(functools.partial(self._log_and_save, plan.epoch, stats, rng_ranks, t_epoch), ctx)
        self.rows.append(row)
        return row

    def _log_and_save(self, epoch: int, stats: dict[str, float], rng_ranks: list | None, t_epoch: float) -> dict:
        rc = self.rc
        calling, foreground = cell_calling(list(self.state.stores.values()), rc.meta, rc.spot_x, rc.spot_y,
                                           rc.train_cfg.pixel_distance)
        row = log_row(epoch, stats, calling, foreground, time.perf_counter() - t_epoch)
        write_csv(rc.run.train_log, pd.DataFrame([*self.rows, row]))
        log.info("epoch %d: loss %.4f, pixel acc %.3f, relabelled %d px, cell-calling %.3f, attribution %.1f s, "
                 "epoch %.1f s", epoch, row["loss"], row["pixel_acc"], row["n_relabelled"], row["cell_calling"],
                 row["attr_seconds"], row["epoch_seconds"])
        if rng_ranks is not None:
            if rc.spots is not None:
                rc.spots.save(rc.run, epoch)
            self.state.save(rc.run, epoch, rng_ranks=rng_ranks, configs=rc.configs, meta=rc.meta, extra=rc.extra)
        return row


def log_row(epoch: int, stats: dict[str, float], calling: float, foreground: int, seconds: float) -> dict:
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


def batches(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """The batches of one pass over ``loader``; a SIGTERM that arrived meanwhile is raised between batches.

    Worker processes the loader starts now are born with SIGTERM blocked, so that a scheduler's SIGTERM to the
    process group cannot kill one in the moment before it sets itself to ignore the signal (:func:`ignore_sigterm`).
    """
    if hasattr(signal, "pthread_sigmask") and loader.num_workers > 0:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            iterator = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    else:
        iterator = iter(loader)
    try:
        for batch in iterator:
            yield batch
            interrupt.check()
    finally:  # an error or a stop mid-pass: its workers (which ignore SIGTERM) go now, not when it is collected
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def ignore_sigterm(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders: DataLoader workers leave SIGTERM to the main process, which stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked at birth (see :func:`batches`)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
