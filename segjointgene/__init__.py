"""segjointgene: joint cell segmentation and spatial gene prioritization for imaging-based spatial transcriptomics.

The package re-implements SegJointGene: a UNet self-trained from nucleus labels on per-gene spot-density images
grows nuclei into whole cells, constrained by CID attribution, which also ranks the genes of each cell type.
Importing the package is cheap; heavy modules (torch, matplotlib) load when used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
