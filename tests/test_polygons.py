"""Cell outlines: pixel-edge polygons whose area matches the cell's, and a GeoJSON QuPath / napari can read."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from segjointgene.polygons import cell_polygons, write_geojson


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
