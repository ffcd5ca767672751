"""Figure of the embeddings: PCA (and UMAP when umap-learn happens to be installed), coloured by a label."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..io.files import atomic_path

log = logging.getLogger(__name__)

__all__ = ["pca_2d", "plot_embedding"]

_MAX_LEGEND = 20


def pca_2d(emb: np.ndarray) -> np.ndarray:
    """(n, 2) float64 coordinates on the first two principal axes of standardised ``emb`` (n, d).

    Each axis is signed so that its largest loading is positive (deterministic).
    """
    x = np.asarray(emb, np.float64)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    axes = vt[:2].T
    axes = axes * np.sign(axes[np.abs(axes).argmax(0), np.arange(axes.shape[1])])
    out = x @ axes
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1]))) if out.shape[1] < 2 else out


def plot_embedding(emb: np.ndarray, labels: np.ndarray, path: str | os.PathLike, *, title: str = "SegCLR embeddings",
                   values: np.ndarray | None = None, value_name: str = "") -> Path:
    """Scatter of the embeddings on their first two principal components, coloured by ``labels``.

    Parameters
    ----------
    emb : (n, d) float; labels : (n,) str category of each row.
    values : optional (n,) float drawn as a second panel with a colour bar (e.g. the SNGP uncertainty).
    path : PNG file (written atomically). A UMAP panel is added when ``umap-learn`` is importable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels).astype(str)
    panels = [("PCA", pca_2d(emb))]
    try:
        import umap  # optional: only when it happens to be installed

        panels.append(("UMAP", umap.UMAP(random_state=0).fit_transform(np.asarray(emb, np.float64))))
    except ImportError:
        pass
    ncols = len(panels) * (2 if values is not None else 1)
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.6), squeeze=False)
    cats = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    k = 0
    for name, xy in panels:
        ax = axes[0, k]
        for i, c in enumerate(cats):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(i % cmap.N), label=f"{c} ({int(sel.sum())})",
                       alpha=0.8, linewidths=0)
        ax.set_title(f"{title}: {name}" + (f" ({len(cats)} labels)" if len(cats) > _MAX_LEGEND else ""))
        ax.set_xlabel(f"{name} 1")
        ax.set_ylabel(f"{name} 2")
        if len(cats) <= _MAX_LEGEND:  # a legend of dozens of types would not fit
            ax.legend(fontsize=7, markerscale=2, loc="best")
        k += 1
        if values is not None:
            ax = axes[0, k]
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=6, c=np.asarray(values, np.float64), cmap="viridis", linewidths=0)
            fig.colorbar(sc, ax=ax, label=value_name)
            ax.set_title(f"{name}: {value_name}")
            k += 1
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
