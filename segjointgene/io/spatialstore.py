"""The results as a SpatialData store (layer 1.5; ``spatialdata`` is an optional extra, imported here only).

:func:`write_spatialdata` writes ``results/segjointgene.zarr``: the spots with their assignment as points
(``transcripts``: x, y, gene, cell, prob), the cells as polygons (``cells``, indexed by cell id), the instance mask
as labels (``cell_labels``) and the cells x genes AnnData as the table annotating the ``cells`` shapes
(``region`` / ``cell`` columns), all in the pixel frame; with a platform's micron scale a ``microns`` coordinate
system is added through a scale transformation. ``spatialdata.read_zarr`` reads it back; sopa, napari-spatialdata
and squidpy's SpatialData readers take it from there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["spatialdata_available", "write_spatialdata", "write_spatialdata_from_results"]


def spatialdata_available() -> bool:
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        return False
    return True


def write_spatialdata(path: str | os.PathLike, *, instance, spots, rings, adata,
                      um_per_px: float | None = None) -> Path:
    """Write the store (replacing an earlier one at ``path``); see the module docstring. ``instance`` may be a
    numpy or a dask array, ``spots`` a pandas or a dask DataFrame (``spotX, spotY, gene, cell, prob``), ``rings``
    cell id -> ring (:func:`segjointgene.io.polygons.cell_polygons`) or a GeoDataFrame of polygons indexed by cell."""
    import dask.dataframe as dd
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Polygon
    from spatialdata.models import Labels2DModel, PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    frames = {"global": Identity()}
    if um_per_px is not None:
        frames["microns"] = Scale([um_per_px, um_per_px], axes=("x", "y"))
    labels = Labels2DModel.parse(instance.astype(np.uint32), dims=("y", "x"), transformations=frames)
    if not isinstance(spots, dd.DataFrame):
        spots = dd.from_pandas(spots, npartitions=1)
    points_df = spots.assign(x=spots["spotX"].astype(np.float64), y=spots["spotY"].astype(np.float64),
                             gene=spots["gene"].astype(str).astype("category"), cell=spots["cell"].astype(np.int64),
                             prob=spots["prob"].astype(np.float64))[["x", "y", "gene", "cell", "prob"]]
    points_df["gene"] = points_df["gene"].cat.as_known()  # known categories: PointsModel needs them
    points = PointsModel.parse(points_df, coordinates={"x": "x", "y": "y"}, feature_key="gene", instance_key="cell",
                               transformations=frames)
    if not isinstance(rings, gpd.GeoDataFrame):
        rings = gpd.GeoDataFrame({"geometry": [Polygon(r) for r in rings.values()]},
                                 index=pd.Index(list(rings), name="cell"))
    ids = [int(c) for c in adata.obs.index.astype(int) if int(c) in rings.index]
    shapes = ShapesModel.parse(gpd.GeoDataFrame({"geometry": rings.loc[ids, "geometry"].to_numpy()},
                                                index=pd.Index(ids, name="cell")), transformations=frames)
    table = adata[[str(c) for c in ids]].copy()
    table.obs.index.name = None  # cells.h5ad names it "cell", which anndata refuses beside the integer column
    table.obs["region"] = pd.Categorical(["cells"] * table.n_obs)
    table.obs["cell"] = np.asarray(ids, np.int64)
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell")
    store = sd.SpatialData(labels={"cell_labels": labels}, points={"transcripts": points}, shapes={"cells": shapes},
                           tables={"table": table})
    path = Path(path)
    store.write(path, overwrite=True)
    return path


def write_spatialdata_from_results(results: str | os.PathLike, adata, *, um_per_px: float | None = None) -> Path:
    """The store of a results folder written tile by tile: the mask read lazily from ``instance_mask.tif`` (tiled),
    the spots from ``spots_assigned.csv`` in blocks, the outlines from ``cells.geojson``; what a whole slide needs."""
    import dask.array as da
    import dask.dataframe as dd
    import geopandas as gpd
    import tifffile
    import zarr

    results = Path(results)
    store = tifffile.imread(results / "instance_mask.tif", aszarr=True)
    instance = da.from_zarr(zarr.open(store, mode="r"))
    spots = dd.read_csv(results / "spots_assigned.csv", usecols=["gene", "spotX", "spotY", "cell", "prob"],
                        dtype={"gene": str}, blocksize="64MB")
    outlines = gpd.read_file(results / "cells.geojson", columns=["cell"])  # parsed in C, not as Python lists
    outlines = outlines.set_index(outlines["cell"].astype(np.int64).rename(None))[["geometry"]]
    return write_spatialdata(results / "segjointgene.zarr", instance=instance, spots=spots, rings=outlines,
                             adata=adata, um_per_px=um_per_px)
