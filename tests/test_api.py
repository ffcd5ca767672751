"""segjointgene.segment: the Python entry point, end to end on a small dense section (the density engine)."""

import numpy as np
import pandas as pd
import pytest

import segjointgene
from segjointgene.cli import main

SMALL = {"net_width": 4, "net_epoch": 1, "num_workers": 0, "num_threads": 1, "patch_size": 64}


@pytest.fixture(scope="module")
def dense_raw(tmp_path_factory):
    """A 96-px simulated sparse section (isolated cells) with ~900 spots per cell, one nucleus (cell 5) left out of the cell tables."""
    work = tmp_path_factory.mktemp("dense")
    assert main(["--step_name=simulate", f"--work_dir={work}", "--datasets_name=d", "--sim_size=96",
                 "--sim_spot_density=3", "--sim_celltypes=2", "--sim_mode=sparse", "--quiet"]) == 0
    raw = work / "data" / "d_raw" / "3_1_left"
    for name in ("cells_sim.csv", "celltype_sim.csv"):
        table = pd.read_csv(raw / name)
        table[table["cell"] != 5].to_csv(raw / name, index=False)
    return raw


def test_segment_returns_the_cells_with_the_de_novo_ones(dense_raw, tmp_path, capsys):
    adata = segjointgene.segment(dense_raw, tmp_path, name="d", options={**SMALL, "model_boundaries": "density"})
    assert "cells from: spot density" in capsys.readouterr().out
    nuclei = pd.read_csv(dense_raw / "cells_sim.csv")["cell"]
    ids = adata.obs_names.astype(int)
    assert set(nuclei) <= set(ids)  # every nucleus is a cell
    denovo = ids[ids > nuclei.max()]
    assert denovo.size >= 1  # the cell whose nucleus was left out (or more) found from its spots
    types = set(pd.read_csv(dense_raw / "celltype_sim.csv")["original_celltype"])
    assert set(adata.obs.loc[denovo.astype(str), "celltype"]) <= types
    assert adata.X.sum() > 0 and adata.obsm["spatial"].shape == (adata.n_obs, 2)
    spots = pd.read_csv(tmp_path / "checkpoints" / "d" / "spotmodel" / "results" / "spots_assigned.csv")
    assert np.isin(denovo, spots["cell"]).all() and spots["prob"].between(0, 1).all()


def test_segment_refuses_a_flag_the_method_does_not_read(dense_raw, tmp_path, capsys):
    with pytest.raises(segjointgene.errors.UserError, match="exit status 2"):
        segjointgene.segment(dense_raw, tmp_path, name="e", method="spotmodel", options={**SMALL, "CID_lr": 0.1})
    assert "applies to --method segjointgene only" in capsys.readouterr().err
