"""Marker recovery of every gene ranking over the sections of a ``peers.py`` run (issue 13).

Reads ``<out>/checkpoints/<section>/spotmodel/results/gene_ranking_evaluation.csv`` (written by
``evaluate``: precision of the top m genes against the simulated markers, m = a type's markers, or the two types'
markers for border genes) and prints, per ranking, the mean and the worst over types / pairs of each section.

    python benchmarks/rankings.py --out /tmp/peers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segjointgene.evaluate.scoring import markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", default="spotmodel")
    args = parser.parse_args(argv)
    rows = []
    for path in sorted((args.out / "checkpoints").glob(f"*/{args.run}/results/gene_ranking_evaluation.csv")):
        table = pd.read_csv(path)
        section = path.parts[-4]
        for ranking, part in table.groupby("ranking"):
            rows.append({"section": section, "ranking": ranking, "mean_precision": part["precision_at_m"].mean(),
                         "worst": part["precision_at_m"].min(), "chance": part["chance"].mean(), "n": len(part)})
    if not rows:
        print(f"no gene_ranking_evaluation.csv under {args.out}")
        return 1
    table = pd.DataFrame(rows)
    print(markdown_table(table.set_index(["section", "ranking"]).reset_index(level="ranking")
                         .pivot(columns="ranking", values=["mean_precision", "worst"]).round(3)
                         .pipe(lambda t: t.set_axis([f"{a} {b}" for a, b in t.columns], axis=1)), transpose=False))
    summary = table.groupby("ranking")[["mean_precision", "worst", "chance"]].agg(
        {"mean_precision": "mean", "worst": "min", "chance": "mean"})
    print("\n" + markdown_table(summary, transpose=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
