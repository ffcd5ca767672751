"""Preprocessing time and peak memory per megapixel, through the real CLI, on a simulated and on the real CA1 section.

    python benchmarks/bench_preprocess.py --work /tmp/sjg_bench/pre --sim-size 2048 --workers 0 2

Each run is ``python main.py --step_name=preprocess ...`` in a fresh subprocess writing a fresh dataset folder
(``--overwrite``), measured from outside: wall seconds and the peak, over time, of the summed resident memory of the
process and its worker processes (psutil, polled every 50 ms; the largest single process is reported too). The
figures are divided by the section's megapixels: the cropped frame (``metadata.json`` ``crop_shape``), the area
the patches cover. The minimum over ``--repeats`` runs is kept (time and memory separately).

Sections: ``sim<size>`` made once by ``--step_name=simulate`` (``--sim-size``, default density), and the real CA1
3-1 left section (``../shared/data/ca1_3_1_left``; skipped when absent).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CA1_RAW, ROOT, Recorder, run_measured  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for data/ (simulated raw section, outputs)")
    parser.add_argument("--sim-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--no-ca1", action="store_true")
    args = parser.parse_args(argv)

    rec = Recorder("bench_preprocess", sys.argv[1:] if argv is None else argv, "cpu")
    main_py = str(ROOT / "main.py")
    sim = f"sim{args.sim_size}"
    sim_raw = args.work / "data" / f"{sim}_raw"
    if not sim_raw.is_dir():
        out = run_measured([sys.executable, main_py, "--step_name=simulate", f"--datasets_name={sim}",
                            f"--work_dir={args.work}", f"--sim_size={args.sim_size}", "--quiet"])
        if out["returncode"]:
            print(out["output"])
            return 1
    sections = [(sim, ["--step_name=preprocess", f"--datasets_name={sim}"])]
    if CA1_RAW.is_dir() and not args.no_ca1:
        sections.append(("CA1", ["--step_name=preprocess_CA1", "--datasets_name=CA1", f"--raw_dir={CA1_RAW}"]))
    for name, step in sections:
        for workers in args.workers:
            runs = []
            for _ in range(args.repeats):
                cmd = [sys.executable, main_py, *step, f"--work_dir={args.work}", f"--patch_size={args.patch_size}",
                       f"--num_workers={workers}", "--overwrite", "--quiet"]
                # a fresh output each time: --overwrite would otherwise resume (keep) the patches already written
                meta_path = args.work / "data" / name / "metadata.json"
                meta_path.unlink(missing_ok=True)
                for split in ("train", "test"):
                    shutil.rmtree(args.work / "data" / name / split, ignore_errors=True)
                out = run_measured(cmd)
                if out["returncode"]:
                    print(out["output"])
                    return 1
                runs.append(out)
            meta = json.loads((args.work / "data" / name / "metadata.json").read_text())
            mpx = meta.crop_shape[0] * meta.crop_shape[1] / 1e6
            seconds = min(r["seconds"] for r in runs)
            tree = min(r["peak_tree_rss_mb"] for r in runs)
            single = min(r["peak_single_rss_mb"] for r in runs)
            common = dict(section=name, workers=workers, megapixels=round(mpx, 3), patches=meta.n_patches,
                          spots=meta.extra["n_spots"], genes=len(meta.genes))
            rec.add(f"preprocess_{name}_w{workers}_seconds", seconds, "s", per_mpx=round(seconds / mpx, 3), **common)
            rec.add(f"preprocess_{name}_w{workers}_peak_rss", tree, "MiB", per_mpx=round(tree / mpx, 2),
                    peak_single_process_mib=round(single, 1), **common)
    rec.summary("preprocessing through the CLI (time and peak memory of the process tree)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
