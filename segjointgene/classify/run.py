"""``--step_name=classify``: SNGP cell-type classifier on the per-cell embeddings of ``--step_name=embed``.

Inputs: ``<run>/results/embeddings.h5ad`` (or the ``embeddings.npz`` + ``embeddings_obs.csv`` fallback written
without anndata) and the training labels: the nucleus-based type calls of ``data/<name>/cells.csv``
(``--classify_labels nucleus``, default) or the run's ``results/cells.csv`` (``run``).

The labelled cells are split into training and validation cells by spatial blocks; the validation cells drive
early stopping and fix the OOD threshold: the ``--classify_ood_quantile`` quantile of their OOD score (so that 95 %
of held-out in-distribution cells are kept by default). The OOD score (``--classify_ood_score``) is the GP predictive
variance by default; the Dempster-Shafer uncertainty is always reported.

Outputs under ``<run>/results/``: ``celltypes_sngp.csv`` (per cell: label, split, predicted type, probability,
uncertainty, variance, ood_score, is_ood), ``sngp_classifier.pt`` (weights, standardisation, classes, threshold,
lambda),
``sngp_classifier.json`` (summary), the ``sngp_*`` columns added to ``embeddings.h5ad``'s ``obs`` (when anndata is
available) and ``figures/sngp_uncertainty_pca.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import __version__
from ..config import ClassifyConfig, RuntimeConfig, Settings
from ..constants import CELLS_TABLE
from ..errors import ColumnError, ConfigError, DataError, InputNotFoundError
from ..io.files import atomic_path, load_npz, write_csv, write_json
from ..io.runfolder import ClassifyFiles, EmbeddingFiles, Paths, ResultFiles
from ..methods.segjointgene.checkpoint import save_checkpoint
from .evaluate import spatial_split
from .train import FittedSNGP, Prediction, fit_sngp, predict

log = logging.getLogger(__name__)

__all__ = ["CellTable", "ClassifyFiles", "ClassifyResult", "classify_cells", "ood_score", "read_cell_embeddings",
           "run_classify"]

_EMB_H5AD, _EMB_NPZ, _EMB_OBS = EmbeddingFiles.CELLS_H5AD, EmbeddingFiles.CELLS_NPZ, EmbeddingFiles.CELLS_OBS


@dataclass(frozen=True)
class CellTable:
    """Per-cell embeddings as read back: ``obs`` (index = cell id as str, with ``cell``, ``x``, ``y``) and
    ``emb`` (n, d) float32 ``obsm['X_segclr']``."""

    obs: pd.DataFrame
    emb: np.ndarray


def read_cell_embeddings(results: str | Path) -> CellTable:
    """Read the per-cell embeddings of an embed run (``.h5ad``, or the npz + CSV fallback)."""
    results = Path(results)
    h5ad, npz, obs_csv = results / _EMB_H5AD, results / _EMB_NPZ, results / _EMB_OBS
    if h5ad.is_file():
        try:
            import anndata
        except ImportError:
            anndata = None
        if anndata is not None:
            adata = anndata.read_h5ad(h5ad)
            return CellTable(obs=adata.obs.copy(), emb=np.asarray(adata.obsm["X_segclr"], np.float32))
        if not npz.is_file():
            raise InputNotFoundError(f"{h5ad} needs the anndata package (pip install anndata), or re-run "
                                     "--step_name=embed without it to get the npz fallback")
    if npz.is_file() and obs_csv.is_file():
        arrays = load_npz(npz, ("obs_names", "obsm_X_segclr"))
        obs = pd.read_csv(obs_csv, index_col=0)
        obs.index = obs.index.astype(str)
        if list(obs.index) != [str(v) for v in arrays["obs_names"].tolist()]:
            raise DataError(f"{obs_csv} and {npz} list different cells; re-run --step_name=embed")
        return CellTable(obs=obs, emb=arrays["obsm_X_segclr"].astype(np.float32))
    raise InputNotFoundError(f"no cell embeddings in {results} ({_EMB_H5AD} or {_EMB_NPZ}); run --step_name=embed "
                             "for this run first")


def _labels(path: Path, cell_ids: np.ndarray) -> np.ndarray:
    """(n,) object array of the type of each cell in the table at ``path`` (None when absent)."""
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: the training labels of --classify_labels are read from it")
    table = pd.read_csv(path)
    for col in ("cell", "celltype"):
        if col not in table.columns:
            raise ColumnError(f"{path}: missing column {col!r} (found {', '.join(map(str, table.columns))})")
    lut = dict(zip(table["cell"].astype(np.int64).tolist(), table["celltype"].astype(str).tolist()))
    return np.array([lut.get(int(c)) for c in cell_ids.tolist()], dtype=object)


@dataclass(frozen=True)
class ClassifyResult:
    """Outputs of :func:`classify_cells`: the fitted model, the per-cell table, the OOD threshold, validation
    metrics."""

    fitted: FittedSNGP
    table: pd.DataFrame
    threshold: float
    metrics: dict[str, float]
    prediction: Prediction


def classify_cells(emb: np.ndarray, xy: np.ndarray, labels: np.ndarray, config: ClassifyConfig, *,
                   seed: int = 0, device: str | torch.device = "cpu") -> ClassifyResult:
    """Fit the SNGP classifier on the labelled cells and predict every cell (the classify step on arrays).

    Parameters
    ----------
    emb : (n, d) float per-cell embeddings; xy : (n, 2) float positions (pixels) for the spatial split.
    labels : (n,) object type names, None for unlabelled cells.
    config : ``ClassifyConfig``; seed : all randomness (split, weights, batch order).

    Returns
    -------
    ClassifyResult; its table has ``label, split`` (train / val / excluded (type too rare) / unlabelled),
    ``predicted, probability, uncertainty`` (Dempster-Shafer), ``variance, max_softmax_raw, ood_score, is_ood``.
    """
    split_rng, batch_rng = np.random.default_rng(seed).spawn(2)
    labels = np.asarray(labels, dtype=object)
    has = np.array([v is not None and v == v for v in labels.tolist()])
    names, counts = np.unique(labels[has].astype(str), return_counts=True)
    keep_types = set(names[counts >= config.min_cells].tolist())
    if len(names) > len(keep_types):
        log.warning("classify: cell types with fewer than %d cells left out: %s", config.min_cells,
                    ", ".join(sorted(set(names.tolist()) - keep_types)))
    usable = has & np.array([v in keep_types for v in labels.tolist()])
    if len(keep_types) < 2:
        raise DataError(f"classify needs at least 2 cell types with >= {config.min_cells} labelled cells; found "
                        f"{len(keep_types)} (lower --classify_min_cells or check the labels)")
    xy = np.asarray(xy, np.float64)
    extent = float(np.ptp(xy, axis=0).max()) if len(xy) else 1.0
    block = config.block_px or max(extent / 8.0, 1.0)
    val = np.zeros(len(emb), bool)
    val[usable] = spatial_split(xy[usable], config.val_fraction, block, split_rng)
    train = usable & ~val
    # a type only present in validation blocks cannot be validated against: move it to training
    missing = set(labels[val].tolist()) - set(labels[train].tolist())
    if missing:
        moved = val & np.array([v in missing for v in labels.tolist()])
        val &= ~moved
        train |= moved
    generator = torch.Generator().manual_seed(seed)
    fitted = fit_sngp(emb[train], labels[train].astype(str), emb[val], labels[val].astype(str), config,
                      generator=generator, rng=batch_rng, device=device)
    pred = predict(fitted, emb)
    score = ood_score(pred, config.ood_score)
    threshold = float(np.quantile(score[val], config.ood_quantile)) if val.any() else float("inf")
    split = np.where(train, "train", np.where(val, "val", np.where(has, "excluded", "unlabelled")))
    table = pd.DataFrame({"label": [v if v is not None else "" for v in labels.tolist()], "split": split,
                          "predicted": pred.label, "probability": pred.probability, "uncertainty": pred.uncertainty,
                          "variance": pred.variance, "max_softmax_raw": pred.max_softmax_raw, "ood_score": score,
                          "is_ood": score > threshold})
    metrics: dict[str, float] = {"threshold": threshold, "n_train": int(train.sum()), "n_val": int(val.sum()),
                                 "n_ood": int(table["is_ood"].sum())}
    if val.any():
        from sklearn.metrics import f1_score

        yv = labels[val].astype(str)
        metrics["val_accuracy"] = float(np.mean(pred.label[val] == yv))
        metrics["val_macro_f1"] = float(f1_score(yv, pred.label[val], average="macro"))
    return ClassifyResult(fitted=fitted, table=table, threshold=threshold, metrics=metrics, prediction=pred)


def ood_score(pred: Prediction, kind: str) -> np.ndarray:
    """(n,) float32 OOD score of predictions: ``variance``, ``ds`` (Dempster-Shafer) or ``maxprob`` (1 - max prob)."""
    if kind == "variance":
        return pred.variance
    if kind == "ds":
        return pred.uncertainty
    if kind == "maxprob":
        return (1.0 - pred.probability).astype(np.float32)
    raise ValueError(f"ood score {kind!r}: choose variance, ds or maxprob")


def _plot_uncertainty(emb: np.ndarray, predicted: np.ndarray, uncertainty: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(emb, np.float64)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6))
    cats = sorted(set(predicted.tolist()))
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    for i, c in enumerate(cats):
        sel = predicted == c
        axes[0].scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(i % cmap.N), label=c, linewidths=0)
    if len(cats) <= 20:  # a legend of dozens of types would not fit
        axes[0].legend(fontsize=7, markerscale=2)
    axes[0].set_title("SNGP predicted type (PCA of embeddings)")
    sc = axes[1].scatter(xy[:, 0], xy[:, 1], s=6, c=uncertainty, cmap="viridis", linewidths=0)
    fig.colorbar(sc, ax=axes[1], label="Dempster-Shafer uncertainty")
    axes[1].set_title("SNGP uncertainty")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _update_h5ad(path: Path, table: pd.DataFrame) -> bool:
    """Add the ``sngp_*`` columns to the obs of an existing ``.h5ad`` (False when anndata or the file is absent)."""
    if not path.is_file():
        return False
    try:
        import anndata
    except ImportError:
        log.warning("anndata is not installed: the SNGP results are in %s only", ClassifyFiles.TABLE)
        return False
    adata = anndata.read_h5ad(path)
    for col in ("predicted", "probability", "uncertainty", "variance", "ood_score", "is_ood"):
        adata.obs[f"sngp_{col}"] = table[col].to_numpy()
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return True


def _check_previous(summary: Path, config: ClassifyConfig, runtime: RuntimeConfig) -> None:
    """Outputs made with other settings (config or seed in the summary JSON) are replaced only with --overwrite."""
    if runtime.overwrite or not summary.is_file():
        return
    try:
        old = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError):
        return
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    changed = [k for k, v in now.items() if old.get("config", {}).get(k) != v]
    if old.get("random_seed") != runtime.random_seed:
        changed.append("random_seed")
    if changed:
        raise ConfigError(f"{summary.parent} holds classifier outputs made with other settings ({', '.join(changed)}); "
                          "pass --overwrite to replace them")


def run_classify(settings: Settings, paths: Paths) -> int:
    """CLI handler of ``--step_name=classify`` (see the module docstring); prints a summary, returns 0."""
    config, runtime = settings.classify, settings.runtime
    start = time.perf_counter()
    results = paths.run.results
    _check_previous(results / ClassifyFiles.SUMMARY, config, runtime)
    cells = read_cell_embeddings(results)
    for col in ("cell", "x", "y"):
        if col not in cells.obs.columns:
            raise ColumnError(f"{results}: the embedding table lacks obs column {col!r}; re-run --step_name=embed")
    cell_ids = cells.obs["cell"].to_numpy().astype(np.int64)
    label_path = Path(paths.data_dir) / CELLS_TABLE if config.labels == "nucleus" else results / ResultFiles.CELLS
    labels = _labels(label_path, cell_ids)
    if runtime.device == "auto":
        device = torch.device(f"cuda:{runtime.gpu_id}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(f"cuda:{runtime.gpu_id}" if runtime.device == "cuda" else runtime.device)
    res = classify_cells(cells.emb, cells.obs[["x", "y"]].to_numpy(), labels, config, seed=runtime.random_seed,
                         device=device)
    table = pd.concat([pd.DataFrame({"cell": cell_ids}), res.table], axis=1)
    write_csv(results / ClassifyFiles.TABLE, table)
    fitted = res.fitted
    model_path = results / ClassifyFiles.MODEL
    state = {"model": {k: v.cpu() for k, v in fitted.model.state_dict().items()},
             "in_features": int(cells.emb.shape[1]), "classes": [str(c) for c in fitted.classes.tolist()],
             "mean": torch.from_numpy(fitted.mean), "std": torch.from_numpy(fitted.std),
             "threshold": res.threshold, "ood_score": config.ood_score, "mean_field_factor": fitted.mean_field_factor,
             "precision_mode": "exact sum over the training cells (one pass after training)",
             "config": dataclasses.asdict(config), "version": __version__}
    save_checkpoint(model_path, state)  # atomic and byte-deterministic
    summary = {"classes": state["classes"], "labels": config.labels, "label_file": str(label_path),
               "threshold": res.threshold, "ood_score": config.ood_score, "ood_quantile": config.ood_quantile,
               "gp_lengthscale": float(fitted.model.gp.lengthscale) if fitted.model.gp is not None else None,
               "lengthscale_val_nll": {f"{k:.6g}": v for k, v in fitted.lengthscale_nll.items()},
               "mean_field_factor": fitted.mean_field_factor, "precision_mode": state["precision_mode"],
               "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history), **res.metrics,
               "random_seed": runtime.random_seed, "config": dataclasses.asdict(config), "version": __version__}
    write_json(results / ClassifyFiles.SUMMARY, summary)
    in_h5ad = _update_h5ad(results / _EMB_H5AD, res.table)
    _plot_uncertainty(cells.emb, res.table["predicted"].to_numpy().astype(str), res.table["uncertainty"].to_numpy(),
                      results / ResultFiles.FIGURES / ClassifyFiles.FIGURE)
    m = res.metrics
    print(f"classify: {len(table)} cells, {len(fitted.classes)} types, {m['n_train']} train / {m['n_val']} val cells; "
          + (f"val accuracy {m['val_accuracy']:.3f}, macro-F1 {m['val_macro_f1']:.3f}; " if "val_accuracy" in m else "")
          + f"OOD threshold {res.threshold:.4g} on {config.ood_score} (q={config.ood_quantile}), "
          f"{m['n_ood']} cells flagged; "
          f"{time.perf_counter() - start:.1f} s\n  -> {results / ClassifyFiles.TABLE}"
          + (f"\n  -> {results / _EMB_H5AD} (obs sngp_*)" if in_h5ad else ""))
    return 0
