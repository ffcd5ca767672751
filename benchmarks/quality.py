"""Segmentation quality on simulated sections: our self-trained result vs the baselines (issue 4 quality bar).

Runs the real CLI steps (simulate -> preprocess -> SegJointGene -> evaluate) for each section mode and seed, then
prints one markdown table per mode with the metrics the quality bar names (gene mIoU, spot-assignment accuracy)
and writes all rows to ``<out>/quality.csv``.

    python benchmarks/quality.py --out /tmp/quality --modes dense sparse --seeds 0 -- --net_epoch=30 --net_width=16

Arguments after ``--`` go to the SegJointGene step unchanged (and override the defaults below).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segjointgene.cli import main  # noqa: E402
from segjointgene.evaluate.scoring import markdown_table  # noqa: E402

#: The demo-size training used for the quality numbers unless overridden after "--".
#: (the first release's demo settings, with the published label rule v1)
TRAIN_DEFAULTS = ["--net_width=16", "--net_epoch=30", "--net_lr=1e-3", "--passes_per_epoch=8", "--attr_epoch=10",
                  "--attr_every=5", "--CID_n_steps=10", "--attr_n_gene=30", "--attr_n_celltype=6", "--save_interval=10",
                  "--num_workers=0", "--num_threads=1", "--label_update=v1"]
KEY_METRICS = ["gene_mIoU", "gene_mIoU_pen", "spot_acc", "spot_acc_cell", "F1@0.5", "type_mIoU", "n_cells",
               "marker_precision", "marker_precision_de", "marker_chance"]


def run_one(work: Path, mode: str, seed: int, size: int, train_args: list[str], suffix: str) -> pd.DataFrame:
    name = f"{mode}{seed}"
    common = [f"--work_dir={work}", f"--datasets_name={name}", "--quiet", f"--random_seed={seed}"]
    if not (work / "data" / name / "metadata.json").is_file():
        assert main(["--step_name=simulate", f"--sim_mode={mode}", f"--sim_size={size}", *common]) == 0
        assert main(["--step_name=preprocess", "--patch_size=64", *common]) == 0
    t0 = time.perf_counter()
    rc = main(["--step_name=SegJointGene", f"--net_sub_suffix={suffix}", "--overwrite", *common, *train_args])
    assert rc == 0, f"training failed ({rc})"
    minutes = (time.perf_counter() - t0) / 60
    assert main(["--step_name=evaluate", f"--net_sub_suffix={suffix}", *common]) == 0
    results = work / "checkpoints" / name / suffix / "results"
    table = pd.read_csv(results / "evaluation.csv")
    table.insert(0, "section", name)
    table["train_minutes"] = minutes
    ranking = results / "gene_ranking_evaluation.csv"
    if ranking.is_file():  # the rankings belong to our method only
        scores = pd.read_csv(ranking).groupby("ranking")[["precision_at_m", "chance"]].mean()
        ours = table["method"] == "ours"
        for source, column in (("attribution", "marker_precision"), ("expression", "marker_precision_de")):
            if source in scores.index:
                table.loc[ours, column] = scores.loc[source, "precision_at_m"]
        table.loc[ours, "marker_chance"] = scores["chance"].iloc[0]
    return table


def main_cli(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--suffix", default="quality")
    args = parser.parse_args(own)
    train_args = TRAIN_DEFAULTS + extra
    rows = [run_one(args.out, mode, seed, args.size, train_args, args.suffix) for mode in args.modes for seed in args.seeds]
    table = pd.concat(rows, ignore_index=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / f"quality_{args.suffix}.csv", index=False)
    print(f"\ntraining arguments: {' '.join(train_args)}")
    cols = [c for c in KEY_METRICS if c in table.columns]
    for section, part in table.groupby("section", sort=False):
        print(f"\n### {section} (training {part['train_minutes'].iloc[0]:.1f} min)\n")
        print(markdown_table(part.set_index("method")[cols]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_cli())
