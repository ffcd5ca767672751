"""Self-training end to end on a small simulated section: growth, invariants, logs, checkpoints, exact resume."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from segjointgene.methods.segjointgene.checkpoint import list_epochs, load_checkpoint
from segjointgene.cli import main
from segjointgene.config import AttributionConfig, LabelUpdateConfig, RuntimeConfig, TrainConfig
from segjointgene.preprocess.dataset import ImagePatchDataset, load_label_cache
from segjointgene.methods.segjointgene.trainer import self_train

FAST = TrainConfig(net_epoch=4, net_batch_size=4, net_lr=1e-2, net_width=8, passes_per_epoch=6, warmup_epochs=1,
                   save_interval=2, cache_patches="yes")
CID = AttributionConfig(method="CID", start_epoch=1, n_gene=4, n_celltype=3, cid_n_steps=3)
RUNTIME = RuntimeConfig(device="cpu", num_workers=0, random_seed=7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(sim, run_dir, *, train=FAST, attr=CID, labels=LabelUpdateConfig(rule="v1"), resume=None):
    run_dir.mkdir(parents=True, exist_ok=True)
    return self_train(sim.data_dir, run_dir, train_cfg=train, label_cfg=labels, attr_cfg=attr, runtime=RUNTIME,
                      resume_epoch=resume, progress=False)


@pytest.fixture(scope="module")
def trained(sim128, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    return _train(sim128, run), run


def test_labels_grow_beyond_the_nuclei_and_cores_stay(sim128, trained):
    result, run = trained
    cache = load_label_cache(run / "labels_cache_4.npz")
    grown = 0
    for split in ("train", "test"):
        ds = ImagePatchDataset(sim128.data_dir, split)
        inst = torch.from_numpy(cache[split]["instances"]).long()
        core = ds.core.long()
        assert torch.equal(inst[core > 0], core[core > 0])  # core pixels never change
        grown += int(((inst > 0) & (core == 0)).sum())
        # class map = class of the instance map
        np.testing.assert_array_equal(cache[split]["classes"], ds.labels.class_lut.numpy()[cache[split]["instances"]])
    assert grown > 100


def test_log_checkpoints_and_attribution_outputs(trained):
    result, run = trained
    log = pd.read_csv(run / "train_log.csv")
    assert list(log["epoch"]) == [0, 1, 2, 3, 4]
    assert {"loss", "pixel_acc", "n_relabelled", "cell_calling", "attr_seconds", "epoch_seconds"} <= set(log.columns)
    assert log.loc[0, "n_relabelled"] == 0 and log["n_relabelled"].iloc[1:].sum() > 0  # epoch 0 is forward-only
    assert (log["attr_seconds"].iloc[1:] > 0).all() and log.loc[0, "attr_seconds"] == 0
    assert list_epochs(run) == [0, 2, 4]
    state = load_checkpoint(run / "net_4.pt")
    assert state["epoch"] == 4 and isinstance(state["config"]["train"], dict)
    assert {"sampler", "attribution", "labels", "torch"} <= set(state["rng"])
    assert (run / "attribution_4.npz").is_file() and (run / "results" / "gene_ranking_attribution.csv").is_file()


def test_resume_gives_the_same_weights_and_labels(sim128, trained, tmp_path):
    _, straight = trained
    half = tmp_path / "half"
    _train(sim128, half, train=TrainConfig(**{**FAST.__dict__, "net_epoch": 2}))
    _train(sim128, half, resume=2)
    a, b = load_checkpoint(straight / "net_4.pt"), load_checkpoint(half / "net_4.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ca, cb = load_label_cache(straight / "labels_cache_4.npz"), load_label_cache(half / "labels_cache_4.npz")
    for split in ca:
        np.testing.assert_array_equal(ca[split]["instances"], cb[split]["instances"])
    assert pd.read_csv(half / "train_log.csv")["epoch"].tolist() == [0, 1, 2, 3, 4]


def test_same_seed_same_run(sim128, trained, tmp_path):
    _, first = trained
    _train(sim128, tmp_path / "again")
    assert (tmp_path / "again" / "labels_cache_4.npz").read_bytes() == (first / "labels_cache_4.npz").read_bytes()
    a, b = load_checkpoint(first / "net_4.pt"), load_checkpoint(tmp_path / "again" / "net_4.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("method", ["none", "IG"])
def test_other_attribution_methods_run(sim128, tmp_path, method):
    attr = AttributionConfig(method=method, start_epoch=1, n_gene=4, n_celltype=3, ig_n_steps=4)
    result = _train(sim128, tmp_path / method, attr=attr)
    assert result.log["n_relabelled"].sum() > 0
    assert (tmp_path / method / "attribution_4.npz").is_file() == (method == "IG")


def test_cli_run_folder_protection_and_resume(sim128_copy, capsys):
    common = [f"--work_dir={sim128_copy.work_dir}", f"--datasets_name={sim128_copy.name}", "--net_width=4", "--num_threads=1",
              "--net_epoch=1", "--save_interval=1", "--attr_method=none", "--num_workers=0", "--quiet",
              "--device=cpu", "--net_sub_suffix=run"]
    assert main(["--step_name=SegJointGene", *common]) == 0
    run = sim128_copy.work_dir / "checkpoints" / sim128_copy.name / "run"
    assert (run / "results" / "instance_mask.tif").is_file()
    assert main(["--step_name=SegJointGene", *common]) == 2  # a run is there: no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--step_name=SegJointGene", *common, "--if_load_ckpt=True", "--ckpt_load_epoch=7"]) == 2
    assert "saved epochs: 0, 1" in capsys.readouterr().err
    assert main(["--step_name=SegJointGene", *[a for a in common if not a.startswith("--net_epoch")], "--net_epoch=2",
                 "--if_load_ckpt"]) == 0
    assert list_epochs(run) == [0, 1, 2]


def test_local_cid_types_compute_fewer_rows_and_rank_the_same_pixels(tmp_path):
    """--CID_types=local: the trainer passes the label window, so CID optimises only the types present near each
    patch (fewer steps per sample on average); the default optimises every type everywhere."""
    from tests.conftest import make_sim

    sim = make_sim(tmp_path, n_celltypes=8, n_genes=16, patch_size=32)
    train = TrainConfig(**{**FAST.__dict__, "net_epoch": 1, "passes_per_epoch": 1})
    means = {}
    for types in ("all", "local"):
        attr = AttributionConfig(**{**CID.__dict__, "n_celltype": 8, "cid_types": types})
        _train(sim, tmp_path / types, train=train, attr=attr)
        means[types] = pd.read_csv(tmp_path / types / "train_log.csv").loc[1, "attr_steps_mean"]
        assert (tmp_path / types / "results" / "gene_ranking_attribution.csv").is_file()
    assert means["all"] == pytest.approx(CID.cid_n_steps)
    assert 0 < means["local"] < 0.75 * CID.cid_n_steps


def test_density_on_device_trains_like_the_stored_images(sim128, tmp_path):
    """--density_on_device builds the images from the spot lists (equal within float32 rounding): the same run."""
    train = TrainConfig(**{**FAST.__dict__, "net_epoch": 2})
    logs = {}
    for on_device in (False, True):
        run = tmp_path / str(on_device)
        _train(sim128, run, train=TrainConfig(**{**train.__dict__, "density_on_device": on_device}))
        logs[on_device] = pd.read_csv(run / "train_log.csv")
    # float32 rounding differences grow slowly through training: epoch 0 equal to 1e-5, epoch 2 to 1 %
    np.testing.assert_allclose(logs[True]["loss"][:1], logs[False]["loss"][:1], rtol=1e-5)
    np.testing.assert_allclose(logs[True]["loss"], logs[False]["loss"], rtol=1e-2)
    a, b = (load_label_cache(tmp_path / str(k) / "labels_cache_2.npz") for k in (False, True))
    same = np.mean([(a[s]["instances"] == b[s]["instances"]).mean() for s in ("train", "test")])
    assert same > 0.95  # 97.9 % of the label pixels agree after 2 epochs (measured)
