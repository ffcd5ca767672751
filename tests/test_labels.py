"""Label update rules V1 and V2 (segjointgene.methods.segjointgene.labels) on hand-made 12x12 cases, invariants and tie-breaking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from skimage.measure import label as cc_label
from skimage.segmentation import expand_labels

from segjointgene.config import LabelUpdateConfig
from segjointgene.errors import ConfigError
from segjointgene.methods.segjointgene.labels import (STAT_KEYS, LabelUpdateResult, _alternating_dilate, _balanced_dilate, _box_mean,
                                 _disc_offsets, _fill_holes, _keep_cored_pieces, _nearest_label, update_labels)

K = 3  # classes: 0 background, 1 and 2 cell types
# id -> class: ids 1, 5, 9 are type 1; ids 2, 7 are type 2; the rest unused (type 0)
LUT = torch.tensor([0, 1, 2, 0, 0, 1, 0, 2, 0, 1])


def grid(text: str) -> torch.Tensor:
    """An ASCII map -> (H, W) int64: '.' = 0, a digit = that id (rows are lines, spaces ignored)."""
    rows = [line.replace(" ", "") for line in text.strip().splitlines()]
    return torch.tensor([[0 if ch == "." else int(ch) for ch in row] for row in rows], dtype=torch.long)


def logits_for(pred: torch.Tensor | int, conf: float = 0.9, shape=(12, 12), k: int = K) -> torch.Tensor:
    """(1, K, H, W) logits whose softmax puts ``conf`` on ``pred`` and the rest evenly elsewhere."""
    pred = torch.full(shape, pred, dtype=torch.long) if isinstance(pred, int) else pred
    p = torch.full((k, *pred.shape), (1.0 - conf) / (k - 1))
    p.scatter_(0, pred.unsqueeze(0), conf)
    return p.log().unsqueeze(0)


def run(instance, core, pred, *, conf=0.9, **kw) -> LabelUpdateResult:
    attribution, targets = kw.pop("attribution", None), kw.pop("targets", None)
    generator = kw.pop("generator", None)
    cfg = LabelUpdateConfig(**{"rule": "v1", "expand_k": 1, "prediction_threshold": 0.5, "vote_min": 3, "territory": "mask", **kw})
    return update_labels(instance[None], core[None], logits_for(pred, conf, tuple(instance.shape)), LUT, config=cfg,
                         attribution=attribution, targets=targets, generator=generator)


# A 3x3 nucleus of cell 1 (type 1) in rows 4-6, cols 4-6.
CORE_A = grid("""
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . 1 1 1 . . . . .
. . . . 1 1 1 . . . . .
. . . . 1 1 1 . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
""")
# expand_k = 1: the 12 pixels at distance 1 are candidates; each has >= 3 candidates in its 3x3 window.
GROWN_A = grid("""
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . 1 1 1 . . . . .
. . . 1 1 1 1 1 . . . .
. . . 1 1 1 1 1 . . . .
. . . 1 1 1 1 1 . . . .
. . . . 1 1 1 . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
. . . . . . . . . . . .
""")


# --------------------------------------------------------------------------------------------------------------------
# V1 hand-made cases


def test_v1_grows_into_agreeing_confident_noncore_pixels():
    res = run(CORE_A, CORE_A, 1)
    assert torch.equal(res.instance[0], GROWN_A)
    assert res.instance.dtype == torch.long
    assert set(res.stats) == set(STAT_KEYS)
    assert {k: int(v) for k, v in res.stats.items()} == {
        "n_candidates": 12, "n_blocked_by_attribution": 0, "n_anchors": 12, "n_grown": 12, "n_reassigned": 0,
        "n_removed": 0}
    assert all(v.ndim == 0 and v.dtype == torch.long for v in res.stats.values())


@pytest.mark.parametrize("case, pred, conf", [
    ("prediction disagrees", 2, 0.9),  # type 2 predicted: no type-2 cell within reach
    ("prediction is background", 0, 0.9),
    ("confidence too low", 1, 0.45),  # 0.45 < threshold 0.5
])
def test_v1_no_growth_without_confident_agreement(case, pred, conf):
    res = run(CORE_A, CORE_A, pred, conf=conf)
    assert torch.equal(res.instance[0], CORE_A), case
    assert int(res.stats["n_anchors"]) == 0


def test_v1_threshold_is_strict_and_compares_smoothed_confidence():
    assert int(run(CORE_A, CORE_A, 1, prediction_threshold=0.91).stats["n_anchors"]) == 0
    assert int(run(CORE_A, CORE_A, 1, prediction_threshold=0.89).stats["n_anchors"]) == 12


def test_v1_votes():
    # type 1 predicted at (3, 5) only, type 2 elsewhere: a single candidate
    pred = torch.full((12, 12), 2)
    pred[3, 5] = 1
    res = run(CORE_A, CORE_A, pred)
    assert torch.equal(res.instance[0], CORE_A)  # 1 vote < 3
    assert int(res.stats["n_candidates"]) == 1 and int(res.stats["n_anchors"]) == 0
    # with vote_min 1 the anchor is valid; the bridge fills its background neighbours that have a territory:
    # (3, 4) and (3, 6) (distance 1 from the core) although type 2 is predicted there; (2, 5) has no territory.
    res = run(CORE_A, CORE_A, pred, vote_min=1)
    want = CORE_A.clone()
    want[3, 4:7] = 1
    assert torch.equal(res.instance[0], want)
    # a confident background prediction is a growth limit for the bridge
    pred[3, 4] = 0
    res = run(CORE_A, CORE_A, pred, vote_min=1)
    want[3, 4] = 0
    assert torch.equal(res.instance[0], want)


def test_v1_nothing_changes_where_the_prediction_is_not_confident():
    conf_map = torch.full((12, 12), 0.9)
    conf_map[:, 7:] = 0.35  # 3x3 means: column 7 (3 * 0.9 + 6 * 0.35) / 9 = 0.53 < 0.55, column 6 0.72
    logits = (logits_for(1, 0.9) * (conf_map > 0.5) + logits_for(1, 0.35) * (conf_map <= 0.5))
    cfg = LabelUpdateConfig(rule="v1", territory="mask", expand_k=1, prediction_threshold=0.55, vote_min=3)
    res = update_labels(CORE_A[None], CORE_A[None], logits, LUT, config=cfg)
    want = GROWN_A.clone()
    want[4:7, 7] = 0
    assert torch.equal(res.instance[0], want)


def _attribution(dominant_index: torch.Tensor | int, t: int = 2) -> torch.Tensor:
    """(1, T, 12, 12): score 1 on channel ``dominant_index`` at each pixel, 0 elsewhere."""
    idx = torch.full((12, 12), dominant_index) if isinstance(dominant_index, int) else dominant_index
    return torch.nn.functional.one_hot(idx, t).permute(2, 0, 1).float().unsqueeze(0)


@pytest.mark.parametrize("targets, dominant, blocked", [
    ([1, 2], 0, 0),  # dominant type 1 = the candidate's type: grows
    ([1, 2], 1, 12),  # dominant type 2: every candidate blocked
    ([2, 1], 0, 12),  # same channels, other order: channel 0 is type 2 now
    ([2, 1], 1, 0),
    ([2], 0, 0),  # the candidate's type is not a target: no evidence against it
])
def test_v1_dominant_attributed_type(targets, dominant, blocked):
    att = _attribution(dominant, len(targets))
    res = run(CORE_A, CORE_A, 1, attribution=att, targets=torch.tensor(targets))
    assert int(res.stats["n_blocked_by_attribution"]) == blocked
    assert torch.equal(res.instance[0], CORE_A if blocked else GROWN_A)


def test_v1_constant_attribution_blocks_nothing():
    att = torch.zeros(1, 2, 12, 12)  # e.g. a failed attribution: no evidence for or against any type
    res = run(CORE_A, CORE_A, 1, attribution=att, targets=torch.tensor([2, 1]))
    assert torch.equal(res.instance[0], GROWN_A)
    assert int(res.stats["n_blocked_by_attribution"]) == 0


def test_v1_attribution_blocks_locally():
    # type 2 dominant only in row 3: the 3 candidates there are blocked and row 3 stays background;
    # (4, 3) and (4, 7) then have 2 votes only but are filled by the bridge from (5, 3) / (5, 7)
    idx = torch.zeros(12, 12, dtype=torch.long)
    idx[3] = 1
    res = run(CORE_A, CORE_A, 1, attribution=_attribution(idx), targets=torch.tensor([1, 2]))
    want = GROWN_A.clone()
    want[3] = 0
    assert torch.equal(res.instance[0], want)
    assert int(res.stats["n_blocked_by_attribution"]) == 3
    assert int(res.stats["n_anchors"]) == 9 - 2


def test_v1_core_untouched():
    # cell 2 (type 2) is confidently predicted as type 1 over its whole nucleus, next to type-1 cell 1
    core = grid("""
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . 1 1 2 2 . . . . .
    . . . 1 1 2 2 . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    """)
    res = run(core, core, 1, expand_k=3, vote_min=1)
    out = res.instance[0]
    assert torch.equal(out[core > 0], core[core > 0])
    assert (out == 1).sum() > (core == 1).sum()  # cell 1 did grow


@pytest.mark.parametrize("k", [1, 2, 3])
def test_v1_expand_k_respected(k):
    core = torch.zeros(12, 12, dtype=torch.long)
    core[5, 5] = 1
    res = run(core, core, 1, expand_k=k, vote_min=1)
    yy, xx = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    dist2 = (yy - 5) ** 2 + (xx - 5) ** 2
    assert torch.equal(res.instance[0], torch.where(dist2 <= k * k, 1, 0))  # the Euclidean disc of radius k
    assert res.instance[0, 5, 5 + k + 1] == 0 and res.instance[0, 5, 5 + k] == 1


def test_v1_expand_k_2_with_votes_by_hand():
    core = torch.zeros(12, 12, dtype=torch.long)
    core[5, 5] = 1
    res = run(core, core, 1, expand_k=2, vote_min=3)
    assert torch.equal(res.instance[0], grid("""
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . 1 . . . . . .
    . . . . 1 1 1 . . . . .
    . . . 1 1 1 1 1 . . . .
    . . . . 1 1 1 . . . . .
    . . . . . 1 . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    """))


@pytest.mark.parametrize("left, right", [(1, 9), (9, 1), (5, 9), (9, 5)])
def test_v1_fair_territory_not_biased_to_larger_id(left, right):
    # two type-1 nuclei at (5, 3) and (5, 7); (5, 5) is 2 px from both. Ties go by offset order (left before
    # right at equal distance) whatever the ids; max-pooling would give it to the larger id both ways.
    core = torch.zeros(12, 12, dtype=torch.long)
    core[5, 3], core[5, 7] = left, right
    out = run(core, core, 1, expand_k=2).instance[0]
    assert out[5, 5] == left
    # everything else is mirror-symmetric about column 5 (with the two ids swapped)
    mirrored = torch.flip(out, dims=[1])[:, 1:]  # column c holds out[:, 10 - c], c = 0..10
    swap = torch.where(mirrored == left, right, torch.where(mirrored == right, left, mirrored))
    mask = torch.ones(12, 11, dtype=torch.bool)
    mask[5, 5] = False
    assert torch.equal(out[:, :11][mask], swap[mask])


def _ownership_grid():
    """Cell 1 (type 1): nucleus cols 1-2 and owned non-core pixels cols 3-4; cell 2 (type 2): nucleus col 6."""
    core = torch.zeros(12, 12, dtype=torch.long)
    core[3:9, 1:3] = 1
    core[3:9, 6] = 2
    inst = core.clone()
    inst[3:9, 3:5] = 1
    return inst, core


def test_v1_owned_pixel_stays_when_prediction_agrees_with_owner():
    inst, core = _ownership_grid()
    pred = torch.ones(12, 12, dtype=torch.long)
    pred[:, 5:] = 2  # type 1 predicted over cell 1's owned pixels: they stay whatever else is near
    for k in (1, 2):
        res = run(inst, core, pred, expand_k=k)
        assert torch.equal(res.instance[0, 3:9, 3:5], inst[3:9, 3:5]), k
        assert int(res.stats["n_reassigned"]) == 0
        assert (res.instance[0, 3:9, 5] == 2).all()  # the gap joins cell 2, whose type is predicted there


def test_v1_converged_cell_is_not_an_anchor_and_does_not_bridge():
    # the cell already owns every pixel where its type is predicted; type 2 (no such cell) is predicted around it.
    # Its owned pixels agree with their owner, so they are no evidence for a change: no anchors, no bridge fill
    # into the disagreeing ring (if they counted as anchors, the bridge would grow the cell by expand_k each time).
    pred = torch.where(GROWN_A > 0, 1, 2)
    res = run(GROWN_A, CORE_A, pred)
    assert torch.equal(res.instance[0], GROWN_A)
    assert int(res.stats["n_candidates"]) == 0 and int(res.stats["n_anchors"]) == 0


def test_v1_owned_pixel_changes_owner_only_on_contrary_evidence_within_reach():
    inst, core = _ownership_grid()
    pred = torch.ones(12, 12, dtype=torch.long)
    pred[:, 4:] = 2  # column 4 (owned by type-1 cell 1) is predicted type 2
    res = run(inst, core, pred, expand_k=1)  # cell 2 is 2 px away: out of reach
    assert torch.equal(res.instance[0, 3:9, 4], inst[3:9, 4])
    assert int(res.stats["n_reassigned"]) == 0
    res = run(inst, core, pred, expand_k=2)  # within reach: the 6 pixels move to cell 2
    assert (res.instance[0, 3:9, 4] == 2).all()
    assert (res.instance[0, 3:9, 3] == 1).all()  # type 1 predicted: kept
    assert int(res.stats["n_reassigned"]) == 6


def test_box_mean_is_border_correct():
    x = torch.ones(2, 5, 7)
    assert torch.allclose(_box_mean(x), x)
    x = torch.zeros(1, 3, 3)
    x[0, 0, 0] = 4.0
    assert _box_mean(x)[0, 0, 0] == 1.0  # 4 / 4 pixels inside the image at a corner (zero padding: 4 / 9)
    assert _box_mean(x)[0, 1, 1] == pytest.approx(4 / 9)


def test_disc_offsets_order():
    offs = _disc_offsets(2)
    assert len(offs) == 13 and offs[0] == (0, 0)
    assert offs[1:5] == ((-1, 0), (0, -1), (0, 1), (1, 0))
    assert offs[9:] == ((-2, 0), (0, -2), (0, 2), (2, 0))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_nearest_label_matches_skimage_expand_labels_without_ties(seed, radius):
    rng = np.random.default_rng(seed)
    labels = np.zeros((40, 40), np.int64)
    ys, xs = rng.integers(0, 40, 12), rng.integers(0, 40, 12)
    labels[ys, xs] = rng.permutation(np.arange(1, 13))
    ref = expand_labels(labels, radius)
    # pixels where two different ids are equally near are ties: leave them out of the comparison
    d = np.stack([ndi.distance_transform_edt(labels != i) for i in range(1, 13)])  # (12, H, W)
    tied = ((d == d.min(0)).sum(0) > 1) & (d.min(0) <= radius)
    inst = torch.from_numpy(labels)[None]
    cls = torch.zeros_like(inst)
    ti, ti_pred = _nearest_label(inst, cls, torch.zeros_like(inst), radius)
    assert np.array_equal(ti[0].numpy()[~tied], ref[~tied])
    # TI_pred restricted to a class: ids 1..6 are class 1, 7..12 class 2; predict class 2 everywhere
    cls = torch.where(inst > 6, 2, torch.where(inst > 0, 1, 0))
    ref2 = expand_labels(np.where(labels > 6, labels, 0), radius)
    d2 = d[6:]
    tied2 = ((d2 == d2.min(0)).sum(0) > 1) & (d2.min(0) <= radius)
    _, ti_pred = _nearest_label(inst, cls, torch.full_like(inst, 2), radius)
    assert np.array_equal(ti_pred[0].numpy()[~tied2], ref2[~tied2])


# --------------------------------------------------------------------------------------------------------------------
# V2


def test_v2_island_removal():
    core = grid("""
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . 1 1 . . . . . .
    . . . . 1 1 . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    """)
    inst = grid("""
    . . . . . . . . . . 1 1
    . . . . . . . . . . 1 .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . 1 1 . . . . . .
    . . . . 1 1 1 . . . . .
    . . . . . . . 1 . . . .
    . . . . . . . . 1 . . .
    . . . . . . . . . . . .
    . . 1 . . . . 5 5 . . .
    . . . . . . . 5 5 . . .
    . . . . . . . . . . . .
    """)
    # no confident prediction: only the clean-up acts. The diagonal chain (5,6)-(6,7)-(7,8) is 8-connected to
    # the nucleus and stays; the corner piece, the lone (9, 2) and cell 5 (no nucleus in the patch) are removed.
    res = run(inst, core, 1, conf=0.4, rule="v2", generator=torch.Generator().manual_seed(0))
    want = inst.clone()
    want[0:2, 10:] = 0
    want[9, 2] = 0
    want[9:11, 7:9] = 0
    assert torch.equal(res.instance[0], want)
    assert int(res.stats["n_removed"]) == 3 + 1 + 4


def test_v2_hole_fill():
    core = grid("""
    . . . . . . . . . . . .
    . 1 . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . 2 . . .
    . . . . . . . . . 7 . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    . . . . . . . . . . . .
    """)
    inst = grid("""
    1 1 1 1 1 . . . . . . .
    1 1 . . 1 . . . . . . .
    1 . . . 1 . . . . . . .
    1 1 1 1 1 . . 2 2 2 2 .
    . . . . . . . 2 2 . 2 .
    . . . . . . . 7 7 7 7 .
    . . . . . . . . 7 . . .
    . . . . . . . . 7 7 7 7
    . . . . . . . . 7 . . .
    . . . . . . . . 7 . . .
    . . . . . . . . 7 . . .
    . . . . . . . . 7 . . .
    """)
    # the 5-pixel hole in cell 1 is enclosed by cell 1 only -> filled; the hole at (4, 9) touches 2 and 7 -> kept;
    # the background right of column 8 below row 7 is enclosed by cell 7 but reaches the border -> not a hole.
    res = run(inst, core, 1, conf=0.4, rule="v2", generator=torch.Generator().manual_seed(0))
    want = inst.clone()
    want[1, 2:4] = 1
    want[2, 1:4] = 1
    assert torch.equal(res.instance[0], want)
    assert int(res.stats["n_grown"]) == 5
    assert LUT[res.instance[0, 2, 2]] == 1  # filled holes get their cell's class (defect 16)


def test_fill_holes_diagonal_leak_is_not_a_hole():
    ids = grid("""
    . . . . .
    . 1 1 . .
    . 1 . 1 .
    . . 1 1 .
    . . . . .
    """)[None]
    assert _fill_holes(ids)[0, 2, 2] == 1  # background is 4-connected: (2, 2) is enclosed
    ids = grid("""
    . . . . .
    . 1 1 1 .
    . 1 . 1 .
    . . . 1 .
    . . . . .
    """)[None]
    assert _fill_holes(ids)[0, 2, 2] == 0  # (2, 2) reaches (3, 1) and the border


def test_keep_cored_pieces_uses_each_ids_own_core():
    ids = grid("""
    1 1 . 2
    . . . 2
    2 2 . .
    """)[None]
    core = grid("""
    1 . . .
    . . . .
    . 2 . .
    """)[None]
    out = _keep_cored_pieces(ids, core)[0]
    assert torch.equal(out, grid("""
    1 1 . .
    . . . .
    2 2 . .
    """))


def _v2_single_core(top_ratio, targets, scores):
    core = torch.zeros(12, 12, dtype=torch.long)
    core[5, 5] = 1
    att = torch.zeros(1, 1, 12, 12)
    att[0, 0, 4:7, 4:7] = scores
    return run(core, core, 1, rule="v2", top_ratio=top_ratio, attribution=att, targets=torch.tensor(targets),
               generator=torch.Generator().manual_seed(0))


# scores of the 3x3 ring around the nucleus (5, 5); (4, 4) is the most attributed
RING_SCORES = torch.tensor([[9.0, 2.0, 3.0], [4.0, 0.0, 5.0], [6.0, 7.0, 8.0]])


def test_v2_top_ratio_keeps_most_attributed_anchors():
    # expand_k 1: one 3x3 balanced-dilation step gives cell 1 the 8 ring pixels, all anchors (type 1 predicted).
    # top_ratio 1/8 keeps 1 anchor, (4, 4); the gap fill (3x3 around it, inside the territory) adds (4, 5), (5, 4).
    res = _v2_single_core(0.125, [1], RING_SCORES)
    want = torch.zeros(12, 12, dtype=torch.long)
    want[5, 5] = want[4, 4] = want[4, 5] = want[5, 4] = 1
    assert torch.equal(res.instance[0], want)
    assert int(res.stats["n_candidates"]) == 8
    assert int(res.stats["n_anchors"]) == 1 and int(res.stats["n_blocked_by_attribution"]) == 7
    # top 2 of 8 (ratio 0.25): (4, 4) and (6, 6): the fills of both
    res = _v2_single_core(0.25, [1], RING_SCORES)
    want[6, 6] = want[6, 5] = want[5, 6] = 1
    assert torch.equal(res.instance[0], want)


@pytest.mark.parametrize("top_ratio, targets, scores", [
    (1.0, [1], RING_SCORES),  # keep everything
    (0.125, [2], RING_SCORES),  # the territory's type 1 is not a target: anchors kept
    (0.125, [1], torch.zeros(3, 3)),  # all-zero scores: all tied, all kept
])
def test_v2_top_ratio_keeps_all(top_ratio, targets, scores):
    res = _v2_single_core(top_ratio, targets, scores)
    want = torch.zeros(12, 12, dtype=torch.long)
    want[4:7, 4:7] = 1
    assert torch.equal(res.instance[0], want)
    assert int(res.stats["n_blocked_by_attribution"]) == 0


def test_v2_grows_and_repeats():
    core = torch.zeros(12, 12, dtype=torch.long)
    core[5, 5] = 1
    gen = torch.Generator().manual_seed(0)
    res = run(core, core, 1, rule="v2", expand_k=2, generator=gen)
    # 2 iterations: 3x3 then plus -> the 5x5 square minus its corners
    want = torch.zeros(12, 12, dtype=torch.long)
    want[3:8, 3:8] = 1
    want[3, 3] = want[3, 7] = want[7, 3] = want[7, 7] = 0
    assert torch.equal(res.instance[0], want)
    res = run(core, core, 1, rule="v2", expand_k=1, repeats=2, generator=gen)
    want = torch.zeros(12, 12, dtype=torch.long)
    want[3:8, 3:8] = 1  # 3x3 twice (each application starts at iteration 0)
    assert torch.equal(res.instance[0], want)


def test_v2_deterministic_for_a_fixed_seed_and_ranks_are_random():
    core = torch.zeros(1, 12, 12, dtype=torch.long)
    core[0, 5, 3], core[0, 5, 7] = 1, 9
    outs = [_balanced_dilate(core, 2, 10, torch.Generator().manual_seed(s))[0, 5, 5].item() for s in range(20)]
    assert set(outs) == {1, 9}  # the contested pixel goes either way
    logits = torch.randn(2, K, 12, 12, generator=torch.Generator().manual_seed(1)) * 3
    inst = torch.zeros(2, 12, 12, dtype=torch.long)
    inst[:, 5, 3], inst[:, 5, 7], inst[1, 9, 9] = 1, 9, 2
    cfg = LabelUpdateConfig(territory="mask", rule="v2", expand_k=3, prediction_threshold=0.4)
    a, b = (update_labels(inst, inst, logits, LUT, config=cfg, generator=torch.Generator().manual_seed(5))
            for _ in range(2))
    assert torch.equal(a.instance, b.instance)
    assert all(torch.equal(a.stats[key], b.stats[key]) for key in STAT_KEYS)


def test_balanced_dilate_keeps_existing_ids_and_alternates_windows():
    ids = torch.zeros(1, 9, 9, dtype=torch.long)
    ids[0, 4, 4] = 3
    out = _balanced_dilate(ids, 3, 4, torch.Generator().manual_seed(0))
    # square, plus, square: Chebyshev radius 3 minus what the plus step cannot reach (|dy| + |dx| > 5)
    yy, xx = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    dy, dx = (yy - 4).abs(), (xx - 4).abs()
    assert torch.equal(out[0] > 0, (torch.maximum(dy, dx) <= 3) & (dy + dx <= 5))
    assert torch.equal(_alternating_dilate(ids > 0, 3), out > 0)


# --------------------------------------------------------------------------------------------------------------------
# Randomized invariants


def _random_batch(seed: int, b: int = 3, h: int = 24, w: int = 28, n_ids: int = 12):
    rng = np.random.default_rng(seed)
    core = np.zeros((b, h, w), np.int64)
    for i in range(b):
        for cid in rng.choice(np.arange(1, n_ids), size=5, replace=False):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            core[i, y:y + rng.integers(1, 3), x:x + rng.integers(1, 3)] = cid
    inst = np.stack([expand_labels(c, int(rng.integers(0, 4))) for c in core])
    inst[(core == 0) & (rng.random(inst.shape) < 0.2)] = 0  # ragged borders and stray holes
    lut = torch.from_numpy(rng.integers(1, K, n_ids))
    lut[0] = 0
    logits = torch.from_numpy(rng.normal(size=(b, K, h, w)) * 3).float()
    att = torch.from_numpy(rng.random((b, 2, h, w))).float()
    return torch.from_numpy(inst), torch.from_numpy(core), logits, lut, att


def _within(instance: np.ndarray, new: np.ndarray, radius: float) -> bool:
    """Every changed pixel took the id of an instance that had a pixel within ``radius`` (Euclidean) of it."""
    changed = new != instance
    for cid in np.unique(new[changed]):
        dist = ndi.distance_transform_edt(instance != cid)
        if (dist[changed & (new == cid)] > radius + 1e-9).any():
            return False
    return True


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_attr", [False, True])
def test_v1_invariants_random(seed, k, with_attr):
    inst, core, logits, lut, att = _random_batch(seed)
    cfg = LabelUpdateConfig(rule="v1", territory="mask", expand_k=k, prediction_threshold=0.6, vote_min=2)
    kw = {"attribution": att, "targets": torch.tensor([2, 1])} if with_attr else {}
    res = update_labels(inst, core, logits, lut, config=cfg, **kw)
    new = res.instance
    assert torch.equal(new[core > 0], core[core > 0])  # core unchanged
    assert not ((inst > 0) & (new == 0)).any()  # V1 never removes
    prob = torch.softmax(logits, 1)
    conf, pred = prob.max(1)
    confident_cell = (_box_mean(conf) > 0.6) & (pred > 0) & (core == 0)
    changed = new != inst
    for i in range(inst.shape[0]):
        assert _within(inst[i].numpy(), new[i].numpy(), k)
        # nothing changes without a confident, non-background prediction within expand_k
        near = ndi.distance_transform_edt(~confident_cell[i].numpy()) <= k
        assert not (changed[i].numpy() & ~near).any()
    assert int(res.stats["n_grown"] + res.stats["n_reassigned"]) == int(changed.sum())
    if not with_attr:
        assert int(res.stats["n_blocked_by_attribution"]) == 0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_v2_invariants_random(seed, k):
    inst, core, logits, lut, att = _random_batch(seed)
    cfg = LabelUpdateConfig(territory="mask", rule="v2", expand_k=k, prediction_threshold=0.6, top_ratio=0.5)
    res = update_labels(inst, core, logits, lut, config=cfg, attribution=att, targets=torch.tensor([1, 2]),
                        generator=torch.Generator().manual_seed(seed))
    new = res.instance
    assert torch.equal(new[core > 0], core[core > 0])
    changed = new != inst
    assert not (changed & (inst > 0) & (new > 0)).any()  # owned pixels are never given to another cell
    for i in range(inst.shape[0]):
        n, c = new[i].numpy(), core[i].numpy()
        assert set(np.unique(n)) <= set(np.unique(inst[i].numpy())) | {0}
        for cid in np.unique(n[n > 0]):  # every piece of every cell holds one of its core pixels
            pieces = cc_label(n == cid, connectivity=2)
            cored = np.unique(pieces[(c == cid) & (n == cid)])
            assert set(np.unique(pieces[pieces > 0])) <= set(cored)
        # growth stays within the octagon of k steps (Euclidean <= k * sqrt(2)), except in holes enclosed by the cell
        grown = changed[i].numpy() & (n > 0)
        for cid in np.unique(n[grown]):
            far = grown & (n == cid) & (ndi.distance_transform_edt(inst[i].numpy() != cid) > k * math.sqrt(2))
            assert not (far & ~ndi.binary_fill_holes((n == cid) & ~far)).any()


# --------------------------------------------------------------------------------------------------------------------
# Boundary checks, config, CUDA


def test_validation_errors():
    inst = CORE_A[None]
    logits = logits_for(1)
    with pytest.raises(TypeError, match="instance"):
        update_labels(inst.float(), inst, logits, LUT)
    with pytest.raises(ValueError, match="core"):
        update_labels(inst, inst[:, :5], logits, LUT)
    with pytest.raises(ValueError, match="logits"):
        update_labels(inst, inst, logits[:, :, :5], LUT)
    with pytest.raises(ValueError, match="together"):
        update_labels(inst, inst, logits, LUT, attribution=torch.zeros(1, 2, 12, 12))
    with pytest.raises(ValueError, match="attribution"):
        update_labels(inst, inst, logits, LUT, attribution=torch.zeros(1, 3, 12, 12), targets=torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="label_update_repeats"):
        LabelUpdateConfig(rule="v1", repeats=0)


def test_int32_inputs_and_half_logits_are_accepted():
    res = update_labels(CORE_A[None].int(), CORE_A[None].int(), logits_for(1).half(), LUT,
                        config=LabelUpdateConfig(rule="v1", territory="mask", expand_k=1))
    assert res.instance.dtype == torch.long
    assert torch.equal(res.instance[0], GROWN_A)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", ["v1", "v2"])
def test_cuda_matches_cpu(rule):
    inst, core, logits, lut, att = _random_batch(0)
    cfg = LabelUpdateConfig(territory="mask", rule=rule, expand_k=2, prediction_threshold=0.6, vote_min=2, top_ratio=0.5)
    targets = torch.tensor([1, 2])
    dev = torch.device("cuda")
    cpu = update_labels(inst, core, logits, lut, config=cfg, attribution=att, targets=targets,
                        generator=torch.Generator().manual_seed(0))
    gpu = update_labels(inst.to(dev), core.to(dev), logits.to(dev), lut.to(dev), config=cfg,
                        attribution=att.to(dev), targets=targets.to(dev),
                        generator=torch.Generator(device=dev).manual_seed(0))
    assert gpu.instance.device.type == "cuda"
    assert all(v.device.type == "cuda" for v in gpu.stats.values())
    assert torch.equal(gpu.instance[core.to(dev) > 0], core.to(dev)[core.to(dev) > 0])
    if rule == "v1":  # no randomness: identical results
        assert torch.equal(gpu.instance.cpu(), cpu.instance)


# ---------------------------------------------------------------------------------------------------------------------
# V1 with nucleus territories (--territory nucleus) and the training targets

def _nucleus_run(instance, core, pred, seeds, *, conf=0.95, logits=None, **kw):
    cfg = LabelUpdateConfig(**{"rule": "v1", "expand_k": 3, "prediction_threshold": 0.5, "vote_min": 1, "territory": "nucleus",
                               "type_margin": 0.3, **kw})
    logits = logits if logits is not None else logits_for(pred, conf, tuple(instance.shape))
    return update_labels(instance[None], core[None], logits, LUT, config=cfg, seeds=seeds,
                         origin=torch.zeros(1, 2, dtype=torch.long))


def _seeds(**cells) -> torch.Tensor:
    """(10, 3) seeds table: id -> (y, x, r) in pixel-centre coordinates; NaN elsewhere."""
    seeds = torch.full((10, 3), float("nan"))
    for cid, (y, x, r) in cells.items():
        seeds[int(cid.lstrip("c"))] = torch.tensor([y + 0.5, x + 0.5, r])
    return seeds


def test_nucleus_territory_uses_distance_to_the_nucleus_boundary():
    # two type-1 cells in one row: cell 1's nucleus (radius 2) centred at x=2, cell 5's (radius 0) at x=10
    core = torch.zeros(1, 13, dtype=torch.long)
    core[0, 1:4] = 1
    core[0, 10] = 5
    seeds = _seeds(c1=(0, 2, 2.0), c5=(0, 10, 0.0))
    out = core.clone()
    for _ in range(4):  # grow to convergence
        out = _nucleus_run(out, core, 1, seeds).instance[0]
    # distance minus radius: x=6 -> cell 1: 4-2=2, cell 5: 4-0=4 -> cell 1; x=7 -> 3 vs 3: the nearer hit (cell 5 via
    # its grown pixel at x=8) keeps it; x=8 -> 4 vs 2 -> cell 5
    assert out[0, :7].tolist() == [1] * 7
    assert out[0, 8:].tolist() == [5] * 5
    # plain centroid distance would have split at the midpoint (x=6) instead: the larger nucleus claims more


def test_nucleus_territory_type_override_needs_the_margin():
    # cell 1 (type 1) left, cell 2 (type 2) right; the pixels between are nearer cell 1's nucleus
    core = torch.zeros(1, 9, dtype=torch.long)
    core[0, 0:2] = 1
    core[0, 8] = 2
    seeds = _seeds(c1=(0, 0.5, 1.0), c2=(0, 8, 0.5))
    inst = core.clone()
    inst[0, 2:4] = 1
    inst[0, 6:8] = 2

    def probs(p_type2: float) -> torch.Tensor:  # background 0.02, the rest split between types 1 and 2
        p = torch.zeros(1, K, 1, 9)
        p[0, 0], p[0, 2] = 0.02, p_type2
        p[0, 1] = 0.98 - p_type2
        return p.log()

    weak = _nucleus_run(inst, core, None, seeds, logits=probs(0.6)).instance[0]  # margin 0.6 - 0.38 = 0.22 < 0.3
    strong = _nucleus_run(inst, core, None, seeds, logits=probs(0.9)).instance[0]  # margin 0.82 > 0.3
    assert weak[0, 4].item() == 1  # geometry: nearer cell 1
    assert strong[0, 4].item() == 2 and strong[0, 5].item() == 2  # expression clearly says type 2
    assert torch.equal(strong[core > 0], core[core > 0])


def test_nucleus_territory_stops_where_background_is_predicted():
    core = torch.zeros(1, 12, dtype=torch.long)
    core[0, 0:2] = 1
    pred = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]])
    seeds = _seeds(c1=(0, 0.5, 1.0))
    out = core.clone()
    for _ in range(4):
        out = _nucleus_run(out, core, pred, seeds).instance[0]
    assert (out[0, :3] == 1).all() and (out[0, 5:] == 0).all()


def test_nucleus_territory_needs_seeds():
    with pytest.raises(ValueError, match="seeds"):
        update_labels(CORE_A[None], CORE_A[None], logits_for(1), LUT,
                      config=LabelUpdateConfig(rule="v1", territory="nucleus"))


def test_training_targets_nuclei_mode_keeps_only_certain_labels():
    from segjointgene.methods.segjointgene.labels import IGNORE, training_targets

    labels = torch.tensor([[[0, 0, 1, 1, 1, 0, 0, 0, 0]]])  # a cell grown from its nucleus at x=3
    nuclei = torch.tensor([[[0, 0, 0, 1, 0, 0, 0, 0, 0]]])
    out = training_targets(labels, nuclei, margin=2, mode="nuclei")[0, 0].tolist()
    # within 2 px of the grown cell (x=0..6): uncertain; the grown pixels x=2, x=4: not certain either
    assert out == [IGNORE, IGNORE, IGNORE, 1, IGNORE, IGNORE, IGNORE, 0, 0]
    current = training_targets(labels, nuclei, margin=0, mode="current")
    assert torch.equal(current, labels)
