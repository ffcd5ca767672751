"""Attribution of cell-type predictions to genes: CID and integrated gradients (layer 2: torch; SPEC §4).

Captum-shaped: a method object holds the forward function (any callable or ``nn.Module`` mapping (N, G, H, W)
inputs to (N, K, H, W) logits; this package imports neither the model nor the trainer) and ``attribute()`` takes the
per-call budget and, for CID, an explicit ``torch.Generator``.

>>> from segjointgene.attribution import CID, IG, AttributionSummary, select_targets, summarize
>>> genes, classes = select_targets(gene_totals, class_pixels, n_gene, n_celltype)   # doctest: +SKIP
>>> summary = summarize(model, images, labels, targets=classes, genes=genes, config=cfg, generator=g)  # doctest: +SKIP

:func:`summarize` reduces each chunk of cell types on the device (:class:`AttributionSummary`); ``attribute()``
returns the full (B, T, n_gene, H, W) scores for small inputs.
"""

from ._base import Attribution, AttributionOutOfMemoryError, frozen_model
from .cid import CID, SCORE_SCALE, STOP_RULES, CIDResult
from .dispatch import summarize
from .ig import IG, IGResult
from .summary import AttributionSummary
from .targets import ClassLogitMap, MaskedClassSum, prediction_masks, select_targets

__all__ = [
    "Attribution",
    "AttributionOutOfMemoryError",
    "AttributionSummary",
    "CID",
    "CIDResult",
    "ClassLogitMap",
    "IG",
    "IGResult",
    "MaskedClassSum",
    "SCORE_SCALE",
    "STOP_RULES",
    "frozen_model",
    "prediction_masks",
    "select_targets",
    "summarize",
]
