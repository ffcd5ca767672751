"""Evaluation helpers for embeddings and the classifier (docs/SEGCLR.md §2.11): spatial splits, linear probe,
OOD scores and metrics. scikit-learn is imported inside the functions that use it."""

from __future__ import annotations

import numpy as np

__all__ = ["auroc", "expected_calibration_error", "fpr_at_tpr", "linear_probe_f1", "mahalanobis_score",
           "spatial_blocks", "spatial_split"]


def spatial_blocks(xy: np.ndarray, block: float) -> np.ndarray:
    """(n,) int64 id of the square block of edge ``block`` holding each (x, y) point (for grouped splits).

    Examples
    --------
    >>> spatial_blocks(np.array([[1.0, 1.0], [9.0, 1.0], [1.0, 9.0]]), 8.0).tolist()
    [0, 1, 1000003]
    """
    b = np.floor(np.asarray(xy, np.float64) / block).astype(np.int64)
    return b[:, 1] * 1000003 + b[:, 0]


def spatial_split(xy: np.ndarray, fraction: float, block: float, rng: np.random.Generator | int | None = None
                  ) -> np.ndarray:
    """(n,) bool held-out mask: whole spatial blocks, in random order, until ``fraction`` of the points are held out.

    Neighbouring cells share context; holding out whole blocks keeps that from leaking into the evaluation.
    At least one point is held out and at least one kept (when n >= 2).
    """
    rng = np.random.default_rng(rng)
    groups = spatial_blocks(xy, block)
    ids, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(ids.size)
    target = fraction * len(groups)
    held = np.zeros(ids.size, bool)
    total = 0
    for i in order:
        if total >= target:
            break
        held[i] = True
        total += counts[i]
    out = held[inv]
    if len(out) >= 2 and out.all():  # one block holds everything: fall back to a random point split
        out = rng.random(len(out)) < fraction
    if len(out) >= 2 and not out.any():
        out[rng.integers(len(out))] = True
    return out


def linear_probe_f1(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, n_splits: int = 5, c: float = 1.0,
                    max_iter: int = 2000) -> tuple[float, float, np.ndarray]:
    """Macro-F1 of a standardised logistic-regression probe under grouped (spatial) cross-validation.

    Returns
    -------
    (mean macro-F1 over folds, its standard deviation, (n,) out-of-fold predictions). With fewer groups than
    ``n_splits`` there is one fold per group.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y)
    n_groups = np.unique(groups).size
    if n_groups < 2:
        raise ValueError("a grouped cross-validation needs at least 2 groups (spatial blocks); use smaller blocks")
    pred = np.empty(len(y), dtype=y.dtype)
    scores = []
    for tr, te in GroupKFold(n_splits=min(n_splits, n_groups)).split(x, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        clf.fit(x[tr], y[tr])
        pred[te] = clf.predict(x[te])
        scores.append(f1_score(y[te], pred[te], average="macro", labels=np.unique(y)))
    return float(np.mean(scores)), float(np.std(scores)), pred


def mahalanobis_score(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, *, ridge: float = 1e-3) -> np.ndarray:
    """Distance of each row of ``x`` to the nearest class mean under the shared (tied) covariance (OOD score).

    The inputs are standardised with the training statistics; the covariance gets ``ridge`` on its diagonal.
    """
    mu, sd = x_train.mean(0), np.maximum(x_train.std(0), 1e-6)
    xt, xq = (x_train - mu) / sd, (x - mu) / sd
    classes = np.unique(y_train)
    means = np.stack([xt[y_train == c].mean(0) for c in classes])
    resid = xt - means[np.searchsorted(classes, y_train)]
    cov = resid.T @ resid / max(len(xt) - 1, 1) + ridge * np.eye(xt.shape[1])
    prec = np.linalg.inv(cov)
    d = np.stack([np.einsum("ij,jk,ik->i", xq - m, prec, xq - m) for m in means], 1)
    return np.sqrt(np.maximum(d.min(1), 0.0))


def auroc(scores_negative: np.ndarray, scores_positive: np.ndarray) -> float:
    """Area under the ROC curve of a score that should be higher for the positives (e.g. OOD, merged)."""
    from sklearn.metrics import roc_auc_score

    s = np.concatenate([scores_negative, scores_positive])
    t = np.concatenate([np.zeros(len(scores_negative)), np.ones(len(scores_positive))])
    return float(roc_auc_score(t, s))


def fpr_at_tpr(scores_negative: np.ndarray, scores_positive: np.ndarray, tpr: float = 0.95) -> float:
    """False-positive rate at the threshold that flags ``tpr`` of the positives."""
    t = np.quantile(scores_positive, 1.0 - tpr)
    return float(np.mean(np.asarray(scores_negative) >= t))


def expected_calibration_error(prob: np.ndarray, y_index: np.ndarray, n_bins: int = 15) -> float:
    """ECE of (n, K) probabilities against (n,) true class indices: confidence bins of equal width.

    Examples
    --------
    >>> expected_calibration_error(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1]))  # |0.9 - 0.5|
    0.4
    """
    conf = prob.max(1)
    correct = (prob.argmax(1) == np.asarray(y_index)).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        sel = bins == b
        ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return round(float(ece), 12)
