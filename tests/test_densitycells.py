"""The density engine: cells from the spot density where spots are dense (segjointgene.methods.spotmodel.densitycells)."""

import numpy as np
import pytest

from segjointgene.methods.spotmodel.densitycells import DensityConfig, density_cells, density_scale, local_share


def _blob(rng, centre, radius, n, decay=None):
    """n spots uniform in a disc (or, with ``decay``, denser towards the centre: a radial density ~ exp(-r/decay))."""
    if decay is None:
        r = radius * np.sqrt(rng.random(n))
    else:  # radial density ~ exp(-r / decay) per unit area: r ~ Gamma(2, decay), cut at the radius
        r = rng.gamma(2.0, decay, 8 * n)
        r = r[r < radius][:n]
    a = rng.random(n) * 2 * np.pi
    return centre[1] + r * np.cos(a), centre[0] + r * np.sin(a)


def _section(rng, cells, shape=(80, 120), noise=0, decay=None):
    """Spots of discs ``cells`` = [(centre (y, x), radius, n), ...] plus uniform noise; nuclei: 3-px discs; with
    ``decay`` (a fraction of the radius) the spots thin out from the centre as in real cells."""
    xs, ys, truth = [], [], []
    nuclei = np.zeros(shape, np.int32)
    yy, xx = np.indices(shape)
    for k, (centre, radius, n) in enumerate(cells, start=1):
        x, y = _blob(rng, centre, radius, n, None if decay is None else decay * radius)
        xs.append(x), ys.append(y), truth.append(np.full(n, k))
        nuclei[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= 9] = k
    if noise:
        xs.append(rng.random(noise) * shape[1]), ys.append(rng.random(noise) * shape[0]), truth.append(np.zeros(noise))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(truth).astype(int), nuclei


def test_two_touching_cells_of_unequal_size_meet_at_their_density_valley():
    # a big cell (radius 22) touching a small one (radius 10), both denser towards the centre: the valley lies at x = 62,
    # the nuclei's midpoint at x = 56; expansion from the nuclei would cut the big cell
    rng = np.random.default_rng(0)
    x, y, truth, nuclei = _section(rng, [((40, 40), 22, 30000), ((40, 72), 10, 6000)], decay=1.0)
    out = density_cells(x, y, nuclei)
    assert out.scale.resolves
    assert (out.cell == truth).mean() > 0.97
    midpoint = np.where(np.hypot(y - 40, x - 40) < np.hypot(y - 40, x - 72), 1, 2)
    assert (midpoint == truth).mean() < 0.95  # what a nearest-nucleus split gets


def test_background_stays_background_and_spots_outside_the_frame_too():
    rng = np.random.default_rng(1)
    x, y, truth, nuclei = _section(rng, [((40, 30), 15, 15000), ((40, 90), 15, 15000)], noise=300)
    x, y, truth = np.r_[x, -5.0, 500.0], np.r_[y, 10.0, 10.0], np.r_[truth, 0, 0]
    out = density_cells(x, y, nuclei)
    assert out.cell[-2:].tolist() == [0, 0]
    noise = truth == 0
    assert (out.cell[noise] == 0).mean() > 0.8  # noise away from the cells is left out
    assert (out.cell[~noise] == truth[~noise]).mean() > 0.97


def test_a_cell_without_a_nucleus_is_found_de_novo_and_a_thin_cluster_is_not():
    rng = np.random.default_rng(2)
    cells = [((40, 20), 14, 12000), ((40, 50), 14, 12000)]
    x, y, truth, nuclei = _section(rng, cells, shape=(80, 170))
    bx, by = _blob(rng, (40, 110), 14, 12000)  # a third cell, its nucleus missing
    tx, ty = _blob(rng, (10, 150), 3, 150)  # a small, thin cluster: 1/80 of a cell's spots
    x, y = np.r_[x, bx, tx], np.r_[y, by, ty]
    out = density_cells(x, y, nuclei, first_new_id=10)
    assert out.denovo_ids.tolist() == [10]
    assert (out.cell[truth.size:truth.size + bx.size] == 10).mean() > 0.95
    assert (out.cell[-tx.size:] == 0).all()
    assert set(np.unique(out.mask)) == {0, 1, 2, 10}
    off = density_cells(x, y, nuclei, config=DensityConfig(denovo=False))
    assert off.denovo_ids.size == 0 and (off.cell[truth.size:truth.size + bx.size] == 0).all()


def test_first_new_id_must_exceed_the_nuclei():
    rng = np.random.default_rng(3)
    x, y, _, nuclei = _section(rng, [((40, 40), 10, 3000)])
    with pytest.raises(ValueError, match="first_new_id"):
        density_cells(x, y, nuclei, first_new_id=1)


@pytest.mark.parametrize("n, resolves", [(20000, True), (300, False)])
def test_the_scale_resolves_cells_only_when_spots_are_dense(n, resolves):
    rng = np.random.default_rng(4)
    x, y, _, nuclei = _section(rng, [((40, 30), 15, n), ((40, 62), 15, n), ((40, 94), 15, n)])
    s = density_scale(x, y, nuclei)
    assert s.radius == pytest.approx(16.0)
    assert s.resolves is resolves
    # 100 spots in the Gaussian's area 4 pi sigma^2 at the cells' rate
    assert s.sigma == pytest.approx(max(1.0, np.sqrt(100 / (4 * np.pi * s.cell_rate))))


def test_deterministic_and_prob_is_the_local_share():
    rng = np.random.default_rng(5)
    x, y, _, nuclei = _section(rng, [((40, 40), 22, 20000), ((40, 72), 10, 5000)])
    a, b = density_cells(x, y, nuclei), density_cells(x, y, nuclei)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.prob, b.prob)
    assert np.array_equal(a.prob, local_share(x, y, a.cell))
    inner = np.hypot(y - 40, x - 40) < 10
    assert a.prob[inner].min() == 1.0  # deep inside a cell every neighbour agrees


def test_local_share_by_hand():
    # spots on a line; k = 2 nearest others: spot 2 (cell 2) has spots 1 and 0 (cell 1) as its nearest
    out = local_share(np.array([0.0, 1, 2, 10, 11]), np.zeros(5), np.array([1, 1, 2, 2, 2]), k=2)
    assert out.tolist() == [0.5, 0.5, 0.0, 1.0, 1.0]
