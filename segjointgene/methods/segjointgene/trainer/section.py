"""The section around each patch: neighbouring labels, nucleus seeds, spot positions, the cell-calling score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from segjointgene.constants import CELLS_TABLE, SPOTS_TABLE
from segjointgene.evaluate.metrics import cell_calling_score
from segjointgene.io.files import load_npz
from segjointgene.io.metadata import DatasetMetadata
from segjointgene.preprocess.dataset import ImagePatchDataset, LabelStore
from segjointgene.results.stitch import stitch_patches


class SectionLabels:
    """Every patch's current and fixed labels, addressable by grid position, to give label updates context.

    Label updates are local to a patch; without context a cell whose nucleus lies in one patch could never grow into
    the next one. :meth:`context` returns a batch's maps enlarged by a halo taken from the neighbouring patches'
    current labels (background where there is no patch).
    """

    def __init__(self, datasets: dict[str, ImagePatchDataset]):
        self.where: dict[tuple[int, int], tuple[ImagePatchDataset, int]] = {}
        for ds in datasets.values():
            for i, (y, x) in enumerate(ds.origins.tolist()):
                self.where[(y // ds.patch_size, x // ds.patch_size)] = (ds, i)
        self.patch_size = next(iter(datasets.values())).patch_size

    def context(self, origins: torch.Tensor, halo: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P+2h, P+2h) current instance and core maps around the patches with these origins (B, 2)."""
        p, h = self.patch_size, halo
        b = origins.shape[0]
        inst = torch.zeros((b, p + 2 * h, p + 2 * h), dtype=torch.int64)
        core = torch.zeros_like(inst)
        for i, (y, x) in enumerate(origins.tolist()):
            r, c = y // p, x // p
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    hit = self.where.get((r + dr, c + dc))
                    if hit is None:
                        continue
                    ds, j = hit
                    # the neighbour's part that falls inside the enlarged window
                    ys = slice(max(0, h + dr * p), min(p + 2 * h, h + (dr + 1) * p))
                    xs = slice(max(0, h + dc * p), min(p + 2 * h, h + (dc + 1) * p))
                    sy = slice(ys.start - (h + dr * p), ys.stop - (h + dr * p))
                    sx = slice(xs.start - (h + dc * p), xs.stop - (h + dc * p))
                    inst[i, ys, xs] = ds.labels.instances[j, sy, sx]
                    core[i, ys, xs] = ds.core[j, sy, sx]
        return inst, core


def spot_positions(data_dir: Path, meta: DatasetMetadata) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every spot in the padded patch frame."""
    spots = load_npz(data_dir / SPOTS_TABLE, ("x", "y"))
    y0, x0 = meta.crop_offset
    return spots["x"] - x0, spots["y"] - y0


def nucleus_seeds(data_dir: Path, meta: DatasetMetadata, datasets: dict[str, ImagePatchDataset],
                  n_ids: int) -> torch.Tensor:
    """(n_ids, 3) float32 nucleus (y, x, r) of every cell id: centroid in the padded patch frame, equivalent radius
    sqrt(area / pi) of its core pixels; NaN for ids without a nucleus."""
    cells = pd.read_csv(Path(data_dir) / CELLS_TABLE)
    y0, x0 = meta.crop_offset
    area = sum(torch.bincount(ds.core.flatten().long(), minlength=n_ids).double() for ds in datasets.values())
    seeds = torch.full((n_ids, 3), float("nan"))
    ids = torch.as_tensor(cells["cell"].to_numpy())
    seeds[ids, 0] = torch.as_tensor(cells["y"].to_numpy() - y0, dtype=torch.float32)
    seeds[ids, 1] = torch.as_tensor(cells["x"].to_numpy() - x0, dtype=torch.float32)
    seeds[:, 2] = torch.sqrt(area[:n_ids] / torch.pi).float()
    return seeds


def cell_calling(stores: list[LabelStore], meta: DatasetMetadata, spot_x: np.ndarray, spot_y: np.ndarray,
                 distance: int) -> tuple[float, int]:
    """Cell-calling score of the current labels stitched over the section, and the labelled pixel count."""
    canvas = stitch_patches({name: (inst > 0).numpy().astype(np.uint8) for store in stores
                             for name, inst in zip(store.names, store.instances)}, meta, dtype=np.uint8)
    return cell_calling_score(canvas, spot_x, spot_y, distance).score, int(canvas.sum())
