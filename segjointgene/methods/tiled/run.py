"""The ``segment`` step: a preprocessed section tile by tile on Dask, resumable, merged into a run's results
(layer 2.7; see :mod:`segjointgene.methods.tiled.tiles`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from segjointgene.config import Settings
from segjointgene.constants import CELLS_TABLE
from segjointgene.errors import UserError
from segjointgene.io.files import load_npz, remove_stale_temps, write_json
from segjointgene.io.metadata import load_metadata
from segjointgene.io.runfolder import Paths
from segjointgene.preprocess.dataset import read_class_lut
from segjointgene.results.stitch import extend_lut

from ..segjointgene.labels import IGNORE
from ..spotmodel.engine import engine_configs, reference_matrix
from ..spotmodel.model import typical_radius
from .merge import merge_tiles
from .network import NetworkSpec, TrainingWindow, sample_tiles, save_network, train_network
from .tiles import Tile, TileJob, plan_tiles, prepare_tiles, read_tile_input, result_path, run_tiles

log = logging.getLogger(__name__)

NETWORK_FILE = "network.pt"

__all__ = ["run_segment"]


def _overlap(data_dir: Path, requested: int) -> int:
    """The margin: as requested, else 4 typical cell radii (half the median nearest-nucleus distance; with one cell,
    that of a 200-px nucleus)."""
    if requested:
        return requested
    cells = pd.read_csv(data_dir / CELLS_TABLE, usecols=["x", "y"])
    return int(math.ceil(4 * typical_radius(cells[["y", "x"]].to_numpy(float), np.full(len(cells), 200.0))))


def _network_settings(settings: Settings) -> dict:
    """What the tile network depends on (recorded in the plan: a change needs --overwrite)."""
    t, lab = settings.train, settings.labels
    if not settings.tiles.network_tiles:
        return {}
    return {"tiles": settings.tiles.network_tiles, "net_epoch": t.net_epoch, "net_batch_size": t.net_batch_size,
            "net_lr": t.net_lr, "net_width": t.net_width, "augment": t.augment,
            "random_seed": settings.runtime.random_seed, "model_net_weight": lab.model_net_weight,
            "model_background_weight": lab.model_background_weight}


def _network_sample(data_dir: Path, meta, tiles: list[Tile], n: int, seed: int) -> list[Tile]:
    """``n`` tiles drawn with probability proportional to their nuclei (the cells table's centres in their cores)."""
    if not n:
        return []
    cells = pd.read_csv(data_dir / CELLS_TABLE, usecols=["x", "y"])
    y = cells["y"].to_numpy(float) - meta.crop_offset[0]
    x = cells["x"].to_numpy(float) - meta.crop_offset[1]
    counts = np.array([np.count_nonzero((y >= t.core[0]) & (y < t.core[1]) & (x >= t.core[2]) & (x < t.core[3]))
                       for t in tiles])
    return [tiles[i] for i in sample_tiles(counts, n, seed)]


def _train_on_sample(job: TileJob, sample: list[Tile], meta, settings: Settings, path: Path, dask_args: dict) -> None:
    """The engine alone on the sampled tiles (kept under ``engine/``), then the network trained on their cells'
    types in their cores, saved to ``path``."""
    folder = Path(job.folder)
    todo = [t for t in sample if not result_path(folder, t, "engine").is_file()]
    print(f"segment: training the network on {len(sample)} tile(s) ({', '.join(t.name for t in sample)})")
    run_tiles([dataclasses.replace(job, tile=t, out="engine") for t in todo], **dask_args)
    windows = []
    for t in sample:
        data = read_tile_input(folder, t)
        res = load_npz(result_path(folder, t, "engine"), ("mask", "denovo_cell", "denovo_class"))
        lut = extend_lut(job.lut, res["denovo_cell"], res["denovo_class"])
        labels = np.full(data["nuclei"].shape, IGNORE, np.int64)
        cy0, cy1, cx0, cx1 = (v - o for v, o in zip(t.core, (t.outer[0], t.outer[0], t.outer[2], t.outer[2])))
        labels[cy0:cy1, cx0:cx1] = lut[res["mask"]]
        windows.append(TrainingWindow(data["x"], data["y"], data["gene"].astype(np.int64), labels))
    t_cfg = settings.train
    spec = NetworkSpec(n_genes=meta.n_genes, n_classes=meta.n_classes, patch_size=meta.patch_size,
                       width=t_cfg.net_width, sigma=float(meta.density_sigma), halo=int(meta.density_halo))
    t0 = time.perf_counter()
    net = train_network(windows, spec, epochs=max(t_cfg.net_epoch, 1), batch_size=t_cfg.net_batch_size,
                        lr=t_cfg.net_lr, seed=settings.runtime.random_seed, augment=t_cfg.augment)
    save_network(path, net, spec, t_cfg.net_epoch)
    print(f"segment: network trained in {time.perf_counter() - t0:.0f} s -> {path}")


def run_segment(settings: Settings, paths: Paths, *, progress: bool = True) -> int:
    """Plan the tiles, write the missing inputs, run the unfinished tiles on Dask, merge (see the module docstring)."""
    start = time.perf_counter()
    data_dir, run = Path(paths.data_dir), paths.run
    meta = load_metadata(data_dir)
    cfg = settings.tiles
    p = meta.patch_size
    tile_px = -(-cfg.tile_px // p) * p
    overlap = min(_overlap(data_dir, cfg.overlap_px), tile_px)  # a tile's window reaches its 8 neighbours at most
    tiles = plan_tiles(meta.padded_shape, tile_px, overlap)
    reference = None
    if settings.evaluate.reference_csv:
        from segjointgene.evaluate.scoring import load_reference

        reference = reference_matrix(load_reference(settings.evaluate.reference_csv), list(meta.celltypes[1:]),
                                     list(meta.genes), "--reference_csv")
    engine = engine_configs(settings.labels, reference)
    folder = run.path / "tiles"
    if settings.runtime.overwrite and run.path.is_dir():
        log.info("--overwrite: removing the previous tiled run in %s", run.path)
        shutil.rmtree(run.path)
    if folder.is_dir():
        remove_stale_temps(folder)
        remove_stale_temps(folder / "input") if (folder / "input").is_dir() else None
    net = _network_settings(settings)
    record = {"tile_px": tile_px, "overlap_px": overlap, "data_dir": str(data_dir.resolve()),
              "engine": repr(engine), "reference_csv": settings.evaluate.reference_csv, "network": net}
    lut = read_class_lut(data_dir)
    sample = _network_sample(data_dir, meta, tiles, cfg.network_tiles, settings.runtime.random_seed)
    network_file = folder / NETWORK_FILE
    todo = prepare_tiles(data_dir, meta, folder, tiles, record,
                         also=sample if cfg.network_tiles and not network_file.is_file() else ())
    print(f"segment: {len(tiles)} tile(s) of {tile_px} px with a {overlap}-px margin; {len(tiles) - len(todo)} "
          f"finished before, {len(todo)} to run")
    job = TileJob(tile=tiles[0], folder=str(folder), lut=lut, n_genes=meta.n_genes, n_types=meta.n_classes - 1,
                  config=engine, reference=reference)
    dask_args = dict(scheduler=cfg.scheduler, n_workers=cfg.dask_workers, memory_limit=cfg.dask_memory, progress=progress)
    t0 = time.perf_counter()
    if cfg.network_tiles and todo:
        if not network_file.is_file():
            _train_on_sample(job, sample, meta, settings, network_file, dask_args)
        job = dataclasses.replace(job, network=str(network_file), net_weight=settings.labels.model_net_weight,
                                  background_weight=settings.labels.model_background_weight)
    run_tiles([dataclasses.replace(job, tile=t) for t in todo], **dask_args)
    seconds_tiles = time.perf_counter() - t0
    cells = merge_tiles(folder, tiles, meta, data_dir, run.results, lut, margin=overlap)
    write_json(run.path / "run.json", {"datasets_name": paths.datasets_name, "data_dir": str(data_dir.resolve()),
                                       "step": "segment", **{k: v for k, v in record.items() if k != "data_dir"}})
    print(f"segmented {paths.datasets_name}: {len(cells)} cells from {len(tiles)} tiles ({seconds_tiles:.1f} s on "
          f"Dask, {time.perf_counter() - start:.1f} s in all)\nresults: {run.results}")
    if not len(cells):
        raise UserError(f"{run.results}: no cell was found; check the nuclei of {data_dir}")
    return 0
