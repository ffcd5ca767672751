"""Metrics on hand-made masks with known answers, and the sparse IoU matcher against a dense brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segjointgene.evaluate import metrics as M


def _all_truth_scores(pred_inst, pred_type, truth_inst, truth_type, x, y, true_cell, n_classes):
    """Every truth metric of one prediction, as a flat dict (what the evaluation reports)."""
    match = M.match_instances(M.instance_overlap(pred_inst, truth_inst))
    gene = M.gene_miou(M.cells_at_spots(pred_inst, x, y), M.cells_at_spots(truth_inst, x, y), match)
    acc = M.spot_accuracy(M.cells_at_spots(pred_inst, x, y), true_cell)
    out = {"gene_mIoU": gene.mean, "gene_mIoU_pen": gene.penalised, "spot_acc": acc.overall,
           "spot_acc_cell": acc.cell_spots, "spot_acc_noise": acc.noise_spots,
           "type_mIoU": M.celltype_scores(truth_type, pred_type, n_classes).miou,
           "type_Dice": M.celltype_scores(truth_type, pred_type, n_classes).mdice}
    for t in (0.5, 0.75):
        d = M.detection_scores(match, t)
        out.update({f"F1@{t}": d.f1, f"AP@{t}": d.ap, f"P@{t}": d.precision, f"R@{t}": d.recall})
    return out


@pytest.fixture()
def two_cells():
    """A 20 x 30 frame with two touching true cells (ids 4 and 9, types 1 and 2) and spots inside and outside them."""
    inst = np.zeros((20, 30), np.uint32)
    inst[2:12, 2:12] = 4  # 10 x 10
    inst[2:12, 12:18] = 9  # 10 x 6
    types = np.zeros_like(inst)
    types[inst == 4] = 1
    types[inst == 9] = 2
    rng = np.random.default_rng(0)
    ys = rng.uniform(0, 20, 300)
    xs = rng.uniform(0, 30, 300)
    true_cell = M.cells_at_spots(inst, xs, ys)
    true_cell[:20] = 0  # a few noise spots that happen to lie in cells: no mask can get these right
    return inst, types, xs, ys, true_cell


def test_perfect_prediction_scores_one(two_cells):
    inst, types, x, y, _ = two_cells
    true_cell = M.cells_at_spots(inst, x, y)
    scores = _all_truth_scores(inst, types, inst, types, x, y, true_cell, 3)
    assert all(v == pytest.approx(1.0) for v in scores.values()), scores


def test_relabelled_prediction_is_still_perfect_where_ids_do_not_matter(two_cells):
    inst, types, x, y, _ = two_cells
    relabelled = np.where(inst == 4, 1000, np.where(inst == 9, 3, 0)).astype(np.uint32)
    match = M.match_instances(M.instance_overlap(relabelled, inst))
    assert sorted(zip(match.pred.tolist(), match.truth.tolist())) == [(3, 9), (1000, 4)]
    assert M.gene_miou(M.cells_at_spots(relabelled, x, y), M.cells_at_spots(inst, x, y), match).mean == 1.0


def test_shifted_cell():
    truth = np.zeros((20, 20), np.uint32)
    truth[5:15, 5:15] = 1
    pred = np.zeros_like(truth)
    pred[5:15, 7:17] = 1  # shifted right by 2: overlap 80, union 120
    match = M.match_instances(M.instance_overlap(pred, truth))
    assert match.iou.tolist() == [pytest.approx(80 / 120)]
    assert M.detection_scores(match, 0.5).f1 == 1.0
    assert M.detection_scores(match, 0.75).f1 == 0.0
    assert M.detection_scores(match, 0.75).ap == 0.0
    # one spot in each column of row 10: truth holds columns 5..14, the prediction 7..16
    x, y = np.arange(20) + 0.5, np.full(20, 10.5)
    gene = M.gene_miou(M.cells_at_spots(pred, x, y), M.cells_at_spots(truth, x, y), match)
    assert gene.mean == pytest.approx(8 / 12)
    s = M.celltype_scores(truth, pred, 2)
    assert s.miou == pytest.approx(80 / 120) and s.mdice == pytest.approx(160 / 200)


def test_merged_pair(two_cells):
    inst, types, x, y, _ = two_cells
    merged = np.where(inst > 0, 4, 0).astype(np.uint32)  # one prediction over both true cells (100 + 60 px)
    match = M.match_instances(M.instance_overlap(merged, inst))
    assert match.pred.tolist() == [4] and match.truth.tolist() == [4]
    assert match.iou[0] == pytest.approx(100 / 160)
    d = M.detection_scores(match, 0.5)
    assert (d.tp, d.fp, d.fn) == (1, 0, 1)
    assert d.f1 == pytest.approx(2 / 3) and d.ap == pytest.approx(0.5)
    assert d.precision == 1.0 and d.recall == 0.5
    pred_c, true_c = M.cells_at_spots(merged, x, y), M.cells_at_spots(inst, x, y)
    gene = M.gene_miou(pred_c, true_c, match)
    n4, n9 = int((true_c == 4).sum()), int((true_c == 9).sum())
    assert gene.mean == pytest.approx(n4 / (n4 + n9))
    assert gene.penalised == pytest.approx(gene.mean / 2)  # the swallowed cell counts 0
    acc = M.spot_accuracy(pred_c, true_c)
    assert acc.cell_spots == pytest.approx(n4 / (n4 + n9))


def test_split_cell():
    truth = np.zeros((12, 12), np.uint32)
    truth[1:11, 1:11] = 5
    pred = np.zeros_like(truth)
    pred[1:11, 1:8] = 1  # 70 px
    pred[1:11, 8:11] = 2  # 30 px
    match = M.match_instances(M.instance_overlap(pred, truth))
    assert match.pred.tolist() == [1] and match.iou.tolist() == [pytest.approx(0.7)]
    d = M.detection_scores(match, 0.5)
    assert (d.tp, d.fp, d.fn) == (1, 1, 0) and d.f1 == pytest.approx(2 / 3) and d.ap == pytest.approx(0.5)
    assert M.detection_scores(match, 0.75).tp == 0
    # one spot per pixel: the matched piece holds 70 of the cell's 100 spots
    yy, xx = np.mgrid[0:12, 0:12]
    x, y = xx.ravel() + 0.5, yy.ravel() + 0.5
    gene = M.gene_miou(M.cells_at_spots(pred, x, y), M.cells_at_spots(truth, x, y), match)
    assert gene.mean == pytest.approx(0.7) and gene.penalised == pytest.approx(0.7)


def test_empty_prediction(two_cells):
    inst, types, x, y, true_cell = two_cells
    empty = np.zeros_like(inst)
    scores = _all_truth_scores(empty, empty, inst, types, x, y, true_cell, 3)
    for key in ("gene_mIoU", "gene_mIoU_pen", "F1@0.5", "AP@0.5", "F1@0.75", "type_mIoU", "type_Dice", "spot_acc_cell"):
        assert scores[key] == 0.0, key
    assert scores["spot_acc_noise"] == 1.0
    assert scores["spot_acc"] == pytest.approx((true_cell == 0).mean())


def test_both_empty_is_perfect():
    z = np.zeros((4, 4), np.uint16)
    match = M.match_instances(M.instance_overlap(z, z))
    assert M.detection_scores(match, 0.5).f1 == 1.0
    assert M.gene_miou(np.zeros(3), np.zeros(3), match).mean == 1.0
    assert np.isnan(M.celltype_scores(z, z, 3).miou)  # no foreground class anywhere: undefined, not 1


def test_spot_accuracy_counts_noise_separately():
    acc = M.spot_accuracy(np.array([4, 4, 0, 9, 0, 4]), np.array([4, 9, 0, 9, 4, 0]))
    assert acc.overall == pytest.approx(3 / 6)
    assert acc.cell_spots == pytest.approx(2 / 4) and acc.n_cell_spots == 4
    assert acc.noise_spots == pytest.approx(1 / 2) and acc.n_noise_spots == 2


def test_gene_miou_counts_duplicate_spots_by_index():
    """Two spots of one gene at one position are two set members (the reference merged them: defect 4)."""
    match = M.Matching(np.array([1]), np.array([1]), np.array([1.0]), n_pred=1, n_truth=1)
    pred = np.array([1, 1, 1])  # spots 0 and 1 are duplicates, spot 2 elsewhere
    truth = np.array([1, 1, 0])
    assert M.gene_miou(pred, truth, match).jaccard.tolist() == [pytest.approx(2 / 3)]


def test_confusion_matrix_matches_histogram2d():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 5, (40, 50)), rng.integers(0, 5, (40, 50))
    ref, _, _ = np.histogram2d(t.ravel(), p.ravel(), bins=[np.arange(6), np.arange(6)])
    assert np.array_equal(M.confusion_matrix(t, p, 5), ref.astype(np.int64))
    with pytest.raises(ValueError, match="outside 0..3"):
        M.confusion_matrix(t, p, 4)


def test_celltype_restriction_to_truth_foreground():
    truth = np.array([[1, 1, 0, 0], [2, 2, 0, 0]])
    pred = np.array([[1, 1, 1, 0], [2, 1, 0, 0]])
    # all pixels: class 1 = 2 / (2 + 4 - 2) = 0.5, class 2 = 1 / (2 + 1 - 1) = 0.5
    assert M.celltype_scores(truth, pred, 3).miou == pytest.approx(0.5)
    # truth > 0 only: class 1 = 2 / 3, class 2 = 1 / 2
    assert M.celltype_scores(truth, pred, 3, truth_foreground_only=True).miou == pytest.approx((2 / 3 + 1 / 2) / 2)


def _random_masks(rng, shape=(24, 31), n=12):
    """Instance masks made of random overlapping rectangles (ids not contiguous)."""
    out = np.zeros(shape, np.uint32)
    for i in range(n):
        r0, c0 = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        out[r0:r0 + rng.integers(2, 9), c0:c0 + rng.integers(2, 9)] = rng.integers(1, 50) * 3 + i % 2
    return out


def _brute_force_iou(pred, truth):
    ids_p = [i for i in np.unique(pred) if i]
    ids_t = [i for i in np.unique(truth) if i]
    iou = np.zeros((len(ids_p), len(ids_t)))
    for a, p in enumerate(ids_p):
        for b, t in enumerate(ids_t):
            inter = np.sum((pred == p) & (truth == t))
            union = np.sum((pred == p) | (truth == t))
            iou[a, b] = inter / union
    return ids_p, ids_t, iou


def _brute_force_greedy(ids_p, ids_t, iou):
    iou = iou.copy()
    pairs = []
    while iou.size and iou.max() > 0:
        a, b = np.unravel_index(np.argmax(iou), iou.shape)
        pairs.append((ids_p[a], ids_t[b]))
        iou[a, :] = -1
        iou[:, b] = -1
    return pairs


@pytest.mark.parametrize("seed", range(8))
def test_sparse_iou_and_matching_equal_dense_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred, truth = _random_masks(rng), _random_masks(rng)
    ids_p, ids_t, dense = _brute_force_iou(pred, truth)
    ov = M.instance_overlap(pred, truth)
    assert ov.pred_labels.tolist() == ids_p and ov.truth_labels.tolist() == ids_t
    sparse = np.zeros_like(dense)
    for p, t, v in zip(ov.pair_pred, ov.pair_truth, ov.iou):
        sparse[ids_p.index(p), ids_t.index(t)] = v
    np.testing.assert_allclose(sparse, dense)
    assert (ov.iou > 0).all()  # only overlapping pairs are listed
    match = M.match_instances(ov)
    # random rectangles rarely tie; when they do the two orders may differ, so compare the matched IoU values
    np.testing.assert_allclose(sorted(match.iou), sorted(dense[ids_p.index(p), ids_t.index(t)]
                                                         for p, t in _brute_force_greedy(ids_p, ids_t, dense)))
    assert len(set(match.pred.tolist())) == match.pred.size and len(set(match.truth.tolist())) == match.truth.size


def test_instance_overlap_handles_huge_ids():
    a = np.array([[4_000_000_000, 4_000_000_000, 0]], np.uint32)
    b = np.array([[7, 4_294_967_295, 4_294_967_295]], np.uint32)
    ov = M.instance_overlap(a, b)
    assert ov.pair_pred.tolist() == [4_000_000_000, 4_000_000_000]
    assert ov.pair_truth.tolist() == [7, 4_294_967_295]
    assert ov.iou.tolist() == [pytest.approx(1 / 2), pytest.approx(1 / 3)]


def test_label_validation():
    with pytest.raises(TypeError, match="integer labels"):
        M.instance_overlap(np.zeros((3, 3)), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="negative"):
        M.instance_overlap(-np.ones((3, 3), int), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="share one pixel frame"):
        M.instance_overlap(np.zeros((3, 3), int), np.zeros((3, 4), int))


def test_cells_at_spots_floor_and_outside():
    mask = np.arange(12, dtype=np.uint32).reshape(3, 4)
    x = np.array([0.0, 0.999, 3.5, 4.0, -0.1, 2.2])
    y = np.array([0.0, 1.999, 2.5, 0.0, 1.0, 2.0])
    assert M.cells_at_spots(mask, x, y).tolist() == [0, 4, 11, 0, 0, 10]


def test_cell_calling_on_a_tiny_mask():
    mask = np.zeros((10, 10), np.uint8)
    mask[4:6, 4:6] = 3  # 2 x 2 cell; with d = 2 the ring covers rows/cols 2..7 minus the cell
    x = np.array([4.5, 5.5, 5.1, 2.0, 7.9, 8.0, 1.9, 0.5])
    y = np.array([4.5, 5.5, 4.2, 2.0, 7.9, 8.0, 5.0, 0.5])
    c = M.cell_calling_score(mask, x, y, 2)
    assert (c.n_inside, c.n_ring) == (3, 2)  # inside: 3; ring: (2,2) and (7,7); (8,8), (5,1), (0,0) are beyond it
    assert c.score == pytest.approx(3 / (2 + 1e-6))
    assert np.isnan(M.cell_calling_score(mask, x[:3], y[:3], 2).score)  # nothing on the ring: undefined
    assert M.cell_calling_score(mask, x, y, 3).n_ring == 4  # d = 3 reaches (8,8) and (5,1)


def test_assigned_fraction():
    assert M.assigned_fraction(np.array([0, 0, 1, 2])) == 0.5


def test_exclusive_pairs_and_mecr_on_a_three_gene_reference():
    ref = pd.DataFrame({"Neuron": [9.0, 0.2, 3.0], "Glia": [0.1, 6.0, 3.0]}, index=["Snap25", "Plp1", "Actb"])
    pairs = M.exclusive_gene_pairs(ref, fraction=0.1)
    assert pairs == [("Snap25", "Plp1")]  # Actb is expressed by both types
    assert M.exclusive_gene_pairs(ref, fraction=0.01) == []  # each gene now counts as expressed in both types
    genes = ["Actb", "Plp1", "Snap25"]
    counts = np.array([[1, 0, 3],   # neuron
                       [2, 4, 0],   # glia
                       [0, 1, 2],   # a mixed cell: co-expresses the exclusive pair
                       [5, 0, 0]])  # expresses neither gene of the pair
    r = M.mecr(counts, genes, pairs)
    assert r.n_pairs == 1 and r.value == pytest.approx(1 / 3)
    assert M.mecr(counts, genes, pairs, min_count=2).value == 0.0  # the mixed cell has 1 Plp1 spot only
    assert M.mecr(counts, genes, [("Snap25", "Gfap")]).n_pairs == 0  # gene outside the panel: skipped


def test_mecr_from_spots_equals_mecr_from_counts():
    cells = np.array([1, 1, 2, 2, 2, 0, 3])
    genes = np.array([0, 1, 1, 1, 2, 0, 0])
    counts = M.cell_gene_counts(cells, genes, 3)
    assert counts.toarray().tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]
    r = M.mecr(counts, ["a", "b", "c"], [("a", "b"), ("a", "c")])
    assert r.per_pair["rate"].tolist() == [pytest.approx(1 / 3), 0.0]


def test_overlap_scales_to_ten_thousand_cells():
    """10^4 cells, ids permuted and shifted: every cell matches its counterpart; no n_pred x n_truth array is built
    (that would be 10^8 entries here; the sparse table holds only the overlapping pairs)."""
    n = 100  # 100 x 100 cells of 20 x 20 px with 2-px gaps
    idx = np.arange(n * 20)
    truth = ((idx // 20)[:, None] * n + (idx // 20)[None, :] + 1).astype(np.uint32)
    truth[(idx % 20 < 2)[:, None] | (idx % 20 < 2)[None, :]] = 0
    perm = np.random.default_rng(0).permutation(n * n + 1).astype(np.uint32)
    perm[perm == 0] = perm[0]
    perm[0] = 0
    pred = perm[np.roll(truth, (2, 1), axis=(0, 1))]
    ov = M.instance_overlap(pred, truth)
    assert ov.iou.size < 5 * n * n
    match = M.match_instances(ov)
    assert match.n_pred == match.n_truth == n * n and match.pred.size == n * n
    assert np.array_equal(match.pred, perm[match.truth])  # each cell found its own shifted copy
    assert M.detection_scores(match, 0.5).f1 == 1.0
