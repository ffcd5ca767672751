"""Training-step throughput (patches/s) and label-update time per batch.

    python benchmarks/bench_train.py --data /tmp/sjg_bench/data/CA1 --width 64 --threads 1

On ``--batch`` patches of the train split (drawn with ``--seed``) of a preprocessed dataset, each the minimum of
``--repeats`` after one warm-up:

* ``train_step``: forward + cross-entropy + backward + Adam step of the UNet of ``--width`` (64 = published), float32
  (with ``--amp`` on CUDA: the trainer's autocast); reported as seconds per step and patches per second;
* ``eval_forward``: the no-grad eval-mode forward the propagation runs after each step;
* ``label_update``: :func:`segjointgene.methods.segjointgene.labels.update_labels` (the default rule V1, no attribution) on the batch
  enlarged by the label halo, with the logits of that forward: the per-batch cost of growing the labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import batch_parser, best_time, start  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = batch_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="CUDA: autocast as the trainer does")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from segjointgene.config import LabelUpdateConfig
    from segjointgene.preprocess.dataset import ImagePatchDataset
    from segjointgene.methods.segjointgene.labels import reach, update_labels
    from segjointgene.methods.segjointgene.unet import UNet
    from segjointgene.methods.segjointgene.trainer import nucleus_seeds

    device, rec, sync = start("bench_train", args, argv)
    ds = ImagePatchDataset(args.data, "train")
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(ds), size=min(args.batch, len(ds)), replace=False))
    x = torch.stack([ds.read_image(int(i)) for i in chosen]).to(device)
    inst = ds.labels.instances[chosen].long().to(device)
    labels = ds.labels.classes(inst)
    lut = ds.labels.class_lut.to(device)
    b, p = x.shape[0], ds.patch_size
    n_classes = int(lut.max()) + 1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = UNet(ds.n_genes, max(n_classes, 2), base_channels=args.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    amp = args.amp and device.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()

    t_step, times = best_time(train_step, repeats=args.repeats, sync=sync, warmup=1)
    rec.add("train_step", t_step, "s", patches_per_s=round(b / t_step, 3), batch=b, width=args.width, patch=p,
            all_times=[round(v, 3) for v in times])

    model.eval()

    def forward():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
            return model(x).float()

    t_fwd, _ = best_time(forward, repeats=args.repeats, sync=sync)
    rec.add("eval_forward", t_fwd, "s", patches_per_s=round(b / t_fwd, 3))

    cfg = LabelUpdateConfig(rule="v1")
    h = reach(cfg)  # the label window the trainer gives the rule
    logits = F.pad(forward(), (h,) * 4, mode="replicate")
    ctx_inst, ctx_core = F.pad(inst, (h,) * 4), F.pad(inst, (h,) * 4)
    origin = ds.origins[chosen].to(device) - h
    splits = {s: ImagePatchDataset(args.data, s) for s in ("train", "test") if ds.metadata.split[s]}
    seeds = nucleus_seeds(args.data, ds.metadata, splits, lut.numel()).to(device)  # as the trainer's

    def label_update():
        return update_labels(ctx_inst, ctx_core, logits, lut, config=cfg, seeds=seeds, origin=origin)

    t_lab, _ = best_time(label_update, repeats=args.repeats, sync=sync, warmup=1)
    rec.add("label_update", t_lab, "s", per_patch_ms=round(1000 * t_lab / b, 2), rule=cfg.rule,
            ratio_to_train_step=round(t_lab / t_step, 4))
    rec.summary(f"training step and label update, {args.data.name}, batch {b}, width {args.width}, device {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
