"""Is the pixel partition limited by its energy or by its optimiser? (issue 12)

For hard simulated sections (in memory, the true nuclei, the spot model alone) this runs :func:`refine_partition`
from two starts - the fitted territories (what the pipeline does) and the *true* cells (nuclei kept) - at the
default shape weight and without the shape prior, and prints for each the spot accuracy, noise left out, gene mIoU,
F1@0.75 and the partition's energy, split into its spot term (the spots' Poisson log-likelihood with each region's
rate at its maximum-likelihood value and the type profiles), the smoothness term and the shape term.

If the partition found from the truth has a lower energy than the one found from the fitted start, iterated
conditional modes stops short of a better optimum (the optimiser limits); if higher, the energy itself prefers
what the pipeline finds (the model limits). The energy here is the partition's up to two simplifications (type
profiles instead of each cell's own profile, rates without their pseudo-spot), the same for every row.

    python benchmarks/partition_start.py --seeds 10 11      # 8 sections x 4 runs
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fitted_hard_section  # noqa: E402
from segjointgene.evaluate import metrics as M  # noqa: E402
from segjointgene.methods.spotmodel import model as S  # noqa: E402
from segjointgene.methods.spotmodel.partition import _EDGE2, PartitionConfig, refine_partition  # noqa: E402


def energy_terms(mask: np.ndarray, model: S.CellModel, x: np.ndarray, y: np.ndarray, gene: np.ndarray,
                 config: PartitionConfig) -> dict[str, float]:
    """The partition energy of ``mask`` (cell ids of ``model``, 0 = background): spot, smoothness and shape terms."""
    row_of = np.zeros(int(max(mask.max(), model.ids.max())) + 1, np.int64)
    row_of[model.ids] = np.arange(1, model.ids.size + 1)
    lab = row_of[mask]
    spot = lab[np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)]
    area = np.bincount(lab.ravel(), minlength=model.ids.size + 1).astype(np.float64)
    n = np.bincount(spot, minlength=model.ids.size + 1).astype(np.float64)
    rate = n / np.maximum(area, 1.0)
    rate[0] = max(n[0] / max(model.tissue_px - area[1:].sum(), 1.0), 1e-6)
    bg = np.bincount(gene[spot == 0], minlength=model.profile.shape[1]) + 1.0
    cls = np.concatenate([[0], model.cls])
    q = np.where(spot > 0, model.profile[cls[spot], gene], (bg / bg.sum())[gene])
    # Poisson process: -sum log(rate q) + the expected count (each region's rate x area = its spots)
    e_spot = float(-np.log(np.maximum(rate[spot], 1e-12) * q).sum() + n.sum())
    pairs = ((lab[1:], lab[:-1]), (lab[:, 1:], lab[:, :-1]), (lab[1:, 1:], lab[:-1, :-1]), (lab[1:, :-1], lab[:-1, 1:]))
    unlike = sum(int((a != b).sum()) for a, b in pairs)
    r, c = np.nonzero(lab > 0)
    m2 = S.ellipse_distance2(model, lab[r, c] - 1, r + 0.5, c + 0.5)
    out = {"E spots": e_spot, "E smoothness": config.smoothness * unlike,
           "E shape": config.shape_weight * float(((m2 - _EDGE2) / _EDGE2).sum())}
    return {**out, "E total": sum(out.values())}


def run(mode: str, noise: float, seed: int, size: int = 512) -> dict[str, dict[str, float]]:
    """Scores and energy of the partition from the fitted and from the true start, shape prior on and off."""
    sec = fitted_hard_section(mode, noise, seed, size)
    sim, x, y, gene, true, fit = sec.sim, sec.x, sec.y, sec.gene, sec.true, sec.fit
    inst, fixed = sim.instance.astype(np.int64), sim.nuclei > 0
    truth_at_spot, emitted = M.cells_at_spots(inst, x, y), true > 0
    starts = {"fitted": np.where(fixed, sim.nuclei, S.territories(fit.model, inst.shape)),
              "truth": np.where(fixed, sim.nuclei, inst)}
    out = {}
    for shape in (PartitionConfig().shape_weight, 0.0):
        config = dataclasses.replace(PartitionConfig(), shape_weight=shape)
        for name, start in starts.items():
            part = refine_partition(start, fixed, fit.model, x, y, gene, config=config)
            match = M.match_instances(M.instance_overlap(part.mask, inst))
            row = {"spot acc": float((part.cell[emitted] == true[emitted]).mean()),
                   "noise out": M.noise_left_out(part.cell, true, truth_at_spot),
                   "gene mIoU": M.gene_miou(M.cells_at_spots(part.mask, x, y), truth_at_spot, match).mean,
                   "F1@0.75": M.detection_scores(match, 0.75).f1}
            row.update(energy_terms(part.mask, fit.model, x, y, gene, config))
            out[f"shape {shape:g}, from {name}"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--noise", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[10, 11])
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for mode in args.modes:
        for noise in args.noise:
            for seed in args.seeds:
                for name, row in run(mode, noise, seed, args.size).items():
                    rows.setdefault((mode, name), []).append(row)
                    print(f"{mode} n{noise:g} s{seed} {name}", {k: round(v, 3) for k, v in row.items()}, flush=True)
    keys = list(next(iter(rows.values()))[0])
    print(f"\nmean over {len(args.noise) * len(args.seeds)} sections per tissue")
    print("| tissue, start | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for (mode, name), rs in rows.items():
        mean = {k: float(np.mean([r[k] for r in rs])) for k in keys}
        print(f"| {mode}, {name} | " + " | ".join(f"{v:.0f}" if k.startswith("E ") else f"{v:.3f}"
                                                   for k, v in mean.items()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
