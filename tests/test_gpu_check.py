"""The prepared GPU check runs on a CPU machine: every CUDA part is skipped with a clear line, exit 0; --smoke runs
the measuring code at toy sizes (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(tmp_path, *extra):
    res = subprocess.run([sys.executable, str(SCRIPT), f"--out={tmp_path}", *extra], capture_output=True, text=True,
                         timeout=600)
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    return res, {row["check"]: row for row in lines}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check measures instead of skipping")
def test_without_cuda_every_cuda_part_is_skipped_with_a_reason(tmp_path):
    res, rows = _run(tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert rows["device"]["cuda"] is False
    for part in ("pytest_gpu", "amp_train_and_resume", "cid_memory_cap", "torchrun_nccl", "train_step"):
        assert "no CUDA device" in rows[part]["skipped"]


@pytest.mark.slow
def test_smoke_runs_the_measuring_code_on_the_cpu(tmp_path):
    res, rows = _run(tmp_path, "--smoke")
    assert res.returncode == 0, res.stderr[-2000:]
    assert rows["train_step"]["tflops"] >= 0 and rows["cid_ratio"]["ratio"] > 0 and rows["loader"]["ratio"] > 0
