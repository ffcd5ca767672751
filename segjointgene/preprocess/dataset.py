"""Patch dataset and the dynamic label store (layer 2: torch).

:class:`LabelStore` holds the current pseudo-labels (instance ids) of every patch of a split in shared memory:
DataLoader worker processes, forked or spawned, map the same memory, so an update made by the main process is seen by
the next batch any worker loads. Class maps are never stored separately: the class of a pixel is always the class of
its instance (``class_lut[instance]``), which makes "class map = class of the instance map" hold by construction.

:class:`ImagePatchDataset` reads patch files (validated when the dataset is opened) and returns, per patch, the
density image, the current labels, the fixed (core) labels and the patch index. With ``spot_lists=True`` it returns
the patch's spots instead of its density image: the whole split's spots are held in (shared) memory, batches are
collated by :func:`collate_spot_lists`, and :func:`segjointgene.preprocess.density.batch_images` builds the images on
the training device, equal to the stored images within float32 rounding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..constants import BACKGROUND, CELLS_TABLE, METADATA_FILE, SPOTS_TABLE, PatchKeys
from ..errors import DataError, InputNotFoundError
from ..io.files import load_npz, npz_headers, save_npz
from ..io.metadata import DatasetMetadata, load_metadata
from .geometry import parse_patch_name
from .pipeline import DENSITY_TRUNCATE, gene_density, stored_keys

log = logging.getLogger(__name__)

__all__ = ["ImagePatchDataset", "LabelStore", "augment_patches", "collate_spot_lists", "load_label_cache", "read_class_lut", "save_label_cache"]


def read_class_lut(data_dir: str | os.PathLike) -> np.ndarray:
    """(max cell id + 1,) int64 lookup: cell (instance) id -> cell-type id; entry 0 is background."""
    import pandas as pd

    path = Path(data_dir) / CELLS_TABLE
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: preprocess the section again")
    cells = pd.read_csv(path)
    lut = np.zeros(int(cells["cell"].max()) + 1, np.int64)
    lut[cells["cell"].to_numpy()] = cells["celltype_id"].to_numpy()
    return lut


class LabelStore:
    """Current instance labels of the patches of one split, in shared memory.

    Parameters
    ----------
    names : patch file names, in dataset order.
    instances : (N, P, P) integer tensor, the initial labels (copied into shared memory as int32).
    class_lut : (M,) integer tensor or array, instance id -> class id (0 -> 0).
    """

    def __init__(self, names: Sequence[str], instances: torch.Tensor, class_lut: np.ndarray | torch.Tensor):
        if instances.ndim != 3 or len(names) != instances.shape[0]:
            raise ValueError(f"instances must be (N, P, P) with N = len(names) = {len(names)}, got {tuple(instances.shape)}")
        self.names = list(names)
        self.instances = instances.to(torch.int32).clone().share_memory_()
        self.class_lut = torch.as_tensor(np.asarray(class_lut), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.names)

    def classes(self, instances: torch.Tensor) -> torch.Tensor:
        """Class map of an instance map (any shape), on the instance map's device."""
        return self.class_lut.to(instances.device)[instances.long()]

    def update(self, indices: torch.Tensor | Sequence[int], instances: torch.Tensor) -> int:
        """Store new labels for the given patches (any device); returns the number of pixels that changed."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu()
        new = instances.to(device="cpu", dtype=torch.int32)
        changed = int((self.instances[idx] != new).sum())
        self.instances[idx] = new
        return changed

    def state_dict(self) -> dict[str, np.ndarray]:
        inst = self.instances.numpy()
        return {"names": np.asarray(self.names), "instances": inst.copy(),
                "classes": self.class_lut.numpy()[inst].astype(np.int32)}

    def load_state_dict(self, state: Mapping[str, np.ndarray], *, source: str = "label cache") -> None:
        names = [str(n) for n in state["names"]]
        if names != self.names:
            raise DataError(f"{source}: its patches ({len(names)}) differ from this dataset's ({len(self.names)}); "
                            "it belongs to another preprocessing of the section")
        inst = np.asarray(state["instances"])
        if inst.shape != tuple(self.instances.shape):
            raise DataError(f"{source}: labels of shape {inst.shape}, expected {tuple(self.instances.shape)}")
        self.instances.copy_(torch.from_numpy(inst.astype(np.int32)))

    def save(self, path: str | os.PathLike, split: str = "train") -> None:
        """Write this store alone as a label cache (atomically)."""
        save_label_cache(path, {split: self})


def save_label_cache(path: str | os.PathLike, stores: Mapping[str, LabelStore], *, fsync: bool = True) -> None:
    """Write the labels of several splits to one ``.npz`` (keys ``<split>.names|instances|classes``), atomically."""
    arrays = {f"{split}.{key}": value for split, store in stores.items() for key, value in store.state_dict().items()}
    save_npz(path, arrays, fsync=fsync)


def load_label_cache(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Read a label cache written by :func:`save_label_cache`: split -> {names, instances, classes}."""
    arrays = load_npz(path)
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        split, _, name = key.partition(".")
        out.setdefault(split, {})[name] = value
    for split, state in out.items():
        if not {"names", "instances"} <= set(state):
            raise DataError(f"{path}: split '{split}' lacks names or instances; the label cache is damaged")
    return out


class ImagePatchDataset(Dataset):
    """Patches of one split with fixed (core) labels and dynamic labels.

    Parameters
    ----------
    data_dir : preprocessed dataset folder (with ``metadata.json``).
    split : ``"train"`` or ``"test"``.
    metadata : the dataset's metadata (read when None).
    class_lut : instance id -> class id (read from ``cells.csv`` when None).
    cache_images : keep every density image in (shared) memory after the first read.
    spot_lists : return each patch's spots (``spots``) instead of its density image (``image``); the split's spots
        are read once from ``spots.npz`` (see :meth:`spot_list`). Batch such items with :func:`collate_spot_lists`
        and build their images on the device with :func:`segjointgene.preprocess.density.batch_images`.

    Every patch file is validated when the dataset opens (keys, shapes and dtypes from the headers); the image of a
    patch is checked for NaN when it is read. Errors name the file.

    Items are dicts: ``image`` (G, P, P) float32 (or, with ``spot_lists``, ``spots`` (n, 3) int32 rows
    ``(gene, row, col)``); ``instance`` and ``label`` (P, P) int64, the current labels; ``core`` (P, P) int64, the
    fixed nucleus instance map; ``origin`` (2,) int64, the patch's top-left pixel (y, x) in the padded patch frame;
    ``index`` int.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, *, metadata: DatasetMetadata | None = None,
                 class_lut: np.ndarray | None = None, cache_images: bool = False, spot_lists: bool = False):
        self.data_dir = Path(data_dir)
        self.split = split
        self.metadata = metadata if metadata is not None else load_metadata(data_dir)
        self.names = list(self.metadata.split[split])
        self.paths = [self.data_dir / split / n for n in self.names]
        self.n_genes = self.metadata.n_genes
        self.patch_size = self.metadata.patch_size
        lut = read_class_lut(data_dir) if class_lut is None else class_lut
        core = torch.zeros((len(self.paths), self.patch_size, self.patch_size), dtype=torch.int32)
        for i, path in enumerate(self.paths):
            self._check_headers(path)
            inst = load_npz(path, (PatchKeys.INSTANCE,))[PatchKeys.INSTANCE]
            if inst.size and (inst.min() < BACKGROUND or inst.max() >= len(lut)):
                raise DataError(f"{path}: instance ids outside 0..{len(lut) - 1} (the cells table); re-run preprocessing")
            core[i] = torch.from_numpy(inst)
        self.core = core.share_memory_()
        self.origins = torch.tensor([[r * self.patch_size, c * self.patch_size]
                                     for r, c in map(parse_patch_name, self.names)], dtype=torch.int64).reshape(-1, 2)
        self.labels = LabelStore(self.names, core, lut)
        self._cache: torch.Tensor | None = None
        self._cached: torch.Tensor | None = None
        if cache_images and self.paths:
            self._cache = torch.zeros((len(self.paths), self.n_genes, self.patch_size, self.patch_size)).share_memory_()
            self._cached = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()
        self.spot_lists = bool(spot_lists)
        self.density_sigma = self.metadata.density_sigma
        self.density_halo = self.metadata.density_halo
        self._spot_offsets: torch.Tensor | None = None
        self._spot_rows: torch.Tensor | None = None
        if self.spot_lists or not self.metadata.density_stored:  # without stored images they come from the spots
            self._spot_offsets, self._spot_rows = self._load_spot_lists()

    def _check_headers(self, path: Path) -> None:
        if not path.is_file():
            raise InputNotFoundError(f"{path}: listed in {METADATA_FILE} but missing; re-run preprocessing")
        headers = npz_headers(path)
        missing = [k for k in stored_keys(self.metadata.density_stored) if k not in headers]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)}; re-run preprocessing")
        p, g = self.patch_size, self.n_genes
        for key, (shape, dtype) in headers.items():
            if key not in PatchKeys.DTYPES:
                continue
            want = (g, p, p) if key == PatchKeys.IMAGE else (p, p)
            if shape != want or dtype != np.dtype(PatchKeys.DTYPES[key]):
                raise DataError(f"{path}: array '{key}' has shape {shape} and dtype {dtype}, expected {want} "
                                f"{PatchKeys.DTYPES[key]}; re-run preprocessing")

    def __len__(self) -> int:
        return len(self.paths)

    def read_image(self, index: int) -> torch.Tensor:
        """(G, P, P) float32 density image of a patch (from the cache when enabled; built from its spots as
        preprocessing builds it when the dataset stores none)."""
        if self._cache is not None and bool(self._cached[index]):
            return self._cache[index]
        path = self.paths[index]
        if not self.metadata.density_stored:
            gene, row, col = self.spot_list(index).numpy().astype(np.int64).T
            image = gene_density(row, col, gene, self.n_genes, self.patch_size, self.density_sigma,
                                 halo=self.density_halo)
        else:
            image = load_npz(path, (PatchKeys.IMAGE,))[PatchKeys.IMAGE]
        if not np.isfinite(image).all():
            raise DataError(f"{path}: the density image contains NaN or infinite values; re-run preprocessing")
        tensor = torch.from_numpy(image)
        if self._cache is not None:
            self._cache[index] = tensor
            self._cached[index] = True
        return tensor

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        instance = self.labels.instances[index].long()
        data = {"spots": self.spot_list(index)} if self.spot_lists else {"image": self.read_image(index)}
        return {
            **data,
            "instance": instance,
            "label": self.labels.classes(instance),
            "core": self.core[index].long(),
            "origin": self.origins[index],
            "index": index,
        }

    # ------------------------------------------------------------------------------------------ spot-list mode
    def _load_spot_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every patch's spots from ``spots.npz``: (N + 1,) int64 offsets and (M, 3) int32 rows (gene, row, col).

        A spot belongs to every patch whose window enlarged by the density halo holds it, with its pixel
        (``floor`` of its coordinates, as preprocessing does) relative to that patch's top-left corner.
        """
        meta, path = self.metadata, self.data_dir / SPOTS_TABLE
        if not path.is_file():
            raise InputNotFoundError(f"{path} not found: spot lists need the spots table that preprocessing writes; "
                                     "preprocess the section again")
        truncate = meta.density_truncate
        if truncate != DENSITY_TRUNCATE:
            raise DataError(f"{self.data_dir / METADATA_FILE}: densities were truncated at {truncate} sigma, this "
                            f"version builds them at {DENSITY_TRUNCATE}; preprocess the section again")
        spots = load_npz(path, ("gene", "x", "y"))
        y0, x0 = meta.crop_offset
        p, h = self.patch_size, self.density_halo
        rows = np.floor(spots["y"]).astype(np.int64) - y0  # padded patch frame, as preprocessing computes it
        cols = np.floor(spots["x"]).astype(np.int64) - x0
        genes = spots["gene"].astype(np.int64)
        if genes.size and (genes.min() < 0 or genes.max() >= self.n_genes):
            raise DataError(f"{path}: gene indices outside 0..{self.n_genes - 1} (the genes of {METADATA_FILE}); "
                            "preprocess the section again")
        n_grid = (int(self.origins[:, 0].max()) // p + 1, int(self.origins[:, 1].max()) // p + 1) if len(self) else (0, 0)
        where = np.full(n_grid, -1, np.int64)  # grid cell -> dataset index (-1: not in this split)
        if len(self):
            where[self.origins[:, 0].numpy() // p, self.origins[:, 1].numpy() // p] = np.arange(len(self))
        reach = -(-h // p)  # neighbouring patches a halo can reach
        parts = []
        for dr in range(-reach, reach + 1):
            for dc in range(-reach, reach + 1):
                pr, pc = rows // p + dr, cols // p + dc  # the patch that may hold the spot in its halo window
                ok = (pr >= 0) & (pr < n_grid[0]) & (pc >= 0) & (pc < n_grid[1])
                idx = np.full(rows.shape, -1, np.int64)
                idx[ok] = where[pr[ok], pc[ok]]
                rr, cc = rows - pr * p, cols - pc * p
                ok &= (idx >= 0) & (rr >= -h) & (rr < p + h) & (cc >= -h) & (cc < p + h)
                parts.append(np.stack([idx[ok], genes[ok], rr[ok], cc[ok]], axis=1))
        table = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)
        table = table[np.argsort(table[:, 0], kind="stable")]
        offsets = np.searchsorted(table[:, 0], np.arange(len(self) + 1))
        return (torch.from_numpy(offsets.astype(np.int64)).share_memory_(),
                torch.from_numpy(np.ascontiguousarray(table[:, 1:], dtype=np.int32)).share_memory_())

    def spot_list(self, index: int) -> torch.Tensor:
        """(n, 3) int32 spots of patch ``index``: rows ``(gene, row, col)``, pixel relative to the patch's top-left,
        including the spots up to ``density_halo`` px outside it (they spill into its density). Spot-list mode only."""
        if self._spot_offsets is None:
            raise ValueError("spot_list() needs the dataset opened with spot_lists=True (or without stored images)")
        return self._spot_rows[self._spot_offsets[index]:self._spot_offsets[index + 1]]


def collate_spot_lists(items: Sequence[Mapping[str, torch.Tensor | int]]) -> dict[str, torch.Tensor]:
    """Collate spot-list items (``ImagePatchDataset(..., spot_lists=True)``) into a batch.

    Every key but ``spots`` is stacked as the default collate does; the spots are concatenated into one (N, 4) int32
    tensor with rows ``(sample, gene, row, col)`` (the layout of :func:`segjointgene.preprocess.density.batch_density`).
    """
    from torch.utils.data import default_collate

    batch = default_collate([{k: v for k, v in item.items() if k != "spots"} for item in items])
    spots = [torch.as_tensor(item["spots"], dtype=torch.int32) for item in items]
    sample = torch.repeat_interleave(torch.arange(len(spots), dtype=torch.int32),
                                     torch.tensor([len(s) for s in spots], dtype=torch.int64))
    batch["spots"] = torch.cat([sample[:, None], torch.cat(spots) if spots else torch.zeros((0, 3), dtype=torch.int32)],
                               dim=1)
    return batch


def augment_patches(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random dihedral transform (flip + 90-degree rotation) of every image and its labels, per sample."""
    b = images.shape[0]
    codes = torch.randint(0, 8, (b,), generator=generator).tolist()
    out_i, out_l = [], []
    for i, code in enumerate(codes):
        img, lab = images[i], labels[i]
        if code & 4:
            img, lab = img.flip(-1), lab.flip(-1)
        k = code & 3
        out_i.append(torch.rot90(img, k, dims=(-2, -1)))
        out_l.append(torch.rot90(lab, k, dims=(-2, -1)))
    return torch.stack(out_i), torch.stack(out_l)
