"""Device-side gene density from spot lists: equal to preprocessing's images; the dataset's spot-list mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from segjointgene.config import PreprocessConfig
from segjointgene.constants import PatchKeys
from segjointgene.preprocess.dataset import ImagePatchDataset, collate_spot_lists
from segjointgene.io.metadata import load_metadata
from segjointgene.preprocess.density import batch_density, batch_images, gaussian_kernel1d
from segjointgene.errors import InputNotFoundError
from segjointgene.io.files import load_npz, read_section
from segjointgene.preprocess.pipeline import density_halo, gene_density, preprocess_section


def _random_spots(rng: np.random.Generator, n: int, n_genes: int, p: int, margin: int) -> np.ndarray:
    """(n, 3) gene, row, col with pixels up to ``margin`` outside a P x P window (some beyond the halo)."""
    return np.stack([rng.integers(0, n_genes, n), rng.integers(-margin, p + margin, n),
                     rng.integers(-margin, p + margin, n)], axis=1)


@pytest.mark.parametrize("sigma", [5.0, 2.0, 1.3, 0.0])
def test_batch_density_equals_preprocessing(sigma):
    rng = np.random.default_rng(0)
    p, g, b = 32, 5, 3
    halo = density_halo(sigma)
    per_sample = [_random_spots(rng, 200, g, p, halo + 4) for _ in range(b)]
    per_sample[1] = np.concatenate([per_sample[1], per_sample[1][:10]])  # repeated pixels count twice
    spots = torch.tensor(np.concatenate([np.c_[np.full(len(s), i), s] for i, s in enumerate(per_sample)]))
    out = batch_density(spots, b + 1, g, p, sigma)  # one more sample without spots
    assert out.shape == (b + 1, g, p, p) and out.dtype == torch.float32
    for i, s in enumerate(per_sample):
        ref = gene_density(s[:, 1], s[:, 2], s[:, 0], g, p, sigma)
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-7 * max(1.0, ref.max()))
    assert float(out[b].abs().sum()) == 0.0


def test_a_single_spot_is_the_separable_kernel():
    k = gaussian_kernel1d(2.0)
    r = (k.numel() - 1) // 2
    out = batch_density(torch.tensor([[0, 0, 10, 12]]), 1, 1, 32, 2.0)[0, 0]
    torch.testing.assert_close(out[10 - r:10 + r + 1, 12 - r:12 + r + 1], k[:, None] * k[None, :])
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)
    # a spot just outside the halo never reaches the patch; one inside it does
    assert float(batch_density(torch.tensor([[0, 0, -r - 1, 5]]), 1, 1, 32, 2.0).sum()) == 0.0
    assert float(batch_density(torch.tensor([[0, 0, -r, 5]]), 1, 1, 32, 2.0).sum()) > 0.0


def test_large_batches_are_summed_in_blocks(monkeypatch):
    import segjointgene.preprocess.density as density

    rng = np.random.default_rng(1)
    s = _random_spots(rng, 300, 4, 16, 8)
    spots = torch.tensor(np.c_[np.zeros(len(s), int), s])
    whole = batch_density(spots, 1, 4, 16, 2.0)
    monkeypatch.setattr(density, "_BLOCK_ELEMENTS", 16 * 16 * 7)  # 7 spots per block
    torch.testing.assert_close(batch_density(spots, 1, 4, 16, 2.0), whole)


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(3, 4), TypeError, "integers"),
    (torch.zeros(3, 3, dtype=torch.long), ValueError, r"\(N, 4\)"),
    (torch.tensor([[0, 7, 1, 1]]), ValueError, "gene"),
    (torch.tensor([[2, 0, 1, 1]]), ValueError, "sample"),
])
def test_bad_spot_lists_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        batch_density(bad, 2, 3, 8, 1.0)


def _images(ds, batch):
    return batch_images(batch, n_genes=ds.n_genes, patch_size=ds.patch_size, sigma=ds.density_sigma,
                        halo=ds.density_halo, device="cpu")


def _check_dataset_images(data_dir, split):
    ds = ImagePatchDataset(data_dir, split, spot_lists=True)
    item = ds[0]
    assert "image" not in item and item["spots"].dtype == torch.int32 and item["spots"].shape[1] == 3
    loader = DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate_spot_lists)
    seen, halo_spots = 0, 0
    for batch in loader:
        images = _images(ds, batch)
        rows, cols = batch["spots"][:, 2], batch["spots"][:, 3]
        p = ds.patch_size
        halo_spots += int(((rows < 0) | (rows >= p) | (cols < 0) | (cols >= p)).sum())
        for j, index in enumerate(batch["index"].tolist()):
            stored = load_npz(ds.paths[index], (PatchKeys.IMAGE,))[PatchKeys.IMAGE]
            np.testing.assert_allclose(images[j].numpy(), stored, rtol=1e-5, atol=1e-6 * max(1.0, stored.max()))
            seen += 1
    assert seen == len(ds)
    return halo_spots


def test_spot_list_mode_rebuilds_every_stored_image(sim128):
    halo_spots = sum(_check_dataset_images(sim128.data_dir, split) for split in ("train", "test"))
    assert halo_spots > 0  # neighbours' spots spill into the patches across their borders


def test_spot_list_mode_with_another_sigma_and_patch_size(tmp_path, sim128):
    data = tmp_path / "data"
    preprocess_section(read_section(sim128.raw_dir), data, PreprocessConfig(patch_size=32, density_sigma=1.5),
                       progress=False)
    _check_dataset_images(data, "train")


def test_image_batches_and_spot_batches_give_the_same_images(sim128):
    plain = ImagePatchDataset(sim128.data_dir, "train")
    spots = ImagePatchDataset(sim128.data_dir, "train", spot_lists=True)
    a = next(iter(DataLoader(plain, batch_size=len(plain))))
    b = next(iter(DataLoader(spots, batch_size=len(spots), collate_fn=collate_spot_lists)))
    torch.testing.assert_close(_images(spots, b), _images(plain, a), rtol=1e-5, atol=1e-7)
    for key in ("instance", "label", "core", "origin", "index"):
        torch.testing.assert_close(a[key], b[key])
    # the spots are shared with worker processes, and workers collate them the same way
    c = next(iter(DataLoader(spots, batch_size=len(spots), collate_fn=collate_spot_lists, num_workers=1)))
    torch.testing.assert_close(c["spots"], b["spots"])


def test_spot_list_mode_needs_the_spots_table(sim128_copy):
    (sim128_copy.data_dir / "spots.npz").unlink()
    with pytest.raises(InputNotFoundError, match="spots.npz"):
        ImagePatchDataset(sim128_copy.data_dir, "train", spot_lists=True)
    with pytest.raises(ValueError, match="spot_lists=True"):
        ImagePatchDataset(sim128_copy.data_dir, "train").spot_list(0)


def test_a_section_s_spot_lists_are_small(sim128):
    meta = load_metadata(sim128.data_dir)
    ds = ImagePatchDataset(sim128.data_dir, "train", spot_lists=True)
    image_bytes = len(ds) * len(meta.genes) * ds.patch_size ** 2 * 4
    spot_bytes = ds._spot_rows.numel() * ds._spot_rows.element_size() + ds._spot_offsets.numel() * 8
    assert spot_bytes * 20 < image_bytes
