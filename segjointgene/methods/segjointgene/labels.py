"""Self-training label update: grow cells from the network's confident predictions (layer 2: torch).

After every training batch the current pseudo-labels (instance ids) are updated from the network's logits by one of
two rules (SPEC §3, reference §9):

* **V1** (:func:`update_labels` with ``config.rule == "v1"``; the package default rule is ``model``, see
  :mod:`segjointgene.methods.segjointgene.trainer.spots`): fair Euclidean territories, prediction agrees
  with the candidate cell's type, smoothed confidence, outside the nuclei, 3x3 votes, optionally the dominant
  attributed cell type, then a bridge fill; a pixel keeps its current owner unless the prediction contradicts it.
* **V2** (``config.rule == "v2"``): balanced dilation with random ranks, attribution top-ratio filter, gap fill, island
  clean-up and hole fill.

Everything runs batched on the tensors' device (CPU or CUDA): no numpy round trips and no Python loops over pixels or
cells (only over window offsets and iterations). Class maps are never produced here: the class of a pixel is always
``class_lut[instance]``, so "class map = class of the instance map" holds by construction.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from segjointgene.config import LabelUpdateConfig
from segjointgene.constants import BACKGROUND

log = logging.getLogger(__name__)

__all__ = ["IGNORE", "LabelUpdateResult", "STAT_KEYS", "reach", "training_targets", "update_labels"]

#: Target value of pixels left out of the training loss.
IGNORE = -1

#: Counters of :attr:`LabelUpdateResult.stats` (0-d int64 tensors on the input's device), the same for both rules.
STAT_KEYS = (
    "n_candidates",  # pixels passing every anchor test except the attribution constraint (summed over repeats)
    "n_blocked_by_attribution",  # candidates removed by the attribution constraint (summed over repeats)
    "n_anchors",  # anchors used for growth: V1 after votes, V2 after the top-ratio filter (summed over repeats)
    "n_grown",  # background -> cell (input vs output)
    "n_reassigned",  # cell -> another cell (input vs output)
    "n_removed",  # cell -> background (V2 island clean-up; always 0 for V1)
)

# 3x3 neighbourhoods (dy, dx); out[y, x] reads in[y + dy, x + dx].
_SQUARE = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
_PLUS = ((-1, 0), (0, -1), (0, 0), (0, 1), (1, 0))
_FOUR = ((-1, 0), (0, -1), (0, 1), (1, 0))
_EIGHT = tuple(o for o in _SQUARE if o != (0, 0))
#: Convergence of the iterative flood fills is checked (one host sync) every this many propagation steps.
_CHECK_EVERY = 4


@dataclass(frozen=True)
class LabelUpdateResult:
    """Result of :func:`update_labels`.

    Attributes
    ----------
    instance : (B, H, W) int64 tensor
        The updated instance ids (0 = background), on the input's device.
    stats : dict[str, 0-d int64 tensor]
        Pixel counters over the batch (keys :data:`STAT_KEYS`), left on the device (no host sync).
    """

    instance: torch.Tensor
    stats: dict[str, torch.Tensor]


def reach(config: LabelUpdateConfig) -> int:
    """How far (pixels) one :func:`update_labels` call can move a label: the halo of neighbouring labels it must see.

    V1 grows by at most ``expand_k`` per application; V2's alternating dilations reach ``expand_k`` and its gap fill
    as far again, so twice that. Times ``repeats`` applications per call. The model rule grows nothing per batch;
    its halo (``expand_k``) is the context an attribution sees.

    >>> reach(LabelUpdateConfig(rule="v1", expand_k=3)), reach(LabelUpdateConfig(expand_k=3, rule="v2", repeats=2))
    (3, 12)
    """
    per_application = 2 * config.expand_k if config.rule == "v2" else config.expand_k
    return per_application * config.repeats


def update_labels(
    instance: torch.Tensor,
    core: torch.Tensor,
    logits: torch.Tensor,
    class_lut: torch.Tensor,
    *,
    config: LabelUpdateConfig | None = None,
    attribution: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: torch.Tensor | None = None,
    origin: torch.Tensor | None = None,
) -> LabelUpdateResult:
    """Update the pseudo-labels of a batch from the network's predictions (rule V1 or V2).

    Parameters
    ----------
    instance : (B, H, W) integer tensor
        Current instance ids (0 = background; section-global cell ids, each ``< len(class_lut)``).
    core : (B, H, W) integer tensor
        Fixed nucleus instance map; core pixels (``core > 0``) never change and always hold ``core``'s id.
    logits : (B, K, H, W) float tensor
        Network output (any float dtype; computed in float32). Class 0 = background, 1..K-1 cell types.
    class_lut : (M,) int64 tensor
        Instance id -> class id (``class_lut[0] == 0``); class ids must be ``< K``.
    config : LabelUpdateConfig, optional
        Rule and parameters (default ``LabelUpdateConfig(rule="v1")``: V1 with nucleus territories, which need
        ``seeds``).
    attribution : (B, T, H, W) float tensor, optional
        Per target cell type, the gene-summed attribution score at each pixel (higher = that type's prediction
        depends more on the genes at this pixel). Needs ``targets``.
    targets : (T,) int64 tensor, optional
        Class ids (``< K``) of the ``T`` attribution channels; not necessarily every class.
    generator : torch.Generator, optional
        Source of V2's random ranks, on the tensors' device. ``None`` uses a fresh, non-deterministically seeded
        generator (V2 is then not reproducible); V1 draws nothing.
    seeds : (M, 3) float tensor, optional
        V1: (y, x, r) of every cell's nucleus: centroid in one section-wide frame and equivalent radius
        ``sqrt(area / pi)`` (row ``i`` = instance id ``i``; NaN for ids without a nucleus). With ``origin``,
        candidates compete by the distance from the pixel to their *nucleus* (centroid distance minus radius, which
        approximates the distance to the nucleus boundary, as nucleus expansion uses) instead of to their current
        mask (see V1 step 1).
    origin : (B, 2) int tensor, optional
        (y, x) of each patch's top-left pixel in the frame of ``seeds``.

    Returns
    -------
    LabelUpdateResult
        ``instance`` (B, H, W) int64 and the counters ``stats`` (:data:`STAT_KEYS`).

    Raises
    ------
    TypeError
        An id map that is not integer, logits or attribution that are not floating point, a generator that is not a
        ``torch.Generator``.
    ValueError
        Shapes that do not match, tensors on different devices, ``attribution`` without ``targets`` (or the reverse).

    Notes
    -----
    Common quantities: ``p = softmax(logits)``; ``conf, pred`` = max / argmax of ``p`` over classes;
    ``conf_s`` = 3x3 mean of ``conf`` over the pixels inside the image (border-correct: the reference's zero padding
    lowered the confidence along patch borders, defect 14); "confident" means ``conf_s > prediction_threshold``.
    The rule runs ``config.repeats`` times with the same logits (the reference ran V2 ten times per batch); the
    reach statements below hold per application, so one call can grow a cell by up to ``repeats * expand_k``.
    The counters are device tensors: the function itself never synchronises with the host for them.

    **V1** (one application):

    1. *Territories*, fair between neighbours. For every pixel, ``TI`` = the nearest labelled pixel's id in the
       current map within Euclidean distance ``<= expand_k`` (the pixel itself at distance 0 when labelled), and
       ``TI_pred`` = the nearest instance within ``expand_k`` whose class equals ``pred`` at the pixel (0 if none).
       Ties at equal distance go to the offset that comes first in the fixed order (squared distance, dy, dx), i.e.
       among equally near pixels the upper row first, then the left column. The order never looks at the ids, so
       contested pixels are not biased towards larger ids (the reference's max-pooling was, SPEC §8).
    2. *Candidates*: non-core, ``TI_pred > 0``, ``pred > 0``, confident, and either background now or owned by a
       (non-core pixel of a) cell whose class differs from ``pred``. A pixel keeps its current owner unless the
       prediction contradicts that owner's type: an owned pixel whose owner's class equals ``pred`` never moves.
    3. *Attribution* (when given): the dominant attributed type at a pixel is ``targets[argmax_t attribution[:, t]]``;
       a candidate survives when the dominant type equals its candidate type (``pred`` = class of ``TI_pred``).
       A candidate is never blocked when its type is not among ``targets`` or when the attribution is constant over
       ``t`` at the pixel (e.g. all zero): there is no evidence against it. Removed candidates are counted.
    4. *Votes*: valid anchors are candidates whose 3x3 neighbourhood (itself included, inside the image) holds at
       least ``vote_min`` candidates of the same candidate instance.
    5. *Bridge fill*: background, non-core pixels within Euclidean ``expand_k`` of a valid anchor that have a
       territory (``TI > 0``) and are not confidently predicted background (``pred == 0`` and confident: a growth
       limit grounded in the data) take ``TI``.
    6. New map: ``TI_pred`` on valid anchors, ``TI`` on filled pixels, unchanged elsewhere; core pixels hold
       ``core``'s id. Hence every changed pixel takes the id of an instance that had a pixel within ``expand_k`` of
       it, nothing changes without a confident, agreeing prediction within ``expand_k``, and no cell loses pixels to
       background.

    **V2** (one application, reference §9.2 with its defects fixed):

    1. ``TI`` = balanced dilation of the current map for ``expand_k`` iterations: each iteration draws a random rank
       for every id from ``generator``; background pixels take the neighbour id of highest rank in a 3x3 window on
       even iterations (0, 2, ...) and a plus-shaped window on odd ones; existing ids never change. ``TY`` =
       ``class_lut[TI]`` (the class of the territory instance, not a separately dilated class map).
    2. Anchors: ``pred == TY``, ``TY > 0``, confident, non-core.
    3. Attribution filter (when given): per sample, of the anchors whose ``TY`` is a target, keep the
       ``ceil(top_ratio * n)`` highest by ``attribution[b, index of TY in targets, y, x]`` plus any tied with the
       last kept (all-zero scores keep every anchor); anchors whose ``TY`` is not a target are kept (no evidence).
       Targets are looked up by class id, not by position (the reference's indexing was valid only for all classes).
    4. Gap fill: pixels reached by ``expand_k`` iterations of the same alternating 3x3 / plus dilation of the
       anchors, with ``TY > 0``, non-core, take ``TI`` (as do the anchors). Owned pixels keep their id (``TI`` of an
       owned pixel is its own id).
    5. Island clean-up: of each id, only the 8-connected pieces that contain one of its core pixels are kept; other
       pieces (and cells without core pixels in the patch) become background.
    6. Hole fill: a background hole (not 4-connected through background to the patch border) whose 1-pixel
       8-neighbour ring touches exactly one id takes that id; its class is ``class_lut`` of it (the reference left
       filled holes with class 0, defect 16).

    V2's reach per application is the octagon of ``expand_k`` alternating 3x3 / plus steps (slightly beyond the
    Euclidean disc along diagonals), plus enclosed holes. Connected pieces and holes are found on the device by
    iterative propagation of shifted comparisons until nothing changes (one host sync per few steps).

    Examples
    --------
    >>> import torch
    >>> inst = torch.zeros(1, 5, 5, dtype=torch.long); inst[0, 2, 2] = 1     # one nucleus of class 1
    >>> logits = torch.zeros(1, 2, 5, 5); logits[:, 1] = 5.0                 # class 1 predicted everywhere
    >>> res = update_labels(inst, inst.clone(), logits, torch.tensor([0, 1]),
    ...                     config=LabelUpdateConfig(rule="v1", expand_k=1, vote_min=3, territory="mask"))
    >>> res.instance[0]
    tensor([[0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0]])
    >>> int(res.stats["n_grown"])
    4
    """
    config = config if config is not None else LabelUpdateConfig(rule="v1")
    if config.rule == "model":
        raise ValueError("--label_update model does not grow labels per batch (the spot model sets them: "
                         "segjointgene.methods.segjointgene.trainer.spots); update_labels runs the v1 / v2 rules")
    instance, core, class_lut = _validate_inputs(instance, core, logits, class_lut, attribution, targets, generator)
    n_classes = logits.shape[1]
    device = instance.device

    prob = torch.softmax(logits.float(), dim=1)  # (B, K, H, W)
    conf, pred = prob.max(dim=1)  # (B, H, W) float32, int64
    confident = _box_mean(conf) > config.prediction_threshold  # (B, H, W) bool
    core_mask = core > 0
    core = core.long()

    zero = torch.zeros((), dtype=torch.long, device=device)
    counts = {"n_candidates": zero, "n_blocked_by_attribution": zero, "n_anchors": zero}
    new = torch.where(core_mask, core, instance)
    seed_dist = None
    if seeds is not None and config.rule == "v1":
        seed_dist = _seed_distance(seeds, origin, instance.shape, device)
    if config.rule == "v1" and config.territory == "nucleus":
        if seed_dist is None:
            raise ValueError("--territory nucleus needs the nucleus centroids: pass seeds and origin")
        dominant = None
        if attribution is not None:
            dominant = _dominant_type(attribution.float(), targets)  # (B, H, W) class id, -1 = no information
        step = functools.partial(_v1_nucleus_step, core=core, core_mask=core_mask, class_lut=class_lut, prob=prob,
                                 pred=pred, confident=confident, dominant=dominant, config=config, seed_dist=seed_dist)
    elif config.rule == "v1":
        allowed = None
        if attribution is not None:
            allowed = _attribution_allows(attribution.float(), targets, pred, n_classes)  # (B, H, W) bool
        step = functools.partial(_v1_step, core=core, core_mask=core_mask, class_lut=class_lut, pred=pred,
                                 confident=confident, allowed=allowed, config=config, seed_dist=seed_dist)
    else:
        if generator is None:
            generator = torch.Generator(device=device)
            generator.seed()
        target_index = None
        if attribution is not None:
            target_index = torch.full((n_classes,), -1, dtype=torch.long, device=device)
            target_index[targets] = torch.arange(targets.numel(), device=device)  # class id -> channel, -1 = none
        step = functools.partial(_v2_step, core=core, core_mask=core_mask, class_lut=class_lut, pred=pred,
                                 confident=confident, attribution=attribution, target_index=target_index,
                                 config=config, generator=generator)
    for _ in range(config.repeats):
        new, step_counts = step(new)
        counts = {key: counts[key] + step_counts[key] for key in counts}

    before, after = instance > 0, new > 0
    changed = new != instance
    counts["n_grown"] = (changed & ~before).sum()
    counts["n_reassigned"] = (changed & before & after).sum()
    counts["n_removed"] = (changed & before & ~after).sum()
    return LabelUpdateResult(instance=new, stats={key: counts[key] for key in STAT_KEYS})


def training_targets(labels: torch.Tensor, nuclei: torch.Tensor, total_density: torch.Tensor | None = None, *,
                     margin: int, mode: str = "current", density_floor: float = 0.0) -> torch.Tensor:
    """Loss targets for self-training: the current labels, with uncertain background left out (:data:`IGNORE`).

    Background next to a labelled cell may be cytoplasm that is not labelled yet; training it as background would
    teach the network to stop growth at the current labels (confirmation bias). So background pixels within
    ``margin`` px (Chebyshev) of a labelled pixel are ignored, unless the data say they are background: a total
    spot density below ``density_floor`` (e.g. half the median density at nucleus pixels).

    Parameters
    ----------
    labels : (B, H, W) int64 current class map (0 = background).
    nuclei : (B, H, W) int64 class map of the nuclei (the fixed labels).
    total_density : (B, H, W) float, the gene densities summed over genes (needed when ``density_floor > 0``).
    margin : ignore radius in pixels (0 = keep every background pixel).
    mode : "current" trains on the current labels; "nuclei" only on the certain ones: nucleus pixels and certain
        background (grown cell pixels are ignored too, so the predictions reflect expression, not label geometry).
    density_floor : see above (0 = no density test).

    Returns
    -------
    (B, H, W) int64 targets with :data:`IGNORE` where the loss must not look.

    Examples
    --------
    >>> lab = torch.zeros(1, 1, 7, dtype=torch.long); lab[0, 0, 3] = 2
    >>> training_targets(lab, lab, margin=2)[0, 0].tolist()
    [0, -1, -1, 2, -1, -1, 0]
    >>> dens = torch.tensor([[[1., 1., 0., 1., 1., 0., 1.]]])
    >>> training_targets(lab, lab, dens, margin=2, density_floor=0.5)[0, 0].tolist()
    [0, -1, 0, 2, -1, 0, 0]
    """
    fg = labels > BACKGROUND
    uncertain = torch.zeros_like(fg)
    if margin > 0:
        near = F.max_pool2d(fg[:, None].float(), kernel_size=2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
        uncertain = near & ~fg
        if density_floor > 0 and total_density is not None:
            uncertain &= total_density >= density_floor
    ignore = torch.full_like(labels, IGNORE)
    targets = torch.where(uncertain, ignore, labels)
    if mode == "nuclei":
        certain_background = ~fg & ~uncertain
        targets = torch.where(nuclei > BACKGROUND, nuclei, torch.where(certain_background, labels, ignore))
    return targets


# --------------------------------------------------------------------------------------------------------------------
# Validation


def _validate_inputs(instance, core, logits, class_lut, attribution, targets, generator):
    """Check shapes, dtypes and devices once at the boundary; return int64 ``instance``, ``core``, ``class_lut``."""
    for name, t in (("instance", instance), ("core", core), ("class_lut", class_lut)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer torch tensor of ids, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}; convert it with .long()")
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if instance.ndim != 3:
        raise ValueError(f"instance must be (B, H, W), got shape {tuple(instance.shape)}")
    if core.shape != instance.shape:
        raise ValueError(f"core must have the shape of instance {tuple(instance.shape)}, got {tuple(core.shape)}")
    b, h, w = instance.shape
    if logits.ndim != 4 or logits.shape[0] != b or logits.shape[2:] != (h, w) or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, K, H, W) = ({b}, K>=2, {h}, {w}), got {tuple(logits.shape)}")
    if class_lut.ndim != 1 or class_lut.numel() < 1:
        raise ValueError(f"class_lut must be a non-empty 1-D id -> class table, got shape {tuple(class_lut.shape)}")
    if (attribution is None) != (targets is None):
        raise ValueError("attribution and targets go together: pass both (targets = class ids of the attribution "
                         "channels) or neither")
    tensors = [("instance", instance), ("core", core), ("logits", logits), ("class_lut", class_lut)]
    if attribution is not None:
        if not isinstance(attribution, torch.Tensor) or not attribution.is_floating_point():
            raise TypeError("attribution must be a floating-point tensor (B, T, H, W)")
        if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.ndim != 1:
            raise TypeError("targets must be a 1-D integer tensor of class ids")
        if attribution.ndim != 4 or attribution.shape[0] != b or attribution.shape[2:] != (h, w) \
                or attribution.shape[1] != targets.numel() or targets.numel() < 1:
            raise ValueError(f"attribution must be (B, T, H, W) = ({b}, {targets.numel()}, {h}, {w}) with T = "
                             f"len(targets) >= 1, got {tuple(attribution.shape)}")
        tensors += [("attribution", attribution), ("targets", targets)]
    devices = {name: t.device for name, t in tensors}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}; move them with .to(device)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != instance.device.type:
            raise ValueError(f"generator is on {generator.device} but the tensors on {instance.device}; "
                             f"create it with torch.Generator(device={str(instance.device)!r})")
    return instance.long(), core.long(), class_lut.long()


# --------------------------------------------------------------------------------------------------------------------
# Rules


def _v1_step(instance, *, core, core_mask, class_lut, pred, confident, allowed, config, seed_dist=None):
    """One application of V1 (see :func:`update_labels`). All maps (B, H, W); returns (new instance, counters)."""
    k = config.expand_k
    cls = class_lut[instance]  # (B, H, W) class of the current owner
    ti, ti_pred = _nearest_label(instance, cls, pred, k, seed_dist)  # (B, H, W) each
    non_core = ~core_mask
    contradicted = (instance == 0) | (cls != pred)  # background, or the owner's type disagrees with the prediction
    if seed_dist is not None:  # ... or a cell of the predicted type has a strictly nearer nucleus
        contradicted |= (ti_pred > 0) & (ti_pred != instance) & (seed_dist(ti_pred) < seed_dist(instance))
    candidates = non_core & (ti_pred > 0) & (pred > 0) & confident & contradicted
    anchors = candidates if allowed is None else candidates & allowed
    cand_id = torch.where(anchors, ti_pred, 0)  # (B, H, W) candidate instance of each anchor
    valid = anchors & (_same_id_votes(cand_id) >= config.vote_min)
    near = _disc_dilate(valid, k)  # (B, H, W) within expand_k of a valid anchor
    confident_background = (pred == 0) & confident
    fill = near & (instance == 0) & non_core & (ti > 0) & ~confident_background
    new = torch.where(valid, ti_pred, torch.where(fill, ti, instance))
    new = torch.where(core_mask, core, new)
    return new, {"n_candidates": candidates.sum(), "n_blocked_by_attribution": (candidates & ~anchors).sum(),
                 "n_anchors": valid.sum()}


def _v1_nucleus_step(instance, *, core, core_mask, class_lut, prob, pred, confident, dominant, config, seed_dist):
    """V1 with nucleus territories (``--territory nucleus``); all maps (B, H, W). See :func:`update_labels`."""
    k = config.expand_k
    cls = class_lut[instance]
    near, near_typed = _nearest_label(instance, cls, pred, k, seed_dist)  # nearest nucleus: any type / predicted type
    smooth = _box_mean(prob)  # (B, K, H, W) 3x3-smoothed probabilities
    p_of = lambda ids: smooth.gather(1, class_lut[ids][:, None])[:, 0]  # noqa: E731 - prob. of each id's type
    foreground = _box_mean(1.0 - prob[:, 0]) > config.prediction_threshold
    override = (near_typed > 0) & (class_lut[near_typed] != class_lut[near]) & confident & \
        (p_of(near_typed) - p_of(near) > config.type_margin)
    cand = torch.where(override, near_typed, near)  # (B, H, W) the cell the evidence gives the pixel to
    candidates = ~core_mask & (cand > 0) & (cand != instance) & foreground
    anchors = candidates
    if dominant is not None:  # the dominant attributed type must be the candidate's type, where it is informative
        anchors = candidates & ((dominant < 0) | (dominant == class_lut[cand]))
    cand_id = torch.where(anchors, cand, 0)
    valid = anchors & (_same_id_votes(cand_id) >= config.vote_min)
    reach = _disc_dilate(valid, k)
    fill = reach & (instance == 0) & ~core_mask & (near > 0) & foreground
    new = torch.where(valid, cand, torch.where(fill, near, instance))
    new = torch.where(core_mask, core, new)
    return new, {"n_candidates": candidates.sum(), "n_blocked_by_attribution": (candidates & ~anchors).sum(),
                 "n_anchors": valid.sum()}


def _dominant_type(attribution: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class id of the target type with the largest attribution; -1 where all types tie (no information)."""
    best = attribution.argmax(dim=1)
    flat = attribution.amax(dim=1) == attribution.amin(dim=1)
    return torch.where(flat, torch.full_like(best, -1), targets[best])


def _v2_step(instance, *, core, core_mask, class_lut, pred, confident, attribution, target_index, config, generator):
    """One application of V2 (see :func:`update_labels`). All maps (B, H, W); returns (new instance, counters)."""
    k = config.expand_k
    ti = _balanced_dilate(instance, k, class_lut.numel(), generator)  # (B, H, W)
    ty = class_lut[ti]  # (B, H, W) class of the territory instance
    non_core = ~core_mask
    candidates = (pred == ty) & (ty > 0) & confident & non_core
    anchors = candidates
    if attribution is not None:
        channel = target_index[ty]  # (B, H, W) attribution channel of the territory's type, -1 = not a target
        score = attribution.float().gather(1, channel.clamp(min=0).unsqueeze(1)).squeeze(1)  # (B, H, W)
        anchors = _keep_top_ratio(candidates, score, channel >= 0, config.top_ratio)
    fill = _alternating_dilate(anchors, k) & (ty > 0) & non_core
    new = torch.where(anchors | fill, ti, instance)
    new = torch.where(core_mask, core, new)
    new = _keep_cored_pieces(new, core)
    new = _fill_holes(new)
    return new, {"n_candidates": candidates.sum(), "n_blocked_by_attribution": (candidates & ~anchors).sum(),
                 "n_anchors": anchors.sum()}


def _attribution_allows(attribution: torch.Tensor, targets: torch.Tensor, pred: torch.Tensor,
                        n_classes: int) -> torch.Tensor:
    """(B, H, W) bool: the attribution does not speak against class ``pred`` at the pixel (V1 step 3).

    attribution (B, T, H, W) float32; targets (T,) class ids; pred (B, H, W) class ids.
    """
    top, top_index = attribution.max(dim=1)  # (B, H, W) each
    dominant = targets[top_index]  # (B, H, W) class id of the most attributed target type
    informative = top > attribution.amin(dim=1)  # (B, H, W) not constant over types
    is_target = torch.zeros(n_classes, dtype=torch.bool, device=pred.device)
    is_target[targets] = True
    return ~is_target[pred] | ~informative | (dominant == pred)


def _keep_top_ratio(candidates: torch.Tensor, score: torch.Tensor, scorable: torch.Tensor,
                    ratio: float) -> torch.Tensor:
    """(B, H, W) bool: per sample, the ``ceil(ratio * n)`` best-scored scorable candidates (ties kept) + unscorable.

    candidates, scorable (B, H, W) bool; score (B, H, W) float32.
    """
    b = candidates.shape[0]
    ranked = candidates & scorable
    flat = torch.where(ranked, score, float("-inf")).flatten(1)  # (B, H*W)
    n = ranked.flatten(1).sum(dim=1)  # (B,)
    n_keep = torch.ceil(ratio * n.double() - 1e-9).long().clamp(min=1, max=flat.shape[1])  # (B,)
    ordered = flat.sort(dim=1, descending=True).values  # (B, H*W)
    threshold = ordered.gather(1, (n_keep - 1).unsqueeze(1)).view(b, 1, 1)  # (B, 1, 1) score of the last kept
    return candidates & (~scorable | (score >= threshold))


# --------------------------------------------------------------------------------------------------------------------
# Neighbourhood helpers (out[..., y, x] reads in[..., y + dy, x + dx]; outside the image reads the pad value)


@functools.lru_cache(maxsize=None)
def _disc_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Offsets (dy, dx) with dy² + dx² <= radius², sorted by (squared distance, dy, dx): the tie-break order."""
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
               if dy * dy + dx * dx <= radius * radius]
    return tuple(sorted(offsets, key=lambda o: (o[0] ** 2 + o[1] ** 2, o[0], o[1])))


def _pad(x: torch.Tensor, r: int, value: float | int | bool = 0) -> torch.Tensor:
    """(..., H, W) -> (..., H + 2r, W + 2r) with a border of ``value`` (any dtype, bool included)."""
    h, w = x.shape[-2:]
    out = x.new_full((*x.shape[:-2], h + 2 * r, w + 2 * r), value)
    out[..., r:r + h, r:r + w] = x
    return out


def _shift(padded: torch.Tensor, dy: int, dx: int, r: int) -> torch.Tensor:
    """View (..., H, W) of a tensor padded by ``r``: out[..., y, x] = original[..., y + dy, x + dx]."""
    h, w = padded.shape[-2] - 2 * r, padded.shape[-1] - 2 * r
    return padded[..., r + dy:r + dy + h, r + dx:r + dx + w]


def _box_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float -> (B, H, W): 3x3 mean over the pixels inside the image (border-correct)."""
    if x.ndim == 4:  # (B, K, H, W): every channel
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return F.avg_pool2d(x.unsqueeze(1), 3, stride=1, padding=1, count_include_pad=False).squeeze(1)


def _nearest_label(instance: torch.Tensor, cls: torch.Tensor, pred: torch.Tensor, radius: int,
                   seed_dist: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest labelled pixel within Euclidean ``radius``: any class, and of class ``pred`` (``pred > 0`` only).

    instance, cls, pred (B, H, W) int64 (cls = class of instance). Returns (TI, TI_pred), (B, H, W) int64 each,
    0 where none (TI_pred is 0 where ``pred == 0``). Offsets are visited in reverse :func:`_disc_offsets` order and
    every hit overwrites, so the last write is the nearest hit and, among equally near ones, the first in that order.
    With ``seed_dist`` (id map -> squared distance from each pixel to that id's nucleus), both pick, among the ids
    within ``radius``, the one whose nucleus is nearest (ties: the nearest hit, as above).
    """
    padded_id, padded_cls = _pad(instance, radius), _pad(cls, radius)
    wanted = torch.where(pred > 0, pred, -1)  # (B, H, W) -1 never matches: a class match implies a labelled pixel
    ti = torch.zeros_like(instance)
    ti_pred = torch.zeros_like(instance)
    if seed_dist is None:
        for dy, dx in reversed(_disc_offsets(radius)):
            other = _shift(padded_id, dy, dx, radius)  # (B, H, W) id at offset (dy, dx)
            ti = torch.where(other > 0, other, ti)
            ti_pred = torch.where(_shift(padded_cls, dy, dx, radius) == wanted, other, ti_pred)
        return ti, ti_pred
    inf = torch.full(instance.shape, float("inf"), device=instance.device)
    best, best_pred = inf, inf.clone()
    for dy, dx in _disc_offsets(radius):  # nearest first: on equal nucleus distance the nearer hit stays
        other = _shift(padded_id, dy, dx, radius)
        d = torch.where(other > 0, seed_dist(other), inf)  # (B, H, W) distance to that id's nucleus
        take = d < best
        ti, best = torch.where(take, other, ti), torch.where(take, d, best)
        take_pred = (_shift(padded_cls, dy, dx, radius) == wanted) & (d < best_pred)
        ti_pred, best_pred = torch.where(take_pred, other, ti_pred), torch.where(take_pred, d, best_pred)
    return ti, ti_pred


def _seed_distance(seeds: torch.Tensor, origin: torch.Tensor | None, shape: torch.Size,
                   device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """id map (B, H, W) -> (B, H, W) distance from each pixel to that id's nucleus (inf if unknown).

    The distance is the centroid distance minus the nucleus's equivalent radius: a larger nucleus claims
    proportionally more space, as in nucleus expansion (which measures from the nucleus boundary).
    """
    if origin is None or seeds.ndim != 2 or seeds.shape[1] != 3 or origin.shape != (shape[0], 2):
        raise ValueError(f"seeds must be (M, 3) and origin (B, 2) = ({shape[0]}, 2); got {tuple(seeds.shape)} and "
                         f"{None if origin is None else tuple(origin.shape)}")
    seeds = torch.nan_to_num(seeds.to(device=device, dtype=torch.float32), nan=float("inf"))
    b, h, w = shape
    ys = origin[:, 0, None, None].to(device, torch.float32) + torch.arange(h, device=device)[None, :, None] + 0.5
    xs = origin[:, 1, None, None].to(device, torch.float32) + torch.arange(w, device=device)[None, None, :] + 0.5

    def dist(ids: torch.Tensor) -> torch.Tensor:
        s = seeds[ids]  # (B, H, W, 3)
        return torch.sqrt((ys - s[..., 0]) ** 2 + (xs - s[..., 1]) ** 2) - torch.where(
            torch.isfinite(s[..., 2]), s[..., 2], torch.zeros_like(s[..., 2]))

    return dist


def _disc_dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, H, W) bool -> (B, H, W) bool: pixels within Euclidean ``radius`` of a True pixel."""
    padded = _pad(mask, radius, False)
    out = torch.zeros_like(mask)
    for dy, dx in _disc_offsets(radius):
        out |= _shift(padded, dy, dx, radius)
    return out


def _same_id_votes(cand_id: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64 -> (B, H, W) int64: pixels of the same non-zero id in each 3x3 neighbourhood (self included)."""
    padded = _pad(cand_id, 1)
    votes = torch.zeros_like(cand_id)
    for dy, dx in _SQUARE:
        votes += (_shift(padded, dy, dx, 1) == cand_id).long()
    return torch.where(cand_id > 0, votes, 0)


def _balanced_dilate(ids: torch.Tensor, n_iter: int, n_ids: int, generator: torch.Generator) -> torch.Tensor:
    """Grow ids into background for ``n_iter`` iterations, contests decided by fresh random ranks each iteration.

    ids (B, H, W) int64 with values < ``n_ids``. Iteration i uses a 3x3 window when i is even, a plus when odd;
    a background pixel takes the neighbour id of highest rank; labelled pixels never change.
    """
    device = ids.device
    for it in range(n_iter):
        perm = torch.randperm(max(n_ids - 1, 0), generator=generator, device=device) + 1  # ranks of ids 1..M-1
        rank_of = torch.cat([torch.zeros(1, dtype=torch.long, device=device), perm])  # (M,) id -> rank, 0 -> 0
        id_of = torch.empty_like(rank_of)
        id_of[rank_of] = torch.arange(n_ids, device=device)  # (M,) rank -> id
        padded = _pad(rank_of[ids], 1)  # (B, H+2, W+2) rank image
        best = torch.zeros_like(ids)
        for dy, dx in (_SQUARE if it % 2 == 0 else _PLUS):
            best = torch.maximum(best, _shift(padded, dy, dx, 1))
        ids = torch.where(ids > 0, ids, id_of[best])
    return ids


def _alternating_dilate(mask: torch.Tensor, n_iter: int) -> torch.Tensor:
    """(B, H, W) bool dilated ``n_iter`` times, by a 3x3 square on even iterations and a plus on odd ones."""
    for it in range(n_iter):
        padded = _pad(mask, 1, False)
        out = torch.zeros_like(mask)
        for dy, dx in (_SQUARE if it % 2 == 0 else _PLUS):
            out |= _shift(padded, dy, dx, 1)
        mask = out
    return mask


def _until_stable(step: Callable[[torch.Tensor], torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    """Apply a monotone propagation ``step`` until its result stops changing (checked every few steps)."""
    max_steps = state.shape[-1] * state.shape[-2] + _CHECK_EVERY  # a path never exceeds the pixel count
    for _ in range(0, max_steps, _CHECK_EVERY):
        before = state
        for _ in range(_CHECK_EVERY):
            state = step(state)
        if torch.equal(state, before):
            break
    return state


def _keep_cored_pieces(ids: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64: keep, for each id, the 8-connected pieces holding one of its core pixels; others -> 0."""
    labelled = ids > 0
    padded_id = _pad(ids, 1)
    same = [(_shift(padded_id, dy, dx, 1) == ids) & labelled for dy, dx in _EIGHT]  # 8 x (B, H, W) bool

    def step(keep: torch.Tensor) -> torch.Tensor:
        padded = _pad(keep, 1, False)
        out = keep.clone()
        for (dy, dx), s in zip(_EIGHT, same):
            out |= _shift(padded, dy, dx, 1) & s
        return out

    keep = _until_stable(step, (core > 0) & (ids == core))
    return torch.where(keep, ids, 0)


def _fill_holes(ids: torch.Tensor) -> torch.Tensor:
    """(B, H, W) int64: background holes whose 8-neighbour ring holds exactly one id take that id.

    A hole is a 4-connected background region not connected to the image border through background (the
    convention of ``scipy.ndimage.binary_fill_holes``).
    """
    background = ids == 0
    border = torch.zeros_like(background)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True

    def grow_outside(outside: torch.Tensor) -> torch.Tensor:
        padded = _pad(outside, 1, False)
        out = outside.clone()
        for dy, dx in _FOUR:
            out |= _shift(padded, dy, dx, 1)
        return out & background

    hole = background & ~_until_stable(grow_outside, background & border)  # (B, H, W)
    big = torch.iinfo(torch.long).max
    # Per hole pixel, the smallest and largest id among its 8 neighbours; then spread both through the hole.
    padded_id = _pad(ids, 1)
    lo = torch.full_like(ids, big)
    hi = torch.zeros_like(ids)
    for dy, dx in _EIGHT:
        other = _shift(padded_id, dy, dx, 1)
        lo = torch.minimum(lo, torch.where(other > 0, other, big))
        hi = torch.maximum(hi, other)
    lo_hi = torch.stack([torch.where(hole, lo, big), torch.where(hole, -hi, big)])  # (2, B, H, W), both minimised

    def spread(state: torch.Tensor) -> torch.Tensor:
        padded = _pad(state, 1, big)
        out = state
        for dy, dx in _FOUR:
            out = torch.minimum(out, _shift(padded, dy, dx, 1))
        return torch.where(hole, out, big)

    lo, neg_hi = _until_stable(spread, lo_hi)
    single = hole & (lo == -neg_hi)  # the ring touches exactly one id
    return torch.where(single, lo, ids)
