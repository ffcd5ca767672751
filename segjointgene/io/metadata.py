"""``metadata.json`` of a preprocessed dataset, read once into a typed record (layer 1).

Preprocessing writes the file (:meth:`DatasetMetadata.to_dict`); every other step reads it through
:func:`load_metadata` (or :func:`read_metadata` for a dataset still being written) and uses the attributes. Each key
has one default, here, for files written by older versions that lack it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import METADATA_FILE, SPLITS
from ..errors import DataError, InputNotFoundError
from .files import read_json

__all__ = ["DatasetMetadata", "load_metadata", "read_metadata"]

#: The frame geometry: all that stitching needs.
_GEOMETRY = ("raw_shape", "crop_offset", "crop_shape", "patch_size", "grid")
#: Keys every metadata file must have (a file without one is not a dataset of this package).
_REQUIRED = ("genes", "celltypes", *_GEOMETRY, "split")


@dataclass(frozen=True)
class DatasetMetadata:
    """What preprocessing recorded about a dataset (SPEC §2.2).

    Attributes
    ----------
    genes : gene names in channel order.
    celltypes : class names in id order; index 0 is the background.
    raw_shape : (H, W) of the raw pixel frame (the DAPI / nucleus image, or the spot extent).
    crop_offset, crop_shape : (y0, x0) and (height, width) of the crop in the raw frame.
    padded_shape : (rows * P, cols * P) of the padded patch frame.
    patch_size : P.
    grid : (rows, cols) of the patch grid.
    split : ``train`` / ``test`` -> patch file names; ``split_seed``, ``test_fraction``: how it was drawn.
    density_sigma, density_halo, density_truncate : the Gaussian of the density images (px, px, sigmas).
    density_stored : whether the patch files hold the density images (else they are rebuilt from ``spots.npz``).
    has_dapi : whether the ``dapi`` channel holds a DAPI image (else the binary nucleus mask).
    nucleus_source : ``label_image`` or ``dapi_watershed``.
    nuclear_density_median : median total density at nucleus pixels (spots / px).
    complete : preprocessing finished.
    extra : every other key of the file, unchanged (e.g. ``fingerprint``, counts, versions).
    """

    raw_shape: tuple[int, int]
    crop_offset: tuple[int, int]
    crop_shape: tuple[int, int]
    patch_size: int
    grid: tuple[int, int]
    genes: tuple[str, ...] = ()
    celltypes: tuple[str, ...] = ()
    split: dict[str, tuple[str, ...]] = field(default_factory=lambda: {s: () for s in SPLITS})
    padded_shape: tuple[int, int] = (0, 0)
    split_seed: int | None = None
    test_fraction: float | None = None
    density_sigma: float = 5.0
    density_halo: int = 15
    density_truncate: float = 3.0
    density_stored: bool = True
    has_dapi: bool = False
    nucleus_source: str = ""
    nuclear_density_median: float = 0.0
    n_spots_outside: int = 0
    datasets_name: str = ""
    raw_dir: str = ""
    complete: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_classes(self) -> int:
        """Cell types plus the background class."""
        return len(self.celltypes)

    @property
    def n_patches(self) -> int:
        return sum(len(self.split[s]) for s in SPLITS)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.extra.get("fingerprint", {})

    def source_file(self, role: str) -> str | None:
        """Name of the raw file preprocessing read for ``role`` (``spots``, ``cells``, ...), when recorded."""
        return self.fingerprint.get("sources", {}).get(role, {}).get("file")

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = METADATA_FILE, geometry_only: bool = False) -> DatasetMetadata:
        """Read a metadata dict; a missing required key or a wrong type is a :class:`DataError` naming ``source``.

        ``geometry_only`` requires only the frame geometry (what stitching needs; for tests and examples).

        >>> DatasetMetadata.from_dict({"raw_shape": [6, 6], "crop_offset": [1, 1], "crop_shape": [3, 4],
        ...                            "patch_size": 2, "grid": [2, 2]}, geometry_only=True).padded_shape
        (0, 0)
        """
        missing = [k for k in (_GEOMETRY if geometry_only else _REQUIRED) if k not in d]
        if missing:
            raise DataError(f"{source}: missing key(s) {', '.join(missing)}; not a segjointgene dataset or an "
                            "unfinished one - re-run preprocessing")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "split", "split_seed", "test_fraction"}
        split = d.get("split", {})
        try:
            values = {k: _typed(k, d[k]) for k in known if k in d}
            return cls(**values, split={s: tuple(str(n) for n in split.get(s, ())) for s in SPLITS},
                       split_seed=split.get("seed"), test_fraction=split.get("test_fraction"),
                       extra={k: v for k, v in d.items() if k not in known and k != "split"})
        except (TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{source}: malformed metadata ({type(err).__name__}: {err}); re-run preprocessing") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON content: every attribute (tuples as lists) plus ``extra``."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
               if k not in ("extra", "split", "split_seed", "test_fraction")}
        split: dict[str, Any] = {s: list(self.split[s]) for s in SPLITS}
        if self.split_seed is not None:
            split["seed"] = self.split_seed
        if self.test_fraction is not None:
            split["test_fraction"] = self.test_fraction
        return {**self.extra, **out, "split": split}


_TUPLE_STR = {"genes", "celltypes"}
_TUPLE_INT = {"raw_shape", "crop_offset", "crop_shape", "grid", "padded_shape"}
_CASTS = {"patch_size": int, "density_sigma": float, "density_halo": int, "density_truncate": float,
          "density_stored": bool,
          "has_dapi": bool, "nucleus_source": str, "nuclear_density_median": float, "n_spots_outside": int,
          "datasets_name": str, "raw_dir": str, "complete": bool}


def _typed(key: str, value: Any) -> Any:
    if key in _TUPLE_STR:
        return tuple(str(v) for v in value)
    if key in _TUPLE_INT:
        return tuple(int(v) for v in value)
    return _CASTS[key](value)


def read_metadata(data_dir: str | os.PathLike) -> DatasetMetadata | None:
    """The dataset's metadata whether finished or not; None when there is no ``metadata.json``."""
    path = Path(data_dir) / METADATA_FILE
    if not path.is_file():
        return None
    return DatasetMetadata.from_dict(read_json(path), source=str(path))


def load_metadata(data_dir: str | os.PathLike) -> DatasetMetadata:
    """The metadata of a finished dataset; a missing or unfinished one is an error that says to preprocess."""
    path = Path(data_dir) / METADATA_FILE
    meta = read_metadata(data_dir)
    if meta is None:
        raise InputNotFoundError(f"{path} not found: preprocess the section first (--step_name=preprocess_CA1)")
    if not meta.complete:
        raise DataError(f"{path}: preprocessing did not finish; run --step_name=preprocess_CA1 again (it resumes)")
    return meta
