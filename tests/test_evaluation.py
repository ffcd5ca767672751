"""The evaluate step on a small simulated section: the truth as "ours" scores 1, the baselines lower; errors are clear."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segjointgene.evaluate import scoring as E
from segjointgene.config import EvaluateConfig, Settings
from segjointgene.constants import TruthFiles
from segjointgene.io.metadata import load_metadata
from segjointgene.io.runfolder import Paths, ResultFiles, RunFolder
from segjointgene.errors import ColumnError, DataError, InputNotFoundError
from segjointgene.io.files import read_section, write_csv, write_tif
from segjointgene.preprocess.pipeline import seeded_watershed

from tests.conftest import make_sim

BASELINES = ["nuclei", "expand_5", "expand_10", "expand_15", "density_watershed"]


def _truth_masks(sim) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    inst = tifffile.imread(sim.truth_dir / TruthFiles.INSTANCE_MASK)
    meta = load_metadata(sim.data_dir)
    cells = pd.read_csv(sim.truth_dir / TruthFiles.CELLS)
    lut = np.zeros(int(inst.max()) + 1, np.int32)
    lut[cells["cell"].to_numpy()] = [meta.celltypes.index(t) for t in cells["celltype"]]
    return inst, lut[inst]


def _write_run(sim, instance, celltype, run="run") -> Path:
    """Results of a run as the export step writes them (SPEC §5), here by hand."""
    results = sim.work_dir / "checkpoints" / sim.name / run / RunFolder.RESULTS
    results.mkdir(parents=True, exist_ok=True)
    section = read_section(sim.raw_dir)
    write_tif(results / ResultFiles.INSTANCE_MASK, instance.astype(np.uint32))
    write_tif(results / ResultFiles.CELLTYPE_MASK, celltype.astype(np.uint16))
    write_tif(results / ResultFiles.INITIAL_MASK, seeded_watershed(section.dapi, section.cells).astype(np.uint32))
    meta = load_metadata(sim.data_dir)
    write_csv(results / ResultFiles.CELLTYPES, pd.DataFrame({"id": range(len(meta.celltypes)),
                                                             "name": list(meta.celltypes)}))
    return results


def _paths(sim, run="run", raw_dir=None):
    return Paths(work_dir=sim.work_dir, datasets_name=sim.name, raw_dir=raw_dir or sim.raw_dir,
                 data_dir=sim.data_dir, run_dir=sim.work_dir / "checkpoints" / sim.name / run)


def _run(sim, capsys=None, run="run", **evaluate) -> pd.DataFrame:
    assert E.run_evaluate(Settings(evaluate=EvaluateConfig(**evaluate)), _paths(sim, run)) == 0
    return pd.read_csv(_paths(sim, run).run_dir / RunFolder.RESULTS / ResultFiles.EVALUATION, index_col="method")


@pytest.fixture(scope="module")
def sim_perfect(tmp_path_factory):
    """A 128-px dense section whose run "predicts" the true whole-cell masks."""
    sim = make_sim(tmp_path_factory.mktemp("evalsim"))
    inst, types = _truth_masks(sim)
    _write_run(sim, inst, types)
    return sim


def test_truth_as_prediction_scores_one_and_baselines_lower(sim_perfect, capsys):
    table = _run(sim_perfect)
    out = capsys.readouterr().out
    assert list(table.index) == ["ours", *BASELINES]
    assert list(table.columns) == [*E.TRUTH_COLUMNS, *E.ALWAYS_COLUMNS]  # markers.csv gives MECR a reference
    ours = table.loc["ours"]
    for col in ("gene_mIoU", "gene_mIoU_pen", "F1@0.5", "AP@0.5", "F1@0.75", "AP@0.75", "type_mIoU", "type_Dice",
                "type_mIoU_fg", "spot_acc_cell"):
        assert ours[col] == pytest.approx(1.0), col
    # noise spots that fall inside true cells cannot be told apart by any mask: they bound the accuracy
    spots = pd.read_csv(sim_perfect.truth_dir / TruthFiles.SPOTS)
    inst, _ = _truth_masks(sim_perfect)
    noise_in_cells = (spots["cell"] == 0) & (inst[np.floor(spots["spotY"]).astype(int), np.floor(spots["spotX"]).astype(int)] > 0)
    assert ours["spot_acc"] == pytest.approx(1 - noise_in_cells.mean())
    assert ours["spot_acc_noise"] == pytest.approx(1 - noise_in_cells.sum() / (spots["cell"] == 0).sum())
    for base in BASELINES:
        for col in ("gene_mIoU", "spot_acc", "F1@0.75", "type_mIoU"):
            assert table.loc[base, col] < ours[col], (base, col)
    # the nuclei hold fewer spots than any growth of them
    assert table.loc["nuclei", "spots_in_cells"] < table.loc["expand_5", "spots_in_cells"]
    assert table.loc["expand_5", "mean_area_px"] < table.loc["expand_15", "mean_area_px"]
    assert "| metric | ours | nuclei |" in out and "| gene_mIoU |" in out
    assert "truth: " in out and "evaluation of 6 methods" in out


def test_cli_evaluate_end_to_end(sim_perfect, capsys):
    from segjointgene.cli import main

    code = main(["--step_name=evaluate", "--work_dir", str(sim_perfect.work_dir), "--datasets_name", sim_perfect.name,
                 "--net_sub_suffix", "run", "--raw_dir", str(sim_perfect.raw_dir), "--expand_px", "4,8"])
    assert code == 0
    table = pd.read_csv(sim_perfect.work_dir / "checkpoints" / sim_perfect.name / "run" / "results" / "evaluation.csv",
                        index_col="method")
    assert list(table.index) == ["ours", "nuclei", "expand_4", "expand_8", "density_watershed"]
    assert "| spot_acc |" in capsys.readouterr().out


def test_missing_results_name_the_file_and_the_step(sim_perfect, capsys):
    from segjointgene.cli import main

    with pytest.raises(InputNotFoundError, match="instance_mask.tif not found.*--step_name=SegJointGene.*export"):
        E.run_evaluate(Settings(), _paths(sim_perfect, run="never_trained"))
    code = main(["--step_name=evaluate", "--work_dir", str(sim_perfect.work_dir), "--datasets_name", sim_perfect.name,
                 "--net_sub_suffix", "never_trained"])
    assert code == 2 and "instance_mask.tif not found" in capsys.readouterr().err


def test_without_truth_and_with_a_reference_csv(tmp_path, capsys):
    sim = make_sim(tmp_path, seed=3, mode="sparse")
    inst, types = _truth_masks(sim)
    _write_run(sim, inst, types)
    markers = pd.read_csv(sim.truth_dir / TruthFiles.MARKERS)
    ref = markers.pivot(index="gene", columns="celltype", values="rate").reset_index().rename(columns={"gene": "gene_name"})
    ref_path = tmp_path / "reference.csv"
    ref.to_csv(ref_path, index=False)
    shutil.move(sim.truth_dir, tmp_path / "hidden_truth")  # a real section: no truth folder

    table = _run(sim, reference_csv=str(ref_path))
    assert list(table.columns) == list(E.ALWAYS_COLUMNS)
    assert table["MECR"].notna().all()
    # whole cells mix fewer exclusive markers than nuclei grown by 15 px, which take in their neighbours' spots
    assert table.loc["ours", "MECR"] < table.loc["expand_15", "MECR"]
    assert table.loc["ours", "cell_calling"] > table.loc["nuclei", "cell_calling"]
    assert "truth: none" in capsys.readouterr().out

    table = _run(sim)  # no reference either: no MECR column
    assert list(table.columns) == [c for c in E.ALWAYS_COLUMNS if c not in ("MECR", "neg_purity")]


def test_pciseq_assignment_row(tmp_path):
    sim = make_sim(tmp_path, seed=4)
    inst, types = _truth_masks(sim)
    _write_run(sim, np.zeros_like(inst), np.zeros_like(types))  # an empty prediction
    spots_csv = next(sim.raw_dir.glob("spots*.csv"))
    raw = pd.read_csv(spots_csv)
    truth_spots = pd.read_csv(sim.truth_dir / TruthFiles.SPOTS)
    raw["pciseq_cell"] = truth_spots["cell"]  # a perfect assignment
    raw.to_csv(spots_csv, index=False)
    table = _run(sim)
    assert table.index[-1] == "pciseq"
    assert table.loc["pciseq", "spot_acc"] == 1.0
    assert np.isnan(table.loc["pciseq", "gene_mIoU"]) and np.isnan(table.loc["pciseq", "cell_calling"])
    assert table.loc["pciseq", "spots_in_cells"] == pytest.approx((truth_spots["cell"] > 0).mean())
    ours = table.loc["ours"]
    assert ours["gene_mIoU"] == 0 and ours["F1@0.5"] == 0 and ours["spots_in_cells"] == 0 and ours["n_cells"] == 0


def test_truth_of_another_section_is_rejected(tmp_path):
    sim = make_sim(tmp_path / "a", seed=0)
    other = make_sim(tmp_path / "b", seed=1, preprocess=False)
    inst, types = _truth_masks(sim)
    _write_run(sim, inst, types)
    with pytest.raises(DataError, match="does not belong to this section"):
        _run(sim, truth_dir=str(other.truth_dir))
    with pytest.raises(InputNotFoundError, match="--truth_dir"):
        _run(sim, truth_dir=str(tmp_path / "nowhere"))


def test_evaluate_masks_library_call():
    inst = np.zeros((20, 20), np.uint32)
    inst[2:10, 2:10] = 1
    inst[10:18, 10:18] = 2
    types = np.where(inst == 1, 1, np.where(inst == 2, 2, 0))
    grown = np.where(inst > 0, inst, 0)
    grown[2:10, 10:12] = 1  # cell 1 eats a strip of background
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 20, 200), rng.uniform(0, 20, 200)
    spots = E.Spots(x, y, rng.integers(0, 3, 200).astype(np.int32), ("g0", "g1", "g2"))
    from segjointgene.evaluate.metrics import cells_at_spots

    truth = E.Truth(inst, types, cells_at_spots(inst, x, y))
    ref = pd.DataFrame({"T1": [5.0, 0.0, 1.0], "T2": [0.0, 5.0, 1.0]}, index=["g0", "g1", "g2"])
    table = E.evaluate_masks({"same": (inst, types), "grown": (grown, None)}, spots, truth, ref,
                             assignments={"assigned": truth.spot_cell}, n_classes=3)
    assert list(table.index) == ["same", "grown", "assigned"]
    assert table.loc["same", "gene_mIoU"] == 1.0 and table.loc["grown", "gene_mIoU"] < 1.0
    assert np.isnan(table.loc["grown", "type_mIoU"])  # no cell-type mask given
    assert table.loc["assigned", "spot_acc"] == 1.0
    assert table["MECR"].notna().all()
    with pytest.raises(DataError, match="raw frame"):
        E.evaluate_masks({"bad": (inst[:10], None)}, spots, truth)
    md = E.markdown_table(table)
    assert md.splitlines()[0] == "| metric | same | grown | assigned |" and "n/a" in md


def test_load_reference(tmp_path):
    path = tmp_path / "ref.csv"
    pd.DataFrame({"gene_name": ["a", "b"], "T1": [1.0, 0.0], "T2": [0.0, 2.0]}).to_csv(path, index=False)
    ref = E.load_reference(path)
    assert list(ref.index) == ["a", "b"] and list(ref.columns) == ["T1", "T2"]
    pd.DataFrame({"gene": ["a"], "T1": ["high"]}).to_csv(path, index=False)
    with pytest.raises(ColumnError, match="numeric"):
        E.load_reference(path)
    with pytest.raises(InputNotFoundError, match="--reference_csv"):
        E.load_reference(tmp_path / "missing.csv")


def test_real_ca1_reference_gives_exclusive_pairs(real_raw):
    from segjointgene.evaluate.metrics import exclusive_gene_pairs

    ref = E.load_reference(real_raw.parents[1] / "pciseq_inputs" / "test_scRNAseq.csv")
    assert ref.shape == (92, 71)
    pairs = exclusive_gene_pairs(ref, fraction=0.1)
    assert 500 < len(pairs) < 2000
    assert ("Neurod6", "Plp1") in pairs or ("Plp1", "Neurod6") in pairs  # pyramidal vs oligodendrocyte markers


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """cli.main installs a stderr handler on the root logger; under capsys that stream is closed after the test."""
    import logging

    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_segjointgene", False)]:
        root.removeHandler(handler)


@pytest.mark.slow
@pytest.mark.realdata
def test_evaluate_on_the_real_ca1_section(real_raw, tmp_path, capsys):
    """The whole step on 5471 x 7602 px, 72k spots, 3481 nuclei (stand-in run: nuclei grown by 8 px), with MECR and
    the pciSeq row; the dataset files are written as preprocessing writes them, without the patches."""
    import time

    from segjointgene.evaluate.baselines import celltype_mask, expand_nuclei
    from segjointgene.constants import BACKGROUND_NAME
    from segjointgene.io.files import save_npz, write_json

    s = read_section(real_raw)
    nuclei = s.nuclei.toarray().astype(np.uint32)
    celltypes = [BACKGROUND_NAME, *s.celltypes]
    class_ids = s.cells["celltype"].map({t: i for i, t in enumerate(celltypes)}).to_numpy(np.int32)
    data = tmp_path / "data" / "CA1"
    data.mkdir(parents=True)
    h, w = s.shape
    write_json(data / "metadata.json", {"genes": s.genes, "celltypes": celltypes, "raw_shape": [h, w],
                                        "crop_offset": [0, 0], "crop_shape": [h, w], "patch_size": 128,
                                        "grid": [-(-h // 128), -(-w // 128)], "split": {"train": [], "test": []},
                                        "density_sigma": 5.0, "raw_dir": str(real_raw), "complete": True,
                                        "fingerprint": {"sources": {"spots": {"file": Path(s.files["spots"]).name}}}})
    write_csv(data / "cells.csv", pd.DataFrame({"cell": s.cells["cell"], "celltype_id": class_ids}))
    save_npz(data / "spots.npz", {"gene": s.spots["gene"].map({g: i for i, g in enumerate(s.genes)}).to_numpy(np.int32),
                                  "x": s.spots["x"].to_numpy(), "y": s.spots["y"].to_numpy(),
                                  "row_in_file": np.asarray(s.spot_rows_in_file, np.int64)})
    run_dir = tmp_path / "checkpoints" / "CA1" / "standin"
    results = run_dir / RunFolder.RESULTS
    results.mkdir(parents=True)
    ours = expand_nuclei(nuclei, 8)
    write_tif(results / ResultFiles.INSTANCE_MASK, ours)
    write_tif(results / ResultFiles.CELLTYPE_MASK, celltype_mask(ours, s.cells["cell"].to_numpy(), class_ids))
    write_tif(results / ResultFiles.INITIAL_MASK, nuclei)
    del s, nuclei, ours
    paths = Paths(work_dir=tmp_path, datasets_name="CA1", raw_dir=real_raw, data_dir=data, run_dir=run_dir)
    reference = real_raw.parents[1] / "pciseq_inputs" / "test_scRNAseq.csv"
    start = time.perf_counter()
    cfg = Settings(evaluate=EvaluateConfig(reference_csv=str(reference)))
    assert E.run_evaluate(cfg, paths) == 0
    seconds = time.perf_counter() - start
    table = pd.read_csv(results / ResultFiles.EVALUATION, index_col="method")
    assert list(table.index) == ["ours", *BASELINES, "pciseq"]
    assert table.loc["pciseq", "spots_in_cells"] == pytest.approx(53261 / 72330, abs=1e-4)  # the data README's count
    assert table.loc["pciseq", "n_cells"] == 3250
    assert table.loc["nuclei", "spots_in_cells"] == pytest.approx(44353 / 72330, abs=1e-3)
    assert table["MECR"].notna().all() and table["cell_calling"].iloc[:-1].notna().all()
    print(f"evaluate on CA1: {seconds:.0f} s")  # timed in benchmarks, not asserted (a shared machine is noisy)
