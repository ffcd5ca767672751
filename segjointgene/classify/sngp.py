"""SNGP: a residual MLP with bounded spectral normalisation and a random-Fourier-feature GP output layer.

Design (docs/SEGCLR.md §1 F12, §2.10b):

- **Bounded spectral norm** (:class:`BoundedSpectralNorm`, a ``torch.nn.utils.parametrize`` parametrisation): one
  power iteration per training forward keeps an estimate sigma of the largest singular value of W;
  the layer uses ``W / max(1, sigma / c)``, so W is unchanged while sigma <= c (torch's stock ``spectral_norm``
  always divides by sigma and has no bound).
- **RFF-GP output layer** (:class:`RandomFeatureGP`): ``h -> LayerNorm(h) / lengthscale`` (LayerNorm optional),
  ``phi = sqrt(2 / D) cos(h Omega + b)`` with fixed Omega ~ N(0, 1), b ~ U(0, 2 pi), so that
  ``phi(x) . phi(y) ~= exp(-|x - y|^2 / (2 lengthscale^2))``; logits ``= beta phi + bias``. The length-scale is
  applied (unlike edward2's LayerNorm path) and can be set by the median heuristic: with LayerNorm the inputs have
  norm sqrt(H), and a length-scale of 1 would make the kernel between any two cells ~0 (a random-feature lookup
  table that does not generalise).
- **Posterior precision**, accumulated exactly in one extra pass over the training data after training
  (``P = ridge I + sum phi phi^T``; SegCLR's momentum -1 mode), inverted once by Cholesky; the predictive variance
  is computed for the diagonal only: ``var(x) = ridge * phi^T P^-1 phi`` (edward2's convention), about 1 far from
  the data and close to 0 near it.
- **Mean-field logits** ``z / sqrt(1 + lambda var)`` and the **Dempster-Shafer** uncertainty
  ``K / (K + sum_k exp(z_k))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["BoundedSpectralNorm", "RandomFeatureGP", "SNGPNet", "add_bounded_spectral_norm", "dempster_shafer",
           "mean_field_logits", "random_fourier_features"]


class BoundedSpectralNorm(nn.Module):
    """Parametrisation ``W -> W / max(1, sigma(W) / bound)`` with sigma from a persistent power iteration.

    Parameters
    ----------
    weight : (out, in) the weight being parametrised (to initialise the singular-vector estimates).
    bound : c > 0, the largest spectral norm allowed.
    n_power_iterations : iterations per training forward (SegCLR: 1).
    generator : torch Generator for the random start of the power iteration.

    Notes
    -----
    In training mode every evaluation of the parametrised weight runs ``n_power_iterations`` power iterations
    (without gradient) before computing ``sigma = u^T W v`` with ``u, v`` detached, as torch's spectral norm does;
    in eval mode the stored ``u, v`` are used. 15 iterations at registration start from a good estimate.
    """

    def __init__(self, weight: torch.Tensor, bound: float, *, n_power_iterations: int = 1, eps: float = 1e-12,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if bound <= 0:
            raise ValueError(f"bound={bound} must be > 0")
        if weight.ndim != 2:
            raise ValueError(f"bounded spectral norm needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.bound = float(bound)
        self.n_power_iterations = int(n_power_iterations)
        self.eps = eps
        out_f, in_f = weight.shape
        u = torch.randn(out_f, generator=generator, dtype=weight.dtype).to(weight.device)
        v = torch.randn(in_f, generator=generator, dtype=weight.dtype).to(weight.device)
        self.register_buffer("_u", F.normalize(u, dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(v, dim=0, eps=eps))
        self._power_iteration(weight.detach(), 15)

    @torch.no_grad()
    def _power_iteration(self, weight: torch.Tensor, n: int) -> None:
        for _ in range(n):
            self._v.copy_(F.normalize(weight.T @ self._u, dim=0, eps=self.eps))
            self._u.copy_(F.normalize(weight @ self._v, dim=0, eps=self.eps))

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """The current estimate ``u^T W v`` of the largest singular value (differentiable in W)."""
        return torch.dot(self._u.clone(), weight @ self._v.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._power_iteration(weight.detach(), self.n_power_iterations)
        factor = torch.clamp(self.sigma(weight) / self.bound, min=1.0)
        return weight / factor


def add_bounded_spectral_norm(layer: nn.Linear, bound: float, *, generator: torch.Generator | None = None,
                              n_power_iterations: int = 1) -> nn.Linear:
    """Register :class:`BoundedSpectralNorm` on ``layer.weight`` (in place) and return the layer."""
    parametrize.register_parametrization(layer, "weight", BoundedSpectralNorm(
        layer.weight, bound, n_power_iterations=n_power_iterations, generator=generator))
    return layer


def random_fourier_features(x: torch.Tensor, omega: torch.Tensor, bias: torch.Tensor,
                            lengthscale: float = 1.0) -> torch.Tensor:
    """``sqrt(2 / D) cos(x Omega / lengthscale + b)``: random features of the RBF kernel.

    Parameters
    ----------
    x : (n, H); omega : (H, D) ~ N(0, 1); bias : (D,) ~ U(0, 2 pi).

    Returns
    -------
    (n, D) features with ``phi(x) . phi(y) -> exp(-|x - y|^2 / (2 lengthscale^2))`` as D grows.
    """
    d = omega.shape[1]
    return math.sqrt(2.0 / d) * torch.cos(x @ omega / lengthscale + bias)


class RandomFeatureGP(nn.Module):
    """Random-feature Gaussian-process output layer with an exact posterior precision (module docstring).

    Parameters
    ----------
    in_features : H; num_classes : K; n_features : D.
    lengthscale : of the RBF kernel (applied; see the note on edward2 in docs/SEGCLR.md §1); a buffer, so it is
        saved with the weights. :meth:`fit_lengthscale` sets it from data.
    ridge : r of the precision ``r I + sum phi phi^T`` and of the variance ``r phi^T P^-1 phi``.
    layernorm : LayerNorm (no affine) of the input before the features.
    generator : torch Generator for Omega, b and the output weights.
    """

    def __init__(self, in_features: int, num_classes: int, n_features: int = 1024, *, lengthscale: float = 1.0,
                 ridge: float = 1e-3, layernorm: bool = True, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.ridge = float(ridge)
        self.register_buffer("lengthscale", torch.tensor(float(lengthscale)))
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False) if layernorm else nn.Identity()
        self.register_buffer("omega", torch.randn(in_features, n_features, generator=generator))
        self.register_buffer("phase", torch.rand(n_features, generator=generator) * 2 * math.pi)
        self.output = nn.Linear(n_features, num_classes)
        with torch.no_grad():
            self.output.weight.normal_(0.0, 1.0 / math.sqrt(n_features), generator=generator)
            self.output.bias.zero_()
        self.register_buffer("precision", torch.eye(n_features, dtype=torch.float64) * self.ridge)
        self.register_buffer("covariance", torch.eye(n_features, dtype=torch.float64) / self.ridge)
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def fit_lengthscale(self, h: torch.Tensor) -> float:
        """Median heuristic: set the length-scale to the median pairwise distance of the (normalised) inputs of a
        sample ``h`` (n, H), n >= 2; returns it."""
        x = self.norm(h).double()
        d = torch.cdist(x, x)
        iu = torch.triu_indices(len(x), len(x), 1)
        value = float(d[iu[0], iu[1]].median().clamp(min=1e-3)) if len(x) >= 2 else 1.0
        self.lengthscale.fill_(value)
        return value

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, D) random Fourier features."""
        return random_fourier_features(self.norm(h), self.omega, self.phase, self.lengthscale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n, K) logits (the posterior mean)."""
        return self.output(self.features(h))

    @torch.no_grad()
    def reset_precision(self) -> None:
        d = self.omega.shape[1]
        self.precision.copy_(torch.eye(d, dtype=torch.float64, device=self.precision.device) * self.ridge)
        self.n_seen.zero_()

    @torch.no_grad()
    def update_precision(self, h: torch.Tensor) -> None:
        """Add ``sum phi phi^T`` of a batch (n, H) to the precision (exact sum, no moving average)."""
        phi = self.features(h).double()
        self.precision.add_(phi.T @ phi)
        self.n_seen.add_(h.shape[0])

    @torch.no_grad()
    def finalize(self) -> None:
        """Invert the precision (Cholesky) into the covariance used by :meth:`variance`."""
        chol = torch.linalg.cholesky(self.precision)
        self.covariance.copy_(torch.cholesky_inverse(chol))

    def variance(self, h: torch.Tensor) -> torch.Tensor:
        """(n, H) -> (n,) predictive variance ``ridge * phi^T P^-1 phi`` (diagonal only, never n x n)."""
        phi = self.features(h).double()
        return (self.ridge * ((phi @ self.covariance) * phi).sum(1)).to(h.dtype)


def mean_field_logits(logits: torch.Tensor, variance: torch.Tensor, factor: float = math.pi / 8) -> torch.Tensor:
    """Mean-field approximation of the expected softmax: ``logits / sqrt(1 + factor * variance)``.

    Parameters
    ----------
    logits : (n, K); variance : (n,); factor : lambda (pi / 8, or 3 / pi^2; 0 leaves the logits unchanged).
    """
    if factor <= 0:
        return logits
    return logits / torch.sqrt(1.0 + factor * variance)[:, None]


def dempster_shafer(logits: torch.Tensor) -> torch.Tensor:
    """Dempster-Shafer uncertainty ``K / (K + sum_k exp(z_k))`` of (n, K) logits, computed stably in log space.

    Examples
    --------
    >>> float(dempster_shafer(torch.zeros(1, 4)))  # all logits 0: K / (K + K)
    0.5
    """
    k = logits.shape[1]
    return torch.sigmoid(math.log(k) - torch.logsumexp(logits, dim=1))


class SNGPNet(nn.Module):
    """Residual MLP + (optional) bounded spectral norm + (optional) RFF-GP output (docs/SEGCLR.md §2.10b).

    ``Linear(d -> H)`` (no spectral norm), then ``blocks`` pre-activation residual blocks
    ``h <- h + W2 dropout(ReLU(W1 ReLU(h)))`` with bounded spectral norm on W1 and W2 (``spec_norm_bound > 0``),
    then :class:`RandomFeatureGP` (``gp_features > 0``) or a plain linear output. ``forward`` returns logits;
    :meth:`hidden` the vector fed to the output layer.
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: int = 128, blocks: int = 2,
                 dropout: float = 0.0, spec_norm_bound: float = 6.0, gp_features: int = 1024,
                 gp_lengthscale: float = 1.0, gp_ridge: float = 1e-3, gp_layernorm: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.input = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            w1, w2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
            for layer in (w1, w2):
                self._init_linear(layer, generator)
                if spec_norm_bound > 0:
                    add_bounded_spectral_norm(layer, spec_norm_bound, generator=generator)
            self.blocks.append(nn.ModuleDict({"w1": w1, "w2": w2}))
        self._init_linear(self.input, generator)
        self.dropout_p = float(dropout)
        self._generator = generator  # dropout masks are drawn from it, never from the global RNG
        self.gp = (RandomFeatureGP(hidden, num_classes, gp_features, lengthscale=gp_lengthscale, ridge=gp_ridge,
                                   layernorm=gp_layernorm, generator=generator) if gp_features > 0 else None)
        self.linear_out = None
        if self.gp is None:
            self.linear_out = nn.Linear(hidden, num_classes)
            self._init_linear(self.linear_out, generator)

    @staticmethod
    def _init_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(layer.weight.shape[1])
            layer.bias.uniform_(-bound, bound, generator=generator)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, H)."""
        h = self.input(x)
        for blk in self.blocks:
            h = h + blk["w2"](self._dropout(torch.relu(blk["w1"](torch.relu(h)))))
        return h

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return x
        keep = torch.rand(x.shape, generator=self._generator).to(x.device) >= self.dropout_p
        return x * keep / (1.0 - self.dropout_p)

    def output_weight(self) -> torch.Tensor:
        """The weight of the output layer (the target of the L2 penalty)."""
        return self.gp.output.weight if self.gp is not None else self.linear_out.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return self.gp(h) if self.gp is not None else self.linear_out(h)

    def logits_and_variance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, K) posterior-mean logits and (n,) predictive variance (zeros without the GP layer)."""
        h = self.hidden(x)
        if self.gp is None:
            return self.linear_out(h), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self.gp(h), self.gp.variance(h)
