"""The patch frame: how patches tile the cropped, padded section and map back to the raw frame (layer 1).

Preprocessing crops the raw frame to the bounding box of the data and pads it at the bottom/right to whole patches;
patch ``p_<row>_<col>.npz`` covers padded-frame rows ``row*P:(row+1)*P`` and columns ``col*P:(col+1)*P``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..constants import SPLITS
from ..errors import DataError

if TYPE_CHECKING:  # the same layer: for annotations only
    from ..io.metadata import DatasetMetadata

__all__ = ["FrameGeometry", "iter_patch_grid", "parse_patch_name"]


def parse_patch_name(name: str) -> tuple[int, int]:
    """(row, col) of a patch file name ``p_<row>_<col>.npz``; anything else is a :class:`DataError`.

    >>> parse_patch_name("p_3_12.npz")
    (3, 12)
    """
    stem = Path(str(name)).name.removesuffix(".npz")
    parts = stem.split("_")
    if len(parts) != 3 or parts[0] != "p" or not (parts[1].isdigit() and parts[2].isdigit()):
        raise DataError(f"{name}: not a patch file name (expected p_<row>_<col>.npz)")
    return int(parts[1]), int(parts[2])


def iter_patch_grid(metadata: DatasetMetadata) -> Iterator[tuple[str, str, int, int]]:
    """(split, name, row, col) of every patch listed in the metadata's split."""
    for split in SPLITS:
        for name in metadata.split[split]:
            yield (split, name, *parse_patch_name(name))


@dataclass(frozen=True)
class FrameGeometry:
    """How the cropped, padded patch frame maps onto the raw frame.

    Raw pixel (y, x) is patch-frame pixel (y - y0, x - x0); the crop covers raw rows ``y0:y0+height`` and columns
    ``x0:x0+width``; the padded frame is ``padded`` = (rows * P, cols * P), the padding is background.
    """

    raw_shape: tuple[int, int]
    y0: int
    x0: int
    height: int
    width: int
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        p = self.patch_size
        return -(-self.height // p), -(-self.width // p)

    @property
    def padded(self) -> tuple[int, int]:
        r, c = self.grid
        return r * self.patch_size, c * self.patch_size

    @classmethod
    def from_metadata(cls, metadata: DatasetMetadata) -> FrameGeometry:
        """The geometry recorded in ``metadata.json``, validated once."""
        try:
            raw = metadata.raw_shape
            y0, x0 = metadata.crop_offset
            h, w = metadata.crop_shape
            p = metadata.patch_size
            grid = metadata.grid
        except (TypeError, ValueError) as err:
            raise DataError(f"metadata.json lacks a valid frame geometry ({type(err).__name__}: {err}); "
                            "re-run preprocessing") from None
        geo = cls(raw_shape=raw, y0=y0, x0=x0, height=h, width=w, patch_size=p) if len(raw) == 2 else None
        ok = (geo is not None and p > 0 and 0 <= y0 and 0 <= x0 and y0 + h <= raw[0] and x0 + w <= raw[1]
              and geo.grid == grid)
        if not ok:
            raise DataError(f"metadata.json: inconsistent geometry (raw {raw}, crop offset {(y0, x0)}, crop {(h, w)}, "
                            f"patch {p}, grid {grid}); re-run preprocessing")
        return geo

    def raw_window(self, row: int, col: int) -> tuple[slice, slice, slice, slice]:
        """Where patch (row, col) lands in the raw frame: ``raw[ys, xs] = patch[py, px]``.

        Returns (raw rows, raw cols, patch rows, patch cols) slices covering the part of the patch inside the crop
        (the padding is dropped); empty slices when the patch lies entirely in the padding.

        >>> geo = FrameGeometry(raw_shape=(100, 90), y0=10, x0=5, height=70, width=80, patch_size=64)
        >>> geo.raw_window(1, 1)
        (slice(74, 80, None), slice(69, 85, None), slice(0, 6, None), slice(0, 16, None))
        """
        p = self.patch_size
        r0, c0 = row * p, col * p
        nr, nc = max(0, min(p, self.height - r0)), max(0, min(p, self.width - c0))
        return (slice(self.y0 + r0, self.y0 + r0 + nr), slice(self.x0 + c0, self.x0 + c0 + nc), slice(0, nr), slice(0, nc))
