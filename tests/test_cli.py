"""CLI contract: fast --help, real types, documented flags, usage errors naming the choices, step smoke tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from segjointgene.cli import build_parser, configs, main
from segjointgene.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_fast_and_lists_the_steps(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for step in ("preprocess_CA1", "SegJointGene", "simulate", "evaluate", "export", "demo"):
        assert step in out
    code = ("import sys; from segjointgene.cli import main; main(['--help']); "
            "print('HEAVY', sorted(m for m in ('torch', 'pandas', 'matplotlib', 'scipy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "HEAVY []" in res.stdout


def test_bad_step_is_a_usage_error_naming_the_choices(capsys):
    assert main(["--step_name=train_everything"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "preprocess_CA1" in err and "SegJointGene" in err


def test_bad_choice_value_names_the_choices(capsys):
    assert main(["--attr_method=SHAP"]) == 2
    assert "CID" in capsys.readouterr().err


def test_documented_flags_parse_with_real_types():
    args = build_parser().parse_args(["--datasets_name=CA1", "--step_name=SegJointGene", "--attr_method=CID",
                                      "--net_sub_suffix=SegJointGene_CID", "--CID_beta=1.5", "--expand_k=4",
                                      "--prediction_threshold=0.7", "--patch_size=256", "--if_load_ckpt=True",
                                      "--ckpt_load_epoch=30", "--CID_chunk_size=4"])
    cfg = configs(args)
    assert cfg.attribution.cid_beta == 1.5 and isinstance(cfg.attribution.cid_beta, float)
    assert cfg.attribution.cid_chunk_size == 4
    assert cfg.labels.expand_k == 4 and cfg.labels.prediction_threshold == 0.7
    assert cfg.preprocess.patch_size == 256
    assert cfg.step.if_load_ckpt is True and cfg.step.ckpt_load_epoch == 30
    assert args.if_load_ckpt is True and args.ckpt_load_epoch == 30


@pytest.mark.parametrize("argv, expect", [
    (["--if_load_ckpt=True"], True), (["--if_load_ckpt=False"], False), (["--if_load_ckpt"], True), ([], False),
    (["--if_load_ckpt", "no"], False), (["--if_load_ckpt=1"], True),
])
def test_boolean_flags_accept_bare_and_explicit_values(argv, expect):
    assert build_parser().parse_args(["--step_name=SegJointGene", *argv]).if_load_ckpt is expect


def test_bad_boolean_value_is_a_usage_error(capsys):
    assert main(["--if_load_ckpt=maybe"]) == 2
    assert "invalid boolean value" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--step_name=preprocess", "--datasets_name=../elsewhere"], "--datasets_name"),
    (["--step_name=preprocess", "--net_sub_suffix=/abs/path"], "--net_sub_suffix"),
    (["--step_name=preprocess", "--patch_size=100"], "--patch_size"),
    (["--step_name=preprocess", "--device=tpu"], "--device"),
    (["--step_name=preprocess", "--CID_beta=0.9"], "--CID_beta"),
])
def test_invalid_values_are_one_line_errors(tmp_path, capsys, argv, needle):
    assert main([*argv, f"--work_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1


def test_config_defaults_come_from_the_dataclasses():
    args = build_parser().parse_args(["--step_name=SegJointGene"])
    assert configs(args) == Settings()


def test_simulate_and_preprocess_steps(tmp_path, capsys):
    common = ["--datasets_name=tiny", f"--work_dir={tmp_path}", "--quiet"]
    assert main(["--step_name=simulate", "--sim_size=96", "--sim_genes=9", "--sim_celltypes=3", *common]) == 0
    raw = tmp_path / "data" / "tiny_raw" / "3_1_left"
    assert (raw.parent / "3_1_left_truth" / "instance_mask.tif").is_file()
    assert main(["--step_name=simulate", *common]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--step_name=preprocess", "--patch_size=32", *common]) == 0
    assert (tmp_path / "data" / "tiny" / "metadata.json").is_file()
    assert main(["--step_name=preprocess_CA1", "--patch_size=32", *common]) == 0  # same settings: resumes, no error
    assert main(["--step_name=preprocess", "--patch_size=64", *common]) == 2  # other settings need --overwrite


def test_missing_raw_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["--step_name=preprocess", f"--work_dir={tmp_path}", "--datasets_name=nothing"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--raw_dir" in err


def test_demo_runs_end_to_end_and_refuses_to_overwrite(tmp_path, capsys):
    """The README's first command, at a reduced size: simulate -> preprocess -> SegJointGene (the default spot
    model pipeline) -> export -> evaluate; flags given explicitly override the demo's settings."""
    args = ["--step_name=demo", f"--work_dir={tmp_path}", "--sim_size=128", "--net_width=8", "--net_epoch=3",
            "--save_interval=3", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "--sim_size=128" in out and "--sim_preset=hard" in out and "demo finished" in out
    runs = list((tmp_path / "checkpoints" / "demo").iterdir())
    assert len(runs) == 1
    results = runs[0] / "results"
    evaluation = pd.read_csv(results / "evaluation.csv")
    assert {"ours", "nuclei"} <= set(evaluation["method"])
    ours = evaluation.set_index("method").loc["ours"]
    assert 0 < ours["gene_mIoU"] <= 1 and 0 < ours["spot_acc"] <= 1
    # the partition gives each spot its pixel's cell: the assignment is the mask's, so no separate ours_mask row
    assigned = pd.read_csv(results / "spots_assigned.csv")
    assert (assigned["cell"] == assigned["cell_mask"]).all() and assigned["prob"].between(0, 1).all()
    assert "ours_mask" not in set(evaluation["method"])
    assert (results / "gene_ranking.csv").is_file() and any(results.glob("*.tif"))
    assert (runs[0] / "spot_assignment_3.npz").is_file() and (results / "border_genes.csv").is_file()
    border = pd.read_csv(results / "border_genes.csv")  # the spots either side, with the network's IG beside
    assert {"score", "rank", "spots_a", "spots_b", "ig_score", "ig_rank"} <= set(border.columns)
    assert main(args) == 2  # a second run needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    # --model_ambient: the same masks, some spots on cell pixels sent to background, the rest keep the mask's cell
    ambient = ["--datasets_name=demo", f"--work_dir={tmp_path}", "--quiet", "--net_sub_suffix=ambient"]
    assert main(["--step_name=SegJointGene", "--model_ambient=true", "--net_width=8", "--net_epoch=3", *ambient]) == 0
    assert main(["--step_name=evaluate", *ambient]) == 0
    amb = pd.read_csv(tmp_path / "checkpoints" / "demo" / "ambient" / "results" / "spots_assigned.csv")
    moved = amb["cell"] != amb["cell_mask"]
    assert moved.any() and (amb.loc[moved, "cell"] == 0).all() and (amb.loc[moved, "cell_mask"] > 0).all()
    assert moved.mean() < 0.2


def test_no_argument_prints_the_usage_and_the_demo_command(capsys):
    assert main([]) == 2  # nothing is computed
    err = capsys.readouterr().err
    assert err.startswith("usage: main.py") and "python main.py --step_name=demo" in err
