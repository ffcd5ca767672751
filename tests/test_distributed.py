"""Data-parallel training: the collectives of ``segjointgene.methods.segjointgene.distributed`` (2 Gloo processes), and end-to-end
``torchrun --nproc_per_node=2 main.py --step_name=SegJointGene`` runs on a small simulated section (CPU, Gloo):
one set of outputs, labels gathered from both ranks, attribution sums reduced, rank-0 errors stopping every rank, and
resume from a DDP run in one process and from a one-process run under torchrun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from segjointgene.methods.segjointgene import distributed
from segjointgene.methods.segjointgene.checkpoint import list_epochs, load_checkpoint
from segjointgene.cli import main
from segjointgene.preprocess.dataset import ImagePatchDataset, load_label_cache
from segjointgene.methods.segjointgene.distributed import DistContext, ShardCursor
from segjointgene.errors import ConfigError
from segjointgene.methods.segjointgene.unet import UNet

from tests.conftest import make_sim

ROOT = Path(__file__).resolve().parents[1]
#: Small but growing: width 8, three optimizer passes of 2-patch batches per epoch.
COMMON = ["--net_width=8", "--num_threads=1", "--num_workers=0", "--quiet", "--device=cpu", "--net_batch_size=2",
          "--net_lr=1e-2", "--passes_per_epoch=3", "--warmup_epochs=1", "--random_seed=3", "--label_update=v1"]
NO_ATTR = ["--attr_method=none"]
CID = ["--attr_method=CID", "--attr_epoch=1", "--attr_n_gene=4", "--attr_n_celltype=3", "--CID_n_steps=2"]


# ------------------------------------------------------------------------------------------------ helpers (no group)
def test_from_env_reads_torchrun_variables_and_refuses_incomplete_ones():
    assert distributed.from_env({}) == distributed.SINGLE
    assert distributed.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == distributed.SINGLE
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
           "MASTER_PORT": "29500"}
    ctx = distributed.from_env(env)
    assert ctx == DistContext(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert ctx.enabled and not ctx.is_main
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.from_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ConfigError, match="inconsistent"):
        distributed.from_env({**env, "RANK": "4"})


def test_rank_seeds_keep_rank_0_and_differ_between_ranks():
    assert distributed.rank_seed(1234, 0) == 1234
    seeds = [distributed.rank_seed(1234, r) for r in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.rank_seed(1234, 3) == distributed.rank_seed(1234, 3) != distributed.rank_seed(1235, 3)


@pytest.mark.parametrize("n_items, world, batch", [(7, 2, 2), (9, 2, 4), (5, 4, 1), (3, 4, 2), (8, 4, 3)])
def test_shard_cursor_marks_exactly_the_sampler_padding(n_items, world, batch):
    """Over the ranks, the samples the cursors call 'own' are every item exactly once (padding is left out)."""
    owned = []
    for rank in range(world):
        sampler = DistributedSampler(range(n_items), num_replicas=world, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(2)
        order = list(sampler)
        cursor = ShardCursor(n_items, DistContext(rank=rank, world_size=world))
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            owned += chunk[:cursor.own(len(chunk))]
    assert sorted(owned) == list(range(n_items))


def test_single_process_helpers_are_identities():
    ctx = distributed.SINGLE
    assert distributed.run_on_main(lambda: 41 + 1, ctx) == 42
    assert distributed.reduce_metrics({"a": 1.0}, ctx) == {"a": 1.0}
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum_(t, ctx) is t and t.tolist() == [0.0, 1.0, 2.0]
    idx, lab = distributed.all_gather_label_updates(torch.tensor([2]), torch.ones(1, 4, 4, dtype=torch.int64), ctx,
                                                    capacity=2)
    assert idx.tolist() == [2] and lab.dtype == torch.int32 and lab.shape == (1, 4, 4)
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(net, torch.device("cpu"), ctx) is net and distributed.unwrap(net) is net
    assert distributed.strip_module_prefix({"module.w": 1}) == {"w": 1}
    assert distributed.strip_module_prefix({"w": 1, "module.v": 2}) == {"w": 1, "module.v": 2}


# ------------------------------------------------------------------------------------------------ collectives (2 procs)
_WORKER = """
import json, sys
import torch
from segjointgene.methods.segjointgene import distributed
from segjointgene.errors import DataError

torch.set_num_threads(1)
with distributed.process_group(distributed.from_env(), torch.device("cpu")) as ctx:
    out = {"rank": ctx.rank, "world": ctx.world_size}
    # uneven label updates: rank 0 sends two patches, rank 1 none
    new = torch.full((2 - 2 * ctx.rank, 3, 3), 10 + ctx.rank, dtype=torch.int32)
    idx, lab = distributed.all_gather_label_updates(torch.tensor([5, 1][: len(new)]), new, ctx, capacity=2)
    out["gathered"] = [idx.tolist(), lab[:, 0, 0].tolist()]
    out["metrics"] = distributed.reduce_metrics({"n": 1.0 + ctx.rank, "attr_seconds": 2.0 * ctx.rank}, ctx,
                                                max_keys={"attr_seconds"})
    out["sum"] = distributed.all_reduce_sum_(torch.tensor([1.0, float(ctx.rank)], dtype=torch.float64), ctx).tolist()
    out["main"] = distributed.run_on_main(lambda: f"from rank {ctx.rank}", ctx)
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(ctx.rank))
    distributed.broadcast_buffers(bn, ctx)
    out["buffer"] = bn.running_mean.tolist()

    def fail():
        raise DataError("disk says no")

    try:
        distributed.run_on_main(fail, ctx)
    except DataError as err:
        out["error"] = str(err)
    distributed.barrier(ctx)
with open(f"{sys.argv[1]}/rank{out['rank']}.json", "w") as fh:
    json.dump(out, fh)
"""


def test_collectives_with_two_gloo_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["rank"] == rank and out["world"] == 2
        assert out["gathered"] == [[5, 1], [10, 10]]  # rank 0's two updates, on both ranks
        assert out["metrics"] == {"n": 3.0, "attr_seconds": 2.0}  # sums, and the maximum of wall-clock keys
        assert out["sum"] == [2.0, 1.0]
        assert out["main"] == "from rank 0"
        assert out["buffer"] == [0.0, 0.0]  # rank 0's BatchNorm statistics
        assert out["error"] == "disk says no"  # rank 0's error raised on every rank, same class and message


# ------------------------------------------------------------------------------------------------ torchrun end to end
def _torchrun(work: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
           "--step_name=SegJointGene", f"--work_dir={work}", "--datasets_name=sim", *COMMON, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _check_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _cache_checks(data_dir: Path, cache_path: Path) -> int:
    """Every patch of both splits is in the cache, core pixels unchanged; returns the number of grown pixels and
    checks that every patch with a nucleus grew (its labels came back from whichever rank propagated it)."""
    cache = load_label_cache(cache_path)
    grown_total = 0
    for split in ("train", "test"):
        ds = ImagePatchDataset(data_dir, split)
        assert [str(n) for n in cache[split]["names"]] == ds.names
        inst, core = torch.from_numpy(cache[split]["instances"]).long(), ds.core.long()
        assert torch.equal(inst[core > 0], core[core > 0])
        grown = ((inst > 0) & (core == 0)).flatten(1).sum(1)
        has_nucleus = (core > 0).flatten(1).any(1)
        assert bool((grown[has_nucleus] > 0).all()), (split, grown.tolist())
        grown_total += int(grown.sum())
    return grown_total


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A 128 x 128 section in 32-px patches (13 train, 3 test): cells span several patches."""
    return make_sim(tmp_path_factory.mktemp("ddp"), size=128, patch_size=32)


@pytest.fixture(scope="module")
def ddp_run(section):
    res = _torchrun(section.work_dir, *NO_ATTR, "--net_epoch=3", "--save_interval=2", "--net_sub_suffix=ddp")
    return res, section.work_dir / "checkpoints" / "sim" / "ddp"


def test_torchrun_run_writes_one_set_of_outputs(section, ddp_run):
    res, run = ddp_run
    _check_ok(res)
    assert res.stdout.count("trained sim to epoch 3") == 1  # only rank 0 reports (and writes)
    names = {p.name for p in run.iterdir()}
    assert names == {"net_0.pt", "net_2.pt", "net_3.pt", "labels_cache_0.npz", "labels_cache_2.npz",
                     "labels_cache_3.npz", "train_log.csv", "run.json", "results"}
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]  # no partial files
    assert (run / "results" / "instance_mask.tif").is_file()
    log = pd.read_csv(run / "train_log.csv")
    assert log["epoch"].tolist() == [0, 1, 2, 3]
    assert log["n_relabelled"].iloc[1:].sum() > 0
    state = load_checkpoint(run / "net_3.pt")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not any(k.startswith("module.") for k in state["model"])
    UNet(12, 4, base_channels=8).load_state_dict(state["model"])  # strict: the unwrapped network
    # rank 1's generators are its own, rank 0's are the single-process ones
    assert not torch.equal(state["rng_ranks"][0]["augment"], state["rng_ranks"][1]["augment"])
    assert _cache_checks(section.data_dir, run / "labels_cache_3.npz") > 500
    # every pixel-count of the log is a section total: the last relabelling is in the cache
    before, after = load_label_cache(run / "labels_cache_2.npz"), load_label_cache(run / "labels_cache_3.npz")
    changed = sum(int((before[s]["instances"] != after[s]["instances"]).sum()) for s in ("train", "test"))
    assert log.loc[3, "n_relabelled"] == changed


def test_ddp_run_resumes_in_one_process_and_back_under_torchrun(section, ddp_run, tmp_path, capsys):
    _, run = ddp_run
    work = tmp_path / "w"
    shutil.copytree(section.work_dir / "data", work / "data")
    shutil.copytree(run, work / "checkpoints" / "sim" / "ddp")
    run = work / "checkpoints" / "sim" / "ddp"
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "data_dir": str((work / "data" / "sim").resolve())}))
    # DDP checkpoint (epoch 3) -> one process, epoch 4
    args = ["--step_name=SegJointGene", f"--work_dir={work}", "--datasets_name=sim", *COMMON, *NO_ATTR,
            "--net_sub_suffix=ddp", "--save_interval=2", "--net_epoch=4", "--if_load_ckpt=True", "--ckpt_load_epoch=3"]
    assert main(args) == 0
    capsys.readouterr()
    assert list_epochs(run) == [0, 2, 3, 4]
    state = load_checkpoint(run / "net_4.pt")
    assert state["world_size"] == 1 and "rng_ranks" not in state
    log = pd.read_csv(run / "train_log.csv")
    assert log["epoch"].tolist() == [0, 1, 2, 3, 4]
    # one-process checkpoint (epoch 4) -> torchrun with 2 processes, epoch 5
    res = _torchrun(work, *NO_ATTR, "--net_sub_suffix=ddp", "--save_interval=2", "--net_epoch=5", "--if_load_ckpt=True")
    _check_ok(res)
    assert "resumed from net_4.pt" in res.stderr
    assert list_epochs(run) == [0, 2, 3, 4, 5]
    assert load_checkpoint(run / "net_5.pt")["world_size"] == 2
    assert pd.read_csv(run / "train_log.csv")["epoch"].tolist() == [0, 1, 2, 3, 4, 5]
    _cache_checks(section.data_dir, run / "labels_cache_5.npz")
    epoch4 = load_label_cache(run / "labels_cache_4.npz")
    epoch5 = load_label_cache(run / "labels_cache_5.npz")
    # labels continue from the restored ones: grown pixels are kept or moved, the total does not collapse
    assert sum(int((epoch5[s]["instances"] > 0).sum()) for s in epoch5) >= 0.9 * sum(
        int((epoch4[s]["instances"] > 0).sum()) for s in epoch4)


def test_rank_0_error_stops_every_rank(ddp_run, section):
    res = _torchrun(section.work_dir, *NO_ATTR, "--net_epoch=1", "--net_sub_suffix=ddp", timeout=90)
    assert res.returncode != 0
    # every rank stops with the usage-error code, none waits for the other; only rank 0 prints the message. The rank
    # that exits second may instead be stopped by torchrun, which terminates the survivors as soon as one rank has
    # exited (a race of a few ms, measured ~1 in 3 runs before and after issue 12): exit 2 or torchrun's SIGTERM.
    assert res.stderr.count("already holds a run") == 1, res.stderr[-3000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", res.stderr)
    by_pid = {pid: int(code) for code, pid in codes}
    assert len(by_pid) == 2 and 2 in by_pid.values(), res.stderr[-3000:]
    assert set(by_pid.values()) <= {2, -15}, res.stderr[-3000:]


def test_torchrun_with_cid_reduces_the_attribution_sums(section):
    res = _torchrun(section.work_dir, *CID, "--net_epoch=1", "--save_interval=1", "--passes_per_epoch=1",
                    "--net_sub_suffix=cid")
    _check_ok(res)
    run = section.work_dir / "checkpoints" / "sim" / "cid"
    assert (run / "attribution_1.npz").is_file() and (run / "results" / "gene_ranking_attribution.csv").is_file()
    attribution = np.load(run / "attribution_1.npz")
    # each patch is attributed once per epoch, with the labels it had at the end of the previous epoch: the summed
    # pixel counts of both ranks equal the section's counts in the epoch-0 cache
    before = load_label_cache(run / "labels_cache_0.npz")
    counts = sum(np.bincount(before[s]["classes"].ravel(), minlength=8) for s in ("train", "test"))
    np.testing.assert_array_equal(attribution["type_pixels"], counts[attribution["targets"]])
    assert np.isfinite(attribution["type_gene_sum"]).all() and attribution["type_gene_sum"].any()
    log = pd.read_csv(run / "train_log.csv")
    assert (log["attr_seconds"].iloc[1:] > 0).all() and (log["attr_steps_mean"].iloc[1:] > 0).all()


@pytest.mark.slow
def test_torchrun_resume_with_the_same_world_size_is_exact(section, ddp_run, tmp_path):
    """Resuming a 2-process run under 2 processes continues every rank's streams: the same weights and labels."""
    _, straight = ddp_run
    work = tmp_path / "w"
    shutil.copytree(section.work_dir / "data", work / "data")
    run = work / "checkpoints" / "sim" / "ddp"
    run.mkdir(parents=True)
    for name in ("net_2.pt", "labels_cache_2.npz", "train_log.csv"):
        shutil.copy(straight / name, run / name)
    _check_ok(_torchrun(work, *NO_ATTR, "--net_epoch=3", "--save_interval=2", "--net_sub_suffix=ddp",
                        "--if_load_ckpt=True"))
    a, b = load_checkpoint(straight / "net_3.pt"), load_checkpoint(run / "net_3.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert (straight / "labels_cache_3.npz").read_bytes() == (run / "labels_cache_3.npz").read_bytes()


def test_torchrun_model_rule_refits_once_with_every_ranks_evidence(section, tmp_path):
    """--label_update model under torchrun: the ranks' network evidence is summed and every rank refits alike; one
    spot assignment per saved epoch, written by rank 0."""
    work = tmp_path / "w"
    shutil.copytree(section.work_dir / "data", work / "data")
    common = [a for a in COMMON if a not in ("--label_update=v1", "--warmup_epochs=1")]  # flags of the published method
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
           "--step_name=SegJointGene", f"--work_dir={work}", "--datasets_name=sim", *common, *NO_ATTR,
           "--label_update=model", "--net_epoch=2", "--save_interval=2", "--net_sub_suffix=model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    _check_ok(res)
    run = work / "checkpoints" / "sim" / "model"
    assert {p.name for p in run.glob("spot_assignment_*.npz")} == {"spot_assignment_0.npz", "spot_assignment_2.npz"}
    final = np.load(run / "spot_assignment_2.npz")
    assert final["cell"].size == np.load(section.data_dir / "spots.npz")["x"].size
    assert ((final["prob"] > 0) & (final["prob"] <= 1)).all()
    log = pd.read_csv(run / "train_log.csv")
    assert log["n_relabelled"].iloc[-1] > 0  # the refit with the network changed the labels
