"""The benchmark scripts run (tiny sizes) and print one JSON line per measurement: they must not rot."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _records(out: str) -> dict[str, dict]:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["name"]: row for row in rows}


@pytest.mark.parametrize("name, args", [
    ("bench_train", ["--repeats", "1"]),
    ("bench_cid", ["--repeats", "1", "--k1", "1", "--k2", "2", "--chunk-types", "1"]),
    ("bench_loader", ["--workers", "0", "--epochs", "1"]),
])
def test_benchmark_script_prints_measurements(sim128, capsys, name, args):
    import torch

    threads = torch.get_num_threads()
    try:
        code = _script(name).main(["--data", str(sim128.data_dir), "--width", "4", "--batch", "2", *args])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    rows = _records(capsys.readouterr().out)
    assert rows["machine"]["cores"] >= 1
    timed = [r for r in rows.values() if r["name"] != "machine" and r.get("unit") == "s"]
    assert timed and all(r["value"] >= 0 for r in timed)
    if name == "bench_train":
        assert rows["train_step"]["patches_per_s"] > 0 and "label_update" in rows
    if name == "bench_cid":
        # every variant's cost is estimated from its measured step cost; the plain one computes every row
        assert rows["rows_batch_plain"]["fraction"] == 1.0
        assert rows["cid_plain_all_batch"]["ratio_to_train_step"] > 0 and "cid_fold_local_batch" in rows


def test_mask_ceiling_orders_the_three_masks():
    """On a small hard section the ellipses of the true cells' moments beat those re-estimated from the true spots,
    which beat (or tie) the fitted model's; every score is a fraction."""
    r = _script("mask_ceiling").run("dense", 0.1, 0, 1.0, 128)
    assert all(0.0 <= v <= 1.0 for k, v in r.items() if k != "spots_per_cell") and r["spots_per_cell"] > 5
    assert r["true moments: median IoU"] > 0.75
    assert r["true moments: median IoU"] > r["oracle spots: median IoU"] >= r["fitted: median IoU"] - 0.02
    assert r["wrong_within_1px"] <= r["wrong_within_2px"]


def test_partition_start_scores_and_energy():
    """From the true cells the partition keeps more of the spots right than from the fitted start; the energy's
    terms are finite and the smoothness term is that weight times a count of pixel pairs."""
    r = _script("partition_start").run("dense", 0.1, 0, 128)
    fitted, truth = r["shape 0.5, from fitted"], r["shape 0.5, from truth"]
    assert truth["spot acc"] > fitted["spot acc"] and truth["gene mIoU"] > fitted["gene mIoU"]
    assert r["shape 0, from truth"]["E shape"] == 0.0
    for row in r.values():
        assert all(np.isfinite(v) for v in row.values())
        assert float(row["E smoothness"] / 0.5).is_integer() or row["E smoothness"] == 0.0
