"""Whole slides tile by tile on Dask (layer 2.6: numpy, pandas; dask.distributed imported when used).

A preprocessed section is cut into square tiles of the padded patch frame (whole patches; ``tile_px``), each read
with a margin (``overlap_px``) on every side. Every tile runs the spot-model engine without the network
(:func:`segjointgene.methods.spotmodel.engine.segment_window`) on a Dask cluster (a ``LocalCluster`` by default, or an
existing one by its scheduler's address, e.g. from dask-jobqueue on SLURM), from its own input file: its spots and the
nuclei of its window, so a worker never holds more than one window. With a tile network
(:mod:`segjointgene.methods.tiled.network`, trained on a sample of tiles' engine results under ``engine/``), each tile's spot model takes its evidence.

Seams: a tile is the *home* of the pixels and spots of its core (the tile without its margin) and only its results
there are kept; cells keep their nucleus ids across tiles, so a cell that straddles a seam is one cell, its pixels on
either side labelled by their home tiles, which both saw the whole cell when the margin exceeds a cell's diameter. A
cell found de novo belongs to the tile whose core holds its centre (the others drop their copy of it); its pixels and
spots beyond that core are claims, which the merge gives it wherever the home tile left background.

Every finished tile is written atomically under ``<run>/tiles/``; a rerun (after a kill, or a failed tile) keeps
the finished ones and runs the rest. :mod:`segjointgene.methods.tiled.merge` writes the run's results from the tile files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from segjointgene.constants import BACKGROUND, SPLITS, SPOTS_TABLE, PatchKeys
from segjointgene.errors import UserError
from segjointgene.io.files import load_npz, npz_headers, save_npz, write_json
from segjointgene.io.metadata import DatasetMetadata
from segjointgene.preprocess.geometry import parse_patch_name

from ..spotmodel.engine import EngineConfig, segment_window

log = logging.getLogger(__name__)

__all__ = ["Tile", "TileError", "TileJob", "plan_tiles", "prepare_tiles", "patch_paths", "read_tile_input",
           "result_path", "run_tiles", "segment_tile", "tile_window"]

#: Ids reserved for the de novo cells of each tile (above every nucleus id).
DENOVO_STRIDE = 1 << 16
PLAN_FILE = "plan.json"


class TileError(UserError):
    """One or more tiles failed; the others are kept."""


@dataclass(frozen=True)
class Tile:
    """A tile: its grid position and its core and outer windows (y0, y1, x0, x1) in the padded patch frame."""

    row: int
    col: int
    index: int
    core: tuple[int, int, int, int]
    outer: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"t_{self.row}_{self.col}"


def plan_tiles(shape: tuple[int, int], tile_px: int, overlap_px: int) -> list[Tile]:
    """Tiles of ``tile_px`` covering a frame of ``shape``, each read with ``overlap_px`` more on every side.

    Examples
    --------
    >>> [(t.name, t.core, t.outer) for t in plan_tiles((4, 6), 4, 1)]
    [('t_0_0', (0, 4, 0, 4), (0, 4, 0, 5)), ('t_0_1', (0, 4, 4, 6), (0, 4, 3, 6))]
    """
    if tile_px < 1 or overlap_px < 0:
        raise ValueError(f"tile_px must be >= 1 and overlap_px >= 0; got {tile_px}, {overlap_px}")
    h, w = shape
    tiles = []
    for r, y0 in enumerate(range(0, h, tile_px)):
        for c, x0 in enumerate(range(0, w, tile_px)):
            y1, x1 = min(y0 + tile_px, h), min(x0 + tile_px, w)
            outer = (max(y0 - overlap_px, 0), min(y1 + overlap_px, h), max(x0 - overlap_px, 0), min(x1 + overlap_px, w))
            tiles.append(Tile(r, c, len(tiles), (y0, y1, x0, x1), outer))
    return tiles


# ------------------------------------------------------------------------------------------------ inputs
def patch_paths(data_dir: Path, meta: DatasetMetadata) -> dict[tuple[int, int], Path]:
    return {parse_patch_name(n): data_dir / split / n for split in SPLITS for n in meta.split.get(split, [])}


def tile_window(paths: dict[tuple[int, int], Path], p: int, outer: tuple[int, int, int, int]) -> np.ndarray:
    """The nucleus (instance) channel of the patches over a window; absent (empty) patches are background."""
    y0, y1, x0, x1 = outer
    out = np.zeros((y1 - y0, x1 - x0), np.int64)
    for r in range(y0 // p, -(-y1 // p)):
        for c in range(x0 // p, -(-x1 // p)):
            path = paths.get((r, c))
            if path is None:
                continue
            inst = load_npz(path, (PatchKeys.INSTANCE,))[PatchKeys.INSTANCE]
            ys, xs = max(y0, r * p), max(x0, c * p)
            ye, xe = min(y1, (r + 1) * p), min(x1, (c + 1) * p)
            out[ys - y0:ye - y0, xs - x0:xe - x0] = inst[ys - r * p:ye - r * p, xs - c * p:xe - c * p]
    return out


def prepare_tiles(data_dir: Path, meta: DatasetMetadata, folder: Path, tiles: Sequence[Tile],
                  settings: dict, *, also: Sequence[Tile] = ()) -> list[Tile]:
    """Write the input (``<folder>/input/<tile>.npz``: spot rows, positions, genes and the nuclei of its outer
    window) of each tile without a result, and of the tiles ``also`` (e.g. the network's sample), unless it is there;
    returns the tiles without a result yet. The plan and ``settings`` are recorded in ``plan.json``; a folder of
    another plan or other settings is an error (rerun with --overwrite)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"tiles": [asdict(t) for t in tiles], "settings": settings,
              "spots": int(npz_headers(data_dir / SPOTS_TABLE)["x"][0][0])}
    plan = folder / PLAN_FILE
    if plan.is_file() and json.loads(plan.read_text()) != json.loads(json.dumps(record)):
        raise UserError(f"{folder} holds tiles of another plan or other settings; pass --overwrite to start over, or "
                        "use the same tile and engine flags to resume")
    write_json(plan, record)
    todo = [t for t in tiles if not (folder / f"{t.name}.npz").is_file()]
    wanted = {t.index: t for t in [*todo, *also]}
    need = [t for _, t in sorted(wanted.items()) if not (folder / "input" / f"{t.name}.npz").is_file()]
    if need:
        _write_inputs(data_dir, meta, folder / "input", need, tiles)
    return todo


def _write_inputs(data_dir: Path, meta: DatasetMetadata, folder: Path, tiles: Sequence[Tile],
                  plan: Sequence[Tile]) -> None:
    """The spots (those in its outer window, found through the ``plan``'s grid of tile cores: the spots are sorted
    by core once) and nuclei of each of ``tiles``."""
    folder.mkdir(parents=True, exist_ok=True)
    spots = load_npz(data_dir / SPOTS_TABLE, ("gene", "x", "y"))
    y0, x0 = meta.crop_offset
    x, y = spots["x"].astype(np.float64) - x0, spots["y"].astype(np.float64) - y0
    gene = spots["gene"].astype(np.int32)
    del spots
    side = max(t.core[1] - t.core[0] for t in plan)
    cols = int(max(t.col for t in plan)) + 1
    r, c = np.floor(y / side).astype(np.int64), np.floor(x / side).astype(np.int64)
    key = np.where((r >= 0) & (c >= 0) & (c < cols), r * cols + c, -1)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    paths, p = patch_paths(data_dir, meta), meta.patch_size
    for t in tiles:
        oy0, oy1, ox0, ox1 = t.outer
        reach = [(t.row + dr) * cols + t.col + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                 if t.row + dr >= 0 and 0 <= t.col + dc < cols]
        bounds = np.searchsorted(sorted_key, [(k, k + 1) for k in sorted(reach)])
        cand = np.sort(np.concatenate([order[lo:hi] for lo, hi in bounds]))
        rows = cand[(y[cand] >= oy0) & (y[cand] < oy1) & (x[cand] >= ox0) & (x[cand] < ox1)]
        save_npz(folder / f"{t.name}.npz", {"rows": rows.astype(np.int64), "x": x[rows] - ox0, "y": y[rows] - oy0,
                                            "gene": gene[rows], "nuclei": tile_window(paths, p, t.outer).astype(np.uint32)})


# ------------------------------------------------------------------------------------------------ one tile
@dataclass(frozen=True)
class TileJob:
    """What a worker needs for one tile (small: paths and settings, no arrays but the reference)."""

    tile: Tile
    folder: str
    lut: np.ndarray  # cell id -> class id (0 = background), from the dataset's cells table
    n_genes: int
    n_types: int
    config: EngineConfig
    reference: np.ndarray | None = None
    network: str = ""  # the tile network's file (:mod:`segjointgene.methods.tiled.network`); empty: the engine alone
    net_weight: float = 0.5  # --model_net_weight
    background_weight: float = 0.25  # --model_background_weight
    out: str = ""  # sub-folder of ``folder`` for the result


def read_tile_input(folder: Path, tile: Tile) -> dict[str, np.ndarray]:
    """A tile's input: spot ``rows`` (in spots.npz), ``x, y`` (outer-window frame), ``gene``, ``nuclei``."""
    return load_npz(folder / "input" / f"{tile.name}.npz", ("rows", "x", "y", "gene", "nuclei"))


def result_path(folder: Path, tile: Tile, out: str = "") -> Path:
    return folder / out / f"{tile.name}.npz"


_NETWORKS: dict[str, tuple] = {}  # a worker's loaded tile network, by file


def _network_evidence(job: TileJob, data: dict[str, np.ndarray]) -> np.ndarray:
    """The tile network's weighted log-evidence at the tile's spots (the network loaded once per worker)."""
    import torch

    from ..spotmodel.engine import network_evidence
    from .network import load_network, spot_log_posterior

    if job.network not in _NETWORKS:
        torch.set_num_threads(1)  # a Dask worker has one thread
        _NETWORKS.clear()
        _NETWORKS[job.network] = load_network(job.network)
    net, spec = _NETWORKS[job.network]
    log_post = spot_log_posterior(net, spec, data["x"], data["y"], data["gene"].astype(np.int64),
                                  data["nuclei"].shape)
    return job.net_weight * network_evidence(log_post, job.background_weight)


def segment_tile(job: TileJob) -> str:
    """Run the engine (with the tile network's evidence when ``job.network``) on one tile and write its result,
    ``<folder>/<out>/<tile>.npz`` (the home spots' rows, cells and probabilities, the core's mask, the de novo cells it
    owns); returns the tile's name. A Dask task."""
    t, folder = job.tile, Path(job.folder)
    data = read_tile_input(folder, t)
    nuclei = data["nuclei"].astype(np.int64)
    ids = np.unique(nuclei[nuclei > 0])
    ids = ids[ids < job.lut.size]
    first_new = job.lut.size + t.index * DENOVO_STRIDE
    evidence = (lambda: _network_evidence(job, data)) if job.network else None
    seg = segment_window(data["x"], data["y"], data["gene"], nuclei, ids, job.lut[ids] - 1, n_genes=job.n_genes,
                         n_types=job.n_types, first_new_id=first_new, reference=job.reference, config=job.config,
                         evidence=evidence)
    oy0, _, ox0, _ = t.outer
    cy0, cy1, cx0, cx1 = t.core
    owned = _owned_denovo(seg.mask, seg.denovo_ids, (cy0 - oy0, cy1 - oy0, cx0 - ox0, cx1 - ox0))
    mask, cell = seg.mask, seg.cell
    foreign = np.setdiff1d(seg.denovo_ids, owned)
    if foreign.size:  # de novo cells centred in another tile's core: theirs
        mask, cell = np.where(np.isin(mask, foreign), BACKGROUND, mask), np.where(np.isin(cell, foreign), 0, cell)
    y, x = data["y"] + oy0, data["x"] + ox0
    home = (y >= cy0) & (y < cy1) & (x >= cx0) & (x < cx1)
    keep = np.isin(seg.denovo_ids, owned)
    # the owned de novo cells beyond the core: claims on the neighbours' background (see merge)
    claim = np.isin(mask, owned)
    claim[cy0 - oy0:cy1 - oy0, cx0 - ox0:cx1 - ox0] = False
    claim_y, claim_x = np.nonzero(claim)
    claim_spot = np.isin(cell, owned) & ~home
    result_path(folder, t, job.out).parent.mkdir(exist_ok=True)
    save_npz(result_path(folder, t, job.out), {
        "rows": data["rows"][home], "cell": cell[home].astype(np.int64), "prob": seg.prob[home],
        "mask": mask[cy0 - oy0:cy1 - oy0, cx0 - ox0:cx1 - ox0].astype(np.uint32),
        "denovo_cell": seg.denovo_ids[keep], "denovo_class": seg.denovo_types[keep] + 1,
        "claim_y": (claim_y + oy0).astype(np.int64), "claim_x": (claim_x + ox0).astype(np.int64),
        "claim_id": mask[claim].astype(np.int64), "claim_rows": data["rows"][claim_spot],
        "claim_cell": cell[claim_spot].astype(np.int64), "claim_prob": seg.prob[claim_spot],
        "engine": np.array(seg.engine), "network": np.array(bool(job.network) and seg.engine != "density")})
    return t.name


def _owned_denovo(mask: np.ndarray, ids: np.ndarray, core: tuple[int, int, int, int]) -> np.ndarray:
    """The de novo ``ids`` whose centre (mean pixel) lies in the ``core`` window of ``mask``."""
    if ids.size == 0:
        return ids
    from scipy import ndimage

    centres = np.asarray(ndimage.center_of_mass(np.ones(mask.shape), mask, ids), np.float64).reshape(-1, 2)
    cy, cx = centres[:, 0], centres[:, 1]  # one (y, x) per id
    y0, y1, x0, x1 = core
    return ids[(cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)]


# ------------------------------------------------------------------------------------------------ the cluster
def run_tiles(jobs: Sequence[TileJob], *, scheduler: str = "", n_workers: int = 0, memory_limit: str = "auto",
              progress: bool = True) -> list[str]:
    """Run the tiles on Dask (an existing cluster at ``scheduler``, else a ``LocalCluster`` of ``n_workers``
    single-threaded processes, 0 = one per core); returns the finished tiles' names.

    Raises
    ------
    TileError : some tiles failed (named, with the first error); the finished ones are kept on disk.
    """
    if not jobs:
        return []
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise UserError("the tiled pipeline needs dask.distributed: pip install 'dask[distributed]' "
                        "(or pip install segjointgene[tiles])") from None
    from tqdm.auto import tqdm

    cluster = None if scheduler else LocalCluster(n_workers=n_workers or None, threads_per_worker=1,
                                                   memory_limit=memory_limit, processes=True, dashboard_address=":0")
    done, failed = [], {}
    with Client(scheduler or cluster) as client:
        futures = {client.submit(segment_tile, job, key=f"segjointgene-{job.tile.name}", pure=False): job.tile.name
                   for job in jobs}
        with tqdm(total=len(futures), desc="tiles", unit="tile", disable=not progress) as bar:
            for future in as_completed(futures):
                name = futures[future]
                if future.status == "error":
                    failed[name] = future.exception()
                else:
                    done.append(future.result())
                bar.update()
    if cluster is not None:
        cluster.close()
    if failed:
        name, err = next(iter(sorted(failed.items())))
        raise TileError(f"{len(failed)} of {len(jobs)} tile(s) failed ({', '.join(sorted(failed)[:5])}); tile {name}: "
                        f"{type(err).__name__}: {err}. The {len(done)} finished tile(s) are kept: rerun the same "
                        "command to retry the rest")
    return done
