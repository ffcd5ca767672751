"""Real tissue (issue 28): every method on a real MERFISH field with stain-derived truth, and on CA1 without truth.

MERFISH U2-OS, field of view 2 (``../shared/data/merfish_u2os_fov2``; its README says how to score), in two
variants: as it is, and with the nuclei of every fifth cell (ids 5, 10, 15) taken out of the nucleus image and the
cell tables - cells whose nucleus is out of the plane, which only a method that finds cells de novo can reach (the
held-out field has two). Methods: the nuclei, nucleus expansion by 5-30 px, the density watershed of ``evaluate``
(its defaults), pciSeq 0.0.61 and ComSeg 1.8.5 (each in its own virtual environment, as in ``peers.py``; pciSeq's
class-mean reference is the nuclei's own spot profile, the only typing a method may see here), our default command
(``preprocess_CA1`` + ``SegJointGene``, one thread) and our default with ``--model_boundaries partition`` (the spot
model and pixel partition that were the default before the density engine). Scores: spot accuracy by id (ids that
are no nucleus's - de novo cells - count as the truth cell that holds most of their spots), mean IoU of each truth
cell with its best-overlap instance, F1 at IoU 0.5 / 0.75 (greedy one-to-one matching), CPU seconds.

CA1 3-1 left (``../shared/data/ca1_3_1_left``): no truth, so the curve of coverage (the fraction of spots in cells)
against MECR (the class-mean reference's mutually exclusive gene pairs) of our ``prob`` thresholds beside that of
nucleus expansion (0-30 px) and pciSeq's own run (its ``pciseq_prob`` thresholds): a better assignment lies below
the expansion curve. Ours runs twice: with ``--reference_csv`` (the class means pciSeq got) and without. Each CA1
run takes tens of minutes on a CPU; it is reused from ``--out`` when present.

    python benchmarks/real.py --out /tmp/real                       # MERFISH variants and CA1
    python benchmarks/real.py --out /tmp/real --sections merfish    # MERFISH only (a few minutes)
    python benchmarks/real.py --out /tmp/real --no_peers            # without pciSeq / ComSeg
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from peers import PEERS, cpu_run, peer_python  # noqa: E402

from segjointgene.evaluate import metrics as M  # noqa: E402
from segjointgene.evaluate.baselines import (density_threshold, density_watershed, expand_nuclei, nearest_nucleus,  # noqa: E402
                                    spot_density)
from segjointgene.evaluate.scoring import Spots, expansion_curve, load_reference, markdown_table  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
MERFISH = SHARED / "merfish_u2os_fov2"
CA1 = SHARED / "ca1_3_1_left"
RADII = (5, 10, 15, 20, 25, 30)
#: cells whose nucleus the second MERFISH variant leaves out (every fifth id)
DROPPED = (5, 10, 15)


def main_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


# ------------------------------------------------------------------------------------------------ MERFISH
def merfish_variant(out: Path, drop: tuple[int, ...]) -> Path:
    """The raw folder of the field with the nuclei of ``drop`` taken out (the folder itself when nothing is)."""
    raw = MERFISH / "raw"
    if not drop:
        return raw
    target = out / "raw" / f"merfish_fov2_no{'_'.join(map(str, drop))}"
    if (target / "done").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("spots_merfish_fov2.csv",):
        shutil.copyfile(raw / name, target / name)
    for name in ("cells_merfish_fov2.csv", "celltype_merfish_fov2.csv"):
        table = pd.read_csv(raw / name)
        table[~table["cell"].isin(drop)].to_csv(target / name, index=False)
    nuclei = tifffile.imread(raw / "nuclei_label_merfish_fov2.tif")
    nuclei[np.isin(nuclei, drop)] = 0
    tifffile.imwrite(target / "nuclei_label_merfish_fov2.tif", nuclei, compression="zlib")
    (target / "done").write_text("")
    return target


def mapped_ids(cell: np.ndarray, true: np.ndarray, nucleus_ids: set[int]) -> np.ndarray:
    """``cell`` with every id that is no nucleus's (a de novo cell) replaced by the truth cell holding most of its
    spots."""
    mapped = cell.copy()
    for k in np.unique(cell):
        if k != 0 and int(k) not in nucleus_ids:
            mapped[cell == k] = np.bincount(true[cell == k]).argmax()
    return mapped


def score_truth(cell: np.ndarray, mask: np.ndarray | None, truth: pd.DataFrame, truth_mask: np.ndarray,
                nucleus_ids: set[int]) -> dict[str, float]:
    """Spot accuracy by id (de novo ids mapped, :func:`mapped_ids`), mean IoU of each truth cell with its
    best-overlap instance, F1 at IoU 0.5 / 0.75 (masks only)."""
    true = truth["cell"].to_numpy(np.int64)
    row = {"spot_acc": float((mapped_ids(cell, true, nucleus_ids) == true).mean())}
    if mask is not None:
        overlap = M.instance_overlap(mask, truth_mask)
        match = M.match_instances(overlap)
        ious = []
        for t in np.unique(truth_mask[truth_mask > 0]):
            inter = np.bincount(mask[truth_mask == t].ravel())
            inter[0] = 0
            best = int(inter.argmax())
            union = (truth_mask == t).sum() + (mask == best).sum() - inter[best] if best else (truth_mask == t).sum()
            ious.append(inter[best] / union if best else 0.0)
        row.update({"mean_IoU": float(np.mean(ious)), "F1@0.5": M.detection_scores(match, 0.5).f1,
                    "F1@0.75": M.detection_scores(match, 0.75).f1, "n_cells": float(np.unique(mask).size - 1)})
    return row


def _mask_cell(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return M.cells_at_spots(mask, x, y).astype(np.int64)


def nucleus_reference(raw: Path, out_csv: Path) -> Path:
    """``celltype,gene,rate``: the mean spots per nucleus of each gene, per type (a class-mean reference built
    from what a method may see)."""
    spots = pd.read_csv(next(raw.glob("spots_*.csv")))
    nuclei = tifffile.imread(next(raw.glob("*label*.tif")))
    types = pd.read_csv(next(raw.glob("celltype_*.csv"))).set_index("cell")["original_celltype"]
    h, w = nuclei.shape
    on = nuclei[spots["spotY"].astype(int).clip(0, h - 1), spots["spotX"].astype(int).clip(0, w - 1)]
    sel = on > 0
    table = pd.DataFrame({"celltype": types.reindex(on[sel]).to_numpy(), "gene": spots["gene"].to_numpy()[sel]})
    n_cells = types.value_counts()
    rate = table.value_counts().rename("n").reset_index()
    rate["rate"] = rate["n"] / rate["celltype"].map(n_cells)
    rate[["celltype", "gene", "rate"]].to_csv(out_csv, index=False)
    return out_csv


def run_ours(out: Path, raw: Path, name: str, flags: tuple[str, ...] = ()) -> tuple[Path, float]:
    """Our default command on ``raw``: (results folder, CPU seconds of the training step)."""
    common = [f"--work_dir={out}", f"--datasets_name={name}", "--quiet"]
    results = out / "checkpoints" / name / "spotmodel" / "results"
    if not (out / "data" / name / "metadata.json").is_file():
        subprocess.run(main_cmd("--step_name=preprocess_CA1", f"--raw_dir={raw}", *common), check=True)
    cpu = cpu_run(main_cmd("--step_name=SegJointGene", "--overwrite", "--num_threads=1", "--num_workers=0", *common,
                           *flags), env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    return results, cpu


def run_peer(peer: str, out: Path, raw: Path, name: str, env_dir: Path) -> tuple[np.ndarray, float]:
    """A peer's spot assignment (spots file order) and CPU seconds."""
    cells = pd.read_csv(next(raw.glob("cells_*.csv")))
    xy = cells[["cellX", "cellY"]].to_numpy(float)
    radius = 0.5 * float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    target = out / f"{name}_{peer}.csv"
    nuclei = out / f"{name}_nuclei.tif"
    tifffile.imwrite(nuclei, tifffile.imread(next(raw.glob("*label*.tif"))).astype(np.uint32))
    reference = [str(nucleus_reference(raw, out / f"{name}_reference.csv"))] if PEERS[peer][2] else []
    cpu = cpu_run([str(peer_python(env_dir, peer)), str(ROOT / "benchmarks" / PEERS[peer][1]),
                   str(next(raw.glob("spots_*.csv"))), str(nuclei), *reference, str(PEERS[peer][3] * radius),
                   str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return pd.read_csv(target)["cell"].to_numpy(np.int64), cpu


def merfish_table(out: Path, drop: tuple[int, ...], peers: list[str], env_dir: Path) -> pd.DataFrame:
    raw = merfish_variant(out, drop)
    name = "merfish_fov2" + (f"_no{'_'.join(map(str, drop))}" if drop else "")
    truth = pd.read_csv(MERFISH / "truth" / "spots_truth.csv")
    truth_mask = tifffile.imread(MERFISH / "truth" / "cells_mask.tif").astype(np.int64)
    nuclei = tifffile.imread(next(raw.glob("*label*.tif"))).astype(np.int64)
    ids = set(np.unique(nuclei[nuclei > 0]).tolist())
    x, y = truth["spotX"].to_numpy(float), truth["spotY"].to_numpy(float)
    rows: dict[str, dict[str, float]] = {}
    masks = {"nuclei": nuclei}
    nearest = nearest_nucleus(nuclei)
    masks.update({f"expand_{r}": expand_nuclei(nuclei, r, nearest=nearest).astype(np.int64) for r in RADII})
    density = spot_density(x, y, nuclei.shape, 5.0)  # evaluate's baseline: the patches' sigma, half the nuclei's
    masks["density_watershed"] = density_watershed(nuclei, density, density_threshold(density, nuclei)).astype(np.int64)
    for method, mask in masks.items():
        rows[method] = score_truth(_mask_cell(mask, x, y), mask, truth, truth_mask, ids)
    for method, flags in (("ours", ()), ("ours_partition", ("--model_boundaries=partition",))):
        results, cpu = run_ours(out, raw, name + ("" if method == "ours" else "_partition"), flags)
        assigned = pd.read_csv(results / "spots_assigned.csv")
        mask = tifffile.imread(results / "instance_mask.tif").astype(np.int64)
        rows[method] = {**score_truth(assigned["cell"].to_numpy(np.int64), mask, truth, truth_mask, ids), "cpu_s": cpu}
        if method == "ours":
            true = truth["cell"].to_numpy(np.int64)
            right = mapped_ids(assigned["cell"].to_numpy(np.int64), true, ids) == true
            rows[method]["prob_ECE"] = M.calibration_error(assigned["prob"].to_numpy(float), right)
    for peer in peers:
        try:
            cell, cpu = run_peer(peer, out, raw, name, env_dir)
        except subprocess.CalledProcessError as err:  # e.g. ComSeg's spot graph outgrows the memory
            print(f"{peer} failed on {name}: {err}", flush=True)
            rows[peer] = {"spot_acc": float("nan"), "cpu_s": float("nan")}
            continue
        rows[peer] = {**score_truth(cell, None, truth, truth_mask, ids), "cpu_s": cpu}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


# ------------------------------------------------------------------------------------------------ CA1
def ca1_curves(out: Path) -> tuple[pd.DataFrame, dict[str, float]]:
    """Coverage-MECR curves on CA1 (ours with and without the class-mean reference, nucleus expansion 0-30 px,
    pciSeq) and the targets' figures."""
    raw = CA1 / "CA1_raw" / "3_1_left"
    reference_csv = CA1 / "pciseq_inputs" / "test_scRNAseq.csv"
    runs, cpu = {}, {}
    for method, name, flags in (("ours", "CA1", (f"--reference_csv={reference_csv}",)), ("ours_noref", "CA1_noref", ())):
        results = out / "checkpoints" / name / "spotmodel" / "results"
        cpu[method] = float("nan")
        if not (results / "spots_assigned.csv").is_file():
            results, cpu[method] = run_ours(out, raw, name, flags)
        runs[method] = pd.read_csv(results / "spots_assigned.csv")
    ours = runs["ours"]
    genes = sorted(ours["gene"].unique())
    gene = np.searchsorted(genes, ours["gene"].to_numpy(str))
    reference = load_reference(reference_csv)
    pairs = M.exclusive_gene_pairs(reference, fraction=0.1)
    curves = [M.mecr_curve(run["cell"].to_numpy(np.int64), run["prob"].to_numpy(float), gene, genes, pairs)
              .assign(method=method) for method, run in runs.items()]
    nuclei = tifffile.imread(results / "initial_instance_mask.tif").astype(np.int64)
    spots = Spots(x=ours["spotX"].to_numpy(float), y=ours["spotY"].to_numpy(float), gene=gene, genes=tuple(genes))
    curves.append(expansion_curve(nuclei, spots, pairs).assign(method="expansion"))
    pciseq = pd.read_csv(raw / "spots_w_segmentation_leftCA1_3-1.csv")
    p_cell = pciseq["pciseq_cell"].to_numpy(np.int64)
    p_gene = np.searchsorted(genes, pciseq["gene"].to_numpy(str))
    curves.append(M.mecr_curve(p_cell, pciseq["pciseq_prob"].to_numpy(float), p_gene, genes, pairs)
                  .assign(method="pciseq"))
    curve = pd.concat(curves, ignore_index=True)
    exp = curve[curve["method"] == "expansion"]
    figures = {"expansion_MECR_at_0.736": M.interpolate_curve(exp, 0.736),
               "pciseq_MECR_at_0.736": M.interpolate_curve(curve[curve["method"] == "pciseq"], 0.736)}
    for method, run in runs.items():
        mine = curve[curve["method"] == method]
        full = mine.iloc[-1]
        at_pciseq = M.mecr_curve(run["cell"].to_numpy(np.int64), run["prob"].to_numpy(float), gene, genes, pairs,
                                 coverages=[0.736]).iloc[0]
        below = [M.interpolate_curve(exp, c) - m for c, m in zip(mine["coverage"], mine["MECR"])]
        figures.update({f"{method}_coverage": float(full["coverage"]), f"{method}_MECR": float(full["MECR"]),
                        f"expansion_MECR_at_{method}": M.interpolate_curve(exp, float(full["coverage"])),
                        f"{method}_MECR_at_0.736": float(at_pciseq["MECR"]), f"{method}_cpu_s": cpu[method],
                        f"{method}_below_expansion_min": float(np.nanmin(below)),
                        f"{method}_below_expansion_max": float(np.nanmax(below))})
    return curve, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", nargs="+", default=["merfish", "ca1"], choices=("merfish", "ca1"))
    parser.add_argument("--no_peers", action="store_true", help="skip pciSeq and ComSeg")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS),
                        help="the peers to run (ComSeg's spot graph of the MERFISH field's 220 k spots outgrew 24 GB "
                             "of memory here)")
    parser.add_argument("--env_dir", type=Path, default=None, help="peer virtual environments (default OUT/envs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env_dir = args.env_dir or args.out / "envs"
    if "merfish" in args.sections:
        if not MERFISH.is_dir():
            print(f"{MERFISH} not found: skipping MERFISH")
        for drop in ((), DROPPED):
            table = merfish_table(args.out, drop, [] if args.no_peers else args.peers, env_dir)
            table.to_csv(args.out / f"merfish{'_dropped' if drop else ''}.csv")
            title = "as it is" if not drop else f"nuclei of cells {', '.join(map(str, drop))} left out"
            print(f"\n### MERFISH U2-OS fov2, {title}\n\n{markdown_table(table, transpose=False)}", flush=True)
    if "ca1" in args.sections and CA1.is_dir():
        curve, figures = ca1_curves(args.out)
        curve.to_csv(args.out / "ca1_curves.csv", index=False)
        print("\n### CA1 3-1 left: coverage vs MECR\n\n" + curve.round(4).to_string(index=False))
        print(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
