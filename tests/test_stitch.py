"""Stitching patches back to the raw frame, spot assignment and the cell table (segjointgene.results.stitch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segjointgene.config import PreprocessConfig, SimulateConfig
from segjointgene.errors import DataError
from segjointgene.io.files import load_npz, read_json, read_section, save_npz, write_raw_section
from segjointgene.io.metadata import DatasetMetadata
from segjointgene.preprocess.pipeline import preprocess_section, seeded_watershed
from segjointgene.evaluate.simulate import simulate_section
from segjointgene.results.stitch import (assign_spots, cell_table, celltype_table, class_map, patch_from_raw, raw_window,
                                 stitch_label_cache, stitch_patch_channel, stitch_patches, to_raw_frame)

RAW_SHAPE = (150, 170)
OFFSET = (37, 51)  # where the simulated tissue sits in the raw frame: the crop offset is far from (0, 0)


def _offset_section(root: Path, *, dapi: bool) -> dict:
    """A raw section whose content starts away from the origin, preprocessed into 32-px patches (padding > 0)."""
    sim = simulate_section(SimulateConfig(size_px=72, n_genes=8, n_celltypes=2, markers_per_type=2,
                                          cell_radius_px=8.0, spot_density=0.05), rng=3)
    y0, x0 = OFFSET
    nuclei = np.zeros(RAW_SHAPE, np.uint32)
    nuclei[y0:y0 + 72, x0:x0 + 72] = sim.nuclei
    image = np.full(RAW_SHAPE, 200, np.uint16)
    image[y0:y0 + 72, x0:x0 + 72] = sim.dapi
    spots = sim.spots[["gene", "x", "y"]].assign(x=sim.spots["x"] + x0, y=sim.spots["y"] + y0)
    cells = sim.cells.assign(x=sim.cells["x"] + x0, y=sim.cells["y"] + y0)
    raw = root / "raw"
    write_raw_section(raw, spots=spots, cells=cells, dapi=image if dapi else None, nuclei=None if dapi else nuclei)
    section = read_section(raw)
    data = root / "data"
    meta = preprocess_section(section, data, PreprocessConfig(patch_size=32), progress=False)
    expected = seeded_watershed(image, section.cells) if dapi else nuclei
    return {"data": data, "meta": meta, "nuclei": expected.astype(np.uint32), "dapi": image, "section": section}


@pytest.fixture(scope="module")
def label_section(tmp_path_factory) -> dict:
    return _offset_section(tmp_path_factory.mktemp("label"), dapi=False)


@pytest.fixture(scope="module")
def dapi_section(tmp_path_factory) -> dict:
    return _offset_section(tmp_path_factory.mktemp("dapi"), dapi=True)


def _geometry_is_nontrivial(meta: dict) -> None:
    assert meta.crop_offset[0] > 0 and meta.crop_offset[1] > 0
    assert meta.padded_shape[0] > meta.crop_shape[0] and meta.padded_shape[1] > meta.crop_shape[1]
    assert meta.extra["n_patches_skipped_empty"] >= 0


def test_label_image_nuclei_round_trip_exactly(label_section):
    meta = label_section["meta"]
    _geometry_is_nontrivial(meta)
    assert meta.nucleus_source == "label_image"
    stitched = stitch_patch_channel(label_section["data"], meta, "instance", dtype=np.uint32)
    assert stitched.shape == RAW_SHAPE and stitched.dtype == np.uint32
    np.testing.assert_array_equal(stitched, label_section["nuclei"])


def test_dapi_nuclei_and_dapi_channel_round_trip(dapi_section):
    meta = dapi_section["meta"]
    _geometry_is_nontrivial(meta)
    assert meta.has_dapi and meta.nucleus_source == "dapi_watershed"
    stitched = stitch_patch_channel(dapi_section["data"], meta, "instance")
    np.testing.assert_array_equal(stitched, dapi_section["nuclei"])
    dapi = stitch_patch_channel(dapi_section["data"], meta, "dapi")
    (y0, x0), (h, w) = meta.crop_offset, meta.crop_shape
    inside = np.zeros(RAW_SHAPE, bool)
    inside[y0:y0 + h, x0:x0 + w] = True
    np.testing.assert_array_equal(dapi[inside], dapi_section["dapi"][inside].astype(np.float32))
    assert not dapi[~inside].any()  # outside the crop is background


def _patches(data: Path, meta: dict, key: str) -> dict[str, np.ndarray]:
    return {n: load_npz(data / s / n, (key,))[key] for s in ("train", "test") for n in meta.split[s]}


def test_padded_frame_path_equals_streaming_path(label_section):
    data, meta = label_section["data"], label_section["meta"]
    patches = _patches(data, meta, "instance")
    padded = stitch_patches(patches, meta)
    assert padded.shape == tuple(meta.padded_shape)
    np.testing.assert_array_equal(to_raw_frame(padded, meta), stitch_patch_channel(data, meta, "instance"))
    # and cutting the stitched section gives every patch back (including the padding, which is background)
    raw = to_raw_frame(padded, meta)
    for name, patch in patches.items():
        np.testing.assert_array_equal(patch_from_raw(raw, meta, name), patch)


def test_label_cache_file_and_mapping_round_trip(label_section, tmp_path):
    torch = pytest.importorskip("torch")
    from segjointgene.preprocess.dataset import LabelStore, load_label_cache, read_class_lut, save_label_cache

    data, meta = label_section["data"], label_section["meta"]
    lut = read_class_lut(data)
    nuclei = label_section["nuclei"]
    stores = {}
    for split in ("train", "test"):
        names = meta.split[split]
        inst = np.stack([patch_from_raw(nuclei, meta, n) for n in names]).astype(np.int32)
        stores[split] = LabelStore(names, torch.from_numpy(inst), lut)
    path = tmp_path / "labels_cache_3.npz"
    save_label_cache(path, stores)
    from_file = stitch_label_cache(path, meta, dtype=np.uint32)
    from_mapping = stitch_label_cache(load_label_cache(path), meta, dtype=np.uint32)
    np.testing.assert_array_equal(from_file, nuclei)
    np.testing.assert_array_equal(from_mapping, nuclei)
    np.testing.assert_array_equal(stitch_label_cache(path, meta, "classes"), lut[nuclei])


def test_label_cache_patches_absent_keep_out_values(label_section):
    meta = label_section["meta"]
    name = meta.split["test"][0]
    p = meta.patch_size
    out = np.full(RAW_SHAPE, 9, np.int32)
    stitch_label_cache({"test": {"names": np.array([name]), "instances": np.ones((1, p, p), np.int32)}}, meta, out=out)
    ys, xs, _, _ = raw_window(meta, *map(int, name[2:-4].split("_")))
    assert (out[ys, xs] == 1).all()
    assert (out == 9).sum() == out.size - out[ys, xs].size


@pytest.mark.parametrize("case", ["duplicate", "outside_grid", "shape", "negative"])
def test_damaged_label_cache_is_a_clear_error(label_section, case, tmp_path):
    meta = label_section["meta"]
    p = meta.patch_size
    name = meta.split["train"][0]
    arrays = {"train.names": np.array([name]), "train.instances": np.zeros((1, p, p), np.int32)}
    if case == "duplicate":
        arrays.update({"test.names": np.array([name]), "test.instances": np.zeros((1, p, p), np.int32)})
    elif case == "outside_grid":
        arrays["train.names"] = np.array([f"p_{meta.grid[0]}_0.npz"])
    elif case == "shape":
        arrays["train.instances"] = np.zeros((1, p, p + 1), np.int32)
    else:
        arrays["train.instances"] = np.full((1, p, p), -1, np.int32)
    path = tmp_path / "labels_cache_1.npz"
    save_npz(path, arrays)
    with pytest.raises(DataError):
        stitch_label_cache(path, meta)


def test_bad_metadata_geometry_is_a_clear_error():
    meta = DatasetMetadata.from_dict({"raw_shape": [10, 10], "crop_offset": [5, 5], "crop_shape": [8, 8],
                                      "patch_size": 4, "grid": [2, 2]}, geometry_only=True)
    with pytest.raises(DataError, match="geometry"):
        to_raw_frame(np.zeros((8, 8)), meta)


def test_assign_spots_value_at_pixel_and_outside_reported():
    rng = np.random.default_rng(1)
    mask = rng.integers(0, 50, (40, 30)).astype(np.uint32)
    x = rng.uniform(-5, 35, 500)
    y = rng.uniform(-5, 45, 500)
    x[0] = np.nan
    x[1], y[1] = 29.999, 10.0  # just inside the right edge
    x[3], y[3] = 30.0, 10.0  # exactly on the right edge: outside
    res = assign_spots(mask, x, y)
    assert res.values.shape == x.shape and res.values.dtype == np.int64  # nothing lost
    inside = np.isfinite(x) & (x >= 0) & (x < 30) & (y >= 0) & (y < 40)
    np.testing.assert_array_equal(res.inside, inside)
    r, c = np.floor(y[inside]).astype(int), np.floor(x[inside]).astype(int)
    np.testing.assert_array_equal(res.values[inside], mask[r, c])
    assert (res.values[~inside] == 0).all()
    assert not res.inside[0] and res.inside[1] and not res.inside[3]


def test_cell_table_by_hand():
    mask = np.zeros((6, 8), np.uint32)
    mask[1:3, 1:4] = 4  # 6 px, centroid row 1.5, col 2
    mask[4, 6] = 9  # 1 px
    lut = np.zeros(10, np.int64)
    lut[4], lut[9] = 2, 1
    spot_cell = np.array([4, 4, 0, 9, 4])
    table = cell_table(mask, lut, ["background", "A", "B"], spot_cell)
    assert list(table.columns) == ["cell", "celltype", "x", "y", "area_px", "n_spots"]
    expected = pd.DataFrame({"cell": [4, 9], "celltype": ["B", "A"], "x": [2.5, 6.5], "y": [2.0, 4.5],
                             "area_px": [6, 1], "n_spots": [3, 1]})
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert table["cell"].dtype == np.int64 and table["area_px"].dtype == np.int64


def test_cell_table_rejects_ids_unknown_to_the_lut():
    with pytest.raises(DataError, match="cells table"):
        cell_table(np.full((3, 3), 5, np.uint32), np.zeros(4, np.int64), ["background"], np.zeros(0, np.int64))


def test_class_map_matches_lut_lookup():
    rng = np.random.default_rng(2)
    inst = rng.integers(0, 30, (1100, 7)).astype(np.uint32)  # several row blocks
    lut = rng.integers(0, 5, 30)
    out = class_map(inst, lut, np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, lut[inst])
    with pytest.raises(DataError):
        class_map(inst, lut[:10], np.uint8)


def test_celltype_table():
    table = celltype_table(["background", "A", "B"])
    assert table.to_dict("list") == {"id": [0, 1, 2], "name": ["background", "A", "B"]}
    with pytest.raises(DataError):
        celltype_table(["A", "B"])


def test_metadata_on_disk_matches_returned(label_section):
    # the exporter reads metadata.json from disk: it must hold the same geometry as the dict used above
    on_disk = read_json(label_section["data"] / "metadata.json")
    for key in ("raw_shape", "crop_offset", "crop_shape", "padded_shape", "patch_size", "grid"):
        assert tuple(np.atleast_1d(on_disk[key])) == tuple(np.atleast_1d(getattr(label_section["meta"], key)))
