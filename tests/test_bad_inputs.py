"""Bad inputs through the real CLI: one-line error naming the file / argument and the fix, exit status 2,
no traceback (without --debug), and no partial output left behind.

Sections: the raw section (preprocessing), the patches at the start of training, the run folder on resume
(checkpoints, label caches, ``--ckpt_load_epoch``, another dataset), unwritable output folders, and export.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from segjointgene.cli import main
from tests.conftest import make_sim

NAME = "bad"


@pytest.fixture(scope="module")
def good_raw(tmp_path_factory) -> Path:
    """A valid small raw section (simulated, DAPI path)."""
    sim = make_sim(tmp_path_factory.mktemp("good"), size=64, patch_size=32, preprocess=False)
    return sim.raw_dir


@pytest.fixture()
def raw(good_raw, tmp_path) -> Path:
    """A private copy of the valid raw section to damage."""
    dst = tmp_path / "raw"
    shutil.copytree(good_raw, dst)
    return dst


def _file(raw: Path, pattern: str) -> Path:
    return next(raw.glob(pattern))


def _edit_csv(raw: Path, pattern: str, edit) -> Path:
    path = _file(raw, pattern)
    table = pd.read_csv(path)
    edit(table).to_csv(path, index=False)
    return path


def _run(tmp_path, raw, *extra):
    return main(["--step_name=preprocess", f"--datasets_name={NAME}", f"--raw_dir={raw}", f"--work_dir={tmp_path}",
                 "--quiet", "--patch_size=32", *extra])


def _damage_cases():
    """(id, damage(raw) -> None, expected text in the error)"""

    def drop(col, pattern):
        return lambda raw: _edit_csv(raw, pattern, lambda t: t.drop(columns=[col]))

    def set_value(pattern, col, value, row=0):
        def f(raw):
            def edit(t):
                t[col] = t[col].astype(object)
                t.loc[row, col] = value
                return t
            _edit_csv(raw, pattern, edit)
        return f

    def dup_cell(raw):
        _edit_csv(raw, "cells_*.csv", lambda t: pd.concat([t, t.iloc[:1]], ignore_index=True))

    def unknown_type(raw):
        _edit_csv(raw, "celltype_*.csv", lambda t: pd.concat(
            [t, pd.DataFrame({"cell": [99999], "original_celltype": ["X"]})], ignore_index=True))

    def untyped(raw):
        _edit_csv(raw, "celltype_*.csv", lambda t: t.iloc[1:])

    def empty_spots(raw):
        _edit_csv(raw, "spots*.csv", lambda t: t.iloc[:0])

    def dapi_3d(raw):
        path = _file(raw, "*.tif")
        img = tifffile.imread(path)
        tifffile.imwrite(path, np.stack([img, img, img]), photometric="minisblack")

    def small_label_image(raw):
        _file(raw, "*.tif").unlink()
        from segjointgene.io.files import write_raw_section  # a nucleus image far smaller than the section
        lab = np.zeros((16, 16), np.uint32)
        import scipy.sparse
        scipy.sparse.save_npz(raw / "label_image.coo.npz", scipy.sparse.coo_matrix(lab))
        del write_raw_section

    def two_spot_files(raw):
        shutil.copy(_file(raw, "spots*.csv"), raw / "spots_other.csv")

    def no_image(raw):
        _file(raw, "*.tif").unlink()

    def garbage_csv(raw):
        _file(raw, "cells_*.csv").write_bytes(b"\x00\xff\xfe garbage")

    return [
        ("missing cells file", lambda raw: _file(raw, "cells_*.csv").unlink(), "cells_*.csv"),
        ("missing spots file", lambda raw: _file(raw, "spots*.csv").unlink(), "spots*.csv"),
        ("missing celltype file", lambda raw: _file(raw, "celltype_*.csv").unlink(), "celltype_*.csv"),
        ("missing cellX column", drop("cellX", "cells_*.csv"), "cellX"),
        ("missing gene column", drop("gene", "spots*.csv"), "'gene'"),
        ("missing original_celltype column", drop("original_celltype", "celltype_*.csv"), "original_celltype"),
        ("non-numeric spot x", set_value("spots*.csv", "spotX", "twelve"), "spotX"),
        ("NaN cell y", set_value("cells_*.csv", "cellY", np.nan), "cellY"),
        ("non-integer cell id", set_value("cells_*.csv", "cell", 2.5), "positive integers"),
        ("duplicate cell ids", dup_cell, "duplicate cell id"),
        ("type for an unknown cell", unknown_type, "99999"),
        ("nucleus without a type", untyped, "have no type"),
        ("empty spot table", empty_spots, "no rows"),
        ("3-D DAPI image", dapi_3d, "2-D"),
        ("label image that does not contain the spots", small_label_image, "outside"),
        ("two spot files", two_spot_files, "several spots files"),
        ("no DAPI and no label image", no_image, "neither a DAPI"),
        ("unparseable cells file", garbage_csv, "cells_"),
    ]


@pytest.mark.parametrize("damage, needle", [c[1:] for c in _damage_cases()], ids=[c[0] for c in _damage_cases()])
def test_bad_raw_section(tmp_path, raw, capsys, damage, needle):
    damage(raw)
    assert _run(tmp_path, raw) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "data" / NAME).exists()  # nothing half-written


def test_missing_raw_folder(tmp_path, capsys):
    assert _run(tmp_path, tmp_path / "nowhere") == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "--raw_dir" in err


def test_spots_outside_the_image_are_dropped_and_counted(tmp_path, raw, capsys, caplog):
    _edit_csv(raw, "spots*.csv", lambda t: pd.concat([t, pd.DataFrame(
        {"gene": [t.gene.iloc[0]] * 3, "spotX": [-1.0, 500.0, 3.0], "spotY": [3.0, 3.0, -7.0]})], ignore_index=True))
    assert _run(tmp_path, raw) == 0
    assert "3 spots outside the image dropped" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--patch_size=100", "--patch_size=8"])
def test_patch_size_the_unet_cannot_take(tmp_path, raw, capsys, flag):
    assert _run(tmp_path, raw, flag) == 2
    assert "--patch_size" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--datasets_name=../escape", "--datasets_name=/abs", "--net_sub_suffix=../../x",
                                  "--CA1_sub_path=../../etc"])
def test_names_that_leave_the_project_folders(tmp_path, capsys, flag):
    assert main(["--step_name=preprocess", f"--work_dir={tmp_path}", flag]) == 2
    assert flag.split("=")[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unwritable_output_folder(tmp_path, raw, capsys):
    blocker = tmp_path / "work"
    blocker.write_text("a file where a folder is needed")
    assert main(["--step_name=preprocess", f"--datasets_name={NAME}", f"--raw_dir={raw}", f"--work_dir={blocker}",
                 "--quiet", "--patch_size=32"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write") and str(blocker) in errors[0]


def test_debug_shows_the_traceback(tmp_path, raw):
    _file(raw, "spots*.csv").unlink()
    from segjointgene.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError):
        _run(tmp_path, raw, "--debug")



# ============================================================================================ training and resume
TRAIN = ["--step_name=SegJointGene", f"--datasets_name={NAME}", "--quiet", "--net_width=4", "--net_batch_size=4",
         "--save_interval=1", "--attr_method=none", "--num_workers=0", "--device=cpu"]
RUN = "run"  # the trained run of the template (epochs 0 and 1)
NEW = "new"  # a run folder that does not exist yet


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory) -> Path:
    """A work dir with a preprocessed 64 x 64 section (4 patches of 32 px) and a run trained to epoch 1."""
    sim = make_sim(tmp_path_factory.mktemp("trained"), name=NAME, size=64, patch_size=32)
    assert main([*TRAIN, f"--work_dir={sim.work_dir}", f"--net_sub_suffix={RUN}", "--net_epoch=1"]) == 0
    return sim.work_dir


@pytest.fixture()
def work(trained_template, tmp_path) -> Path:
    """A private copy of the template (run.json re-pointed at the copy's dataset)."""
    from segjointgene.io.files import read_json, write_json

    dst = tmp_path / "work"
    shutil.copytree(trained_template, dst)
    info_path = dst / "checkpoints" / NAME / RUN / "run.json"
    info = read_json(info_path)
    info["data_dir"] = str((dst / "data" / NAME).resolve())
    write_json(info_path, info)
    return dst


def _train(work: Path, *extra: str) -> int:
    return main([*TRAIN, f"--work_dir={work}", *extra])


def _data(work: Path) -> Path:
    return work / "data" / NAME


def _run_dir(work: Path, suffix: str = RUN) -> Path:
    return work / "checkpoints" / NAME / suffix


def _first_patch(work: Path) -> Path:
    return sorted((_data(work) / "train").glob("p_*.npz"))[0]


def _rewrite_patch(work: Path, edit) -> None:
    from segjointgene.io.files import load_npz, save_npz

    path = _first_patch(work)
    save_npz(path, edit(load_npz(path)))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _with_nan(arrays):
    image = arrays["image"].copy()
    image[0, 3, 3] = np.nan
    return {**arrays, "image": image}


def _repreprocess(work: Path, **sim_kwargs) -> None:
    """Replace the section and its dataset by another simulation (as a user would with --overwrite)."""
    from segjointgene.config import PreprocessConfig
    from segjointgene.io.files import read_section
    from segjointgene.preprocess.pipeline import preprocess_section

    raw = work / "data" / f"{NAME}_raw" / "section"
    shutil.rmtree(raw)
    make_sim(work, name=NAME, size=64, patch_size=32, preprocess=False, **sim_kwargs)
    preprocess_section(read_section(raw), _data(work), PreprocessConfig(patch_size=32), overwrite=True, progress=False)


def _start_cases():
    """A new run (no checkpoint yet) over a damaged dataset: (id, damage(work), extra flags, needles)."""
    meta = lambda work: _data(work) / "metadata.json"  # noqa: E731
    return [
        ("truncated patch", lambda w: _truncate(_first_patch(w)), (), ("p_0_", "truncated", "re-create")),
        ("patch that is not an npz", lambda w: _first_patch(w).write_bytes(b"not a zip file"), (), ("p_0_", "corrupt")),
        ("patch without its instance array", lambda w: _rewrite_patch(w, lambda a: {k: v for k, v in a.items()
                                                                                   if k != "instance"}), (),
         ("p_0_", "missing array(s) instance", "re-run preprocessing")),
        ("patch with one gene too few", lambda w: _rewrite_patch(w, lambda a: {**a, "image": a["image"][1:]}), (),
         ("p_0_", "'image' has shape (11, 32, 32)", "expected (12, 32, 32)", "re-run preprocessing")),
        ("patch with a wrong label shape", lambda w: _rewrite_patch(w, lambda a: {**a, "label": a["label"][:, :31]}),
         (), ("p_0_", "'label' has shape (32, 31)", "re-run preprocessing")),
        ("patch with a float64 image", lambda w: _rewrite_patch(w, lambda a: {**a, "image": a["image"].astype(float)}),
         (), ("p_0_", "float64", "re-run preprocessing")),
        # raised inside a DataLoader worker process: torch re-raises it with the worker's traceback in the message
        ("patch with NaN density, read by a loader worker", lambda w: _rewrite_patch(w, _with_nan),
         ("--num_workers=1", "--cache_patches=no"), ("p_0_", "NaN", "re-run preprocessing")),
        ("patch listed in the metadata but missing", lambda w: _first_patch(w).unlink(), (),
         ("p_0_", "missing", "re-run preprocessing")),
        ("unfinished preprocessing", lambda w: meta(w).write_text(meta(w).read_text().replace('"complete": true',
                                                                                           '"complete": false')),
         (), ("metadata.json", "did not finish", "--step_name=preprocess_CA1")),
        ("dataset never preprocessed", lambda w: shutil.rmtree(_data(w)), (), ("metadata.json", "preprocess")),
    ]


@pytest.mark.parametrize("damage, extra, needles", [c[1:] for c in _start_cases()], ids=[c[0] for c in _start_cases()])
def test_bad_dataset_at_training_start(work, capsys, damage, extra, needles):
    damage(work)
    capsys.readouterr()
    assert _train(work, f"--net_sub_suffix={NEW}", "--net_epoch=1", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    run = _run_dir(work, NEW)  # nothing trained, nothing exported
    assert not list(run.glob("net_*.pt")) and not list(run.glob("labels_cache_*")) and not (run / "results").exists()


@pytest.mark.parametrize("damage", [lambda w: _truncate(_first_patch(w)),
                                    lambda w: _rewrite_patch(w, lambda a: {**a, "image": a["image"][1:]})],
                         ids=["truncated patch", "wrong shape"])
def test_failed_training_start_leaves_no_run_folder(work, damage):
    damage(work)
    assert _train(work, f"--net_sub_suffix={NEW}", "--net_epoch=1") == 2
    assert not _run_dir(work, NEW).exists()


def _snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) -> its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def _relabel_one_pixel(work: Path) -> None:
    """Re-save the epoch-1 label cache with one pixel changed (a cache that is not the one saved with net_1.pt)."""
    from segjointgene.io.files import load_npz, save_npz

    path = _run_dir(work) / "labels_cache_1.npz"
    arrays = load_npz(path)
    arrays["train.instances"][0, 0, 0] += 1
    save_npz(path, arrays)


def _resume_cases():
    """Resuming the trained run (epochs 0, 1) after damage: (id, damage(work), extra flags, needles)."""
    run = _run_dir
    return [
        ("truncated checkpoint", lambda w: _truncate(run(w) / "net_1.pt"), (),
         ("net_1.pt", "truncated", "--ckpt_load_epoch")),
        ("checkpoint that is not a zip", lambda w: (run(w) / "net_1.pt").write_bytes(b"\x80\x02garbage"), (),
         ("net_1.pt", "--ckpt_load_epoch")),
        ("empty checkpoint", lambda w: (run(w) / "net_1.pt").write_bytes(b""), (), ("net_1.pt", "--ckpt_load_epoch")),
        ("truncated label cache", lambda w: _truncate(run(w) / "labels_cache_1.npz"), (),
         ("labels_cache_1.npz", "net_1.pt", "resume from another epoch")),
        ("label cache changed after its checkpoint", _relabel_one_pixel, (), ("labels_cache_1.npz", "net_1.pt")),
        ("missing label cache", lambda w: (run(w) / "labels_cache_1.npz").unlink(), ("--ckpt_load_epoch=1",),
         ("--ckpt_load_epoch=1", "saved epochs: 0)")),
        ("--ckpt_load_epoch that does not exist", lambda w: None, ("--ckpt_load_epoch=7",),
         ("--ckpt_load_epoch=7", str(Path("checkpoints") / NAME / RUN), "saved epochs: 0, 1")),
        ("checkpoint of a dataset with other genes", lambda w: _repreprocess(w, n_genes=10), (),
         ("net_1.pt", "12 genes", "10 genes", "--datasets_name")),
        ("checkpoint of a dataset with other classes", lambda w: _repreprocess(w, n_celltypes=4), (),
         ("net_1.pt", "3 classes", "5 classes", "--datasets_name")),
        ("checkpoint of another network width", lambda w: None, ("--net_width=8",), ("net_1.pt", "--net_width")),
        ("run trained on another dataset", lambda w: (run(w) / "run.json").write_text(
            (run(w) / "run.json").read_text().replace(str(_data(w).resolve()), "/elsewhere/data/x")), (),
         ("run.json", "/elsewhere/data/x", "--datasets_name")),
        ("unreadable run.json", lambda w: (run(w) / "run.json").write_text("{"), (), ("run.json", "JSON")),
    ]


@pytest.mark.parametrize("damage, extra, needles", [c[1:] for c in _resume_cases()],
                         ids=[c[0] for c in _resume_cases()])
def test_bad_run_folder_on_resume(work, capsys, damage, extra, needles):
    damage(work)
    capsys.readouterr()
    before = _snapshot(_run_dir(work), skip=("run.json",))
    assert _train(work, f"--net_sub_suffix={RUN}", "--if_load_ckpt=True", "--net_epoch=2", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _snapshot(_run_dir(work), skip=("run.json",)) == before  # nothing written, nothing removed


def test_resume_without_any_checkpoint(work, capsys):
    assert _train(work, f"--net_sub_suffix={NEW}", "--if_load_ckpt=True", "--net_epoch=2") == 2
    err = capsys.readouterr().err
    assert "--if_load_ckpt" in err and "no checkpoint" in err


def test_refused_resume_leaves_run_json_untouched(work):
    before = (_run_dir(work) / "run.json").read_bytes()
    assert _train(work, f"--net_sub_suffix={RUN}", "--if_load_ckpt=True", "--net_epoch=2", "--net_width=8") == 2
    assert (_run_dir(work) / "run.json").read_bytes() == before


def test_damaged_train_log_on_resume(work, capsys):
    (_run_dir(work) / "train_log.csv").write_bytes(b"\x00\xff\xfe not a table")
    assert _train(work, f"--net_sub_suffix={RUN}", "--if_load_ckpt=True", "--net_epoch=2") == 2
    assert "train_log.csv" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates a folder: proof that code in a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_refused_and_never_run(work, tmp_path, capsys):
    import torch

    from segjointgene.methods.segjointgene.checkpoint import load_checkpoint

    marker = tmp_path / "payload_ran"
    path = _run_dir(work) / "net_1.pt"
    state = load_checkpoint(path)
    torch.save({**state, "extra": _Payload(marker)}, path)
    assert _train(work, f"--net_sub_suffix={RUN}", "--if_load_ckpt=True", "--net_epoch=2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "net_1.pt" in err and "refused" in err and "posix.mkdir" in err, err
    assert "weights_only" not in err  # torch's advice to load it unsafely is not passed on
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.is_dir()


def _unwritable_cases():
    """(id, make(work) -> the blocking path, suffix)"""

    def file_for_dataset_runs(w):
        shutil.rmtree(w / "checkpoints" / NAME)
        (w / "checkpoints" / NAME).write_text("a file where a folder is needed")
        return w / "checkpoints" / NAME

    def file_for_run(w):
        (w / "checkpoints" / NAME / NEW).write_text("a file where the run folder is needed")
        return w / "checkpoints" / NAME / NEW

    return [("checkpoints/<name> is a file", file_for_dataset_runs), ("the run folder is a file", file_for_run)]


@pytest.mark.parametrize("make", [c[1] for c in _unwritable_cases()], ids=[c[0] for c in _unwritable_cases()])
def test_unwritable_run_folder(work, capsys, make):
    blocker = make(work)
    assert _train(work, f"--net_sub_suffix={NEW}", "--net_epoch=1") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write") and str(blocker) in errors[0], errors
    assert blocker.is_file()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user (root ignores modes)")
def test_read_only_run_folder(work, capsys):
    run = _run_dir(work, NEW)
    run.mkdir()
    run.chmod(0o500)
    try:
        assert _train(work, f"--net_sub_suffix={NEW}", "--net_epoch=1") == 2
    finally:
        run.chmod(0o700)
    err = capsys.readouterr().err
    assert "error: cannot write" in err and "permissions" in err
    assert not any(run.iterdir())


def test_results_folder_blocked_after_training_keeps_the_checkpoints(work, capsys):
    """An export that cannot write fails cleanly; the trained epochs stay and the run resumes to the export."""
    run = _run_dir(work, NEW)
    run.mkdir()
    (run / "results").write_text("a file where the results folder is needed")
    assert _train(work, f"--net_sub_suffix={NEW}", "--net_epoch=1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "cannot write" in err[0] and "results" in err[0], err
    from segjointgene.methods.segjointgene.checkpoint import list_epochs

    assert list_epochs(run) == [0, 1]
    (run / "results").unlink()
    assert _train(work, f"--net_sub_suffix={NEW}", "--net_epoch=1", "--if_load_ckpt=True") == 0
    assert (run / "results" / "instance_mask.tif").is_file()


# ============================================================================================ export
def _export(work: Path, *extra: str) -> int:
    return main(["--step_name=export", f"--datasets_name={NAME}", f"--work_dir={work}", f"--net_sub_suffix={RUN}",
                 "--quiet", *extra])


@pytest.mark.parametrize("damage, extra, needles", [
    (lambda w: None, ("--ckpt_load_epoch=5",), ("--ckpt_load_epoch", "saved epochs: 0, 1")),
    (lambda w: _truncate(_run_dir(w) / "labels_cache_1.npz"), (), ("labels_cache_1.npz", "truncated")),
    (lambda w: (_run_dir(w) / "labels_cache_1.npz").write_bytes(b"junk"), (), ("labels_cache_1.npz", "corrupt")),
], ids=["epoch that does not exist", "truncated label cache", "label cache that is not an npz"])
def test_bad_export(work, capsys, damage, extra, needles):
    damage(work)
    capsys.readouterr()
    before = _snapshot(_run_dir(work))
    assert _export(work, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _snapshot(_run_dir(work)) == before
