"""CPU time and spot accuracy of the pixel partition (:func:`refine_partition`) on a hard simulated section.

Fits the spot model alone (true nuclei), refines its territories and prints the partition's CPU seconds, sweeps and
spot accuracy. For a before / after, run it from two checkouts (``git worktree add /tmp/old <commit>``) in one go:

    for r in /tmp/old .; do python $r/benchmarks/bench_partition.py --mode dense --size 768; done
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fitted_hard_section  # noqa: E402
from segjointgene.methods.spotmodel.partition import refine_partition  # noqa: E402
from segjointgene.methods.spotmodel.model import territories  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="dense", choices=("dense", "sparse"))
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sec = fitted_hard_section(args.mode, args.noise, args.seed, args.size)
    sim, x, y, gene, true, fit = sec.sim, sec.x, sec.y, sec.gene, sec.true, sec.fit
    start = np.where(sim.nuclei > 0, sim.nuclei, territories(fit.model, sim.nuclei.shape)).astype(np.int64)
    t0 = time.process_time()
    part = refine_partition(start, sim.nuclei > 0, fit.model, x, y, gene)
    cpu = time.process_time() - t0
    emitted = true > 0
    acc = lambda cell: float((cell[emitted] == true[emitted]).mean())  # noqa: E731
    print(f"{Path(__file__).resolve().parents[1]}: {args.mode} {args.size} px, {x.size} spots: partition "
          f"{cpu:.2f} s CPU, {part.n_sweeps} sweeps, spot accuracy {acc(part.cell):.4f} (spot model {acc(fit.cell):.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
