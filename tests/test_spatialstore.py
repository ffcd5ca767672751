"""The SpatialData store reads back with spatialdata.read_zarr (skipped where spatialdata is not installed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segjointgene.io.polygons import cell_polygons


def test_store_round_trips(tmp_path):
    sd = pytest.importorskip("spatialdata")
    anndata = pytest.importorskip("anndata")
    from segjointgene.io.spatialstore import write_spatialdata

    mask = np.zeros((40, 50), np.uint32)
    mask[5:15, 5:20], mask[20:35, 25:45] = 1, 2
    spots = pd.DataFrame({"spotX": [6.5, 30.2, 49.0], "spotY": [7.5, 25.1, 2.0], "gene": ["a", "b", "a"],
                          "cell": [1, 2, 0], "prob": [0.9, 0.8, 0.7]})
    adata = anndata.AnnData(X=np.array([[1.0, 0.0], [0.0, 1.0]], np.float32),
                            obs=pd.DataFrame({"celltype": pd.Categorical(["A", "B"])}, index=["1", "2"]),
                            var=pd.DataFrame(index=["a", "b"]))
    path = write_spatialdata(tmp_path / "s.zarr", instance=mask, spots=spots, rings=cell_polygons(mask),
                             adata=adata, um_per_px=0.2125)
    back = sd.read_zarr(path)
    assert set(back.points) == {"transcripts"} and set(back.shapes) == {"cells"} and set(back.labels) == {"cell_labels"}
    table = back.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "cells" and list(table.obs["cell"]) == [1, 2]
    assert back.points["transcripts"].compute()["cell"].tolist() == [1, 2, 0]
    assert np.asarray(back.labels["cell_labels"]).max() == 2
    assert abs(back.shapes["cells"].geometry.area.loc[1] - 150) < 10  # 10 x 15 px


def test_store_from_a_tiled_runs_results(tmp_path):
    """What a whole slide's merge does: the mask read lazily from a tiled TIFF, the spots from the CSV, the outlines
    from the GeoJSON; the table as cells.h5ad names its index ("cell"), which anndata would refuse beside the column."""
    sd = pytest.importorskip("spatialdata")
    anndata = pytest.importorskip("anndata")
    import tifffile

    from segjointgene.io.polygons import write_geojson
    from segjointgene.io.spatialstore import write_spatialdata_from_results

    mask = np.zeros((300, 280), np.uint32)
    mask[5:15, 5:20], mask[200:235, 125:245] = 7, 900_000  # a sparse large id, as de novo cells have
    tifffile.imwrite(tmp_path / "instance_mask.tif", mask, tile=(256, 256), compression="zlib")
    pd.DataFrame({"gene": ["a", "b"], "spotX": [6.5, 130.0], "spotY": [7.5, 210.0], "cell": [7, 900_000],
                  "celltype": ["A", "B"], "prob": [0.9, 0.8]}).to_csv(tmp_path / "spots_assigned.csv", index=False)
    cells = pd.DataFrame({"cell": [7, 900_000], "celltype": ["A", "B"], "n_spots": [1, 1]})
    write_geojson(tmp_path / "cells.geojson", mask, cells)
    obs = pd.DataFrame({"celltype": pd.Categorical(["A", "B"])}, index=pd.Index(["7", "900000"], name="cell"))
    adata = anndata.AnnData(X=np.eye(2, dtype=np.float32), obs=obs, var=pd.DataFrame(index=["a", "b"]))
    back = sd.read_zarr(write_spatialdata_from_results(tmp_path, adata, um_per_px=0.5))
    assert np.array_equal(np.asarray(back.labels["cell_labels"]), mask)
    assert sorted(back.shapes["cells"].index) == [7, 900_000]
    assert abs(back.shapes["cells"].geometry.area.loc[900_000] - 35 * 120) < 40
    assert back.points["transcripts"].compute()["cell"].tolist() == [7, 900_000]
    assert list(back.tables["table"].obs["cell"]) == [7, 900_000]
