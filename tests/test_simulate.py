"""Simulator: determinism, geometry (touching/isolated cells, off-centre smaller nuclei), markers, noise, files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from segjointgene.config import SimulateConfig
from segjointgene.constants import TruthFiles
from segjointgene.io.files import read_section
from segjointgene.evaluate.simulate import simulate_section, write_simulated


@pytest.fixture(scope="module", params=["dense", "sparse"])
def sim(request):
    return simulate_section(SimulateConfig(size_px=256, mode=request.param), rng=7), request.param


def test_same_seed_same_section_other_seed_other_section():
    a = simulate_section(SimulateConfig(size_px=96), rng=3)
    b = simulate_section(SimulateConfig(size_px=96), rng=3)
    c = simulate_section(SimulateConfig(size_px=96), rng=4)
    assert np.array_equal(a.instance, b.instance) and a.spots.equals(b.spots) and np.array_equal(a.dapi, b.dapi)
    assert not np.array_equal(a.instance, c.instance)


def test_geometry(sim):
    s, mode = sim
    inst, nuc = s.instance, s.nuclei
    ids = np.unique(inst[inst > 0])
    assert np.array_equal(ids, np.arange(1, len(s.cells) + 1))  # every cell has a nucleus and an id
    assert ((nuc > 0) <= (inst == nuc)).all()  # nuclei lie inside their own cell
    ratio = s.cells["nucleus_area_px"] / s.cells["area_px"]
    assert ratio.max() < 0.6 and ratio.median() < 0.35  # nuclei smaller than cells
    # off-centre: nucleus centroid away from the cell centroid, relative to the cell radius
    offset = np.hypot(s.cells.x - s.cells.cell_x, s.cells.y - s.cells.cell_y) / np.sqrt(s.cells.area_px / np.pi)
    assert offset.median() > 0.1
    areas = s.cells["area_px"]
    assert areas.quantile(0.9) / areas.quantile(0.1) > 2  # uneven sizes
    touching = (inst[:, 1:] != inst[:, :-1]) & (inst[:, 1:] > 0) & (inst[:, :-1] > 0)
    fg = (inst > 0).mean()
    if mode == "dense":
        assert fg > 0.85 and touching.sum() > 100
    else:
        assert 0.15 < fg < 0.6 and touching.sum() < 0.05 * (inst > 0).sum()


def test_expression_and_noise(sim):
    s, _ = sim
    spots = s.spots
    noise = spots["cell"] == 0
    assert noise.mean() == pytest.approx(0.1, abs=0.02)
    # cell-borne spots lie inside their cell
    cb = spots[~noise]
    assert (s.instance[np.floor(cb.y).astype(int), np.floor(cb.x).astype(int)] == cb.cell).all()
    # a type's markers are enriched in its cells
    markers = s.markers[s.markers.is_marker]
    for t, genes in markers.groupby("celltype")["gene"]:
        own = cb[cb.celltype == t]
        other = cb[cb.celltype != t]
        assert own.gene.isin(genes).mean() > 3 * other.gene.isin(genes).mean()


def test_written_section_reads_back_and_truth_is_complete(tmp_path):
    s = simulate_section(SimulateConfig(size_px=64, n_genes=8, n_celltypes=2), rng=1)
    truth = write_simulated(s, tmp_path / "raw")
    section = read_section(tmp_path / "raw")
    assert section.shape == (64, 64) and section.dapi.dtype == np.uint16 and section.nuclei is None
    assert len(section.spots) == len(s.spots) and len(section.cells) == len(s.cells)
    assert np.array_equal(tifffile.imread(truth / TruthFiles.INSTANCE_MASK), s.instance)
    assert np.array_equal(tifffile.imread(truth / TruthFiles.NUCLEUS_MASK), s.nuclei)
    spots_truth = pd.read_csv(truth / TruthFiles.SPOTS)
    np.testing.assert_allclose(spots_truth.spotX, section.spots.x)
    # the centroid written for each cell lies inside its nucleus (the watershed seed)
    assert (s.nuclei[section.cells.y.astype(int), section.cells.x.astype(int)] == section.cells.cell).all()
