"""Reading raw sections and writing files atomically (layer 1: numpy, pandas, scipy, tifffile; no torch).

A raw section folder follows the CA1 layout (SPEC §2.1): ``cells_*.csv``, ``spots*.csv``, ``celltype_*.csv`` and a
DAPI TIFF and/or a nucleus label image (``*.coo.npz`` or a TIFF whose name contains ``label``). :func:`read_section`
validates everything once and returns a :class:`Section`; code downstream trusts it.

Every writer here goes through :func:`atomic_path`: the file is written under a hidden temporary name in the same
folder and renamed over the final name, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import logging
import os
import re
import shutil
import socket
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from ..constants import BACKGROUND, RawFiles
from ..errors import ColumnError, DataError, InputNotFoundError

log = logging.getLogger(__name__)

__all__ = [
    "Section",
    "atomic_path",
    "load_npz",
    "npz_headers",
    "read_json",
    "read_section",
    "remove_stale_temps",
    "save_npz",
    "write_csv",
    "write_json",
    "write_tif",
]

NucleusLabels = np.ndarray | scipy.sparse.csr_matrix

#: A raw section whose spots mostly fall outside its image is almost certainly paired with the wrong image.
_MAX_OUTSIDE_FRACTION = 0.5


# ---------------------------------------------------------------------------------------------------------- writing
#: Short tag of this machine in temporary names: a temporary file is only ever judged stale on the host that made it.
_HOST_TAG = hashlib.blake2s(socket.gethostname().encode(), digest_size=3).hexdigest()
#: ``.tmp-<pid>-<host tag>-<random>-<final name>``
_TEMP_NAME = re.compile(r"^\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})-[0-9a-f]{8}-.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure delete it.

    The temporary name (``.tmp-<pid>-<host>-<random>-<name>``) starts with a dot and keeps the suffix, so globs such
    as ``p_*.npz`` never see it and writers that infer the format from the suffix still work. A process killed
    while writing leaves its temporary file behind; :func:`remove_stale_temps` deletes such files.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{_HOST_TAG}-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a reused id counts as alive: its file is kept)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process / not a valid pid
        return False
    except OSError:  # e.g. EPERM: the process exists but belongs to someone else
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (or folders) that :func:`atomic_path` left in ``folder`` when a process was killed.

    Only temporaries made on this machine by a process that no longer runs are removed, so a concurrent writer is
    never disturbed. A missing folder is fine.

    Returns
    -------
    The paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TEMP_NAME.match(entry.name)
        if m is None or m["host"] != _HOST_TAG or _pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("%s: removed %d temporary file(s) left by an interrupted run", folder, len(removed))
    return removed


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, compress: bool = True,
             fsync: bool = False) -> None:
    """Write arrays to an ``.npz`` file atomically and byte-deterministically.

    Unlike ``np.savez_compressed`` the zip entries carry a fixed timestamp, so the same arrays always give the same
    bytes (re-runs can be compared file by file). The result loads with ``np.load(path, allow_pickle=False)``.
    """
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with atomic_path(path, fsync=fsync) as tmp, zipfile.ZipFile(tmp, "w", compression=method, compresslevel=1 if compress else None) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, table: pd.DataFrame, *, index: bool = False) -> None:
    """Write a DataFrame as CSV, atomically (compression inferred from the suffix, e.g. ``.csv.gz``)."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=index)


def write_tif(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a 2-D image as a zlib-compressed TIFF, atomically."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image, compression="zlib")


# ---------------------------------------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is a clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-create it") from None


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Load arrays from an ``.npz`` without pickle; a corrupt or truncated file raises :class:`DataError`.

    Parameters
    ----------
    path : path of the ``.npz`` file.
    keys : the arrays to load (all when None); a missing key raises :class:`DataError`.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = keys if keys is not None else tuple(npz.files)
            missing = [k for k in names if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)} (found: {', '.join(npz.files) or 'none'}); "
                                "re-create the file")
            return {k: npz[k] for k in names}
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated file ({type(err).__name__}: {err}); delete it and re-create it") from None


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an ``.npz``, read from the headers only (cheap: no data is inflated)."""
    path = Path(path)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(fh)
                out[name.removesuffix(".npy")] = (tuple(shape), np.dtype(dtype))
    except FileNotFoundError:
        raise InputNotFoundError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated file ({type(err).__name__}: {err}); delete it and re-create it") from None
    return out


# ---------------------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class Section:
    """A validated raw section in its raw pixel frame (x = column, y = row).

    Attributes
    ----------
    spots : DataFrame with ``gene`` (str), ``x``, ``y`` (float64): the spots inside the frame, in file order.
    cells : DataFrame with ``cell`` (int64 > 0), ``x``, ``y`` (float64), ``celltype`` (str), sorted by ``cell``.
    shape : (H, W) of the raw frame (the DAPI / label image).
    dapi : (H, W) ndarray or None.
    nuclei : (H, W) nucleus label image (ndarray or scipy CSR matrix, ids = ``cell``, 0 = background) or None.
    files : role -> path of every file read.
    spot_rows_in_file : (n_spots,) int64 row of each kept spot in the spots file.
    n_spots_outside : spots dropped because they fall outside the frame.
    um_per_px, origin_um : the platform's micron frame (None for the CA1 layout, which is in pixels).
    celltype_source : how the nuclei got their types (the table, a reference mapping or clustering).
    format : the folder layout it was read from.
    """

    spots: pd.DataFrame
    cells: pd.DataFrame
    shape: tuple[int, int]
    dapi: np.ndarray | None = None
    nuclei: NucleusLabels | None = None
    files: dict[str, str] = field(default_factory=dict)
    spot_rows_in_file: np.ndarray | None = None
    n_spots_outside: int = 0
    um_per_px: float | None = None  # platform folders: x_um = origin_um[0] + x_px * um_per_px (y alike)
    origin_um: tuple[float, float] = (0.0, 0.0)
    celltype_source: str = "cell-type table"
    format: str = "ca1"

    @property
    def genes(self) -> list[str]:
        """Gene names in channel order (sorted)."""
        return sorted(self.spots["gene"].unique())

    @property
    def celltypes(self) -> list[str]:
        """Cell-type names in id order 1..K (sorted); id 0 is background."""
        return sorted(self.cells["celltype"].unique())


def _find_one(raw_dir: Path, pattern: str, role: str, *, required: bool = True) -> Path | None:
    hits = sorted(p for p in raw_dir.glob(pattern) if p.is_file() and not p.name.startswith("."))
    if len(hits) > 1:
        raise DataError(f"{raw_dir}: several {role} files match '{pattern}' ({', '.join(p.name for p in hits)}); "
                        "keep exactly one")
    if not hits:
        if required:
            raise InputNotFoundError(f"{raw_dir}: no {role} file matching '{pattern}'; add one (see README, 'Input data')")
        return None
    return hits[0]


def _read_table(path: Path, columns: tuple[str, ...], role: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the {role} table is empty; it needs a header with {', '.join(columns)} and rows") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot parse the {role} CSV ({err}); check the file") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ColumnError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                          f"(found: {', '.join(map(str, table.columns))}); the {role} table needs {', '.join(columns)}")
    return table[list(columns)]


def _numeric(table: pd.DataFrame, columns: tuple[str, ...], path: Path) -> pd.DataFrame:
    out = table.copy()
    for col in columns:
        values = pd.to_numeric(out[col], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan)))
        if bad.size:
            raise DataError(f"{path}: column '{col}' has {bad.size} non-numeric, missing or infinite value(s) "
                            f"(first at data row {bad[0] + 1}: {table[col].iloc[bad[0]]!r}); fix or remove those rows")
        out[col] = values.astype(float)
    return out


def _cell_ids(values: pd.Series, path: Path) -> np.ndarray:
    ids = values.to_numpy(dtype=float)
    if np.any(ids != np.round(ids)) or np.any(ids <= BACKGROUND):
        bad = values[(ids != np.round(ids)) | (ids <= BACKGROUND)].iloc[0]
        raise DataError(f"{path}: cell ids must be positive integers (0 is background); found {bad!r}")
    return ids.astype(np.int64)


def _read_image(path: Path, role: str) -> np.ndarray | scipy.sparse.csr_matrix:
    try:
        if path.name.endswith(".npz"):
            image = scipy.sparse.load_npz(path).tocsr()
        else:
            import tifffile

            image = tifffile.imread(path)
    except Exception as err:  # any reader failure is a bad file for the user
        raise DataError(f"{path}: cannot read the {role} ({type(err).__name__}: {err}); check the file") from None
    if image.ndim == 3 and 1 in image.shape[:1]:
        image = image[0]
    if image.ndim != 2:
        raise DataError(f"{path}: the {role} has shape {tuple(image.shape)}; a 2-D (rows x cols) image is needed - "
                        "save a single plane / channel")
    if role == "nucleus label image" and not np.issubdtype(image.dtype, np.integer):
        raise DataError(f"{path}: the nucleus label image has dtype {image.dtype}; integer labels are needed "
                        "(e.g. uint32, 0 = background)")
    return image


def read_section(raw_dir: str | os.PathLike) -> Section:
    """Read and validate a raw section folder (SPEC §2.1).

    Spots outside the image frame are dropped and counted (logged). Everything else that is wrong raises a
    :class:`~segjointgene.errors.UserError` naming the file, the field and the fix: missing files or columns,
    non-numeric coordinates, duplicate cell ids, cell types of unknown cells, cells without a type, an empty spot
    table, an image that is not 2-D, cells outside the image, label ids absent from the cells table.

    With both a DAPI image and a nucleus label image, the label image defines the nuclei (it is a ready
    segmentation) and the DAPI is kept as an input channel.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise InputNotFoundError(f"raw section folder {raw_dir} does not exist; pass --raw_dir DIR or put the section "
                                 "under data/<datasets_name>_raw/<CA1_sub_path>/")
    files = _section_files(raw_dir)
    cells = _read_cells(files["cells"])
    cells["celltype"] = _read_celltypes(files["celltypes"], cells["cell"].to_numpy(), files["cells"])
    cells = cells.sort_values("cell", kind="stable").reset_index(drop=True)
    dapi = _read_image(files["dapi"], "DAPI image") if "dapi" in files else None
    nuclei = _read_image(files["nuclei"], "nucleus label image") if "nuclei" in files else None
    if dapi is not None and nuclei is not None:
        if tuple(dapi.shape) != tuple(nuclei.shape):
            raise DataError(f"{files['dapi'].name} has shape {tuple(dapi.shape)} but {files['nuclei'].name} has "
                            f"{tuple(nuclei.shape)}; the DAPI and the nucleus label image must share one pixel frame")
        log.info("both a DAPI image and a nucleus label image: nuclei come from %s; DAPI is kept as an input channel",
                 files["nuclei"].name)
    shape = tuple(int(v) for v in (nuclei if nuclei is not None else dapi).shape)
    frame_name = files.get("nuclei", files.get("dapi")).name
    _check_cells_in_frame(cells, shape, frame_name, files["cells"])
    if nuclei is not None:
        _check_label_ids(nuclei, cells, files["nuclei"], files["cells"])
    spots, rows, n_out = _read_spots(files["spots"], shape, frame_name)
    return Section(spots=spots, cells=cells, shape=shape, dapi=dapi, nuclei=nuclei,
                   files={role: str(path) for role, path in files.items()}, spot_rows_in_file=rows,
                   n_spots_outside=n_out)


def _section_files(raw_dir: Path) -> dict[str, Path]:
    """The files of a raw folder by role: cells, spots, celltypes, and dapi and/or nuclei (at least one)."""
    files = {"cells": _find_one(raw_dir, RawFiles.CELLS, "cells"), "spots": _find_one(raw_dir, RawFiles.SPOTS, "spots"),
             "celltypes": _find_one(raw_dir, RawFiles.CELLTYPES, "cell-type")}
    label_path = _find_one(raw_dir, RawFiles.LABEL_IMAGE_NPZ, "nucleus label image", required=False)
    tiffs = sorted(p for s in RawFiles.TIFF_SUFFIXES for p in raw_dir.glob(f"*{s}") if not p.name.startswith("."))
    label_tiffs = [p for p in tiffs if RawFiles.LABEL_TIFF_TOKEN in p.name.lower()]
    dapi_tiffs = [p for p in tiffs if p not in label_tiffs]
    if label_path is None and len(label_tiffs) == 1:
        label_path = label_tiffs[0]
    if len(label_tiffs) > 1 or (label_tiffs and label_path != label_tiffs[0]):
        raise DataError(f"{raw_dir}: several nucleus label images ({', '.join(p.name for p in [label_path, *label_tiffs] if p)}); keep one")
    if len(dapi_tiffs) > 1:
        raise DataError(f"{raw_dir}: several DAPI TIFFs ({', '.join(p.name for p in dapi_tiffs)}); keep one")
    if not dapi_tiffs and label_path is None:
        raise InputNotFoundError(f"{raw_dir}: neither a DAPI TIFF nor a nucleus label image (*.coo.npz or *label*.tif); "
                                 "add one so that nuclei can be found")
    if dapi_tiffs:
        files["dapi"] = dapi_tiffs[0]
    if label_path is not None:
        files["nuclei"] = label_path
    return files


def _read_cells(cells_path: Path) -> pd.DataFrame:
    """``cell, x, y`` of the cells table, ids unique positive integers."""
    cells = _read_table(cells_path, (RawFiles.CELL_ID, RawFiles.CELL_X, RawFiles.CELL_Y), "cells")
    if cells.empty:
        raise DataError(f"{cells_path}: the cells table has no rows; it needs one row per nucleus")
    cells = _numeric(cells, (RawFiles.CELL_ID, RawFiles.CELL_X, RawFiles.CELL_Y), cells_path)
    ids = _cell_ids(cells[RawFiles.CELL_ID], cells_path)
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise DataError(f"{cells_path}: duplicate cell id(s) {', '.join(map(str, dup.unique()[:5]))}; each nucleus needs a unique id")
    return pd.DataFrame({"cell": ids, "x": cells[RawFiles.CELL_X].to_numpy(), "y": cells[RawFiles.CELL_Y].to_numpy()})


def _read_celltypes(types_path: Path, ids: np.ndarray, cells_path: Path) -> list[str]:
    """The type name of every cell id (in the order of ``ids``): one per cell, none for unknown cells."""
    types = _read_table(types_path, (RawFiles.CELL_ID, RawFiles.CELLTYPE), "cell-type")
    types = _numeric(types, (RawFiles.CELL_ID,), types_path)
    type_ids = _cell_ids(types[RawFiles.CELL_ID], types_path)
    names = types[RawFiles.CELLTYPE]
    if names.isna().any() or (names.astype(str).str.strip() == "").any():
        row = int(np.flatnonzero(names.isna().to_numpy() | (names.astype(str).str.strip() == "").to_numpy())[0])
        raise DataError(f"{types_path}: empty '{RawFiles.CELLTYPE}' at data row {row + 1}; give every cell a type name")
    dup = pd.Series(type_ids)[pd.Series(type_ids).duplicated()]
    if len(dup):
        raise DataError(f"{types_path}: cell id(s) {', '.join(map(str, dup.unique()[:5]))} appear more than once; one type per cell")
    unknown = np.setdiff1d(type_ids, ids)
    if unknown.size:
        raise DataError(f"{types_path}: {unknown.size} cell id(s) not in {cells_path.name} "
                        f"(e.g. {', '.join(map(str, unknown[:5]))}); remove them or add those cells")
    type_of = dict(zip(type_ids.tolist(), names.astype(str).str.strip().tolist()))
    untyped = [c for c in ids.tolist() if c not in type_of]
    if untyped:
        raise DataError(f"{types_path}: {len(untyped)} cell(s) of {cells_path.name} have no type "
                        f"(e.g. {', '.join(map(str, untyped[:5]))}); add a row for each (a placeholder type such as "
                        "'Unknown' is fine)")
    return [type_of[c] for c in ids.tolist()]


def _check_cells_in_frame(cells: pd.DataFrame, shape: tuple[int, ...], frame_name: str, cells_path: Path) -> None:
    outside = (cells["x"] < 0) | (cells["y"] < 0) | (cells["x"] >= shape[1]) | (cells["y"] >= shape[0])
    if outside.any():
        row = cells[outside].iloc[0]
        raise DataError(f"{cells_path}: {int(outside.sum())} cell centroid(s) lie outside {frame_name} "
                        f"(shape {shape[0]} x {shape[1]}; e.g. cell {int(row.cell)} at x={row.x}, y={row.y}); "
                        "the image and the tables must share one pixel frame")


def _check_label_ids(nuclei: np.ndarray | scipy.sparse.csr_matrix, cells: pd.DataFrame, label_path: Path,
                     cells_path: Path) -> None:
    present = np.unique(nuclei.data if scipy.sparse.issparse(nuclei) else nuclei)
    present = present[present != BACKGROUND]
    stray = np.setdiff1d(present, cells["cell"].to_numpy())
    if stray.size:
        raise DataError(f"{label_path}: {stray.size} label id(s) have no row in {cells_path.name} "
                        f"(e.g. {', '.join(map(str, stray[:5]))}); label ids must equal the 'cell' ids")


def _read_spots(spots_path: Path, shape: tuple[int, ...], frame_name: str) -> tuple[pd.DataFrame, np.ndarray, int]:
    """``gene, x, y`` of the spots inside the frame, their rows in the file, and the number dropped outside it."""
    spots = _read_table(spots_path, (RawFiles.GENE, RawFiles.SPOT_X, RawFiles.SPOT_Y), "spots")
    if spots.empty:
        raise DataError(f"{spots_path}: the spot table has no rows; a section needs decoded spots")
    spots = _numeric(spots, (RawFiles.SPOT_X, RawFiles.SPOT_Y), spots_path)
    genes = spots[RawFiles.GENE]
    if genes.isna().any():
        row = int(np.flatnonzero(genes.isna().to_numpy())[0])
        raise DataError(f"{spots_path}: empty '{RawFiles.GENE}' at data row {row + 1}; every spot needs a gene name")
    x = spots[RawFiles.SPOT_X].to_numpy()
    y = spots[RawFiles.SPOT_Y].to_numpy()
    inside = (x >= 0) & (y >= 0) & (x < shape[1]) & (y < shape[0])
    n_out = int((~inside).sum())
    if n_out > _MAX_OUTSIDE_FRACTION * len(spots):
        raise DataError(f"{spots_path}: {n_out} of {len(spots)} spots lie outside {frame_name} (shape {shape[0]} x {shape[1]}, "
                        f"spots span x {x.min():g}..{x.max():g}, y {y.min():g}..{y.max():g}); the image does not contain the "
                        "spots - check that image and tables share one pixel frame")
    if n_out:
        log.warning("%s: dropped %d spot(s) outside the %d x %d frame", spots_path.name, n_out, *shape)
    rows = np.flatnonzero(inside)
    return pd.DataFrame({"gene": genes.astype(str).to_numpy()[rows], "x": x[rows], "y": y[rows]}), rows, n_out


def write_raw_section(raw_dir: str | os.PathLike, *, spots: pd.DataFrame, cells: pd.DataFrame,
                      dapi: np.ndarray | None = None, nuclei: np.ndarray | None = None, tag: str = "section") -> None:
    """Write a section in the raw CA1 layout (``simulate`` uses it).

    Parameters
    ----------
    spots : DataFrame with ``gene, x, y`` (plus optional extra columns, written as they are).
    cells : DataFrame with ``cell, x, y, celltype``.
    dapi : (H, W) uint16 DAPI image, written as ``<tag>_dapi.tif``.
    nuclei : (H, W) integer nucleus labels, written as ``label_image.coo.npz``.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    extra = [c for c in spots.columns if c not in ("gene", "x", "y")]
    write_csv(raw_dir / f"spots_{tag}.csv", pd.DataFrame({
        RawFiles.GENE: spots["gene"], RawFiles.SPOT_X: spots["x"], RawFiles.SPOT_Y: spots["y"], **{c: spots[c] for c in extra}}))
    write_csv(raw_dir / f"cells_{tag}.csv", pd.DataFrame({
        RawFiles.CELL_ID: cells["cell"], RawFiles.CELL_X: cells["x"], RawFiles.CELL_Y: cells["y"]}))
    write_csv(raw_dir / f"celltype_{tag}.csv", pd.DataFrame({
        RawFiles.CELL_ID: cells["cell"], RawFiles.CELLTYPE: cells["celltype"]}))
    if dapi is not None:
        write_tif(raw_dir / f"{tag}_dapi.tif", dapi)
    if nuclei is not None:
        buf = _io.BytesIO()
        scipy.sparse.save_npz(buf, scipy.sparse.coo_matrix(nuclei))
        with atomic_path(raw_dir / "label_image.coo.npz") as tmp:
            tmp.write_bytes(buf.getvalue())
