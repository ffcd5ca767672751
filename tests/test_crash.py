"""Crash safety: kill -9 during training and preprocessing, then resume / re-run to the same bytes.

Each test runs the real command line in a subprocess on a small simulated section (CPU, one torch thread, no loader
workers: bit-identity needs the same thread count in both runs) and kills it with SIGKILL at a point drawn from a
seeded generator. Nothing is mocked: the files on disk after the kill are whatever the program had written.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from segjointgene.cli import main
from tests.conftest import SMALL_CID_TRAIN, make_sim

MAIN = str(Path(__file__).resolve().parents[1] / "main.py")
NAME = "crash"
TRAIN = [*SMALL_CID_TRAIN, f"--datasets_name={NAME}", "--random_seed=11"]
N_EPOCHS = 10
#: Every other epoch is saved, so a resume usually re-runs an epoch whose log row was already written.
SAVE_INTERVAL = 2
TIMEOUT_S = 300


def _popen(*args: str, new_session: bool = True) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, MAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=new_session)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT_S) -> None:
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the process ended (status {proc.returncode}) before {what}:\n{err[-2000:]}")
        if time.monotonic() - start > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def _leave_temp(target: Path) -> Path:
    """Have a child process die inside ``atomic_path(target)``: returns the temporary file it leaves behind."""
    code = textwrap.dedent(f"""
        import os
        from segjointgene.io.files import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half a file")
            print(tmp.name, flush=True)
            os._exit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    return target.with_name(out)


def _visible(folder: Path) -> list[str]:
    """What a shell-style glob of the folder sees, recursively (hidden names excluded, as ``ls`` and ``*`` do)."""
    return sorted(glob.glob("**", root_dir=folder, recursive=True))


# ============================================================================================ temporary files
def test_atomic_write_killed_midway_keeps_the_old_file(tmp_path):
    from segjointgene.io.files import write_json

    target = tmp_path / "metadata.json"
    write_json(target, {"complete": True})
    before = target.read_bytes()
    temp = _leave_temp(target)
    assert target.read_bytes() == before  # the final name never holds a partial file
    assert temp.is_file() and temp.name.startswith(".tmp-") and temp.name.endswith("-metadata.json")
    assert _visible(tmp_path) == ["metadata.json"]  # pathlib's "*" would match it: the package's patterns start
    assert list(tmp_path.glob("metadata*.json")) == [target]  # with a literal name (p_*, net_*, labels_cache_*)


def test_remove_stale_temps_keeps_live_and_foreign_ones(tmp_path):
    from segjointgene.io.files import atomic_path, remove_stale_temps

    stale = _leave_temp(tmp_path / "p_0_0.npz")  # its process has exited
    pid, host = stale.name.split("-")[1:3]
    foreign = tmp_path / stale.name.replace(f"-{host}-", "-000000-" if host != "000000" else "-111111-")
    foreign.write_bytes(b"made on another machine")
    stale_dir = tmp_path / stale.name.replace("p_0_0.npz", "embeddings_csvzip")
    stale_dir.mkdir()
    (stale_dir / "0.zip").write_bytes(b"x")
    (tmp_path / "p_0_1.npz").write_bytes(b"a real file")
    with atomic_path(tmp_path / "live.npz") as live:  # this process is alive: its temporary stays
        live.write_bytes(b"being written")
        removed = remove_stale_temps(tmp_path)
        assert live.is_file()
    assert sorted(removed) == sorted([stale, stale_dir])
    assert not stale.exists() and not stale_dir.exists() and foreign.is_file() and (tmp_path / "p_0_1.npz").is_file()
    assert remove_stale_temps(tmp_path / "absent") == []


# ============================================================================================ training
@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A preprocessed 128 x 128 section in 16 patches of 32 px, 8 genes, 3 cell types."""
    return make_sim(tmp_path_factory.mktemp("crash"), name=NAME, size=128, patch_size=32, n_genes=8)


def _train_args(work: Path, suffix: str, *extra: str) -> list[str]:
    return [*TRAIN, f"--work_dir={work}", f"--net_sub_suffix={suffix}", f"--net_epoch={N_EPOCHS}",
            f"--save_interval={SAVE_INTERVAL}", *extra]


def test_kill_training_and_resume_gives_the_uninterrupted_result(section):
    import torch

    from segjointgene.methods.segjointgene.checkpoint import list_epochs, load_checkpoint
    from segjointgene.preprocess.dataset import load_label_cache

    work = section.work_dir
    runs = work / "checkpoints" / NAME
    # the uninterrupted run and the run to kill, side by side (one thread each)
    straight = _popen(*_train_args(work, "straight"))
    victim = _popen(*_train_args(work, "victim"))
    run = runs / "victim"
    _wait_for(lambda: list(run.glob("net_*.pt")), victim, "the first checkpoint")
    delay = float(np.random.default_rng(2024).uniform(0.05, 1.0))
    time.sleep(delay)
    os.killpg(victim.pid, signal.SIGKILL)
    status, _, _ = _finish(victim)
    assert status == -signal.SIGKILL
    saved = list_epochs(run)
    assert saved and saved[-1] < N_EPOCHS, f"killed {delay:.2f} s after the first checkpoint, too late: {saved}"

    # what a kill between the label cache and the checkpoint of the next save would leave: an orphan label cache and
    # the checkpoint's temporary file; both are ignored (and the cache overwritten) by the resume
    following = saved[-1] + SAVE_INTERVAL
    if not (run / f"labels_cache_{following}.npz").exists():
        (run / f"labels_cache_{following}.npz").write_bytes((run / f"labels_cache_{saved[-1]}.npz").read_bytes())
    temp = _leave_temp(run / f"net_{following}.pt")
    assert not any(".tmp-" in name for name in _visible(run))
    assert list_epochs(run) == saved

    resumed = _popen(*_train_args(work, "victim", "--if_load_ckpt=True"))
    status, out, err = _finish(resumed)
    assert status == 0, err[-3000:]
    assert f"resumed from net_{saved[-1]}.pt" in err
    status, _, err = _finish(straight)
    assert status == 0, err[-3000:]

    ref = runs / "straight"
    assert list_epochs(run) == list_epochs(ref) == list(range(0, N_EPOCHS + 1, SAVE_INTERVAL))
    for epoch in list_epochs(ref):
        if epoch <= saved[-1]:
            continue  # written before the kill
        a, b = load_checkpoint(ref / f"net_{epoch}.pt"), load_checkpoint(run / f"net_{epoch}.pt")
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (epoch, key)
        for name in (f"labels_cache_{epoch}.npz", f"net_{epoch}.pt", f"attribution_{epoch}.npz"):
            assert (ref / name).read_bytes() == (run / name).read_bytes(), name  # byte-identical files
    final = load_label_cache(ref / f"labels_cache_{N_EPOCHS}.npz")
    first = load_label_cache(ref / "labels_cache_0.npz")
    assert (final["train"]["instances"] != first["train"]["instances"]).sum() > 500  # the labels really moved
    import pandas as pd

    assert pd.read_csv(run / "train_log.csv")["epoch"].tolist() == list(range(N_EPOCHS + 1))
    for name in ("instance_mask.tif", "celltype_mask.tif", "spots_assigned.csv", "cells.csv", "gene_ranking.csv"):
        assert (ref / "results" / name).read_bytes() == (run / "results" / name).read_bytes(), name
    assert not any(".tmp-" in name for name in _visible(run))
    del temp  # the trainer does not clean its run folder (see the report); the hidden file stays harmless


def test_sigterm_stops_training_cleanly(section):
    """A scheduler's SIGTERM: exit status 143, one line saying how to resume, no temporary file left at all."""
    from segjointgene.methods.segjointgene.checkpoint import list_epochs, load_checkpoint

    work = section.work_dir
    run = work / "checkpoints" / NAME / "term"
    proc = _popen(*_train_args(work, "term", "--save_interval=1"))
    _wait_for(lambda: list(run.glob("net_*.pt")), proc, "the first checkpoint")
    time.sleep(float(np.random.default_rng(99).uniform(0.05, 0.5)))
    proc.send_signal(signal.SIGTERM)
    status, _, err = _finish(proc)
    assert status == 143, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM)") and "--if_load_ckpt=True" in last and "Traceback" not in err
    assert not [p.name for p in run.rglob(".tmp-*")]  # the file being written was discarded, not left behind
    saved = list_epochs(run)
    assert saved and load_checkpoint(run / f"net_{saved[-1]}.pt")["epoch"] == saved[-1]


@pytest.mark.parametrize("delay_s", [0.05, 0.4])
def test_sigterm_to_the_process_group_with_loader_workers(section, delay_s):
    """What SLURM and most schedulers do: SIGTERM to the whole process group while DataLoader workers run. Every
    time: exit 143 with the one-line message, no traceback, nothing half-written; the run then resumes."""
    from segjointgene.methods.segjointgene.checkpoint import list_epochs

    work = section.work_dir
    suffix = f"pgterm{int(delay_s * 100)}"
    run = work / "checkpoints" / NAME / suffix
    args = _train_args(work, suffix, "--save_interval=1")
    proc = _popen(*args, "--num_workers=2")  # its own session: the process group of the run and its workers
    _wait_for(lambda: list(run.glob("net_*.pt")), proc, "the first checkpoint")
    time.sleep(delay_s)
    assert proc.poll() is None, "the run ended before the signal; make it longer"
    os.killpg(proc.pid, signal.SIGTERM)
    status, _, err = _finish(proc)
    assert status == 143, err[-3000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("terminated (SIGTERM)") and "--if_load_ckpt=True" in lines[-1], err[-3000:]
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    assert not [p.name for p in run.rglob(".tmp-*")]
    assert list_epochs(run)
    resumed = _popen(*args, "--num_workers=2", "--if_load_ckpt=True")
    status, _, err = _finish(resumed)
    assert status == 0, err[-3000:]
    assert list_epochs(run)[-1] == N_EPOCHS


def test_resume_removes_the_killed_runs_temporary_files(section):
    import torch

    work = section.work_dir
    run = work / "checkpoints" / NAME / "temps"
    no_cid = [a for a in TRAIN if not a.startswith(("--attr_", "--CID_"))]  # CID's flags need CID (segjointgene.methods.choice)
    args = [*no_cid, f"--work_dir={work}", "--net_sub_suffix=temps", "--net_epoch=1", "--save_interval=1",
            "--warmup_epochs=1"]
    threads = torch.get_num_threads()
    try:
        assert main(args) == 0
        temp = _leave_temp(run / "net_2.pt")
        assert main([*args, "--if_load_ckpt=True"]) == 0  # nothing left to train: exports again
    finally:
        torch.set_num_threads(threads)
    assert not temp.exists()


# ============================================================================================ preprocessing
@pytest.fixture(scope="module")
def big_raw(tmp_path_factory) -> Path:
    """A 512 x 512 raw section: 1024 patches of 16 px, a few seconds to preprocess."""
    return make_sim(tmp_path_factory.mktemp("bigraw"), name="big", size=512, n_genes=8, preprocess=False).raw_dir


def _preprocess_args(work: Path, raw: Path, *extra: str) -> list[str]:
    return ["--step_name=preprocess", f"--datasets_name={NAME}", f"--raw_dir={raw}", f"--work_dir={work}", "--quiet",
            "--patch_size=16", *extra]


def test_kill_preprocessing_and_rerun_gives_identical_files(big_raw, tmp_path):
    import psutil

    from segjointgene.io.metadata import load_metadata

    reference = tmp_path / "reference"
    assert main(_preprocess_args(reference, big_raw, "--num_workers=0")) == 0
    ref = reference / "data" / NAME
    n_total = load_metadata(ref).n_patches

    work = tmp_path / "killed"
    data = work / "data" / NAME
    victim = _popen(*_preprocess_args(work, big_raw, "--num_workers=1"))
    threshold = int(np.random.default_rng(7).integers(50, n_total // 2))
    _wait_for(lambda: len(list(data.glob("*/p_*.npz"))) >= threshold, victim, f"{threshold} patch files")
    workers = psutil.Process(victim.pid).children(recursive=True)
    os.kill(victim.pid, signal.SIGKILL)  # the main process only, as `kill -9 <pid>` does
    status, _, _ = _finish(victim)
    assert status == -signal.SIGKILL
    n_at_death = len(list(data.glob("*/p_*.npz")))
    _, alive = psutil.wait_procs(workers, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, "pool workers outlived the killed main process"
    # an orphaned worker finishes the patch in hand and stops (instead of writing the rest of its chunk)
    assert len(list(data.glob("*/p_*.npz"))) - n_at_death <= 2

    meta = (data / "metadata.json").read_text()
    assert '"complete": false' in meta
    kept = {p: p.stat().st_mtime_ns for p in data.glob("*/p_*.npz")}
    assert threshold <= len(kept) < n_total
    stale = _leave_temp(data / "train" / "p_0_0.npz")  # as a worker killed mid-write would leave it
    assert stale.is_file() and stale not in set(data.glob("*/p_*.npz"))
    assert stale.relative_to(data).as_posix() not in _visible(data)

    assert main(_preprocess_args(work, big_raw, "--num_workers=1")) == 0  # the re-run resumes
    assert load_metadata(data).complete is True
    assert not stale.exists()  # the killed run's temporary files are removed
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file()) == files  # no stray file, hidden or not
    for rel in files:  # patches, tables and metadata.json are byte-identical to an uninterrupted run
        assert (data / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # finished patches were verified and kept


def test_sigterm_to_the_process_group_while_preprocessing(big_raw, tmp_path):
    """A scheduler's SIGTERM to the process group of a preprocessing run with pool workers: exit 143 with the
    one-line message, no traceback, and the re-run finishes the dataset."""
    from segjointgene.io.metadata import load_metadata

    work = tmp_path / "term"
    data = work / "data" / NAME
    proc = _popen(*_preprocess_args(work, big_raw, "--num_workers=2"))
    _wait_for(lambda: len(list(data.glob("*/p_*.npz"))) >= 40, proc, "40 patch files")
    os.killpg(proc.pid, signal.SIGTERM)
    status, _, err = _finish(proc)
    assert status == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM)") and "Traceback" not in err, err[-3000:]
    assert main(_preprocess_args(work, big_raw, "--num_workers=2")) == 0
    assert load_metadata(data).complete is True
