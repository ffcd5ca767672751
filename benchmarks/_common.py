"""Shared helpers of the benchmark scripts: machine description, JSON-line records, timing, process-tree memory.

Every measurement is printed as one JSON line (``{"name", "value", "unit", "device", "args", "torch_threads",
"loadavg", ...}``) so that runs can be collected with ``grep '^{'``; a human summary follows at the end of each script.
The machine these figures come from is usually shared: each timing is repeated and the minimum is reported, and the
load average (1/5/15 min) at the time of the measurement is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The real CA1 section (read-only, outside the repository).
CA1_RAW = ROOT.parent / "shared" / "data" / "ca1_3_1_left" / "CA1_raw" / "3_1_left"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version / threads, GPU name (when CUDA is available), date (UTC)."""
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


class Recorder:
    """Prints one JSON line per measurement and keeps them for the summary."""

    def __init__(self, script: str, args: Sequence[str], device: str) -> None:
        self.script, self.args, self.device = script, list(args), device
        self.rows: list[dict[str, Any]] = []
        print(json.dumps({"name": "machine", "script": script, **machine()}), flush=True)

    def add(self, name: str, value: float, unit: str, **extra: Any) -> None:
        import torch

        row = {"name": name, "value": round(float(value), 6), "unit": unit, "device": self.device,
               "script": self.script, "args": self.args, "torch_threads": torch.get_num_threads(),
               "loadavg": loadavg(), **extra}
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def summary(self, title: str) -> None:
        print(f"\n## {title}\n")
        for row in self.rows:
            extra = {k: v for k, v in row.items() if k not in {"name", "value", "unit", "device", "script", "args",
                                                                 "torch_threads", "loadavg"}}
            more = ", ".join(f"{k}={v}" for k, v in extra.items())
            print(f"- {row['name']} [{row['device']}]: {row['value']:.4g} {row['unit']}"
                  f"  (load {row['loadavg']}{', ' + more if more else ''})")


def best_time(fn: Callable[[], Any], *, repeats: int, sync: Callable[[], None] | None = None,
              warmup: int = 0) -> tuple[float, list[float]]:
    """Minimum and all wall-clock seconds of ``repeats`` calls of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return min(times), times


def cuda_sync(device) -> Callable[[], None] | None:
    import torch

    if torch.device(device).type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def run_measured(cmd: Sequence[str], *, poll_s: float = 0.05, env: dict | None = None,
                 cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run a command; return its wall seconds, exit code, output and the peak memory of its whole process tree.

    Polled every ``poll_s`` with psutil: ``peak_tree_rss_mb`` is the peak over time of the summed RSS of the process
    and all its descendants (worker pools count together), ``peak_single_rss_mb`` the largest RSS of any one of
    them (what ``/usr/bin/time -v`` reports as maximum resident set size). Spikes shorter than ``poll_s`` can be
    missed.
    """
    import threading

    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_tree = peak_single = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        total = 0
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            members = []
        for member in members:
            try:
                rss = member.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            peak_single = max(peak_single, rss)
        peak_tree = max(peak_tree, total)
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    return {"seconds": wall, "returncode": proc.returncode, "peak_tree_rss_mb": peak_tree / 2**20,
            "peak_single_rss_mb": peak_single / 2**20, "output": "".join(output)}


def batch_parser(doc: str | None, *, width_help: str = "UNet width (64 = published)") -> argparse.ArgumentParser:
    """The arguments every per-batch benchmark takes: dataset, batch, width, device, threads, seed."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="preprocessed dataset folder (data/<name>)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=64, help=width_help)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def start(script: str, args, argv: Sequence[str] | None):
    """Set torch's threads; return (device, Recorder, sync) for a per-batch benchmark."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rec = Recorder(script, sys.argv[1:] if argv is None else argv, str(device))
    return device, rec, cuda_sync(device)


@dataclass(frozen=True)
class FittedSection:
    """A hard simulated section in memory and the spot model fitted to it with the true nuclei."""

    sim: Any  # segjointgene.evaluate.simulate.SimulatedSection
    x: np.ndarray
    y: np.ndarray
    gene: np.ndarray  # gene index of each spot (genes sorted by name)
    true: np.ndarray  # each spot's true cell (0 = noise)
    fit: Any  # segjointgene.methods.spotmodel.model.SpotModelFit


def fitted_hard_section(mode: str, noise: float, seed: int, size: int, density: float = 1.0,
                        config=None) -> FittedSection:
    """Simulate a hard section (``density`` x the simulator's spots per pixel) and fit the spot model alone to it."""
    from segjointgene.config import SimulateConfig
    from segjointgene.evaluate.simulate import simulate_section
    from segjointgene.methods.spotmodel.model import SpotModelConfig, fit_spot_model

    sim = simulate_section(SimulateConfig(size_px=size, mode=mode, noise_fraction=noise, preset="hard",
                                          spot_density=SimulateConfig().spot_density * density), rng=seed)
    genes, types = sorted(sim.markers["gene"].unique()), sorted(sim.cells["celltype"].unique())
    gene = np.searchsorted(genes, sim.spots["gene"].to_numpy(str))
    x, y, true = (sim.spots[c].to_numpy() for c in ("x", "y", "cell"))
    fit = fit_spot_model(x, y, gene, sim.nuclei, sim.cells["cell"].to_numpy(np.int64),
                         np.searchsorted(types, sim.cells["celltype"].to_numpy(str)), n_genes=len(genes),
                         n_types=len(types), config=config or SpotModelConfig())
    return FittedSection(sim=sim, x=x, y=y, gene=gene, true=true, fit=fit)
