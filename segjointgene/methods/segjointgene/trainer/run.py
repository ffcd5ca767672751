"""A self-training run: set it up (data, network, optimizer, generators, attribution targets), resume it, run its
epochs (:class:`~segjointgene.methods.segjointgene.trainer.epoch.EpochRunner`), and the ``SegJointGene`` step around it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from segjointgene import __version__, interrupt
from segjointgene.attribution import select_targets
from segjointgene.config import AttributionConfig, LabelUpdateConfig, RuntimeConfig, Settings, TrainConfig
from segjointgene.constants import SPOTS_TABLE
from segjointgene.errors import ConfigError, DataError, InputNotFoundError, UserError
from segjointgene.io.files import load_npz, read_json, remove_stale_temps, write_json
from segjointgene.io.metadata import DatasetMetadata, load_metadata
from segjointgene.io.runfolder import Paths, RunFolder
from segjointgene.methods.spotmodel.engine import reference_matrix
from segjointgene.preprocess.dataset import ImagePatchDataset, LabelStore, collate_spot_lists, read_class_lut
from segjointgene.preprocess.density import batch_images

from .. import distributed
from ..unet import UNet, check_patch_size
from .epoch import EpochRunner, RunContext, ignore_sigterm
from .section import SectionLabels, nucleus_seeds, spot_positions
from .spots import SpotEngine
from .state import AttributionState, TrainingState, make_generators

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What ``self_train`` did: the last epoch, the saved epochs and the log table."""

    last_epoch: int
    saved_epochs: list[int]
    log: pd.DataFrame
    run_dir: Path
    engine: str = ""  # what segmented the cells (the model rule's engine, or the label rule)


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
    index = runtime.gpu_id if runtime.device in ("auto", "cuda") else int(runtime.device.split(":")[1])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--gpu_id / --device: CUDA device {index} does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index)


# ------------------------------------------------------------------------------------------------ set-up
#: The largest patch-image cache ``--cache_patches auto`` keeps (bytes): the cache is shared memory that every
#: loader worker maps, so a section-size cache shows in every worker's resident memory (a 2400 x 2400 px crop of a
#: 300-gene panel is 7 GB of float32 images); beyond this the patches are read from disk each epoch.
CACHE_BUDGET = 1 << 30


def _cache_images(ds_sizes: int, setting: str) -> bool:
    if setting != "auto":
        return setting == "yes"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return False
    return ds_sizes < min(total // 4, CACHE_BUDGET)


def _open_splits(data_dir: Path, meta: DatasetMetadata, train_cfg: TrainConfig,
                 ctx: distributed.DistContext) -> dict[str, ImagePatchDataset]:
    """The train (and test) patch datasets, images cached in memory when they fit."""
    lut = read_class_lut(data_dir)
    p = meta.patch_size
    spot_lists = train_cfg.density_on_device
    # every rank of a node keeps its own copy: count them all against the memory
    cache = not spot_lists and _cache_images(meta.n_patches * meta.n_genes * p * p * 4 * ctx.local_world_size,
                                             train_cfg.cache_patches)
    splits = {s: ImagePatchDataset(data_dir, s, metadata=meta, class_lut=lut, cache_images=cache, spot_lists=spot_lists)
              for s in ("train", "test") if meta.split[s]}
    if "train" not in splits:
        raise DataError(f"{data_dir}: the train split is empty; preprocess with a smaller --test_fraction")
    return splits


def _attribution_targets(data_dir: Path, meta: DatasetMetadata, stores: dict[str, LabelStore],
                         attr_cfg: AttributionConfig, generator: torch.Generator,
                         device: torch.device) -> AttributionState | None:
    """Top genes by spot count, top cell types by nucleus pixels (background excluded)."""
    if attr_cfg.method == "none":
        return None
    gene_counts = np.bincount(load_npz(data_dir / SPOTS_TABLE, ("gene",))["gene"], minlength=meta.n_genes)
    class_pixels = sum(torch.bincount(st.classes(st.instances).flatten(), minlength=meta.n_classes)
                       for st in stores.values())
    genes, classes = select_targets(torch.as_tensor(gene_counts, dtype=torch.float64), class_pixels,
                                    attr_cfg.n_gene, attr_cfg.n_celltype)
    return AttributionState(config=attr_cfg, genes=genes.to(device), classes=classes.to(device), generator=generator)


def _training_state(meta: DatasetMetadata, splits: dict[str, ImagePatchDataset], train_cfg: TrainConfig,
                    runtime: RuntimeConfig, device: torch.device, ctx: distributed.DistContext) -> TrainingState:
    """A fresh network (seeded from ``--random_seed``), its optimizer and scaler, the generators, the label stores."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(runtime.random_seed)
        model = UNet(meta.n_genes, meta.n_classes, base_channels=train_cfg.net_width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.net_lr, weight_decay=train_cfg.net_weight_decay)
    use_fp16 = device.type == "cuda" and train_cfg.amp and not torch.cuda.is_bf16_supported()
    return TrainingState(model=model, optimizer=optimizer, scaler=torch.amp.GradScaler("cuda") if use_fp16 else None,
                         generators=make_generators(runtime.random_seed, device, ctx.rank),
                         stores={s: ds.labels for s, ds in splits.items()}, attr=None)


def _loader(ds: ImagePatchDataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None,
            num_workers: int, pin: bool, sampler: DistributedSampler | None = None) -> DataLoader:
    if sampler is not None:  # the sampler shards (and shuffles) by itself
        shuffle, generator = False, None
    # workers live for one pass (not persistent): the train and test loaders never hold workers at the same time,
    # each of which maps torch and a batch of patch images (a 300-gene panel: ~0.75 GB resident each)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
                      num_workers=num_workers, persistent_workers=False, pin_memory=pin, drop_last=False,
                      collate_fn=collate_spot_lists if ds.spot_lists else None, worker_init_fn=ignore_sigterm)


@contextlib.contextmanager
def _loaders(splits: dict[str, ImagePatchDataset], state: TrainingState, train_cfg: TrainConfig,
             runtime: RuntimeConfig, device: torch.device, ctx: distributed.DistContext) -> Iterator[tuple]:
    """(train loader, test loader or None, samplers); their worker processes are shut down on the way out, whatever
    ends the run (an error, Ctrl-C, SIGTERM)."""
    samplers = {s: distributed.shard_sampler(ds, ctx, shuffle=s == "train", seed=runtime.random_seed)
                if ctx.enabled else None for s, ds in splits.items()}
    make = functools.partial(_loader, batch_size=train_cfg.net_batch_size, num_workers=runtime.num_workers,
                             pin=device.type == "cuda")
    train = make(splits["train"], shuffle=True, generator=state.generators["sampler"], sampler=samplers["train"])
    test = make(splits["test"], shuffle=False, generator=None, sampler=samplers["test"]) if "test" in splits else None
    try:
        yield train, test, samplers
    finally:
        for loader in (train, test):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()  # noqa: SLF001 - torch keeps persistent workers in a private iterator


# ------------------------------------------------------------------------------------------------ the run
def self_train(data_dir: str | os.PathLike, run_dir: str | os.PathLike, *, train_cfg: TrainConfig = TrainConfig(),
               label_cfg: LabelUpdateConfig = LabelUpdateConfig(), attr_cfg: AttributionConfig = AttributionConfig(),
               runtime: RuntimeConfig = RuntimeConfig(), resume_epoch: int | None = None, progress: bool = True,
               run_info: dict[str, Any] | None = None, reference: pd.DataFrame | None = None) -> TrainResult:
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
    reference : genes x types class means (``--reference_csv``): the spot model's profiles of the types it names.

    Notes
    -----
    Called by every rank of an open process group (``torchrun``), it trains data-parallel (see the package
    docstring); only rank 0 writes files.
    """
    ctx = distributed.current()
    if label_cfg.rule == "auto":  # the spot-model engine (the CLI resolves --method first; see segjointgene.methods.choice)
        label_cfg = dataclasses.replace(label_cfg, rule="model" if label_cfg.method != "segjointgene" else "v1")
    if attr_cfg.start_epoch < 0:  # attribution from the epoch the labels start to grow
        attr_cfg = dataclasses.replace(attr_cfg, start_epoch=train_cfg.warmup_epochs)
    data_dir, run = Path(data_dir), RunFolder(Path(run_dir))
    meta = load_metadata(data_dir)
    check_patch_size(meta.patch_size)
    device = resolve_device(runtime, local_rank=ctx.local_rank if ctx.enabled else None)
    splits = _open_splits(data_dir, meta, train_cfg, ctx)
    state = _training_state(meta, splits, train_cfg, runtime, device, ctx)
    state.attr = _attribution_targets(data_dir, meta, state.stores, attr_cfg, state.generators["attribution"], device)
    rows: list[dict] = []
    start = 0
    if resume_epoch is not None:
        start, rows = state.restore(run, resume_epoch, meta=meta, device=device, ctx=ctx)
    net = distributed.wrap_model(state.model, device, ctx)
    rc = _run_context(data_dir, meta, run, splits, state, train_cfg, label_cfg, attr_cfg, runtime, device, ctx,
                      reference)
    if rc.spots is not None:  # the model rule: the spot model's fit (deterministic; redone on resume for the saves)
        rc.spots.run_fit()
        if resume_epoch is None:  # a new run starts from its territories; a resumed one has them in its label cache
            rc.spots.write_labels()
    saved = run.saved_epochs()
    if ctx.is_main:  # everything checked: the run starts
        run.path.mkdir(parents=True, exist_ok=True)
        if run_info is not None:
            write_json(run.run_info, run_info)
    with (interrupt.deferred(),  # SIGTERM stops the run between batches, never while workers start or stop
          _loaders(splits, state, train_cfg, runtime, device, ctx) as (train_loader, test_loader, samplers)):
        runner = EpochRunner(rc, state, net, train_loader=train_loader, test_loader=test_loader, samplers=samplers,
                             rows=rows, progress=progress)
        for epoch in range(start, train_cfg.net_epoch + 1):
            runner.run_epoch(epoch)
            if epoch % train_cfg.save_interval == 0 or epoch == train_cfg.net_epoch:
                saved.append(epoch)
    engine = rc.spots.engine if rc.spots is not None else f"UNet self-training, label rule {label_cfg.rule}"
    return TrainResult(last_epoch=train_cfg.net_epoch, saved_epochs=sorted(set(saved)), log=pd.DataFrame(rows),
                       run_dir=run.path, engine=engine)


def _run_context(data_dir: Path, meta: DatasetMetadata, run: RunFolder, splits: dict[str, ImagePatchDataset],
                 state: TrainingState, train_cfg: TrainConfig, label_cfg: LabelUpdateConfig,
                 attr_cfg: AttributionConfig, runtime: RuntimeConfig, device: torch.device,
                 ctx: distributed.DistContext, reference: pd.DataFrame | None = None) -> RunContext:
    spot_x, spot_y = spot_positions(data_dir, meta)
    train = splits["train"]
    images_of = functools.partial(batch_images, n_genes=meta.n_genes, patch_size=meta.patch_size,
                                  sigma=train.density_sigma, halo=train.density_halo, device=device)
    attr = state.attr
    return RunContext(
        train_cfg=train_cfg, label_cfg=label_cfg, attr_cfg=attr_cfg, meta=meta, run=run, device=device, ctx=ctx,
        section=SectionLabels(splits), seeds=nucleus_seeds(data_dir, meta, splits, len(train.labels.class_lut)).to(device),
        spot_x=spot_x, spot_y=spot_y, density_floor=train_cfg.background_density * meta.nuclear_density_median,
        images_of=images_of,
        configs={"train": dataclasses.asdict(train_cfg), "labels": dataclasses.asdict(label_cfg),
                 "attribution": dataclasses.asdict(attr_cfg), "runtime": dataclasses.asdict(runtime)},
        extra={"attr_targets": {"genes": attr.genes.cpu(), "classes": attr.classes.cpu()} if attr else {}},
        spots=(SpotEngine(data_dir, meta, splits, state.stores, spot_x, spot_y, label_cfg,
                          reference=None if reference is None else reference_matrix(
                              reference, list(meta.celltypes[1:]), list(meta.genes), "--reference_csv"))
               if label_cfg.rule == "model" else None))


# ------------------------------------------------------------------------------------------------ the step
def _prepare_run_dir(run: RunFolder, data_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to replace another run without ``--overwrite``; check a resume's dataset. Writes nothing but the removal
    of a killed run's hidden temporary files (and, with ``--overwrite``, of the previous run)."""
    if run.path.is_dir():
        remove_stale_temps(run.path)
    held = run.run_files()
    if resume:
        if run.run_info.is_file():
            recorded = read_json(run.run_info).get("data_dir")
            if recorded and Path(recorded) != data_dir.resolve():
                raise DataError(f"{run.run_info}: this run was trained on {recorded}, not {data_dir.resolve()}; "
                                "choose the matching --datasets_name")
        return
    if held and not overwrite:
        raise UserError(f"{run.path} already holds a run ({len(held)} files, e.g. {held[0].name}); resume it with "
                        "--if_load_ckpt=True, pass --overwrite to start over, or choose another --net_sub_suffix")
    if held:
        log.info("--overwrite: removing the previous run in %s", run.path)
        for p in held:
            p.unlink()
        shutil.rmtree(run.results, ignore_errors=True)


def _open_run(settings: Settings, paths: Paths) -> int | None:
    """Check the run folder (nothing is created yet); returns the epoch to resume from (None: a new run)."""
    load_metadata(paths.data_dir)
    resume_epoch = None
    if settings.step.if_load_ckpt:
        epochs = paths.run.saved_epochs()
        if not epochs:
            raise InputNotFoundError(f"--if_load_ckpt: {paths.run.path} holds no checkpoint to resume from")
        epoch = settings.step.ckpt_load_epoch
        resume_epoch = epoch if epoch is not None else epochs[-1]
    _prepare_run_dir(paths.run, Path(paths.data_dir), resume=resume_epoch is not None,
                     overwrite=settings.runtime.overwrite)
    return resume_epoch


def _run_info(settings: Settings, paths: Paths, meta: DatasetMetadata, *, world_size: int) -> dict[str, Any]:
    """The content of ``run.json``."""
    return {"datasets_name": paths.datasets_name, "data_dir": str(Path(paths.data_dir).resolve()),
            "raw_dir": meta.raw_dir, "package_version": __version__, "world_size": world_size,
            "reference_csv": settings.evaluate.reference_csv,
            "config": {name: dataclasses.asdict(getattr(settings, name))
                       for name in ("train", "labels", "attribution", "runtime")}}


def _export_and_report(result: TrainResult, datasets_name: str, minutes: float) -> None:
    from segjointgene.results.export import export_results

    results = export_results(result.run_dir, epoch=result.last_epoch)
    last = result.log.iloc[-1]
    print(f"trained {datasets_name} to epoch {result.last_epoch} in {minutes:.1f} min: loss {last['loss']:.4f}, "
          f"pixel acc {last['pixel_acc']:.3f}, cell-calling {last['cell_calling']:.3f}\n"
          f"cells from: {result.engine}\n"
          f"checkpoints: {result.run_dir} (epochs {', '.join(map(str, result.saved_epochs))})\nresults: {results}")


@contextlib.contextmanager
def _main_rank_logs(ctx: distributed.DistContext) -> Iterator[None]:
    """Info messages from rank 0 only (the other ranks still report warnings and errors)."""
    logger = logging.getLogger(__name__.split(".")[0])
    before = logger.level
    if not ctx.is_main:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


def run_training(settings: Settings, paths: Paths) -> int:
    """The ``SegJointGene`` step: check the run folder, train, export the results.

    Under ``torchrun`` every rank runs this: rank 0 checks and prepares the run folder and tells the others its
    decision (an error there stops every rank with its message), all ranks train their shards, rank 0 exports the
    results while the others wait.
    """
    runtime, train_cfg = settings.runtime, settings.train
    env = distributed.from_env()
    device = resolve_device(runtime, local_rank=env.local_rank if env.enabled else None)
    with (distributed.process_group(env, device, timeout_s=train_cfg.ddp_timeout_min * 60) as ctx,
          _main_rank_logs(ctx)):
        resume_epoch = distributed.run_on_main(lambda: _open_run(settings, paths), ctx)
        info = _run_info(settings, paths, load_metadata(paths.data_dir), world_size=ctx.world_size)
        reference = None
        if settings.evaluate.reference_csv:
            from segjointgene.evaluate.scoring import load_reference

            reference = load_reference(settings.evaluate.reference_csv)
        start = time.perf_counter()
        result = self_train(paths.data_dir, paths.run_dir, train_cfg=train_cfg, label_cfg=settings.labels,
                            attr_cfg=settings.attribution, runtime=runtime, resume_epoch=resume_epoch,
                            progress=not settings.step.quiet, run_info=info, reference=reference)
        minutes = (time.perf_counter() - start) / 60
        distributed.run_on_main(lambda: _export_and_report(result, paths.datasets_name, minutes), ctx)
    return 0
