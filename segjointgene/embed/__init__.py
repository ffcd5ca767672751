"""SegCLR-style cell embeddings for spatial-transcriptomics sections (layer 2.5; docs/SEGCLR.md §2).

A small 2-D ResNet is trained with NT-Xent on positive pairs of crops centred at two points of the same segmented
cell (the cell's mask as a channel, content outside it masked); the embeddings of points inside every cell are
exported per point and per cell (``embeddings.h5ad``) and in SegCLR's sharded CSV-ZIP layout.
"""

from .aggregate import cell_mean, coherence, radius_mean
from .augment import ViewParams, apply_d4, draw_view_params, identity_params
from .crops import MASK_MODES, ChannelStats, CropBuilder, SectionInputs, cell_counts, fit_channel_stats
from .export import CellEmbeddings, EmbeddingFiles, md5_shard, read_cell, read_csvzip, read_manifest, write_csvzip
from .loss import collapse_metric, contrastive_topk, decorrelation_loss, nt_xent
from .model import PRESETS, EncoderSpec, SegCLRNet, build_model
from .pipeline import Embeddings, EmbedRun, compute_embeddings, embed_section, make_builder, make_encoder
from .sampling import CellPixels, batch_cells, cell_pixels, export_points, sample_pairs
from .train import TrainResult, embed_points, train_encoder

__all__ = [
    "MASK_MODES", "PRESETS", "CellEmbeddings", "CellPixels", "ChannelStats", "CropBuilder", "EmbedRun",
    "EmbeddingFiles", "Embeddings", "EncoderSpec", "SectionInputs", "SegCLRNet", "TrainResult", "ViewParams",
    "apply_d4", "batch_cells", "build_model", "cell_counts", "cell_mean", "cell_pixels", "coherence",
    "collapse_metric", "compute_embeddings", "contrastive_topk", "decorrelation_loss", "draw_view_params",
    "embed_points", "embed_section", "export_points", "fit_channel_stats", "identity_params", "make_builder",
    "make_encoder", "md5_shard", "nt_xent", "radius_mean", "read_cell", "read_csvzip", "read_manifest",
    "sample_pairs", "train_encoder", "write_csvzip",
]
