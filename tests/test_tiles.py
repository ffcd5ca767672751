"""The tiled pipeline on Dask (segjointgene.methods.tiled.tiles, --step_name=segment): seams, resume, a failing tile."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from segjointgene.cli import main
from segjointgene.config import LabelUpdateConfig
from segjointgene.methods.spotmodel.engine import engine_configs, segment_window
from segjointgene.io.files import load_npz
from segjointgene.io.metadata import load_metadata
from segjointgene.results.stitch import stitch_patch_channel
from segjointgene.preprocess.dataset import read_class_lut
from segjointgene.methods.tiled.tiles import plan_tiles

pytest.importorskip("dask.distributed")

COMMON = ["--datasets_name=t", "--quiet", "--dask_workers=2"]


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """A 192-px hard simulated section, preprocessed at patch 64 (3 x 3 patches)."""
    work = tmp_path_factory.mktemp("tiles")
    args = [f"--work_dir={work}", "--datasets_name=t", "--quiet"]
    assert main(["--step_name=simulate", "--sim_size=192", "--sim_preset=hard", *args]) == 0
    assert main(["--step_name=preprocess", "--patch_size=64", *args]) == 0
    return work


def _results(work, run):
    out = work / "checkpoints" / "t" / run / "results"
    return pd.read_csv(out / "spots_assigned.csv"), pd.read_csv(out / "cells.csv"), out


def test_plan_covers_the_frame_once():
    tiles = plan_tiles((300, 200), 128, 20)
    cover = np.zeros((300, 200), int)
    for t in tiles:
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        oy0, oy1, ox0, ox1 = t.outer
        assert oy0 == max(y0 - 20, 0) and ox1 == min(x1 + 20, 200)
    assert (cover == 1).all() and len(tiles) == 6


def test_one_tile_is_the_engine_on_the_whole_section(section):
    assert main(["--step_name=segment", f"--work_dir={section}", "--net_sub_suffix=one", *COMMON]) == 0
    one, cells, _ = _results(section, "one")
    data = section / "data" / "t"
    meta = load_metadata(data)
    spots = load_npz(data / "spots.npz", ("gene", "x", "y"))
    nuclei = stitch_patch_channel(data, meta, "instance", dtype=np.int64)  # the raw frame (no crop here)
    lut = read_class_lut(data)
    ids = np.unique(nuclei[nuclei > 0])
    whole = segment_window(spots["x"], spots["y"], spots["gene"], nuclei, ids, lut[ids] - 1, n_genes=meta.n_genes,
                           n_types=meta.n_classes - 1, first_new_id=lut.size, config=engine_configs(LabelUpdateConfig()))
    assert np.array_equal(one["cell"].to_numpy(), whole.cell)
    np.testing.assert_allclose(one["prob"].to_numpy(), whole.prob, atol=1e-6)


def test_nine_tiles_keep_every_cell_once(section):
    assert main(["--step_name=segment", f"--work_dir={section}", "--net_sub_suffix=nine", "--tile_px=64",
                 *COMMON]) == 0
    if not (section / "checkpoints" / "t" / "one").is_dir():
        assert main(["--step_name=segment", f"--work_dir={section}", "--net_sub_suffix=one", *COMMON]) == 0
    one, cells_one, out = _results(section, "one")
    nine, cells_nine, out9 = _results(section, "nine")
    # each tile fits the spot model to its own window: 0.81 of the spots agree with one tile here (tiles of 64 px,
    # ~20 cells each), 0.96-0.97 with 512-px tiles of ~570 cells (benchmarks/RESULTS.md)
    assert (one["cell"] == nine["cell"]).mean() >= 0.75
    assert cells_nine["cell"].is_unique and cells_one["cell"].is_unique
    data = section / "data" / "t"
    nuclei = stitch_patch_channel(data, load_metadata(data), "instance", dtype=np.int64)
    assert set(np.unique(nuclei[nuclei > 0])) <= set(cells_nine["cell"])  # every nucleus is one cell
    mask = tifffile.imread(out9 / "instance_mask.tif")
    assert mask.shape == (192, 192) and set(np.unique(mask)) - {0} == set(cells_nine["cell"])
    assert (cells_nine.set_index("cell")["area_px"] == pd.Series(*np.unique(mask[mask > 0], return_counts=True)[::-1])
            ).all()
    # the nuclei are there too, so the evaluate step scores a tiled run against the truth and the baselines
    assert tifffile.imread(out9 / "initial_instance_mask.tif").shape == (192, 192)
    assert main(["--step_name=evaluate", f"--work_dir={section}", "--datasets_name=t", "--net_sub_suffix=nine",
                 "--quiet"]) == 0
    scores = pd.read_csv(out9 / "evaluation.csv", index_col=0)
    assert scores.loc["ours", "spot_acc"] > scores.loc["nuclei", "spot_acc"]
    assert (out9 / "cells.h5ad").is_file() and (out9 / "celltype_mask.tif").is_file()


def test_a_failing_tile_is_named_the_others_kept_and_a_rerun_resumes(section, capsys):
    args = ["--step_name=segment", f"--work_dir={section}", "--net_sub_suffix=resume", "--tile_px=64", *COMMON]
    assert main(args) == 0
    first, _, _ = _results(section, "resume")
    tiles = section / "checkpoints" / "t" / "resume" / "tiles"
    done = {p.name: p.stat().st_mtime_ns for p in tiles.glob("t_*.npz")}
    (tiles / "t_1_1.npz").unlink()  # as if killed before this tile finished
    (tiles / "input" / "t_1_1.npz").write_bytes(b"truncated")  # and its input damaged
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 of 1 tile(s) failed (t_1_1)" in err and "rerun the same command" in err
    assert {p.name for p in tiles.glob("t_*.npz")} == set(done) - {"t_1_1.npz"}  # the others kept, untouched
    (tiles / "input" / "t_1_1.npz").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "8 finished before, 1 to run" in capsys.readouterr().out
    again, _, _ = _results(section, "resume")
    assert again.equals(first)
    assert all((tiles / n).stat().st_mtime_ns == t for n, t in done.items() if n != "t_1_1.npz")


def test_other_tile_settings_need_overwrite(section, capsys):
    args = ["--step_name=segment", f"--work_dir={section}", "--net_sub_suffix=plan", *COMMON]
    assert main([*args, "--tile_px=64"]) == 0
    assert main([*args, "--tile_px=128"]) == 2
    assert "another plan" in capsys.readouterr().err
    assert main([*args, "--tile_px=128", "--overwrite"]) == 0


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(section):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # with the tile network (trained once, bit-identical for one thread count)
    args = ["--step_name=segment", f"--work_dir={section}", "--tile_px=64", "--datasets_name=t", "--quiet",
            "--dask_workers=1", "--num_threads=1", "--tile_network_tiles=1", "--net_width=4", "--net_epoch=2"]
    assert main([*args, "--net_sub_suffix=straight"]) == 0
    tiles = section / "checkpoints" / "t" / "killed" / "tiles"
    proc = subprocess.Popen([sys.executable, str(root / "main.py"), *args, "--net_sub_suffix=killed"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(tiles.glob("t_*.npz"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run, its Dask scheduler and workers
    proc.wait()
    finished = len(list(tiles.glob("t_*.npz")))
    assert 1 <= finished < 9
    assert main([*args, "--net_sub_suffix=killed"]) == 0
    killed, _, _ = _results(section, "killed")
    straight, _, _ = _results(section, "straight")
    assert killed.equals(straight)


def test_the_network_learns_on_a_sample_and_the_tiles_take_its_evidence(section, capsys):
    args = ["--step_name=segment", f"--work_dir={section}", "--net_sub_suffix=net", "--tile_px=64", "--datasets_name=t",
            "--quiet", "--dask_workers=2", "--tile_network_tiles=2", "--net_epoch=2", "--net_width=4"]
    assert main(args) == 0
    assert "training the network on 2 tile(s)" in capsys.readouterr().out
    tiles = section / "checkpoints" / "t" / "net" / "tiles"
    assert (tiles / "network.pt").is_file() and len(list((tiles / "engine").glob("t_*.npz"))) == 2
    results = [load_npz(p, ("engine", "network")) for p in sorted(tiles.glob("t_*.npz"))]
    assert all(bool(r["network"]) == (str(r["engine"]) != "density") for r in results)
    assert any(bool(r["network"]) for r in results)
    if not (section / "checkpoints" / "t" / "nine").is_dir():
        assert main(["--step_name=segment", f"--work_dir={section}", "--net_sub_suffix=nine", "--tile_px=64",
                     *COMMON]) == 0
    net, cells, _ = _results(section, "net")
    alone, _, _ = _results(section, "nine")
    assert (net["cell"] == alone["cell"]).mean() > 0.6  # a barely trained network moves few spots, if any
    assert not np.allclose(net["prob"], alone["prob"])  # but its evidence enters every sparse tile's posterior
    assert cells["cell"].is_unique
    # a rerun keeps the network and the finished tiles; other network settings need --overwrite
    stamp = (tiles / "network.pt").stat().st_mtime_ns
    (tiles / "t_0_0.npz").unlink()
    assert main(args) == 0
    assert "training the network" not in capsys.readouterr().out
    assert (tiles / "network.pt").stat().st_mtime_ns == stamp
    again, _, _ = _results(section, "net")
    assert again.equals(net)
    assert main([*args, "--net_epoch=3"]) == 2
    assert "another plan" in capsys.readouterr().err


MERFISH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "merfish_u2os_fov2"


@pytest.mark.skipif(not MERFISH.is_dir(), reason="real MERFISH data (../shared/data) not available")
def test_a_de_novo_cell_across_a_seam_stays_whole(tmp_path):
    """The real MERFISH field with 3 nuclei left out (3 de novo cells): 4 tiles of 128 px against one tile. Without
    the claims of de novo cells beyond their owners' cores, 97.6 % of the spots agreed; with them 99.9 %."""
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    real = importlib.import_module("real")
    raw = real.merfish_variant(tmp_path, real.DROPPED)
    common = [f"--work_dir={tmp_path}", "--datasets_name=m", "--quiet"]
    assert main(["--step_name=preprocess_CA1", f"--raw_dir={raw}", *common]) == 0
    for tile_px in (4096, 128):
        assert main(["--step_name=segment", f"--tile_px={tile_px}", f"--net_sub_suffix=t{tile_px}",
                     "--dask_workers=2", *common]) == 0
    runs = tmp_path / "checkpoints" / "m"
    one = pd.read_csv(runs / "t4096" / "results" / "spots_assigned.csv")
    four = pd.read_csv(runs / "t128" / "results" / "spots_assigned.csv")
    cells = pd.read_csv(runs / "t128" / "results" / "cells.csv")
    pairs = pd.crosstab(one["cell"], four["cell"])
    mapping = pairs.idxmax(axis=1)  # each cell of one tile -> its counterpart (de novo ids differ by tile)
    assert mapping.is_unique and len(cells) == len(pairs) - 1  # the crosstab has the background row
    assert (four["cell"].to_numpy() == mapping[one["cell"]].to_numpy()).mean() > 0.995
    masks = [tifffile.imread(runs / r / "results" / "instance_mask.tif").astype(np.int64) for r in ("t4096", "t128")]
    lookup = dict(zip(mapping.to_numpy(), mapping.index))  # four tiles' ids -> one tile's
    relabelled = np.vectorize(lambda c: lookup.get(c, c))(masks[1])
    assert (relabelled == masks[0]).mean() > 0.99  # the claimed pixels too (0.994 measured)
