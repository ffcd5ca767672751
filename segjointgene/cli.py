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
from pathlib import Path
from typing import Any

from . import interrupt
from .config import Settings, StepOptions
from .errors import ConfigError, UserError
from .io.runfolder import Paths
from .methods.choice import SPOTMODEL_ONLY, default_run_name, resolve_method

log = logging.getLogger("segjointgene")

__all__ = ["STEPS", "build_parser", "configs", "main", "paths_of"]

#: Help-group title of each config field of :class:`Settings`.
_TITLES = {"runtime": "runtime", "simulate": "simulate", "preprocess": "preprocess", "train": "train",
           "labels": "label update", "attribution": "attribution (CID / IG)", "evaluate": "evaluate",
           "tiles": "segment (whole slides on Dask)",
           "embed": "embed", "classify": "classify"}

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
def paths_of(args: argparse.Namespace, run_name: str | None = None) -> Paths:
    """The folders of a command, from its path flags (validated: plain names, no escape from --work_dir).
    ``run_name``: the run folder's name when ``--net_sub_suffix`` is not given (default: the dataset's one run
    folder, else ``spotmodel``)."""
    name = args.datasets_name or ("demo" if args.step_name == "demo" else "CA1")
    work = Path(args.work_dir)
    suffix = args.net_sub_suffix or run_name or _only_run(work / "checkpoints" / name) or "spotmodel"
    for flag, value in (("--datasets_name", name), ("--net_sub_suffix", suffix)):
        if not _NAME.match(value) or ".." in value:
            raise ConfigError(f"{flag}={value!r} must be a plain folder name (letters, digits, '_', '-', '.'); "
                              "it may not contain '/', '..' or be an absolute path")
    sub = Path(args.CA1_sub_path)
    if sub.is_absolute() or ".." in sub.parts or not args.CA1_sub_path:
        raise ConfigError(f"--CA1_sub_path={args.CA1_sub_path!r} must be a relative folder inside "
                          "data/<datasets_name>_raw/; use --raw_dir for a folder elsewhere")
    raw = Path(args.raw_dir) if args.raw_dir else work / "data" / f"{name}_raw" / sub
    return Paths(work_dir=work, datasets_name=name, raw_dir=raw, data_dir=work / "data" / name,
                 run_dir=work / "checkpoints" / name / suffix)


def _only_run(folder: Path) -> str | None:
    """The name of the one run folder under ``checkpoints/<datasets_name>/`` (None: none or several)."""
    runs = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return runs[0] if len(runs) == 1 else None


def configs(args: argparse.Namespace) -> Settings:
    """Every setting of the command, built from the parsed arguments (each config validated on construction)."""
    values = {}
    for name, cls in Settings.CONFIGS:
        values[name] = cls(**{f.name: getattr(args, _dest(f)) for f in dataclasses.fields(cls)})
    step = StepOptions(if_load_ckpt=args.if_load_ckpt, ckpt_load_epoch=args.ckpt_load_epoch, quiet=args.quiet,
                       raw_dir=args.raw_dir)
    return Settings(**values, step=step)


def _dest(f: dataclasses.Field) -> str:
    return (f.metadata.get("flag") or f"--{f.name}").lstrip("-")


def step_simulate(settings: Settings, paths: Paths) -> int:
    from .evaluate.simulate import simulate_section, truth_dir_of, write_simulated

    raw = paths.raw_dir
    existing = [p for p in (raw, truth_dir_of(raw)) if p.exists() and any(p.iterdir())]
    if existing and not settings.runtime.overwrite:
        raise UserError(f"{existing[0]} already holds files; pass --overwrite to replace the simulated section")
    sim = simulate_section(settings.simulate, rng=settings.runtime.random_seed)
    truth = write_simulated(sim, raw)
    print(f"simulated section: {len(sim.cells)} cells, {len(sim.spots)} spots "
          f"({int((sim.spots['cell'] == 0).sum())} noise) -> {raw}\nground truth -> {truth}")
    return 0


def step_preprocess(settings: Settings, paths: Paths) -> int:
    from .preprocess.pipeline import preprocess_section

    start = time.perf_counter()
    section = _read_raw(settings, paths)
    runtime = settings.runtime
    extra = {"datasets_name": paths.datasets_name, "raw_dir": str(paths.raw_dir.resolve()),
             "input_format": section.format, "celltype_source": section.celltype_source}
    if section.um_per_px is not None:
        extra.update(um_per_px=section.um_per_px, origin_um=list(section.origin_um))
    meta = preprocess_section(section, paths.data_dir, settings.preprocess, num_workers=runtime.num_workers,
                              overwrite=runtime.overwrite, progress=not settings.step.quiet, extra_metadata=extra)
    print(f"preprocessed {paths.raw_dir} -> {paths.data_dir}: {meta.n_patches} patches "
          f"({len(meta.split['train'])} train, {len(meta.split['test'])} test; "
          f"{meta.extra['n_patches_skipped_empty']} empty skipped), {meta.n_genes} genes, "
          f"{meta.n_classes - 1} cell types, nuclei from {meta.nucleus_source}, "
          f"{meta.n_spots_outside} spots outside the image dropped; {time.perf_counter() - start:.1f} s")
    return 0


def _read_raw(settings: Settings, paths: Paths):
    """The raw section: the CA1 layout, or an instrument's folder (``--input_format``, default auto)."""
    from .io.files import read_section
    from .io.platforms import detect_format, read_platform

    cfg = settings.preprocess
    fmt = detect_format(paths.raw_dir) if cfg.input_format == "auto" and paths.raw_dir.is_dir() else cfg.input_format
    if fmt in ("ca1", "auto"):
        return read_section(paths.raw_dir)
    reference = None
    if settings.evaluate.reference_csv:
        from .evaluate.scoring import load_reference

        reference = load_reference(settings.evaluate.reference_csv).T  # types x genes
    return read_platform(paths.raw_dir, fmt, min_qv=cfg.min_qv, reference=reference,
                         n_celltypes=cfg.n_celltypes or None, seed=settings.runtime.random_seed)


def step_train(settings: Settings, paths: Paths) -> int:
    import torch

    from .methods.segjointgene.trainer import run_training

    # Every draw of the run comes from generators the trainer seeds; the global generator (random per process in
    # recent torch) is seeded too, once, so that its state saved in the checkpoints - and anything a dependency
    # draws from it - is the same in every run with this --random_seed.
    torch.manual_seed(settings.runtime.random_seed)
    return run_training(settings, paths)


def step_export(settings: Settings, paths: Paths) -> int:
    from .results.export import run_export

    return run_export(paths, epoch=settings.step.ckpt_load_epoch)


def step_evaluate(settings: Settings, paths: Paths) -> int:
    from .evaluate.scoring import run_evaluate

    return run_evaluate(settings, paths)


#: The demo: a small hard simulated section and the default pipeline (spot model + short self-training), under a
#: minute on a laptop CPU. Keys are argparse destinations; a flag given on the command line overrides its entry.
DEMO_SETTINGS: dict[str, Any] = {
    "sim_size": 256, "sim_mode": "dense", "sim_preset": "hard", "patch_size": 64,
    "num_workers": 0, "num_threads": 1,
}


def demo_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """The demo's arguments: :data:`DEMO_SETTINGS` wherever the command line did not set the flag."""
    explicit = getattr(args, "explicit", set())
    demo = argparse.Namespace(**vars(args))
    for dest, value in DEMO_SETTINGS.items():
        if dest not in explicit:
            setattr(demo, dest, value)
    return demo


def step_demo(settings: Settings, paths: Paths) -> int:
    """simulate -> preprocess -> SegJointGene -> export -> evaluate on a small simulated section (the
    settings come with :data:`DEMO_SETTINGS` applied, see :func:`demo_arguments`)."""
    previous = [p for p in (paths.raw_dir, paths.data_dir, paths.run_dir) if p.exists() and any(p.iterdir())]
    if previous and not settings.runtime.overwrite:
        raise UserError(f"a previous demo is in {previous[0]}; pass --overwrite to run it again (or --work_dir DIR)")
    start = time.perf_counter()
    for step in (step_simulate, step_preprocess, step_train, step_evaluate):
        code = step(settings, paths)
        if code:
            return code
        print()
    print(f"demo finished in {(time.perf_counter() - start) / 60:.1f} min; results in {paths.run.results}")
    return 0


def step_segment(settings: Settings, paths: Paths) -> int:
    from .methods.tiled.run import run_segment

    return run_segment(settings, paths, progress=not settings.step.quiet)


def step_embed(settings: Settings, paths: Paths) -> int:
    from .embed.run import run_embed

    return run_embed(settings, paths)


def step_classify(settings: Settings, paths: Paths) -> int:
    from .classify.run import run_classify

    return run_classify(settings, paths)


#: step name -> (handler, one-line description); ``preprocess`` is an alias of ``preprocess_CA1``.
STEPS: dict[str, tuple[Callable[..., int], str]] = {
    "simulate": (step_simulate, "write a synthetic section with ground truth in the raw layout (+ <raw_dir>_truth/)"),
    "preprocess_CA1": (step_preprocess, "raw section -> data/<datasets_name>/{train,test}/p_<row>_<col>.npz + metadata"),
    "preprocess": (step_preprocess, "alias of preprocess_CA1"),
    "SegJointGene": (step_train, "fit the spot model, self-train the UNet on its territories, refit with the "
                                 "network's type posterior; rank genes (differential expression; CID / IG on request)"),
    "segment": (step_segment, "whole slides: the spot-model engine tile by tile on Dask (no network), resumable; "
                              "merged into the run's results"),
    "export": (step_export, "write the results of a saved epoch: masks, spot and cell tables, AnnData, ranking, figures"),
    "evaluate": (step_evaluate, "score a run and the baselines (truth metrics when a truth folder exists)"),
    "demo": (step_demo, "simulate -> preprocess -> SegJointGene -> export -> evaluate, about a minute on a CPU"),
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
    g.add_argument("--step_name", required=True, choices=sorted(STEPS), metavar="STEP",
                   help=f"what to run, one of: {', '.join(STEPS)}")
    g.add_argument("--datasets_name", default=None, help="dataset name: patches in data/<name>/, runs in "
                                                          "checkpoints/<name>/ (default CA1; demo for --step_name=demo)")
    g.add_argument("--CA1_sub_path", default="3_1_left", help="raw section folder data/<datasets_name>_raw/<CA1_sub_path>/")
    g.add_argument("--raw_dir", default=None, help="raw section folder (overrides the default above)")
    g.add_argument("--work_dir", default=".", help="folder holding data/ and checkpoints/ (default: current folder)")
    g.add_argument("--net_name", default="unet", choices=("unet",), help="network (only the 4-level UNet)")
    g.add_argument("--net_sub_suffix", default="", help="run folder checkpoints/<datasets_name>/<suffix>/ (default: "
                                                         "SegJointGene names it by its method - spotmodel, "
                                                         "SegJointGene_CID, ...; the other steps take the dataset's "
                                                         "one run, else spotmodel)")
    _add_bool(g, "--if_load_ckpt", False, "resume from the checkpoint of --ckpt_load_epoch")
    g.add_argument("--ckpt_load_epoch", type=int, default=None,
                   help="epoch to resume from / export (default: the latest saved)")
    _add_bool(g, "--debug", False, "show tracebacks and debug logs")
    _add_bool(g, "--quiet", False, "no progress bars")

    for name, cls in Settings.CONFIGS:
        fields = dataclasses.fields(cls)
        group = parser.add_argument_group(_TITLES[name])
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
    for noisy in ("matplotlib", "PIL", "h5py", "numba", "numcodecs", "fsspec", "asyncio", "distributed", "tornado",
                  "bokeh"):
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


@contextlib.contextmanager
def _sigterm_as_exception():
    """Turn SIGTERM into :class:`~segjointgene.interrupt.Terminated` in this process while a step runs (main thread
    only; see :mod:`segjointgene.interrupt`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupt.set_main_process()
    previous = signal.signal(signal.SIGTERM, interrupt.handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: What ``python main.py`` without arguments prints after the usage line.
NO_ARGUMENTS = """
segjointgene: joint cell segmentation and spatial gene prioritization. Choose a step with --step_name, e.g.

  python main.py --step_name=demo          # the whole chain on a simulated section, a few minutes on a CPU
  python main.py --datasets_name=CA1 --step_name=preprocess_CA1 --raw_dir /path/to/section
  python main.py --datasets_name=CA1 --step_name=SegJointGene

python main.py --help lists every step and option."""


#: What each step reads: its config groups and single flags of other groups. A flag of any other group (runtime and
#: path flags aside) on a step's command line is an error, so that none is silently ignored.
#: The training flags the segment step's tile network reads.
TILE_NETWORK = frozenset({"net_epoch", "net_batch_size", "net_lr", "net_width", "augment"})
STEP_READS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "simulate": (frozenset({"simulate"}), frozenset()),
    "preprocess_CA1": (frozenset({"preprocess"}), frozenset({"reference_csv"})),
    "preprocess": (frozenset({"preprocess"}), frozenset({"reference_csv"})),
    "SegJointGene": (frozenset({"train", "labels", "attribution"}), frozenset({"reference_csv", "if_load_ckpt",
                                                                               "ckpt_load_epoch"})),
    "segment": (frozenset({"tiles"}), SPOTMODEL_ONLY | TILE_NETWORK),  # the spot-model engine and its network
    "export": (frozenset(), frozenset({"ckpt_load_epoch"})),
    "evaluate": (frozenset({"evaluate"}), frozenset({"pixel_distance"})),
    "demo": (frozenset({"simulate", "preprocess", "train", "labels", "attribution", "evaluate"}), frozenset()),
    "embed": (frozenset({"embed"}), frozenset()),
    "classify": (frozenset({"classify"}), frozenset()),
}
_STEP_ONLY = ("if_load_ckpt", "ckpt_load_epoch")  # path-group flags that some steps read


def check_step_flags(step: str, explicit: set[str]) -> None:
    """Refuse a flag that ``step`` does not read (:data:`STEP_READS`)."""
    groups, singles = STEP_READS[step]
    for name, cls in Settings.CONFIGS:
        if name == "runtime" or name in groups:
            continue
        for f in dataclasses.fields(cls):
            if _dest(f) in explicit and _dest(f) not in singles:
                raise ConfigError(f"--{_dest(f)} has no effect on --step_name={step}; drop it (it belongs to "
                                  f"the {_TITLES[name]} options)")
    for dest in _STEP_ONLY:
        if dest in explicit and dest not in singles:
            raise ConfigError(f"--{dest} has no effect on --step_name={step}; drop it")


def _run_step(args: argparse.Namespace) -> int:
    """Build the settings and folders of the command and run its step."""
    check_step_flags(args.step_name, getattr(args, "explicit", set()))
    if args.step_name == "demo":
        args = demo_arguments(args)
        print(f"demo: {', '.join(f'--{k}={getattr(args, k)}' for k in DEMO_SETTINGS)}\n")
    settings = configs(args)
    run_name = "tiled" if args.step_name == "segment" else None
    if args.step_name in ("SegJointGene", "demo"):
        method = resolve_method(settings, getattr(args, "explicit", set()))
        settings = method.settings
        run_name = default_run_name(method.name, settings.attribution.method)
        print(f"method: {method.describe()}")
    paths = paths_of(args, run_name)
    if settings.runtime.num_threads:
        import torch

        torch.set_num_threads(settings.runtime.num_threads)
    with _sigterm_as_exception():
        return STEPS[args.step_name][0](settings, paths)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one step; returns the exit status (0 ok, 1 internal error, 2 usage or data error, 130 interrupted by
    Ctrl-C, 143 terminated by SIGTERM). Without any argument it prints the usage and the demo command (status 2)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(parser.format_usage() + NO_ARGUMENTS, file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        return int(stop.code or 0)
    args.explicit = _explicit_dests(parser, argv)
    _configure_logging(args.debug)
    try:
        return _run_step(args)
    except UserError as err:
        if args.debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the error: rank 0 says it
            print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, interrupt.Terminated) as stop:
        # every file is written under a temporary name and renamed when complete: the one being written is discarded,
        # everything saved before is intact
        how, status = ("terminated (SIGTERM)", 143) if isinstance(stop, interrupt.Terminated) else ("interrupted", 130)
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
