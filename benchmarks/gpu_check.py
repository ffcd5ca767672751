"""The GPU figures in one prepared run (issue 15): one JSON line per figure, exit 1 at the first failure.

    python benchmarks/gpu_check.py --out /tmp/gpu_check            # on a machine with a CUDA device, <= 8 min
    python benchmarks/gpu_check.py --out /tmp/gpu_check --smoke    # the same code paths at toy sizes (CPU ok)

Without CUDA every CUDA-only part prints ``{"check": ..., "skipped": "no CUDA device ..."}`` and the script exits
0; with ``--smoke`` the measuring code (FLOP counting, step timing, CID ratio, loader rate) also runs on the CPU at
toy sizes, so the script is tested before GPU time is spent. Parts:

1. ``pytest -m gpu``; a tiny CLI training with ``--amp`` on CUDA, then a resume;
2. CID under a memory cap (``torch.cuda.set_per_process_memory_fraction``): it must split its chunks and give the
   same ranking as without the cap (Spearman rho >= 0.99);
3. throughput and MFU of a training step of the published UNet (width 64, 128 px, batch 8/16/32, bf16 autocast and
   fp32), FLOPs from ``torch.utils.flop_counter.FlopCounterMode``, against the device's peak;
4. CID / training-step time ratio at the default CID settings; the loader's patches/s against the step's;
5. ``torchrun --nproc_per_node=1`` with NCCL: a world-size-1 run that starts and saves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from segjointgene.attribution import summarize  # noqa: E402
from segjointgene.config import AttributionConfig  # noqa: E402
from segjointgene.methods.segjointgene.unet import UNet  # noqa: E402

#: Dense peak TFLOP/s by device name fragment (bf16 tensor core, fp32 without TF32), from the vendors' sheets.
PEAK_TFLOPS = {"H200": (989.4, 66.9), "H100": (989.4, 66.9), "A100": (312.0, 19.5), "L40S": (362.1, 91.6)}


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def fail(check: str, why: str) -> None:
    emit(check=check, ok=False, error=why)
    raise SystemExit(1)


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (cuDNN autotune, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def train_step_figures(device: torch.device, *, width: int, size: int, batches: list[int], genes: int,
                       classes: int, repeats: int) -> dict[int, float]:
    """Seconds per training step and MFU per batch size and precision; returns the bf16 (GPU) / fp32 step times."""
    from torch.utils.flop_counter import FlopCounterMode

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    step_s = {}
    for batch in batches:
        for precision in (("bf16", "fp32") if device.type == "cuda" else ("fp32",)):
            net = UNet(genes, classes, base_channels=width).to(device).to(memory_format=torch.channels_last)
            opt = torch.optim.Adam(net.parameters(), 1e-4)
            x = torch.randn(batch, genes, size, size, device=device).to(memory_format=torch.channels_last)
            y = torch.randint(0, classes, (batch, size, size), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = torch.nn.functional.cross_entropy(net(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            seconds = _time(step, device, repeats)
            tflops = flops / seconds / 1e12
            mfu = tflops / peak[0 if precision == "bf16" else 1] if peak else None
            emit(check="train_step", device=name, width=width, size=size, batch=batch, precision=precision,
                 seconds=round(seconds, 5), patches_per_s=round(batch / seconds, 1), tflops=round(tflops, 2),
                 mfu=None if mfu is None else round(mfu, 3), target_mfu_bf16_b32=0.40)
            step_s[(batch, precision)] = seconds
    return step_s


def cid_ratio(device: torch.device, *, width: int, size: int, genes: int, classes: int, step_s: float) -> None:
    """CID of one batch of 8 at the default settings, over the training step's time."""
    net = UNet(genes, classes, base_channels=width).to(device).eval()
    images = torch.rand(8, genes, size, size, device=device)
    labels = torch.randint(0, classes, (8, size, size), device=device)
    targets = torch.arange(1, classes, device=device)
    cfg = AttributionConfig(method="CID", n_gene=genes, n_celltype=classes - 1)
    seconds = _time(lambda: summarize(net, images, labels, targets, torch.arange(genes, device=device), config=cfg,
                                      generator=torch.Generator(device).manual_seed(0)), device, 1)
    emit(check="cid_ratio", seconds=round(seconds, 4), train_step_seconds=round(step_s, 5),
         ratio=round(seconds / step_s, 2), target="<= 10")


def cid_memory_cap(device: torch.device, *, genes: int, classes: int) -> None:
    """CID with and without a memory cap: the capped run must split its chunks and rank the genes alike."""
    from scipy.stats import spearmanr

    net = UNet(genes, classes, base_channels=32).to(device).eval()
    images = torch.rand(16, genes, 128, 128, device=device)
    labels = torch.randint(0, classes, (16, 128, 128), device=device)
    targets, gene_ids = torch.arange(1, classes, device=device), torch.arange(genes, device=device)
    cfg = AttributionConfig(method="CID", n_gene=genes, n_celltype=classes - 1)

    def run():
        return summarize(net, images, labels, targets, gene_ids, config=cfg,
                         generator=torch.Generator(device).manual_seed(0)).type_gene_sum.flatten().cpu()

    free = run()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2.5 * 2 ** 30 / total), device)
    try:
        capped = run()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    rho = float(spearmanr(free.numpy(), capped.numpy()).statistic)
    emit(check="cid_memory_cap", cap_gib=2.5, spearman=round(rho, 4), target=">= 0.99")
    if rho < 0.99:
        fail("cid_memory_cap", f"rankings differ under the cap: rho {rho:.3f}")


def loader_rate(out: Path, device: torch.device, step_patches_per_s: float, smoke: bool) -> None:
    work = out / "loader"
    size = "256" if smoke else "1024"
    cmd = [sys.executable, str(ROOT / "main.py"), f"--work_dir={work}", "--datasets_name=sim", "--quiet"]
    subprocess.run([*cmd, "--step_name=simulate", f"--sim_size={size}", "--overwrite"], check=True)
    subprocess.run([*cmd, "--step_name=preprocess"], check=True)
    from segjointgene.preprocess.dataset import ImagePatchDataset

    ds = ImagePatchDataset(work / "data" / "sim", "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=0 if smoke else 4)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        batch["image"].to(device, non_blocking=True)
        n += len(batch["index"])
    rate = n / (time.perf_counter() - t0)
    emit(check="loader", patches_per_s=round(rate, 1), step_patches_per_s=round(step_patches_per_s, 1),
         ratio=round(rate / step_patches_per_s, 2), target=">= 1.5")


def cuda_cli(out: Path) -> None:
    """pytest -m gpu, a tiny training with --amp and its resume, and torchrun with NCCL at world size 1."""
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests")], check=True)
    emit(check="pytest_gpu", ok=True)
    work = out / "cli"
    cmd = [sys.executable, str(ROOT / "main.py"), f"--work_dir={work}", "--datasets_name=sim", "--quiet"]
    subprocess.run([*cmd, "--step_name=simulate", "--sim_size=256", "--overwrite"], check=True)
    subprocess.run([*cmd, "--step_name=preprocess", "--patch_size=64"], check=True)
    train = [*cmd, "--step_name=SegJointGene", "--device=cuda", "--amp=True", "--net_epoch=4", "--save_interval=2"]
    subprocess.run([*train, "--overwrite"], check=True)
    subprocess.run([*train[:-2], "--net_epoch=6", "--save_interval=2", "--if_load_ckpt=True"], check=True)
    emit(check="amp_train_and_resume", ok=True)
    subprocess.run(["torchrun", "--nproc_per_node=1", str(ROOT / "main.py"), f"--work_dir={work}",
                    "--datasets_name=sim", "--quiet", "--step_name=SegJointGene", "--device=cuda",
                    "--net_sub_suffix=nccl", "--net_epoch=2", "--overwrite"], check=True)
    if not (work / "checkpoints" / "sim" / "nccl" / "net_2.pt").is_file():
        fail("torchrun_nccl", "world-size-1 NCCL run saved no checkpoint")
    emit(check="torchrun_nccl", ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="toy sizes; runs the measuring code on the CPU too")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    emit(check="device", cuda=cuda, name=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__)
    if not cuda:
        for part in ("pytest_gpu", "amp_train_and_resume", "cid_memory_cap", "torchrun_nccl"):
            emit(check=part, skipped="no CUDA device on this machine: nothing of the CUDA path was measured")
    else:
        cuda_cli(args.out)
        cid_memory_cap(device, genes=92, classes=64)
    if not cuda and not args.smoke:
        emit(check="train_step", skipped="no CUDA device (use --smoke to run the measuring code on the CPU)")
        return 0
    width, size, batches, genes, classes = ((4, 32, [2], 8, 4) if args.smoke else (64, 128, [8, 16, 32], 92, 64))
    step_s = train_step_figures(device, width=width, size=size, batches=batches, genes=genes, classes=classes,
                                repeats=2 if args.smoke else 10)
    key = (batches[0], "bf16" if cuda else "fp32")
    cid_ratio(device, width=width, size=size, genes=genes, classes=classes, step_s=step_s[key])
    loader_rate(args.out, device, batches[0] / step_s[key], args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
