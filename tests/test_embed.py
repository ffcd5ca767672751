"""SegCLR-style embeddings: loss, sampling, augmentations, crops, aggregation, exports, and the embed step."""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from segjointgene.embed import (ChannelStats, CropBuilder, SectionInputs, apply_d4, batch_cells, cell_mean,
                                cell_pixels, coherence, draw_view_params, export_points, identity_params,
                                md5_shard, nt_xent, radius_mean, read_cell, read_csvzip, read_manifest,
                                sample_pairs, write_csvzip)
from segjointgene.embed import export as export_mod
from segjointgene.embed.export import EmbeddingFiles

from tests.conftest import make_sim


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------- NT-Xent
def test_nt_xent_hand_computed_2x2():
    # views a = [(1, 0), (0, 1)], b = [(1, 0), (1, 1)/sqrt 2], temperature 0.5
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    s = 1 / math.sqrt(2)
    t = 0.5
    # row a0: positive a0.b0 = 1, negatives a0.b1 = s, a0.a1 = 0
    la0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(s / t) + math.exp(0)))
    # row a1: positive a1.b1 = s, negatives a1.b0 = 0, a1.a0 = 0
    la1 = -math.log(math.exp(s / t) / (math.exp(s / t) + 1 + 1))
    # row b0: positive b0.a0 = 1, negatives b0.a1 = 0, b0.b1 = s
    lb0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1 + math.exp(s / t)))
    # row b1: positive b1.a1 = s, negatives b1.a0 = s, b1.b0 = s
    lb1 = -math.log(1 / 3)
    expected = 0.5 * ((la0 + la1) / 2 + (lb0 + lb1) / 2)
    assert float(nt_xent(a, b, t)) == pytest.approx(expected, abs=1e-6)
    assert float(nt_xent(b, a, t)) == pytest.approx(expected, abs=1e-6)  # symmetric


def test_nt_xent_properties():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    other = torch.randn(8, 16, generator=g)
    assert float(nt_xent(z, z, 0.1)) < float(nt_xent(z, other, 0.1))  # identical views beat random pairs
    collapsed = torch.ones(8, 16)
    assert float(nt_xent(collapsed, collapsed, 0.3)) == pytest.approx(math.log(2 * 8 - 1), abs=1e-5)
    # temperature: with orthonormal pairs the loss is log(1 + (2n - 2) e^{-1/t}) and falls as t falls
    eye = torch.eye(4)
    for t in (0.5, 1.0, 2.0):
        assert float(nt_xent(eye, eye, t)) == pytest.approx(math.log(1 + 6 * math.exp(-1 / t)), abs=1e-6)
    # scale invariance (vectors are normalised)
    assert float(nt_xent(3 * z, z, 0.2)) == pytest.approx(float(nt_xent(z, z, 0.2)), abs=1e-5)


# --------------------------------------------------------------------------------------------------- sampling
def _toy_instance() -> np.ndarray:
    inst = np.zeros((40, 40), np.uint32)
    inst[2:18, 2:30] = 3
    inst[20:38, 5:15] = 8
    inst[22:30, 20:38] = 11
    inst[0, 39] = 12  # a one-pixel cell
    return inst


def test_sample_pairs_inside_the_same_cell_with_max_distance():
    inst = _toy_instance()
    px = cell_pixels(inst)
    rng = np.random.default_rng(0)
    for max_dist in (0.0, 4.0):
        pos = np.tile(np.arange(px.ids.size), 50)
        a, b = sample_pairs(px, pos, rng, max_dist_px=max_dist)
        ids = px.ids[pos]
        assert np.array_equal(inst[a[:, 0], a[:, 1]], ids)
        assert np.array_equal(inst[b[:, 0], b[:, 1]], ids)
        if max_dist:
            assert np.all(np.hypot(*(a - b).T) <= max_dist + 1e-9)
    a, b = sample_pairs(px, np.arange(px.ids.size), rng)
    assert not np.array_equal(a, b)  # different points (the big cells almost surely)


def test_batches_hold_each_cell_at_most_once():
    it = batch_cells(10, 4, np.random.default_rng(1))
    seen = np.zeros(10, int)
    for _ in range(50):
        batch = next(it)
        assert len(batch) == 4 and len(set(batch.tolist())) == 4
        seen[batch] += 1
    assert (seen > 0).all()
    with pytest.raises(ValueError):
        next(batch_cells(3, 4, np.random.default_rng(0)))


def test_export_points_inside_cells_and_capped():
    inst = _toy_instance()
    pts = export_points(cell_pixels(inst), stride_px=3, max_points=6, rng=0)
    assert np.array_equal(inst[pts["row"], pts["col"]], pts["cell"])
    assert pts.groupby("cell").size().max() <= 6
    assert set(pts["cell"]) == {3, 8, 11, 12}  # every cell, also the one-pixel cell, has a point
    assert not pts.duplicated(["cell", "row", "col"]).any()
    assert (pts.groupby("cell")["point_id"].min() == 0).all()


# --------------------------------------------------------------------------------------------------- crops
def _toy_inputs(has_dapi: bool = True) -> SectionInputs:
    inst = _toy_instance()
    rng = np.random.default_rng(0)
    n = 600
    x, y = rng.uniform(0, 40, n), rng.uniform(0, 40, n)
    dapi = rng.uniform(0, 1000, inst.shape) if has_dapi else None
    return SectionInputs.from_arrays(inst, rng.integers(0, 3, n), x, y, ["a", "b", "c"], dapi=dapi,
                                     nuclei=(inst == 3).astype(np.uint32) * 3)


def test_d4_is_invertible_and_channel_consistent():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for k in range(8):
        y = apply_d4(x, [k, k])
        inv = (4 - k) % 4 if k < 4 else k
        assert torch.equal(apply_d4(y, [inv, inv]), x)
        # the same transform on every channel: channel c of y == transform of channel c alone
        for c in range(3):
            assert torch.equal(y[:, c:c + 1], apply_d4(x[:, c:c + 1], [k, k]))


def test_crop_masking_modes_and_thinning():
    inputs = _toy_inputs()
    ids = np.array([3, 8])
    centres = np.array([[10, 15], [28, 10]])
    built = {}
    for mode in ("masked+channel", "masked", "channel", "none"):
        b = CropBuilder(inputs, None, crop_px=16, input_px=16, mask_mode=mode, blur_sigma_px=0.0)
        x = b.build(ids, centres)
        assert x.shape == (2, b.in_channels, 16, 16)
        built[mode] = x
    # masked content is zero outside the cell mask dilated by 1 px; unmasked content is not
    b = CropBuilder(inputs, None, crop_px=16, input_px=16, mask_mode="masked+channel", blur_sigma_px=0.0)
    mask = built["masked+channel"][:, -1] > 0
    from scipy import ndimage

    content = np.stack([ndimage.binary_dilation(m, np.ones((3, 3))) for m in mask.numpy()])
    genes_dapi = built["masked+channel"][:, :-1].abs().sum(1).numpy()
    assert np.all(genes_dapi[~content] == 0)
    assert built["none"][:, :-1].abs().sum(1).numpy()[~content].sum() > 0
    assert torch.equal(built["masked+channel"][:, :-1], built["masked"])
    assert torch.equal(built["channel"][:, -1], built["masked+channel"][:, -1])
    # binomial thinning never adds spots
    n = 2
    thin = identity_params(n, 3)
    thin = type(thin)(**{**thin.__dict__, "keep_prob": np.full(n, 0.5)})
    full_counts = b._raw(ids, centres, identity_params(n, 3), None)[0]
    thin_counts = b._raw(ids, centres, thin, np.random.default_rng(0))[0]
    assert np.all(thin_counts <= full_counts) and thin_counts.sum() < full_counts.sum()
    # augmented views keep the shape; D4 / blur / gain change the content
    p = draw_view_params(n, 3, np.random.default_rng(3))
    assert b.build(ids, centres, p, rng=np.random.default_rng(0)).shape == (2, 5, 16, 16)


def test_crop_stats_projection_reduces_genes():
    inputs = _toy_inputs(has_dapi=False)
    from segjointgene.embed import fit_channel_stats

    stats = fit_channel_stats(inputs, np.array([3, 8, 11]), np.array([[10, 15], [28, 10], [25, 28]]), n_pcs=2,
                              crop_px=16, input_px=8, blur_sigma_px=1.0)
    assert stats.projection.shape == (3, 2) and stats.scale.shape == (2,)
    b = CropBuilder(inputs, stats, crop_px=16, input_px=8, mask_mode="masked+channel")
    assert b.build(np.array([3]), np.array([[10, 15]])).shape == (1, 4, 8, 8)
    assert isinstance(stats, ChannelStats)


# --------------------------------------------------------------------------------------------------- aggregation
def test_radius_aggregation_limits():
    rng = np.random.default_rng(0)
    cell = np.repeat([1, 2, 5], [4, 3, 5])
    xy = rng.uniform(0, 10, (cell.size, 2))
    emb = rng.normal(size=(cell.size, 3))
    assert np.allclose(radius_mean(emb, xy, cell, 0.0), emb)
    means = cell_mean(emb, cell, np.array([1, 2, 5]))
    inf = radius_mean(emb, xy, cell, np.inf)
    big = radius_mean(emb, xy, cell, 1e6)
    assert np.allclose(inf, means[np.searchsorted([1, 2, 5], cell)], atol=1e-6)
    assert np.allclose(big, inf, atol=1e-6)  # never mixes cells, even when all points are within the radius
    coh = coherence(np.vstack([emb[:4], -emb[:1]]), np.array([1, 1, 1, 1, 2]), np.array([1, 2]))
    assert np.isnan(coh[1]) and -1 <= coh[0] <= 1


# --------------------------------------------------------------------------------------------------- CSV-ZIP
def test_md5_sharder_matches_the_documented_rule():
    for oid, n, width in ((1, 10, 8), (864691135, 10000, 8), (864691135, 10000, 64), (2 ** 40 + 7, 3, 64)):
        digest = hashlib.md5(oid.to_bytes(width, "little")).digest()
        assert md5_shard(oid, n, bytewidth=width) == int.from_bytes(digest, "little") % n
    # pinned: md5(01 00 00 00 00 00 00 00) = 33cdeccccebe80329f1fdbee7f5874cb; as a little-endian integer mod 10000
    assert hashlib.md5((1).to_bytes(8, "little")).hexdigest() == "33cdeccccebe80329f1fdbee7f5874cb"
    assert md5_shard(1, 10000) == 9811
    assert md5_shard(1, 10000, bytewidth=64) == 3132  # SegCLR's public releases hashed 64-byte ids


def test_csvzip_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cell = np.repeat([7, 42, 1000003], [3, 1, 4])
    pid = np.concatenate([[0, 1, 2], [0], [0, 1, 2, 3]])
    coords = np.column_stack([rng.integers(0, 500, cell.size) + 0.5, rng.uniform(0, 500, cell.size),
                              np.zeros(cell.size)]) * 0.108
    emb = rng.normal(size=(cell.size, 5)).astype(np.float32)
    out = tmp_path / "csvzip"
    manifest = write_csvzip(out, cell, pid, coords, emb, num_shards=2, bytewidth=8, metadata={"pixel_size_um": 0.108})
    assert json.loads((out / "manifest.json").read_text()) == manifest == read_manifest(out)
    assert manifest["num_shards"] == 2 and manifest["embedding_dim"] == 5 and manifest["n_points"] == 8
    back = read_csvzip(out)
    assert sorted(back) == [7, 42, 1000003]
    for c in (7, 42, 1000003):
        sel = cell == c
        got = back[c]
        assert np.array_equal(got.point_id, pid[sel])
        assert np.array_equal(got.coords, coords[sel])  # exact
        assert np.array_equal(got.emb, emb[sel])  # exact float32
        one = read_cell(out, c)
        assert np.array_equal(one.emb, emb[sel])
        assert len(got.as_coord_dict()) == sel.sum()
    # the member sits in the shard of the MD5 rule; no header, no trailing newline
    for c in (7, 42, 1000003):
        shard = out / f"{md5_shard(c, 2, bytewidth=8)}.zip"
        with zipfile.ZipFile(shard) as zf:
            text = zf.read(f"{c}.csv").decode()
        assert not text.endswith("\n") and text.split("\n")[0].split(",")[0] == "0"
        assert len(text.split("\n")) == (cell == c).sum()
    # a SegCLR-style reader with explicit parameters works without the manifest
    (out / "manifest.json").unlink()
    assert np.array_equal(read_cell(out, 42, num_shards=2, bytewidth=8).emb, emb[cell == 42])
    # our reader tolerates a header and a trailing newline
    parsed = export_mod._parse_csv("point_id,x,y,z,e0\n0,1.5,2.5,0,0.25\n", "t")
    assert parsed.emb.tolist() == [[0.25]]


def test_write_table_falls_back_to_npz(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "anndata_available", lambda: False)
    obs = pd.DataFrame({"cell": [1, 2], "x": [1.0, 2.0]}, index=["1", "2"])
    path = export_mod.write_table(tmp_path / "e.h5ad", obs, {"X_segclr": np.ones((2, 3), np.float32)},
                                  uns={"a": None}, fallback_npz=tmp_path / "e.npz", fallback_obs=tmp_path / "e.csv")
    assert path == tmp_path / "e.npz" and not (tmp_path / "e.h5ad").exists()
    with np.load(path) as z:
        assert z["obsm_X_segclr"].shape == (2, 3) and z["obs_names"].tolist() == ["1", "2"]
    assert pd.read_csv(tmp_path / "e.csv", index_col=0)["cell"].tolist() == [1, 2]


# --------------------------------------------------------------------------------------------------- the step
def make_run(work: Path) -> tuple:
    """A simulated, preprocessed section plus a run folder whose results are the true masks."""
    import tifffile

    from segjointgene.io.files import write_csv, write_tif

    sp = make_sim(work, size=96, n_genes=8, n_celltypes=3)
    results = work / "checkpoints" / sp.name / "run" / "results"
    results.mkdir(parents=True)
    inst = tifffile.imread(sp.truth_dir / "instance_mask.tif")
    write_tif(results / "instance_mask.tif", inst)
    write_tif(results / "initial_instance_mask.tif", tifffile.imread(sp.truth_dir / "nucleus_mask.tif"))
    cells = pd.read_csv(sp.truth_dir / "cells_truth.csv")
    write_csv(results / "cells.csv", cells[["cell", "celltype", "x", "y", "area_px"]])
    return sp, results


FAST = ["--embed_preset=micro", "--embed_steps=6", "--embed_batch_size=8", "--embed_input_px=16",
        "--embed_dim=16", "--embed_proj_dim=8", "--embed_max_points=4", "--embed_point_stride=5", "--quiet",
        "--device=cpu"]


def _cli(sp, *extra: str) -> int:
    from segjointgene.cli import main

    return main(["--step_name=embed", f"--work_dir={sp.work_dir}", f"--datasets_name={sp.name}",
                 "--CA1_sub_path=section", "--net_sub_suffix=run", "--random_seed=5", *FAST, *extra])


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    sp, results = make_run(tmp_path_factory.mktemp("embed"))
    assert _cli(sp) == 0
    return sp, results


def test_embed_step_outputs(embedded):
    import anndata

    sp, results = embedded
    ad = anndata.read_h5ad(results / EmbeddingFiles.CELLS_H5AD)
    truth = pd.read_csv(sp.truth_dir / "cells_truth.csv")
    assert ad.obsm["X_segclr"].shape == (len(truth), 16)
    assert np.isfinite(ad.obsm["X_segclr"]).all()
    assert ad.obsm["spatial"].shape == (len(truth), 2)
    assert ad.X.shape == (len(truth), 8) and ad.var_names.tolist() == sorted(set(ad.var_names))
    assert ad.obs["celltype_nucleus"].isin(truth["celltype"]).all()
    pts = anndata.read_h5ad(results / EmbeddingFiles.POINTS_H5AD)
    assert pts.obsm["X_segclr"].shape == pts.obsm["X_segclr_agg"].shape == (pts.n_obs, 16)
    assert set(pts.obs["compartment"]) <= {"nucleus", "cytoplasm"}
    back = read_csvzip(results / EmbeddingFiles.CSVZIP)
    assert len(back) == len(truth) and sum(len(v.point_id) for v in back.values()) == pts.n_obs
    first = int(pts.obs["cell"].iloc[0])
    sel = (pts.obs["cell"] == first).to_numpy()
    assert np.array_equal(back[first].emb, pts.obsm["X_segclr"][sel])
    # the per-cell embedding is the mean of the cell's points
    i = ad.obs_names.get_loc(str(first))
    assert np.allclose(ad.obsm["X_segclr"][i], pts.obsm["X_segclr"][sel].mean(0), atol=1e-5)
    assert read_manifest(results / EmbeddingFiles.CSVZIP_AGG)["aggregation_radius_um"] == 10.0
    assert (results / "figures" / EmbeddingFiles.FIGURE).stat().st_size > 0
    state = torch.load(results / EmbeddingFiles.ENCODER, weights_only=True)
    assert state["crop_px"] >= 16 and state["mask_mode"] == "masked+channel"
    log = pd.read_csv(results / EmbeddingFiles.TRAIN_LOG)
    assert np.isfinite(log["loss"]).all()


def test_embed_step_is_deterministic(embedded, tmp_path):
    import anndata

    sp, results = embedded
    first = anndata.read_h5ad(results / EmbeddingFiles.CELLS_H5AD).obsm["X_segclr"].copy()
    assert _cli(sp) == 0
    again = anndata.read_h5ad(results / EmbeddingFiles.CELLS_H5AD).obsm["X_segclr"]
    assert np.array_equal(first, again)
    # outputs made with other settings are only replaced with --overwrite
    assert _cli(sp, "--embed_temperature=0.2") == 2
    assert _cli(sp, "--random_seed=6") == 2
    assert np.array_equal(anndata.read_h5ad(results / EmbeddingFiles.CELLS_H5AD).obsm["X_segclr"], first)


def test_embed_step_errors(tmp_path):
    from segjointgene.cli import main

    code = main(["--step_name=embed", f"--work_dir={tmp_path}", "--datasets_name=none", "--net_sub_suffix=x",
                 "--quiet"])
    assert code == 2  # a usage error naming the missing run file, no traceback
