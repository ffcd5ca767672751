"""A per-cell model of the spots: who emitted each spot, with what probability (layer 1.5: numpy, scipy).

Every cell ``c`` (one per nucleus, of known type ``t_c``) emits spots as a Poisson process of intensity
``N_c * f_c(x) * p_{t_c}(g)``: ``N_c`` its expected count (per-cell scale), ``f_c`` a generalised-Gaussian shape
(centre and covariance per cell, shrunk towards its type's typical shape - size and elongation from the data, the
size scaled with the cell's nucleus as far as the cells' own spots show that they scale together) and
``p_t`` the type's gene profile (first from the spots on the type's nuclei, then from the assigned spots, or
fixed by a reference). With a concentration ``a`` (fitted to the nuclei's spots, :func:`nucleus_concentration`)
each cell has its own profile, the Dirichlet posterior mean ``(n_cg + a p_t(g)) / (n_c + a)`` of its spots: real
cells' counts are over-dispersed, so a spot leans to the cell that already holds its gene. Background emits
``rho_0 * p_0(g)`` per pixel of tissue (the bins that hold spots; a section's frame is mostly slide). EM alternates
the posterior of each spot over its ``k`` nearest cells and the background (E) with the cell parameters (M); a
mean-field neighbour term (each spot leans towards the cells its neighbouring spots belong to; off by default)
makes territories contiguous.
Extra per-spot log-evidence (e.g. a UNet's type posterior) can enter the E-step.

:func:`fit_spot_model` returns each spot's cell and posterior probability, and :func:`territories` rasterises the
fitted cells into an instance mask (each pixel to the cell whose shape is highest there relative to its peak,
background outside that cell's ellipse).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import gammaln, softmax

from segjointgene.constants import BACKGROUND

log = logging.getLogger(__name__)

__all__ = ["CellGeneCounts", "CellModel", "SpotModelConfig", "SpotModelFit", "ellipse_distance2", "fit_spot_model",
           "nucleus_concentration", "nucleus_stats", "territories", "tissue_area", "typical_radius"]


@dataclass(frozen=True)
class SpotModelConfig:
    """Knobs of the spot model (defaults measured on the hard simulator; see benchmarks/RESULTS.md)."""

    n_neighbours: int = 6  # candidate cells per spot
    n_iter: int = 25
    shape_power: float = 2.0  # > 0: generalised-Gaussian exponent (2 = Gaussian); <= 0: a uniform ellipse whose
    # logistic edge is -shape_power wide (Mahalanobis units)
    shape_prior: float = 8.0  # pseudo-spots pulling a cell's covariance towards its type's typical one
    centre_prior: float = 8.0  # pseudo-spots pulling a cell's centre towards its nucleus
    size_from_nucleus: bool = True  # scale each cell's prior covariance with its nucleus's area (the exponent
    # regressed from the spread of the cells' own spots)
    neighbour_weight: float = 0.0  # mean-field weight of the neighbouring spots' assignments (0 = off)
    neighbour_k: int = 6  # neighbouring spots of each spot for that term
    profile_pseudo: float = 1.0  # pseudo-count per gene (times the gene's section frequency x n_genes)
    tol: float = 1e-3  # stop when fewer than this fraction of spots change cell
    spot_edge: float | None = 2.2  # a spot beyond this Mahalanobis radius of its cell is background (None = keep)
    cell_profile: float = -1.0  # > 0: each cell's own gene profile, a Dirichlet posterior of its assigned spots with
    # this many pseudo-spots of its type's profile (a spot then leans to the cell that already holds its gene, as
    # in a negative-binomial count model); 0 = every cell of a type has the type's profile; < 0 = the concentration
    # that best explains the nuclei's spots (Dirichlet-multinomial maximum likelihood; 0 when they are multinomial)
    tissue_bin: float = 4.0  # > 0: the background rate is per pixel of tissue = the square bins (this many typical
    # cell radii wide) that hold a spot; 0 = per pixel of the whole frame (a real section's frame is mostly slide)
    temperature: float = 1.0  # the reported probability is the posterior with every log-likelihood divided by this
    # (> 1 softens it: the cells' shapes are fitted to the very spots they are scored on, so the raw posterior is
    # overconfident); the assignment itself does not depend on it


@dataclass
class CellModel:
    """Fitted per-cell parameters (index i = ``ids[i]``)."""

    ids: np.ndarray  # (m,) cell ids (nucleus ids)
    cls: np.ndarray  # (m,) type index 0..T-1
    centre: np.ndarray  # (m, 2) (y, x)
    cov: np.ndarray  # (m, 2, 2)
    count: np.ndarray  # (m,) expected spots
    profile: np.ndarray  # (T, G) gene probabilities per type
    background_rate: float  # spots per pixel
    background_profile: np.ndarray  # (G,)
    shape_power: float
    radius: float = 0.0  # a typical cell's radius (pixels), from the nuclei's spacing
    spread: np.ndarray | None = None  # (m,) trace of the second moment of each cell's own spots (no prior)
    concentration: float = 0.0  # pseudo-spots of the type profile in each cell's own profile (0 = type profiles)
    gene_counts: "CellGeneCounts | None" = None  # the cells' expected spots per gene (with a concentration)
    tissue_px: float = 0.0  # pixels of tissue (the background rate's denominator)


@dataclass(frozen=True)
class CellGeneCounts:
    """Expected spot counts per (cell, gene), by key ``cell * n_genes + gene``: a dense array of every key when
    there are at most ``DENSE_KEYS`` of them (no sort), else the sorted keys that occur and their values."""

    keys: np.ndarray | None  # None = dense
    values: np.ndarray
    n_genes: int

    #: the largest cells x genes table held dense (16 M float64 = 128 MB)
    DENSE_KEYS = 1 << 24

    @classmethod
    def from_resp(cls, cand: np.ndarray, gene: np.ndarray, w: np.ndarray, n_cells: int,
                  n_genes: int) -> "CellGeneCounts":
        key = (cand * n_genes + gene[:, None]).ravel()
        if n_cells * n_genes <= cls.DENSE_KEYS:
            return cls(None, np.bincount(key, w.ravel(), minlength=n_cells * n_genes), n_genes)
        keys, inverse = np.unique(key, return_inverse=True)
        return cls(keys, np.bincount(inverse, w.ravel(), minlength=keys.size), n_genes)

    def lookup(self, cell: np.ndarray, gene: np.ndarray) -> np.ndarray:
        """Counts at (cell, gene) (broadcast shapes); 0 where the cell holds none of the gene."""
        q = cell * self.n_genes + gene
        if self.keys is None:
            return self.values[q]
        if self.keys.size == 0:
            return np.zeros(q.shape)
        i = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
        return np.where(self.keys[i] == q, self.values[i], 0.0)


@dataclass(frozen=True)
class SpotModelFit:
    """Spot assignment (cell id, 0 = background) and its posterior probability, plus the fitted model."""

    cell: np.ndarray  # (n,) int64
    prob: np.ndarray  # (n,) float32, posterior of the assigned cell (or of background)
    model: CellModel
    n_iter: int
    candidates: np.ndarray | None = None  # (n, k) int32 cell ids of each spot's candidate cells
    posterior: np.ndarray | None = None  # (n, k + 1) float32 their posterior and background's (last), tempered

    def probability_of(self, cell: np.ndarray) -> np.ndarray:
        """(n,) float32 posterior probability of the given cell id (0 = background) of every spot; 0 for a cell
        that is not among the spot's candidates."""
        cell = np.asarray(cell, np.int64)
        if self.posterior is None:
            return np.where(cell == self.cell, self.prob, 0.0).astype(np.float32)
        hit = self.candidates == cell[:, None]
        out = (self.posterior[:, :-1] * hit).sum(1)
        return np.where(cell == BACKGROUND, self.posterior[:, -1], out).astype(np.float32)


#: Mahalanobis radius of the edge of a uniform ellipse, in units of its own second moment.
_DISC_EDGE = 2.0


def _radial(power: float) -> tuple[np.ndarray, np.ndarray]:
    """Radial profile g(r) of the shape on a fine grid of the whitened radius r (Sigma = identity units)."""
    r = np.linspace(0.0, 12.0, 24001)
    if power > 0:  # generalised Gaussian exp(-(r^2 / 2)^(power / 2))
        return r, np.exp(-(0.5 * r * r) ** (power / 2.0))
    # a uniform ellipse with a logistic edge of width -power (Mahalanobis units)
    return r, 1.0 / (1.0 + np.exp((r - _DISC_EDGE) / -power))


@lru_cache(maxsize=8)
def _moment_factor(power: float) -> float:
    """E[u u^T] / Sigma of the 2-D shape of this ``power`` (<= 0: soft-edged disc of edge width -power)."""
    r, g = _radial(power)
    return float(np.trapezoid(g * r ** 3, r) / np.trapezoid(g * r, r) / 2.0)


@lru_cache(maxsize=8)
def _log_norm(power: float) -> float:
    r, g = _radial(power)
    return float(np.log(2 * np.pi * np.trapezoid(g * r, r)))


def _mahalanobis(dy: np.ndarray, dx: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(squared Mahalanobis distance, determinant) of offsets (dy, dx) under covariances ``cov`` (..., 2, 2)."""
    a, b, d = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
    det = np.maximum(a * d - b * b, 1e-9)
    return (d * dy * dy - 2 * b * dy * dx + a * dx * dx) / det, det


def _shape_core(m2: np.ndarray, power: float) -> np.ndarray:
    """log of the shape relative to its peak at squared Mahalanobis distance ``m2``."""
    if power > 0:
        return -(0.5 * m2) ** (power / 2.0)
    return -np.logaddexp(0.0, (np.sqrt(m2) - _DISC_EDGE) / -power)


def _log_shape(dy: np.ndarray, dx: np.ndarray, cov: np.ndarray, power: float) -> np.ndarray:
    """log f_c at offsets (dy, dx) (any shape (..., )) from cells with covariances ``cov`` (..., 2, 2)."""
    m2, det = _mahalanobis(dy, dx, cov)
    return -0.5 * np.log(det) + _shape_core(m2, power) - _log_norm(power)


def nucleus_stats(nuclei: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (y, x) in pixel-centre coordinates and area of each nucleus id."""
    index = ids.astype(np.int64)
    area = ndimage.sum_labels(np.ones(nuclei.shape, np.float32), nuclei, index)
    cy, cx = (np.asarray(ndimage.mean(g, nuclei, index)) for g in np.ogrid[0:nuclei.shape[0], 0:nuclei.shape[1]])
    return np.stack([cy + 0.5, cx + 0.5], 1), np.asarray(area, np.float64)


def _initial_model(centre: np.ndarray, area: np.ndarray, ids: np.ndarray, cls: np.ndarray, n_types: int,
                   gene: np.ndarray, spot_nucleus: np.ndarray, n_genes: int, cfg: SpotModelConfig,
                   reference: np.ndarray | None) -> CellModel:
    """The cells at their nuclei (``centre``, ``area``), typical discs, profiles from the nuclei's spots."""
    radius = typical_radius(centre, area)
    var = radius * radius / 4.0 / _moment_factor(cfg.shape_power)  # a uniform disc's second moment
    cov = np.tile(np.eye(2) * var, (len(ids), 1, 1))
    freq = (np.bincount(gene, minlength=n_genes) + 1.0) / (gene.size + n_genes)
    on_nucleus = spot_nucleus >= 0
    in_nuclei = np.bincount(spot_nucleus[on_nucleus], minlength=len(ids)).astype(np.float64)
    density = in_nuclei.sum() / max(area.sum(), 1.0)
    count = np.full(len(ids), density * np.pi * radius * radius)
    counts = np.zeros((n_types, n_genes))
    np.add.at(counts, (cls[spot_nucleus[on_nucleus]], gene[on_nucleus]), 1.0)
    profile = _normalise_profile(counts, freq, cfg.profile_pseudo)
    if reference is not None:
        known = _reference_rows(reference)
        profile[known] = reference_profile(reference[known])
    concentration = cfg.cell_profile if cfg.cell_profile >= 0 else nucleus_concentration(
        spot_nucleus[on_nucleus], gene[on_nucleus], cls, n_types, freq, cfg.profile_pseudo)
    return CellModel(ids=ids, cls=cls, centre=centre.copy(), cov=cov, count=count, profile=profile,
                     background_rate=0.1 * density, background_profile=freq, shape_power=cfg.shape_power,
                     radius=radius, concentration=concentration)


def _reference_rows(reference: np.ndarray) -> np.ndarray:
    """(T,) bool: the types the reference profiles (rows without NaN)."""
    return np.isfinite(reference).all(1)


def reference_profile(reference: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Gene probabilities of reference class means: each row normalised after adding ``floor`` x its mean to
    every gene (a gene the reference never saw in a type can still be detected there, e.g. as a misread).

    Examples
    --------
    >>> reference_profile(np.array([[3.0, 1.0, 0.0]]), floor=0.0).tolist()
    [[0.75, 0.25, 0.0]]
    """
    ref = np.asarray(reference, np.float64)
    ref = ref + floor * ref.mean(1, keepdims=True)
    return ref / np.maximum(ref.sum(1, keepdims=True), 1e-300)


def typical_radius(centre: np.ndarray, area: np.ndarray) -> float:
    """A typical cell's radius: half the median distance to the nearest other nucleus (a touching tissue's)."""
    if len(centre) > 1:
        return 0.5 * float(np.median(cKDTree(centre).query(centre, k=2)[0][:, 1]))
    return float(np.sqrt(area.max(initial=1.0) / np.pi) * 2.0)


def nucleus_concentration(cell: np.ndarray, gene: np.ndarray, cls: np.ndarray, n_types: int, freq: np.ndarray,
                          pseudo: float, *, grid: np.ndarray = 2.0 ** np.arange(-1, 13)) -> float:
    """The Dirichlet-multinomial concentration (on ``grid``) that best explains the genes of spots ``(cell, gene)``
    (cell = row 0..m-1 of ``cls``) around their types' profiles, or 0 when the multinomial (infinite concentration)
    explains them as well. Each cell is compared with its type's profile from the other cells of the type
    (with :func:`_normalise_profile`'s pseudo-counts; a cell's own spots would make it look typical), so only
    types of 3 or more cells and cells of 2 or more spots take part."""
    n_genes = freq.size
    keys, c = np.unique(cell * n_genes + gene, return_counts=True)  # the nonzero (cell, gene) counts
    row, g, c = keys // n_genes, keys % n_genes, c.astype(np.float64)
    n = np.bincount(row, c, minlength=cls.size)
    type_counts = np.zeros((n_types, n_genes))
    np.add.at(type_counts, (cls[row], g), c)
    cells_of_type = np.bincount(cls, minlength=n_types)
    ok = (n[row] >= 2) & (cells_of_type[cls[row]] >= 3)
    row, g, c = row[ok], g[ok], c[ok]
    if row.size == 0:
        return 0.0
    prior = pseudo * freq * n_genes
    t = cls[row]
    p = (type_counts[t, g] - c + prior[g]) / (type_counts.sum(1)[t] - n[row] + prior.sum())
    n = n[np.unique(row)]
    multinomial = float((c * np.log(p)).sum())
    ll = [float((gammaln(a) - gammaln(n + a)).sum() + (gammaln(c + a * p) - gammaln(a * p)).sum()) for a in grid]
    best = int(np.argmax(ll))
    return float(grid[best]) if ll[best] > multinomial and best < len(grid) - 1 else 0.0


def _normalise_profile(counts: np.ndarray, freq: np.ndarray, pseudo: float) -> np.ndarray:
    prof = counts + pseudo * freq * freq.size
    return prof / prof.sum(-1, keepdims=True)


def _log_intensity(model: CellModel, sy: np.ndarray, sx: np.ndarray, cand: np.ndarray,
                   gene: np.ndarray | None) -> np.ndarray:
    """(n, k) log intensity of each candidate cell at the points (with the gene term when ``gene`` is given)."""
    dy, dx = sy[:, None] - model.centre[cand, 0], sx[:, None] - model.centre[cand, 1]
    out = np.log(model.count[cand]) + _log_shape(dy, dx, model.cov[cand], model.shape_power)
    if gene is not None:
        out += np.log(model.profile[model.cls[cand], gene[:, None]])
    return out


def _membership(model: CellModel, py: np.ndarray, px: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(n, k) log of each candidate's shape at the points relative to its peak: -(m^2 / 2)^(power / 2). Unlike the
    spot intensity it ignores the expected count, so a cell that expresses more does not claim more pixels."""
    dy, dx = py[:, None] - model.centre[cand, 0], px[:, None] - model.centre[cand, 1]
    return _shape_core(_mahalanobis(dy, dx, model.cov[cand])[0], model.shape_power)


def _neighbour_graph(sy: np.ndarray, sx: np.ndarray, k: int) -> sp.csr_matrix:
    """Row-normalised k-nearest-spot adjacency (self excluded)."""
    n = sy.size
    k = min(k, n - 1)
    if k < 1:
        return sp.csr_matrix((n, n))
    _, idx = cKDTree(np.stack([sy, sx], 1)).query(np.stack([sy, sx], 1), k=k + 1)
    rows = np.repeat(np.arange(n), k)
    return sp.csr_matrix((np.full(n * k, 1.0 / k), (rows, idx[:, 1:].ravel())), shape=(n, n))


def _neighbour_support(graph: sp.csr_matrix, resp: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(n, k) mean posterior that a spot's neighbours give to each of its candidate cells."""
    coo = graph.tocoo()
    src, dst, w = coo.row, coo.col, coo.data
    out = np.zeros(cand.shape)
    # for each edge, match the source's candidates against the neighbour's candidates
    hit = cand[src][:, :, None] == cand[dst][:, None, :]  # (E, k, k)
    contrib = (hit * resp[dst][:, None, :cand.shape[1]]).sum(2) * w[:, None]
    np.add.at(out, src, contrib)
    return out


def _cell_log_profile(model: CellModel, gene: np.ndarray, cand: np.ndarray, own: np.ndarray,
                      prior: float) -> np.ndarray:
    """(n, k) log p_c(g) of each candidate cell's own profile: the Dirichlet posterior mean of its spots (minus
    this spot's own share ``own``, so that a spot does not vote for itself) with ``prior`` pseudo-spots of its
    type's profile."""
    n_cg = np.maximum(model.gene_counts.lookup(cand, gene[:, None]) - own, 0.0)
    n_c = np.maximum(model.count[cand] - own, 0.0)
    type_p = model.profile[model.cls[cand], gene[:, None]]
    return np.log((n_cg + prior * type_p) / (n_c + prior))


def _e_step(model: CellModel, sy, sx, gene, cand, support, cfg: SpotModelConfig,
            evidence: np.ndarray | None, own: np.ndarray | None = None) -> np.ndarray:
    """(n, k + 1) log-likelihood (unnormalised log posterior) of the candidate cells and the background (last
    column). ``own``: each spot's share in its candidates' gene counts (with a concentration)."""
    if model.concentration > 0 and model.gene_counts is not None:
        logit = _log_intensity(model, sy, sx, cand, None)
        logit += _cell_log_profile(model, gene, cand, own if own is not None else 0.0, model.concentration)
    else:
        logit = _log_intensity(model, sy, sx, cand, gene)
    if support is not None:
        logit = logit + cfg.neighbour_weight * support
    bg = np.log(model.background_rate * model.background_profile[gene])[:, None]
    if evidence is not None:  # (n, 1 + T) log-evidence of background and of each type at the spot
        logit = logit + np.take_along_axis(evidence[:, 1:], model.cls[cand], 1)
        bg = bg + evidence[:, :1]
    return np.concatenate([logit, bg], 1)


def _m_step(model: CellModel, resp: np.ndarray, sy, sx, gene, cand, nucleus_centre, typical_cov,
            cfg: SpotModelConfig, fixed_profile: np.ndarray | None, area: float) -> None:
    m, k = len(model.ids), cand.shape[1]
    w = resp[:, :k]
    flat_c, flat_w = cand.ravel(), w.ravel()
    mass = np.bincount(flat_c, flat_w, minlength=m)
    sum_y = np.bincount(flat_c, (w * sy[:, None]).ravel(), minlength=m)
    sum_x = np.bincount(flat_c, (w * sx[:, None]).ravel(), minlength=m)
    kc = cfg.centre_prior
    model.centre = np.stack([(sum_y + kc * nucleus_centre[:, 0]) / (mass + kc),
                             (sum_x + kc * nucleus_centre[:, 1]) / (mass + kc)], 1)
    dy, dx = sy[:, None] - model.centre[cand, 0], sx[:, None] - model.centre[cand, 1]
    second = np.zeros((m, 2, 2))
    for (i, j), v in (((0, 0), dy * dy), ((0, 1), dy * dx), ((1, 1), dx * dx)):
        second[:, i, j] = np.bincount(flat_c, (w * v).ravel(), minlength=m)
    second[:, 1, 0] = second[:, 0, 1]
    own = second / _moment_factor(model.shape_power)
    model.spread = np.trace(own, axis1=1, axis2=2) / np.maximum(mass, 1e-9)
    ks = cfg.shape_prior
    model.cov = (own + ks * typical_cov) / (mass + ks)[:, None, None]
    model.count = np.maximum(mass, 0.5)
    if model.concentration > 0:
        model.gene_counts = CellGeneCounts.from_resp(cand, gene, w, m, model.profile.shape[1])
    if fixed_profile is None or not fixed_profile.all():  # the types no reference fixes: from their spots
        counts = np.zeros_like(model.profile)
        np.add.at(counts, (model.cls[flat_c], np.repeat(gene, k)), flat_w)
        estimated = _normalise_profile(counts, model.background_profile, cfg.profile_pseudo)
        model.profile = estimated if fixed_profile is None else np.where(fixed_profile[:, None], model.profile,
                                                                         estimated)
    bg = resp[:, k]
    model.background_rate = max(float(bg.sum()) / area, 1e-9)
    n_genes = model.profile.shape[1]
    model.background_profile = (np.bincount(gene, bg, minlength=n_genes) + 1.0) / (bg.sum() + n_genes)


def _typical_cov(model: CellModel, n_types: int, rel_area: np.ndarray | None = None) -> np.ndarray:
    """(m, 2, 2) each cell's prior covariance: its type's median cell covariance (elementwise; a shape prior from
    the data), scaled by ``exp(beta * rel_area)`` (``rel_area``: log nucleus area over its type's median, see
    :func:`_relative_log_area`) with ``beta`` in [0, 1] regressed from the spread of the cells' own spots (0 where
    nucleus size says nothing of cell size)."""
    out = np.tile(np.median(model.cov, 0), (n_types, 1, 1))
    for t in range(n_types):
        sel = model.cls == t
        if sel.sum() >= 3:
            out[t] = np.median(model.cov[sel], 0)
    prior = out[model.cls]
    if rel_area is None or model.spread is None:  # off, or no spots assigned yet
        return prior
    # the cells' sizes from their own spots only (the fitted covariances hold the prior, which would feed back)
    rel_size = np.log(np.maximum(model.spread, 1e-9)) - np.log(np.maximum(np.trace(prior, axis1=1, axis2=2), 1e-9))
    fit = model.count >= 5  # cells with spots enough to have a size of their own
    c = np.cov(rel_area[fit], rel_size[fit]) if fit.sum() >= 10 else np.zeros((2, 2))
    beta = float(np.clip(c[0, 1] / c[0, 0], 0.0, 1.0)) if c[0, 0] > 1e-6 else 0.0
    return prior * np.exp(beta * rel_area)[:, None, None]


def _relative_log_area(area: np.ndarray, cls: np.ndarray, n_types: int) -> np.ndarray:
    """Each nucleus's log area minus the median log area of its type's nuclei."""
    log_a = np.log(np.maximum(area, 1.0))
    median = np.array([np.median(log_a[cls == t]) if (cls == t).any() else 0.0 for t in range(n_types)])
    return log_a - median[cls]


def fit_spot_model(x: np.ndarray, y: np.ndarray, gene: np.ndarray, nuclei: np.ndarray, cell_ids: np.ndarray,
                   cell_class: np.ndarray, *, n_genes: int, n_types: int, config: SpotModelConfig = SpotModelConfig(),
                   reference: np.ndarray | None = None, evidence: np.ndarray | None = None,
                   start: CellModel | None = None) -> SpotModelFit:
    """Fit the model and assign every spot (see the module docstring).

    Parameters
    ----------
    x, y : (n,) spot positions in the frame of ``nuclei`` (pixel ``(floor(y), floor(x))``).
    gene : (n,) gene index.
    nuclei : (H, W) nucleus ids; only ids listed in ``cell_ids`` and present in the mask become cells.
    cell_ids, cell_class : the type index (0..n_types-1) of each cell id.
    reference : optional (n_types, n_genes) class means (e.g. of a single-cell reference) that fix the gene profiles
        of the types they cover (:func:`reference_profile`); rows of NaN: types it lacks, profiled from the data.
    evidence : optional (n, 1 + n_types) extra log-evidence per spot for background and each type (e.g. a network's
        log posterior over log prior at the spot's pixel), added to the E-step.
    start : a fitted model of the same cells to start from (else the nuclei).

    Deterministic: no randomness.
    """
    gene = np.asarray(gene, np.int64)
    sy, sx = np.asarray(y, np.float64), np.asarray(x, np.float64)
    present = np.zeros(int(max(nuclei.max(initial=0), np.max(cell_ids, initial=0))) + 1, bool)
    present[np.unique(nuclei)] = True
    keep = present[cell_ids] & (np.asarray(cell_ids) != BACKGROUND)
    ids, cls = np.asarray(cell_ids)[keep].astype(np.int64), np.asarray(cell_class)[keep].astype(np.int64)
    if ids.size == 0 or sy.size == 0:
        return SpotModelFit(cell=np.zeros(sy.size, np.int64), prob=np.ones(sy.size, np.float32), model=None, n_iter=0)
    row_of = np.full(present.size, -1, np.int64)
    row_of[ids] = np.arange(ids.size)
    h, w = nuclei.shape
    iy, ix = np.clip(sy.astype(np.int64), 0, h - 1), np.clip(sx.astype(np.int64), 0, w - 1)
    spot_nucleus = row_of[nuclei[iy, ix]]
    nucleus_centre, area = nucleus_stats(nuclei, ids)
    model = _initial_model(nucleus_centre, area, ids, cls, n_types, gene, spot_nucleus, n_genes, cfg := config,
                           reference)
    rel_area = _relative_log_area(area, cls, n_types) if cfg.size_from_nucleus else None
    if start is not None and np.array_equal(start.ids, ids):
        model = dataclasses.replace(start, gene_counts=None)  # the first E-step without the spots' own votes
    graph = _neighbour_graph(sy, sx, cfg.neighbour_k) if cfg.neighbour_weight else None
    side = cfg.tissue_bin * model.radius
    tissue = tissue_area(sy, sx, nuclei.shape, max(int(round(side)), 1)) if side > 0 else float(h * w)
    model.tissue_px = tissue
    k = min(cfg.n_neighbours, ids.size)
    best, resp, support, it, prev_cand = np.full(sy.size, -2), None, None, 0, None
    for it in range(1, cfg.n_iter + 1):
        cand = cKDTree(model.centre).query(np.stack([sy, sx], 1), k=k)[1].reshape(sy.size, k)
        typical = _typical_cov(model, n_types, rel_area)
        # the previous posterior on this iteration's candidates: the neighbours' support, each spot's own votes
        need = resp is not None and (graph is not None or model.concentration > 0)
        before = _candidate_resp(resp, prev_cand, cand) if need else None
        if before is not None and graph is not None:
            support = _neighbour_support(graph, before, cand)
        own = before if model.concentration > 0 else None
        logit = _e_step(model, sy, sx, gene, cand, support, cfg, evidence, own)
        resp = softmax(logit, axis=1)
        _m_step(model, resp, sy, sx, gene, cand, nucleus_centre, typical, cfg,
                _reference_rows(reference) if reference is not None else None, tissue)
        prev_cand = cand
        new_best = resp.argmax(1)
        new_best = np.where(new_best < k, cand[np.arange(sy.size), np.minimum(new_best, k - 1)], -1)
        changed = float(np.mean(new_best != best))
        best = new_best
        if changed < cfg.tol:
            break
    posterior = softmax(logit / cfg.temperature, axis=1)
    prob = posterior.max(1)  # the argmax is the assignment's at any temperature
    if cfg.spot_edge is not None:  # beyond its cell's edge a spot is background, as its pixel is in the mask
        row = np.maximum(best, 0)
        out = (best >= 0) & (ellipse_distance2(model, row, sy, sx) > cfg.spot_edge ** 2)
        best = np.where(out, -1, best)
        prob = np.where(out, 1.0 - prob, prob)
    cell = np.where(best >= 0, ids[np.maximum(best, 0)], BACKGROUND).astype(np.int64)
    return SpotModelFit(cell=cell, prob=prob.astype(np.float32), model=model, n_iter=it,
                        candidates=ids[cand].astype(np.int32), posterior=posterior.astype(np.float32))


def tissue_area(y: np.ndarray, x: np.ndarray, shape: tuple[int, int], side: int) -> float:
    """Pixels of the tissue: the frame's pixels in the ``side`` x ``side`` bins that hold at least one spot (a
    section's frame is mostly empty slide, where no background spot can fall)."""
    rows, cols = -(-shape[0] // side), -(-shape[1] // side)
    iy = np.clip((y // side).astype(np.int64), 0, rows - 1)
    ix = np.clip((x // side).astype(np.int64), 0, cols - 1)
    occupied = np.unique(iy * cols + ix)
    height = np.minimum(side, shape[0] - occupied // cols * side)  # the last row and column of bins are cut
    width = np.minimum(side, shape[1] - occupied % cols * side)
    return float((height * width).sum())


def ellipse_distance2(model: CellModel, row: np.ndarray, py: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of points to cells ``row`` in units of the cells' second moments."""
    dy, dx = py - model.centre[row, 0], px - model.centre[row, 1]
    return _mahalanobis(dy, dx, model.cov[row] * _moment_factor(model.shape_power))[0]


def _candidate_resp(resp: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Re-index the posterior of the previous candidate sets onto the new ones (0 for a cell not there before)."""
    k = new.shape[1]
    hit = new[:, :, None] == old[:, None, :]
    return (hit * resp[:, None, :k]).sum(2)


def territories(model: CellModel, shape: tuple[int, int], *, chunk: int = 1 << 18, k: int = 6,
                edge: float | None = _DISC_EDGE) -> np.ndarray:
    """(H, W) uint32 instance mask: each pixel to the fitted cell whose shape is highest there relative to its peak;
    background outside that cell's ellipse of the same second moment (``edge``: its Mahalanobis radius; 2 = a uniform
    ellipse's edge). Only the pixels inside some cell's bounding box of that ellipse are evaluated (a section is mostly background)."""
    h, w = shape
    out = np.zeros(shape, np.uint32)
    if model is None or len(model.ids) == 0:
        return out
    pix = np.flatnonzero(_reachable(model, shape, edge if edge is not None else 3.0))
    tree = cKDTree(model.centre)
    k = min(k, len(model.ids))
    flat = out.ravel()
    for c0 in range(0, pix.size, chunk):
        part = pix[c0:c0 + chunk]
        py, px = part // w + 0.5, part % w + 0.5
        cand = tree.query(np.stack([py, px], 1), k=k)[1].reshape(part.size, k)
        score = _membership(model, py, px, cand)
        win = cand[np.arange(part.size), score.argmax(1)]
        fg = np.ones(part.size, bool)
        if edge is not None:  # inside the cell's ellipse of the same second moment (a uniform cell's edge)
            fg &= ellipse_distance2(model, win, py, px) <= edge * edge
        flat[part] = np.where(fg, model.ids[win], BACKGROUND)
    return out


def _reachable(model: CellModel, shape: tuple[int, int], edge: float) -> np.ndarray:
    """(H, W) bool: pixels inside the bounding box of some cell's ``edge`` ellipse."""
    need = np.zeros(shape, bool)
    s2 = model.cov * _moment_factor(model.shape_power)
    half = edge * np.sqrt(np.stack([s2[:, 0, 0], s2[:, 1, 1]], 1)) + 1.0  # (m, 2) half extents in y, x
    lo = np.floor(model.centre - half).astype(np.int64)
    hi = np.ceil(model.centre + half).astype(np.int64)
    for (y0, x0), (y1, x1) in zip(np.maximum(lo, 0), np.minimum(hi, shape)):
        need[y0:y1, x0:x1] = True
    return need
