"""Instrument folders made in the test from one simulated section (each platform's layout, column names and units):
the same spots and nuclei come back as from the CA1 layout, controls are dropped, types are derived, and the seed
section's own file names preprocess through the original command line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from segjointgene.cli import main
from segjointgene.config import SimulateConfig
from segjointgene.io.files import read_section
from segjointgene.io.metadata import load_metadata
from segjointgene.io.platforms import derive_celltypes, detect_format, read_platform
from segjointgene.io.polygons import PolygonLabels, cell_polygons
from segjointgene.evaluate.simulate import simulate_section, write_simulated
from segjointgene.io.windows import TiffWindows

pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa  # noqa: E402

PX = 0.2125  # Xenium um per pixel
SIZE = 160


@pytest.fixture(scope="module")
def sim():
    return simulate_section(SimulateConfig(size_px=SIZE, n_genes=12, n_celltypes=3, markers_per_type=3), rng=4)


def _xenium(sim, folder, *, low_qv=True):
    folder.mkdir(parents=True)
    n = len(sim.spots)
    cell_key = np.array([f"cell-{c}" if c else "UNASSIGNED" for c in sim.spots["cell"]])
    tx = pd.DataFrame({"transcript_id": np.arange(n, dtype=np.uint64) + 281474976710656,
                       "feature_name": sim.spots["gene"], "x_location": sim.spots["x"] * PX,
                       "y_location": sim.spots["y"] * PX, "qv": np.full(n, 30.0), "cell_id": cell_key})
    if low_qv:
        tx.loc[::50, "qv"] = 10.0  # low quality: dropped
    controls = pd.DataFrame({"transcript_id": np.array([1, 2], np.uint64),
                             "feature_name": ["NegControlProbe_00001", "BLANK_0002"], "x_location": [5.0, 6.0],
                             "y_location": [5.0, 6.0], "qv": [40.0, 40.0], "cell_id": ["UNASSIGNED"] * 2})
    pq.write_table(pa.Table.from_pandas(pd.concat([tx, controls], ignore_index=True)), folder / "transcripts.parquet")
    (folder / "experiment.xenium").write_text(json.dumps({"pixel_size": PX, "run_name": "sim"}))
    cells = pd.DataFrame({"cell_id": [f"cell-{c}" for c in sim.cells["cell"]],
                          "x_centroid": sim.cells["x"] * PX, "y_centroid": sim.cells["y"] * PX})
    pq.write_table(pa.Table.from_pandas(cells), folder / "cells.parquet")
    rings = cell_polygons(sim.nuclei, scale=PX)
    verts = pd.DataFrame([(f"cell-{c}", x, y) for c, ring in rings.items() for x, y in ring],
                         columns=["cell_id", "vertex_x", "vertex_y"])
    pq.write_table(pa.Table.from_pandas(verts), folder / "nucleus_boundaries.parquet")
    tifffile.imwrite(folder / "morphology_mip.ome.tif", sim.dapi)
    return folder


def _merscope(sim, folder, um=0.108, offset=(120.0, -40.0)):
    (folder / "images").mkdir(parents=True)
    to_um = lambda px, o: o + px * um  # noqa: E731
    pd.DataFrame({"barcode_id": 0, "global_x": to_um(sim.spots["x"], offset[0]),
                  "global_y": to_um(sim.spots["y"], offset[1]), "global_z": 3, "gene": sim.spots["gene"],
                  "cell_id": (sim.spots["cell"] * 1000).where(sim.spots["cell"] > 0, -1)}).to_csv(
        folder / "detected_transcripts.csv")
    a = np.array([[1 / um, 0, -offset[0] / um], [0, 1 / um, -offset[1] / um], [0, 0, 1]])
    np.savetxt(folder / "images" / "micron_to_mosaic_pixel_transform.csv", a, delimiter=" ")
    tifffile.imwrite(folder / "images" / "mosaic_DAPI_z3.tif", sim.dapi)
    pd.DataFrame({"EntityID": sim.cells["cell"] * 1000, "center_x": to_um(sim.cells["x"], offset[0]),
                  "center_y": to_um(sim.cells["y"], offset[1])}).to_csv(folder / "cell_metadata.csv", index=False)
    return folder


def _cosmx(sim, folder, shift=(4000.0, 9000.0)):
    folder.mkdir(parents=True)
    pd.DataFrame({"fov": 1, "cell_ID": sim.spots["cell"], "x_global_px": sim.spots["x"] + shift[0],
                  "y_global_px": sim.spots["y"] + shift[1], "target": sim.spots["gene"]}).to_csv(
        folder / "S1_tx_file.csv", index=False)
    pd.DataFrame({"fov": 1, "cell_ID": sim.cells["cell"], "CenterX_global_px": sim.cells["x"] + shift[0],
                  "CenterY_global_px": sim.cells["y"] + shift[1]}).to_csv(folder / "S1_metadata_file.csv", index=False)
    return folder


def test_xenium_folder_gives_the_section_of_the_ca1_layout(sim, tmp_path):
    folder = _xenium(sim, tmp_path / "xenium")
    assert detect_format(folder) == "xenium"
    sec = read_platform(folder, n_celltypes=3)
    assert sec.um_per_px == PX and sec.format == "xenium"
    assert not sec.spots["gene"].str.startswith(("NegControl", "BLANK")).any()
    kept = np.ones(len(sim.spots), bool)
    kept[::50] = False  # the low-qv rows
    np.testing.assert_allclose(sec.spots["x"].to_numpy(), sim.spots["x"].to_numpy()[kept], atol=1e-6)
    assert (sec.spot_rows_in_file == np.flatnonzero(kept)).all()
    assert isinstance(sec.nuclei, PolygonLabels)  # drawn a window at a time, never held whole
    assert isinstance(sec.dapi, TiffWindows) and np.array_equal(sec.dapi[5:40, 7:9], sim.dapi[5:40, 7:9])
    nuclei = np.asarray(sec.nuclei)
    np.testing.assert_array_equal(sec.nuclei[20:70, 33:90], nuclei[20:70, 33:90])
    inter = ((nuclei > 0) & (sim.nuclei > 0)).sum()
    assert inter / ((nuclei > 0) | (sim.nuclei > 0)).sum() > 0.8  # rasterised polygons = the nuclei
    truth = sim.cells["celltype"].to_numpy()
    agree = pd.crosstab(truth, np.asarray(sec.cells["celltype"])).max(1).sum() / len(truth)
    assert agree > 0.8, agree  # k-means of the nuclei's counts finds the simulated types


def test_merscope_and_cosmx_folders(sim, tmp_path):
    mer = read_platform(_merscope(sim, tmp_path / "merscope"))
    assert detect_format(tmp_path / "merscope") == "merscope"
    np.testing.assert_allclose(mer.spots["x"].to_numpy(), sim.spots["x"].to_numpy(), atol=1e-6)
    assert mer.um_per_px == pytest.approx(0.108) and mer.origin_um == pytest.approx((120.0, -40.0))
    cos = read_platform(_cosmx(sim, tmp_path / "cosmx"))
    assert detect_format(tmp_path / "cosmx") == "cosmx"
    shift = cos.origin_um[0] / cos.um_per_px
    np.testing.assert_allclose(cos.spots["x"].to_numpy() + shift, sim.spots["x"].to_numpy() + 4000.0, atol=1e-6)
    assert (np.unique(cos.nuclei) > 0).sum() == len(sim.cells)  # a disc per cell centre


def test_reference_mapping_types_the_nuclei(sim):
    markers = pd.read_csv(pd.io.common.StringIO(sim.markers.to_csv(index=False)))
    reference = markers.pivot(index="celltype", columns="gene", values="rate")
    genes = sorted(sim.spots["gene"].unique())
    inside = sim.nuclei[sim.spots["y"].astype(int), sim.spots["x"].astype(int)]
    counts = np.zeros((len(sim.cells), len(genes)))
    gi = {g: i for i, g in enumerate(genes)}
    for c, g in zip(inside, sim.spots["gene"]):
        if c:
            counts[c - 1, gi[g]] += 1
    names, how = derive_celltypes(counts, genes, reference=reference)
    assert "reference" in how
    assert np.mean(np.asarray(names) == sim.cells["celltype"].to_numpy()) > 0.8


def test_xenium_folder_preprocesses_with_the_units_in_the_metadata(sim, tmp_path):
    folder = _xenium(sim, tmp_path / "data" / "x_raw" / "run1")
    assert main(["--step_name=preprocess", f"--work_dir={tmp_path}", "--datasets_name=x", f"--raw_dir={folder}",
                 "--patch_size=64", "--n_celltypes=3", "--quiet"]) == 0
    meta = load_metadata(tmp_path / "data" / "x")
    assert meta.extra["input_format"] == "xenium" and meta.extra["um_per_px"] == PX
    assert "k-means" in meta.extra["celltype_source"]


def test_the_seed_sections_own_command_line(sim, tmp_path):
    """``--datasets_name=CA1 --step_name=preprocess_CA1 --CA1_sub_path=3_1_left`` with the original file names."""
    raw = tmp_path / "data" / "CA1_raw" / "3_1_left"
    write_simulated(sim, raw)
    renames = {"cells_sim.csv": "cells_leftCA1_3-1.csv", "spots_sim.csv": "spots_w_segmentation_leftCA1_3-1.csv",
               "celltype_sim.csv": "celltype_leftCA1_3-1.csv", "sim_dapi.tif": "CA1DapiBoundaries_3-1_left.tif"}
    for old, new in renames.items():
        shutil.move(raw / old, raw / new)
    assert main(["--datasets_name=CA1", "--step_name=preprocess_CA1", "--CA1_sub_path=3_1_left",
                 f"--work_dir={tmp_path}", "--patch_size=64", "--quiet"]) == 0
    meta = load_metadata(tmp_path / "data" / "CA1")
    assert meta.nucleus_source == "dapi_watershed" and meta.n_genes == 12
    assert read_section(raw).dapi is not None


def test_xenium_run_writes_outputs_in_microns_too(sim, tmp_path):
    folder = _xenium(sim, tmp_path / "data" / "x_raw" / "run1")
    common = [f"--work_dir={tmp_path}", "--datasets_name=x", "--quiet"]
    assert main(["--step_name=preprocess", *common, f"--raw_dir={folder}", "--patch_size=64", "--n_celltypes=3"]) == 0
    assert main(["--step_name=SegJointGene", *common, "--net_width=4", "--net_epoch=1", "--num_threads=1",
                 "--num_workers=0"]) == 0
    results = tmp_path / "checkpoints" / "x" / "spotmodel" / "results"
    cells = pd.read_csv(results / "cells.csv")
    np.testing.assert_allclose(cells["x_um"], cells["x"] * PX)
    spots = pd.read_csv(results / "spots_assigned.csv")
    np.testing.assert_allclose(spots["spotY_um"], spots["spotY"] * PX)
    doc = json.loads((results / "cells.geojson").read_text())
    assert len(doc["features"]) == len(cells)
    ranger = results / "xenium_ranger"  # the inputs of xeniumranger import-segmentation
    mask = tifffile.imread(ranger / "cells_label_mask.tif")
    assert mask.dtype == np.uint32 and mask.shape == sim.dapi.shape
    assign = pd.read_csv(ranger / "transcript_assignment.csv", keep_default_na=False)
    kept = np.ones(len(sim.spots), bool)
    kept[::50] = False
    assert (assign["transcript_id"].to_numpy() == np.flatnonzero(kept) + 281474976710656).all()
    assert set(assign.loc[assign["cell"] != "", "cell"]) <= {f["id"] for f in json.loads(
        (ranger / "viz_polygons.geojson").read_text())["features"]} | set(assign["cell"])
    assert (assign["is_noise"] == (assign["cell"] == "")).all()


def test_without_centroids_the_nuclei_come_from_the_dapi(sim, tmp_path):
    """A MERSCOPE folder without cell_metadata.csv: nuclei found in the DAPI image alone."""
    folder = _merscope(sim, tmp_path / "merscope")
    (folder / "cell_metadata.csv").unlink()
    sec = read_platform(folder, n_celltypes=3)
    found = np.unique(sec.nuclei[sec.nuclei > 0]).size
    assert abs(found - len(sim.cells)) <= 0.15 * len(sim.cells), (found, len(sim.cells))
    hit = np.unique(sim.nuclei[sec.nuclei > 0])  # true nuclei that some found nucleus overlaps
    assert (hit > 0).sum() >= 0.9 * len(sim.cells)
    assert len(sec.cells) == found


def test_ca1_and_xenium_layouts_give_the_same_patches(sim, tmp_path):
    """The same section written in the CA1 layout and as a Xenium folder preprocesses to the same patches: the
    same grid, and density images equal to float32 rounding of the micron round trip."""
    from segjointgene.io.files import load_npz

    write_simulated(sim, tmp_path / "data" / "a_raw" / "s")
    _xenium(sim, tmp_path / "data" / "b_raw" / "s", low_qv=False)
    for name in ("a", "b"):
        assert main(["--step_name=preprocess", f"--work_dir={tmp_path}", f"--datasets_name={name}", "--quiet",
                     f"--raw_dir={tmp_path}/data/{name}_raw/s", "--patch_size=64", "--n_celltypes=3"]) == 0
    ma, mb = load_metadata(tmp_path / "data" / "a"), load_metadata(tmp_path / "data" / "b")
    assert ma.crop_offset == mb.crop_offset and ma.grid == mb.grid and ma.genes == mb.genes
    names = sorted(p.relative_to(tmp_path / "data" / "a") for p in (tmp_path / "data" / "a").glob("*/p_*.npz"))
    assert names == sorted(p.relative_to(tmp_path / "data" / "b") for p in (tmp_path / "data" / "b").glob("*/p_*.npz"))
    for name in names:
        a, b = load_npz(tmp_path / "data" / "a" / name), load_npz(tmp_path / "data" / "b" / name)
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-4)
        assert (a["spots"] == b["spots"]).all()


def test_a_truncated_transcripts_parquet_is_named(sim, tmp_path, capsys):
    folder = _xenium(sim, tmp_path / "raw")
    path = folder / "transcripts.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a copy cut short
    assert main(["--step_name=preprocess", f"--work_dir={tmp_path}", "--datasets_name=x", f"--raw_dir={folder}",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "truncated" in err


def test_a_tiled_xenium_run_writes_the_outputs_of_an_untiled_one(sim, tmp_path):
    pytest.importorskip("dask.distributed")
    anndata = pytest.importorskip("anndata")
    folder = _xenium(sim, tmp_path / "data" / "x_raw" / "run1")
    common = [f"--work_dir={tmp_path}", "--datasets_name=x", "--quiet"]
    assert main(["--step_name=preprocess", *common, f"--raw_dir={folder}", "--patch_size=64", "--n_celltypes=3"]) == 0
    assert main(["--step_name=segment", *common, "--tile_px=64", "--dask_workers=2", "--tile_network_tiles=1",
                 "--net_epoch=1", "--net_width=4"]) == 0
    results = tmp_path / "checkpoints" / "x" / "tiled" / "results"
    cells = pd.read_csv(results / "cells.csv")
    np.testing.assert_allclose(cells["x_um"], cells["x"] * PX)
    spots = pd.read_csv(results / "spots_assigned.csv")
    np.testing.assert_allclose(spots["spotY_um"], spots["spotY"] * PX)
    mask = tifffile.imread(results / "instance_mask.tif")
    features = json.loads((results / "cells.geojson").read_text())["features"]
    assert sorted(f["properties"]["cell"] for f in features) == cells["cell"].tolist()  # every cell, once
    area = cells.set_index("cell")["area_px"]
    for f in features:  # each outline is its cell's whole mask (traced across seams), not a tile's piece
        xy = np.asarray(f["geometry"]["coordinates"][0])
        shoelace = 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))
        if area[f["properties"]["cell"]] >= 30:
            assert abs(shoelace - area[f["properties"]["cell"]]) < 0.25 * area[f["properties"]["cell"]] + 6
    ranger = results / "xenium_ranger"
    assert np.array_equal(tifffile.imread(ranger / "cells_label_mask.tif"), mask)
    nuclei = tifffile.imread(ranger / "nuclei_label_mask.tif")
    assert nuclei.shape == mask.shape == sim.dapi.shape and set(np.unique(nuclei)) - {0} <= set(cells["cell"])
    assign = pd.read_csv(ranger / "transcript_assignment.csv", keep_default_na=False)
    kept = np.ones(len(sim.spots), bool)
    kept[::50] = False
    assert (assign["transcript_id"].to_numpy() == np.flatnonzero(kept) + 281474976710656).all()
    assert (assign["cell"] == np.where(spots["cell"] > 0, "cell-" + spots["cell"].astype(str), "")).all()
    viz = json.loads((ranger / "viz_polygons.geojson").read_text())
    assert sorted(f["id"] for f in viz["features"]) == sorted(f"cell-{c}" for c in cells["cell"])
    assert viz["unit"] == "micron"
    ad = anndata.read_h5ad(results / "cells.h5ad")
    assert ad.n_obs == len(cells) and ad.obsm["spatial_um"].shape == (len(cells), 2)
