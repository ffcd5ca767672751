"""Differential expression: the statistics against scipy, and the scanpy layout of uns['rank_genes_groups']."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from segjointgene.results.ranking import benjamini_hochberg, differential_expression, normalise_counts, rank_genes_groups_uns


def _counts(seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(2.0, (40, 5)).astype(float)
    counts[:15, 0] += 6  # gene 0 marks type A
    return counts, ["A"] * 15 + ["B"] * 25, [f"g{i}" for i in range(5)]


def test_wilcoxon_matches_scipy_mannwhitneyu_with_tie_correction():
    counts, groups, genes = _counts()
    de = differential_expression(counts, groups, genes)
    x = normalise_counts(counts)
    inside = np.array(groups) == "A"
    a = de[de.celltype == "A"].set_index("gene")
    for j, g in enumerate(genes):
        ref = stats.mannwhitneyu(x[inside, j], x[~inside, j], use_continuity=False, method="asymptotic")
        assert a.loc[g, "pval"] == pytest.approx(ref.pvalue, rel=1e-6)
    assert a.loc["g0", "rank"] == 1 and a.loc["g0", "logfoldchange"] > 1
    assert a.loc["g0", "pct_in"] == 1.0


def test_benjamini_hochberg_against_a_hand_computation():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205])
    # p_(i) * n / i, then the running minimum from the top
    expected = [0.008, 0.032, 0.0672, 0.0672, 0.0672, 0.08, 0.08457, 0.205]
    assert benjamini_hochberg(p) == pytest.approx(expected, rel=1e-3)


def test_rank_genes_groups_layout_round_trips_through_h5ad(tmp_path):
    anndata = pytest.importorskip("anndata")
    counts, groups, genes = _counts(1)
    de = differential_expression(counts, groups, genes)
    adata = anndata.AnnData(X=counts.astype(np.float32), obs=pd.DataFrame({"celltype": pd.Categorical(groups)},
                                                                          index=[str(i) for i in range(40)]),
                            var=pd.DataFrame(index=genes))
    adata.uns["rank_genes_groups"] = rank_genes_groups_uns(de)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = anndata.read_h5ad(tmp_path / "a.h5ad").uns["rank_genes_groups"]
    assert list(back["names"].dtype.names) == ["A", "B"]
    assert back["names"]["A"][0] == "g0"
    assert np.all(np.diff(back["scores"]["A"]) <= 0)  # sorted by score within each group
    assert back["params"]["method"] == "wilcoxon" and back["params"]["groupby"] == "celltype"
    sc = pytest.importorskip("scanpy")
    table = sc.get.rank_genes_groups_df(anndata.read_h5ad(tmp_path / "a.h5ad"), group="A")
    assert table["names"].iloc[0] == "g0"
