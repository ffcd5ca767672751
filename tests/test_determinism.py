"""Determinism and leaks: the same --random_seed gives the same bytes; memory stays flat over 20 epochs.

Runs go through the real command line in subprocesses (so each has its own hash seed and allocator), on CPU with one
torch thread and no loader workers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SMALL_CID_TRAIN, make_sim

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "main.py")
NAME = "det"
TRAIN = [*SMALL_CID_TRAIN, f"--datasets_name={NAME}", "--save_interval=2"]
TIMEOUT_S = 300
#: Files of a run that legitimately differ between two identical runs: they record times (seconds per epoch in
#: the log and its curves) or absolute paths (run.json). Everything else, checkpoints included, is byte-identical.
NOT_BYTE_IDENTICAL = {"train_log.csv", "results/figures/training_curves.png", "run.json"}
RESULT_FILES = ("instance_mask.tif", "celltype_mask.tif", "initial_instance_mask.tif", "celltypes.csv",
                "spots_assigned.csv", "cells.csv", "gene_ranking.csv", "gene_celltype_scores.csv")


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A preprocessed 128 x 128 section in 16 patches of 32 px, 8 genes, 3 cell types."""
    return make_sim(tmp_path_factory.mktemp("det"), name=NAME, size=128, patch_size=32, n_genes=8)


def _run_all(commands: list[list[str]]) -> None:
    """Run CLI commands side by side (one thread each) and require success."""
    procs = [subprocess.Popen([sys.executable, MAIN, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err[-3000:]


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_run(section, tmp_path):
    import torch

    from segjointgene.methods.segjointgene.checkpoint import list_epochs, load_checkpoint

    # two copies of the project: the same command in each must give the same bytes everywhere
    first, second = section.work_dir, tmp_path / "second"
    shutil.copytree(first / "data", second / "data")

    def args(work, suffix, seed, epochs=4):
        return [*TRAIN, f"--work_dir={work}", f"--net_sub_suffix={suffix}", f"--random_seed={seed}",
                f"--net_epoch={epochs}"]

    _run_all([args(first, "run", 5), args(second, "run", 5), args(first, "other_seed", 6, epochs=2)])
    a, b, c = (w / "checkpoints" / NAME / s for w, s in ((first, "run"), (second, "run"), (first, "other_seed")))
    assert list_epochs(a) == list_epochs(b) == [0, 2, 4]
    for epoch in list_epochs(a):
        sa, sb = load_checkpoint(a / f"net_{epoch}.pt"), load_checkpoint(b / f"net_{epoch}.pt")
        for key in sa["model"]:
            assert torch.equal(sa["model"][key], sb["model"][key]), (epoch, key)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert {f"labels_cache_{e}.npz" for e in (0, 2, 4)} | {f"results/{n}" for n in RESULT_FILES} <= fa.keys()
    differ = sorted(name for name in fa if fa[name].read_bytes() != fb[name].read_bytes())
    # checkpoints, label caches, attribution sums, results, figures: byte-identical
    assert set(differ) <= NOT_BYTE_IDENTICAL, differ
    # the seed matters: another seed gives other weights and other labels
    sa, sc = load_checkpoint(a / "net_2.pt"), load_checkpoint(c / "net_2.pt")
    assert any(not torch.equal(sa["model"][k], sc["model"][k]) for k in sa["model"])
    assert (a / "labels_cache_2.npz").read_bytes() != (c / "labels_cache_2.npz").read_bytes()


#: Resident-set growth allowed between the end of epoch WARMUP and any later epoch, and per epoch (fitted slope).
#: Measured on this 16-patch run (CPU, one thread, CID every epoch, a checkpoint every epoch) after gc.collect() and
#: glibc malloc_trim(0): +0.2 MB over epochs 5..20 (slope ~0.01 MB/epoch); a leaked checkpoint dict per epoch
#: would add ~1.6 MB per epoch, a leaked copy of the labels ~0.1 MB. Without malloc_trim (not glibc) the RSS
#: fluctuates by about +-3 MB around a flat level, hence the looser bound there.
WARMUP = 5
MAX_GROWTH_MB = {True: 4.0, False: 12.0}
MAX_SLOPE_MB = {True: 0.15, False: 0.5}

_MEMORY_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, gc, json, logging, re, sys
    import psutil
    from segjointgene.cli import main

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        trim = None
    proc = psutil.Process()
    rss = []

    class AtEpochEnd(logging.Handler):
        def emit(self, record):
            if re.match(r"epoch \\d+:", record.getMessage()):
                gc.collect()
                if trim is not None:
                    trim(0)
                rss.append(proc.memory_info().rss / 2 ** 20)

    logging.getLogger("segjointgene").addHandler(AtEpochEnd(level=logging.INFO))
    status = main(sys.argv[1:])
    print(json.dumps({"status": status, "rss_mb": rss, "trimmed": trim is not None}))
""")


def test_resident_memory_stays_flat_over_20_epochs(section):
    pytest.importorskip("psutil")
    n_epochs = 20
    args = [*TRAIN, f"--work_dir={section.work_dir}", "--net_sub_suffix=memory", f"--net_epoch={n_epochs}",
            "--save_interval=1", "--random_seed=3", "--passes_per_epoch=1"]
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 0
    rss = np.asarray(report["rss_mb"])
    assert rss.size == n_epochs + 1, f"expected one 'epoch N:' log record per epoch, got {rss.size}"
    later = rss[WARMUP:]
    growth = float(later.max() - later[0])
    slope = float(np.polyfit(np.arange(later.size), later, 1)[0])
    trimmed = bool(report["trimmed"])
    detail = f"RSS per epoch (MB): {np.round(rss, 1).tolist()}"
    assert growth < MAX_GROWTH_MB[trimmed], f"grew {growth:.1f} MB after epoch {WARMUP}; {detail}"
    assert slope < MAX_SLOPE_MB[trimmed], f"slope {slope:.3f} MB/epoch; {detail}"
