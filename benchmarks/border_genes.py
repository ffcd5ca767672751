"""Border genes (issue 30): marker recovery of ``border_genes.csv``, the spots on either side of the borders against
the network's integrated gradients (its ``ig_rank`` column), on hard simulated sections with the README's default
command.

For each section (``--modes`` x ``--noise`` x ``--seeds``; the sections of ``peers.py``): simulate, preprocess,
``--step_name=SegJointGene`` (the default method), then the precision of each pair's top m genes against the two
types' simulated markers (m = their number; :func:`segjointgene.evaluate.metrics.border_marker_precision`).

    python benchmarks/border_genes.py --out /tmp/borders --modes dense sparse --noise 0.1 0.3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segjointgene.evaluate.metrics import border_marker_precision  # noqa: E402


def run(out: Path, mode: str, noise: float, seed: int, size: int) -> dict:
    name = f"hard_{mode}_n{int(noise * 100)}_s{seed}"
    common = [f"--work_dir={out}", f"--datasets_name={name}", "--quiet", f"--random_seed={seed}"]
    main = [sys.executable, str(ROOT / "main.py")]
    if not (out / "data" / name / "metadata.json").is_file():
        subprocess.run([*main, "--step_name=simulate", "--sim_preset=hard", f"--sim_mode={mode}",
                        f"--sim_noise={noise}", f"--sim_size={size}", "--overwrite", *common], check=True)
        subprocess.run([*main, "--step_name=preprocess", "--patch_size=64", *common], check=True)
    results = out / "checkpoints" / name / "spotmodel" / "results"
    if not (results / "border_genes.csv").is_file():
        subprocess.run([*main, "--step_name=SegJointGene", "--num_threads=1", "--num_workers=0", *common], check=True)
    border = pd.read_csv(results / "border_genes.csv")
    markers = pd.read_csv(next((out / "data").glob(f"{name}_raw/*_truth")) / "markers.csv")
    row = {"section": name, "pairs": len(border[["type_a", "type_b"]].drop_duplicates())}
    row["spots"] = border_marker_precision(border, markers)["precision_at_m"].mean() if len(border) else float("nan")
    if "ig_rank" in border:
        ig = border.dropna(subset=["ig_rank"]).assign(rank=lambda t: t["ig_rank"])
        row["ig"] = border_marker_precision(ig, markers)["precision_at_m"].mean() if len(ig) else float("nan")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--noise", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    rows = [run(args.out, m, n, s, args.size) for m in args.modes for n in args.noise for s in args.seeds]
    table = pd.DataFrame(rows)
    print(table.round(3).to_string(index=False))
    print(table[["spots", "ig"]].mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
