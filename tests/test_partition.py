"""The pixel partition (cellular Potts refinement): known-answer toys and a simulated section."""

from __future__ import annotations

import numpy as np
import pytest

from segjointgene.methods.spotmodel import partition
from segjointgene.config import LabelUpdateConfig, SimulateConfig
from segjointgene.methods.spotmodel.partition import PartitionConfig, refine_partition
from segjointgene.evaluate.simulate import simulate_section
from segjointgene.methods.spotmodel.model import CellModel, fit_spot_model, territories
from segjointgene.methods.spotmodel.engine import shift_log_odds


def _two_cells(rng, n: int = 120):
    """A 20 x 40 frame tiled by two cells split at x = 20: cell 1 (type 0) emits gene 0 over x < 20, cell 2
    (type 1) gene 1 over x >= 20; nuclei at their centres; a model whose ellipses are wide (no shape pull)."""
    nuclei = np.zeros((20, 40), np.int64)
    nuclei[8:12, 8:12], nuclei[8:12, 28:32] = 1, 2
    y = rng.uniform(0, 20, 2 * n)
    x = np.concatenate([rng.uniform(0, 20, n), rng.uniform(20, 40, n)])
    gene = np.repeat([0, 1], n)
    model = CellModel(ids=np.array([1, 2]), cls=np.array([0, 1]), centre=np.array([[10.0, 10.0], [10.0, 30.0]]),
                      cov=np.tile(np.eye(2) * 400.0, (2, 1, 1)), count=np.array([n, n], float),
                      profile=np.array([[0.95, 0.05], [0.05, 0.95]]), background_rate=1e-3,
                      background_profile=np.array([0.5, 0.5]), shape_power=2.0, tissue_px=800.0)
    return nuclei, x, y, gene, model


def _fitted_section(size: int, rng: int):
    """A hard dense simulated section and the spot model fitted to it (true nuclei): (sim, x, y, gene, fit)."""
    sim = simulate_section(SimulateConfig(size_px=size, mode="dense", noise_fraction=0.1, preset="hard"), rng=rng)
    genes, types = sorted(sim.markers["gene"].unique()), sorted(sim.cells["celltype"].unique())
    gene = np.searchsorted(genes, sim.spots["gene"].to_numpy(str))
    x, y = sim.spots["x"].to_numpy(), sim.spots["y"].to_numpy()
    fit = fit_spot_model(x, y, gene, sim.nuclei, sim.cells["cell"].to_numpy(np.int64),
                         np.searchsorted(types, sim.cells["celltype"].to_numpy(str)), n_genes=len(genes),
                         n_types=len(types))
    return sim, x, y, gene, fit


def test_a_boundary_moves_to_where_the_genes_change():
    nuclei, x, y, gene, model = _two_cells(np.random.default_rng(0))
    start = np.where(np.arange(40) < 14, 1, 2)[None].repeat(20, 0)  # the boundary 6 px too far left
    start = np.where(nuclei > 0, nuclei, start)
    part = refine_partition(start, nuclei > 0, model, x, y, gene,
                            config=PartitionConfig(shape_weight=0.0, sweeps=50))
    cols = (part.mask == 1).sum(0)  # pixels of cell 1 per column
    assert (cols[:16] == 20).all() and (cols[24:] == 0).all()
    # the mean boundary moved from x = 14 to within 2 px of x = 20 and not past it (iterated conditional modes
    # stops where a straight spotless boundary is a local minimum)
    assert 18 <= cols.sum() / 20 <= 21
    assert (part.cell == part.mask[y.astype(int), x.astype(int)]).all()  # every spot takes its pixel's cell
    assert (part.cell[:120] == 1).mean() > 0.95 and (part.cell[120:] == 2).mean() > 0.95
    assert np.array_equal(part.mask[nuclei > 0], nuclei[nuclei > 0])  # fixed pixels keep their cell


def test_empty_pixels_go_to_background_and_stray_parts_are_cut():
    nuclei, x, y, gene, model = _two_cells(np.random.default_rng(1))
    keep = x < 20  # only cell 1 emits; the right half has no spots
    x, y, gene = x[keep], y[keep], gene[keep]
    start = np.where(np.arange(40) < 20, 1, 0)[None].repeat(20, 0)
    start[0:3, 36:40] = 1  # a stray piece of cell 1 that does not touch its nucleus
    start = np.where(nuclei == 1, 1, start)
    part = refine_partition(start, nuclei == 1, model, x, y, gene,
                            config=PartitionConfig(shape_weight=0.0))
    assert (part.mask[:, 24:] == 0).all()  # no spots, nothing to hold them: background
    assert (part.mask[:, :18] == 1).mean() > 0.95  # the spot-filled half stays the cell


def test_the_shape_prior_cuts_spotless_pixels_outside_the_ellipse():
    nuclei, x, y, gene, model = _two_cells(np.random.default_rng(2))
    keep = x < 20  # only cell 1 emits, over the left half; no background spots
    x, y, gene = x[keep], y[keep], gene[keep]
    model.cov[:] = np.eye(2) * 16.0  # its ellipse: a uniform disc of radius 8 around (10, 10)
    start = np.where(nuclei == 1, 1, np.where(np.arange(40) < 20, 1, 0)[None].repeat(20, 0))
    parts = {w: refine_partition(start, nuclei == 1, model, x, y, gene,
                                 config=PartitionConfig(shape_weight=w, sweeps=40)) for w in (0.0, 4.0)}
    yy, xx = np.indices(nuclei.shape) + 0.5
    spotless = np.ones(nuclei.shape, bool)
    spotless[y.astype(int), x.astype(int)] = False
    beyond = spotless & ((yy - 10) ** 2 + (xx - 10) ** 2 > 12 ** 2) & (xx < 20)  # shape cost 5 > smoothness 4
    assert (parts[4.0].mask[beyond] == 0).mean() > 0.9  # the prior sends them to background
    assert (parts[0.0].mask[beyond] == 1).mean() > 0.9  # without it the smoothness keeps them in the cell
    held = ~spotless & (xx < 20)
    assert (parts[4.0].mask[held] == 1).mean() > 0.9  # pixels with the cell's spots stay, prior or not


def test_evidence_for_the_neighbours_type_moves_the_boundary():
    nuclei, x, y, gene, model = _two_cells(np.random.default_rng(3), n=2000)  # ~5 spots per pixel
    start = np.where(nuclei > 0, nuclei, np.where(np.arange(40) < 20, 1, 2)[None].repeat(20, 0))
    evidence = np.zeros((x.size, 3))  # log-evidence for background, type 0, type 1
    evidence[(x >= 15) & (x < 20), 2] = 10.0  # the network is sure these spots are of cell 2's type
    cfg = PartitionConfig(shape_weight=0.0, sweeps=50)
    plain = refine_partition(start, nuclei > 0, model, x, y, gene, config=cfg)
    moved = refine_partition(start, nuclei > 0, model, x, y, gene, evidence=evidence, config=cfg)
    assert 19 <= (plain.mask == 1).sum(0).sum() / 20 <= 21  # the right boundary stays
    assert 14 <= (moved.mask == 1).sum(0).sum() / 20 <= 16  # the evidence pulls it to x = 15
    assert (moved.cell[(x >= 15.5) & (x < 20)] == 2).mean() > 0.9


def test_partition_is_deterministic_and_beats_the_ellipses_on_a_dense_section():
    sim, x, y, gene, fit = _fitted_section(192, 3)
    true = sim.spots["cell"].to_numpy()
    start = np.where(sim.nuclei > 0, sim.nuclei, territories(fit.model, sim.nuclei.shape)).astype(np.int64)
    parts = [refine_partition(start, sim.nuclei > 0, fit.model, x, y, gene)
             for _ in range(2)]
    assert np.array_equal(parts[0].mask, parts[1].mask)
    emitted = true > 0
    by_ellipse = start[y.astype(int), x.astype(int)]
    acc = lambda cell: float((cell[emitted] == true[emitted]).mean())  # noqa: E731
    assert acc(parts[0].cell) > acc(by_ellipse) + 0.01
    assert acc(parts[0].cell) > acc(fit.cell)


def test_probability_of_a_label_sums_over_the_candidates():
    sim, x, y, gene, fit = _fitted_section(128, 4)
    total = sum(fit.probability_of(c) for c in fit.candidates.T) + fit.probability_of(np.zeros(x.size, np.int64))
    assert total == pytest.approx(np.ones(x.size), abs=1e-5)
    assigned = fit.cell > 0  # (a spot beyond its cell's edge is background at 1 - that cell's posterior)
    assert fit.probability_of(fit.cell)[assigned] == pytest.approx(fit.prob[assigned], abs=1e-6)
    assert (fit.probability_of(np.full(x.size, 10 ** 6)) == 0).all()  # not a candidate of any spot


def test_shift_log_odds_by_hand():
    p = np.array([0.0, 0.25, 0.5, 1.0])
    # odds x 3: 1/3 -> 1 (0.5), 1 -> 3 (0.75); 0 and 1 stay
    assert shift_log_odds(p, np.log(3.0)) == pytest.approx([0.0, 0.5, 0.75, 1.0])
    assert shift_log_odds(p, 0.0) == pytest.approx(p)


def test_updating_a_sub_lattice_in_chunks_changes_nothing(monkeypatch):
    sim, x, y, gene, fit = _fitted_section(128, 5)
    start = np.where(sim.nuclei > 0, sim.nuclei, territories(fit.model, sim.nuclei.shape)).astype(np.int64)
    whole = refine_partition(start, sim.nuclei > 0, fit.model, x, y, gene)
    monkeypatch.setattr(partition, "_n_chunks", lambda visit: 7)
    chunked = refine_partition(start, sim.nuclei > 0, fit.model, x, y, gene)
    assert (whole.mask != start).any()  # the refinement did something
    assert np.array_equal(whole.mask, chunked.mask) and np.array_equal(whole.cell, chunked.cell)


def test_ambient_spots_on_a_cells_pixels_go_to_background_only_when_asked():
    """Cell 1 holds 5 spots of gene 2, which neither type expresses (1 %) and background does (20 spots of it off the
    frame, over 200 px of tissue beside the cells): background explains them e^3.4 times better (0.1 x 21/23 vs 0.3 x
    0.01), so they go to background at a log-ratio threshold of 0 but not of 5 nor by default; the cells' own spots
    and the mask stay."""
    nuclei, x, y, gene, model = _two_cells(np.random.default_rng(4))
    model.profile = np.array([[0.94, 0.05, 0.01], [0.05, 0.94, 0.01]])
    model.background_profile, model.tissue_px = np.array([0.1, 0.1, 0.8]), 1000.0
    x = np.concatenate([x, [5.5, 7.5, 12.5, 15.5, 17.5], np.full(20, -5.0)])
    y = np.concatenate([y, [3.5, 15.5, 4.5, 16.5, 9.5], np.full(20, 5.0)])
    gene = np.concatenate([gene, np.full(25, 2)])
    start = np.where(nuclei > 0, nuclei, np.where(np.arange(40) < 20, 1, 2)[None].repeat(20, 0))
    runs = {t: refine_partition(start, nuclei > 0, model, x, y, gene,
                                config=PartitionConfig(shape_weight=0.0, ambient_log_ratio=t))
            for t in (float("inf"), 5.0, 0.0)}
    ambient = slice(240, 245)
    assert (runs[float("inf")].cell[ambient] == 1).all() and (runs[5.0].cell[ambient] == 1).all()
    assert (runs[0.0].cell[ambient] == 0).all()
    assert np.array_equal(runs[0.0].cell[:240], runs[float("inf")].cell[:240])  # the cells' own spots keep theirs
    assert (runs[0.0].cell[245:] == 0).all()
    assert all(np.array_equal(r.mask, runs[0.0].mask) for r in runs.values())


def test_the_ambient_flag_is_off_by_default_without_a_reference():
    assert LabelUpdateConfig().model_ambient == "auto"
    assert PartitionConfig().ambient_log_ratio == float("inf")
