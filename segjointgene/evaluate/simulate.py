"""Synthetic sections with known ground truth (layer 1: numpy, scipy, scikit-image; no torch).

:func:`simulate_section` draws a section whose cells are irregular, of uneven size (type- and cell-specific radii),
touching (``dense``) or isolated by background (``sparse``), with off-centre nuclei smaller than the cells,
type-specific marker genes and uniform background noise spots. :func:`write_simulated` writes it in the raw CA1
layout (cells / spots / celltype CSVs and a uint16 DAPI TIFF) plus a sibling ``<dir>_truth/`` folder with the
whole-cell masks, the nucleus masks, each spot's true cell, the cell table and the marker table.

The ``hard`` preset (``--sim_preset hard``) adds what makes nucleus expansion wrong in real tissue: log-normal
cell sizes, elongated cells (log-normal aspect ratio, random orientation) with stronger outline wobble, nuclei
further off-centre, an over-dispersed (gamma) per-cell expression scale, a programme of non-marker genes shared by
all types, markers that leak into one other type, ambient noise (genes in the section's mix, not uniform), in
dense tissue holes, and a DAPI image with uneven brightness, dim rims and dark nucleoli (often on the centroid). The ``basic`` preset draws exactly what the first release drew.

Everything is drawn from one ``numpy.random.Generator``: the same seed gives the same section, byte for byte.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from ..config import SimulateConfig
from ..constants import BACKGROUND, TRUTH_SUFFIX, TruthFiles
from ..io.files import write_csv, write_raw_section, write_tif

log = logging.getLogger(__name__)

__all__ = ["SimulatedSection", "simulate_section", "truth_dir_of", "write_simulated"]

#: Marker genes are expressed this many times above the baseline of every gene.
_MARKER_FOLD = 12.0
#: Normalised-distance cap of a cell: dense cells grow until they meet a neighbour, sparse ones stay compact.
_CAP = {"dense": 1.45, "sparse": 1.0}
#: Minimum centre separation, in units of the sum of the two radii.
_SEPARATION = {"dense": 0.75, "sparse": 1.25}


@dataclass(frozen=True)
class _Realism:
    """How far a preset departs from round, uniform cells (0 = the basic section's behaviour)."""

    size_sigma: float = 0.0  # log-normal sd of a cell's radius (0: uniform in 0.85-1.15)
    aspect_sigma: float = 0.0  # log-normal sd of a cell's aspect ratio
    wobble: float = 1.0  # scale of the outline harmonics
    nucleus_shift: tuple[float, float] = (0.15, 0.45)  # nucleus offset, in equivalent cell radii
    scale_shape: float = 0.0  # gamma shape of the per-cell expression scale (0: no per-cell scale)
    shared_fraction: float = 0.0  # fraction of a cell's spots drawn from a programme shared by every type
    marker_leak: float = 0.0  # a type's markers are expressed at this fraction of their fold in one other type
    ambient_fraction: float = 0.0  # noise spots whose gene follows the section's mix instead of being uniform
    holes: float = 0.0  # fraction of dense tissue cut out as holes
    dapi_texture: bool = False  # uneven brightness, dim rims and dark nucleoli in the DAPI image


PRESETS = {"basic": _Realism(),
           "hard": _Realism(size_sigma=0.3, aspect_sigma=0.35, wobble=1.6, nucleus_shift=(0.25, 0.6), scale_shape=2.0,
                            shared_fraction=0.25, marker_leak=0.25, ambient_fraction=0.5, holes=0.12,
                            dapi_texture=True)}


@dataclass(frozen=True)
class SimulatedSection:
    """A synthetic section and its ground truth.

    Attributes
    ----------
    spots : DataFrame ``gene, x, y, cell, celltype``; ``cell`` is the true cell (0 = background noise).
    cells : DataFrame ``cell, x, y, celltype, area_px, cell_x, cell_y``; ``x, y`` is the nucleus centroid
        (what a real cells table holds), ``cell_x, cell_y`` the whole-cell centroid.
    instance : (H, W) uint32 whole-cell instance mask, 0 = background.
    nuclei : (H, W) uint32 nucleus mask, ids = ``cell``.
    dapi : (H, W) uint16 DAPI-like image.
    markers : DataFrame ``celltype, gene, rate, is_marker`` (relative expression rates per type).
    """

    spots: pd.DataFrame
    cells: pd.DataFrame
    instance: np.ndarray
    nuclei: np.ndarray
    dapi: np.ndarray
    markers: pd.DataFrame


def _place_centres(size: int, radius: float, n_types: int, mode: str, rng: np.random.Generator,
                   realism: _Realism = PRESETS["basic"]):
    """Dart throwing: centres at least ``sep * (r_i + r_j)`` apart; radii depend on the type and the cell."""
    type_scale = rng.permutation(np.linspace(0.65, 1.4, n_types)) if n_types > 1 else np.ones(1)
    type_freq = rng.uniform(0.5, 1.5, n_types)
    type_freq /= type_freq.sum()
    sep = _SEPARATION[mode]
    bucket = 2.0 * radius * 1.4 * sep
    grid: dict[tuple[int, int], list[int]] = {}
    centres, radii, types = [], [], []
    n_tries = int(60 * size * size / (np.pi * radius * radius))
    cand = rng.uniform(0, size, (n_tries, 2))
    cand_type = rng.choice(n_types, n_tries, p=type_freq)
    if realism.size_sigma:
        spread = np.exp(realism.size_sigma * rng.standard_normal(n_tries) - realism.size_sigma ** 2 / 2)
    else:
        spread = rng.uniform(0.85, 1.15, n_tries)
    cand_r = radius * type_scale[cand_type] * spread
    reach = int(np.ceil(2 * cand_r.max() * sep / bucket)) + 1
    for (y, x), t, r in zip(cand, cand_type, cand_r):
        by, bx = int(y // bucket), int(x // bucket)
        ok = True
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                for j in grid.get((by + dy, bx + dx), ()):
                    if (centres[j][0] - y) ** 2 + (centres[j][1] - x) ** 2 < (sep * (r + radii[j])) ** 2:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault((by, bx), []).append(len(centres))
            centres.append((y, x))
            radii.append(r)
            types.append(t)
    return np.asarray(centres), np.asarray(radii), np.asarray(types, dtype=np.int64)


def _rasterise_cells(size: int, centres: np.ndarray, radii: np.ndarray, mode: str, rng: np.random.Generator,
                     realism: _Realism = PRESETS["basic"]) -> np.ndarray:
    """Instance map (ids 1..n) of a multiplicatively weighted Voronoi diagram with wobbly, capped cell outlines;
    with an aspect spread, each cell's distance is measured in its own stretched, rotated frame."""
    n = len(centres)
    harmonics = np.arange(2, 5)
    amp = rng.uniform(0.0, 0.12, (n, harmonics.size)) * np.array([2.0, 1.0, 0.7]) * realism.wobble
    phase = rng.uniform(0, 2 * np.pi, (n, harmonics.size))
    aspect, axis = np.ones(n), np.zeros(n)
    if realism.aspect_sigma:
        aspect = np.exp(np.abs(realism.aspect_sigma * rng.standard_normal(n)))
        axis = rng.uniform(0, np.pi, n)
    tree = cKDTree(centres)
    k = min(8, n)
    out = np.zeros((size, size), np.uint32)
    rows_per_chunk = max(1, 200_000 // size)
    cols = np.arange(size, dtype=np.float64) + 0.5
    for r0 in range(0, size, rows_per_chunk):
        r1 = min(size, r0 + rows_per_chunk)
        yy, xx = np.meshgrid(np.arange(r0, r1) + 0.5, cols, indexing="ij")
        pts = np.stack([yy.ravel(), xx.ravel()], 1)
        dist, idx = tree.query(pts, k=k)
        dist, idx = dist.reshape(len(pts), k), idx.reshape(len(pts), k)
        dy, dx = pts[:, None, 0] - centres[idx, 0], pts[:, None, 1] - centres[idx, 1]
        theta = np.arctan2(dy, dx)  # (N, k)
        wobble = 1.0 + np.einsum("nkh,nkh->nk", amp[idx], np.cos(harmonics * theta[..., None] + phase[idx]))
        if realism.aspect_sigma:  # long axis stretched by sqrt(aspect), short one shrunk: same area
            c, s_ = np.cos(axis[idx]), np.sin(axis[idx])
            along, across = dx * c + dy * s_, -dx * s_ + dy * c
            root = np.sqrt(aspect[idx])
            dist = np.hypot(along / root, across * root)
        u = dist / (radii[idx] * wobble)
        best = np.argmin(u, axis=1)
        u_best = u[np.arange(len(pts)), best]
        ids = idx[np.arange(len(pts)), best] + 1
        out[r0:r1] = np.where(u_best < _CAP[mode], ids, BACKGROUND).reshape(r1 - r0, size)
    return out


def _keep_main_component(instance: np.ndarray) -> np.ndarray:
    """Keep, for every id, only its largest 4-connected piece (weighted Voronoi cells can fragment)."""
    from skimage.measure import label

    comp = label(instance, background=BACKGROUND, connectivity=1)
    n_comp = int(comp.max())
    if n_comp == 0:
        return instance
    comp_area = np.bincount(comp.ravel(), minlength=n_comp + 1)
    comp_id = np.zeros(n_comp + 1, np.int64)
    comp_id[comp.ravel()] = instance.ravel()
    order = np.lexsort((-comp_area[1:], comp_id[1:]))  # by id, largest first
    keep = np.zeros(n_comp + 1, bool)
    ids_sorted = comp_id[1:][order]
    first = np.ones(order.size, bool)
    first[1:] = ids_sorted[1:] != ids_sorted[:-1]
    keep[order[first] + 1] = True
    return np.where(keep[comp], instance, BACKGROUND).astype(np.uint32)


def _cut_holes(instance: np.ndarray, fraction: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Background where a smooth random field is in its top ``fraction``: holes of a few cells in the tissue."""
    field = ndimage.gaussian_filter(rng.standard_normal(instance.shape), 2.5 * radius)
    return np.where(field > np.quantile(field, 1.0 - fraction), BACKGROUND, instance).astype(np.uint32)


def _draw_nuclei(instance: np.ndarray, rng: np.random.Generator,
                 shift_range: tuple[float, float] = (0.15, 0.45)) -> np.ndarray:
    """An off-centre elliptical nucleus inside (2 px away from the edge of) every cell."""
    size = instance.shape[0]
    eroded = (ndimage.minimum_filter(instance, 5) == ndimage.maximum_filter(instance, 5)) & (instance > 0)
    nuclei = np.zeros_like(instance)
    objects = ndimage.find_objects(instance)
    for i, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        cell = instance[sl] == i
        inner = eroded[sl] & cell
        if inner.sum() < 12:
            continue
        ys, xs = np.nonzero(cell)
        cy, cx = ys.mean(), xs.mean()
        r_eq = np.sqrt(cell.sum() / np.pi)
        a = r_eq * rng.uniform(0.38, 0.55)
        b = a * rng.uniform(0.65, 1.0)
        ang = rng.uniform(0, np.pi)
        shift_dir = rng.uniform(0, 2 * np.pi)
        shift = r_eq * rng.uniform(*shift_range)
        yy, xx = np.mgrid[0:cell.shape[0], 0:cell.shape[1]]
        for scale in (1.0, 0.6, 0.3, 0.0):  # pull the nucleus back towards the centre until it fits
            ny, nx = cy + scale * shift * np.sin(shift_dir), cx + scale * shift * np.cos(shift_dir)
            dy, dx = yy - ny, xx - nx
            u = (dy * np.cos(ang) - dx * np.sin(ang)) / a
            v = (dy * np.sin(ang) + dx * np.cos(ang)) / b
            nuc = (u * u + v * v <= 1.0) & inner
            if nuc.sum() >= 0.6 * np.pi * a * b or scale == 0.0:
                break
        if nuc.sum() >= 4:
            nuclei[sl][nuc] = i
    del size
    return nuclei


def _expression(n_genes: int, n_types: int, markers_per_type: int, rng: np.random.Generator,
                realism: _Realism = PRESETS["basic"]):
    """Per-type gene probabilities: every gene at a baseline, the type's markers ``_MARKER_FOLD`` times higher; with
    a leak, each type's markers also at ``marker_leak`` of that fold in one other type; with a shared programme, a
    ``shared_fraction`` of every type's expression goes to a random profile over the non-marker genes."""
    genes = [f"Gene{g:03d}" for g in range(n_genes)]
    order = rng.permutation(n_genes)
    rates = np.ones((n_types, n_genes))
    is_marker = np.zeros((n_types, n_genes), bool)
    for t in range(n_types):
        marker_genes = order[t * markers_per_type:(t + 1) * markers_per_type]
        rates[t, marker_genes] = _MARKER_FOLD * rng.uniform(0.7, 1.3, markers_per_type)
        is_marker[t, marker_genes] = True
    probs = rates / rates.sum(1, keepdims=True)
    if realism.marker_leak and n_types > 1:
        for t in range(n_types):
            other = (t + 1 + rng.integers(0, n_types - 1)) % n_types
            leak = rates[t] * is_marker[t] * realism.marker_leak
            rates[other] = np.maximum(rates[other], leak)
        probs = rates / rates.sum(1, keepdims=True)
    if realism.shared_fraction:
        shared = rng.gamma(1.0, 1.0, n_genes) * ~is_marker.any(0)
        shared /= shared.sum()
        probs = (1 - realism.shared_fraction) * probs + realism.shared_fraction * shared
    return genes, probs, is_marker


def _dapi_texture(nuclei: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-pixel factor of a real DAPI's flaws: uneven brightness between nuclei and across the field, a dim rim,
    and dark nucleoli - often on the centroid - so that a seed on the centroid pixel is locally dim."""
    n = int(nuclei.max())
    factor = np.concatenate([[0.0], rng.uniform(0.4, 1.0, n)])[nuclei]
    field = ndimage.gaussian_filter(rng.standard_normal(nuclei.shape), 40.0)
    factor *= np.exp(0.6 * field / (field.std() + 1e-9))
    inner = ndimage.minimum_filter(nuclei, 3) == nuclei
    factor[(nuclei > 0) & ~inner] *= 0.45  # dim rim
    idx = np.arange(1, n + 1)
    centres = np.asarray(ndimage.center_of_mass(np.ones_like(nuclei), nuclei, idx)).reshape(-1, 2)
    yy, xx = np.indices(nuclei.shape)
    for i, (y, x) in enumerate(centres, start=1):  # 1-2 nucleoli, the first near the centroid
        for k in range(rng.integers(1, 3)):
            oy, ox = (rng.normal(0, 1.2, 2) if k == 0 else rng.normal(0, 2.5, 2))
            r = rng.uniform(1.2, 2.2)
            y0, x0 = int(round(y + oy)), int(round(x + ox))
            sl = (slice(max(0, y0 - 3), y0 + 4), slice(max(0, x0 - 3), x0 + 4))
            disc = ((yy[sl] - y - oy) ** 2 + (xx[sl] - x - ox) ** 2 <= r * r) & (nuclei[sl] == i)
            factor[sl][disc] *= 0.4
    return factor


def _render_dapi(nuclei: np.ndarray, rng: np.random.Generator, realism: _Realism = PRESETS["basic"]) -> np.ndarray:
    n = int(nuclei.max())
    if realism.dapi_texture:
        img = _dapi_texture(nuclei, rng) * 3000.0
        img *= 1.0 + 0.15 * rng.standard_normal(img.shape)
        img = ndimage.gaussian_filter(img, 1.2) + 200.0 + 60.0 * rng.standard_normal(img.shape)
        return np.clip(img, 0, 65535).astype(np.uint16)
    brightness = np.concatenate([[0.0], rng.uniform(0.55, 1.0, n)])
    img = brightness[nuclei] * 3000.0
    img *= 1.0 + 0.15 * rng.standard_normal(img.shape)  # chromatin texture
    img = ndimage.gaussian_filter(img, 1.2) + 200.0 + 60.0 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 65535).astype(np.uint16)


def simulate_section(config: SimulateConfig = SimulateConfig(), rng: np.random.Generator | int | None = None) -> SimulatedSection:
    """Draw a synthetic section with ground truth.

    Parameters
    ----------
    config : sizes, numbers of genes / types / markers, dense or sparse mode, noise fraction, radius, spot density.
    rng : numpy Generator or seed; the only source of randomness.

    Returns
    -------
    SimulatedSection

    Examples
    --------
    >>> from segjointgene.config import SimulateConfig
    >>> sim = simulate_section(SimulateConfig(size_px=64, n_genes=8, n_celltypes=2), rng=0)
    >>> sim.instance.shape, sim.dapi.dtype.name
    ((64, 64), 'uint16')
    >>> bool(((sim.nuclei > 0) <= (sim.instance == sim.nuclei)).all())  # every nucleus lies inside its own cell
    True
    """
    rng = np.random.default_rng(rng)
    c = config
    realism = PRESETS[c.preset]
    centres, radii, types = _place_centres(c.size_px, c.cell_radius_px, c.n_celltypes, c.mode, rng, realism)
    if len(centres) == 0:
        raise ValueError(f"no cell fits a {c.size_px} px section with radius {c.cell_radius_px}; use a larger --sim_size")
    instance = _rasterise_cells(c.size_px, centres, radii, c.mode, rng, realism)
    if realism.holes and c.mode == "dense":
        instance = _cut_holes(instance, realism.holes, c.cell_radius_px, rng)
    instance = _keep_main_component(instance)
    nuclei = _draw_nuclei(instance, rng, realism.nucleus_shift)

    # renumber so that every id has a nucleus: ids 1..n in order of placement
    present = np.unique(nuclei[nuclei > 0])
    relabel = np.zeros(len(centres) + 1, np.uint32)
    relabel[present] = np.arange(1, present.size + 1, dtype=np.uint32)
    instance, nuclei = relabel[instance], relabel[nuclei]
    cell_type = types[present - 1]

    genes, probs, is_marker = _expression(c.n_genes, c.n_celltypes, c.markers_per_type, rng, realism)
    type_names = [f"Type{t + 1}" for t in range(c.n_celltypes)]
    spots = _draw_spots(instance, cell_type, probs, genes, type_names, c, rng, realism)
    cells = _cell_table(instance, nuclei, cell_type, type_names, c.size_px)
    markers = pd.DataFrame([
        {"celltype": type_names[t], "gene": genes[g], "rate": float(probs[t, g]), "is_marker": bool(is_marker[t, g])}
        for t in range(c.n_celltypes) for g in range(c.n_genes)
    ])
    return SimulatedSection(spots=spots, cells=cells, instance=instance, nuclei=nuclei,
                            dapi=_render_dapi(nuclei, rng, realism), markers=markers)


def _draw_spots(instance: np.ndarray, cell_type: np.ndarray, probs: np.ndarray, genes: list[str],
                type_names: list[str], c: SimulateConfig, rng: np.random.Generator,
                realism: _Realism = PRESETS["basic"]) -> pd.DataFrame:
    """Poisson counts per cell (times a gamma per-cell scale with ``scale_shape``) at uniform positions over its
    pixels, genes from its type's profile; plus background noise (a ``noise_fraction`` of all spots; uniform genes,
    or for an ``ambient_fraction`` of them genes in the section's mix); rows shuffled."""
    n_cells = cell_type.size
    flat = instance.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(n_cells + 2))
    area = np.diff(bounds)[1:n_cells + 1]
    scale = rng.gamma(realism.scale_shape, 1.0 / realism.scale_shape, n_cells) if realism.scale_shape else 1.0
    counts = rng.poisson(c.spot_density * area * scale)
    owner = np.repeat(np.arange(1, n_cells + 1), counts)
    pick = bounds[owner] + (rng.random(owner.size) * area[owner - 1]).astype(np.int64)
    pix = order[pick]
    gene_idx = np.empty(owner.size, np.int64)
    cum = np.cumsum(probs, axis=1)
    u = rng.random(owner.size)
    for t in range(c.n_celltypes):
        sel = cell_type[owner - 1] == t
        gene_idx[sel] = np.minimum(np.searchsorted(cum[t], u[sel]), c.n_genes - 1)
    ys, xs = np.divmod(pix, c.size_px)

    n_noise = int(round(owner.size * c.noise_fraction / (1.0 - c.noise_fraction)))
    noise_pix = rng.integers(0, c.size_px * c.size_px, n_noise)
    ny, nx = np.divmod(noise_pix, c.size_px)
    all_y = np.concatenate([ys, ny]) + rng.random(owner.size + n_noise)
    all_x = np.concatenate([xs, nx]) + rng.random(owner.size + n_noise)
    noise_gene = rng.integers(0, c.n_genes, n_noise)
    if realism.ambient_fraction and gene_idx.size:
        ambient = rng.random(n_noise) < realism.ambient_fraction
        noise_gene[ambient] = gene_idx[rng.integers(0, gene_idx.size, int(ambient.sum()))]
    all_gene = np.concatenate([gene_idx, noise_gene])
    all_cell = np.concatenate([owner, np.zeros(n_noise, np.int64)])
    perm = rng.permutation(all_cell.size)  # interleave: file order says nothing about the truth
    type_of_cell = np.array([""] + [type_names[t] for t in cell_type], dtype=object)
    return pd.DataFrame({
        "gene": np.asarray(genes, dtype=object)[all_gene[perm]],
        "x": np.round(all_x[perm], 3), "y": np.round(all_y[perm], 3),
        "cell": all_cell[perm], "celltype": type_of_cell[all_cell[perm]],
    })


def _cell_table(instance: np.ndarray, nuclei: np.ndarray, cell_type: np.ndarray, type_names: list[str],
                size: int) -> pd.DataFrame:
    """Nucleus centroid (guaranteed inside its nucleus), whole-cell centroid and areas of every cell."""
    n_cells = cell_type.size
    idx = np.arange(1, n_cells + 1)
    area = np.bincount(instance.ravel(), minlength=n_cells + 1)[1:n_cells + 1]
    nuc_area = ndimage.sum_labels(np.ones_like(nuclei), nuclei, idx)
    rows = np.arange(size)[:, None] * np.ones((1, size))
    cols = np.ones((size, 1)) * np.arange(size)[None, :]
    ny_c = np.asarray(ndimage.mean(rows, nuclei, idx))
    nx_c = np.asarray(ndimage.mean(cols, nuclei, idx))
    inside = nuclei[ny_c.astype(int), nx_c.astype(int)] == idx
    for i in np.flatnonzero(~inside):  # non-convex nucleus: use its pixel closest to the centroid
        py, px = np.nonzero(nuclei == i + 1)
        j = np.argmin((py - ny_c[i]) ** 2 + (px - nx_c[i]) ** 2)
        ny_c[i], nx_c[i] = py[j], px[j]
    cy, cx = ndimage.mean(rows, instance, idx), ndimage.mean(cols, instance, idx)
    return pd.DataFrame({
        "cell": idx, "x": np.round(nx_c + 0.5, 3), "y": np.round(ny_c + 0.5, 3),
        "celltype": [type_names[t] for t in cell_type], "area_px": area,
        "nucleus_area_px": nuc_area.astype(np.int64), "cell_x": np.round(np.asarray(cx) + 0.5, 3),
        "cell_y": np.round(np.asarray(cy) + 0.5, 3),
    })


def truth_dir_of(raw_dir: str | os.PathLike) -> Path:
    """The ground-truth folder that belongs to a simulated raw folder: ``<raw_dir>_truth``."""
    raw_dir = Path(raw_dir)
    return raw_dir.with_name(raw_dir.name + TRUTH_SUFFIX)


def write_simulated(sim: SimulatedSection, raw_dir: str | os.PathLike) -> Path:
    """Write ``sim`` in the raw CA1 layout under ``raw_dir`` and its truth under ``<raw_dir>_truth``.

    Returns the truth folder. Files are written atomically; existing files of the same names are replaced (the CLI
    checks ``--overwrite`` before calling this).
    """
    raw_dir = Path(raw_dir)
    write_raw_section(raw_dir, spots=sim.spots[["gene", "x", "y"]], cells=sim.cells, dapi=sim.dapi, tag="sim")
    truth = truth_dir_of(raw_dir)
    truth.mkdir(parents=True, exist_ok=True)
    write_tif(truth / TruthFiles.INSTANCE_MASK, sim.instance)
    write_tif(truth / TruthFiles.NUCLEUS_MASK, sim.nuclei)
    write_csv(truth / TruthFiles.SPOTS, sim.spots.rename(columns={"x": "spotX", "y": "spotY"}))
    write_csv(truth / TruthFiles.CELLS, sim.cells)
    write_csv(truth / TruthFiles.MARKERS, sim.markers)
    return truth
