"""Whole slides on Dask (issue 29): synthetic Xenium folders of 2 M, 5 M and 20 M transcripts, end to end.

For each size, a folder of ``bench_xenium.py`` (300 genes, one cell per 1 000 um^2, transcripts uniform over a
square, a quarter unassigned) whose side grows with the count (20 M over 10 mm, as ``bench_xenium.py``), then, each
in a fresh process and measured (wall seconds, CPU seconds of the process tree, peak RSS of the whole tree polled
every 0.2 s): ``preprocess_CA1 --store_density false`` and ``segment`` (the spot-model engine tile by tile on a
LocalCluster; tiles of 2048 px, 2 single-threaded workers here; the network trained on ``--network_tiles`` tiles).

    python benchmarks/bench_tiles.py --out /tmp/bench_tiles --rows 2000000 5000000 20000000
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import run_measured  # noqa: E402
from bench_xenium import write_folder, write_table  # noqa: E402

#: transcripts and cells per um^2 of the 20 M / 10 mm folder of bench_xenium.py
ROWS_PER_UM2, CELLS_PER_UM2 = 20_000_000 / 1e8, 100_000 / 1e8


def step(work: Path, name: str, *args: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run_measured([sys.executable, str(ROOT / "main.py"), f"--work_dir={work}", f"--datasets_name={name}",
                        "--quiet", *args], poll_s=0.2)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res["returncode"] != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res['output'][-2000:]}")
    return {"wall_s": round(res["seconds"], 1), "peak_tree_rss_gb": round(res["peak_tree_rss_mb"] / 1024, 2),
            "cpu_s_children": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "last_line": res["output"].strip().splitlines()[-2:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 5_000_000, 20_000_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--network_tiles", type=int, default=0, help="--tile_network_tiles of segment (0 = no network)")
    parser.add_argument("--reuse", action="store_true", help="keep a preprocessed dataset (segment only)")
    args = parser.parse_args(argv)
    for rows in args.rows:
        side = math.sqrt(rows / ROWS_PER_UM2)
        cells = int(round(side * side * CELLS_PER_UM2))
        folder = args.out / f"xenium_{rows // 1_000_000}M"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "morphology_focus").is_dir():
            write_table(folder / "transcripts.parquet", rows, cells, side_um=side)
            write_folder(folder, cells, side)
        name = f"x{rows // 1_000_000}M"
        work = args.out / "work"
        if args.reuse and (work / "data" / name / "metadata.json").is_file():
            prep = {"wall_s": 0.0, "peak_tree_rss_gb": 0.0, "cpu_s_children": 0.0, "last_line": ["reused"]}
        else:
            prep = step(work, name, "--step_name=preprocess_CA1", f"--raw_dir={folder}", "--store_density=false",
                        "--n_celltypes=8", "--overwrite")
        seg = step(work, name, "--step_name=segment", f"--dask_workers={args.workers}",
                   f"--tile_network_tiles={args.network_tiles}", "--overwrite")
        total_cpu = prep["cpu_s_children"] + seg["cpu_s_children"]
        print(json.dumps({"rows": rows, "side_um": round(side), "cells": cells, "preprocess": prep, "segment": seg,
                          "wall_s": round(prep["wall_s"] + seg["wall_s"], 1), "cpu_s": round(total_cpu, 1),
                          "cpu_us_per_transcript": round(1e6 * total_cpu / rows, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
