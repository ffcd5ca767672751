"""Patch dataset and label store: worker visibility, persistence, validation errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from segjointgene.constants import PatchKeys
from segjointgene.preprocess.dataset import ImagePatchDataset, LabelStore, load_label_cache, save_label_cache
from segjointgene.io.metadata import load_metadata
from segjointgene.errors import DataError, InputNotFoundError
from segjointgene.io.files import load_npz, save_npz


def test_items_hold_current_and_fixed_labels(sim128):
    ds = ImagePatchDataset(sim128.data_dir, "train")
    item = ds[0]
    meta = load_metadata(sim128.data_dir)
    p, g = meta.patch_size, len(meta.genes)
    assert item["image"].shape == (g, p, p) and item["image"].dtype == torch.float32
    assert item["instance"].shape == (p, p) and item["instance"].dtype == torch.int64
    torch.testing.assert_close(item["instance"], item["core"])  # labels start as the nuclei
    # class map = class of the instance map, background 0
    raw = load_npz(ds.paths[0])
    np.testing.assert_array_equal(item["label"].numpy(), raw[PatchKeys.LABEL])
    assert (item["label"][item["instance"] == 0] == 0).all()


@pytest.mark.parametrize("persistent", [True, False])
def test_worker_processes_see_updates_from_the_main_process(sim128, persistent):
    ds = ImagePatchDataset(sim128.data_dir, "train")
    loader = DataLoader(ds, batch_size=len(ds), num_workers=1, persistent_workers=persistent)
    first = next(iter(loader))
    cell = int(first["core"][0].max())
    grown = first["instance"].clone()
    grown[0, :3, :3] = cell  # grow a cell into a corner
    changed = ds.labels.update(first["index"], grown)
    assert changed == int((grown != first["instance"]).sum())
    second = next(iter(loader))  # a worker reads the batch again
    torch.testing.assert_close(second["instance"], grown)
    assert (second["label"][0, :3, :3] == ds.labels.class_lut[cell]).all()
    torch.testing.assert_close(second["core"], first["core"])  # the fixed labels never change


def test_label_cache_round_trip_is_exact(sim128, tmp_path):
    train = ImagePatchDataset(sim128.data_dir, "train")
    test = ImagePatchDataset(sim128.data_dir, "test")
    rng = torch.Generator().manual_seed(0)
    new = torch.randint(0, 5, train.labels.instances.shape, generator=rng)
    train.labels.update(range(len(train)), new)
    save_label_cache(tmp_path / "labels_cache_3.npz", {"train": train.labels, "test": test.labels})
    again = ImagePatchDataset(sim128.data_dir, "train")
    cached = load_label_cache(tmp_path / "labels_cache_3.npz")
    again.labels.load_state_dict(cached["train"])
    assert torch.equal(again.labels.instances, train.labels.instances)
    np.testing.assert_array_equal(cached["train"]["classes"], train.labels.class_lut.numpy()[new.numpy()])
    with pytest.raises(DataError, match="differ"):
        again.labels.load_state_dict(cached["test"])
    # the file is written atomically: no temporary file is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["labels_cache_3.npz"]


def test_label_store_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        LabelStore(["a"], torch.zeros(2, 4, 4), np.zeros(3))


def _first_patch(data_dir):
    meta = load_metadata(data_dir)
    return data_dir / "train" / meta.split["train"][0]


@pytest.mark.parametrize("damage, match", [
    ("truncate", "corrupt or truncated"),
    ("missing_key", "missing array"),
    ("wrong_shape", "shape"),
    ("wrong_dtype", "dtype"),
    ("delete", "missing"),
])
def test_bad_patch_files_are_named(sim128_copy, damage, match):
    path = _first_patch(sim128_copy.data_dir)
    arrays = load_npz(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "missing_key":
        save_npz(path, {k: v for k, v in arrays.items() if k != PatchKeys.DAPI})
    elif damage == "wrong_shape":
        save_npz(path, {**arrays, PatchKeys.LABEL: arrays[PatchKeys.LABEL][:-1]})
    elif damage == "wrong_dtype":
        save_npz(path, {**arrays, PatchKeys.INSTANCE: arrays[PatchKeys.INSTANCE].astype(np.float64)})
    else:
        path.unlink()
    err = InputNotFoundError if damage == "delete" else DataError
    with pytest.raises(err, match=match) as info:
        ImagePatchDataset(sim128_copy.data_dir, "train")
    assert path.name in str(info.value)


def test_nan_image_is_reported_when_read(sim128_copy):
    path = _first_patch(sim128_copy.data_dir)
    arrays = load_npz(path)
    image = arrays[PatchKeys.IMAGE].copy()
    image[0, 0, 0] = np.nan
    save_npz(path, {**arrays, PatchKeys.IMAGE: image})
    ds = ImagePatchDataset(sim128_copy.data_dir, "train")
    with pytest.raises(DataError, match="NaN") as info:
        ds[0]
    assert path.name in str(info.value)


def test_image_cache_returns_the_same_images(sim128):
    plain = ImagePatchDataset(sim128.data_dir, "train")
    cached = ImagePatchDataset(sim128.data_dir, "train", cache_images=True)
    for i in range(len(plain)):
        assert torch.equal(plain[i]["image"], cached[i]["image"])
        assert torch.equal(plain[i]["image"], cached[i]["image"])  # second read from the cache


def test_patches_without_stored_density_read_the_same_images(sim128, tmp_path):
    from segjointgene.config import PreprocessConfig
    from segjointgene.io.files import npz_headers, read_section
    from segjointgene.preprocess.pipeline import preprocess_section

    meta = preprocess_section(read_section(sim128.raw_dir), tmp_path / "lean",
                              PreprocessConfig(patch_size=64, store_density=False), progress=False)
    assert not meta.density_stored
    stored, lean = ImagePatchDataset(sim128.data_dir, "train"), ImagePatchDataset(tmp_path / "lean", "train")
    assert lean.names == stored.names and PatchKeys.IMAGE not in npz_headers(lean.paths[0])
    for i in range(len(stored)):  # rebuilt from the spots exactly as preprocessing builds them
        torch.testing.assert_close(lean[i]["image"], stored[i]["image"], rtol=0, atol=0)
        torch.testing.assert_close(lean[i]["core"], stored[i]["core"])
    assert meta.nuclear_density_median == load_metadata(sim128.data_dir).nuclear_density_median
