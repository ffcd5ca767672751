"""Cell-type classifier with calibrated uncertainty on the cell embeddings: SNGP (layer 2.5; docs/SEGCLR.md §2.10).

A light residual MLP with bounded spectral normalisation and a random-Fourier-feature Gaussian-process output layer;
predictions carry a mean-field probability and a Dempster-Shafer uncertainty, and cells above a threshold chosen on
held-out in-distribution cells are flagged out-of-distribution.
"""

from .evaluate import (
                       auroc,
                       expected_calibration_error,
                       fpr_at_tpr,
                       linear_probe_f1,
                       mahalanobis_score,
                       spatial_blocks,
                       spatial_split,
)
from .sngp import (
                       BoundedSpectralNorm,
                       RandomFeatureGP,
                       SNGPNet,
                       add_bounded_spectral_norm,
                       dempster_shafer,
                       mean_field_logits,
                       random_fourier_features,
)
from .train import FittedSNGP, Prediction, fit_sngp, predict

__all__ = [
    "BoundedSpectralNorm", "FittedSNGP", "Prediction", "RandomFeatureGP", "SNGPNet", "add_bounded_spectral_norm",
    "auroc", "dempster_shafer", "expected_calibration_error", "fit_sngp", "fpr_at_tpr", "linear_probe_f1",
    "mahalanobis_score", "mean_field_logits", "predict", "random_fourier_features", "spatial_blocks",
    "spatial_split",
]
