"""How good can a cell's mask be from its spots? The F1@0.75 ceiling of the spot model (issue 12).

For hard simulated sections (in memory, the true nuclei) this fits the spot model alone (no network) and scores
four sets of masks against the true cells, all but the partition drawn by :func:`territories` (a uniform ellipse
of the cell's second moment):

- ``fitted``: the model's cells (its masks, with the nuclei as cores);
- ``partition``: those masks refined into a pixel partition (:func:`refine_partition`, the pipeline's default; its
  spots take their pixel's cell);
- ``oracle spots``: every cell re-estimated once from the spots it truly emitted (the model's own M-step and
  priors, i.e. what the model would reach if it assigned every spot right);
- ``true moments``: the second moment of each true cell's mask (the best any ellipse of the right size can do).

It also prints where the wrongly assigned cell spots lie: the fraction within 1 and 2 px of their true cell's
boundary. ``--density`` multiplies the simulator's spots per pixel (0.03: ~11 spots per cell), to see how the
ceiling moves with the spots measured per cell.

    python benchmarks/mask_ceiling.py --seeds 0 1 --density 1 3 10
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fitted_hard_section  # noqa: E402
from segjointgene.evaluate import metrics as M  # noqa: E402
from segjointgene.methods.spotmodel import model as S  # noqa: E402
from segjointgene.methods.spotmodel.partition import refine_partition  # noqa: E402


def true_moments(instance: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, 2) centroid and (m, 2, 2) second moment of each true cell's pixels (pixel-centre coordinates)."""
    yy, xx = (g + 0.5 for g in np.indices(instance.shape))
    mean = lambda v: np.asarray(ndimage.mean(v, instance, ids))  # noqa: E731
    my, mx = mean(yy), mean(xx)
    vyy, vxx, vxy = mean(yy * yy) - my * my, mean(xx * xx) - mx * mx, mean(yy * xx) - my * mx
    return np.stack([my, mx], 1), np.stack([np.stack([vyy, vxy], -1), np.stack([vxy, vxx], -1)], -2)


def oracle_model(model: S.CellModel, y, x, gene, true_row, nuclei: np.ndarray,
                 config: S.SpotModelConfig) -> S.CellModel:
    """The model's cells re-estimated once (its M-step and priors) from the spots they truly emitted."""
    k = min(config.n_neighbours, len(model.ids))
    cand = cKDTree(model.centre).query(np.stack([y, x], 1), k=k)[1].reshape(y.size, k)
    hit = cand == true_row[:, None]
    resp = np.concatenate([hit, ~hit.any(1, keepdims=True)], 1).astype(np.float64)
    centre, area = S.nucleus_stats(nuclei, model.ids)
    n_types = model.profile.shape[0]
    typical = S._typical_cov(model, n_types, S._relative_log_area(area, model.cls, n_types))
    out = dataclasses.replace(model)
    S._m_step(out, resp, y, x, gene, cand, centre, typical, config, None, float(nuclei.size))
    return out


def mask_scores(mask: np.ndarray, instance: np.ndarray) -> tuple[float, float, float]:
    match = M.match_instances(M.instance_overlap(mask.astype(np.int64), instance))
    return (M.detection_scores(match, 0.5).f1, M.detection_scores(match, 0.75).f1,
            float(np.median(match.iou)) if match.iou.size else 0.0)


def run(mode: str, noise: float, seed: int, density: float, size: int,
        config: S.SpotModelConfig = S.SpotModelConfig()) -> dict[str, float]:
    sec = fitted_hard_section(mode, noise, seed, size, density, config)
    sim, x, y, gene, true, fit = sec.sim, sec.x, sec.y, sec.gene, sec.true, sec.fit
    ids = sim.cells["cell"].to_numpy(np.int64)
    model, inst = fit.model, sim.instance.astype(np.int64)
    row_of = np.full(int(ids.max()) + 1, -1)
    row_of[model.ids] = np.arange(model.ids.size)
    truth_model = dataclasses.replace(model)
    truth_model.centre, truth_model.cov = true_moments(inst, model.ids)
    fitted = np.where(sim.nuclei > 0, sim.nuclei, S.territories(model, inst.shape))
    part = refine_partition(fitted, sim.nuclei > 0, model, x, y, gene)
    masks = {"fitted": fitted, "partition": part.mask,
             "oracle spots": np.where(sim.nuclei > 0, sim.nuclei, S.territories(
                 oracle_model(model, y, x, gene, row_of[true], sim.nuclei, config), inst.shape)),
             "true moments": S.territories(truth_model, inst.shape)}
    out = {"spots_per_cell": float((true > 0).sum() / ids.size)}
    emitted = true > 0
    out["spot_acc_cell"] = float((fit.cell[emitted] == true[emitted]).mean())
    out["partition: spot_acc_cell"] = float((part.cell[emitted] == true[emitted]).mean())
    # the depth of each spot inside its true cell: distance to the nearest pixel of another label
    edge = find_boundaries(inst, mode="thick")  # both sides of every label change
    iy, ix = (np.clip(v.astype(np.int64), 0, n - 1) for v, n in ((y, inst.shape[0]), (x, inst.shape[1])))
    depth = ndimage.distance_transform_edt(~edge)[iy, ix]  # (a spot may sit on the frame's far edge)
    outside = (true == 0) & (inst[iy, ix] == 0)  # noise spots outside every true cell: left unassigned?
    out["fitted: noise_out"] = float((fit.cell[outside] == 0).mean())
    out["partition: noise_out"] = float((part.cell[outside] == 0).mean())
    wrong = emitted & (fit.cell > 0) & (fit.cell != true)
    out["wrong_cell"] = float(wrong.sum() / emitted.sum())
    for d in (1, 2):
        out[f"wrong_within_{d}px"] = float((depth[wrong] < d).mean()) if wrong.any() else 0.0
    for name, mask in masks.items():
        f05, f075, med = mask_scores(mask, inst)
        out.update({f"{name}: F1@0.5": f05, f"{name}: F1@0.75": f075, f"{name}: median IoU": med})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--noise", nargs="+", type=float, default=[0.1, 0.3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--density", nargs="+", type=float, default=[1.0], help="x the simulator's spot density")
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    rows = []
    for density in args.density:
        for mode in args.modes:
            for noise in args.noise:
                for seed in args.seeds:
                    r = run(mode, noise, seed, density, args.size)
                    rows.append((f"{mode} n{noise:g} s{seed} x{density:g}", r))
                    print(rows[-1][0], {k: round(v, 3) for k, v in r.items()}, flush=True)
    keys = list(rows[0][1])
    print("\n| section | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
