"""NT-Xent contrastive loss and the training monitors of SegCLR (docs/SEGCLR.md §1 F4/F6, §2.7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["collapse_metric", "contrastive_topk", "decorrelation_loss", "nt_xent"]

_MASKED = -1e9  # logit of a row's similarity with itself (excluded from the softmax)


def _logits(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of view A against [B, A] and of view B against [A, B]: two (n, 2n) tensors, self masked."""
    a, b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=a.device)
    ab = a @ b.T / temperature  # (n, n) positives on the diagonal
    aa = (a @ a.T / temperature).masked_fill(eye, _MASKED)
    bb = (b @ b.T / temperature).masked_fill(eye, _MASKED)
    return torch.cat([ab, aa], 1), torch.cat([ab.T, bb], 1)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric NT-Xent (normalised temperature-scaled cross-entropy) of a batch of positive pairs.

    Row ``i`` of ``z_a`` and row ``i`` of ``z_b`` are a positive pair; every other row of both views is a negative.
    The vectors are L2-normalised; for each row of A the logits are its cosine similarities / ``temperature`` with
    all rows of B (the positive on the diagonal) and with the other rows of A (its self-similarity is excluded).
    Softmax cross-entropy in both directions, averaged (SegCLR sums the two means: a factor of 2).

    Parameters
    ----------
    z_a, z_b : (n, d) float tensors, n >= 2.
    temperature : > 0.

    Returns
    -------
    scalar tensor. All-equal inputs (a collapsed encoder) give ``log(2n - 1)``.

    Examples
    --------
    Two orthogonal pairs at temperature 1: each row sees its positive at cosine 1 and two negatives at 0, so the
    loss is ``-log(e / (e + 2)) = log(1 + 2 / e)``:

    >>> z = torch.eye(2)
    >>> round(float(nt_xent(z, z, 1.0)), 6), round(math.log(1 + 2 / math.e), 6)
    (0.551445, 0.551445)
    """
    la, lb = _logits(z_a, z_b, temperature)
    target = torch.arange(z_a.shape[0], device=z_a.device)
    return 0.5 * (F.cross_entropy(la, target) + F.cross_entropy(lb, target))


@torch.no_grad()
def contrastive_topk(z_a: torch.Tensor, z_b: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows (both directions) whose positive is among the ``k`` largest of its 2n - 1 logits."""
    la, lb = _logits(z_a, z_b, 1.0)
    target = torch.arange(z_a.shape[0], device=z_a.device)
    k = min(k, la.shape[1] - 1)
    hits = [(l.topk(k, dim=1).indices == target[:, None]).any(1).float().mean() for l in (la, lb)]  # noqa: E741
    return float(sum(hits) / 2)


@torch.no_grad()
def collapse_metric(e: torch.Tensor) -> float:
    """SegCLR's "std x sqrt(d)" of L2-normalised embeddings (n, d): about 1 when spread, -> 0 under collapse."""
    z = F.normalize(e.float(), dim=1)
    return float(z.std(0).mean() * math.sqrt(z.shape[1]))


def decorrelation_loss(e: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation of the embedding dimensions of a batch (n, d), n >= 2."""
    z = e - e.mean(0)
    z = z / (z.std(0) + 1e-6)
    corr = z.T @ z / (e.shape[0] - 1)
    off = corr - torch.diag(torch.diag(corr))
    d = e.shape[1]
    return (off ** 2).sum() / max(d * (d - 1), 1)
