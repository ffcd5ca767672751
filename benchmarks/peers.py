"""Peers side by side (issue 12): our default command, the mask baselines and pciSeq on the same simulated sections.

For each section (``--modes`` x ``--noise`` x ``--seeds``, the hard simulator preset at ``--size``): simulate,
preprocess, run our README default training command (``--step_name=SegJointGene`` with no method flags) in a fresh
process on one thread, evaluate it (which also scores the mask baselines on the same nuclei), then run pciSeq in its
own virtual environment (made by this script under ``--env_dir``; pciSeq's dependencies never enter ours) with the
same nuclei, the simulated type profiles as its class-mean reference and a radius from the data (half the median
nearest-neighbour distance of the nucleus centroids). Prints one markdown table per section and the mean / worst
over sections, with CPU seconds (user + system of the child processes) and our time as a ratio of each peer's.

    python benchmarks/peers.py --out /tmp/peers --modes dense sparse --noise 0.1 0.3 --seeds 0 1 2
    python benchmarks/peers.py --out /tmp/peers --ours_only --ours_flags=--model_ambient=true   # an ablation

ComSeg (``pip install comseg``, which pins pandas 2.3.3) runs in its own venv too, with the same nuclei as its
prior and ``mean_cell_diameter`` = ``max_cell_radius`` = 6 x that radius (see ``PEERS``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segjointgene.evaluate.scoring import Spots, load_truth, markdown_table, score_assignment  # noqa: E402
from segjointgene.evaluate.metrics import calibration_error, reliability  # noqa: E402
from segjointgene.io.files import load_npz  # noqa: E402
from segjointgene.io.metadata import load_metadata  # noqa: E402

METRICS = ["spot_acc_cell", "gene_mIoU", "F1@0.5", "F1@0.75", "noise_out", "cpu_s"]
#: peer -> (pip requirements of its own venv, runner script, whether the runner takes the class-mean reference,
#: the factor on the radius from the data that the runner gets). ComSeg's factor 3 (mean_cell_diameter =
#: max_cell_radius = 6 x that radius) was the best of 1, 1.5, 2, 3 on one dense and one sparse section (spot accuracy
#: 0.35 / 0.67 at 1, 0.71 / 0.94 at 3): its spot graph links spots within half the diameter, and with the
#: physical diameter the graph of ~11 spots per cell falls apart (half the spots end unassigned)
PEERS = {"pciseq": (["pciSeq==0.0.61"], "_pciseq_runner.py", True, 1.0),
         "comseg": (["comseg==1.8.5"], "_comseg_runner.py", False, 3.0)}


def cpu_run(cmd: list[str], **kw) -> float:
    """Run a command to completion; returns the CPU seconds (user + system) of it and its children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def peer_python(env_dir: Path, name: str) -> Path:
    """The python of the peer's own virtual environment, created and filled on first use."""
    env = env_dir / name
    python = env / "bin" / "python"
    if not python.is_file():
        venv.create(env, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[name][0], "tifffile"], check=True)
    return python


def main_cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def run_section(out: Path, mode: str, noise: float, seed: int, size: int, env_dir: Path,
                preset: str = "hard", earlier: pd.DataFrame | None = None,
                keep: tuple[str, ...] = (), ours_flags: tuple[str, ...] = ()) -> pd.DataFrame:
    """One section's table; the methods named in ``keep`` ("ours", "peers") are not rerun but taken from
    ``earlier`` (a peers.csv: CPU times; the peers' assignment files in ``out``); ``ours_flags`` are added to our
    training command (an ablation: the default with one knob changed)."""
    name = f"{preset}_{mode}_n{int(noise * 100)}_s{seed}"
    common = [f"--work_dir={out}", f"--datasets_name={name}", "--quiet", f"--random_seed={seed}"]
    if not (out / "data" / name / "metadata.json").is_file():
        subprocess.run(main_cmd("--step_name=simulate", f"--sim_preset={preset}", f"--sim_mode={mode}",
                                f"--sim_noise={noise}", f"--sim_size={size}", "--overwrite", *common), check=True)
        subprocess.run(main_cmd("--step_name=preprocess", "--patch_size=64", *common), check=True)
    results = out / "checkpoints" / name / "spotmodel" / "results"
    if "ours" in keep and name in set(earlier["section"]):  # peers only: our run and its time from peers.csv
        ours_cpu = float(earlier[(earlier["section"] == name) & (earlier["method"] == "ours")]["cpu_s"].iloc[0])
    else:  # the README's default command, one thread, fresh process
        ours_cpu = cpu_run(main_cmd("--step_name=SegJointGene", "--overwrite", "--num_threads=1", "--num_workers=0",
                                    *common, *ours_flags), env={**os.environ, "OMP_NUM_THREADS": "1"})
        subprocess.run(main_cmd("--step_name=evaluate", *common), check=True, stdout=subprocess.DEVNULL)
    table = pd.read_csv(results / "evaluation.csv", index_col=0)
    table.loc["ours", "cpu_s"] = ours_cpu
    for peer in PEERS:
        table.loc[peer] = _run_peer(peer, out, name, results, env_dir, earlier if "peers" in keep else None)
    table.insert(0, "section", name)
    table.index.name = "method"
    return table


def _section_truth(out: Path, name: str):
    """The section's spots (spots.npz order), their rows in the raw spots file and the truth."""
    raw = out / "data" / f"{name}_raw" / "3_1_left"
    data_dir = out / "data" / name
    meta = load_metadata(data_dir)
    table = load_npz(data_dir / "spots.npz", ("gene", "x", "y", "row_in_file"))
    spots = Spots(x=table["x"].astype(float), y=table["y"].astype(float), gene=table["gene"].astype(np.int32),
                  genes=meta.genes)
    rows = table["row_in_file"].astype(np.int64)
    truth = load_truth(raw.with_name(raw.name + "_truth"), shape=meta.raw_shape, celltypes=list(meta.celltypes),
                       rows_in_file=rows, genes=list(meta.genes), spot_gene=spots.gene)
    return spots, rows, truth


def our_probabilities(out: Path, name: str, results: Path) -> pd.DataFrame:
    """Our per-spot ``prob`` and whether the spot's assignment (a cell or background) is right."""
    table = pd.read_csv(results / "spots_assigned.csv", usecols=["cell", "prob"])
    truth = _section_truth(out, name)[2]
    return pd.DataFrame({"prob": table["prob"].to_numpy(float),
                         "right": table["cell"].to_numpy(np.int64) == truth.spot_cell})


def _run_peer(peer: str, out: Path, name: str, results: Path, env_dir: Path,
              reuse: pd.DataFrame | None = None) -> pd.Series:
    """Run a peer on the section and score it (``reuse``: its assignment file and CPU time from an earlier run)."""
    raw = out / "data" / f"{name}_raw" / "3_1_left"
    truth_dir = raw.with_name(raw.name + "_truth")
    cells = pd.read_csv(next(raw.glob("cells_*.csv")))
    xy = cells[["cellX", "cellY"]].to_numpy(float)
    radius = 0.5 * float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    target = out / f"{name}_{peer}.csv"
    reference = [str(truth_dir / "markers.csv")] if PEERS[peer][2] else []
    earlier = None if reuse is None else reuse[(reuse["section"] == name) & (reuse["method"] == peer)]
    if earlier is not None and len(earlier) and target.is_file():
        cpu = float(earlier["cpu_s"].iloc[0])
    else:
        cpu = cpu_run([str(peer_python(env_dir, peer)), str(Path(__file__).with_name(PEERS[peer][1])),
                       str(next(raw.glob("spots_*.csv"))), str(results / "initial_instance_mask.tif"), *reference,
                       str(PEERS[peer][3] * radius), str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spots, rows, truth = _section_truth(out, name)
    cell = pd.read_csv(target)["cell"].to_numpy(np.int64)[rows]
    row = score_assignment(cell, spots, truth=truth)
    return pd.Series({**row, "cpu_s": cpu})


def summary(table: pd.DataFrame) -> str:
    methods = ["ours", "ours_mask", *PEERS, "expand_5", "expand_10", "expand_15", "density_watershed"]
    cols = [c for c in METRICS if c in table.columns]
    lines = []
    for stat, fn in (("mean", "mean"), ("worst", "min")):
        agg = table.groupby(level="method")[cols].agg(fn).reindex([m for m in methods if m in set(table.index)])
        if stat == "worst" and "cpu_s" in agg:
            agg["cpu_s"] = table.groupby(level="method")["cpu_s"].max()
        lines.append(f"\n### {stat} over {table['section'].nunique()} sections\n\n{markdown_table(agg, transpose=False)}")
    return "\n".join(lines)


def margins(table: pd.DataFrame) -> pd.DataFrame:
    """Per section: ours minus the best peer and minus the best mask baseline, and our CPU time over each peer's."""
    rows = []
    masks = ["expand_5", "expand_10", "expand_15", "density_watershed"]
    for section, t in table.groupby("section", sort=False):
        r = {"section": section}
        r["acc_vs_best_peer"] = t.loc["ours", "spot_acc_cell"] - max(t.loc[p, "spot_acc_cell"] for p in PEERS)
        r["acc_vs_best_mask"] = t.loc["ours", "spot_acc_cell"] - t.loc[masks, "spot_acc_cell"].max()
        r["mIoU_vs_best_mask"] = t.loc["ours", "gene_mIoU"] - t.loc[masks, "gene_mIoU"].max()
        r["noise_out_vs_expand_10"] = t.loc["ours", "noise_out"] - t.loc["expand_10", "noise_out"]
        for p in PEERS:
            r[f"time_x_{p}"] = t.loc["ours", "cpu_s"] / t.loc[p, "cpu_s"]
        rows.append(r)
    return pd.DataFrame(rows).set_index("section")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--noise", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--preset", default="hard", choices=("hard", "basic"), help="simulator preset")
    parser.add_argument("--env_dir", type=Path, default=None, help="peer virtual environments (default OUT/envs)")
    parser.add_argument("--peers_only", action="store_true",
                        help="rerun the peers only; our runs and their times come from OUT/peers.csv")
    parser.add_argument("--ours_only", action="store_true",
                        help="rerun ours only; the peers' assignments and times come from OUT/peers.csv")
    parser.add_argument("--ours_flags", nargs="*", default=[],
                        help="flags added to our training command, e.g. --ours_flags=--model_smoothness=0")
    args = parser.parse_args(argv)
    env_dir = args.env_dir or args.out / "envs"
    keep = ("ours",) * args.peers_only + ("peers",) * args.ours_only
    earlier = pd.read_csv(args.out / "peers.csv") if keep else None
    tables, sections = [], []
    for mode in args.modes:
        for noise in args.noise:
            for seed in args.seeds:
                t = run_section(args.out, mode, noise, seed, args.size, env_dir, args.preset, earlier, keep,
                                tuple(args.ours_flags))
                tables.append(t)
                name = t["section"].iloc[0]
                sections.append((name, args.out / "checkpoints" / name / "spotmodel" / "results"))
                cols = [c for c in METRICS if c in t.columns]
                print(f"\n### {t['section'].iloc[0]}\n\n{markdown_table(t[cols], transpose=False)}", flush=True)
    table = pd.concat(tables)
    table.to_csv(args.out / "peers.csv")
    probs = pd.concat([our_probabilities(args.out, *section) for section in sections])
    print(f"\n### our per-spot prob over {len(sections)} sections (calibration error "
          f"{calibration_error(probs['prob'], probs['right']):.3f})\n\n"
          + markdown_table(reliability(probs["prob"], probs["right"]), transpose=False))
    print(summary(table))
    m = margins(table)
    print("\n### margins (targets: acc_vs_best_peer >= 0.03, acc_vs_best_mask >= 0.08, mIoU_vs_best_mask >= 0.10, "
          "noise_out_vs_expand_10 >= 0)\n\n" + markdown_table(m, transpose=False))
    print(json.dumps({"machine": os.uname().nodename, "threads": 1, "sections": len(tables)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
