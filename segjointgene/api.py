"""The Python entry point: :func:`segment` runs the documented steps on a section and returns its cells (layer 4).

It drives the same steps as ``python main.py`` (preprocess, then ``SegJointGene``, which exports the results), with
the same checks - a flag a method does not read is refused -, so a notebook and the command line give the same
outputs. The run's files stay under ``work_dir`` (``data/<name>/``, ``checkpoints/<name>/<run>/results/``).

Examples
--------
>>> import segjointgene
>>> callable(segjointgene.segment)
True
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["segment"]


def _flags(options: Mapping[str, Any]) -> list[str]:
    out = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        out.append(f"--{key.lstrip('-')}={value}")
    return out


def segment(raw_dir: str | os.PathLike, work_dir: str | os.PathLike, *, name: str = "section", method: str = "auto",
            reference_csv: str | os.PathLike | None = None, overwrite: bool = False, quiet: bool = True,
            options: Mapping[str, Any] | None = None):
    """Segment a section and return its cells as AnnData (what ``results/cells.h5ad`` holds).

    Parameters
    ----------
    raw_dir : the section's folder (the CA1 layout, or a Xenium / MERSCOPE / CosMx output folder).
    work_dir : where ``data/`` and ``checkpoints/`` go.
    name : the dataset's name (``--datasets_name``).
    method : ``auto``, ``spotmodel`` or ``segjointgene`` (``--method``).
    reference_csv : genes x types class means (``--reference_csv``): typing of an instrument folder's nuclei and the
        spot model's type profiles.
    overwrite : replace an earlier dataset or run of the same name (``--overwrite``).
    quiet : no progress bars.
    options : more command-line flags by name, e.g. ``{"net_epoch": 20, "model_boundaries": "density"}``
        (``python main.py --help`` lists them); each goes to the step that reads it.

    Returns
    -------
    anndata.AnnData: cells x genes spot counts, ``obs`` (cell type, area, spots), ``obsm['spatial']`` (pixels; and
    ``obsm['spatial_um']`` for an instrument folder), ``uns['rank_genes_groups']`` when two or more types hold cells.

    Raises
    ------
    UserError : bad input or flags (the message is the command line's).
    """
    import anndata

    from .cli import main

    options = dict(options or {})
    common = [f"--work_dir={work_dir}", f"--datasets_name={name}", *(["--quiet"] if quiet else []),
              *(["--overwrite"] if overwrite else [])]
    preprocess_opts = {k: v for k, v in options.items() if _step_of(k) in ("preprocess", "runtime")}
    train_opts = {k: v for k, v in options.items() if _step_of(k) != "preprocess"}
    reference = [f"--reference_csv={reference_csv}"] if reference_csv else []
    steps = [["--step_name=preprocess", f"--raw_dir={raw_dir}", *reference, *_flags(preprocess_opts)],
             ["--step_name=SegJointGene", *([f"--method={method}"] if method != "auto" else []), *reference,
              *_flags(train_opts)]]
    for argv in steps:
        code = main([*argv, *common])
        if code != 0:
            raise UserError(f"segment: `python main.py {' '.join([*argv, *common])}` failed (exit status {code}); "
                            "its message is printed above")
    runs = sorted((Path(work_dir) / "checkpoints" / name).glob("*/results/cells.h5ad"), key=os.path.getmtime)
    return anndata.read_h5ad(runs[-1])


def _step_of(flag: str) -> str:
    """``preprocess`` for a preprocessing flag, ``runtime`` for one every step reads, else ``train``."""
    import dataclasses

    from .config import PreprocessConfig, RuntimeConfig

    def names(cls) -> set[str]:
        return {(f.metadata.get("flag") or f"--{f.name}").lstrip("-") for f in dataclasses.fields(cls)}

    flag = flag.lstrip("-")
    return "preprocess" if flag in names(PreprocessConfig) else "runtime" if flag in names(RuntimeConfig) else "train"
