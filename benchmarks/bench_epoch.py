"""Full epoch time with and without CID, through the real CLI, on a small simulated section.

    python benchmarks/bench_epoch.py --work /tmp/sjg_bench/epoch --size 256 --width 16

Simulates a section (``--size`` px, dense), preprocesses it into ``--patch-size`` patches, then runs
``--step_name=SegJointGene`` for epochs 0..``--epochs`` with labels updated from epoch 1 and CID from epoch 1
(``--attr_epoch=1``), once per variant:

* ``none``: ``--attr_method=none`` (training + label updates only);
* ``cid``: the default CID settings (20 steps, chunks of 8 types, 50 genes, up to 59 types, ``--CID_types=local``);
* ``cid_all``: ``--CID_types=all`` (every type at every patch); ``cid_all_noskip``: also ``--CID_skip=false`` (every
  patch: the behaviour before the speed work, BatchNorm folding apart);

and reads ``train_log.csv``: ``epoch_seconds``, ``attr_seconds`` and ``label_seconds`` of the last epoch, plus the
wall time of the whole command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, Recorder, run_measured  # noqa: E402

VARIANTS = {
    "none": ["--attr_method=none"],
    "cid": ["--attr_method=CID"],
    "cid_all": ["--attr_method=CID", "--CID_types=all"],
    "cid_all_noskip": ["--attr_method=CID", "--CID_types=all", "--CID_skip=false"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)

    import pandas as pd

    rec = Recorder("bench_epoch", sys.argv[1:] if argv is None else argv, "cli-auto")
    main_py = str(ROOT / "main.py")
    name = f"epoch{args.size}"
    common = [f"--work_dir={args.work}", f"--datasets_name={name}", "--quiet"]
    if not (args.work / "data" / name / "metadata.json").is_file():
        for step in (["--step_name=simulate", f"--sim_size={args.size}"],
                     ["--step_name=preprocess", f"--patch_size={args.patch_size}", "--num_workers=0"]):
            out = run_measured([sys.executable, main_py, *step, *common])
            if out["returncode"]:
                print(out["output"])
                return 1
    for variant in args.variants:
        cmd = [sys.executable, main_py, "--step_name=SegJointGene", *common, f"--net_sub_suffix=bench_{variant}",
               "--overwrite", f"--net_epoch={args.epochs}", f"--net_width={args.width}", "--warmup_epochs=1",
               "--attr_epoch=1", f"--save_interval={args.epochs}", "--num_workers=0", "--label_update=v1",
               f"--num_threads={args.threads}", *VARIANTS[variant]]
        out = run_measured(cmd)
        if out["returncode"]:
            print(out["output"])
            return 1
        log = pd.read_csv(args.work / "checkpoints" / name / f"bench_{variant}" / "train_log.csv").iloc[-1]
        rec.add(f"epoch_{variant}", float(log["epoch_seconds"]), "s", attr_seconds=round(float(log["attr_seconds"]), 3),
                label_seconds=round(float(log["label_seconds"]), 3), command_seconds=round(out["seconds"], 2),
                width=args.width, epoch=int(log["epoch"]))
    rec.summary(f"epoch time through the CLI, simulated {args.size} px section, width {args.width}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
