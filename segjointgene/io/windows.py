"""Section-sized images read a window at a time (layer 1.1: numpy, scipy, tifffile, zarr).

A Xenium or MERSCOPE frame is billions of pixels; preprocessing only ever needs one patch window of the DAPI and of
the nucleus labels at a time. Both are therefore passed around as "frames": any object with ``shape``, ``dtype`` and
2-D slicing ``frame[r0:r1, c0:c1]`` - a numpy array, a scipy CSR matrix (slices are sparse), :class:`TiffWindows`
(a TIFF read tile by tile) or :class:`segjointgene.io.polygons.PolygonLabels` (nuclei drawn from their outlines on
demand). :func:`frame_bands` and :func:`frame_values_at` read any of them in row bands of bounded size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from ..errors import DataError

__all__ = ["BandCache", "Frame", "TiffWindows", "WindowReader", "frame_bands", "frame_block", "frame_values_at"]

#: An image of a section's frame: an ndarray, a CSR matrix or a window reader (see the module docstring).
Frame = Any

#: Rows of one band of :func:`frame_bands` (a band of a 50 000-px-wide frame of uint32 is 200 MB at 1024 rows).
BAND_ROWS = 1024


def frame_block(frame, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> np.ndarray:
    """The dense ``frame[r0:r1, c0:c1]`` of any frame."""
    block = frame[r0:r1, c0:frame.shape[1] if c1 is None else c1]
    return block.toarray() if scipy.sparse.issparse(block) else np.asarray(block)


def frame_bands(frame, rows: int = BAND_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, dense band)`` of the frame, ``rows`` rows at a time."""
    for r0 in range(0, frame.shape[0], rows):
        yield r0, frame_block(frame, r0, min(r0 + rows, frame.shape[0]))


def frame_values_at(frame, rows: np.ndarray, cols: np.ndarray, band_rows: int = BAND_ROWS) -> np.ndarray:
    """``frame[rows, cols]`` (integer pixels inside the frame), read band by band for frames other than arrays."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    if isinstance(frame, np.ndarray):
        return frame[rows, cols]
    out = np.zeros(rows.shape, frame.dtype)
    order = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[order], np.arange(0, frame.shape[0] + band_rows, band_rows))
    for i, r0 in enumerate(range(0, frame.shape[0], band_rows)):
        sel = order[bounds[i]:bounds[i + 1]]
        if sel.size:
            out[sel] = frame_block(frame, r0, min(r0 + band_rows, frame.shape[0]))[rows[sel] - r0, cols[sel]]
    return out


class WindowReader:
    """Base of the frames that compute a window when it is read: 2-D slicing via :meth:`window`, ``np.asarray``
    reads the whole frame."""

    shape: tuple[int, int]

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key, slice(None))
        (r0, r1, _), (c0, c1, _) = (k.indices(n) for k, n in zip(key, self.shape))
        return self.window(r0, max(r0, r1), c0, max(c0, c1))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:, :]
        return whole if dtype is None else whole.astype(dtype)


class TiffWindows(WindowReader):
    """A 2-D image in a TIFF (plain, tiled or an OME pyramid's full resolution) read window by window through
    tifffile's zarr store; ``np.asarray`` reads it whole.

    Each process opens the file itself (forked preprocessing workers must not share one file offset).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._pid: int | None = None
        self._array = None
        array = self._open()
        shape = tuple(int(v) for v in array.shape)
        if len(shape) < 2 or any(v != 1 for v in shape[:-2]):
            raise ValueError(f"{self.path}: not a single 2-D plane (shape {shape})")
        self.shape: tuple[int, int] = shape[-2:]
        self.dtype = np.dtype(array.dtype)
        self.ndim = 2
        self._lead = (0,) * (len(shape) - 2)
        try:
            self[:1, :1]
        except Exception as err:  # a codec tifffile cannot decode without imagecodecs (Xenium's JPEG 2000 tiles)
            raise DataError(f"{self.path}: cannot decode the image ({type(err).__name__}: {err}); compressed "
                            "images need `pip install imagecodecs`") from None

    def _open(self):
        if self._pid != os.getpid():
            import tifffile
            import zarr

            series = tifffile.TiffFile(self.path).series[0]
            self._array = zarr.open(series.aszarr(level=0), mode="r")
            self._pid = os.getpid()
        return self._array

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        return np.asarray(self._open()[(*self._lead, slice(r0, r1), slice(c0, c1))])

    def __getstate__(self) -> dict:  # pickled to spawned workers: they reopen the file
        return {**self.__dict__, "_pid": None, "_array": None}


class BandCache(WindowReader):
    """A frame whose windows are served from one cached band of ``rows`` full-width rows: patches read in row-major
    order then decode each TIFF tile and draw each polygon about once instead of once per patch that touches it.
    Memory: one band (``rows`` x width pixels). Per process (a forked worker fills its own)."""

    def __init__(self, frame: Frame, rows: int = 512):
        self.frame, self.rows = frame, rows
        self.shape, self.dtype, self.ndim = frame.shape, frame.dtype, 2
        self._r0, self._band = 0, None

    def window(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        if r1 - r0 > self.rows:
            return frame_block(self.frame, r0, r1, c0, c1)
        if self._band is None or r0 < self._r0 or r1 > self._r0 + self._band.shape[0]:
            self._r0 = r0
            self._band = frame_block(self.frame, r0, min(r0 + self.rows, self.shape[0]))
        return self._band[r0 - self._r0:r1 - self._r0, c0:c1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_band": None}
