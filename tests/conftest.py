"""Shared fixtures: global seeding, small simulated sections (raw + truth + preprocessed), the real-data path."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REAL_RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ca1_3_1_left" / "CA1_raw" / "3_1_left"


#: A short self-training with CID through the CLI whose labels really change (labels grow from epoch 1, CID from
#: epoch 2); the kill and determinism tests add the dataset name, seed and epochs.
SMALL_CID_TRAIN = ["--step_name=SegJointGene", "--quiet", "--device=cpu", "--num_threads=1", "--num_workers=0",
                   "--net_width=4", "--net_batch_size=4", "--net_lr=0.01", "--passes_per_epoch=3", "--warmup_epochs=1",
                   "--attr_method=CID", "--attr_epoch=2", "--attr_n_gene=4", "--attr_n_celltype=3", "--CID_n_steps=3",
                   "--cache_patches=yes", "--label_update=v1"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, restored afterwards: faster for small tensors on shared cores (OpenMP
    threads spin while others wait), and bit-identical results need the same thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Tests must pass their own generators; this only makes accidental global draws repeatable."""
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass


@dataclass(frozen=True)
class SimPaths:
    work_dir: Path  # holds data/ and checkpoints/
    name: str  # --datasets_name
    raw_dir: Path
    truth_dir: Path
    data_dir: Path


def make_sim(work_dir: Path, *, name: str = "sim", size: int = 128, patch_size: int = 64, mode: str = "dense",
             seed: int = 0, n_genes: int = 12, n_celltypes: int = 3, preprocess: bool = True,
             nucleus_seeds: str = "region") -> SimPaths:
    """Simulate a small section under ``work_dir`` and (optionally) preprocess it."""
    from segjointgene.config import PreprocessConfig, SimulateConfig
    from segjointgene.io.files import read_section
    from segjointgene.preprocess.pipeline import preprocess_section
    from segjointgene.evaluate.simulate import simulate_section, write_simulated

    raw = work_dir / "data" / f"{name}_raw" / "section"
    sim = simulate_section(SimulateConfig(size_px=size, n_genes=n_genes, n_celltypes=n_celltypes, markers_per_type=2,
                                          mode=mode, cell_radius_px=10.0, spot_density=0.05), rng=seed)
    truth = write_simulated(sim, raw)
    data = work_dir / "data" / name
    if preprocess:
        preprocess_section(read_section(raw), data, PreprocessConfig(patch_size=patch_size, nucleus_seeds=nucleus_seeds),
                           progress=False)
    return SimPaths(work_dir=work_dir, name=name, raw_dir=raw, truth_dir=truth, data_dir=data)


@pytest.fixture(scope="session")
def sim128(tmp_path_factory) -> SimPaths:
    """A 128 x 128 dense section, 12 genes, 3 types, preprocessed into 64-px patches (shared, do not modify)."""
    return make_sim(tmp_path_factory.mktemp("sim128"))


@pytest.fixture()
def sim128_copy(tmp_path) -> SimPaths:
    """A private 128 x 128 section that a test may modify."""
    return make_sim(tmp_path)


@pytest.fixture(scope="session")
def real_raw() -> Path:
    """The real CA1 3-1 left raw folder; skips the test when ../shared/data is absent."""
    if not REAL_RAW.is_dir():
        pytest.skip("real CA1 data (../shared/data) not available")
    return REAL_RAW
