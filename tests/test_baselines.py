"""Baselines on hand-made sections: expansion equals scikit-image, the density watershed finds spot-filled cells."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import expand_labels

from segjointgene.evaluate import baselines as B
from segjointgene.evaluate import metrics as M


def _random_nuclei(rng, shape=(40, 50), n=9):
    out = np.zeros(shape, np.uint32)
    for i in range(n):
        r, c = rng.integers(2, shape[0] - 4), rng.integers(2, shape[1] - 4)
        out[r:r + rng.integers(1, 4), c:c + rng.integers(1, 4)] = 10 * (i + 1)
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("radius", [0, 1, 3, 7.5])
def test_expand_equals_skimage_expand_labels(seed, radius):
    nuclei = _random_nuclei(np.random.default_rng(seed))
    got = B.expand_nuclei(nuclei, radius)
    assert got.dtype == nuclei.dtype
    assert np.array_equal(got, expand_labels(nuclei, radius))


def test_one_distance_transform_serves_every_radius():
    nuclei = _random_nuclei(np.random.default_rng(5))
    nearest = B.nearest_nucleus(nuclei)
    for r in (2, 5, 9):
        grown = B.expand_nuclei(nuclei, r, nearest=nearest)
        assert np.array_equal(grown, expand_labels(nuclei, r))
        assert np.array_equal(grown[nuclei > 0], nuclei[nuclei > 0])  # nuclei keep their pixels
        assert (nearest.distance[grown > 0] <= r).all()  # nothing beyond the radius


def test_expand_without_nuclei_is_empty():
    z = np.zeros((5, 5), np.int32)
    assert not B.expand_nuclei(z, 3).any()


def test_spot_density_floor_convention_and_mass():
    d = B.spot_density(np.array([3.99, 20.0]), np.array([5.0, 20.0]), (30, 30), 0)
    assert d[5, 3] == 1 and d[20, 20] == 1 and d.sum() == 2
    d = B.spot_density(np.array([15.2, 14.7, 99.0]), np.array([15.5, 14.1, 1.0]), (30, 30), 2.0)
    assert d.dtype == np.float32 and d.sum() == pytest.approx(2.0, abs=1e-4)  # the outside spot is dropped


def test_density_threshold_rule_and_fallback():
    density = np.array([[0.0, 1.0, 3.0, 5.0]])
    nuclei = np.array([[0, 1, 1, 1]])
    assert B.density_threshold(density, nuclei, fraction=0.5) == pytest.approx(1.5)
    fallback = B.density_threshold(density, np.zeros_like(nuclei), sigma=5.0)
    assert fallback == pytest.approx(0.5 / (2 * np.pi * 25))
    with pytest.raises(ValueError, match="fraction"):
        B.density_threshold(density, nuclei, fraction=0.0)


def _two_cell_section(seed=0):
    """Two square cells full of spots (different densities) 4 px apart, small off-centre nuclei, sparse noise, and a
    spot-filled blob with no nucleus."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((80, 100), np.uint32)
    truth[20:50, 15:45] = 7
    truth[20:50, 49:74] = 12
    nuclei = np.zeros_like(truth)
    nuclei[25:33, 20:28] = 7
    nuclei[38:45, 62:69] = 12
    xs, ys = [], []
    for cell, rate in ((7, 0.4), (12, 0.3)):
        py, px = np.nonzero(truth == cell)
        n = int(rate * py.size)
        pick = rng.integers(0, py.size, n)
        ys.append(py[pick] + rng.random(n))
        xs.append(px[pick] + rng.random(n))
    ys.append(rng.uniform(60, 75, 80))  # blob without a nucleus (bottom right)
    xs.append(rng.uniform(80, 95, 80))
    ys.append(rng.uniform(0, 80, 30))  # noise
    xs.append(rng.uniform(0, 100, 30))
    return truth, nuclei, np.concatenate(xs), np.concatenate(ys)


def test_density_watershed_recovers_spot_filled_cells():
    truth, nuclei, x, y = _two_cell_section()
    density = B.spot_density(x, y, truth.shape, 2.0)
    thr = B.density_threshold(density, nuclei)
    ws = B.density_watershed(nuclei, density, thr)
    assert set(np.unique(ws)) <= {0, 7, 12}
    assert np.array_equal(ws[nuclei > 0], nuclei[nuclei > 0])  # nuclei are kept
    assert not ws[60:75, 80:95].any()  # a spot blob that no nucleus reaches stays background
    ov = M.instance_overlap(ws, truth)
    match = M.match_instances(ov)
    assert sorted(match.pred.tolist()) == [7, 12]
    assert (match.iou > 0.75).all(), match.iou
    nuc_match = M.match_instances(M.instance_overlap(nuclei, truth))
    assert (nuc_match.iou < 0.2).all()  # the nuclei alone are far from the cells
    # and the spot assignment follows
    true_cell = M.cells_at_spots(truth, x, y)
    assert M.spot_accuracy(M.cells_at_spots(ws, x, y), true_cell).overall > 0.85


def test_density_watershed_keeps_any_id_range():
    nuclei = np.array([[4_000_000_000, 0, 0, 3]], np.uint32)
    d = np.ones((1, 4))
    out = B.density_watershed(nuclei, d, 0.5)
    assert out.dtype == np.uint32 and set(out.ravel().tolist()) == {4_000_000_000, 3}


def test_density_watershed_without_nuclei():
    assert not B.density_watershed(np.zeros((4, 4), np.int32), np.ones((4, 4)), 0.1).any()


@pytest.mark.parametrize("big", [False, True])
def test_celltype_mask(big):
    base = 3_000_000_000 if big else 0
    inst = np.array([[0, base + 5, base + 5], [base + 9, 0, base + 11]], np.uint64 if big else np.uint32)
    types = B.celltype_mask(inst, np.array([base + 9, base + 5]), np.array([1, 3]))
    assert types.dtype == np.int32
    assert types.tolist() == [[0, 3, 3], [1, 0, 0]]  # cell 11 is not in the table: class 0


def test_baseline_segmentations_order_ids_and_growth():
    truth, nuclei, x, y = _two_cell_section(1)
    out = dict(B.baseline_segmentations(nuclei, x, y, sigma=2.0, radii=(3, 8)))
    assert list(out) == ["nuclei", "expand_3", "expand_8", "density_watershed"]
    areas = [int((out[k] > 0).sum()) for k in ("nuclei", "expand_3", "expand_8")]
    assert areas[0] < areas[1] < areas[2]
    for mask in out.values():
        assert set(np.unique(mask)) <= {0, 7, 12}
        assert np.array_equal(mask[nuclei > 0], nuclei[nuclei > 0])
