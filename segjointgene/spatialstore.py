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

__all__ = ["spatialdata_available", "write_spatialdata"]


def spatialdata_available() -> bool:
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        return False
    return True


def write_spatialdata(path: str | os.PathLike, *, instance: np.ndarray, spots: pd.DataFrame,
                      rings: dict[int, list[list[float]]], adata, um_per_px: float | None = None) -> Path:
    """Write the store (replacing an earlier one at ``path``); see the module docstring."""
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
    points_df = pd.DataFrame({"x": spots["spotX"].to_numpy(np.float64), "y": spots["spotY"].to_numpy(np.float64),
                              "gene": pd.Categorical(spots["gene"].astype(str)),
                              "cell": spots["cell"].to_numpy(np.int64), "prob": spots["prob"].to_numpy(np.float64)})
    points = PointsModel.parse(dd.from_pandas(points_df, npartitions=1), coordinates={"x": "x", "y": "y"},
                               feature_key="gene", instance_key="cell", transformations=frames)
    ids = [int(c) for c in adata.obs.index.astype(int) if int(c) in rings]
    shapes = ShapesModel.parse(gpd.GeoDataFrame({"geometry": [Polygon(rings[c]) for c in ids]},
                                                index=pd.Index(ids, name="cell")), transformations=frames)
    table = adata[[str(c) for c in ids]].copy()
    table.obs["region"] = pd.Categorical(["cells"] * table.n_obs)
    table.obs["cell"] = np.asarray(ids, np.int64)
    table = TableModel.parse(table, region="cells", region_key="region", instance_key="cell")
    store = sd.SpatialData(labels={"cell_labels": labels}, points={"transcripts": points}, shapes={"cells": shapes},
                           tables={"table": table})
    path = Path(path)
    store.write(path, overwrite=True)
    return path
