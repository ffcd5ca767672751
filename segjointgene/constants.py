"""Names, keys and label values shared by every module (layer 0: imports nothing internal)."""

from __future__ import annotations

#: Label value of background pixels, for cell-type and instance maps alike (no offset anywhere).
BACKGROUND = 0

#: Name of the background class in ``metadata.json['celltypes']`` (index 0).
BACKGROUND_NAME = "background"

SPLITS = ("train", "test")


class RawFiles:
    """Glob patterns and columns of a raw section folder (the CA1 layout)."""

    CELLS = "cells_*.csv"
    SPOTS = "spots*.csv"
    CELLTYPES = "celltype_*.csv"
    #: Nucleus label images: a scipy sparse COO matrix, or a TIFF whose name contains "label".
    LABEL_IMAGE_NPZ = "*.coo.npz"
    TIFF_SUFFIXES = (".tif", ".tiff")
    LABEL_TIFF_TOKEN = "label"

    CELL_ID, CELL_X, CELL_Y = "cell", "cellX", "cellY"
    GENE, SPOT_X, SPOT_Y = "gene", "spotX", "spotY"
    CELLTYPE = "original_celltype"


class PatchKeys:
    """Arrays of one patch file ``p_<row>_<col>.npz`` (shape, dtype)."""

    IMAGE = "image"  # (G, P, P) float32 per-gene spot density
    LABEL = "label"  # (P, P) int32 cell-type id, 0 = background
    INSTANCE = "instance"  # (P, P) int32 nucleus id, 0 = background (the immutable core)
    SPOTS = "spots"  # (P, P) float32 raw spot counts
    DAPI = "dapi"  # (P, P) float32 DAPI, or the binary nucleus mask without DAPI
    ALL = (IMAGE, LABEL, INSTANCE, SPOTS, DAPI)
    DTYPES = {IMAGE: "float32", LABEL: "int32", INSTANCE: "int32", SPOTS: "float32", DAPI: "float32"}


PATCH_GLOB = "p_*.npz"
PATCH_NAME = "p_{row}_{col}.npz"
METADATA_FILE = "metadata.json"
#: Per-dataset tables written by preprocessing beside ``metadata.json``.
CELLS_TABLE = "cells.csv"  # cell, celltype_id, celltype, x, y (raw frame)
SPOTS_TABLE = "spots.npz"  # every input spot: gene index, x, y (raw frame), inside flag

TRUTH_SUFFIX = "_truth"


class TruthFiles:
    """Ground-truth folder ``<raw>_truth/`` written by ``simulate``."""

    INSTANCE_MASK = "instance_mask.tif"
    NUCLEUS_MASK = "nucleus_mask.tif"
    SPOTS = "spots_truth.csv"  # gene, spotX, spotY, cell, celltype (cell 0 = background noise)
    CELLS = "cells_truth.csv"  # cell, celltype, x, y, area_px
    MARKERS = "markers.csv"  # celltype, gene, rate, is_marker
