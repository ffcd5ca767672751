"""The ``segment`` step: a preprocessed section tile by tile on Dask, resumable, merged into a run's results
(layer 2.7; see :mod:`segjointgene.tiles`)."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from .config import Settings
from .constants import CELLS_TABLE
from .engine import engine_configs, reference_matrix
from .errors import UserError
from .io import remove_stale_temps, write_json
from .metadata import load_metadata
from .runfolder import Paths
from .tiles import TileJob, merge_tiles, plan_tiles, prepare_tiles, read_lut, run_tiles

log = logging.getLogger(__name__)

__all__ = ["run_segment"]


def _overlap(data_dir: Path, requested: int) -> int:
    """The margin: as requested, else 4 typical cell radii (half the median nearest-nucleus distance)."""
    if requested:
        return requested
    cells = pd.read_csv(data_dir / CELLS_TABLE, usecols=["x", "y"])
    xy = cells[["x", "y"]].to_numpy(float)
    radius = 0.5 * float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1])) if len(xy) > 1 else 16.0
    return int(math.ceil(4 * radius))


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
        from .evaluation import load_reference

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
    record = {"tile_px": tile_px, "overlap_px": overlap, "data_dir": str(data_dir.resolve()),
              "engine": repr(engine), "reference_csv": settings.evaluate.reference_csv}
    todo = prepare_tiles(data_dir, meta, folder, tiles, record)
    print(f"segment: {len(tiles)} tile(s) of {tile_px} px with a {overlap}-px margin; {len(tiles) - len(todo)} "
          f"finished before, {len(todo)} to run")
    lut = read_lut(data_dir)
    jobs = [TileJob(tile=t, folder=str(folder), lut=lut, n_genes=meta.n_genes, n_types=meta.n_classes - 1,
                    config=engine, reference=reference) for t in todo]
    t0 = time.perf_counter()
    run_tiles(jobs, scheduler=cfg.scheduler, n_workers=cfg.dask_workers, memory_limit=cfg.dask_memory,
              progress=progress)
    seconds_tiles = time.perf_counter() - t0
    cells = merge_tiles(folder, tiles, meta, data_dir, run.results, lut)
    write_json(run.path / "run.json", {"datasets_name": paths.datasets_name, "data_dir": str(data_dir.resolve()),
                                       "step": "segment", **{k: v for k, v in record.items() if k != "data_dir"}})
    print(f"segmented {paths.datasets_name}: {len(cells)} cells from {len(tiles)} tiles ({seconds_tiles:.1f} s on "
          f"Dask, {time.perf_counter() - start:.1f} s in all)\nresults: {run.results}")
    if not len(cells):
        raise UserError(f"{run.results}: no cell was found; check the nuclei of {data_dir}")
    return 0
