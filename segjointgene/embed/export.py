"""Embedding exports: SegCLR's sharded CSV-ZIP release layout (writer and reader) and AnnData / npz tables.

CSV-ZIP layout (docs/SEGCLR.md §1 F8, §2.8)
-------------------------------------------
A folder holding ``manifest.json`` and ``<shard>.zip`` archives. The embeddings of object (cell) ``c`` are in the
archive ``md5_shard(c, num_shards, bytewidth)`` as the member ``<c>.csv``: one row per point,
``point_id,x,y,z,e0,...,e<d-1>``, **no header and no trailing newline**. The shard of an id is the MD5 digest of
the id written as an unsigned little-endian integer of ``bytewidth`` bytes, the digest read as a little-endian
integer, modulo ``num_shards`` (SegCLR's rule; its public releases used ``bytewidth=64``, so readers take it as a
parameter: ours reads it from the manifest). Coordinates are in micrometres (pixel centres, x = column), z is the
section index (0). Embedding values are written with 9 significant digits (exact for float32), coordinates with
the shortest exact representation, so write -> read is exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError, InputNotFoundError
from ..io.files import atomic_path, save_npz, write_csv, write_json
from ..io.runfolder import EmbeddingFiles

log = logging.getLogger(__name__)

__all__ = ["CSVZIP_FORMAT", "CellEmbeddings", "EmbeddingFiles", "anndata_available", "default_num_shards", "md5_shard",
           "read_cell",
           "read_csvzip", "read_manifest", "write_csvzip", "write_table"]

CSVZIP_FORMAT = "segjointgene-segclr-csvzip"
CSVZIP_VERSION = 1
MANIFEST = "manifest.json"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)




def anndata_available() -> bool:
    """Whether the optional ``anndata`` package can be imported."""
    try:
        import anndata  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------- sharding
def md5_shard(object_id: int, num_shards: int, *, bytewidth: int = 8, byteorder: str = "little") -> int:
    """Shard of an object id: MD5 of the id as an unsigned ``bytewidth``-byte integer, digest as an integer, mod N.

    Examples
    --------
    >>> import hashlib
    >>> md5_shard(1, 10) == int.from_bytes(hashlib.md5((1).to_bytes(8, "little")).digest(), "little") % 10
    True
    """
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    digest = hashlib.md5(int(object_id).to_bytes(bytewidth, byteorder, signed=False)).digest()
    return int.from_bytes(digest, byteorder) % num_shards


def default_num_shards(n_objects: int, per_shard: int = 1000) -> int:
    """``max(1, ceil(n_objects / per_shard))`` shards (fewer than SegCLR's 10,000: sections hold few cells)."""
    return max(1, math.ceil(n_objects / per_shard))


# ----------------------------------------------------------------------------------------------------- writer
def _cell_csv(point_id: np.ndarray, coords: np.ndarray, emb: np.ndarray) -> str:
    """Rows ``point_id,x,y,z,e0..`` joined by newlines, no header, no trailing newline."""
    fmt = "%d,%r,%r,%r," + ",".join(["%.9g"] * emb.shape[1])
    return "\n".join(fmt % (p, *c, *e) for p, c, e in zip(point_id.tolist(), coords.astype(np.float64).tolist(),
                                                           emb.astype(np.float64).tolist()))


def write_csvzip(out_dir: str | os.PathLike, cell: np.ndarray, point_id: np.ndarray, coords: np.ndarray,
                 emb: np.ndarray, *, num_shards: int = 0, bytewidth: int = 8,
                 metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write point embeddings in SegCLR's sharded CSV-ZIP layout (module docstring); replaces ``out_dir``.

    The folder is written under a temporary name and swapped in at the end, so readers never see a mix of an old
    and a new export. Zip members carry a fixed timestamp (the same inputs give the same bytes).

    Parameters
    ----------
    out_dir : the folder (created; an existing one is replaced).
    cell : (N,) int64 object id of each point; point_id : (N,) int64, unique within a cell.
    coords : (N, 3) float (x, y, z); unique within a cell (SegCLR's reader keys points by coordinates).
    emb : (N, d) float32 embeddings.
    num_shards : 0 = :func:`default_num_shards` of the number of objects.
    bytewidth : bytes of the id in the MD5 rule.
    metadata : extra manifest fields (units, model, mask mode ...).

    Returns
    -------
    The manifest dict (also written to ``out_dir/manifest.json``).
    """
    out_dir = Path(out_dir)
    cell = np.asarray(cell, np.int64)
    point_id = np.asarray(point_id, np.int64)
    coords = np.asarray(coords, np.float64)
    emb = np.asarray(emb, np.float32)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) != len(cell) or len(emb) != len(cell):
        raise ValueError(f"coords must be (N, 3) and emb (N, d) with N = {len(cell)}; got {coords.shape}, {emb.shape}")
    ids = np.unique(cell)
    order = np.argsort(cell, kind="stable")
    bounds = np.searchsorted(cell[order], np.concatenate([ids, [np.iinfo(np.int64).max]]))
    n_shards = num_shards or default_num_shards(ids.size)
    shard_of = np.array([md5_shard(int(c), n_shards, bytewidth=bytewidth) for c in ids.tolist()], np.int64)
    manifest = {
        "format": CSVZIP_FORMAT, "format_version": CSVZIP_VERSION,
        "num_shards": n_shards, "bytewidth": bytewidth, "byteorder": "little",
        "shard_rule": "int.from_bytes(md5(id.to_bytes(bytewidth, 'little')).digest(), 'little') % num_shards",
        "member_name": "<id>.csv", "header": False, "trailing_newline": False,
        "columns": ["point_id", "x", "y", "z"] + [f"e{i}" for i in range(emb.shape[1])],
        "embedding_dim": int(emb.shape[1]), "n_objects": int(ids.size), "n_points": int(len(cell)),
        **(metadata or {}),
    }
    tmp = out_dir.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{out_dir.name}")
    tmp.mkdir(parents=True)
    try:
        for s in np.unique(shard_of).tolist():
            with zipfile.ZipFile(tmp / f"{s}.zip", "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                for i in np.flatnonzero(shard_of == s).tolist():
                    rows = order[bounds[i]:bounds[i + 1]]
                    rows = rows[np.argsort(point_id[rows], kind="stable")]
                    info = zipfile.ZipInfo(f"{ids[i]}.csv", date_time=_ZIP_DATE)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, _cell_csv(point_id[rows], coords[rows], emb[rows]))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".old-{uuid.uuid4().hex[:8]}-{out_dir.name}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class CellEmbeddings:
    """The points of one object as read back from a CSV-ZIP export.

    Attributes
    ----------
    point_id : (n,) int64; coords : (n, 3) float64 (x, y, z); emb : (n, d) float32.
    """

    point_id: np.ndarray
    coords: np.ndarray
    emb: np.ndarray

    def as_coord_dict(self) -> dict[tuple[float, float, float], np.ndarray]:
        """SegCLR's reader view: {(x, y, z): embedding}; duplicate coordinates raise :class:`DataError`."""
        keys = [tuple(c) for c in self.coords.tolist()]
        if len(set(keys)) != len(keys):
            raise DataError("duplicate point coordinates in one object; SegCLR's reader keys points by coordinates")
        return dict(zip(keys, self.emb))


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a CSV-ZIP export folder (missing or foreign -> a clear error)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: {folder} is not a CSV-ZIP embedding export "
                                 "(run --step_name=embed)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CSVZIP_FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r} is not {CSVZIP_FORMAT!r}")
    return manifest


def _parse_csv(text: str, name: str) -> CellEmbeddings:
    """Parse one member; tolerates a header row and a trailing newline."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines and not lines[0].split(",")[0].strip().lstrip("-").isdigit():
        lines = lines[1:]  # a header
    if not lines:
        raise DataError(f"{name}: no rows")
    try:
        table = np.array([ln.split(",") for ln in lines], dtype=np.float64)
    except ValueError as err:
        raise DataError(f"{name}: not a numeric table ({err})") from None
    if table.ndim != 2 or table.shape[1] < 5:
        raise DataError(f"{name}: rows need point_id,x,y,z and at least one embedding value")
    return CellEmbeddings(point_id=table[:, 0].astype(np.int64), coords=table[:, 1:4],
                          emb=table[:, 4:].astype(np.float32))


def read_cell(folder: str | os.PathLike, object_id: int, *, num_shards: int | None = None,
              bytewidth: int | None = None) -> CellEmbeddings:
    """Read the points of one object: locate its shard with the MD5 rule, open ``<id>.csv`` there.

    ``num_shards`` and ``bytewidth`` default to the manifest's (give them to read a folder without a manifest,
    e.g. a SegCLR public release with ``bytewidth=64``).
    """
    folder = Path(folder)
    if num_shards is None or bytewidth is None:
        manifest = read_manifest(folder)
        num_shards = manifest["num_shards"] if num_shards is None else num_shards
        bytewidth = manifest["bytewidth"] if bytewidth is None else bytewidth
    shard = folder / f"{md5_shard(int(object_id), num_shards, bytewidth=bytewidth)}.zip"
    member = f"{int(object_id)}.csv"
    try:
        with zipfile.ZipFile(shard) as zf:
            text = zf.read(member).decode()
    except (FileNotFoundError, KeyError):
        raise InputNotFoundError(f"{folder}: object {object_id} not found (expected {member} in {shard.name})"
                                 ) from None
    return _parse_csv(text, f"{shard.name}:{member}")


def read_csvzip(folder: str | os.PathLike) -> dict[int, CellEmbeddings]:
    """Read every object of a CSV-ZIP export folder: {object id: CellEmbeddings}, ids ascending.

    Also checks that every member sits in the shard the MD5 rule of the manifest assigns to it.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    out: dict[int, CellEmbeddings] = {}
    for shard in sorted(folder.glob("*.zip")):
        with zipfile.ZipFile(shard) as zf:
            for member in zf.namelist():
                oid = int(Path(member).stem)
                expect = md5_shard(oid, manifest["num_shards"], bytewidth=manifest["bytewidth"])
                if shard.stem != str(expect):
                    raise DataError(f"{shard}: {member} belongs to shard {expect} by the MD5 rule of the manifest")
                out[oid] = _parse_csv(zf.read(member).decode(), f"{shard.name}:{member}")
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------- tables
def _jsonable(value: Any) -> Any:
    """Manifest values for AnnData's ``uns`` (no None, tuples as lists)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return "" if value is None else value


def write_table(path_h5ad: str | os.PathLike, obs: pd.DataFrame, obsm: dict[str, np.ndarray], *,
                X: np.ndarray | None = None, var_names: list[str] | None = None,
                uns: dict[str, Any] | None = None, fallback_npz: str | os.PathLike,
                fallback_obs: str | os.PathLike) -> Path:
    """Write an AnnData ``.h5ad`` (obs, obsm, optional X and uns), or an ``.npz`` + obs CSV without anndata.

    The npz holds ``obs_names`` and, per key ``k`` of ``obsm``, ``obsm_<k>`` (plus ``X`` and ``var_names``); the
    CSV holds ``obs``. The fallback is logged with the install hint.

    Returns
    -------
    The path written (the ``.h5ad`` or the ``.npz``).
    """
    obs = obs.copy()
    obs.index = obs.index.astype(str)
    obs.index.name = None  # AnnData refuses an index named like a column (e.g. 'cell')
    if anndata_available():
        import anndata

        var = pd.DataFrame(index=pd.Index(var_names if var_names is not None else [], dtype=str))
        adata = anndata.AnnData(X=X, obs=obs, var=var if X is not None else None,
                                obsm={k: np.asarray(v) for k, v in obsm.items()},
                                uns={"segclr": _jsonable(uns or {})})
        with atomic_path(path_h5ad) as tmp:
            adata.write_h5ad(tmp)
        return Path(path_h5ad)
    log.warning("anndata is not installed: writing %s + %s instead of %s (pip install anndata for .h5ad)",
                Path(fallback_npz).name, Path(fallback_obs).name, Path(path_h5ad).name)
    arrays = {"obs_names": obs.index.to_numpy().astype(str), **{f"obsm_{k}": np.asarray(v) for k, v in obsm.items()}}
    if X is not None:
        arrays["X"] = np.asarray(X)
        arrays["var_names"] = np.asarray(var_names or [], dtype=str)
    save_npz(fallback_npz, arrays)
    write_csv(fallback_obs, obs, index=True)
    if uns:
        write_json(Path(fallback_npz).with_suffix(".json"), _jsonable(uns))
    return Path(fallback_npz)

