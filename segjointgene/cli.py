"""Command line: ``python main.py --datasets_name=CA1 --step_name=<step> [options]`` (layer 4).

The parser is built from the config dataclasses (each default is defined once, in ``config.py``). Step handlers
import the library lazily, so ``--help`` stays fast. Errors a user can fix print one line and exit with status 2;
anything else prints one line (the traceback with ``--debug``) and exits with status 1. Ctrl-C exits with 130 and
SIGTERM (e.g. a scheduler's pre-emption) with 143, after the file being written is discarded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (AttributionConfig, ClassifyConfig, EmbedConfig, EvaluateConfig, LabelUpdateConfig,
                     PreprocessConfig, RuntimeConfig, SimulateConfig, TrainConfig)
from .errors import ConfigError, UserError

log = logging.getLogger("segjointgene")

__all__ = ["STEPS", "Paths", "build_parser", "main"]

_CONFIGS: tuple[tuple[str, type], ...] = (
    ("runtime", RuntimeConfig),
    ("simulate", SimulateConfig),
    ("preprocess", PreprocessConfig),
    ("train", TrainConfig),
    ("label update", LabelUpdateConfig),
    ("attribution (CID / IG)", AttributionConfig),
    ("evaluate", EvaluateConfig),
    ("embed", EmbedConfig),
    ("classify", ClassifyConfig),
)

#: OS errors a user fixes (permissions, read-only or full disk, a path component that is a file)
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def str2bool(value: str | bool) -> bool:
    """Parse a boolean flag value: true/false, yes/no, t/f, y/n, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("yes", "true", "t", "y", "1"):
        return True
    if v in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {value!r} (choose from true, false, yes, no, 1, 0)")


_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": str2bool}


def _add_bool(group, flag: str, default: bool, help: str) -> None:
    group.add_argument(flag, type=str2bool, nargs="?", const=True, default=default, metavar="BOOL",
                       help=f"{help} (bare flag = true; default {default})")


# ------------------------------------------------------------------------------------------------------- steps
@dataclass(frozen=True)
class Paths:
    """Folders of a run, resolved from the path arguments (all under ``--work_dir``)."""

    work_dir: Path
    datasets_name: str
    raw_dir: Path
    data_dir: Path
    run_dir: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Paths:
        name = args.datasets_name or ("demo" if args.step_name == "demo" else "CA1")
        for flag, value in (("--datasets_name", name), ("--net_sub_suffix", args.net_sub_suffix)):
            if not _NAME.match(value) or ".." in value:
                raise ConfigError(f"{flag}={value!r} must be a plain folder name (letters, digits, '_', '-', '.'); "
                                  "it may not contain '/', '..' or be an absolute path")
        sub = Path(args.CA1_sub_path)
        if sub.is_absolute() or ".." in sub.parts or not args.CA1_sub_path:
            raise ConfigError(f"--CA1_sub_path={args.CA1_sub_path!r} must be a relative folder inside "
                              "data/<datasets_name>_raw/; use --raw_dir for a folder elsewhere")
        work = Path(args.work_dir)
        raw = Path(args.raw_dir) if args.raw_dir else work / "data" / f"{name}_raw" / sub
        return cls(work_dir=work, datasets_name=name, raw_dir=raw, data_dir=work / "data" / name,
                   run_dir=work / "checkpoints" / name / args.net_sub_suffix)


def configs(args: argparse.Namespace) -> dict[type, Any]:
    """Every config dataclass built from the parsed arguments (validated on construction)."""
    out = {}
    for _, cls in _CONFIGS:
        values = {f.name: getattr(args, _dest(f)) for f in dataclasses.fields(cls)}
        out[cls] = cls(**values)
    return out


def _dest(f: dataclasses.Field) -> str:
    return (f.metadata.get("flag") or f"--{f.name}").lstrip("-")


def step_simulate(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    from .simulate import simulate_section, write_simulated, truth_dir_of

    raw = paths.raw_dir
    existing = [p for p in (raw, truth_dir_of(raw)) if p.exists() and any(p.iterdir())]
    if existing and not cfg[RuntimeConfig].overwrite:
        raise UserError(f"{existing[0]} already holds files; pass --overwrite to replace the simulated section")
    sim = simulate_section(cfg[SimulateConfig], rng=cfg[RuntimeConfig].random_seed)
    truth = write_simulated(sim, raw)
    print(f"simulated section: {len(sim.cells)} cells, {len(sim.spots)} spots "
          f"({int((sim.spots['cell'] == 0).sum())} noise) -> {raw}\nground truth -> {truth}")
    return 0


def step_preprocess(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    from .io import read_section
    from .preprocess import preprocess_section

    start = time.perf_counter()
    section = read_section(paths.raw_dir)
    meta = preprocess_section(section, paths.data_dir, cfg[PreprocessConfig], num_workers=cfg[RuntimeConfig].num_workers,
                              overwrite=cfg[RuntimeConfig].overwrite, progress=not args.quiet,
                              extra_metadata={"datasets_name": paths.datasets_name, "raw_dir": str(paths.raw_dir.resolve())})
    print(f"preprocessed {paths.raw_dir} -> {paths.data_dir}: {meta['n_patches']} patches "
          f"({len(meta['split']['train'])} train, {len(meta['split']['test'])} test; "
          f"{meta['n_patches_skipped_empty']} empty skipped), {len(meta['genes'])} genes, "
          f"{len(meta['celltypes']) - 1} cell types, nuclei from {meta['nucleus_source']}, "
          f"{meta['n_spots_outside']} spots outside the image dropped; {time.perf_counter() - start:.1f} s")
    return 0


def step_train(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    import torch

    from .trainer import run_training

    # Every draw of the run comes from generators the trainer seeds; the global generator (random per process in
    # recent torch) is seeded too, once, so that its state saved in the checkpoints - and anything a dependency
    # draws from it - is the same in every run with this --random_seed.
    torch.manual_seed(cfg[RuntimeConfig].random_seed)
    return run_training(args, cfg, paths)


def step_export(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    from .export import run_export

    return run_export(args, cfg, paths)


def step_evaluate(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    from .evaluation import run_evaluate

    return run_evaluate(args, cfg, paths)


#: The demo: a small simulated section and a short self-training with CID, minutes on a laptop CPU.
#: Keys are argparse destinations; a flag given on the command line overrides its entry.
DEMO_SETTINGS: dict[str, Any] = {
    "sim_size": 256, "sim_mode": "dense", "patch_size": 64,
    "net_width": 16, "net_epoch": 30, "net_lr": 1e-3, "passes_per_epoch": 8, "save_interval": 10,
    "attr_epoch": 10, "attr_every": 5, "CID_n_steps": 10, "attr_n_gene": 30, "attr_n_celltype": 6,
    "num_workers": 0, "num_threads": 1,
}


def step_demo(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    """simulate -> preprocess -> SegJointGene (CID) -> export -> evaluate on a small simulated section."""
    explicit = getattr(args, "explicit", set())
    demo = argparse.Namespace(**vars(args))
    for dest, value in DEMO_SETTINGS.items():
        if dest not in explicit:
            setattr(demo, dest, value)
    cfg = configs(demo)
    previous = [p for p in (paths.raw_dir, paths.data_dir, paths.run_dir) if p.exists() and any(p.iterdir())]
    if previous and not cfg[RuntimeConfig].overwrite:
        raise UserError(f"a previous demo is in {previous[0]}; pass --overwrite to run it again (or --work_dir DIR)")
    if cfg[RuntimeConfig].num_threads:
        import torch

        torch.set_num_threads(cfg[RuntimeConfig].num_threads)
    start = time.perf_counter()
    settings = ", ".join(f"--{k}={getattr(demo, k)}" for k in DEMO_SETTINGS)
    print(f"demo: {settings}\n")
    for step in (step_simulate, step_preprocess, step_train, step_evaluate):
        code = step(demo, cfg, paths)
        if code:
            return code
        print()
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; results in {paths.run_dir / 'results'}")
    return 0


def step_embed(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    from .embed.run import run_embed

    return run_embed(args, cfg, paths)


def step_classify(args: argparse.Namespace, cfg: dict[type, Any], paths: Paths) -> int:
    from .classify.run import run_classify

    return run_classify(args, cfg, paths)


#: step name -> (handler, one-line description); ``preprocess`` is an alias of ``preprocess_CA1``.
STEPS: dict[str, tuple[Callable[..., int], str]] = {
    "simulate": (step_simulate, "write a synthetic section with ground truth in the raw layout (+ <raw_dir>_truth/)"),
    "preprocess_CA1": (step_preprocess, "raw section -> data/<datasets_name>/{train,test}/p_<row>_<col>.npz + metadata"),
    "preprocess": (step_preprocess, "alias of preprocess_CA1"),
    "SegJointGene": (step_train, "self-train the UNet, grow nuclei into cells, rank genes (CID / IG / none)"),
    "export": (step_export, "write the results of a saved epoch: masks, spot and cell tables, AnnData, ranking, figures"),
    "evaluate": (step_evaluate, "score a run and the baselines (truth metrics when a truth folder exists)"),
    "demo": (step_demo, "simulate -> preprocess -> self-train with CID -> export -> evaluate, in minutes on a CPU"),
    "embed": (step_embed, "SegCLR-style contrastive cell embeddings from a finished run"),
    "classify": (step_classify, "SNGP cell-type classifier with uncertainty / out-of-distribution flags"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every step (flags, defaults and choices come from the config dataclasses)."""
    steps = "\n".join(f"  {name:<15} {desc}" for name, (_, desc) in STEPS.items())
    parser = argparse.ArgumentParser(
        prog="main.py", usage="main.py --step_name=STEP [--datasets_name=NAME] [options]  (main.py --help lists them)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="SegJointGene: joint cell segmentation and spatial gene prioritization.",
        epilog=f"steps (--step_name):\n{steps}\n\nExample:\n"
               "  python main.py --datasets_name=CA1 --step_name=preprocess_CA1 --CA1_sub_path=3_1_left\n"
               "  python main.py --datasets_name=CA1 --step_name=SegJointGene --attr_method=CID "
               "--net_sub_suffix=SegJointGene_CID")
    g = parser.add_argument_group("step and paths")
    g.add_argument("--step_name", required=False, default="demo", choices=sorted(STEPS), metavar="STEP",
                   help=f"what to run, one of: {', '.join(STEPS)} (default demo)")
    g.add_argument("--datasets_name", default=None, help="dataset name: patches in data/<name>/, runs in "
                                                          "checkpoints/<name>/ (default CA1; demo for --step_name=demo)")
    g.add_argument("--CA1_sub_path", default="3_1_left", help="raw section folder data/<datasets_name>_raw/<CA1_sub_path>/")
    g.add_argument("--raw_dir", default=None, help="raw section folder (overrides the default above)")
    g.add_argument("--work_dir", default=".", help="folder holding data/ and checkpoints/ (default: current folder)")
    g.add_argument("--net_name", default="unet", choices=("unet",), help="network (only the 4-level UNet)")
    g.add_argument("--net_sub_suffix", default="SegJointGene_CID", help="run folder checkpoints/<datasets_name>/<suffix>/")
    _add_bool(g, "--if_load_ckpt", False, "resume from the checkpoint of --ckpt_load_epoch")
    g.add_argument("--ckpt_load_epoch", type=int, default=None,
                   help="epoch to resume from / export (default: the latest saved)")
    _add_bool(g, "--debug", False, "show tracebacks and debug logs")
    _add_bool(g, "--quiet", False, "no progress bars")

    for title, cls in _CONFIGS:
        fields = dataclasses.fields(cls)
        if not fields:
            continue
        group = parser.add_argument_group(title)
        for f in fields:
            flag = f.metadata.get("flag") or f"--{f.name}"
            ftype = str(f.type)
            if ftype == "bool":
                _add_bool(group, flag, f.default, f.metadata["help"])
                continue
            kwargs: dict[str, Any] = {"type": _TYPES[ftype], "default": f.default,
                                      "help": f"{f.metadata['help']} (default {f.default})"}
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            group.add_argument(flag, **kwargs)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (robust to redirection, e.g. under pytest)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(debug: bool) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("matplotlib", "PIL", "h5py", "numba", "numcodecs", "fsspec", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags present on the command line (their values override the demo's settings)."""
    flags = parser._option_string_actions  # noqa: SLF001 - argparse keeps no public map from flags to actions
    return {flags[tok.split("=", 1)[0]].dest for tok in argv if tok.startswith("--") and tok.split("=", 1)[0] in flags}


def _one_line(err: BaseException) -> str:
    """The message of a user error on one line.

    An error raised in a DataLoader worker is re-raised by torch with the worker's traceback in its message; the
    original message is its last line, after the exception's qualified name.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class _Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler's pre-emption) as an exception: files being written are then discarded cleanly.

    A ``BaseException``, so that no ``except Exception`` on the way swallows it.
    """


@contextlib.contextmanager
def _sigterm_as_exception():
    """Turn SIGTERM into :class:`_Terminated` in this process while a step runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    main_pid = os.getpid()

    def terminate(signum, frame):
        if os.getpid() != main_pid:  # a forked worker (process pool, DataLoader) ends as it would without us
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one step; returns the exit status (0 ok, 1 internal error, 2 usage or data error, 130 interrupted by
    Ctrl-C, 143 terminated by SIGTERM)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        return int(stop.code or 0)
    args.explicit = _explicit_dests(parser, sys.argv[1:] if argv is None else argv)
    _configure_logging(args.debug)
    handler = STEPS[args.step_name][0]
    try:
        cfg = configs(args)
        paths = Paths.from_args(args)
        if cfg[RuntimeConfig].num_threads:
            import torch

            torch.set_num_threads(cfg[RuntimeConfig].num_threads)
        with _sigterm_as_exception():
            return handler(args, cfg, paths)
    except UserError as err:
        if args.debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the error: rank 0 says it
            print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Terminated) as stop:
        # every file is written under a temporary name and renamed when complete: the one being written is discarded,
        # everything saved before is intact
        how, status = ("terminated (SIGTERM)", 143) if isinstance(stop, _Terminated) else ("interrupted", 130)
        print(f"{how}: files saved so far are complete; resume training with --if_load_ckpt=True, re-run any other "
              "step (preprocessing keeps its finished patches)", file=sys.stderr)
        return status
    except Exception as err:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if args.debug:
            raise
        if isinstance(err, OSError) and err.errno in _USER_OS_ERRORS:
            where = f"{err.filename}: " if err.filename else ""
            print(f"error: cannot write or read {where}{err.strerror}; check the folder's permissions and free space, "
                  "or choose another --work_dir", file=sys.stderr)
            return 2
        msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"error: internal error ({type(err).__name__}: {msg}); re-run with --debug for the traceback",
              file=sys.stderr)
        return 1
