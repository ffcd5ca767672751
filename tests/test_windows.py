"""Frames read a window at a time: TIFF windows, polygon labels, band-wise reads; equal to the image read whole."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import scipy.sparse
import tifffile
from skimage.draw import polygon

from segjointgene.io.polygons import PolygonLabels
from segjointgene.io.windows import TiffWindows, frame_bands, frame_values_at


def _random_polygons(rng, shape, n):
    ys, xs, starts, painted = [], [], [0], np.zeros(shape, np.uint32)
    for i in range(n):  # some reach past the frame's edges, many overlap
        cy, cx, r = rng.uniform(-20, shape[0] + 20), rng.uniform(-20, shape[1] + 20), rng.uniform(2, 30)
        a = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 14)))
        py, px = cy + r * np.sin(a), cx + r * np.cos(a)
        ys += list(py)
        xs += list(px)
        starts.append(len(ys))
        rr, cc = polygon(py, px, shape)
        painted[rr, cc] = i + 1
    return np.array(ys), np.array(xs), np.array(starts), np.arange(1, n + 1), painted


def test_polygon_labels_equal_the_painted_image_in_every_window():
    shape = (300, 410)
    ys, xs, starts, ids, painted = _random_polygons(np.random.default_rng(0), shape, 150)
    labels = PolygonLabels(ys, xs, starts, ids, shape, bucket=32)
    np.testing.assert_array_equal(np.asarray(labels), painted)
    for r0, r1, c0, c1 in ((0, 64, 0, 64), (37, 101, 250, 410), (290, 300, 5, 6), (100, 100, 0, 10)):
        np.testing.assert_array_equal(labels[r0:r1, c0:c1], painted[r0:r1, c0:c1])
    for r0, band in frame_bands(labels, rows=70):  # bands, and a last one shorter
        np.testing.assert_array_equal(band, painted[r0:r0 + 70])


def test_values_at_pixels_agree_for_every_kind_of_frame():
    rng = np.random.default_rng(1)
    dense = (rng.random((130, 90)) < 0.1) * rng.integers(1, 50, (130, 90))
    rows, cols = rng.integers(0, 130, 500), rng.integers(0, 90, 500)
    want = dense[rows, cols]
    for frame in (dense, scipy.sparse.csr_matrix(dense)):
        np.testing.assert_array_equal(frame_values_at(frame, rows, cols, band_rows=16), want)
        np.testing.assert_array_equal(np.vstack([b for _, b in frame_bands(frame, rows=33)]), dense)


def _read_window(image: TiffWindows) -> np.ndarray:
    return image[10:20, 30:40]


@pytest.mark.parametrize("kw", [{}, {"tile": (32, 32), "compression": "zlib"}])
def test_tiff_windows_read_the_image_piecewise(tmp_path, kw):
    image = np.random.default_rng(2).integers(0, 4000, (150, 120)).astype(np.uint16)
    path = tmp_path / "dapi.ome.tif"
    tifffile.imwrite(path, image[None], ome=True, **kw)  # a leading singleton axis, as Xenium's files have
    frame = TiffWindows(path)
    assert frame.shape == (150, 120) and frame.dtype == np.uint16
    np.testing.assert_array_equal(frame[100:150, 7:90], image[100:150, 7:90])
    np.testing.assert_array_equal(np.asarray(frame), image)
    # forked workers reopen the file: their reads do not share one file offset
    with mp.get_context("fork").Pool(2) as pool:
        for got in pool.map(_read_window, [frame] * 4):
            np.testing.assert_array_equal(got, image[10:20, 30:40])


def test_tiff_windows_refuse_a_stack(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 20, 20), np.uint16), photometric="minisblack")
    with pytest.raises(ValueError, match="not a single 2-D plane"):
        TiffWindows(path)


def test_band_cache_serves_the_same_windows():
    from segjointgene.io.windows import BandCache

    shape = (200, 150)
    ys, xs, starts, ids, painted = _random_polygons(np.random.default_rng(3), shape, 60)
    cached = BandCache(PolygonLabels(ys, xs, starts, ids, shape), rows=64)
    for r0 in range(3, 200, 16):  # row-major patches, bands reused and refilled
        for c0 in range(0, 150, 16):
            np.testing.assert_array_equal(cached[r0:r0 + 16, c0:c0 + 16], painted[r0:r0 + 16, c0:c0 + 16])
    np.testing.assert_array_equal(cached[0:100, 0:150], painted[:100])  # taller than a band: read directly
