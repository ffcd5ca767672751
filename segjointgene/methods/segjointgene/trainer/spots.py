"""The spot model inside self-training (``--label_update model``): territories for the network to learn, and the
network's per-pixel type posterior back into the spot assignment.

Before the first epoch the section's spots are fitted by :func:`segjointgene.methods.spotmodel.model.fit_spot_model`
(cells = nuclei, types = the nuclei's types); its territories, refined into a pixel partition
(:func:`segjointgene.methods.spotmodel.partition.refine_partition`, unless ``--model_smoothness 0``), become every
patch's labels. The network then trains on them. In the last epoch every patch is predicted; at each spot the network's
posterior, as likelihood ratios of the type given a cell and (down-weighted) of cell versus background
(:func:`network_evidence`), is added to the spot model, which is fitted again from where it stopped; its refined
territories become the final labels, each spot takes its pixel's cell, with the model's posterior probability of that
cell (at ``--model_temperature``, its log odds raised by ``--model_partition_log_odds``) as its ``prob``, and this
assignment is saved beside the label cache (``RunFolder.spot_assignment``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from segjointgene.config import LabelUpdateConfig
from segjointgene.constants import SPOTS_TABLE
from segjointgene.io.files import load_npz, save_npz
from segjointgene.io.metadata import DatasetMetadata
from segjointgene.io.runfolder import RunFolder
from segjointgene.methods.spotmodel.densitycells import density_boundaries
from segjointgene.methods.spotmodel.engine import (
    Segmentation,
    density_segmentation,
    engine_configs,
    network_evidence,
    shift_log_odds,
)
from segjointgene.methods.spotmodel.model import SpotModelFit, fit_spot_model, territories
from segjointgene.methods.spotmodel.partition import refine_partition
from segjointgene.preprocess.dataset import ImagePatchDataset, LabelStore

from .. import distributed

log = logging.getLogger(__name__)


class SpotEngine:
    """The section's spots, its nucleus canvas and the latest fit, in the padded patch frame."""

    def __init__(self, data_dir: Path, meta: DatasetMetadata, splits: dict[str, ImagePatchDataset],
                 stores: dict[str, LabelStore], spot_x: np.ndarray, spot_y: np.ndarray, config: LabelUpdateConfig,
                 reference: np.ndarray | None = None):
        self.meta, self.splits, self.stores = meta, splits, stores
        self.p = meta.patch_size
        self.x, self.y = np.asarray(spot_x, np.float64), np.asarray(spot_y, np.float64)
        self.gene = load_npz(data_dir / SPOTS_TABLE, ("gene",))["gene"].astype(np.int64)
        self.net_weight, self.background_weight = config.model_net_weight, config.model_background_weight
        settings = engine_configs(config, reference)
        self.config, self.partition, self.log_odds = settings.spot, settings.partition, settings.log_odds
        self.reference = reference  # (types, genes) class means, NaN rows for the types it lacks
        self._fit_evidence: np.ndarray | None = None  # the evidence of the latest fit (for the partition)
        top = torch.cat([ds.origins for ds in splits.values()]).amax(0)
        self.shape = (int(top[0]) + self.p, int(top[1]) + self.p)
        self.nuclei = self._canvas(lambda ds: ds.core)
        lut = next(iter(stores.values())).class_lut.numpy()
        ids = np.unique(self.nuclei)
        self.ids = ids[(ids > 0) & (ids < lut.size)]
        self.cls = lut[self.ids] - 1
        self.n_classes = meta.n_classes
        self.evidence = np.zeros((self.x.size, self.n_classes), np.float64)
        self.fit: SpotModelFit | None = None
        self.dense: Segmentation | None = None  # the density engine's cells, when the spots resolve the cells
        # the density's scale when it draws the cells (--model_boundaries), else None
        self.scale = density_boundaries(self.x, self.y, self.nuclei, config.model_boundaries)
        self.use_density = self.scale is not None
        #: what segments the cells, for the run's report
        self.engine = ("spot density (watershed from the nuclei, de novo cells)" if self.use_density
                       else "spot model + pixel partition" if self.partition is not None else "spot model")
        self.lut_size = len(lut)
        # the spots of each patch, found once: spots sorted by the (row, col) of the patch they fall in
        self._cols = self.shape[1] // self.p
        key = self._patch_key(self.y, self.x)
        self._order = np.argsort(key, kind="stable")
        self._sorted_key = key[self._order]

    def _patch_key(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        row = np.floor(y / self.p).astype(np.int64)
        col = np.floor(x / self.p).astype(np.int64)
        return np.where((row >= 0) & (col >= 0) & (col < self._cols), row * self._cols + col, -1)

    def _spots_of(self, y0: int, x0: int) -> np.ndarray:
        k = (y0 // self.p) * self._cols + x0 // self.p
        lo, hi = np.searchsorted(self._sorted_key, [k, k + 1])
        return self._order[lo:hi]

    def _canvas(self, part) -> np.ndarray:
        out = np.zeros(self.shape, np.int64)
        for ds in self.splits.values():
            for (y, x), patch in zip(ds.origins.tolist(), part(ds)):
                out[y:y + self.p, x:x + self.p] = patch.numpy()
        return out

    def run_fit(self, evidence: np.ndarray | None = None) -> SpotModelFit:
        if self.use_density:
            return self._density_fit()
        t0 = time.perf_counter()
        inside = (self.x >= 0) & (self.y >= 0) & (self.x < self.shape[1]) & (self.y < self.shape[0])
        start = self.fit.model if self.fit is not None else None
        fit = fit_spot_model(self.x[inside], self.y[inside], self.gene[inside], self.nuclei, self.ids, self.cls,
                             n_genes=self.meta.n_genes, n_types=self.n_classes - 1, config=self.config,
                             reference=self.reference, evidence=None if evidence is None else evidence[inside],
                             start=start)
        cell = np.zeros(self.x.size, np.int64)
        prob = np.ones(self.x.size, np.float32)
        cell[inside], prob[inside] = fit.cell, fit.prob
        cand, post = _widen(fit, inside)
        self.fit = SpotModelFit(cell=cell, prob=prob, model=fit.model, n_iter=fit.n_iter, candidates=cand,
                                posterior=post)
        self._fit_evidence = evidence
        log.debug("spot model: %d cells, %d spots, %.1f%% assigned, concentration %g, %d EM iterations, %.1f s%s",
                  self.ids.size, self.x.size, 100 * float((cell > 0).mean()) if cell.size else 0.0,
                  fit.model.concentration if fit.model is not None else 0.0, fit.n_iter,
                 time.perf_counter() - t0, " (with the network's evidence)" if evidence is not None else "")
        return self.fit

    def _density_fit(self) -> SpotModelFit:
        """The density engine's cells (:mod:`segjointgene.methods.spotmodel.densitycells`); its de novo cells get the
        type that explains their spots best and join the label stores' class lookup."""
        if self.dense is None:
            t0 = time.perf_counter()
            self.dense = density_segmentation(self.x, self.y, self.gene, self.nuclei, self.ids, self.cls, self.scale,
                                              n_genes=self.meta.n_genes, n_types=self.n_classes - 1,
                                              first_new_id=self.lut_size)
            for store in self.stores.values():
                store.class_lut = torch.cat([store.class_lut[:self.lut_size],
                                             torch.as_tensor(self.dense.denovo_types + 1, dtype=torch.int64)])
            log.debug("density engine: %.1f s", time.perf_counter() - t0)
        self.fit = SpotModelFit(cell=self.dense.cell, prob=self.dense.prob, model=None, n_iter=0)
        return self.fit

    def write_labels(self) -> int:
        """Cut the fitted territories (refined into a partition, which then assigns the spots) - or the density
        engine's cells - into every patch's labels; returns the pixels changed."""
        if self.use_density:
            mask = self.dense.mask
        else:
            mask = territories(self.fit.model, self.shape).astype(np.int64)
            mask = np.where(self.nuclei > 0, self.nuclei, mask)  # the nuclei stay their cells' cores
        if not self.use_density and self.partition is not None and self.fit.model is not None:
            t0 = time.perf_counter()
            part = refine_partition(mask, self.nuclei > 0, self.fit.model, self.x, self.y, self.gene,
                                    evidence=self._fit_evidence, config=self.partition)
            log.debug("partition: %d sweeps, %.1f%% of the pixels changed, %.1f%% of the spots, %.1f s",
                      part.n_sweeps, 100 * float((part.mask != mask).mean()),
                      100 * float((part.cell != self.fit.cell).mean()) if part.cell.size else 0.0,
                      time.perf_counter() - t0)
            mask = part.mask
            prob = shift_log_odds(self.fit.probability_of(part.cell), self.log_odds)
            self.fit = dataclasses.replace(self.fit, cell=part.cell, prob=prob)
        changed = 0
        for split, ds in self.splits.items():
            patches = torch.stack([torch.from_numpy(mask[y:y + self.p, x:x + self.p]) for y, x in ds.origins.tolist()])
            changed += self.stores[split].update(torch.arange(len(ds)), patches)
        return changed

    # ------------------------------------------------------------------------------------------ the network's side
    def add_evidence(self, origins: torch.Tensor, logits: torch.Tensor) -> None:
        """Gather the (B, K, P, P) log posterior at the spots of these patches (each spot lies in one patch)."""
        logp = torch.log_softmax(logits.float(), 1).cpu().numpy()
        for (y0, x0), lp in zip(origins.tolist(), logp):
            sel = self._spots_of(y0, x0)
            r, c = (self.y[sel] - y0).astype(np.int64), (self.x[sel] - x0).astype(np.int64)
            self.evidence[sel] = lp[:, r, c].T

    def refit_with_network(self, ctx: distributed.DistContext) -> int:
        """Every rank's evidence summed (each spot came from one rank), the likelihood ratio against the section's
        mean, the model refitted and its territories written; returns the pixels changed."""
        if self.use_density:  # the density shows where cells end; the network learnt that from it
            log.debug("density engine: the network's evidence is not used (the spots' density resolves the cells)")
            return 0
        if ctx.enabled:
            total = torch.from_numpy(self.evidence)
            torch.distributed.all_reduce(total)
            self.evidence = total.numpy()
        ratio = network_evidence(self.evidence, self.background_weight)
        self.run_fit(self.net_weight * ratio)
        return self.write_labels()

    def save(self, run: RunFolder, epoch: int) -> None:
        """The spot assignment of the latest fit, as ``spot_assignment_<epoch>.npz`` (spots.npz order)."""
        arrays = {"cell": self.fit.cell, "prob": self.fit.prob}
        if self.dense is not None:  # the de novo cells' ids and type ids (the dataset's cells.csv lacks them)
            arrays.update(denovo_cell=self.dense.denovo_ids, denovo_class=self.dense.denovo_types + 1)
        save_npz(run.spot_assignment(epoch), arrays)


def _widen(fit: SpotModelFit, inside: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The fit's candidates and posterior over every spot (those outside the canvas: background, probability 1)."""
    if fit.posterior is None:
        return None, None
    cand = np.zeros((inside.size, fit.candidates.shape[1]), fit.candidates.dtype)
    post = np.zeros((inside.size, fit.posterior.shape[1]), fit.posterior.dtype)
    post[:, -1] = 1.0
    cand[inside], post[inside] = fit.candidates, fit.posterior
    return cand, post
