"""``--step_name=embed``: read a finished run, train the SegCLR-style encoder, write the embedding exports.

Inputs: ``<run>/results/instance_mask.tif`` (cells), ``<run>/results/initial_instance_mask.tif`` (nuclei, optional),
``data/<name>/metadata.json`` + ``spots.npz`` (genes, spots), the raw folder's DAPI TIFF when the metadata says
``has_dapi`` (else the nucleus mask is the DAPI channel) and ``data/<name>/cells.csv`` (nucleus-based types, for the
figure and the ``obs`` table).

Outputs under ``<run>/results/`` (names in :class:`~segjointgene.embed.export.EmbeddingFiles`): ``embeddings.h5ad``
(per cell), ``embedding_points.h5ad`` (per point), ``embeddings_csvzip/`` and ``embeddings_csvzip_aggregated/``
(SegCLR release layout), ``segclr_encoder.pt``, ``segclr_train_log.csv`` and ``figures/segclr_pca_by_celltype.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..config import EmbedConfig, Settings
from ..constants import CELLS_TABLE, SPOTS_TABLE
from ..errors import ConfigError, DataError, InputNotFoundError
from ..io.files import load_npz, read_section, write_csv
from ..io.metadata import load_metadata
from ..io.runfolder import EmbeddingFiles, Paths, ResultFiles, RunFolder
from ..methods.segjointgene.checkpoint import save_checkpoint
from .crops import SectionInputs
from .export import write_csvzip, write_table
from .figures import plot_embedding
from .pipeline import EmbedRun, embed_section

log = logging.getLogger(__name__)

__all__ = ["check_previous", "load_section_inputs", "resolve_device", "run_embed", "write_outputs"]


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<gpu_id>`` when CUDA is available, else CPU; ``cuda`` -> ``cuda:<gpu_id>``."""
    if device == "auto":
        return torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        return torch.device(f"cuda:{gpu_id}")
    return torch.device(device)


def _read_mask(path: Path, role: str) -> np.ndarray:
    import tifffile

    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: the {role} of a finished run is needed; run --step_name="
                                 "SegJointGene (or --step_name=export) for this --net_sub_suffix first")
    mask = tifffile.imread(path)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{path}: the {role} must be a 2-D integer image, found shape {mask.shape} dtype {mask.dtype}")
    return mask


def load_section_inputs(run_dir: str | Path, data_dir: str | Path, raw_dir: str | Path | None = None) -> SectionInputs:
    """Read what the encoder needs from a run folder and its preprocessed dataset (module docstring)."""
    results = RunFolder(Path(run_dir)).results
    instance = _read_mask(results / ResultFiles.INSTANCE_MASK, "instance mask")
    nuclei_path = results / ResultFiles.INITIAL_MASK
    nuclei = _read_mask(nuclei_path, "nucleus mask") if nuclei_path.is_file() else None
    if nuclei is None:
        log.warning("%s not found: points are not labelled nucleus / cytoplasm", nuclei_path)
    meta = load_metadata(data_dir)
    spots = load_npz(Path(data_dir) / SPOTS_TABLE, ("gene", "x", "y"))
    raw_shape = meta.raw_shape
    if tuple(instance.shape) != raw_shape:
        raise DataError(f"{results / ResultFiles.INSTANCE_MASK}: shape {instance.shape} differs from the raw frame "
                        f"{raw_shape} of {Path(data_dir) / 'metadata.json'}; the run and the dataset do not match")
    if nuclei is not None and nuclei.shape != instance.shape:
        raise DataError(f"{nuclei_path}: shape {nuclei.shape} differs from the instance mask's {instance.shape}")
    dapi = None
    if meta.has_dapi:
        raw = Path(meta.raw_dir or raw_dir or "")
        if raw.is_dir():
            dapi = read_section(raw).dapi
            if dapi is not None and dapi.shape != instance.shape:
                raise DataError(f"{raw}: DAPI shape {dapi.shape} differs from the instance mask's {instance.shape}")
        else:
            log.warning("DAPI folder %s not found: using the nucleus mask as the DAPI channel", raw)
    return SectionInputs.from_arrays(instance, spots["gene"], spots["x"], spots["y"], list(meta.genes), dapi=dapi,
                                     nuclei=nuclei)


def _nucleus_types(data_dir: Path, cell_ids: np.ndarray) -> np.ndarray:
    """Nucleus-based type call of each cell (``unknown`` for ids absent from ``cells.csv``)."""
    path = data_dir / CELLS_TABLE
    if not path.is_file():
        return np.full(cell_ids.size, "unknown", dtype=object)
    table = pd.read_csv(path, usecols=["cell", "celltype"])
    lut = dict(zip(table["cell"].astype(np.int64).tolist(), table["celltype"].astype(str).tolist()))
    return np.array([lut.get(int(c), "unknown") for c in cell_ids.tolist()], dtype=object)


def _model_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def write_outputs(run: EmbedRun, results: Path, config: EmbedConfig, *, genes: list[str],
                  celltypes: np.ndarray, extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write every embedding output of :class:`EmbedRun` under ``results`` (see the module docstring)."""
    results.mkdir(parents=True, exist_ok=True)
    emb = run.embeddings
    b = run.builder
    manifest = {
        "package_version": __version__, "model_sha256_16": _model_hash(run.model), "preset": config.preset,
        "mask_mode": config.mask_mode, "view": "cell" if config.crop_px == 0 else "custom",
        "crop_px": b.crop_px, "input_px": b.input_px, "in_channels": b.in_channels,
        "coordinate_units": "um", "pixel_size_um": config.pixel_size_um,
        "coordinate_origin": "top-left corner of the raw frame; x = column, y = row; points at pixel centres",
        "z": "section index (0)", "config": dataclasses.asdict(config), **(extra or {}),
    }
    out: dict[str, Path] = {}
    coords = np.column_stack([emb.points["x_um"], emb.points["y_um"], np.zeros(len(emb.points))])
    out["csvzip"] = results / EmbeddingFiles.CSVZIP
    write_csvzip(out["csvzip"], emb.points["cell"].to_numpy(), emb.points["point_id"].to_numpy(), coords,
                 emb.point_emb, num_shards=config.num_shards, bytewidth=config.shard_bytewidth,
                 metadata={**manifest, "aggregation_radius_um": 0.0})
    if config.agg_radius_um > 0:
        out["csvzip_aggregated"] = results / EmbeddingFiles.CSVZIP_AGG
        write_csvzip(out["csvzip_aggregated"], emb.points["cell"].to_numpy(), emb.points["point_id"].to_numpy(),
                     coords, emb.point_agg, num_shards=config.num_shards, bytewidth=config.shard_bytewidth,
                     metadata={**manifest, "aggregation_radius_um": config.agg_radius_um})
    obs = emb.cells.copy()
    obs["celltype_nucleus"] = celltypes
    obs.index = obs["cell"].astype(str)
    uns = {**manifest, "aggregation": "mean over the cell's points"}
    out["cells"] = write_table(results / EmbeddingFiles.CELLS_H5AD, obs,
                               {"X_segclr": emb.cell_emb, "spatial": obs[["x_um", "y_um"]].to_numpy()},
                               X=emb.counts, var_names=list(genes), uns=uns,
                               fallback_npz=results / EmbeddingFiles.CELLS_NPZ,
                               fallback_obs=results / EmbeddingFiles.CELLS_OBS)
    pobs = emb.points.copy()
    pobs.index = [f"{c}_{p}" for c, p in zip(pobs["cell"].tolist(), pobs["point_id"].tolist())]
    out["points"] = write_table(results / EmbeddingFiles.POINTS_H5AD, pobs,
                                {"X_segclr": emb.point_emb, "X_segclr_agg": emb.point_agg,
                                 "spatial": pobs[["x_um", "y_um"]].to_numpy()},
                                uns={**uns, "aggregation_radius_um": config.agg_radius_um},
                                fallback_npz=results / EmbeddingFiles.POINTS_NPZ,
                                fallback_obs=results / EmbeddingFiles.POINTS_OBS)
    out["encoder"] = results / EmbeddingFiles.ENCODER
    state = {"model": run.model.state_dict(), "spec": dataclasses.asdict(run.model.spec),
             "projection": torch.from_numpy(b.stats.projection), "scale": torch.from_numpy(b.stats.scale),
             "crop_px": b.crop_px, "input_px": b.input_px, "mask_mode": b.mask_mode,
             "blur_sigma_px": b.blur_sigma_px, "config": dataclasses.asdict(config), "genes": list(genes),
             "version": __version__}
    save_checkpoint(out["encoder"], state)  # atomic and byte-deterministic
    if len(run.train_log):
        out["train_log"] = results / EmbeddingFiles.TRAIN_LOG
        write_csv(out["train_log"], run.train_log)
    out["figure"] = plot_embedding(emb.cell_emb, celltypes, results / ResultFiles.FIGURES / EmbeddingFiles.FIGURE,
                                   title="SegCLR cell embeddings (nucleus-based types)")
    return out


def check_previous(manifest_path: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace outputs made with other settings unless ``overwrite`` (RuntimeConfig.overwrite).

    ``settings`` are compared with the same keys of the JSON file at ``manifest_path`` (when it exists).
    """
    if overwrite or not manifest_path.is_file():
        return
    try:
        old = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # unreadable: it will be replaced
    changed = sorted(k for k, v in settings.items() if json.loads(json.dumps(v)) != old.get(k))
    if changed:
        detail = []
        for k in changed:
            if isinstance(settings[k], dict) and isinstance(old.get(k), dict):
                detail += [f"{k}.{f}" for f in settings[k] if settings[k][f] != old[k].get(f)]
            else:
                detail.append(k)
        raise ConfigError(f"{manifest_path.parent} holds outputs made with other settings "
                          f"({', '.join(detail) or ', '.join(changed)}); pass --overwrite to replace them")


def run_embed(settings: Settings, paths: Paths) -> int:
    """CLI handler of ``--step_name=embed`` (see the module docstring); prints a summary, returns 0.

    Outputs made with other settings (config or seed, recorded in the CSV-ZIP manifest) are only replaced with
    ``--overwrite``; re-running with the same settings recomputes them (the same bytes on the CPU).
    """
    config, runtime = settings.embed, settings.runtime
    start = time.perf_counter()
    results = paths.run.results
    check_previous(results / EmbeddingFiles.CSVZIP / "manifest.json",
                   {"config": dataclasses.asdict(config), "random_seed": runtime.random_seed}, runtime.overwrite)
    inputs = load_section_inputs(paths.run_dir, paths.data_dir, paths.raw_dir)
    device = resolve_device(runtime.device, runtime.gpu_id)
    run = embed_section(inputs, config, seed=runtime.random_seed, device=device,
                        progress=not settings.step.quiet)
    types = _nucleus_types(Path(paths.data_dir), run.embeddings.cells["cell"].to_numpy())
    out = write_outputs(run, results, config, genes=inputs.genes, celltypes=types,
                        extra={"random_seed": runtime.random_seed,
                               "datasets_name": paths.datasets_name})
    last = run.train_log.iloc[-1].to_dict() if len(run.train_log) else {}
    print(f"embed: {len(run.embeddings.cells)} cells, {len(run.embeddings.points)} points, "
          f"{run.embeddings.cell_emb.shape[1]}-d embeddings (crop {run.builder.crop_px} px -> {run.builder.input_px}, "
          f"{run.builder.in_channels} channels, {config.mask_mode}); "
          + (f"last step loss {last['loss']:.3f}, top-1 {last['top1']:.2f}, std*sqrt(d) {last['collapse']:.2f}; "
             if last else "")
          + f"{time.perf_counter() - start:.1f} s\n  -> {out['cells']}\n  -> {out['csvzip']}/")
    return 0
