"""Bad inputs through the real CLI: one-line error naming the file / argument and the fix, exit status 2,
no traceback (without --debug), and no partial output left behind."""

from __future__ import annotations

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
        from segjointgene.io import write_raw_section  # a nucleus image far smaller than the section
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
