"""The tile network (issue 29): tiled runs with and without the network trained on a sample of tiles, scored against
the truth of hard simulated sections, with their wall time.

For each seed: ``simulate --sim_preset hard`` (``--size`` px), ``preprocess`` (patches of 64 px), then ``segment``
with ``--tile_network_tiles 0`` (the engine alone) and with ``--tile_network_tiles N`` (the network trained once
on N tiles, its evidence in every tile's spot model), tiles of ``--tile_px``. Scores: spot accuracy (all spots),
F1 of cells matched at IoU 0.5 / 0.75, gene mIoU, from ``spots_assigned.csv`` and ``instance_mask.tif``.

    python benchmarks/bench_tilenet.py --out /tmp/bench_tilenet --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segjointgene.cli import main as cli  # noqa: E402
from segjointgene.evaluate.scoring import Spots, load_truth, score_segmentation  # noqa: E402
from segjointgene.io.files import load_npz  # noqa: E402
from segjointgene.io.metadata import load_metadata  # noqa: E402

KEEP = ["spot_acc", "F1@0.5", "F1@0.75", "gene_mIoU"]


def score(work: Path, name: str, run: str) -> dict[str, float]:
    data = work / "data" / name
    meta = load_metadata(data)
    spots = load_npz(data / "spots.npz", ("gene", "x", "y", "row_in_file"))
    truth = load_truth(Path(meta.raw_dir + "_truth"), shape=meta.raw_shape, celltypes=list(meta.celltypes),
                       rows_in_file=spots["row_in_file"])
    out = work / "checkpoints" / name / run / "results"
    assigned = pd.read_csv(out / "spots_assigned.csv")
    row = score_segmentation(tifffile.imread(out / "instance_mask.tif"), tifffile.imread(out / "celltype_mask.tif"),
                             Spots(spots["x"], spots["y"], spots["gene"], tuple(meta.genes)), truth=truth,
                             n_classes=meta.n_classes, spot_cell=assigned["cell"].to_numpy(np.int64))
    return {k: round(float(row[k]), 4) for k in KEEP if k in row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tile_px", type=int, default=256)
    parser.add_argument("--network_tiles", type=int, default=2)
    parser.add_argument("--extra", nargs="*", default=[], help="more flags for segment (e.g. --net_epoch=10)")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        name = f"s{seed}"
        common = [f"--work_dir={args.out}", f"--datasets_name={name}", "--quiet"]
        if not (args.out / "data" / name).is_dir():
            assert cli(["--step_name=simulate", f"--sim_size={args.size}", "--sim_preset=hard",
                        f"--random_seed={seed}", *common]) == 0
            assert cli(["--step_name=preprocess", "--patch_size=64", *common]) == 0
        for n in (0, args.network_tiles):
            run = f"net{n}"
            t0 = time.perf_counter()
            assert cli(["--step_name=segment", f"--net_sub_suffix={run}", f"--tile_px={args.tile_px}",
                        f"--tile_network_tiles={n}", "--dask_workers=2", "--overwrite", *args.extra, *common]) == 0
            rows.append({"seed": seed, "network_tiles": n, "wall_s": round(time.perf_counter() - t0, 1),
                         **score(args.out, name, run)})
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    print(table.groupby("network_tiles")[["wall_s", *KEEP]].mean().round(4).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
