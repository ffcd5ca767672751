"""Checkpoints (layer 2): a dict of state dicts, the epoch, the config as a plain dict, RNG states and the version.

Written atomically (temporary file + rename, fsync'ed); read with ``torch.load(..., weights_only=True)``, so a file
carrying arbitrary pickled objects is refused instead of executed. A checkpoint records the sha256 of the label
cache written just before it, so a resume never pairs the weights of one epoch with the labels of another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from segjointgene.errors import DataError, InputNotFoundError
from segjointgene.io.files import atomic_path
from segjointgene.io.runfolder import RunFolder

log = logging.getLogger(__name__)

__all__ = ["file_sha256", "list_epochs", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = 1
#: What torch's weights-only unpickler names when it refuses a global (e.g. "GLOBAL posix.system").
_REFUSED = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (and fsync it), byte-deterministically. Values must be tensors, state dicts
    or plain data."""
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        # through a file object, torch names the archive's records "archive/..." instead of after the (random)
        # temporary file name, so the same state always gives the same bytes
        torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``).

    Raises
    ------
    InputNotFoundError : the file does not exist.
    DataError : the file is truncated / corrupt, or carries objects other than tensors and plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, which would run the payload: say only what was refused
        refused = _REFUSED.search(str(err))
        if refused:
            raise DataError(f"{path}: refused to load - it carries a pickled {refused.group(1)} object, not only "
                            "tensors and plain data, and loading it could run code (nothing was executed); only load "
                            "checkpoints written by segjointgene, or retrain") from None
        detail = _UNPICKLER_DETAIL.search(str(err))
        raise DataError(f"{path}: corrupt or not a segjointgene checkpoint (unreadable contents"
                        f"{': ' + detail.group(1).strip()[:80] if detail else ''}; nothing in it was executed); resume "
                        "from an earlier epoch (--ckpt_load_epoch) or retrain") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise DataError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {str(err)[:160]}); "
                        "resume from an earlier epoch (--ckpt_load_epoch) or retrain") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise DataError(f"{path}: not a segjointgene checkpoint (no model/epoch entries)")
    return state


def list_epochs(run_dir: str | os.PathLike) -> list[int]:
    """Epochs that have both a checkpoint and a label cache in ``run_dir``, sorted."""
    return RunFolder(Path(run_dir)).saved_epochs()
