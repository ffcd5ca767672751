"""Cell outlines: pixel-edge polygons whose area matches the cell's, and a GeoJSON QuPath / napari can read."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from segjointgene.io.polygons import cell_polygons, write_geojson


def _area(ring):
    xy = np.asarray(ring)
    return 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))


def test_square_outline_by_hand():
    mask = np.zeros((6, 7), np.uint32)
    mask[1:4, 2:5] = 5  # 3 x 3 pixels: x in [2, 5), y in [1, 4)
    ring = cell_polygons(mask)[5]
    xy = np.asarray(ring)
    assert ring[0] == ring[-1]
    assert xy[:, 0].min() == 2.0 and xy[:, 0].max() == 5.0 and xy[:, 1].min() == 1.0 and xy[:, 1].max() == 4.0
    assert _area(ring) == 8.5  # the contour at level 0.5 cuts each corner by 1/8 px^2


def test_disc_area_and_geojson(tmp_path):
    yy, xx = np.mgrid[0:60, 0:60]
    mask = np.zeros((60, 60), np.uint32)
    mask[(yy - 20) ** 2 + (xx - 20) ** 2 <= 100] = 1
    mask[(yy - 40) ** 2 + (xx - 42) ** 2 <= 49] = 2
    rings = cell_polygons(mask)
    for i in (1, 2):
        assert abs(_area(rings[i]) - (mask == i).sum()) < 0.05 * (mask == i).sum()
    cells = pd.DataFrame({"cell": [1, 2], "celltype": ["A", "B"], "n_spots": [3, 4]})
    doc = json.loads(write_geojson(tmp_path / "cells.geojson", mask, cells).read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    f = doc["features"][1]
    assert f["geometry"]["type"] == "Polygon" and f["properties"]["celltype"] == "B"
    assert f["properties"]["classification"]["name"] == "B" and f["properties"]["objectType"] == "cell"


def test_sparse_large_ids_a_subset_and_an_origin():
    mask = np.zeros((6, 7), np.uint32)
    mask[1:4, 2:5] = 4_000_000_000  # an id far above the cell count (a tiled run's de novo ids)
    mask[4:6, 0:2] = 7
    rings = cell_polygons(mask, ids=[4_000_000_000], origin=(100, 50))
    assert list(rings) == [4_000_000_000]
    xy = np.asarray(rings[4_000_000_000])
    assert xy[:, 0].min() == 52.0 and xy[:, 1].min() == 101.0  # shifted by the origin (y, x) = (100, 50)
    assert rings[4_000_000_000] == [[x + 50, y + 100] for x, y in cell_polygons(mask)[4_000_000_000]]


def test_a_failed_stream_leaves_no_file(tmp_path):
    from segjointgene.io.polygons import GeoJSONWriter

    cells = pd.DataFrame({"cell": [1], "celltype": ["A"], "n_spots": [3]})
    try:
        with GeoJSONWriter(tmp_path / "c.geojson") as w:
            w.add(cells, {1: [[0, 0], [1, 0], [1, 1], [0, 0]]})
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
    with GeoJSONWriter(tmp_path / "c.geojson", unit="micron", id_prefix="cell-") as w:
        w.add(cells, {1: [[0, 0], [1, 0], [1, 1], [0, 0]]})
        w.add(cells.assign(cell=2), {})  # a cell without a ring is left out
    doc = json.loads((tmp_path / "c.geojson").read_text())
    assert doc["unit"] == "micron" and [f["id"] for f in doc["features"]] == ["cell-1"]


def test_outlines_are_simplified_without_changing_areas():
    yy, xx = np.mgrid[0:200, 0:200]
    mask = ((yy - 100) ** 2 / 80 ** 2 + (xx - 100) ** 2 / 50 ** 2 <= 1).astype(np.uint32)
    exact, simple = cell_polygons(mask, tolerance=0)[1], cell_polygons(mask)[1]
    assert len(exact) == 525 and len(simple) < 200  # Douglas-Peucker at 0.3 px
    assert abs(_area(simple) - mask.sum()) < 1e-3 * mask.sum()
