"""Patches -> whole-section maps in the raw coordinate frame, spot assignment and the cell table (layer 1.5: numpy,
scipy, scikit-image; no torch).

Geometry (written by preprocessing in ``metadata.json``): the raw frame has shape ``raw_shape`` = (H, W); the patch
frame is the crop ``crop_offset`` = (y0, x0), ``crop_shape`` = (h, w) of it, padded at the bottom and right with
background to ``padded_shape`` = (rows * P, cols * P). Patch ``p_<row>_<col>.npz`` covers patch-frame rows
``row*P:(row+1)*P`` and columns ``col*P:(col+1)*P``, so raw pixel (y, x) is patch-frame pixel (y - y0, x - x0).

Stitching rule: the patch grid is a partition of the padded frame, so patches never overlap and no blending or
conflict resolution is needed: every pixel comes from exactly one patch file. A patch name that appears twice (in two
splits) is a damaged input and raises :class:`~segjointgene.errors.DataError`. Grid cells without a patch file
(empty patches skipped by preprocessing) are background (0). Pixels of the raw frame outside the crop, and the
padding, are background.

Instance ids are section-global, so the stitched instance map *is* the whole-section segmentation, with no
re-labelling.

Memory: the streaming readers (:func:`stitch_label_cache` on a file, :func:`stitch_patch_channel`) hold the
section-size output plus one patch; they never build an (N, P, P) stack or a padded copy.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..constants import BACKGROUND, BACKGROUND_NAME, SPLITS
from ..errors import DataError
from ..io.files import load_npz
from ..io.metadata import DatasetMetadata
from ..preprocess.geometry import FrameGeometry, iter_patch_grid, parse_patch_name

log = logging.getLogger(__name__)

__all__ = [
    "SpotAssignment",
    "assign_spots",
    "cell_table",
    "celltype_table",
    "class_map",
    "extend_lut",
    "patch_from_raw",
    "raw_window",
    "stitch_label_cache",
    "stitch_patch_channel",
    "stitch_patches",
    "to_raw_frame",
]

#: Rows of a label image processed at once where a full-size temporary (e.g. int64 indices) would be too large.
_ROW_CHUNK = 512


# ------------------------------------------------------------------------------------------------ geometry
def raw_window(metadata: DatasetMetadata, row: int, col: int) -> tuple[slice, slice, slice, slice]:
    """Where patch (row, col) lands in the raw frame (see :meth:`FrameGeometry.raw_window`)."""
    return FrameGeometry.from_metadata(metadata).raw_window(row, col)


def _check_patch(name: str, arr: np.ndarray, f: FrameGeometry, source: str) -> tuple[int, int]:
    row, col = parse_patch_name(name)
    if not (0 <= row < f.grid[0] and 0 <= col < f.grid[1]):
        raise DataError(f"{source}: patch {name} lies outside the {f.grid[0]} x {f.grid[1]} patch grid of "
                        "metadata.json; it belongs to another preprocessing of the section")
    if arr.shape != (f.patch_size, f.patch_size):
        raise DataError(f"{source}: patch {name} has shape {arr.shape}, expected ({f.patch_size}, {f.patch_size})")
    return row, col


def _paste(out: np.ndarray, patch: np.ndarray, f: FrameGeometry, row: int, col: int) -> None:
    ys, xs, py, px = f.raw_window(row, col)
    out[ys, xs] = patch[py, px]


def _new_raw(f: FrameGeometry, dtype: np.dtype | type, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return np.zeros(f.raw_shape, dtype)
    if out.shape != f.raw_shape:
        raise ValueError(f"out has shape {out.shape}, expected the raw frame {f.raw_shape}")
    return out


# ------------------------------------------------------------------------------------------------ stitching
def patch_from_raw(image: np.ndarray, metadata: DatasetMetadata, name: str) -> np.ndarray:
    """Cut the (P, P) window of patch ``name`` out of a raw-frame image (the inverse of stitching).

    Parameters
    ----------
    image : (H, W) ndarray in the raw frame (``raw_shape``).
    metadata : the dataset's ``metadata.json``.
    name : patch file name ``p_<row>_<col>.npz``.

    Returns
    -------
    (P, P) ndarray of ``image``'s dtype; the padding (beyond the crop) is 0.

    Examples
    --------
    >>> meta = DatasetMetadata.from_dict({"raw_shape": [6, 6], "crop_offset": [1, 1], "crop_shape": [3, 4],
    ...                                   "patch_size": 2, "grid": [2, 2]}, geometry_only=True)
    >>> patch_from_raw(np.arange(36).reshape(6, 6), meta, "p_1_1.npz")
    array([[21, 22],
           [ 0,  0]])
    """
    f = FrameGeometry.from_metadata(metadata)
    if image.shape != f.raw_shape:
        raise ValueError(f"image has shape {image.shape}, expected the raw frame {f.raw_shape}")
    row, col = parse_patch_name(name)
    ys, xs, py, px = f.raw_window(row, col)
    out = np.zeros((f.patch_size, f.patch_size), image.dtype)
    out[py, px] = image[ys, xs]
    return out


def stitch_patches(patches: Mapping[str, np.ndarray], metadata: DatasetMetadata, *,
                   dtype: np.dtype | type | None = None) -> np.ndarray:
    """Paste per-patch maps into the padded patch frame.

    Parameters
    ----------
    patches : patch file name (``p_<row>_<col>.npz``) -> (P, P) array.
    metadata : the dataset's ``metadata.json`` (``patch_size``, ``grid``, ...).
    dtype : output dtype (default: that of the first patch, float32 when there is none).

    Returns
    -------
    (rows * P, cols * P) ndarray: the padded frame; grid cells without a patch are background (0).

    Raises
    ------
    DataError : a name that is not a patch name, outside the grid, or a patch of the wrong shape.

    Examples
    --------
    >>> meta = DatasetMetadata.from_dict({"raw_shape": [6, 6], "crop_offset": [1, 1], "crop_shape": [3, 4],
    ...                                   "patch_size": 2, "grid": [2, 2]}, geometry_only=True)
    >>> stitch_patches({"p_0_1.npz": np.full((2, 2), 7)}, meta)
    array([[0, 0, 7, 7],
           [0, 0, 7, 7],
           [0, 0, 0, 0],
           [0, 0, 0, 0]])
    """
    f = FrameGeometry.from_metadata(metadata)
    if dtype is None:
        dtype = next(iter(patches.values())).dtype if patches else np.float32
    out = np.zeros(f.padded, dtype)
    p = f.patch_size
    for name, patch in patches.items():
        row, col = _check_patch(name, np.asarray(patch), f, "patches")
        out[row * p:(row + 1) * p, col * p:(col + 1) * p] = patch
    return out


def to_raw_frame(padded: np.ndarray, metadata: DatasetMetadata) -> np.ndarray:
    """Map a padded patch-frame array back to the raw frame: undo the padding and the crop.

    Parameters
    ----------
    padded : (rows * P, cols * P) ndarray, e.g. from :func:`stitch_patches`.
    metadata : the dataset's ``metadata.json``.

    Returns
    -------
    (H, W) ndarray of the same dtype, ``raw_shape`` of the metadata: pixel (y, x) is raw pixel (y, x); pixels
    outside the crop are background (0).

    Examples
    --------
    >>> meta = DatasetMetadata.from_dict({"raw_shape": [6, 6], "crop_offset": [1, 1], "crop_shape": [3, 4],
    ...                                   "patch_size": 2, "grid": [2, 2]}, geometry_only=True)
    >>> to_raw_frame(np.arange(1, 17).reshape(4, 4), meta)[:5]
    array([[ 0,  0,  0,  0,  0,  0],
           [ 0,  1,  2,  3,  4,  0],
           [ 0,  5,  6,  7,  8,  0],
           [ 0,  9, 10, 11, 12,  0],
           [ 0,  0,  0,  0,  0,  0]])
    """
    f = FrameGeometry.from_metadata(metadata)
    if padded.shape != f.padded:
        raise ValueError(f"padded has shape {padded.shape}, expected the padded frame {f.padded}")
    out = np.zeros(f.raw_shape, padded.dtype)
    out[f.y0:f.y0 + f.height, f.x0:f.x0 + f.width] = padded[:f.height, :f.width]
    return out


def _iter_npy_rows(path: Path, key: str) -> Iterator[np.ndarray]:
    """Yield the sub-arrays ``arr[i]`` of one array of an ``.npz``, decompressing one at a time."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            major, _ = np.lib.format.read_magic(fh)
            reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(fh)
            if fortran or dtype.hasobject or len(shape) < 1:
                raise DataError(f"{path}: array '{key}' is not a C-ordered numeric stack; re-create the file")
            sub = tuple(shape[1:])
            nbytes = int(np.prod(sub, dtype=np.int64)) * dtype.itemsize
            for _ in range(shape[0]):
                buf = fh.read(nbytes)
                if len(buf) != nbytes:
                    raise DataError(f"{path}: array '{key}' is truncated; delete the file and re-create it")
                yield np.frombuffer(buf, dtype).reshape(sub)
    except KeyError:
        raise DataError(f"{path}: missing array '{key}'; the label cache is damaged") from None
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise DataError(f"{path}: corrupt or truncated file ({type(err).__name__}: {err}); "
                        "delete it and re-create it") from None


def _cache_splits(cache: Mapping[str, Mapping[str, np.ndarray]] | str | os.PathLike,
                  key: str) -> Iterator[tuple[str, list[str], Iterable[np.ndarray]]]:
    """(split, patch names, iterable of (P, P) arrays) of a label cache given as a mapping or an ``.npz`` path."""
    if isinstance(cache, Mapping):
        for split, state in cache.items():
            if "names" not in state or key not in state:
                raise DataError(f"label cache: split '{split}' lacks 'names' or '{key}'")
            yield split, [str(n) for n in state["names"]], state[key]
        return
    path = Path(cache)
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            splits = sorted({f.partition(".")[0] for f in files}, key=lambda s: (s not in SPLITS, s))
            names = {s: [str(n) for n in npz[f"{s}.names"]] for s in splits if f"{s}.names" in npz.files}
    except FileNotFoundError:
        raise DataError(f"{path}: label cache not found") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as err:
        raise DataError(f"{path}: corrupt label cache ({type(err).__name__}: {err}); delete it") from None
    for split in splits:
        if split not in names or f"{split}.{key}" not in files:
            raise DataError(f"{path}: split '{split}' lacks 'names' or '{key}'; the label cache is damaged")
        yield split, names[split], _iter_npy_rows(path, f"{split}.{key}")


def stitch_label_cache(cache: Mapping[str, Mapping[str, np.ndarray]] | str | os.PathLike,
                       metadata: DatasetMetadata, key: str = "instances", *, dtype: np.dtype | type | None = None,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Stitch the labels of a label cache (every split in it) into the raw frame.

    Parameters
    ----------
    cache : a label cache ``.npz`` path (keys ``<split>.names|instances|classes``, read one patch at a time) or the
        mapping split -> {``names``: (N,) str, ``instances`` / ``classes``: (N, P, P) int} of
        :func:`segjointgene.preprocess.dataset.load_label_cache`.
    metadata : the dataset's ``metadata.json``.
    key : ``"instances"`` (cell ids) or ``"classes"`` (cell-type ids).
    dtype : output dtype (default int32). Labels must be >= 0; ``np.uint32`` is the dtype of the exported masks.
    out : (H, W) raw-frame array to paste into (patches absent from the cache keep its values), else zeros.

    Returns
    -------
    (H, W) ndarray in the raw frame; pixels not covered by a cached patch are background (or ``out``'s values).

    Raises
    ------
    DataError : damaged cache, a name outside the grid, a patch listed twice, negative labels.
    """
    f = FrameGeometry.from_metadata(metadata)
    out = _new_raw(f, dtype or np.int32, out)
    seen: dict[str, str] = {}
    for split, names, arrays in _cache_splits(cache, key):
        n_done = 0
        for name, arr in zip(names, arrays):
            if name in seen:
                raise DataError(f"label cache: patch {name} appears in splits '{seen[name]}' and '{split}'; "
                                "patches never overlap, so the cache is damaged")
            seen[name] = split
            row, col = _check_patch(name, arr, f, f"label cache split '{split}'")
            if arr.size and arr.min() < BACKGROUND:
                raise DataError(f"label cache split '{split}': patch {name} holds negative labels; labels are "
                                "0 (background) or positive ids")
            _paste(out, arr, f, row, col)
            n_done += 1
        if n_done != len(names):
            raise DataError(f"label cache split '{split}': {len(names)} names but {n_done} label arrays")
    return out


def stitch_patch_channel(data_dir: str | os.PathLike, metadata: DatasetMetadata, key: str, *,
                         names: Iterable[str] | None = None, dtype: np.dtype | type | None = None,
                         out: np.ndarray | None = None) -> np.ndarray:
    """Stitch one (P, P) channel of the patch files (e.g. ``instance``, the nuclei, or ``dapi``) into the raw frame.

    Streams over the patch files: one patch is in memory at a time.

    Parameters
    ----------
    data_dir : the preprocessed dataset folder (``data/<datasets_name>``).
    metadata : its ``metadata.json``.
    key : a (P, P) array of the patch files: ``instance``, ``label``, ``spots`` or ``dapi``.
    names : only these patch names (default: every patch of the metadata).
    dtype : output dtype (default: the channel's own, from the first patch; float32 when there is none).
    out : (H, W) raw-frame array to paste into, else zeros.

    Returns
    -------
    (H, W) ndarray in the raw frame (``raw_shape``); pixels outside the crop or in skipped patches are 0.
    """
    f = FrameGeometry.from_metadata(metadata)
    wanted = set(names) if names is not None else None
    for split, name, row, col in iter_patch_grid(metadata):
        if wanted is not None and name not in wanted:
            continue
        path = Path(data_dir) / split / name
        arr = load_npz(path, (key,))[key]
        if out is None:
            out = _new_raw(f, dtype or arr.dtype, None)
        _check_patch(name, arr, f, str(path))
        _paste(out, arr, f, row, col)
    return _new_raw(f, dtype or np.float32, out)


# ------------------------------------------------------------------------------------------------ spots and cells
class SpotAssignment(NamedTuple):
    """Result of :func:`assign_spots`.

    Attributes
    ----------
    values : (n,) int64, the mask value at each spot's pixel; 0 for spots outside the frame.
    inside : (n,) bool, whether the spot's pixel lies inside the mask's frame.
    """

    values: np.ndarray
    inside: np.ndarray


def assign_spots(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> SpotAssignment:
    """The mask value at each spot's pixel (floor(y), floor(x)).

    Parameters
    ----------
    mask : (H, W) integer ndarray (instance or cell-type ids, 0 = background).
    x, y : (n,) float arrays, spot coordinates in the mask's frame (x = column); pixel (r, c) covers
        ``r <= y < r + 1`` and ``c <= x < c + 1``.

    Returns
    -------
    SpotAssignment: values (n,) int64 (0 outside the frame) and inside (n,) bool. Spots outside the frame (or with
    non-finite coordinates) are kept and flagged, never dropped.

    Examples
    --------
    >>> m = np.array([[0, 5], [7, 7]])
    >>> assign_spots(m, np.array([1.9, 0.2, 2.0, -0.1]), np.array([0.5, 1.0, 0.0, 1.0]))
    SpotAssignment(values=array([5, 7, 0, 0]), inside=array([ True,  True, False, False]))
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D arrays of one length, got shapes {x.shape} and {y.shape}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0) & (x < w) & (y < h)
    values = np.zeros(x.shape, np.int64)
    values[inside] = mask[np.floor(y[inside]).astype(np.int64), np.floor(x[inside]).astype(np.int64)]
    return SpotAssignment(values=values, inside=inside)


def cell_table(instance: np.ndarray, class_lut: np.ndarray, celltypes: list[str], spot_cell: np.ndarray) -> pd.DataFrame:
    """Per-cell table of an instance mask: type, centroid, area and number of assigned spots.

    Parameters
    ----------
    instance : (H, W) integer ndarray, cell ids (0 = background), raw frame.
    class_lut : (M,) int array, cell id -> cell-type id (0 = background); every id of ``instance`` must be < M.
    celltypes : cell-type names in id order (index 0 = background).
    spot_cell : (n,) int array, the cell of each spot (0 = unassigned), e.g. :func:`assign_spots` values.

    Returns
    -------
    DataFrame with columns ``cell`` (int64), ``celltype`` (name), ``x``, ``y`` (float64 centroid in raw pixel
    coordinates, x = column; the centre of pixel (r, c) is (c + 0.5, r + 0.5), the convention of the spot
    coordinates), ``area_px`` (int64), ``n_spots`` (int64), one row per cell present in the mask, sorted by ``cell``.
    """
    from skimage.measure import regionprops_table

    if instance.ndim != 2:
        raise ValueError(f"instance must be 2-D, got shape {instance.shape}")
    lut = np.asarray(class_lut)
    props = regionprops_table(instance, properties=("label", "area", "centroid"))
    cells = np.asarray(props["label"], np.int64)
    if cells.size and cells.max() >= lut.size:
        raise DataError(f"instance ids up to {cells.max()} but the cells table knows ids < {lut.size}; the labels "
                        "belong to another preprocessing of the section")
    spot_cell = np.asarray(spot_cell, np.int64)
    counts = np.bincount(spot_cell[spot_cell > 0], minlength=int(cells.max(initial=0)) + 1)
    names = np.asarray(celltypes, dtype=object)
    return pd.DataFrame({
        "cell": cells,
        "celltype": names[lut[cells]] if cells.size else np.zeros(0, object),
        "x": np.asarray(props["centroid-1"], np.float64) + 0.5,
        "y": np.asarray(props["centroid-0"], np.float64) + 0.5,
        "area_px": np.asarray(props["area"]).astype(np.int64),
        "n_spots": counts[cells].astype(np.int64),
    })


def extend_lut(lut: np.ndarray, ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """A cell id -> class id lookup with more cells (e.g. those found without a nucleus), grown as needed.

    Examples
    --------
    >>> extend_lut(np.array([0, 2, 1]), np.array([5]), np.array([1])).tolist()
    [0, 2, 1, 0, 0, 1]
    """
    ids = np.asarray(ids, np.int64)
    if ids.size == 0:
        return lut
    out = np.zeros(max(int(ids.max()) + 1, lut.size), lut.dtype)
    out[:lut.size] = lut
    out[ids] = classes
    return out


def class_map(instance: np.ndarray, class_lut: np.ndarray, dtype: np.dtype | type = np.uint16) -> np.ndarray:
    """Cell-type map of an instance map, ``class_lut[instance]``, computed in row blocks (no full int64 temporary).

    Parameters
    ----------
    instance : (H, W) integer ndarray.
    class_lut : (M,) int array, cell id -> type id; every id of ``instance`` must be < M.
    dtype : output dtype.

    Returns
    -------
    (H, W) ndarray of ``dtype``.
    """
    lut = np.asarray(class_lut).astype(dtype)
    out = np.empty(instance.shape, dtype)
    for r in range(0, instance.shape[0], _ROW_CHUNK):
        block = instance[r:r + _ROW_CHUNK]
        if block.size and block.max() >= lut.size:
            raise DataError(f"instance ids up to {block.max()} but the cells table knows ids < {lut.size}; the labels "
                            "belong to another preprocessing of the section")
        out[r:r + _ROW_CHUNK] = lut[block]
    return out


def celltype_table(celltypes: list[str]) -> pd.DataFrame:
    """``id,name`` table of the cell types (id 0 = background)."""
    if not celltypes or celltypes[0] != BACKGROUND_NAME:
        raise DataError(f"cell-type names must start with '{BACKGROUND_NAME}' (id 0), got {list(celltypes)[:3]}; "
                        "re-run preprocessing")
    return pd.DataFrame({"id": np.arange(len(celltypes), dtype=np.int64), "name": list(celltypes)})
