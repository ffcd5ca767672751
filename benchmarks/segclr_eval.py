"""Evaluation of the SegCLR-style embeddings and the SNGP classifier on a simulated section (docs/SEGCLR.md §2.11).

Usage (measured 3-6 minutes for a 1024 x 1024 section with torch on one thread of a shared 2-core CPU)::

    python benchmarks/segclr_eval.py --size 1024 --out /tmp/segclr_eval

What it measures, on one simulated section whose segmentation is the true cell masks:

1. **Linear probe** (logistic regression, 5-fold cross-validation grouped by 128-px spatial blocks): macro-F1 of the
   per-cell embeddings against the true types, versus the per-cell count vector (log1p counts) and the same encoder
   untrained; plus [counts | embedding]. In the ``confusable`` variant (default) the two types whose cells differ
   most in size are given the same expression profile (every spot of the second type re-drawn from the first type's
   gene probabilities), so only shape / size / layout can tell them apart; their pairwise F1 is reported too.
2. **OOD, leave-one-type-out**: the classifier is trained on the other types (spatial train / validation / test
   blocks), the threshold is the 95th percentile of the validation uncertainty, and the test set mixes the
   in-distribution test cells with as many cells of the held-out type. AUROC of the SNGP Dempster-Shafer
   uncertainty, of the SNGP variance, of SNGP 1 - max probability, of a plain MLP's 1 - max softmax and of the
   Mahalanobis distance, on the embeddings and on the count vectors; the share of held-out cells flagged at the
   threshold of the default OOD score (the GP variance).
3. **Merges**: pairs of touching cells of different types in the test blocks are merged in the instance mask and
   re-embedded with the trained encoder; AUROC of "merged versus intact" from the SNGP scores (classifier
   trained on all types in the training blocks) and from the point-embedding coherence.

Results and their reading: ``docs/SEGCLR_RESULTS.md``.

Prints a markdown report and writes ``<out>/segclr_eval.json``, ``<out>/segclr_eval.md`` and PCA figures under
``<out>/figures/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segjointgene.classify import (auroc, fit_sngp, linear_probe_f1, mahalanobis_score, predict,  # noqa: E402
                                   spatial_blocks, spatial_split)
from segjointgene.classify.run import ood_score  # noqa: E402
from segjointgene.config import ClassifyConfig, EmbedConfig, SimulateConfig  # noqa: E402
from segjointgene.embed import (SectionInputs, cell_pixels, compute_embeddings, embed_section,  # noqa: E402
                                make_encoder)
from segjointgene.embed.figures import plot_embedding  # noqa: E402
from segjointgene.evaluate.simulate import simulate_section  # noqa: E402

log = logging.getLogger("segclr_eval")


# ------------------------------------------------------------------------------------------------ the section
def make_section(size: int, seed: int, variant: str):
    """Simulate a section; in the ``confusable`` variant give two types the same expression (module docstring)."""
    sim = simulate_section(SimulateConfig(size_px=size), rng=seed)
    spots, cells = sim.spots.copy(), sim.cells.copy()
    pair = None
    if variant == "confusable":
        area = cells.groupby("celltype")["area_px"].mean().sort_values()
        a, b = area.index[-1], area.index[0]  # largest and smallest: the same profile, different size
        genes = sorted(sim.markers["gene"].unique())
        probs = sim.markers.pivot(index="celltype", columns="gene", values="rate").loc[a, genes].to_numpy()
        rng = np.random.default_rng(seed + 1)
        sel = (spots["celltype"] == b).to_numpy()
        spots.loc[sel, "gene"] = np.asarray(genes, dtype=object)[rng.choice(len(genes), int(sel.sum()),
                                                                            p=probs / probs.sum())]
        pair = (str(a), str(b))
    return sim, spots, cells, pair


def section_inputs(instance, spots, sim) -> tuple[SectionInputs, list[str]]:
    genes = sorted(spots["gene"].unique())
    gi = {g: i for i, g in enumerate(genes)}
    return SectionInputs.from_arrays(instance, spots["gene"].map(gi).to_numpy(), spots["x"], spots["y"], genes,
                                     dapi=sim.dapi, nuclei=sim.nuclei), genes


def merge_pairs(instance: np.ndarray, type_of: dict[int, str], allowed: set[int], n_max: int,
                rng: np.random.Generator, min_contact: int = 5) -> list[tuple[int, int]]:
    """Disjoint pairs of touching cells of different types (both in ``allowed``), at most ``n_max``."""
    pairs = []
    for a, b in ((instance[:, :-1], instance[:, 1:]), (instance[:-1, :], instance[1:, :])):
        m = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([np.minimum(a[m], b[m]), np.maximum(a[m], b[m])], 1))
    p, counts = np.unique(np.concatenate(pairs).astype(np.int64), axis=0, return_counts=True)
    p = p[counts >= min_contact]
    ok = [(int(i), int(j)) for i, j in p.tolist() if i in allowed and j in allowed and type_of[i] != type_of[j]]
    used, out = set(), []
    for k in rng.permutation(len(ok)):
        i, j = ok[k]
        if i in used or j in used:
            continue
        used |= {i, j}
        out.append((i, j))
        if len(out) >= n_max:
            break
    return out


# ------------------------------------------------------------------------------------------------ helpers
def log1p_counts(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts).astype(np.float32)


def pair_f1(y: np.ndarray, pred: np.ndarray, pair: tuple[str, str]) -> float:
    from sklearn.metrics import f1_score

    sel = np.isin(y, pair)
    return float(f1_score(y[sel], pred[sel], labels=list(pair), average="macro"))


def ood_one_type(x: np.ndarray, y: np.ndarray, xy: np.ndarray, held: str, cfg: ClassifyConfig, seed: int,
                 block: float) -> dict:
    """Leave ``held`` out of training; score ID test cells against as many held-out cells."""
    rng = np.random.default_rng(seed)
    idc = np.flatnonzero(y != held)
    test = spatial_split(xy[idc], 0.2, block, rng)
    dev = idc[~test]
    val_in_dev = spatial_split(xy[dev], 0.25, block, rng)
    tr, va, te = dev[~val_in_dev], dev[val_in_dev], idc[test]
    va = va[np.isin(y[va], np.unique(y[tr]))]
    ood = np.flatnonzero(y == held)
    ood = rng.choice(ood, min(len(ood), len(te)), replace=False)
    out = {"held_out": held, "n_train": len(tr), "n_val": len(va), "n_id_test": len(te), "n_ood": len(ood)}
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    sngp = fit_sngp(x[tr], y[tr], x[va], y[va], cfg, generator=gen(), rng=seed)
    p_va, p_te, p_ood = predict(sngp, x[va]), predict(sngp, x[te]), predict(sngp, x[ood])
    s_va, s_te, s_ood = (ood_score(p, cfg.ood_score) for p in (p_va, p_te, p_ood))
    t = float(np.quantile(s_va, 0.95))
    out["sngp_ds_auroc"] = auroc(p_te.uncertainty, p_ood.uncertainty)
    out["sngp_maxprob_auroc"] = auroc(1 - p_te.probability, 1 - p_ood.probability)
    out["sngp_var_auroc"] = auroc(p_te.variance, p_ood.variance)
    out["ood_flagged"] = float(np.mean(s_ood > t))
    out["id_kept"] = float(np.mean(s_te <= t))
    out["id_accuracy"] = float(np.mean(p_te.label == y[te]))
    plain_cfg = dataclasses.replace(cfg, spec_norm_bound=0.0, gp_features=0)
    plain = fit_sngp(x[tr], y[tr], x[va], y[va], plain_cfg, generator=gen(), rng=seed)
    q_te, q_ood = predict(plain, x[te]), predict(plain, x[ood])
    out["mlp_maxsoftmax_auroc"] = auroc(1 - q_te.probability, 1 - q_ood.probability)
    out["mahalanobis_auroc"] = auroc(mahalanobis_score(x[tr], y[tr], x[te]), mahalanobis_score(x[tr], y[tr], x[ood]))
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=("confusable", "standard"), default="confusable")
    ap.add_argument("--steps", type=int, default=EmbedConfig.steps, help="contrastive training steps")
    ap.add_argument("--batch", type=int, default=EmbedConfig.batch_size, help="pairs per step")
    ap.add_argument("--lr", type=float, default=EmbedConfig.lr)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--input_px", type=int, default=32)
    ap.add_argument("--mask_mode", default="masked+channel")
    ap.add_argument("--max_points", type=int, default=4, help="export points per cell")
    ap.add_argument("--n_merges", type=int, default=80)
    ap.add_argument("--ood_types", type=int, default=0, help="held-out types to rotate over (0 = all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest when the cores are shared)")
    ap.add_argument("--out", default="/tmp/segclr_eval")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    sim, spots, cells, pair = make_section(args.size, args.seed, args.variant)
    inputs, genes = section_inputs(sim.instance, spots, sim)
    timings["simulate_s"] = time.perf_counter() - t
    cfg = EmbedConfig(preset=args.preset, steps=args.steps, batch_size=args.batch, lr=args.lr, input_px=args.input_px,
                      mask_mode=args.mask_mode, max_points=args.max_points)
    t = time.perf_counter()
    run = embed_section(inputs, cfg, seed=args.seed)
    timings["train_and_embed_s"] = time.perf_counter() - t
    emb = run.embeddings
    t = time.perf_counter()
    untrained = make_encoder(run.builder, cfg, generator=torch.Generator().manual_seed(args.seed)).eval()
    emb_random = compute_embeddings(untrained, run.builder, cfg, rng=args.seed)
    timings["untrained_embed_s"] = time.perf_counter() - t

    ids = emb.cells["cell"].to_numpy()
    truth = cells.set_index("cell").loc[ids]
    y = truth["celltype"].to_numpy().astype(str)
    xy = emb.cells[["x", "y"]].to_numpy()
    block = 128.0
    groups = spatial_blocks(xy, block)
    feats = {"segclr": emb.cell_emb, "untrained encoder": emb_random.cell_emb,
             "counts (log1p)": log1p_counts(emb.counts),
             "counts | segclr": np.hstack([log1p_counts(emb.counts), emb.cell_emb])}

    # 1. linear probe
    t = time.perf_counter()
    probe = {}
    for name, x in feats.items():
        f1, sd, pred = linear_probe_f1(x, y, groups)
        probe[name] = {"macro_f1": f1, "sd": sd}
        if pair:
            probe[name]["pair_f1"] = pair_f1(y, pred, pair)
    timings["probe_s"] = time.perf_counter() - t

    # 2. OOD, leave one type out
    t = time.perf_counter()
    ccfg = ClassifyConfig(epochs=150, patience=15)
    types = sorted(set(y))
    if args.ood_types:
        types = types[:args.ood_types]
    ood = {}
    for name in ("segclr", "counts (log1p)"):
        rows = [ood_one_type(feats[name], y, xy, held, ccfg, args.seed, block) for held in types]
        ood[name] = rows
    timings["ood_s"] = time.perf_counter() - t

    # 3. merges
    t = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    test_blocks = spatial_split(xy, 0.3, block, rng)
    type_of = dict(zip(ids.tolist(), y.tolist()))
    pairs = merge_pairs(sim.instance, type_of, set(ids[test_blocks].tolist()), args.n_merges, rng)
    merged = sim.instance.copy()
    relabel = np.arange(int(merged.max()) + 1, dtype=merged.dtype)
    for i, j in pairs:
        relabel[j] = i
    merged = relabel[merged]
    m_inputs, _ = section_inputs(merged, spots, sim)
    from segjointgene.embed import CropBuilder

    m_builder = CropBuilder(m_inputs, run.builder.stats, crop_px=run.builder.crop_px, input_px=run.builder.input_px,
                            mask_mode=cfg.mask_mode, blur_sigma_px=cfg.blur_sigma_px)
    m_pixels = cell_pixels(merged)
    keep = np.isin(m_pixels.ids, [i for i, _ in pairs])
    m_emb = compute_embeddings(run.model, m_builder, cfg, rng=args.seed, pixels=m_pixels.subset(keep))
    involved = set(i for p in pairs for i in p)
    intact = test_blocks & ~np.isin(ids, list(involved))
    train_cells = ~test_blocks
    val_in = spatial_split(xy[train_cells], 0.25, block, rng)
    tr, va = np.flatnonzero(train_cells)[~val_in], np.flatnonzero(train_cells)[val_in]
    merges = {"n_pairs": len(pairs), "n_intact": int(intact.sum())}
    for name, x_all, x_m in (("segclr", emb.cell_emb, m_emb.cell_emb),
                             ("counts (log1p)", log1p_counts(emb.counts), log1p_counts(m_emb.counts))):
        fitted = fit_sngp(x_all[tr], y[tr], x_all[va], y[va], ccfg, generator=torch.Generator().manual_seed(args.seed),
                          rng=args.seed)
        p_int, p_m = predict(fitted, x_all[intact]), predict(fitted, x_m)
        thr = float(np.quantile(ood_score(predict(fitted, x_all[va]), ccfg.ood_score), 0.95))
        merges[name] = {"sngp_ds_auroc": auroc(p_int.uncertainty, p_m.uncertainty),
                        "sngp_maxprob_auroc": auroc(1 - p_int.probability, 1 - p_m.probability),
                        "sngp_var_auroc": auroc(p_int.variance, p_m.variance),
                        "merged_flagged": float(np.mean(ood_score(p_m, ccfg.ood_score) > thr)),
                        "intact_flagged": float(np.mean(ood_score(p_int, ccfg.ood_score) > thr))}
    coh_int = emb.cells["coherence"].to_numpy()[intact]
    coh_m = m_emb.cells["coherence"].to_numpy()
    ok_i, ok_m = np.isfinite(coh_int), np.isfinite(coh_m)
    merges["segclr"]["coherence_auroc"] = auroc(-coh_int[ok_i], -coh_m[ok_m])
    timings["merge_s"] = time.perf_counter() - t

    np.savez_compressed(out / "embeddings.npz", cell=ids, y=y, xy=xy, segclr=emb.cell_emb,
                        untrained=emb_random.cell_emb,
                        counts=emb.counts, merged_segclr=m_emb.cell_emb, merged_counts=m_emb.counts,
                        merged_coherence=coh_m, intact=intact, train=np.isin(np.arange(len(ids)), tr),
                        val=np.isin(np.arange(len(ids)), va), coherence=emb.cells["coherence"].to_numpy())

    # figures
    plot_embedding(emb.cell_emb, y, out / "figures" / "segclr_pca_true_types.png",
                   title=f"SegCLR embeddings ({args.variant})")
    plot_embedding(emb_random.cell_emb, y, out / "figures" / "untrained_pca_true_types.png",
                   title="untrained encoder")
    plot_embedding(log1p_counts(emb.counts), y, out / "figures" / "counts_pca_true_types.png",
                   title="log1p count vectors")
    timings["total_s"] = time.perf_counter() - t_all

    result = {"args": vars(args), "n_cells": len(ids), "n_points": len(emb.points), "n_genes": len(genes),
              "types": sorted(set(y)), "confusable_pair": pair, "crop_px": run.builder.crop_px,
              "in_channels": run.builder.in_channels, "train_log_last": run.train_log.iloc[-1].to_dict(),
              "probe": probe, "ood": ood, "merges": merges, "timings": timings,
              "torch_threads": torch.get_num_threads()}
    (out / "segclr_eval.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    md = report(result)
    (out / "segclr_eval.md").write_text(md)
    print(md)
    return 0


def report(r: dict) -> str:
    a = r["args"]
    lines = [f"Section {a['size']}² px ({a['variant']} variant, seed {a['seed']}): {r['n_cells']} cells, "
             f"{r['n_genes']} genes, types {', '.join(r['types'])}"
             + (f"; confusable pair {r['confusable_pair'][0]} / {r['confusable_pair'][1]} (same expression, "
                f"different size)" if r["confusable_pair"] else "") + ".",
             f"Encoder: {a['preset']}, {a['steps']} steps x {a['batch']} pairs, crop {r['crop_px']} px -> "
             f"{a['input_px']}, {r['in_channels']} channels, {a['mask_mode']}; last-step loss "
             f"{r['train_log_last']['loss']:.3f}, top-1 {r['train_log_last']['top1']:.2f}. "
             f"{r['n_points']} export points.", "",
             "**Linear probe** (logistic regression, 5-fold CV grouped by 128-px blocks), macro-F1 vs true types:", "",
             "| features | macro-F1 | sd |" + (" F1 confusable pair |" if r["confusable_pair"] else ""),
             "|---|---|---|" + ("---|" if r["confusable_pair"] else "")]
    for name, v in r["probe"].items():
        lines.append(f"| {name} | {v['macro_f1']:.3f} | {v['sd']:.3f} |"
                     + (f" {v['pair_f1']:.3f} |" if "pair_f1" in v else ""))
    lines += ["", "**OOD, leave one type out** (AUROC, mean ± sd over held-out types; ID test cells vs as many "
              "held-out cells):", "",
              "| features | SNGP DS uncertainty | SNGP 1-max prob | SNGP variance | plain MLP 1-max softmax | "
              "Mahalanobis | held-out flagged at t95 (variance) | ID kept | ID accuracy |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in r["ood"].items():
        df = pd.DataFrame(rows)
        f = lambda c: f"{df[c].mean():.3f} ± {df[c].std():.3f}"  # noqa: E731
        lines.append(f"| {name} | {f('sngp_ds_auroc')} | {f('sngp_maxprob_auroc')} | {f('sngp_var_auroc')} | "
                     f"{f('mlp_maxsoftmax_auroc')} | {f('mahalanobis_auroc')} | {df['ood_flagged'].mean():.2f} | "
                     f"{df['id_kept'].mean():.2f} | {df['id_accuracy'].mean():.3f} |")
    lines += ["", "Per held-out type (SegCLR embeddings, SNGP DS AUROC): "
              + ", ".join(f"{row['held_out']} {row['sngp_ds_auroc']:.3f}" for row in r["ood"]["segclr"]), ""]
    m = r["merges"]
    lines += [f"**Merged cell pairs** ({m['n_pairs']} merges of touching cells of different types vs "
              f"{m['n_intact']} intact test cells), AUROC of merged vs intact:", "",
              "| features | SNGP DS uncertainty | SNGP 1-max prob | SNGP variance | merged flagged at t95 (variance) | "
              "intact flagged | point coherence |", "|---|---|---|---|---|---|---|"]
    for name in ("segclr", "counts (log1p)"):
        v = m[name]
        lines.append(f"| {name} | {v['sngp_ds_auroc']:.3f} | {v['sngp_maxprob_auroc']:.3f} | "
                     f"{v['sngp_var_auroc']:.3f} | "
                     f"{v['merged_flagged']:.2f} | {v['intact_flagged']:.2f} | "
                     + (f"{v['coherence_auroc']:.3f} |" if "coherence_auroc" in v else "- |"))
    t = r["timings"]
    lines += ["", "Timings (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items())
              + f" ({r['torch_threads']} torch threads)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
