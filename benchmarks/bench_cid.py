"""CID cost per batch and the ratio CID-seconds / train-step-seconds, with and without the speed-ups.

    python benchmarks/bench_cid.py --data /tmp/sjg_bench/data/CA1 --threads 1        # CA1, width 64, batch 8

The batch: ``--batch`` patches of the train split drawn with ``--seed`` (what the shuffled loader gives), labels =
the nuclei (epoch 0) or the nuclei grown by ``--grow`` px (a proxy for later epochs). The network: the published
UNet (``--width 64``) with random weights and BatchNorm statistics of a few forward passes (CID's cost does not
depend on the weights with the default ``steps`` stop rule). Targets: the default ``AttributionConfig`` (50 genes,
up to 59 cell types, 20 steps, chunks of 8 types).

What is timed, on the same batch and model, each the minimum of ``--repeats``:

* ``train_step``: forward + backward + Adam step (float32), the denominator of the ratio;
* ``forward``: one no-grad forward of the batch (CID runs two per call: the clean prediction and the warm start);
* per variant, the cost of one optimisation step of one (sample, type) row, from two runs of ``summarize`` on
  ``--chunk-types`` types x the batch, with ``--k1`` and ``--k2`` steps: ``row_step = (t(k2) - t(k1)) / ((k2 -
  k1) * rows)``. The whole call at the default settings is then ``2 * forward + rows * 20 * row_step``, with
  ``rows`` = the (sample, type) pairs the variant computes (``B * T`` for the plain implementation). ``--full``
  also runs the whole default call of each variant (at width 64 on a CPU the plain one takes over an hour: use it
  with a small ``--width`` to check the estimate).

Variants: ``plain`` (``CID(fold_batchnorm=False)`` on every (sample, type) row: the behaviour before the speed
work) and ``fold`` (BatchNorm folded into the convolutions), the latter costed on every row (``all``), on the rows
left after skipping patches nothing uses (``skip``, the default) and on only the types present near each patch
(``local``, ``--CID_types=local``). On CUDA both run under the default mixed precision.

Row counts are reported for the batch and for the whole section (every patch of both splits, with the label
update's context taken from the neighbouring patches), because one batch of 8 is a small sample.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import batch_parser, best_time, start  # noqa: E402


def stitched_labels(data_dir: Path, meta: dict, grow: int) -> np.ndarray:
    """Instance map of the whole padded patch frame from the patch files (nuclei, grown by ``grow`` px)."""
    from segjointgene.evaluate.baselines import expand_nuclei
    from segjointgene.preprocess.geometry import iter_patch_grid
    from segjointgene.io.files import load_npz

    p = int(meta.patch_size)
    rows, cols = meta.grid
    frame = np.zeros((rows * p, cols * p), np.int32)
    for split, name, r, c in iter_patch_grid(meta):
        frame[r * p:(r + 1) * p, c * p:(c + 1) * p] = load_npz(data_dir / split / name, ("instance",))["instance"]
    return expand_nuclei(frame, grow).astype(np.int32) if grow > 0 else frame


def windows(frame: np.ndarray, origins: np.ndarray, p: int, h: int) -> np.ndarray:
    """(N, P+2h, P+2h) windows of ``frame`` around patches at ``origins`` (N, 2), 0 outside the frame."""
    padded = np.pad(frame, h)
    return np.stack([padded[y:y + p + 2 * h, x:x + p + 2 * h] for y, x in origins])


def main(argv: list[str] | None = None) -> int:
    parser = batch_parser(__doc__)
    parser.add_argument("--grow", type=int, default=0, help="grow the nuclei by this many px (later-epoch labels)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-types", type=int, default=2, help="types x batch rows timed per variant")
    parser.add_argument("--k1", type=int, default=1)
    parser.add_argument("--k2", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["plain", "fold"])
    parser.add_argument("--full", action="store_true", help="also time the whole default call of each variant")
    args = parser.parse_args(argv)

    import torch

    from segjointgene.attribution import CID, select_targets
    from segjointgene.attribution.summary import needed_rows
    from segjointgene.config import AttributionConfig, LabelUpdateConfig
    from segjointgene.preprocess.dataset import ImagePatchDataset, read_class_lut
    from segjointgene.methods.segjointgene.labels import reach
    from segjointgene.io.metadata import load_metadata
    from segjointgene.io.files import load_npz
    from segjointgene.methods.segjointgene.unet import UNet

    device, rec, sync = start("bench_cid", args, argv)
    cfg, label_cfg = AttributionConfig(method="CID"), LabelUpdateConfig(rule="v1")
    meta = load_metadata(args.data)
    lut = read_class_lut(args.data)
    ds = ImagePatchDataset(args.data, "train", metadata=meta, class_lut=lut)
    p, g, k = ds.patch_size, ds.n_genes, len(meta.celltypes)
    halo = reach(label_cfg)

    frame = stitched_labels(args.data, meta, args.grow)
    classes_lut = torch.as_tensor(lut)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(ds), size=min(args.batch, len(ds)), replace=False))
    origins = ds.origins[chosen].numpy()
    x = torch.stack([ds.read_image(int(i)) for i in chosen]).to(device)
    inst = torch.from_numpy(np.stack([frame[y:y + p, xx:xx + p] for y, xx in origins])).long()
    labels = classes_lut[inst].to(device)
    context = classes_lut[torch.from_numpy(windows(frame, origins, p, halo)).long()].to(device)

    gene_counts = np.bincount(load_npz(args.data / "spots.npz", ("gene",))["gene"], minlength=g)
    class_pixels = torch.bincount(classes_lut[torch.from_numpy(frame).long()].flatten(), minlength=k)
    genes, targets = select_targets(torch.as_tensor(gene_counts, dtype=torch.float64), class_pixels, cfg.n_gene,
                                    cfg.n_celltype)
    genes, targets = genes.to(device), targets.to(device)
    b, t = x.shape[0], targets.numel()

    # row counts: this batch and the whole section (every patch of both splits)
    all_origins = np.concatenate([ImagePatchDataset(args.data, s, metadata=meta, class_lut=lut).origins.numpy()
                                  for s in ("train", "test") if meta.split[s]])
    section = {"skip": 0, "local": 0}
    for i in range(0, len(all_origins), 64):
        ctx = classes_lut[torch.from_numpy(windows(frame, all_origins[i:i + 64], p, halo)).long()]
        section["skip"] += int(needed_rows(ctx, targets.cpu()).sum())
        section["local"] += int(needed_rows(ctx, targets.cpu(), local_types=True).sum())
    n_all = len(all_origins) * t
    rows = {"plain": b * t, "skip": int(needed_rows(context, targets).sum()),
            "local": int(needed_rows(context, targets, local_types=True).sum())}
    rec.add("targets", t, "cell types", genes=genes.numel(), batch=b, labelled_patches=int((inst > 0).flatten(1).any(1).sum()))
    for key, n in rows.items():
        rec.add(f"rows_batch_{key}", n, "rows", fraction=round(n / (b * t), 4))
    for key, n in section.items():
        rec.add(f"rows_section_{key}", n / len(all_origins) * b, "rows per batch", fraction=round(n / n_all, 4),
                patches=len(all_origins))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = UNet(g, k, base_channels=args.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():  # realistic BatchNorm statistics
        for _ in range(3):
            model(x)

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()

    t_train, _ = best_time(train_step, repeats=args.repeats, sync=sync, warmup=1)
    rec.add("train_step", t_train, "s", patches_per_s=round(b / t_train, 3))
    model.eval()

    def forward():
        with torch.no_grad():
            model(x)

    t_fwd, _ = best_time(forward, repeats=args.repeats, sync=sync)
    rec.add("forward", t_fwd, "s")

    def make(impl: str):
        return CID(model, mixed_precision=True, fold_batchnorm=impl == "fold")

    budget = dict(lr=cfg.cid_lr, lambda_=cfg.cid_lambda, beta=cfg.cid_beta, stop=cfg.cid_stop,
                  init_log_sigma=cfg.cid_init_log_sigma, warm_start=cfg.cid_warm_start)
    sub = targets[:args.chunk_types]
    section_rows = {"all": b * t, "skip": section["skip"] / len(all_origins) * b,
                    "local": section["local"] / len(all_origins) * b}
    results: dict[tuple[str, str], float] = {}
    for impl in args.variants:
        cid = make(impl)

        def call(n_steps, cid=cid):
            gen = torch.Generator(device).manual_seed(args.seed)
            kw = dict(genes=genes, n_steps=n_steps, chunk_size=args.chunk_types, generator=gen, **budget)
            return cid.summarize(x, labels, sub, **kw)

        t1, _ = best_time(lambda: call(args.k1), repeats=args.repeats, sync=sync)
        t2, _ = best_time(lambda: call(args.k2), repeats=args.repeats, sync=sync)
        row_step = max(t2 - t1, 0.0) / ((args.k2 - args.k1) * b * sub.numel())
        rec.add(f"row_step_{impl}", row_step, "s", rows_timed=b * sub.numel(), t_k1=round(t1, 3), t_k2=round(t2, 3))
        for rows_kind in (("all",) if impl.startswith("plain") else ("all", "skip", "local")):
            for scope, n_rows in (("batch", rows["plain" if rows_kind == "all" else rows_kind]),
                                  ("section", section_rows[rows_kind])):
                est = 2 * t_fwd + n_rows * cfg.cid_n_steps * row_step
                results[(f"{impl}/{rows_kind}", scope)] = est
                rec.add(f"cid_{impl}_{rows_kind}_{scope}", est, "s (estimated)",
                        ratio_to_train_step=round(est / t_train, 2), rows=round(n_rows, 1))

    if args.full:
        for impl in args.variants:
            for rows_kind in (("all",) if impl.startswith("plain") else ("skip", "local")):
                cid = make(impl)
                gen = torch.Generator(device).manual_seed(args.seed)
                kw = dict(genes=genes, n_steps=cfg.cid_n_steps, chunk_size=cfg.cid_chunk_size, generator=gen, **budget)
                if rows_kind != "all":
                    kw["rows"] = needed_rows(context, targets, local_types=rows_kind == "local")
                t_full, _ = best_time(lambda: cid.summarize(x, labels, targets, **kw), repeats=1, sync=sync)
                est = results[(f"{impl}/{rows_kind}", "batch")]
                rec.add(f"cid_full_{impl}_{rows_kind}", t_full, "s (measured)",
                        ratio_to_train_step=round(t_full / t_train, 2), estimate=round(est, 2))

    rec.summary(f"CID cost, {args.data.name}, batch {b}, width {args.width}, device {device}")
    for scope in ("batch", "section"):
        base = results.get(("plain/all", scope))
        print(f"\nratio CID / train step ({'this batch' if scope == 'batch' else 'section-average batch'}), "
              "speed-up vs plain:")
        for (name, sc), est in results.items():
            if sc == scope:
                print(f"  {name:24s} {est / t_train:10.1f}" + (f"   x{base / est:6.2f}" if base else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
