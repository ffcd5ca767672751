"""SNGP classifier: bounded spectral norm, random Fourier features, GP variance, uncertainty, the classify step."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from segjointgene.classify import (BoundedSpectralNorm, RandomFeatureGP, add_bounded_spectral_norm, auroc,
                                   dempster_shafer, expected_calibration_error, fit_sngp, mahalanobis_score,
                                   mean_field_logits, predict, random_fourier_features, spatial_split)
from segjointgene.config import ClassifyConfig


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sigma_max(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach(), ord=2))


# --------------------------------------------------------------------------------------------------- spectral norm
@pytest.mark.parametrize("bound", [0.95, 6.0])
def test_spectral_norm_bound_holds_after_training_steps(bound):
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(12, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, 12, generator=g) * 5.0)  # sigma well above both bounds
    add_bounded_spectral_norm(layer, bound, generator=g)
    opt = torch.optim.Adam(layer.parameters(), lr=0.5)  # large steps push the raw weight around
    x, y = torch.randn(64, 12, generator=g), torch.randn(64, 10, generator=g) * 50
    layer.train()
    for _ in range(30):
        loss = ((layer(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # let the power iteration catch up with the last update
        for _ in range(30):
            _ = layer.weight
    layer.eval()
    assert _sigma_max(layer.parametrizations.weight.original) > bound  # the raw weight is beyond the bound
    assert _sigma_max(layer.weight) <= bound * (1 + 1e-3)


def test_spectral_norm_leaves_small_weights_unchanged():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, generator=g)
    w = w / _sigma_max(w) * 0.5  # sigma = 0.5 < bound
    p = BoundedSpectralNorm(w, 0.95, generator=g)
    assert torch.allclose(p(w), w)
    p.train()
    big = w * 10  # sigma = 5 -> rescaled to the bound
    for _ in range(20):
        out = p(big)
    assert _sigma_max(out) == pytest.approx(0.95, rel=1e-3)


# --------------------------------------------------------------------------------------------------- RFF / GP
def test_random_fourier_features_approximate_the_rbf_kernel():
    g = torch.Generator().manual_seed(0)
    d, h, ell = 4096, 5, 1.5
    omega = torch.randn(h, d, generator=g, dtype=torch.float64)
    b = torch.rand(d, generator=g, dtype=torch.float64) * 2 * math.pi
    x = torch.randn(20, h, generator=g, dtype=torch.float64)
    phi = random_fourier_features(x, omega, b, ell)
    approx = phi @ phi.T
    exact = torch.exp(-torch.cdist(x, x) ** 2 / (2 * ell ** 2))
    assert float((approx - exact).abs().max()) < 0.08
    assert float((approx - exact).abs().mean()) < 0.02


def test_gp_variance_grows_away_from_the_data():
    g = torch.Generator().manual_seed(0)
    gp = RandomFeatureGP(3, 2, 1024, lengthscale=1.0, ridge=1e-3, layernorm=False, generator=g)
    data = torch.randn(400, 3, generator=g) * 0.3  # clustered near the origin
    gp.update_precision(data)
    gp.finalize()
    ray = torch.tensor([1.0, 1.0, 1.0]) / math.sqrt(3)
    t = torch.linspace(0, 6, 13)
    var = gp.variance(t[:, None] * ray[None, :])
    assert float(var[0]) < 0.01 and float(var[-1]) > 0.8  # ~0 at the data, ~1 (the prior) far away
    assert torch.all(var[1:] >= var[:-1] - 0.02)  # rises (up to the random-feature noise)
    logits = torch.full((13, 2), 0.0)
    logits[:, 0] = 4.0
    prob = torch.softmax(mean_field_logits(logits, var, math.pi / 8), 1)[:, 0]
    assert float(prob[-1]) < float(prob[0])  # less confident far from the data


def test_dempster_shafer_and_mean_field():
    z = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    u = dempster_shafer(z)
    assert float(u[0]) == pytest.approx(0.5)
    assert float(u[1]) == pytest.approx(3 / (3 + math.exp(10) + 2), rel=1e-5)
    assert torch.equal(mean_field_logits(z, torch.ones(2), 0.0), z)
    assert torch.allclose(mean_field_logits(z, torch.full((2,), 8 / math.pi), math.pi / 8), z / math.sqrt(2))


# --------------------------------------------------------------------------------------------------- fit / predict
def _blobs(rng, n_per=60, centres=((0, 0), (4, 0), (0, 4))):
    x = np.concatenate([rng.normal(c, 0.5, (n_per, 2)) for c in centres]).astype(np.float32)
    y = np.repeat([f"T{i}" for i in range(len(centres))], n_per)
    return x, y


FAST = ClassifyConfig(hidden=32, blocks=1, gp_features=256, epochs=40, patience=8, batch_size=64, lr=3e-3)


def test_fit_sngp_separates_and_flags_far_points():
    rng = np.random.default_rng(0)
    x, y = _blobs(rng)
    xv, yv = _blobs(rng, 20)
    fitted = fit_sngp(x, y, xv, yv, FAST, generator=torch.Generator().manual_seed(0), rng=1)
    p = predict(fitted, xv)
    assert np.mean(p.label == yv) > 0.95
    # auto length-scale: three candidates, the one with the lowest validation NLL kept
    assert len(fitted.lengthscale_nll) == 3
    best = min(fitted.lengthscale_nll, key=fitted.lengthscale_nll.get)
    assert float(fitted.model.gp.lengthscale) == pytest.approx(best, rel=1e-6)
    assert np.allclose(p.prob.sum(1), 1, atol=1e-5) and p.prob.shape == (60, 3)
    far = rng.normal((-6, -6), 0.5, (40, 2)).astype(np.float32)
    q = predict(fitted, far)
    assert auroc(p.uncertainty, q.uncertainty) > 0.9
    assert np.median(q.variance) > np.median(p.variance)
    # deterministic for fixed generators
    again = fit_sngp(x, y, xv, yv, FAST, generator=torch.Generator().manual_seed(0), rng=1)
    assert np.array_equal(predict(again, xv).uncertainty, p.uncertainty)
    # the plain-MLP ablation (no spectral norm, no GP) has no variance
    plain = fit_sngp(x, y, xv, yv, ClassifyConfig(**{**FAST.__dict__, "spec_norm_bound": 0.0, "gp_features": 0}),
                     generator=torch.Generator().manual_seed(0), rng=1)
    assert np.all(predict(plain, xv).variance == 0)


def test_evaluation_helpers():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (500, 2))
    held = spatial_split(xy, 0.2, 25.0, rng=0)
    assert 0.15 < held.mean() < 0.4
    blocks = np.floor(xy / 25.0)
    key = blocks[:, 0] * 10 + blocks[:, 1]
    for k in np.unique(key):  # whole blocks only
        assert held[key == k].all() or not held[key == k].any()
    x, y = _blobs(rng)
    d_in = mahalanobis_score(x, y, x)
    d_out = mahalanobis_score(x, y, np.full((5, 2), 20.0, np.float32))
    assert d_out.min() > np.percentile(d_in, 99)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0


# --------------------------------------------------------------------------------------------------- the step
def test_classify_step_end_to_end(tmp_path):
    import anndata

    from segjointgene.cli import main
    from tests.test_embed import FAST as EMBED_FAST
    from tests.test_embed import make_run

    sp, results = make_run(tmp_path)
    common = [f"--work_dir={sp.work_dir}", f"--datasets_name={sp.name}", "--CA1_sub_path=section",
              "--net_sub_suffix=run", "--random_seed=3", "--device=cpu", "--quiet"]
    assert main(["--step_name=embed", *common, *EMBED_FAST, "--embed_steps=2"]) == 0
    fast = ["--classify_hidden=16", "--classify_gp_features=128", "--classify_epochs=20", "--classify_min_cells=2"]
    assert main(["--step_name=classify", *common, *fast]) == 0
    table = pd.read_csv(results / "celltypes_sngp.csv")
    truth = pd.read_csv(sp.truth_dir / "cells_truth.csv")
    assert len(table) == len(truth)
    assert set(table.columns) >= {"cell", "label", "split", "predicted", "probability", "uncertainty", "is_ood"}
    assert table["probability"].between(0, 1).all() and table["uncertainty"].between(0, 1).all()
    assert set(table["split"]) <= {"train", "val", "excluded", "unlabelled"} and (table["split"] == "val").any()
    val = table[table["split"] == "val"]
    # the threshold keeps ~95 % of the held-out in-distribution cells
    assert val["is_ood"].mean() <= 0.25
    obs = anndata.read_h5ad(results / "embeddings.h5ad").obs
    assert {"sngp_predicted", "sngp_uncertainty", "sngp_is_ood"} <= set(obs.columns)
    state = torch.load(results / "sngp_classifier.pt", weights_only=True)
    assert np.allclose(table["ood_score"], table["variance"])  # the default OOD score
    assert state["threshold"] == pytest.approx(float(np.quantile(val["ood_score"], 0.95)), rel=1e-5)
    assert (table["is_ood"] == (table["ood_score"] > state["threshold"])).all()
    assert (results / "figures" / "sngp_uncertainty_pca.png").is_file()
    # deterministic
    assert main(["--step_name=classify", *common, *fast]) == 0
    again = pd.read_csv(results / "celltypes_sngp.csv")
    pd.testing.assert_frame_equal(table, again)
    # other settings: refused without --overwrite, applied with it
    assert main(["--step_name=classify", *common, *fast, "--classify_ood_score=ds"]) == 2
    assert main(["--step_name=classify", *common, *fast, "--classify_ood_score=ds", "--overwrite"]) == 0
    ds = pd.read_csv(results / "celltypes_sngp.csv")
    assert np.allclose(ds["ood_score"], ds["uncertainty"])


def test_reads_the_npz_fallback_of_the_embed_step(tmp_path, monkeypatch):
    from segjointgene.classify.run import read_cell_embeddings
    from segjointgene.embed import export as export_mod
    from segjointgene.embed.export import EmbeddingFiles

    monkeypatch.setattr(export_mod, "anndata_available", lambda: False)
    obs = pd.DataFrame({"cell": [4, 9], "x": [1.0, 2.0], "y": [3.0, 4.0]}, index=["4", "9"])
    emb = np.arange(6, dtype=np.float32).reshape(2, 3)
    export_mod.write_table(tmp_path / EmbeddingFiles.CELLS_H5AD, obs, {"X_segclr": emb},
                           fallback_npz=tmp_path / EmbeddingFiles.CELLS_NPZ,
                           fallback_obs=tmp_path / EmbeddingFiles.CELLS_OBS)
    table = read_cell_embeddings(tmp_path)
    assert np.array_equal(table.emb, emb) and table.obs["cell"].tolist() == [4, 9]
    with pytest.raises(FileNotFoundError):
        read_cell_embeddings(tmp_path / "nothing")
