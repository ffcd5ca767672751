"""Where a step's files live (layer 1): the run folder's file names and patterns, and the folders of a step.

:class:`RunFolder` is the one owner of the names inside ``checkpoints/<datasets_name>/<net_sub_suffix>/``: the
checkpoints, label caches and attribution sums of each saved epoch, ``train_log.csv``, ``run.json`` and the
``results/`` sub-folder, whose contract file names (SPEC §5) are :class:`ResultFiles`, :class:`FigureFiles`,
:class:`EmbeddingFiles` and :class:`ClassifyFiles`. Every module that reads or writes a run file asks it for the
path; no other module spells a run file name or pattern.

:class:`Paths` holds the folders of one command (raw section, dataset, run) resolved from the path flags.

>>> run = RunFolder(Path("checkpoints/CA1/SegJointGene_CID"))
>>> run.checkpoint(30).name, run.label_cache(30).name, run.attribution(30).name
('net_30.pt', 'labels_cache_30.npz', 'attribution_30.npz')
>>> run.result(ResultFiles.CELLS).as_posix()
'checkpoints/CA1/SegJointGene_CID/results/cells.csv'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ClassifyFiles", "EmbeddingFiles", "FigureFiles", "Paths", "ResultFiles", "RunFolder"]


class ResultFiles:
    """Contract file names under ``<run>/results/`` (SPEC §5)."""

    INSTANCE_MASK = "instance_mask.tif"
    CELLTYPE_MASK = "celltype_mask.tif"
    INITIAL_MASK = "initial_instance_mask.tif"
    CELLTYPES = "celltypes.csv"
    SPOTS = "spots_assigned.csv"
    CELLS = "cells.csv"
    ANNDATA = "cells.h5ad"
    GENE_RANKING = "gene_ranking.csv"  # differential expression of the segmented cells (+ the attribution's columns)
    GENE_RANKING_ATTRIBUTION = "gene_ranking_attribution.csv"  # the attribution's own ranking (CID / IG)
    GENE_SCORES = "gene_celltype_scores.csv"  # the attribution matrix (types x genes)
    GEOJSON = "cells.geojson"  # one polygon per cell (QuPath, napari)
    SPATIALDATA = "segjointgene.zarr"  # SpatialData store (when spatialdata is installed)
    XENIUM_RANGER = "xenium_ranger"  # folder: the inputs of xeniumranger import-segmentation (Xenium sections)
    BORDER_GENES = "border_genes.csv"  # per pair of touching types, the genes that decide their borders
    RANKING_EVALUATION = "gene_ranking_evaluation.csv"  # written by evaluate on simulated sections
    EVALUATION = "evaluation.csv"
    COVERAGE_MECR = "coverage_mecr.csv"  # written by evaluate with a reference profile
    FIGURES = "figures"


class FigureFiles:
    """Figures under ``<run>/results/figures/``."""

    OVERVIEW = "section_overview.png"
    ZOOM = "section_zoom.png"
    INITIAL_VS_FINAL = "initial_vs_final.png"
    TRAINING = "training_curves.png"
    RANKING = "gene_ranking_heatmap.png"  # the attribution's heat map (only when one ran)
    DOTPLOT = "gene_ranking_dotplot.png"  # differential expression


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


@dataclass(frozen=True)
class RunFolder:
    """A training run folder ``checkpoints/<datasets_name>/<net_sub_suffix>/`` and the names of its files.

    Per saved epoch E: ``net_E.pt`` (checkpoint), ``labels_cache_E.npz`` (labels of every patch) and, when
    attribution ran, ``attribution_E.npz`` (running type x gene sums); with ``--label_update model``,
    ``spot_assignment_E.npz`` (each spot's cell and posterior probability). Once: ``train_log.csv``, ``run.json`` and
    the ``results/`` folder.
    """

    path: Path

    _CHECKPOINT = "net_{epoch}.pt"
    _LABEL_CACHE = "labels_cache_{epoch}.npz"
    _ATTRIBUTION = "attribution_{epoch}.npz"
    _SPOT_ASSIGNMENT = "spot_assignment_{epoch}.npz"
    TRAIN_LOG = "train_log.csv"
    RUN_INFO = "run.json"
    RESULTS = "results"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    # per-epoch files
    def checkpoint(self, epoch: int) -> Path:
        return self.path / self._CHECKPOINT.format(epoch=epoch)

    def label_cache(self, epoch: int) -> Path:
        return self.path / self._LABEL_CACHE.format(epoch=epoch)

    def attribution(self, epoch: int) -> Path:
        return self.path / self._ATTRIBUTION.format(epoch=epoch)

    def spot_assignment(self, epoch: int) -> Path:
        """The spot model's assignment (``cell``, ``prob`` per spot, spots.npz order) of ``--label_update model``."""
        return self.path / self._SPOT_ASSIGNMENT.format(epoch=epoch)

    def spot_assignment_epochs(self) -> list[int]:
        return self._epochs(self._SPOT_ASSIGNMENT)

    def checkpoint_epochs(self) -> list[int]:
        """Epochs with a checkpoint file, ascending."""
        return self._epochs(self._CHECKPOINT)

    def label_cache_epochs(self) -> list[int]:
        """Epochs with a label cache, ascending."""
        return self._epochs(self._LABEL_CACHE)

    def attribution_epochs(self) -> list[int]:
        """Epochs with attribution sums, ascending."""
        return self._epochs(self._ATTRIBUTION)

    def saved_epochs(self) -> list[int]:
        """Epochs that have both a checkpoint and its label cache (the ones a run can resume from), ascending."""
        caches = set(self.label_cache_epochs())
        return [e for e in self.checkpoint_epochs() if e in caches]

    def _epochs(self, template: str) -> list[int]:
        if not self.path.is_dir():
            return []
        pattern = re.compile("^" + re.escape(template).replace(re.escape("{epoch}"), r"(\d+)") + "$")
        return sorted(int(m.group(1)) for p in self.path.iterdir() if (m := pattern.match(p.name)))

    # files written once
    @property
    def train_log(self) -> Path:
        return self.path / self.TRAIN_LOG

    @property
    def run_info(self) -> Path:
        return self.path / self.RUN_INFO

    @property
    def results(self) -> Path:
        return self.path / self.RESULTS

    def result(self, name: str) -> Path:
        """A file (or folder) under ``results/``: a name from :class:`ResultFiles`, :class:`EmbeddingFiles`, ..."""
        return self.results / name

    @property
    def figures(self) -> Path:
        return self.results / ResultFiles.FIGURES

    def figure(self, name: str) -> Path:
        """A figure under ``results/figures/`` (a name from :class:`FigureFiles`, ...)."""
        return self.figures / name

    def run_files(self) -> list[Path]:
        """The files that make this folder hold a run (checkpoints, caches, attribution sums, log, run.json)."""
        if not self.path.is_dir():
            return []
        templates = (self._CHECKPOINT, self._LABEL_CACHE, self._ATTRIBUTION, self._SPOT_ASSIGNMENT)
        per_epoch = [p for t in templates for p in sorted(self.path.glob(t.format(epoch="*")))]
        return per_epoch + [p for p in (self.train_log, self.run_info) if p.is_file()]


@dataclass(frozen=True)
class Paths:
    """Folders of one command, resolved from the path flags (all under ``--work_dir``)."""

    work_dir: Path
    datasets_name: str
    raw_dir: Path
    data_dir: Path
    run_dir: Path

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.run_dir)
