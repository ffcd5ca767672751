"""The spot model: known-answer toys, calibration on a simulated section, the model rule end to end."""

from __future__ import annotations

import numpy as np
import pytest

from segjointgene.config import SimulateConfig
from segjointgene.evaluate.metrics import calibration_error
from segjointgene.evaluate.simulate import simulate_section
from segjointgene.methods.spotmodel.model import (CellGeneCounts, CellModel, SpotModelConfig, _moment_factor, _relative_log_area,
                                    _typical_cov, fit_spot_model, nucleus_concentration, territories, tissue_area)


def _two_cells(rng):
    """Two round nuclei 40 px apart; cell 1 of type 0 emits gene 0, cell 2 of type 1 gene 1; one far noise spot."""
    nuclei = np.zeros((64, 96), np.uint32)
    yy, xx = np.mgrid[0:64, 0:96]
    nuclei[(yy - 32) ** 2 + (xx - 28) ** 2 <= 9] = 1
    nuclei[(yy - 32) ** 2 + (xx - 68) ** 2 <= 9] = 2
    pts = []
    for cx, gene in ((28.5, 0), (68.5, 1)):
        r = 10 * np.sqrt(rng.random(60))
        a = rng.uniform(0, 2 * np.pi, 60)
        pts.append(np.stack([32.5 + r * np.sin(a), cx + r * np.cos(a), np.full(60, gene)], 1))
    pts.append(np.array([[5.0, 90.0, 0]]))
    pts = np.concatenate(pts)
    return nuclei, pts[:, 1], pts[:, 0], pts[:, 2].astype(np.int64)


def test_moment_factor_of_the_gaussian_is_one():
    assert _moment_factor(2.0) == pytest.approx(1.0, abs=1e-6)


def test_two_cells_get_their_own_spots_and_the_far_spot_is_background():
    nuclei, x, y, gene = _two_cells(np.random.default_rng(0))
    fit = fit_spot_model(x, y, gene, nuclei, np.array([1, 2]), np.array([0, 1]), n_genes=2, n_types=2)
    assert (fit.cell[:60] == 1).mean() > 0.95 and (fit.cell[60:120] == 2).mean() > 0.95
    assert fit.cell[120] == 0
    assert ((fit.prob > 0) & (fit.prob <= 1)).all()
    # the fitted radius matches a uniform disc of radius 10: second moment 25 per axis
    assert np.trace(fit.model.cov[0]) / 2 == pytest.approx(25.0, rel=0.35)
    mask = territories(fit.model, nuclei.shape)
    assert mask[32, 28] == 1 and mask[32, 68] == 2 and mask[5, 5] == 0
    area = (mask == 1).sum()
    assert 0.6 * np.pi * 100 < area < 1.6 * np.pi * 100


def test_temperature_softens_the_probability_but_not_the_assignment():
    nuclei, x, y, gene = _two_cells(np.random.default_rng(2))
    x, y, gene = np.append(x, 37.5), np.append(y, 32.5), np.append(gene, 1)  # near cell 1, the gene of cell 2
    fits = [fit_spot_model(x, y, gene, nuclei, np.array([1, 2]), np.array([0, 1]), n_genes=2, n_types=2,
                           config=SpotModelConfig(temperature=t)) for t in (1.0, 2.0)]
    assert np.array_equal(fits[0].cell, fits[1].cell)
    in_cell = fits[0].cell > 0  # (a spot beyond its cell's edge is background with 1 - that cell's posterior)
    assert (fits[1].prob[in_cell] <= fits[0].prob[in_cell] + 1e-6).all()
    assert fits[0].cell[-1] == 1 and fits[1].prob[-1] < fits[0].prob[-1] - 0.05
    assert 0.5 < fits[1].prob[-1]  # still the most likely of three (two cells, background)


def test_network_evidence_splits_type_from_background():
    from segjointgene.methods.spotmodel.engine import network_evidence

    post = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.4, 0.4]])
    log_post = np.log(np.vstack([post, np.zeros((1, 3))]))  # the last spot was not predicted
    log_post[-1] = 0.0
    full = network_evidence(log_post, 1.0)
    # weight 1: every difference between two columns is the network's log posterior ratio
    d = full[:3] - np.log(post)
    assert np.allclose(d - d[:, :1], d[:1] - d[:1, :1])  # per column a constant, per spot a constant
    typed = network_evidence(log_post, 0.0)
    assert np.allclose(typed[:, 0], 0.0) and np.allclose(typed[:, 1:], full[:, 1:])
    # the type columns are log p(type | cell) against its mean over the spots
    cond = post[:, 1:] / post[:, 1:].sum(1, keepdims=True)
    assert np.allclose(typed[:3, 1:], np.log(cond) - np.log(cond.mean(0)))
    assert (full[-1] == 0).all()


def test_gene_evidence_decides_between_equidistant_cells():
    """A spot halfway between the two cells goes to the cell whose type expresses its gene."""
    nuclei, x, y, gene = _two_cells(np.random.default_rng(1))
    x, y, gene = np.append(x, 48.5), np.append(y, 32.5), np.append(gene, 1)
    fit = fit_spot_model(x, y, gene, nuclei, np.array([1, 2]), np.array([0, 1]), n_genes=2, n_types=2,
                         config=SpotModelConfig(spot_edge=None))
    assert fit.cell[-1] == 2


def test_posterior_is_calibrated_on_a_hard_section():
    sim = simulate_section(SimulateConfig(size_px=192, preset="hard", noise_fraction=0.1), rng=5)
    genes = {g: i for i, g in enumerate(sorted(sim.spots.gene.unique()))}
    types = {t: i for i, t in enumerate(sorted(sim.cells.celltype.unique()))}
    ece = {}
    for t in (1.0, 1.6):
        fit = fit_spot_model(sim.spots.x.to_numpy(), sim.spots.y.to_numpy(), sim.spots.gene.map(genes).to_numpy(),
                             sim.nuclei, sim.cells.cell.to_numpy(), sim.cells.celltype.map(types).to_numpy(),
                             n_genes=len(genes), n_types=len(types), config=SpotModelConfig(temperature=t))
        right = fit.cell == sim.spots.cell.to_numpy()
        ece[t] = calibration_error(fit.prob, right)
    # of the spots assigned with probability ~ p, a fraction ~ p is right. Measured on this small section: 0.126 raw
    # (overconfident between 0.5 and 0.95), 0.044 at the pipeline's temperature 1.6: regression bounds; the
    # reliability tables over 512-px sections are in benchmarks/RESULTS.md
    assert ece[1.0] < 0.15 and ece[1.6] < 0.07 and ece[1.6] < ece[1.0]
    assert right[sim.spots.cell.to_numpy() > 0].mean() > 0.7


def test_hard_preset_is_deterministic_and_differs_from_basic():
    a = simulate_section(SimulateConfig(size_px=96, preset="hard"), rng=3)
    b = simulate_section(SimulateConfig(size_px=96, preset="hard"), rng=3)
    c = simulate_section(SimulateConfig(size_px=96), rng=3)
    assert a.spots.equals(b.spots) and np.array_equal(a.instance, b.instance)
    assert not np.array_equal(a.instance, c.instance)
    assert ((a.nuclei > 0) <= (a.instance == a.nuclei)).all()


def test_tissue_area_counts_the_frame_pixels_of_occupied_bins():
    # 10 x 10 frame, bins of 4: bin (0, 0) is whole (16 px), bin (2, 2) is cut by the frame to 2 x 2; (0, 0) twice
    y, x = np.array([0.5, 1.5, 9.5]), np.array([0.5, 3.9, 9.5])
    assert tissue_area(y, x, (10, 10), 4) == 16 + 4
    assert tissue_area(np.arange(10) + 0.5, np.arange(10) + 0.5, (10, 10), 1) == 10  # the diagonal


def test_cell_gene_counts_sum_the_shares_of_each_cell_and_gene(monkeypatch):
    cand = np.array([[0, 1], [1, 0], [0, 1]])
    w = np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]])
    dense = CellGeneCounts.from_resp(cand, np.array([2, 2, 0]), w, n_cells=2, n_genes=3)
    monkeypatch.setattr(CellGeneCounts, "DENSE_KEYS", 4)  # 2 cells x 3 genes > 4: the sorted sparse keys
    sparse = CellGeneCounts.from_resp(cand, np.array([2, 2, 0]), w, n_cells=2, n_genes=3)
    assert dense.keys is None and sparse.keys is not None
    # cell 0: gene 2 from spots 0 (0.75) and 1 (0.5), gene 0 from spot 2 (1.0); cell 1: gene 2 0.25 + 0.5, gene 0 0
    for counts in (dense, sparse):
        got = counts.lookup(np.array([0, 0, 1, 1, 1]), np.array([2, 0, 2, 0, 1]))
        assert np.allclose(got, [1.25, 1.0, 0.75, 0, 0])


def _cells_of_type(rng, profiles, per_type, spots, alpha):
    """Spots of ``per_type`` cells of each type: each cell's profile ~ Dirichlet(alpha * type profile), or the type
    profile itself when alpha is None."""
    cell, gene, cls = [], [], []
    for t, p in enumerate(profiles):
        for _ in range(per_type):
            own = p if alpha is None else rng.dirichlet(alpha * p)
            gene.append(rng.choice(p.size, spots, p=own))
            cell.append(np.full(spots, len(cls)))
            cls.append(t)
    return np.concatenate(cell), np.concatenate(gene), np.array(cls)


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_nucleus_concentration_recovers_the_dispersion_of_cells(alpha):
    rng = np.random.default_rng(0)
    profiles = rng.dirichlet(np.ones(20), size=3)
    cell, gene, cls = _cells_of_type(rng, profiles, per_type=60, spots=30, alpha=alpha)
    freq = np.bincount(gene, minlength=20) / gene.size
    found = nucleus_concentration(cell, gene, cls, 3, freq, pseudo=0.05)
    if alpha is None:  # multinomial cells: no over-dispersion, the type profiles are kept
        assert found == 0.0 or found >= 256
    else:  # on the grid of powers of 2, within a factor 2
        assert alpha / 2 <= found <= alpha * 2


def test_a_cell_profile_sends_a_spot_to_the_cell_that_holds_its_gene():
    """Two cells of one type (genes 0 and 1 equally likely for the type), one holding gene 0, the other gene 1: a
    spot of gene 1 halfway between them goes to the second cell with cell profiles; without, the two cells split it
    and the background wins."""
    nuclei, x, y, gene = _two_cells(np.random.default_rng(1))
    x, y, gene = np.append(x, 48.5), np.append(y, 32.5), np.append(gene, 1)
    kw = dict(n_genes=2, n_types=1)
    same_type = np.array([0, 0])
    own = fit_spot_model(x, y, gene, nuclei, np.array([1, 2]), same_type, **kw,
                         config=SpotModelConfig(spot_edge=None, cell_profile=2.0))
    typed = fit_spot_model(x, y, gene, nuclei, np.array([1, 2]), same_type, **kw,
                           config=SpotModelConfig(spot_edge=None, cell_profile=0.0))
    assert own.cell[-1] == 2 and own.model.concentration == 2.0
    assert typed.cell[-1] == 0 and typed.model.concentration == 0.0
    # the far noise spot stays background and the cells keep their spots
    assert own.cell[120] == 0 and (own.cell[:60] == 1).mean() > 0.95 and (own.cell[60:120] == 2).mean() > 0.95


def _model_of_sizes(spread: np.ndarray) -> CellModel:
    m = spread.size
    return CellModel(ids=np.arange(1, m + 1), cls=np.zeros(m, np.int64), centre=np.zeros((m, 2)),
                     cov=np.tile(np.eye(2) * 25.0, (m, 1, 1)), count=np.full(m, 20.0), profile=np.ones((1, 2)) / 2,
                     background_rate=0.01, background_profile=np.ones(2) / 2, shape_power=2.0, spread=spread)


def test_prior_size_follows_the_nuclei_only_as_far_as_the_cells_spots_do():
    rng = np.random.default_rng(0)
    area = rng.uniform(20, 80, 200)
    # cells whose spots spread with their nucleus's area (cell area ~ nucleus area): exponent ~1, the prior of a
    # nucleus 4x the median's is ~4x the type's median covariance
    rel = _relative_log_area(area, np.zeros(area.size, np.int64), 1)
    prop = _typical_cov(_model_of_sizes(50.0 * area / np.median(area)), 1, rel)
    ratio = prop[:, 0, 0] / 25.0
    assert np.allclose(ratio, area / np.median(area), rtol=0.05)
    # spread unrelated to the nuclei: the exponent is ~0 and every cell keeps the type's median
    flat = _typical_cov(_model_of_sizes(50.0 * rng.lognormal(0, 0.3, 200)), 1, rel)
    assert np.allclose(flat[:, 0, 0], 25.0, rtol=0.1)
    # without areas (the option off) the type's median itself
    assert np.allclose(_typical_cov(_model_of_sizes(50.0 * area), 1, None), np.eye(2) * 25.0)
