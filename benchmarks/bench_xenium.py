"""Reading a Xenium-sized transcript table in bounded memory (issue 14).

Writes a synthetic ``transcripts.parquet`` of ``--rows`` transcripts (Xenium's columns, a 300-gene panel plus
control probes, 2 M-row row groups), then, each in a fresh process, times and measures the peak resident memory of
(a) ``segjointgene.platforms.read_transcripts_parquet`` (record batches, categorical genes, integer cell ids) and
(b) a plain ``pandas.read_parquet`` of the same columns, for comparison.

    python benchmarks/bench_xenium.py --out /tmp/bench_xenium --rows 20000000
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
        "from segjointgene.platforms import read_transcripts_parquet as r;"
        "ids = {{f'cell-{{i}}': i + 1 for i in range({cells})}};"
        "t = r(Path({path!r}), gene='feature_name', x='x_location', y='y_location', cell='cell_id', qv='qv',"
        " min_qv=20.0, scale=0.2125, id_of=ids); import resource;"
        "print(len(t), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"),
    "pandas.read_parquet": (
        "import pandas as pd; t = pd.read_parquet({path!r}, columns=['feature_name', 'x_location', 'y_location',"
        " 'cell_id', 'qv']); import resource; print(len(t), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"),
}


def write_table(path: Path, rows: int, cells: int, seed: int = 0) -> None:
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
                "x_location": rng.uniform(0, 10_000, n).astype(np.float32),
                "y_location": rng.uniform(0, 10_000, n).astype(np.float32),
                "qv": rng.uniform(5, 40, n).astype(np.float32)}))


def measure(name: str, code: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows, maxrss_kib = (int(v) for v in out.split())
    return {"reader": name, "rows_kept": rows, "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "peak_rss_mib": round(maxrss_kib / 1024)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--cells", type=int, default=100_000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "transcripts.parquet"
    if not path.is_file():
        t0 = time.perf_counter()
        write_table(path, args.rows, args.cells)
        print(json.dumps({"wrote": str(path), "rows": args.rows, "mib": round(path.stat().st_size / 2**20),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    for name, code in READERS.items():
        print(json.dumps(measure(name, code.format(root=str(ROOT), path=str(path), cells=args.cells))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
