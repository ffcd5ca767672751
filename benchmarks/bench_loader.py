"""Data-loader throughput (patches/s): the npz path vs the spot-list path, against the training step's consumption.

    python benchmarks/bench_loader.py --data /tmp/sjg_bench/data/CA1 --threads 1 --width 64

For each loader, ``--epochs`` passes over the train split with ``--batch`` patches per batch (shuffled), timing the
delivery of every batch *as the training step receives it*, i.e. on ``--device``:

* ``npz_w<N>``: ``ImagePatchDataset`` reading the compressed ``image`` arrays from the patch files, ``N`` worker
  processes (persistent, with pinned memory on CUDA), images moved to the device;
* ``npz_cached``: the same with ``cache_images`` after a first pass (every image in shared memory);
* ``spots_w0``: ``ImagePatchDataset(spot_lists=True)`` + ``collate_spot_lists`` in the main process, the density
  images built on the device by ``segjointgene.preprocess.density.batch_images`` (the fast path; nothing is read from disk).

Throughput is the minimum epoch time over the passes (the first pass of a worker loader includes starting the
workers). The training step's consumption is measured on the same machine and run (``train_step`` of
bench_train.py: forward + backward + Adam of the UNet of ``--width``); the target is a loader throughput of at
least 3x that consumption.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import batch_parser, best_time, start  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = batch_parser(__doc__, width_help="UNet width of the training step compared against")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-batches", type=int, default=0, help="stop each pass after this many batches (0: all)")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from segjointgene.preprocess.dataset import ImagePatchDataset, collate_spot_lists
    from segjointgene.preprocess.density import batch_images
    from segjointgene.methods.segjointgene.unet import UNet

    device, rec, sync = start("bench_loader", args, argv)
    pin = device.type == "cuda"

    def time_loader(ds, loader) -> tuple[float, int]:
        best, n = float("inf"), 0
        for _ in range(args.epochs):
            t0, n = time.perf_counter(), 0
            for i, batch in enumerate(loader):
                images = batch_images(batch, n_genes=ds.n_genes, patch_size=ds.patch_size, sigma=ds.density_sigma,
                                      halo=ds.density_halo, device=device)
                _ = batch["instance"].to(device, non_blocking=True)
                n += images.shape[0]
                if args.max_batches and i + 1 >= args.max_batches:
                    break
            if sync:
                sync()
            best = min(best, time.perf_counter() - t0)
        return best, n

    loaders = []
    for w in args.workers:
        ds = ImagePatchDataset(args.data, "train")
        loaders.append((f"npz_w{w}", ds, DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=w,
                                                     persistent_workers=w > 0, pin_memory=pin,
                                                     generator=torch.Generator().manual_seed(args.seed))))
    cached = ImagePatchDataset(args.data, "train", cache_images=True)
    loaders.append(("npz_cached", cached, DataLoader(cached, batch_size=args.batch, shuffle=True,
                                                     generator=torch.Generator().manual_seed(args.seed))))
    t0 = time.perf_counter()
    spots = ImagePatchDataset(args.data, "train", spot_lists=True)
    rec.add("spots_open", time.perf_counter() - t0, "s", spot_rows=spots._spot_rows.shape[0],
            spot_mb=round(spots._spot_rows.numel() * spots._spot_rows.element_size() / 2**20, 3),
            image_mb_equivalent=round(len(spots) * spots.n_genes * spots.patch_size ** 2 * 4 / 2**20, 1))
    loaders.append(("spots_w0", spots, DataLoader(spots, batch_size=args.batch, shuffle=True,
                                                  collate_fn=collate_spot_lists, pin_memory=pin,
                                                  generator=torch.Generator().manual_seed(args.seed))))
    throughput = {}
    for name, ds, loader in loaders:
        seconds, n = time_loader(ds, loader)
        throughput[name] = n / seconds
        rec.add(f"loader_{name}", n / seconds, "patches/s", epoch_s=round(seconds, 3), patches=n)

    # the training step's consumption, same run
    ds = loaders[0][1]
    x = torch.stack([ds.read_image(i) for i in range(min(args.batch, len(ds)))]).to(device)
    labels = ds.labels.classes(ds.labels.instances[:x.shape[0]].long()).to(device)
    model = UNet(ds.n_genes, int(ds.labels.class_lut.max()) + 1, base_channels=args.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()

    t_step, _ = best_time(step, repeats=2, sync=sync, warmup=1)
    consumption = x.shape[0] / t_step
    rec.add("train_step_consumption", consumption, "patches/s", width=args.width)
    for name, value in throughput.items():
        rec.add(f"headroom_{name}", value / consumption, "x train-step consumption")
    rec.summary(f"data loader, {args.data.name}, batch {args.batch}, device {device}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
