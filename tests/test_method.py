"""--method: which engine runs, and no flag is silently ignored (segjointgene.methods.choice, cli.check_step_flags)."""

import dataclasses

import pytest

from segjointgene.cli import STEP_READS, build_parser, check_step_flags, configs, main
from segjointgene.config import Settings
from segjointgene.errors import ConfigError
from segjointgene.methods.choice import PUBLISHED_ONLY, SPOTMODEL_ONLY, default_run_name, resolve_method


def _resolve(*argv):
    parser = build_parser()
    args = parser.parse_args(["--step_name=SegJointGene", *argv])
    explicit = {parser._option_string_actions[a.split("=")[0]].dest for a in argv if a.startswith("--")}
    return resolve_method(configs(args), explicit)


def test_the_default_is_the_spot_model_engine():
    r = _resolve()
    assert r.name == "spotmodel" and r.settings.labels.rule == "model"
    assert default_run_name(r.name, r.settings.attribution.method) == "spotmodel"


def test_the_original_readme_line_runs_the_published_method_with_cid_inside_the_epochs():
    r = _resolve("--attr_method=CID", "--net_sub_suffix=SegJointGene_CID")
    assert r.name == "segjointgene" and r.settings.labels.rule == "v1"
    attr, train = r.settings.attribution, r.settings.train
    assert train.warmup_epochs <= attr.start_epoch <= train.net_epoch  # CID runs and constrains the growing labels
    assert "chosen by --attr_method" in r.describe()


@pytest.mark.parametrize("argv, message", [
    (["--attr_method=CID", "--attr_epoch=30"], "CID would never run"),
    (["--attr_method=CID", "--net_epoch=3"], "the labels would never grow"),
    (["--method=spotmodel", "--attr_method=CID"], "applies to --method segjointgene only"),
    (["--method=segjointgene", "--model_smoothness=1"], "applies to --method spotmodel only"),
    (["--model_smoothness=1", "--vote_min=2"], "belong to different methods"),
    (["--CID_lr=0.1"], "no effect with --attr_method=none"),
    (["--attr_method=IG", "--CID_lr=0.2"], "no effect with --attr_method=IG"),
    (["--attr_method=CID", "--IG_n_steps=4"], "no effect with --attr_method=CID"),
    (["--label_update=v2", "--vote_min=3"], "the other label rule"),
    (["--label_update=v1", "--attr_top_ratio=0.2"], "the other label rule"),
    (["--method=segjointgene", "--reference_csv=r.csv"], "applies to --method spotmodel only"),
])
def test_inapplicable_flags_and_steps_that_never_run_are_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        _resolve(*argv)


def test_cli_exits_2_with_one_line(capsys):
    assert main(["--step_name=SegJointGene", "--attr_method=CID", "--attr_epoch=30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --attr_epoch=30") and "\n" not in err


def test_attr_method_none_is_the_spot_model_engine_too():
    assert _resolve("--attr_method=none").name == "spotmodel"


def test_every_training_flag_belongs_to_a_method_or_to_both():
    """The tables of segjointgene.methods.choice name only real flags, and each flag of the label and attribution groups
    is read by exactly one method, or by both (the method itself, the shared label-update rule)."""
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert PUBLISHED_ONLY <= dests and SPOTMODEL_ONLY <= dests and not PUBLISHED_ONLY & SPOTMODEL_ONLY
    from segjointgene.config import AttributionConfig, LabelUpdateConfig

    for cls in (LabelUpdateConfig, AttributionConfig):
        for f in dataclasses.fields(cls):
            dest = (f.metadata.get("flag") or f"--{f.name}").lstrip("-")
            assert dest in PUBLISHED_ONLY | SPOTMODEL_ONLY | {"method", "label_update"}, dest


@pytest.mark.parametrize("step, flag", [("preprocess", "--net_epoch=3"), ("simulate", "--patch_size=32"),
                                        ("evaluate", "--model_smoothness=1"), ("export", "--expand_px=5"),
                                        ("SegJointGene", "--patch_size=32"), ("preprocess", "--if_load_ckpt")])
def test_a_flag_the_step_does_not_read_is_an_error(step, flag, capsys):
    assert main([f"--step_name={step}", flag]) == 2
    assert "has no effect on --step_name=" + step in capsys.readouterr().err


def test_every_config_group_is_read_by_some_step():
    read = set().union(*(groups for groups, _ in STEP_READS.values()))
    assert {name for name, _ in Settings.CONFIGS} - {"runtime"} <= read
    check_step_flags("demo", {"net_epoch", "sim_size", "patch_size", "expand_px"})  # the demo reads them all
