"""What a run saves and restores: weights, optimizer, random streams, labels and attribution sums.

:class:`TrainingState` is written every ``--save_interval`` epochs as a consistent set (label cache, then the gene
ranking, then the checkpoint that names the cache's sha256) and read back by a resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from segjointgene import __version__
from segjointgene.config import AttributionConfig
from segjointgene.errors import DataError, InputNotFoundError
from segjointgene.io.files import save_npz
from segjointgene.io.metadata import DatasetMetadata
from segjointgene.io.runfolder import RunFolder
from segjointgene.preprocess.dataset import LabelStore, load_label_cache, save_label_cache

from .. import distributed
from ..checkpoint import file_sha256, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class AttributionState:
    """Attribution settings for the run: targets (network channels) and the running (type x gene) sums."""

    config: AttributionConfig
    genes: torch.Tensor  # (n_gene,) channel ids
    classes: torch.Tensor  # (T,) class ids
    generator: torch.Generator
    type_gene_sum: torch.Tensor | None = None  # (T, n_gene) float64 of the latest attributed epoch
    type_pixels: torch.Tensor | None = None
    epoch: int = -1

    def start_epoch(self, epoch: int) -> None:
        """An attributed epoch starts: its sums replace the previous epoch's."""
        self.type_gene_sum, self.type_pixels, self.epoch = None, None, epoch

    def add(self, type_gene_sum: torch.Tensor, type_pixels: torch.Tensor) -> None:
        self.type_gene_sum = type_gene_sum if self.type_gene_sum is None else self.type_gene_sum + type_gene_sum
        self.type_pixels = type_pixels if self.type_pixels is None else self.type_pixels + type_pixels

    def reduce(self, ctx: distributed.DistContext) -> None:
        """DDP: sum the epoch's (type x gene) sums over the ranks, so every rank holds the section's."""
        if not ctx.enabled:
            return
        if self.type_gene_sum is None:  # this rank attributed no patch of its own
            self.type_gene_sum = torch.zeros((self.classes.numel(), self.genes.numel()), dtype=torch.float64,
                                             device=self.classes.device)
            self.type_pixels = torch.zeros(self.classes.numel(), dtype=torch.float64, device=self.classes.device)
        distributed.all_reduce_sum_(self.type_gene_sum, ctx)
        distributed.all_reduce_sum_(self.type_pixels, ctx)


def make_generators(seed: int, device: torch.device, rank: int) -> dict[str, torch.Generator]:
    """The run's generators, seeded from ``--random_seed`` and the rank (rank 0 gets the single-process seeds).

    ``sampler`` shuffles the single-process loader; under DDP ``DistributedSampler(seed=--random_seed)`` shuffles,
    identically on every rank. ``augment``, ``attribution`` (CID noise) and ``labels`` (rule V2) differ by rank.
    """
    s = distributed.rank_seed(seed, rank)
    return {"sampler": torch.Generator().manual_seed(s), "augment": torch.Generator().manual_seed(s + 3),
            "attribution": torch.Generator(device).manual_seed(s + 1),
            "labels": torch.Generator(device).manual_seed(s + 2)}


def rng_states(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    return {name: g.get_state() for name, g in generators.items()} | {"torch": torch.get_rng_state()}


def _restore_rng(generators: dict[str, torch.Generator], states: dict[str, torch.Tensor]) -> None:
    for name, g in generators.items():
        try:
            g.set_state(states[name].cpu())  # states load onto the training device; generators take CPU byte tensors
        except RuntimeError:  # a device generator saved on another device type (a CUDA run resumed on CPU, ...)
            log.warning("the '%s' random stream was saved on another device type; it restarts from --random_seed", name)
    torch.set_rng_state(states["torch"].cpu())


@dataclass
class TrainingState:
    """Everything a checkpoint holds. ``model`` is the unwrapped network (keys without DDP's ``module.``)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    generators: dict[str, torch.Generator]
    stores: dict[str, LabelStore]
    attr: AttributionState | None

    def save(self, run: RunFolder, epoch: int, *, rng_ranks: list[dict[str, torch.Tensor]], configs: dict,
             meta: DatasetMetadata, extra: dict[str, Any]) -> None:
        """Label cache, then the gene ranking, then the checkpoint that names the cache's sha256 (a consistent set).

        ``rng_ranks`` holds every rank's generator states: rank 0's are the checkpoint's ``rng``, all of them
        ``rng_ranks`` when several processes trained.
        """
        cache = run.label_cache(epoch)
        save_label_cache(cache, self.stores)
        state = {
            "version": __version__, "epoch": epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "config": configs,
            "rng": rng_ranks[0], "world_size": len(rng_ranks),
            "label_cache": {"file": cache.name, "sha256": file_sha256(cache)},
            "n_genes": meta.n_genes, "n_classes": meta.n_classes, **extra,
        }
        if len(rng_ranks) > 1:
            state["rng_ranks"] = rng_ranks
        attr = self.attr
        if attr is not None and attr.type_gene_sum is not None:
            state["attribution"] = {"type_gene_sum": attr.type_gene_sum.cpu(), "type_pixels": attr.type_pixels.cpu(),
                                    "epoch": attr.epoch}
            _write_attribution(run, epoch, attr, meta)  # before the checkpoint: a saved epoch always has its ranking
        save_checkpoint(run.checkpoint(epoch), state)

    def restore(self, run: RunFolder, epoch: int, *, meta: DatasetMetadata, device: torch.device,
                ctx: distributed.DistContext = distributed.SINGLE) -> tuple[int, list[dict]]:
        """Restore the state at the end of ``epoch``; returns the first epoch to run and the earlier log rows."""
        epochs = run.saved_epochs()
        if epoch not in epochs:
            have = ", ".join(map(str, epochs)) or "none"
            raise InputNotFoundError(f"--ckpt_load_epoch={epoch}: {run.path} has no checkpoint + label cache for that "
                                     f"epoch (saved epochs: {have})")
        path = run.checkpoint(epoch)
        state = load_checkpoint(path, map_location=device)
        self._check_dataset(state, path, meta)
        cache = run.path / state["label_cache"]["file"]
        if not cache.is_file() or file_sha256(cache) != state["label_cache"]["sha256"]:
            raise DataError(f"{cache}: missing or not the label cache saved with {path.name}; resume from another epoch")
        self._load_weights(state, path)
        cached = load_label_cache(cache)
        for split, store in self.stores.items():
            if split not in cached:
                raise DataError(f"{cache}: no labels for the {split} split")
            store.load_state_dict(cached[split], source=str(cache))
        _restore_rank_rng(self.generators, state, ctx)
        if self.attr is not None and "attribution" in state:
            self.attr.type_gene_sum = state["attribution"]["type_gene_sum"].to(device)
            self.attr.type_pixels = state["attribution"]["type_pixels"].to(device)
            self.attr.epoch = int(state["attribution"]["epoch"])
        rows = _earlier_log_rows(run, epoch)
        log.info("resumed from %s (epoch %d); continuing with epoch %d", path.name, epoch, epoch + 1)
        return epoch + 1, rows

    @staticmethod
    def _check_dataset(state: dict[str, Any], path, meta: DatasetMetadata) -> None:
        if state.get("n_genes") != meta.n_genes or state.get("n_classes") != meta.n_classes:
            raise DataError(f"{path}: checkpoint of a run with {state.get('n_genes')} genes and "
                            f"{state.get('n_classes')} classes, but this dataset has {meta.n_genes} genes and "
                            f"{meta.n_classes} classes; it belongs to another dataset - choose another "
                            "--net_sub_suffix or --datasets_name")

    def _load_weights(self, state: dict[str, Any], path) -> None:
        try:
            self.model.load_state_dict(distributed.strip_module_prefix(state["model"]))
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err).strip())
            raise DataError(f"{path}: does not fit this network ({detail[:160]}); it was trained with other settings "
                            "(e.g. --net_width)") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _earlier_log_rows(run: RunFolder, epoch: int) -> list[dict]:
    """The ``train_log.csv`` rows up to ``epoch`` (none without a log)."""
    if not run.train_log.is_file():
        return []
    try:
        table = pd.read_csv(run.train_log)
        return table[table["epoch"] <= epoch].to_dict("records")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{run.train_log}: unreadable ({type(err).__name__}); delete it to resume without the earlier "
                        "log rows") from None


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


def _write_attribution(run: RunFolder, epoch: int, attr: AttributionState, meta: DatasetMetadata) -> None:
    from segjointgene.results.export import write_gene_ranking

    arrays = {"type_gene_sum": attr.type_gene_sum.cpu().numpy(), "type_pixels": attr.type_pixels.cpu().numpy(),
              "targets": attr.classes.cpu().numpy(), "genes": attr.genes.cpu().numpy(),
              "method": np.asarray(attr.config.method), "epoch": np.asarray(attr.epoch)}
    save_npz(run.attribution(epoch), arrays)
    write_gene_ranking(run.results, arrays["type_gene_sum"], arrays["type_pixels"], arrays["targets"],
                       arrays["genes"], meta, attr.config.method)
