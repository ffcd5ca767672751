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


class RunFiles:
    """Files of a training run folder ``checkpoints/<datasets_name>/<net_sub_suffix>/``."""

    CHECKPOINT = "net_{epoch}.pt"
    LABEL_CACHE = "labels_cache_{epoch}.npz"
    TRAIN_LOG = "train_log.csv"
    RUN_INFO = "run.json"
    RESULTS = "results"


class ResultFiles:
    """Contract file names under ``<run>/results/`` (SPEC §5)."""

    INSTANCE_MASK = "instance_mask.tif"
    CELLTYPE_MASK = "celltype_mask.tif"
    INITIAL_MASK = "initial_instance_mask.tif"
    CELLTYPES = "celltypes.csv"
    SPOTS = "spots_assigned.csv"
    CELLS = "cells.csv"
    ANNDATA = "cells.h5ad"
    GENE_RANKING = "gene_ranking.csv"
    GENE_SCORES = "gene_celltype_scores.csv"
    GENE_RANKING_DE = "gene_ranking_expression.csv"  # differential expression of the segmented cells
    EVALUATION = "evaluation.csv"
    FIGURES = "figures"


class TruthFiles:
    """Ground-truth folder ``<raw>_truth/`` written by ``simulate``."""

    INSTANCE_MASK = "instance_mask.tif"
    NUCLEUS_MASK = "nucleus_mask.tif"
    SPOTS = "spots_truth.csv"  # gene, spotX, spotY, cell, celltype (cell 0 = background noise)
    CELLS = "cells_truth.csv"  # cell, celltype, x, y, area_px
    MARKERS = "markers.csv"  # celltype, gene, rate, is_marker


class EmbeddingFiles:
    """Names of the embedding outputs under ``<run>/results/``."""

    CELLS_H5AD = "embeddings.h5ad"  # per cell: obsm['X_segclr'], obsm['spatial'], X = counts
    POINTS_H5AD = "embedding_points.h5ad"  # per point: obsm['X_segclr'], obsm['X_segclr_agg'], obsm['spatial']
    CELLS_NPZ = "embeddings.npz"  # fallback without anndata (+ embeddings_obs.csv)
    CELLS_OBS = "embeddings_obs.csv"
    POINTS_NPZ = "embedding_points.npz"
    POINTS_OBS = "embedding_points_obs.csv"
    CSVZIP = "embeddings_csvzip"  # per point, radius 0
    CSVZIP_AGG = "embeddings_csvzip_aggregated"  # per point, radius-R aggregated
    ENCODER = "segclr_encoder.pt"
    TRAIN_LOG = "segclr_train_log.csv"
    FIGURE = "segclr_pca_by_celltype.png"


class ClassifyFiles:
    """Names of the classify outputs under ``<run>/results/``."""

    TABLE = "celltypes_sngp.csv"
    MODEL = "sngp_classifier.pt"
    SUMMARY = "sngp_classifier.json"
    FIGURE = "sngp_uncertainty_pca.png"
