"""A Xenium-sized folder in bounded memory (issue 14).

Writes a synthetic ``transcripts.parquet`` of ``--rows`` transcripts (Xenium's columns, a 300-gene panel plus
control probes, 2 M-row row groups) over a ``--side_um`` square, then, each in a fresh process, times and measures
the peak resident memory of (a) ``segjointgene.io.platforms.read_transcripts_parquet`` (record batches, categorical
genes, integer cell ids) and (b) a plain ``pandas.read_parquet`` of the same columns, for comparison.

With ``--preprocess`` it completes the folder (``cells.parquet``, ``nucleus_boundaries.parquet`` with a 13-vertex
outline per cell, ``experiment.xenium``, a tiled ``morphology_focus/ch0000_dapi.ome.tif`` of the whole frame at
0.2125 um per pixel) and preprocesses it in one process without stored density images (``--store_density
false``: 300 genes x 128 x 128 float32 per patch would be ~20 MB a patch), twice: as the package does (nuclei drawn
from their polygons, the DAPI read a window at a time) and with both frames read whole first (what the readers did
before), for the peak memory side by side.

    python benchmarks/bench_xenium.py --out /tmp/bench_xenium --rows 20000000 --preprocess
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

READERS = {
    "segjointgene (streamed)": (
        "import sys, numpy as np; sys.path.insert(0, {root!r}); from pathlib import Path;"
        "from segjointgene.io.platforms import read_transcripts_parquet as r;"
        "ids = {{f'cell-{{i}}': i + 1 for i in range({cells})}};"
        "t = r(Path({path!r}), gene='feature_name', x='x_location', y='y_location', cell='cell_id', qv='qv',"
        " min_qv=20.0, scale=0.2125, id_of=ids); import resource;"
        "print(len(t), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"),
    "pandas.read_parquet": (
        "import pandas as pd; t = pd.read_parquet({path!r}, columns=['feature_name', 'x_location', 'y_location',"
        " 'cell_id', 'qv']); import resource; print(len(t), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"),
}


PX = 0.2125  # Xenium's um per morphology pixel

#: preprocess of the folder in one process, the frames read lazily (as shipped) or whole first ("dense")
PREPROCESS = (
    "import sys, time, numpy as np; sys.path.insert(0, {root!r}); from segjointgene.io.platforms import read_platform;"
    "from segjointgene.preprocess.pipeline import preprocess_section; from segjointgene.config import PreprocessConfig;"
    "import dataclasses, resource; t0 = time.perf_counter();"
    "sec = read_platform({folder!r}, n_celltypes=8); t1 = time.perf_counter();"
    "sec = dataclasses.replace(sec, nuclei=np.asarray(sec.nuclei), dapi=np.asarray(sec.dapi)) if {dense} else sec;"
    "m = preprocess_section(sec, {data!r}, PreprocessConfig(store_density=False), overwrite=True, progress=False);"
    "print(m.n_patches, round(t1 - t0, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def write_folder(folder: Path, cells: int, side_um: float, seed: int = 1) -> None:
    """cells.parquet, nucleus_boundaries.parquet, experiment.xenium and the DAPI of a ``side_um`` square."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tifffile

    rng = np.random.default_rng(seed)
    ids = np.char.add("cell-", np.arange(cells).astype(str))
    cx, cy = rng.uniform(5, side_um - 5, cells), rng.uniform(5, side_um - 5, cells)
    pq.write_table(pa.table({"cell_id": ids, "x_centroid": cx, "y_centroid": cy}), folder / "cells.parquet")
    angle = np.linspace(0, 2 * np.pi, 13, endpoint=False)
    radius = rng.uniform(2.5, 3.5, (cells, 1)) * rng.uniform(0.85, 1.15, (cells, 13))
    pq.write_table(pa.table({"cell_id": np.repeat(ids, 13),
                             "vertex_x": (cx[:, None] + radius * np.cos(angle)).ravel().astype(np.float32),
                             "vertex_y": (cy[:, None] + radius * np.sin(angle)).ravel().astype(np.float32)}),
                   folder / "nucleus_boundaries.parquet")
    (folder / "experiment.xenium").write_text(json.dumps({"pixel_size": PX}))
    side = int(np.ceil(side_um / PX))
    (folder / "morphology_focus").mkdir(exist_ok=True)
    with tifffile.TiffWriter(folder / "morphology_focus" / "ch0000_dapi.ome.tif", bigtiff=True, ome=True) as tif:
        def tiles():  # 512-px tiles of a dim background with bright discs at the cell centres
            from skimage.draw import disk

            for r in range(0, side, 512):
                for c in range(0, side, 512):
                    tile = rng.integers(90, 110, (512, 512)).astype(np.uint16)
                    near = (cy / PX >= r - 20) & (cy / PX < r + 532) & (cx / PX >= c - 20) & (cx / PX < c + 532)
                    for y, x in zip(cy[near] / PX - r, cx[near] / PX - c):
                        tile[disk((y, x), 12, shape=tile.shape)] = 2000
                    yield tile
        tif.write(tiles(), shape=(side, side), dtype=np.uint16, tile=(512, 512), compression="zlib")


def write_table(path: Path, rows: int, cells: int, seed: int = 0, side_um: float = 10_000.0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    genes = np.array([f"Gene{i:03d}" for i in range(300)] + [f"NegControlProbe_{i:05d}" for i in range(20)])
    chunk = 2_000_000
    with pq.ParquetWriter(path, pa.schema([("transcript_id", pa.uint64()), ("cell_id", pa.string()),
                                           ("feature_name", pa.string()), ("x_location", pa.float32()),
                                           ("y_location", pa.float32()), ("qv", pa.float32())])) as writer:
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            cell = rng.integers(-cells // 4, cells, n)  # a quarter unassigned
            writer.write_table(pa.table({
                "transcript_id": np.arange(start, start + n, dtype=np.uint64),
                "cell_id": np.where(cell >= 0, np.char.add("cell-", cell.astype(str)), "UNASSIGNED"),
                "feature_name": genes[rng.integers(0, genes.size, n)],
                "x_location": rng.uniform(0, side_um, n).astype(np.float32),
                "y_location": rng.uniform(0, side_um, n).astype(np.float32),
                "qv": rng.uniform(5, 40, n).astype(np.float32)}))


def measure(name: str, code: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    first, *rest, maxrss_kib = out.split()
    return {"run": name, "result": int(first), **({"read_s": float(rest[0])} if rest else {}), "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_mib": round(int(maxrss_kib) / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--side_um", type=float, default=10_000.0, help="edge of the square the transcripts cover")
    parser.add_argument("--preprocess", action="store_true", help="also write the rest of the folder and preprocess it")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "transcripts.parquet"
    if not path.is_file():
        t0 = time.perf_counter()
        write_table(path, args.rows, args.cells, side_um=args.side_um)
        print(json.dumps({"wrote": str(path), "rows": args.rows, "mib": round(path.stat().st_size / 2**20),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    for name, code in READERS.items():
        print(json.dumps(measure(name, code.format(root=str(ROOT), path=str(path), cells=args.cells))), flush=True)
    if args.preprocess:
        if not (args.out / "cells.parquet").is_file():
            t0 = time.perf_counter()
            write_folder(args.out, args.cells, args.side_um)
            print(json.dumps({"wrote": "the rest of the folder", "seconds": round(time.perf_counter() - t0, 1)}))
        for dense in (False, True):
            code = PREPROCESS.format(root=str(ROOT), folder=str(args.out), data=str(args.out / "dataset"), dense=dense)
            print(json.dumps(measure("preprocess, frames read whole first" if dense else "preprocess (as shipped)",
                                     code)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
