"""Differential expression of the segmented cells, with the statistics of scanpy's ``rank_genes_groups``
(layer 1.5: numpy, scipy, pandas).

Per cell type against all other cells: counts normalised to the median total per cell and ``log1p``-transformed;
Wilcoxon rank-sum z-score (normal approximation with the tie correction) and its two-sided p-value,
Benjamini-Hochberg adjusted over the genes of the type; log2 fold change of the mean normalised expression
(``log2((expm1(mean_in) + 1e-9) / (expm1(mean_out) + 1e-9))``, as scanpy computes it from log data); the fraction of
cells expressing the gene inside and outside the type. :func:`rank_genes_groups_uns` lays the result out as
``adata.uns['rank_genes_groups']`` so that ``scanpy.get.rank_genes_groups_df`` and ``scanpy.pl.rank_genes_groups``
read it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse
from scipy import stats

__all__ = ["DE_COLUMNS", "benjamini_hochberg", "differential_expression", "normalise_counts", "rank_genes_groups_uns"]

DE_COLUMNS = ["celltype", "gene", "rank", "score", "logfoldchange", "pval", "pval_adj", "pct_in", "pct_out",
              "mean_in", "mean_out", "n_cells"]


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (monotone, capped at 1).

    >>> benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2])).round(4).tolist()
    [0.04, 0.0533, 0.0533, 0.2]
    """
    p = np.asarray(p, np.float64)
    n = p.size
    if n == 0:
        return p
    order = np.argsort(p)
    scaled = p[order] * n / np.arange(1, n + 1)
    adj = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(adj, 1.0)
    return out


def normalise_counts(counts: np.ndarray) -> np.ndarray:
    """Counts scaled to the median total of the cells with counts, then log1p (scanpy's normalize_total + log1p)."""
    total = counts.sum(1, keepdims=True)
    target = float(np.median(total[total > 0])) if (total > 0).any() else 1.0
    return np.log1p(np.divide(counts * target, total, out=np.zeros_like(counts), where=total > 0))


def _wilcoxon(x: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, two-sided p) of the rank-sum test of every column of ``x`` (cells x genes), ``inside`` vs the rest."""
    n1, n = int(inside.sum()), x.shape[0]
    n2 = n - n1
    ranks = stats.rankdata(x, axis=0)
    rank_sum = ranks[inside].sum(0)
    expected = n1 * (n + 1) / 2.0
    _, tie_counts = zip(*(np.unique(col, return_counts=True) for col in x.T)) if x.shape[1] else ((), ())
    tie = np.array([float((t ** 3 - t).sum()) for t in tie_counts])
    var = n1 * n2 / 12.0 * ((n + 1) - tie / (n * (n - 1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 0, (rank_sum - expected) / np.sqrt(np.maximum(var, 1e-300)), 0.0)
    return z, 2.0 * stats.norm.sf(np.abs(z))


def differential_expression(counts: np.ndarray | scipy.sparse.spmatrix, groups: Sequence[str],
                            genes: Sequence[str], *, min_cells: int = 2) -> pd.DataFrame:
    """Long table (:data:`DE_COLUMNS`) of every type with at least ``min_cells`` cells and at least one other cell;
    rank 1 = the highest z-score (ties in gene order).

    >>> counts = np.array([[5, 0], [4, 1], [6, 0], [0, 3], [1, 4], [0, 5]])
    >>> t = differential_expression(counts, ["A"] * 3 + ["B"] * 3, ["g0", "g1"])
    >>> t[t.celltype == "A"][["gene", "rank"]].values.tolist(), bool(t.pct_in.iloc[0] == 1.0)
    ([['g0', 1], ['g1', 2]], True)
    """
    dense = counts.toarray() if scipy.sparse.issparse(counts) else np.asarray(counts, np.float64)
    dense = dense.astype(np.float64)
    groups = np.asarray(groups, dtype=object)
    x = normalise_counts(dense)
    expressed = dense > 0
    parts = []
    for celltype in sorted(pd.unique(groups)):
        inside = groups == celltype
        if inside.sum() < min_cells or inside.all():
            continue
        z, p = _wilcoxon(x, inside)
        mean_in, mean_out = x[inside].mean(0), x[~inside].mean(0)
        lfc = np.log2((np.expm1(mean_in) + 1e-9) / (np.expm1(mean_out) + 1e-9))
        order = np.argsort(-z, kind="stable")
        rank = np.empty(len(genes), np.int64)
        rank[order] = np.arange(1, len(genes) + 1)
        parts.append(pd.DataFrame({
            "celltype": celltype, "gene": list(genes), "rank": rank, "score": z, "logfoldchange": lfc, "pval": p,
            "pval_adj": benjamini_hochberg(p), "pct_in": expressed[inside].mean(0),
            "pct_out": expressed[~inside].mean(0), "mean_in": dense[inside].mean(0),
            "mean_out": dense[~inside].mean(0), "n_cells": int(inside.sum())}).sort_values("rank"))
    if not parts:
        return pd.DataFrame(columns=DE_COLUMNS)
    return pd.concat(parts, ignore_index=True)[DE_COLUMNS]


def rank_genes_groups_uns(de: pd.DataFrame, *, groupby: str = "celltype") -> dict:
    """``adata.uns['rank_genes_groups']`` in scanpy's layout: record arrays (one field per group, genes sorted by
    score) of names, scores, pvals, pvals_adj, logfoldchanges; ``pts`` / ``pts_rest`` as genes x groups frames."""
    groups = list(dict.fromkeys(de["celltype"]))
    by = {g: de[de["celltype"] == g].sort_values("rank") for g in groups}

    def records(column: str, dtype) -> np.ndarray:
        arrays = [by[g][column].to_numpy(dtype) for g in groups]
        if dtype is str:  # fixed-length strings: what h5py and anndata write
            arrays = [a.astype(str) for a in arrays]
        return np.rec.fromarrays(arrays, names=groups)

    genes = by[groups[0]]["gene"].sort_values().to_numpy() if groups else np.array([], object)
    pts = pd.DataFrame({g: by[g].set_index("gene")["pct_in"] for g in groups}).reindex(genes)
    pts_rest = pd.DataFrame({g: by[g].set_index("gene")["pct_out"] for g in groups}).reindex(genes)
    return {
        "params": {"groupby": groupby, "reference": "rest", "method": "wilcoxon", "use_raw": False, "layer": None,
                   "corr_method": "benjamini-hochberg"},
        "names": records("gene", str), "scores": records("score", np.float32),
        "pvals": records("pval", np.float64), "pvals_adj": records("pval_adj", np.float64),
        "logfoldchanges": records("logfoldchange", np.float32), "pts": pts, "pts_rest": pts_rest,
    }
