"""Run outputs (segjointgene.results.export): the SPEC §5 files from a label cache, AnnData, gene ranking, the CLI step."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.segmentation import expand_labels

from segjointgene.cli import main
from segjointgene.config import PreprocessConfig, SimulateConfig
from segjointgene.io.runfolder import FigureFiles, ResultFiles
from segjointgene.errors import InputNotFoundError
from segjointgene.results.export import (available_epochs, export_results, gene_ranking_tables, resolve_epoch,
                                 write_gene_ranking)
from segjointgene.io.metadata import DatasetMetadata, load_metadata
from segjointgene.io.files import load_npz, read_section, save_npz, write_csv, write_json, write_raw_section
from segjointgene.preprocess.geometry import parse_patch_name
from segjointgene.preprocess.pipeline import preprocess_section
from segjointgene.evaluate.simulate import simulate_section
from segjointgene.results.stitch import patch_from_raw, raw_window, stitch_patch_channel
from tests.conftest import make_sim

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTRACT = [ResultFiles.INSTANCE_MASK, ResultFiles.CELLTYPE_MASK, ResultFiles.INITIAL_MASK, ResultFiles.CELLTYPES,
            ResultFiles.SPOTS, ResultFiles.CELLS, ResultFiles.ANNDATA, ResultFiles.GENE_RANKING,
            ResultFiles.GENE_SCORES]


def _lut(data: Path) -> np.ndarray:
    cells = pd.read_csv(data / "cells.csv")
    lut = np.zeros(int(cells["cell"].max()) + 1, np.int64)
    lut[cells["cell"].to_numpy()] = cells["celltype_id"].to_numpy()
    return lut


def make_run(work: Path, name: str, data: Path, *, grow: int = 3, epoch: int = 5, splits=("train", "test"),
             attribution: bool = True, train_log: bool = True) -> tuple[Path, np.ndarray]:
    """A run folder with a label cache whose labels are the nuclei grown by ``grow`` px (the trainer's format)."""
    torch = pytest.importorskip("torch")
    from segjointgene.preprocess.dataset import LabelStore, save_label_cache

    meta = load_metadata(data)
    run = work / "checkpoints" / name / "run"
    run.mkdir(parents=True, exist_ok=True)
    grown = expand_labels(stitch_patch_channel(data, meta, "instance", dtype=np.int64), grow).astype(np.uint32)
    lut = _lut(data)
    stores = {}
    for split in splits:
        names = meta.split[split]
        inst = np.stack([patch_from_raw(grown, meta, n) for n in names]).astype(np.int32)
        stores[split] = LabelStore(names, torch.from_numpy(inst), lut)
    save_label_cache(run / f"labels_cache_{epoch}.npz", stores)
    write_json(run / "run.json", {"datasets_name": name, "data_dir": str(data.resolve()), "raw_dir": "",
                                  "config": {}, "package_version": "0.1.0"})
    if train_log:
        write_csv(run / "train_log.csv", pd.DataFrame({
            "epoch": np.arange(epoch + 1), "loss": np.linspace(1.5, 0.4, epoch + 1),
            "pixel_acc": np.linspace(0.5, 0.9, epoch + 1), "n_relabelled": np.arange(epoch + 1)[::-1] * 10,
            "cell_calling": np.linspace(1, 2, epoch + 1), "cid_seconds": np.r_[np.zeros(2), np.ones(epoch - 1)],
            "epoch_seconds": np.full(epoch + 1, 1.5), "some_new_metric": np.nan}))
    if attribution:
        n_t, n_g = len(meta.celltypes) - 1, len(meta.genes)
        rng = np.random.default_rng(0)
        save_npz(run / f"attribution_{epoch}.npz", {
            "type_gene_sum": rng.random((n_t, n_g)) * 10, "type_pixels": np.arange(1.0, n_t + 1),
            "targets": np.arange(1, n_t + 1, dtype=np.int64), "genes": np.arange(n_g, dtype=np.int64),
            "method": np.array("CID")})
    return run, grown


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A simulated section, a fake run grown from its nuclei, and its export."""
    work = tmp_path_factory.mktemp("export")
    sim = make_sim(work, size=128, patch_size=64)
    run, grown = make_run(work, sim.name, sim.data_dir)
    out = export_results(run)
    return {"sim": sim, "run": run, "grown": grown, "out": out, "meta": load_metadata(sim.data_dir)}


def test_every_contract_file_with_shapes_and_dtypes(exported):
    out, meta = exported["out"], exported["meta"]
    assert out == exported["run"] / "results"
    for name in CONTRACT:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    raw_shape = tuple(meta.raw_shape)
    inst = tifffile.imread(out / ResultFiles.INSTANCE_MASK)
    types = tifffile.imread(out / ResultFiles.CELLTYPE_MASK)
    initial = tifffile.imread(out / ResultFiles.INITIAL_MASK)
    assert inst.shape == types.shape == initial.shape == raw_shape
    assert inst.dtype == np.uint32 and initial.dtype == np.uint32 and types.dtype == np.uint8
    np.testing.assert_array_equal(inst, exported["grown"])
    np.testing.assert_array_equal(types, _lut(exported["sim"].data_dir)[inst])
    truth_nuclei = tifffile.imread(exported["sim"].truth_dir / "nucleus_mask.tif")
    assert (initial > 0).sum() > 0 and ((initial > 0) <= (inst > 0)).all()  # cells contain their nuclei
    assert initial.shape == truth_nuclei.shape
    celltypes = pd.read_csv(out / ResultFiles.CELLTYPES)
    assert celltypes.to_dict("list") == {"id": list(range(len(meta.celltypes))), "name": list(meta.celltypes)}


def test_figures_are_nonempty_pngs(exported):
    fig_dir = exported["out"] / ResultFiles.FIGURES
    for name in (FigureFiles.OVERVIEW, FigureFiles.ZOOM, FigureFiles.INITIAL_VS_FINAL, FigureFiles.TRAINING,
                 FigureFiles.RANKING):
        path = fig_dir / name
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000, name
    import matplotlib.image

    img = matplotlib.image.imread(fig_dir / FigureFiles.OVERVIEW)
    assert img.ndim == 3 and img.std() > 0.05  # not a blank canvas


def test_spots_every_input_spot_in_order_with_its_cell(exported):
    out, data = exported["out"], exported["sim"].data_dir
    spots = pd.read_csv(out / ResultFiles.SPOTS)
    assert list(spots.columns) == ["gene", "spotX", "spotY", "cell", "celltype", "prob", "cell_mask", "inside"]
    assert (spots["prob"] == 1.0).all()  # a mask's assignment (no spot model in this run): certain by construction
    source = load_npz(data / "spots.npz")
    assert len(spots) == source["x"].size
    np.testing.assert_allclose(spots["spotX"], source["x"])
    np.testing.assert_allclose(spots["spotY"], source["y"])
    meta = exported["meta"]
    assert (spots["gene"].to_numpy() == np.asarray(meta.genes)[source["gene"]]).all()
    inst = tifffile.imread(out / ResultFiles.INSTANCE_MASK)
    at_pixel = inst[np.floor(spots["spotY"]).astype(int), np.floor(spots["spotX"]).astype(int)]
    np.testing.assert_array_equal(spots["cell"], at_pixel)
    lut = _lut(data)
    names = np.asarray(meta.celltypes, object)
    assert (spots["celltype"].to_numpy() == names[lut[spots["cell"]]]).all()
    assert spots["inside"].all() and (spots["cell"] == 0).any() and (spots["cell"] > 0).any()


def test_cells_table(exported):
    out = exported["out"]
    cells = pd.read_csv(out / ResultFiles.CELLS)
    assert list(cells.columns) == ["cell", "celltype", "x", "y", "area_px", "n_spots"]
    inst = tifffile.imread(out / ResultFiles.INSTANCE_MASK)
    ids, area = np.unique(inst[inst > 0], return_counts=True)
    np.testing.assert_array_equal(cells["cell"], ids)
    np.testing.assert_array_equal(cells["area_px"], area)
    spots = pd.read_csv(out / ResultFiles.SPOTS)
    counts = spots[spots["cell"] > 0].groupby("cell").size().reindex(ids, fill_value=0)
    np.testing.assert_array_equal(cells["n_spots"], counts.to_numpy())
    # centroid of one cell by hand (pixel centres at +0.5)
    c = int(ids[len(ids) // 2])
    rr, cc = np.nonzero(inst == c)
    row = cells.set_index("cell").loc[c]
    assert row["x"] == pytest.approx(cc.mean() + 0.5) and row["y"] == pytest.approx(rr.mean() + 0.5)


def test_anndata_counts_and_spatial(exported):
    anndata = pytest.importorskip("anndata")
    out, meta = exported["out"], exported["meta"]
    adata = anndata.read_h5ad(out / ResultFiles.ANNDATA)
    cells = pd.read_csv(out / ResultFiles.CELLS)
    spots = pd.read_csv(out / ResultFiles.SPOTS)
    assert adata.shape == (len(cells), len(meta.genes))
    assert tuple(adata.var_names) == meta.genes
    assert list(adata.obs_names) == [str(c) for c in cells["cell"]]
    table = (spots[spots["cell"] > 0].groupby(["cell", "gene"]).size().unstack(fill_value=0)
             .reindex(index=cells["cell"], columns=meta.genes, fill_value=0))
    np.testing.assert_array_equal(np.asarray(adata.X.todense()), table.to_numpy())
    np.testing.assert_array_equal(np.asarray(adata.X.sum(axis=1)).ravel(), cells["n_spots"])
    np.testing.assert_allclose(adata.obsm["spatial"], cells[["x", "y"]].to_numpy())
    assert list(adata.obs["celltype"].astype(str)) == list(cells["celltype"])
    np.testing.assert_array_equal(adata.obs["area_px"], cells["area_px"])
    np.testing.assert_array_equal(adata.obs["n_spots"], cells["n_spots"])


def test_gene_ranking_files_match_the_attribution(exported):
    out, meta, run = exported["out"], exported["meta"], exported["run"]
    attr = load_npz(run / "attribution_5.npz")
    scores = pd.read_csv(out / ResultFiles.GENE_SCORES, index_col=0)
    assert tuple(scores.index) == meta.celltypes[1:] and tuple(scores.columns) == meta.genes
    np.testing.assert_allclose(scores.to_numpy(), attr["type_gene_sum"] / attr["type_pixels"][:, None])
    ranking = pd.read_csv(out / ResultFiles.GENE_RANKING_ATTRIBUTION)
    assert list(ranking.columns) == ["celltype", "gene", "score", "rank"]
    de = pd.read_csv(out / ResultFiles.GENE_RANKING)  # the ranking to read first: DE plus the attribution's columns
    assert {"pval_adj", "logfoldchange", "pct_in", "pct_out", "attr_score", "attr_rank"} <= set(de.columns)
    merged = de.merge(ranking, on=["celltype", "gene"])
    np.testing.assert_allclose(merged["attr_score"], merged["score_y"])
    for t, group in ranking.groupby("celltype"):
        assert list(group["rank"]) == list(range(1, len(meta.genes) + 1))
        assert group["score"].is_monotonic_decreasing
        assert group.iloc[0]["gene"] == scores.loc[t].idxmax()


def test_gene_ranking_by_hand(tmp_path):
    meta = DatasetMetadata.from_dict({"genes": ["a", "b", "c", "d"], "celltypes": ["background", "T1", "T2", "T3"],
                                      "raw_shape": [4, 4], "crop_offset": [0, 0], "crop_shape": [4, 4],
                                      "patch_size": 4, "grid": [1, 1], "split": {}})
    # targets in the trainer's order (by pixel count), genes a subset of the channels, T1 without pixels
    tgs = np.array([[4.0, 2.0, 6.0],  # T3: means 2, 1, 3 over genes (d, a, c)
                    [5.0, 5.0, 5.0],  # T2: means 1, 1, 1 (ties: channel order a, c, d)
                    [1.0, 1.0, 1.0]])  # T1: 0 pixels -> NaN, no ranks
    tables = write_gene_ranking(tmp_path, tgs, np.array([2.0, 5.0, 0.0]), np.array([3, 2, 1]), np.array([3, 0, 2]),
                                meta, "CID")
    scores = pd.read_csv(tmp_path / ResultFiles.GENE_SCORES, index_col="celltype")
    assert list(scores.index) == ["T1", "T2", "T3"] and list(scores.columns) == ["a", "c", "d"]
    np.testing.assert_allclose(scores.loc["T3"], [1.0, 3.0, 2.0])
    np.testing.assert_allclose(scores.loc["T2"], [1.0, 1.0, 1.0])
    assert scores.loc["T1"].isna().all()
    ranking = pd.read_csv(tmp_path / ResultFiles.GENE_RANKING_ATTRIBUTION)
    assert ranking.to_dict("list") == {
        "celltype": ["T2", "T2", "T2", "T3", "T3", "T3"],
        "gene": ["a", "c", "d", "c", "d", "a"],
        "score": [1.0, 1.0, 1.0, 3.0, 2.0, 1.0],
        "rank": [1, 2, 3, 1, 2, 3]}
    pd.testing.assert_frame_equal(tables.ranking, ranking)
    assert (tmp_path / ResultFiles.FIGURES / FigureFiles.RANKING).read_bytes()[:8] == PNG_MAGIC


def test_gene_ranking_rejects_mismatched_shapes():
    names = (["a"], ["background", "T1"])
    with pytest.raises(ValueError, match="shape"):
        gene_ranking_tables(np.ones((2, 1)), np.ones(1), np.array([1]), np.array([0]), *names)
    with pytest.raises(ValueError, match="range"):
        gene_ranking_tables(np.ones((1, 1)), np.ones(1), np.array([2]), np.array([0]), *names)


# ------------------------------------------------------------------------------------------------ raw frame
def _offset_section(root: Path, *, dapi: bool):
    """Tissue placed at (31, 45) inside a 140 x 150 raw frame; 32-px patches (crop offset and padding non-zero)."""
    sim = simulate_section(SimulateConfig(size_px=64, n_genes=6, n_celltypes=2, markers_per_type=2,
                                          cell_radius_px=8.0, spot_density=0.05), rng=5)
    y0, x0 = 31, 45
    nuclei = np.zeros((140, 150), np.uint32)
    nuclei[y0:y0 + 64, x0:x0 + 64] = sim.nuclei
    image = np.full((140, 150), 200, np.uint16)
    image[y0:y0 + 64, x0:x0 + 64] = sim.dapi
    raw = root / "data" / "off_raw" / "s"
    write_raw_section(raw, spots=sim.spots[["gene", "x", "y"]].assign(x=sim.spots["x"] + x0, y=sim.spots["y"] + y0),
                      cells=sim.cells.assign(x=sim.cells["x"] + x0, y=sim.cells["y"] + y0),
                      dapi=image if dapi else None, nuclei=None if dapi else nuclei)
    section = read_section(raw)
    data = root / "data" / "off"
    meta = preprocess_section(section, data, PreprocessConfig(patch_size=32), progress=False)
    assert min(meta.crop_offset) > 0 and meta.padded_shape[0] > meta.crop_shape[0]
    return data, nuclei, section


@pytest.mark.parametrize("dapi", [False, True], ids=["label_image", "dapi"])
def test_exported_masks_are_in_the_raw_frame(tmp_path, dapi):
    data, nuclei, section = _offset_section(tmp_path, dapi=dapi)
    if dapi:
        from segjointgene.preprocess.pipeline import seeded_watershed

        nuclei = seeded_watershed(section.dapi, section.cells).astype(np.uint32)
    run, grown = make_run(tmp_path, "off", data, grow=4)
    out = export_results(run, figures=dapi)  # figures once (DAPI background), skipped once
    initial = tifffile.imread(out / ResultFiles.INITIAL_MASK)
    assert initial.shape == nuclei.shape == (140, 150)
    np.testing.assert_array_equal(initial, nuclei)
    np.testing.assert_array_equal(tifffile.imread(out / ResultFiles.INSTANCE_MASK), grown)
    assert (out / ResultFiles.FIGURES).is_dir() == dapi


def test_missing_split_keeps_initial_labels_and_outside_spots_are_reported(tmp_path, caplog):
    sim = make_sim(tmp_path, size=96, patch_size=32)
    meta = load_metadata(sim.data_dir)
    run, grown = make_run(tmp_path, sim.name, sim.data_dir, splits=("train",), attribution=False, train_log=False)
    # a spot outside the frame, and a stale ranking of another epoch that must not survive
    spots = load_npz(sim.data_dir / "spots.npz")
    spots = {k: np.append(v, v[:1]) for k, v in spots.items()}
    spots["x"][-1] = meta.raw_shape[1] + 3.5
    save_npz(sim.data_dir / "spots.npz", spots)
    (run / "results").mkdir()
    (run / "results" / ResultFiles.GENE_RANKING_ATTRIBUTION).write_text("stale\n")
    with caplog.at_level(logging.INFO, logger="segjointgene"):
        out = export_results(run, figures=False)
    text = caplog.text
    assert "lacks" in text and "initial nucleus labels" in text
    assert "outside" in text and "no attribution" in text
    inst = tifffile.imread(out / ResultFiles.INSTANCE_MASK)
    nuclei = stitch_patch_channel(sim.data_dir, meta, "instance", dtype=np.uint32)
    test_area = np.zeros(inst.shape, bool)  # raw pixels covered by the test patches
    for name in meta.split["test"]:
        ys, xs, _, _ = raw_window(meta, *parse_patch_name(name))
        test_area[ys, xs] = True
    np.testing.assert_array_equal(inst[test_area], nuclei[test_area])
    np.testing.assert_array_equal(inst[~test_area], grown[~test_area])
    table = pd.read_csv(out / ResultFiles.SPOTS)
    assert len(table) == spots["x"].size  # nothing lost
    assert not table["inside"].iloc[-1] and table["cell"].iloc[-1] == 0
    assert table["inside"].iloc[:-1].all()
    assert not (out / ResultFiles.GENE_RANKING_ATTRIBUTION).exists() and not (out / ResultFiles.GENE_SCORES).exists()
    assert "attr_score" in pd.read_csv(out / ResultFiles.GENE_RANKING).columns  # DE without attribution


def test_without_anndata_only_h5ad_is_skipped(exported, tmp_path, monkeypatch, caplog):
    sim = exported["sim"]
    run, _ = make_run(tmp_path, sim.name, sim.data_dir, attribution=False, train_log=False)
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata -> ImportError
    with caplog.at_level(logging.WARNING, logger="segjointgene"):
        out = export_results(run, figures=False)
    assert "pip install anndata" in caplog.text
    assert not (out / ResultFiles.ANNDATA).exists()
    for name in (ResultFiles.INSTANCE_MASK, ResultFiles.SPOTS, ResultFiles.CELLS):
        assert (out / name).is_file()


# ------------------------------------------------------------------------------------------------ epochs and CLI
def test_epochs_and_clear_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="not found"):
        resolve_epoch(tmp_path / "nope")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(InputNotFoundError, match="no label cache"):
        resolve_epoch(run)
    for e in (10, 2, 30):
        (run / f"labels_cache_{e}.npz").write_bytes(b"")
    (run / "labels_cache_x.npz").write_bytes(b"")
    assert available_epochs(run) == [2, 10, 30]
    assert resolve_epoch(run) == 30 and resolve_epoch(run, 10) == 10
    with pytest.raises(InputNotFoundError, match="saved epochs: 2, 10, 30"):
        resolve_epoch(run, 7)


def test_cli_export_step(exported, capsys):
    sim, run = exported["sim"], exported["run"]
    argv = ["--step_name=export", f"--work_dir={sim.work_dir}", f"--datasets_name={sim.name}", "--net_sub_suffix=run"]
    assert main([*argv, "--ckpt_load_epoch=3"]) == 2
    assert "saved epochs: 5" in capsys.readouterr().err
    assert main(["--step_name=export", f"--work_dir={sim.work_dir}", f"--datasets_name={sim.name}",
                 "--net_sub_suffix=missing"]) == 2
    assert "run folder" in capsys.readouterr().err
    assert main([*argv, "--ckpt_load_epoch=5"]) == 0
    printed = capsys.readouterr().out
    assert str(run / "results") in printed and ResultFiles.ANNDATA in printed
