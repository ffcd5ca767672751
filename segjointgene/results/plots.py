"""Figures of a run, from arrays and DataFrames (layer 2; matplotlib is imported inside the functions).

Figures are drawn on a :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``: no global
backend switch, no figure registry, no window. Each ``plot_*`` function writes one PNG atomically and returns its
path. The ``downsample_*`` / :func:`spot_density` / :func:`densest_window` helpers prepare section-size arrays for
display (a whole section is shown at about ``max_px`` pixels across).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.files import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "densest_window",
    "display_factor",
    "downsample_labels",
    "downsample_mean",
    "plot_gene_ranking_heatmap",
    "plot_initial_vs_final",
    "plot_section_overview",
    "plot_training_curves",
    "plot_zoom",
    "spot_density",
]

DPI = 110
_OUTLINE_FINAL = (1.0, 0.85, 0.1)  # yellow: cells of the run
_OUTLINE_INITIAL = (0.1, 0.9, 1.0)  # cyan: the nuclei the run started from

#: Friendly titles of known ``train_log.csv`` columns; any other numeric column is plotted under its own name.
_LOG_TITLES = {
    "loss": "training loss",
    "pixel_acc": "pixel accuracy (prediction vs current labels)",
    "n_relabelled": "pixels relabelled in the epoch",
    "cell_calling": "cell-calling score (spots inside / ring)",
    "cid_seconds": "attribution time per epoch (s)",
    "epoch_seconds": "epoch time (s)",
}


# ------------------------------------------------------------------------------------------------ array helpers
def display_factor(shape: Sequence[int], max_px: int = 1000) -> int:
    """Integer down-sampling factor that brings the longer side of ``shape`` to at most ``max_px`` pixels.

    >>> display_factor((5471, 7602)), display_factor((128, 128))
    (8, 1)
    """
    return max(1, math.ceil(max(shape) / max_px))


def downsample_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour down-sampling of a label image: the pixel at the centre of each ``factor`` block.

    Parameters
    ----------
    labels : (H, W) integer ndarray.
    factor : block edge (1 returns a copy).

    Returns
    -------
    (ceil(H / factor), ceil(W / factor)) ndarray of the same dtype (labels are never mixed).

    >>> downsample_labels(np.arange(16).reshape(4, 4), 2)
    array([[ 5,  7],
           [13, 15]])
    """
    if factor <= 1:
        return labels.copy()
    h, w = labels.shape
    rows = np.minimum(np.arange(-(-h // factor)) * factor + factor // 2, h - 1)
    cols = np.minimum(np.arange(-(-w // factor)) * factor + factor // 2, w - 1)
    return labels[np.ix_(rows, cols)]


def downsample_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean of an image (edge blocks averaged over their real pixels).

    Parameters
    ----------
    image : (H, W) ndarray.
    factor : block edge.

    Returns
    -------
    (ceil(H / factor), ceil(W / factor)) float32 ndarray.

    >>> downsample_mean(np.arange(9, dtype=float).reshape(3, 3), 2)
    array([[2. , 3.5],
           [6.5, 8. ]], dtype=float32)
    """
    if factor <= 1:
        return image.astype(np.float32)
    h, w = image.shape
    nh, nw = -(-h // factor), -(-w // factor)
    total = np.zeros((nh, nw), np.float64)
    count = np.zeros((nh, nw), np.float64)
    # row blocks: no full-size float64 temporary for a big section
    for i in range(nh):
        block = image[i * factor:(i + 1) * factor].astype(np.float64)
        pad = (-block.shape[1]) % factor
        ones = np.ones_like(block)
        if pad:
            block = np.pad(block, ((0, 0), (0, pad)))
            ones = np.pad(ones, ((0, 0), (0, pad)))
        total[i] = block.reshape(block.shape[0], nw, factor).sum(axis=(0, 2))
        count[i] = ones.reshape(ones.shape[0], nw, factor).sum(axis=(0, 2))
    return (total / count).astype(np.float32)


def spot_density(x: np.ndarray, y: np.ndarray, shape: Sequence[int], factor: int = 1) -> np.ndarray:
    """Spots per ``factor`` x ``factor`` block.

    Parameters
    ----------
    x, y : (n,) float arrays, spot coordinates (x = column); spots outside ``shape`` are ignored.
    shape : (H, W) of the frame.
    factor : block edge.

    Returns
    -------
    (ceil(H / factor), ceil(W / factor)) float32 ndarray of counts.

    >>> spot_density(np.array([0.5, 1.5, 3.2]), np.array([0.1, 0.9, 3.9]), (4, 4), 2)
    array([[2., 0.],
           [0., 1.]], dtype=float32)
    """
    h, w = int(shape[0]), int(shape[1])
    nh, nw = -(-h // factor), -(-w // factor)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0) & (x < w) & (y < h)
    r = np.floor(y[ok]).astype(np.int64) // factor
    c = np.floor(x[ok]).astype(np.int64) // factor
    return np.bincount(r * nw + c, minlength=nh * nw).reshape(nh, nw).astype(np.float32)


def densest_window(x: np.ndarray, y: np.ndarray, shape: Sequence[int], size: int = 300) -> tuple[int, int, int, int]:
    """The ``size`` x ``size`` window holding the most spots (searched on a 10-px grid).

    Parameters
    ----------
    x, y : (n,) spot coordinates (x = column).
    shape : (H, W) of the frame.
    size : window edge (clipped to the frame).

    Returns
    -------
    (y0, x0, height, width) of the window, inside the frame. Among windows with equally many spots, the one whose
    central half holds the most wins (then the top-left-most), so a cluster is shown centred.

    >>> densest_window(np.array([90.0, 91.0]), np.array([50.0, 52.0]), (100, 100), 20)
    (40, 80, 20, 20)
    """
    h, w = int(shape[0]), int(shape[1])
    hh, ww = min(size, h), min(size, w)
    step = max(1, min(10, hh // 4, ww // 4))
    counts = spot_density(x, y, (h, w), step)
    kh, kw = max(1, hh // step), max(1, ww // step)
    # window sums from an integral image: sums[i, j] = counts[i:i+kh, j:j+kw].sum()
    integral = np.pad(np.cumsum(np.cumsum(counts.astype(np.float64), 0), 1), ((1, 0), (1, 0)))
    n_r, n_c = (h - hh) // step + 1, (w - ww) // step + 1
    i, j = np.arange(n_r)[:, None], np.arange(n_c)[None, :]

    def box(top: np.ndarray, left: np.ndarray, bh: int, bw: int) -> np.ndarray:
        bottom, right = np.minimum(top + bh, counts.shape[0]), np.minimum(left + bw, counts.shape[1])
        return integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]

    sums = box(i, j, kh, kw)
    # ties (e.g. one cluster fits many windows) go to the window whose central half holds the most spots
    centre = box(i + kh // 4, j + kw // 4, max(1, kh // 2), max(1, kw // 2))
    best = np.flatnonzero(sums.ravel() == sums.max())
    r, c = np.unravel_index(int(best[np.argmax(centre.ravel()[best])]), sums.shape)
    return int(r * step), int(c * step), hh, ww


def _outline_rgba(labels: np.ndarray, color: tuple[float, float, float], *, alpha: float = 1.0) -> np.ndarray:
    """(H, W, 4) float32 RGBA layer: ``color`` on the inner boundaries of every label, transparent elsewhere."""
    from skimage.segmentation import find_boundaries

    edges = find_boundaries(labels, mode="inner") & (labels > 0)
    rgba = np.zeros((*labels.shape, 4), np.float32)
    rgba[edges, :3] = color
    rgba[edges, 3] = alpha
    return rgba


def _type_colours(n_types: int, *views: np.ndarray) -> np.ndarray:
    """(n_types + 1, 4) RGBA colours per cell-type id; id 0 (background) is transparent.

    With 60+ types a fixed palette puts similar shades on neighbouring ids; instead the types present in ``views``
    (cell-type maps) get the most distinct colours first, in order of decreasing area; absent types are grey.
    """
    from matplotlib import colormaps

    palette = np.concatenate([colormaps["tab10"](np.arange(10)), colormaps["Dark2"](np.arange(8)),
                              colormaps["tab20"](np.arange(1, 20, 2)), colormaps["Set3"](np.arange(12))])
    colours = np.tile(np.array([[0.6, 0.6, 0.6, 1.0]]), (n_types + 1, 1))
    colours[0] = 0.0
    area = np.zeros(n_types + 1, np.int64)
    for v in views:
        area += np.bincount(np.asarray(v, np.int64).ravel(), minlength=n_types + 1)[:n_types + 1]
    area[0] = 0
    present = np.flatnonzero(area)
    present = present[np.argsort(-area[present], kind="stable")]
    colours[present] = palette[np.arange(present.size) % len(palette)]
    return colours


def _new_figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _extent(shape: Sequence[int], factor: int = 1, origin: tuple[int, int] = (0, 0)) -> tuple[float, float, float, float]:
    """imshow extent in raw pixel coordinates (left, right, bottom, top)."""
    y0, x0 = origin
    return (x0, x0 + shape[1] * factor, y0 + shape[0] * factor, y0)


# ------------------------------------------------------------------------------------------------ figures
def plot_section_overview(path: str | os.PathLike, labels: np.ndarray, background: np.ndarray, density: np.ndarray, *,
                          factor: int = 1, background_name: str = "DAPI", n_cells: int | None = None,
                          window: tuple[int, int, int, int] | None = None, density_sigma_px: float = 4.0,
                          dim: float = 1.0, title: str = "") -> Path:
    """Whole section: cell outlines on the nuclear image and on the total spot density.

    Parameters
    ----------
    path : PNG to write.
    labels : (h, w) integer ndarray, cell ids (already down-sampled by ``factor``; see :func:`downsample_labels`).
    background : (h, w) ndarray, DAPI (or the nucleus mask) at the same scale.
    density : (h, w) ndarray, spots per ``factor`` x ``factor`` block (see :func:`spot_density`); shown smoothed
        (Gaussian, sigma ``density_sigma_px`` raw pixels) as spots per 100 px^2.
    factor : down-sampling factor of the three arrays (axes are labelled in raw pixels).
    background_name : what ``background`` shows, for the title.
    n_cells : number of cells, for the title (default: counted in ``labels``).
    window : (y0, x0, h, w) of the zoomed crop, drawn as a box (unless it is the whole section).
    density_sigma_px : smoothing of the density panel, in raw pixels.
    dim : brightest grey of the background (< 1 keeps a binary nucleus mask from outshining the outlines).
    title : figure title prefix (e.g. the run and epoch).

    Notes
    -----
    Each panel is drawn at about one figure pixel per array pixel (at least 600 px across), so one-pixel outlines
    stay visible; a landscape section puts the panels one above the other.
    """
    from matplotlib.patches import Rectangle
    from scipy import ndimage

    h, w = labels.shape
    outline = _outline_rgba(labels, _OUTLINE_FINAL)  # (h, w, 4)
    n_cells = int(np.unique(labels[labels > 0]).size) if n_cells is None else n_cells
    ext = _extent(labels.shape, factor)
    panel_w = max(w, 600) / DPI  # inches: one figure pixel per array pixel
    panel_h = panel_w * h / w
    stacked = w > 1.2 * h
    if stacked:
        fig = _new_figure(panel_w + 2.0, 2 * panel_h + 1.6)
        axes = fig.subplots(2, 1)
    else:
        fig = _new_figure(2 * panel_w + 2.6, panel_h + 1.2)
        axes = fig.subplots(1, 2)
    bg = np.asarray(background, np.float32)
    hi = float(np.percentile(bg, 99.5)) if bg.size else 1.0
    hi = hi if hi > 0 else 1.0
    im0 = axes[0].imshow(bg, cmap="gray", vmin=0, vmax=hi / max(dim, 1e-3), extent=ext, interpolation="nearest")
    axes[0].imshow(outline, extent=ext, interpolation="nearest")
    axes[0].set_title(f"cell outlines (yellow) on {background_name}")
    cb0 = fig.colorbar(im0, ax=axes[0], shrink=0.8, label=f"{background_name}" + (" (block mean)" if factor > 1 else ""))
    cb0.ax.set_ylim(0, hi)
    per_100 = ndimage.gaussian_filter(np.asarray(density, np.float64), max(0.5, density_sigma_px / factor)) \
        * 100.0 / factor ** 2
    im1 = axes[1].imshow(per_100, cmap="magma", vmin=0, vmax=max(float(np.percentile(per_100, 99.5)), 1e-6),
                         extent=ext, interpolation="nearest")
    axes[1].imshow(_outline_rgba(labels, _OUTLINE_INITIAL), extent=ext, interpolation="nearest")
    axes[1].set_title("cell outlines (cyan) on the total spot density")
    cb = fig.colorbar(im1, ax=axes[1], shrink=0.8)
    cb.set_label(f"spots per 100 px$^2$ (Gaussian sigma {density_sigma_px:g} px)")
    boxed = window is not None and window[2] * window[3] < 0.9 * h * w * factor ** 2  # not the whole section
    for ax in axes:
        ax.set_xlabel("x (raw pixels)")
        ax.set_ylabel("y (raw pixels)")
        if boxed:
            y0, x0, wh, ww = window
            ax.add_patch(Rectangle((x0, y0), ww, wh, fill=False, edgecolor="white", linewidth=1.5, linestyle="--"))
    scale = f", shown at 1/{factor} scale" if factor > 1 else ""
    fig.suptitle(f"{title}{': ' if title else ''}{n_cells} cells{scale}{'; dashed box = zoom window' if boxed else ''}")
    return _save(fig, path)


def plot_zoom(path: str | os.PathLike, final: np.ndarray, initial: np.ndarray, background: np.ndarray,
              celltype: np.ndarray, spot_xy: np.ndarray, spot_assigned: np.ndarray, *, origin: tuple[int, int] = (0, 0),
              celltypes: Sequence[str] = (), background_name: str = "DAPI", dim: float = 1.0,
              title: str = "") -> Path:
    """A zoomed window at full resolution: nuclei vs cells on the nuclear image, and the spots on the cell types.

    Parameters
    ----------
    path : PNG to write.
    final, initial : (h, w) integer ndarrays, cell ids of the run and the nucleus ids it started from (the window).
    background : (h, w) DAPI (or nucleus mask) of the window.
    celltype : (h, w) integer cell-type ids of the window (0 = background).
    spot_xy : (n, 2) float, raw (x, y) of the spots inside the window.
    spot_assigned : (n,) bool, whether each spot was assigned to a cell.
    origin : (y0, x0) of the window in the raw frame.
    celltypes : cell-type names in id order (legend).
    background_name : what ``background`` shows.
    dim : brightest grey of the background (see :func:`plot_section_overview`).
    title : figure title prefix.
    """
    from matplotlib.patches import Patch

    h, w = final.shape
    ext = _extent(final.shape, 1, origin)
    fig = _new_figure(14.5, max(3.0, 6.0 * h / w + 1.0))
    axes = fig.subplots(1, 2)
    bg = np.asarray(background, np.float32)
    hi = float(np.percentile(bg, 99.5)) if bg.size else 1.0
    axes[0].imshow(bg, cmap="gray", vmin=0, vmax=(hi if hi > 0 else 1.0) / max(dim, 1e-3), extent=ext,
                   interpolation="nearest")
    axes[0].imshow(_outline_rgba(initial, _OUTLINE_INITIAL), extent=ext, interpolation="nearest")
    axes[0].imshow(_outline_rgba(final, _OUTLINE_FINAL), extent=ext, interpolation="nearest")
    axes[0].set_title(f"{background_name}: nuclei (cyan) and cells (yellow)")
    axes[0].legend(handles=[Patch(color=_OUTLINE_INITIAL, label="initial nuclei"),
                            Patch(color=_OUTLINE_FINAL, label="final cells")], loc="upper right", fontsize=8)

    n_types = max(len(celltypes) - 1, int(celltype.max(initial=0)))
    colours = _type_colours(n_types, celltype)
    rgba = colours[celltype]
    rgba[..., 3] *= 0.55
    axes[1].set_facecolor("white")
    axes[1].imshow(rgba, extent=ext, interpolation="nearest")
    axes[1].imshow(_outline_rgba(final, (0.2, 0.2, 0.2)), extent=ext, interpolation="nearest")
    xy = np.asarray(spot_xy, np.float64).reshape(-1, 2)
    assigned = np.asarray(spot_assigned, bool)
    axes[1].scatter(xy[assigned, 0], xy[assigned, 1], s=3, c="black", linewidths=0,
                    label=f"spot in a cell ({int(assigned.sum())})")
    axes[1].scatter(xy[~assigned, 0], xy[~assigned, 1], s=8, c="red", marker="x", linewidths=0.6,
                    label=f"unassigned spot ({int((~assigned).sum())})")
    axes[1].set_xlim(ext[0], ext[1])
    axes[1].set_ylim(ext[2], ext[3])
    axes[1].set_title("cell types of the final cells, with the spots")
    # one legend outside the axes (the layout engine makes room for it): spots, then the types in view by area
    present, area = np.unique(celltype[celltype > 0], return_counts=True)
    present = present[np.argsort(-area, kind="stable")]
    spot_handles, spot_labels = axes[1].get_legend_handles_labels()
    type_handles = [Patch(color=colours[t][:3], alpha=0.7) for t in present[:16]]
    type_labels = [celltypes[t] if t < len(celltypes) else f"type {t}" for t in present[:16]]
    if len(present) > 16:
        type_handles.append(Patch(color="white"))
        type_labels.append(f"... {len(present) - 16} more types")
    axes[1].legend(spot_handles + type_handles, spot_labels + type_labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                   fontsize=7, frameon=False, title="spots / cell types in view", title_fontsize=8)
    for ax in axes:
        ax.set_xlabel("x (raw pixels)")
        ax.set_ylabel("y (raw pixels)")
    fig.suptitle(f"{title}{': ' if title else ''}zoom on the densest {h} x {w} px window "
                 f"(x {origin[1]}-{origin[1] + w}, y {origin[0]}-{origin[0] + h})")
    return _save(fig, path)


def plot_initial_vs_final(path: str | os.PathLike, initial: np.ndarray, final: np.ndarray, initial_types: np.ndarray,
                          final_types: np.ndarray, initial_areas: np.ndarray, final_areas: np.ndarray, *,
                          origin: tuple[int, int] = (0, 0), title: str = "") -> Path:
    """Initial nuclei vs final cells in one window (coloured by cell type), and the area distributions.

    Parameters
    ----------
    path : PNG to write.
    initial, final : (h, w) integer ndarrays, nucleus ids and cell ids of the window.
    initial_types, final_types : (h, w) integer cell-type ids of the same window.
    initial_areas, final_areas : (n,) areas in pixels of every nucleus / cell of the whole section.
    origin : (y0, x0) of the window in the raw frame.
    title : figure title prefix.
    """
    h, w = final.shape
    ext = _extent(final.shape, 1, origin)
    n_types = int(max(initial_types.max(initial=0), final_types.max(initial=0)))
    colours = _type_colours(n_types, final_types, initial_types)
    fig = _new_figure(15.0, max(3.2, 4.6 * h / w + 1.2))
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 0.9])
    for ax, inst, types, name in ((axes[0], initial, initial_types, "initial nuclei"),
                                  (axes[1], final, final_types, "final cells")):
        rgba = colours[types]
        rgba[..., 3] *= 0.75
        ax.set_facecolor("white")
        ax.imshow(rgba, extent=ext, interpolation="nearest")
        ax.imshow(_outline_rgba(inst, (0.1, 0.1, 0.1)), extent=ext, interpolation="nearest")
        covered = float((inst > 0).mean()) if inst.size else 0.0
        ax.set_title(f"{name}: {np.unique(inst[inst > 0]).size} in view, {100 * covered:.0f}% of pixels")
        ax.set_xlabel("x (raw pixels)")
        ax.set_ylabel("y (raw pixels)")
    a0 = np.asarray(initial_areas, np.float64)
    a1 = np.asarray(final_areas, np.float64)
    a0, a1 = a0[a0 > 0], a1[a1 > 0]
    if a0.size or a1.size:
        both = np.concatenate([a0, a1])
        bins = np.geomspace(max(1.0, both.min() / 1.2), both.max() * 1.2 + 1, 40)
        axes[2].hist(a0, bins=bins, alpha=0.6, color="tab:cyan", label=f"nuclei (median {np.median(a0) if a0.size else 0:.0f} px)")
        axes[2].hist(a1, bins=bins, alpha=0.6, color="tab:orange", label=f"cells (median {np.median(a1) if a1.size else 0:.0f} px)")
        axes[2].set_xscale("log")
        axes[2].legend(fontsize=8)
    axes[2].set_xlabel("area (pixels, log scale)")
    axes[2].set_ylabel("number of objects")
    axes[2].set_title("areas over the whole section")
    fig.suptitle(f"{title}{': ' if title else ''}growth from nuclei to cells (colour = cell type, window at "
                 f"x {origin[1]}, y {origin[0]})")
    return _save(fig, path)


def plot_training_curves(path: str | os.PathLike, log_table: pd.DataFrame, *, title: str = "") -> Path:
    """One small panel per numeric column of ``train_log.csv`` against the epoch.

    Parameters
    ----------
    path : PNG to write.
    log_table : DataFrame with an ``epoch`` column (else the row number is used) and numeric columns; columns that
        are not numeric or entirely empty are skipped.
    title : figure title prefix.
    """
    table = log_table.copy()
    epoch = table.pop("epoch").to_numpy() if "epoch" in table.columns else np.arange(len(table))
    columns = [c for c in table.columns
               if pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()]
    if not columns:
        raise ValueError("log_table has no numeric column besides 'epoch' to plot")
    n_cols = min(3, len(columns))
    n_rows = -(-len(columns) // n_cols)
    fig = _new_figure(4.2 * n_cols, 2.9 * n_rows + 0.5)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax, col in zip(axes, columns):
        values = table[col].to_numpy(dtype=np.float64)
        ok = np.isfinite(values)
        ax.plot(epoch[ok], values[ok], marker="o" if ok.sum() <= 30 else None, markersize=3, linewidth=1.3)
        ax.set_title(_LOG_TITLES.get(col, col), fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}{': ' if title else ''}training log ({len(table)} epochs)")
    return _save(fig, path)


def plot_gene_ranking_heatmap(path: str | os.PathLike, scores: pd.DataFrame, *, top_n: int = 3, max_genes: int = 40,
                              method: str = "CID", title: str = "") -> Path:
    """Heat map of the most important genes per cell type (rows scaled to 0..1).

    Parameters
    ----------
    path : PNG to write.
    scores : DataFrame, cell types (index) x genes (columns), mean attribution scores (larger = more important).
    top_n : the top genes of each type that enter the columns (their union, at most ``max_genes``).
    max_genes : cap on the number of columns.
    method : attribution method, for the labels.
    title : figure title prefix.

    Notes
    -----
    Each row is min-max scaled over *all* genes of that type, so 1 marks the type's top gene and colours compare
    genes within a type (raw scores are in ``gene_celltype_scores.csv``). A black dot marks each type's own top-N.
    Rows whose scores are all missing are dropped.
    """
    table = scores.astype(np.float64).dropna(how="all")
    if table.empty:
        raise ValueError("scores has no cell type with a finite score")
    values = table.to_numpy()
    lo = np.nanmin(values, axis=1, keepdims=True)
    hi = np.nanmax(values, axis=1, keepdims=True)
    scaled = np.where(hi > lo, (values - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0)
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), axis=1, kind="stable")[:, :top_n]
    picked: list[int] = []
    for row in order:  # types in row order, their top genes in rank order: a roughly diagonal layout
        for g in row:
            if g not in picked and len(picked) < max_genes:
                picked.append(int(g))
    shown = scaled[:, picked]
    n_t, n_g = shown.shape
    fig = _new_figure(min(22.0, max(7.0, 3.2 + 0.32 * n_g)), min(26.0, max(4.0, 2.2 + 0.24 * n_t)))
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    rr, cc = np.nonzero((np.asarray(picked)[None, :, None] == order[:, None, :]).any(axis=2))  # (types, shown genes)
    ax.scatter(cc, rr, s=9, c="white", marker="o", edgecolors="black", linewidths=0.5)
    ax.set_xticks(np.arange(n_g), [str(table.columns[g]) for g in picked], rotation=90, fontsize=8)
    ax.set_yticks(np.arange(n_t), [str(t) for t in table.index], fontsize=8 if n_t <= 40 else 6)
    ax.set_xlabel(f"gene (union of the top {top_n} per cell type)")
    ax.set_ylabel("cell type")
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label(f"mean {method} score, scaled per cell type\n(0 = its lowest gene, 1 = its top gene)")
    fig.suptitle(f"{title}{chr(10) if title else ''}{method} attribution: the network's sensitivity to each gene per "
                 f"cell type (dot = the row's top {top_n}); {_RECOVERY.get(method, '')}", fontsize=11)
    return _save(fig, path)


#: What each attribution's ranking was measured to recover (README "Gene rankings"), shown with its heat map.
_RECOVERY = {"CID": "measured marker recovery (precision@3, simulated sections) 0.00-0.11, chance 0.10: not a "
                    "gene ranking - read gene_ranking.csv",
             "IG": "measured marker recovery (precision@3, simulated sections) 0.94-1.00"}


def plot_dotplot(path: str | os.PathLike, de: pd.DataFrame, *, top_n: int = 3, title: str = "") -> Path:
    """Dot plot of the top genes per cell type of the differential expression (``gene_ranking.csv``): colour = mean
    spot count per cell of the type (scaled per gene to its largest over types), size = fraction of the type's cells
    expressing it."""
    top = de[de["rank"] <= top_n].sort_values(["celltype", "rank"])
    genes = list(dict.fromkeys(top["gene"]))
    types = list(dict.fromkeys(de["celltype"]))
    if not genes:
        raise ValueError("the ranking has no gene")
    table = de[de["gene"].isin(genes)].set_index(["celltype", "gene"])
    mean = table["mean_in"].unstack().reindex(index=types, columns=genes).to_numpy(np.float64)
    frac = table["pct_in"].unstack().reindex(index=types, columns=genes).to_numpy(np.float64)
    scaled = mean / np.where(np.nanmax(mean, 0) > 0, np.nanmax(mean, 0), 1.0)
    fig = _new_figure(min(22.0, max(6.0, 3.0 + 0.3 * len(genes))), min(26.0, max(3.5, 1.8 + 0.28 * len(types))))
    ax = fig.subplots()
    yy, xx = np.mgrid[0:len(types), 0:len(genes)]
    dots = ax.scatter(xx.ravel(), yy.ravel(), s=np.nan_to_num(frac.ravel()) * 160 + 1, c=scaled.ravel(),
                      cmap="Reds", vmin=0, vmax=1, edgecolors="grey", linewidths=0.3)
    ax.set_xticks(np.arange(len(genes)), genes, rotation=90, fontsize=8)
    ax.set_yticks(np.arange(len(types)), types, fontsize=8 if len(types) <= 40 else 6)
    ax.set_xlim(-0.6, len(genes) - 0.4)
    ax.set_ylim(len(types) - 0.4, -0.6)
    cb = fig.colorbar(dots, ax=ax, shrink=0.8)
    cb.set_label("mean spots per cell, scaled per gene")
    for f in (0.25, 0.5, 1.0):  # size legend
        ax.scatter([], [], s=f * 160 + 1, c="lightgrey", edgecolors="grey", label=f"{f:.0%} of cells")
    ax.legend(loc="upper left", bbox_to_anchor=(1.25, 1.0), fontsize=7, frameon=False)
    fig.suptitle(f"{title}{chr(10) if title else ''}top {top_n} genes per cell type by differential expression "
                 f"(Wilcoxon vs all other cells)", fontsize=11)
    return _save(fig, path)
