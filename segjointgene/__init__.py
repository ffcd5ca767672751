"""segjointgene: joint cell segmentation and spatial gene prioritization for imaging-based spatial transcriptomics.

Two methods segment the cells (``--method``): a per-cell model of the spots (``spotmodel``, the default; a watershed
of the spot density where spots are dense) and the published SegJointGene (``segjointgene``: a UNet self-trained
from nucleus labels on per-gene spot-density images, its growth constrained by CID attribution, which also ranks the
genes of each cell type). ``segjointgene.segment(raw_dir, work_dir)`` runs a section and returns its cells as
AnnData; ``python main.py`` is the command line. Importing the package is cheap; heavy modules load when used.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "segment"]


def __getattr__(name: str):
    """``segjointgene.segment`` (:func:`segjointgene.api.segment`), imported on first use."""
    if name == "segment":
        from .api import segment

        return segment
    raise AttributeError(f"module 'segjointgene' has no attribute {name!r}")
