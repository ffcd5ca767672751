"""Faster CID with the same result: skipped rows, folded BatchNorm, torch.compile fallback."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from segjointgene.attribution import CID, summarize
from segjointgene.attribution.cid import _COMPILED, fold_batchnorm
from segjointgene.attribution.summary import needed_rows
from segjointgene.config import AttributionConfig
from segjointgene.preprocess.dataset import ImagePatchDataset
from segjointgene.methods.segjointgene.unet import UNet

#: The default budget of the training loop, shortened (the speed-ups do not depend on the number of steps).
BUDGET = dict(n_steps=6, lr=0.1, lambda_=0.01, stop="steps", warm_start=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def case(sim128):
    """A small UNet trained a little on the simulated patches, the train batch, its class map, 3 targets."""
    ds = ImagePatchDataset(sim128.data_dir, "train")
    x = torch.stack([ds.read_image(i) for i in range(len(ds))])
    labels = ds.labels.classes(ds.labels.instances).long()
    model = UNet(x.shape[1], 4, base_channels=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = gen(0)
    for _ in range(15):  # enough for predictions (and attributions) that depend on the genes
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x + 0.01 * torch.randn(x.shape, generator=g)), labels).backward()
        opt.step()
    model.train()
    return model, x, labels, torch.tensor([1, 2, 3])


def _context(labels: torch.Tensor, halo: int = 3) -> torch.Tensor:
    return torch.nn.functional.pad(labels, (halo,) * 4)


# --------------------------------------------------------------------------------------------- same result
def test_computed_rows_have_exactly_their_full_values(case):
    model, x, labels, targets = case
    full = CID(model).summarize(x, labels, targets, generator=gen(4), **BUDGET)
    rows = torch.zeros(x.shape[0], targets.numel(), dtype=torch.bool)
    rows[0, 1] = rows[1, 0] = rows[1, 2] = True  # a scattered subset; sample 2 left out whole
    part = CID(model).summarize(x, labels, targets, generator=gen(4), rows=rows, **BUDGET)
    torch.testing.assert_close(part.gene_sum[rows], full.gene_sum[rows], rtol=0, atol=1e-5)
    assert (part.gene_sum[2] == 0).all()  # a sample left out whole: no information
    assert torch.isneginf(part.gene_sum[0, 0]).all() and torch.isneginf(part.gene_sum[1, 1]).all()
    assert (part.n_steps[rows] == BUDGET["n_steps"]).all() and (part.n_steps[~rows] == 0).all()
    assert torch.equal(part.type_pixels, full.type_pixels)


@pytest.mark.parametrize("local", [False, True])
def test_needed_rows_keep_the_gene_ranking_sums_unchanged(case, local):
    model, x, labels, targets = case
    labels = labels.clone()
    labels[0] = 0  # a patch without labelled pixels (nothing to rank, nothing can change)
    full = CID(model).summarize(x, labels, targets, generator=gen(5), **BUDGET)
    rows = needed_rows(_context(labels), targets, local_types=local)
    assert not rows[0].any() and rows[1:].any()
    part = CID(model).summarize(x, labels, targets, generator=gen(5), rows=rows, **BUDGET)
    torch.testing.assert_close(part.type_gene_sum, full.type_gene_sum, rtol=1e-5, atol=1e-3)
    assert torch.equal(part.type_pixels, full.type_pixels)
    torch.testing.assert_close(part.gene_sum[rows], full.gene_sum[rows], rtol=0, atol=1e-5)


def test_summarize_uses_the_context_only_when_given(case):
    model, x, labels, targets = case
    labels = labels.clone()
    labels[1] = 0
    cfg = AttributionConfig(method="CID", cid_n_steps=3, cid_types="all")
    plain = summarize(model, x, labels, targets, torch.arange(x.shape[1]), config=cfg, generator=gen(6))
    assert (plain.n_steps == 3).all()
    ctx = _context(labels)
    fast = summarize(model, x, labels, targets, torch.arange(x.shape[1]), config=cfg, generator=gen(6), context=ctx)
    assert (fast.n_steps[1] == 0).all() and (fast.n_steps[0] == 3).all()
    torch.testing.assert_close(fast.type_gene_sum, plain.type_gene_sum, rtol=1e-5, atol=1e-3)
    # a neighbour's cell in the window keeps the patch: its labels can reach the patch
    ctx[1, 0, 0] = int(targets[0])
    kept = summarize(model, x, labels, targets, torch.arange(x.shape[1]), config=cfg, generator=gen(6), context=ctx)
    assert (kept.n_steps[1] == 3).all()
    local = summarize(model, x, labels, targets, torch.arange(x.shape[1]), generator=gen(6), context=ctx,
                      config=AttributionConfig(method="CID", cid_n_steps=3, cid_types="local"))
    assert local.n_steps[1].tolist() == [3, 0, 0]
    off = summarize(model, x, labels, targets, torch.arange(x.shape[1]), generator=gen(6), context=_context(labels),
                    config=AttributionConfig(method="CID", cid_n_steps=3, cid_types="all", cid_skip=False))
    assert (off.n_steps == 3).all()


def test_needed_rows_validates_the_context():
    with pytest.raises(ValueError, match="context"):
        needed_rows(torch.zeros(2, 4, 4), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        CID(nn.Conv2d(2, 3, 1)).summarize(torch.rand(2, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), [1],
                                          n_steps=1, generator=gen(0), rows=torch.ones(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- rankings unchanged
def _rank_correlations(a: torch.Tensor, b: torch.Tensor, pixels: torch.Tensor) -> list[float]:
    """Spearman correlation of the gene ranking (mean score per type) of two (T, n_gene) sums, per type."""
    out = []
    for t in range(a.shape[0]):
        if pixels[t] > 0:
            out.append(spearmanr(a[t].numpy(), b[t].numpy()).statistic)
    return out


def test_fast_cid_keeps_the_rankings_of_the_plain_implementation(case):
    """plain (every row, BatchNorm kept) vs fast (folded BN, skipped rows, local types)."""
    model, x, labels, targets = case
    labels = labels.clone()
    labels[0] = 0
    plain = CID(model, fold_batchnorm=False).summarize(x, labels, targets, generator=gen(7), **BUDGET)
    rows = needed_rows(_context(labels), targets, local_types=True)
    fast = CID(model).summarize(x, labels, targets, generator=gen(7), rows=rows, **BUDGET)
    corr = _rank_correlations(plain.type_gene_sum, fast.type_gene_sum, plain.type_pixels)
    assert len(corr) == targets.numel() and min(corr) >= 0.95, corr
    # per-pixel scores of the computed rows, too
    a, b = plain.gene_sum[rows].flatten(), fast.gene_sum[rows].flatten()
    assert spearmanr(a.numpy(), b.numpy()).statistic >= 0.95


# ------------------------------------------------------------------------------------------- folded BatchNorm
def test_fold_batchnorm_is_the_same_function_and_leaves_the_model_alone(case):
    model, x, _, _ = case
    model = model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert folded is not model and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.train()
    assert fold_batchnorm(model) is model  # never in training mode (batch statistics)
    plain = nn.Conv2d(2, 2, 1).eval()
    assert fold_batchnorm(plain) is plain  # nothing to fold


def test_cid_restores_the_model_with_folding(case):
    model, x, labels, targets = case
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    CID(model).summarize(x, labels, targets, n_steps=2, generator=gen(0))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------------------------- torch.compile
def test_compile_falls_back_to_eager_when_compiling_fails(case, monkeypatch, caplog):
    model, x, labels, targets = case

    def broken(module, *a, **k):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    _COMPILED.pop(model, None)
    ref = CID(model, fold_batchnorm=False).summarize(x[:1], labels[:1], targets[:1], n_steps=2, generator=gen(1))
    with caplog.at_level("WARNING"):
        res = CID(model, compile=True).summarize(x[:1], labels[:1], targets[:1], n_steps=2, generator=gen(1))
    assert "torch.compile failed" in caplog.text and _COMPILED[model] is None
    torch.testing.assert_close(res.gene_sum, ref.gene_sum)
    _COMPILED.pop(model, None)


@pytest.mark.slow
def test_compile_gives_the_same_result_on_cpu():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.rand(2, 3, 16, 16, generator=gen(0))
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    ref = CID(net).summarize(x, labels, [0, 1], n_steps=3, generator=gen(2))
    res = CID(net, compile=True).summarize(x, labels, [0, 1], n_steps=3, generator=gen(2))
    torch.testing.assert_close(res.gene_sum, ref.gene_sum, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(res.n_steps.numpy(), ref.n_steps.numpy())
