"""The Gaussian-mixture oracle: closed-form noisy densities, scores, denoisers and classifiers.

For data x0 ~ sum_k pi_k N(mu_k, Sigma_k) and any Gaussian perturbation x_t = alpha * x0 + sigma * eps
(VP: alpha = sqrt(abar), sigma = sqrt(1 - abar); VE: alpha = 1), the noisy marginal is again a
mixture, x_t | k ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I). So the score, the optimal denoiser
E[x0 | x_t] (Tweedie), the optimal noisy classifier p(k | x_t) and the exact log-density are all
closed-form. Plugged in as "the model", every sampler must reproduce the data distribution.

Inputs are flat vectors of shape (n, D); ``alpha`` and ``sigma`` are scalars or per-example (n,).
All math runs in float64 and results are returned in the dtype of ``x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


def _per_example(v: float | Tensor, n: int) -> Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    if v.ndim == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise ValueError(f"alpha/sigma: shape {tuple(v.shape)} is not allowed; expected a scalar or ({n},)")
    return v


@dataclass(frozen=True)
class GaussianMixture:
    """A mixture of full-covariance Gaussians: weights (K,), means (K, D), covs (K, D, D)."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    def __post_init__(self) -> None:
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        m = torch.as_tensor(self.means, dtype=torch.float64)
        c = torch.as_tensor(self.covs, dtype=torch.float64)
        if w.ndim != 1 or m.ndim != 2 or c.ndim != 3 or m.shape[0] != w.shape[0] or c.shape != (*m.shape, m.shape[1]):
            raise ValueError(
                f"GaussianMixture: shapes weights {tuple(w.shape)}, means {tuple(m.shape)}, covs {tuple(c.shape)} "
                "are not allowed; expected (K,), (K, D), (K, D, D)"
            )
        if not torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)) or (w <= 0).any():
            raise ValueError(f"GaussianMixture: weights {w.tolist()} must be positive and sum to 1")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "covs", c)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @classmethod
    def example_2d(cls) -> GaussianMixture:
        """Three well-separated, anisotropic components in [-1, 1]^2 (the test and demo default)."""
        weights = torch.tensor([0.5, 0.3, 0.2])
        means = torch.tensor([[-0.5, -0.4], [0.5, -0.3], [0.0, 0.55]])
        covs = torch.stack(
            [
                torch.tensor([[0.020, 0.008], [0.008, 0.010]]),
                torch.tensor([[0.010, -0.004], [-0.004, 0.015]]),
                torch.tensor([[0.015, 0.0], [0.0, 0.006]]),
            ]
        )
        return cls(weights, means, covs)

    # -- sampling and exact density ---------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw n samples (float64) and their component labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        x = self.means[labels] + (chol[labels] @ z.unsqueeze(-1)).squeeze(-1)
        return x, labels

    def _component_stats(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor):
        """Per-example, per-component quantities of the noisy marginal at (alpha, sigma)."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        n, d = x64.shape
        if d != self.dim:
            raise ValueError(f"x: dimension {d} is not allowed; this mixture has dimension {self.dim}")
        a_s = torch.stack([_per_example(alpha, n), _per_example(sigma, n)], -1)
        # Samplers pass one noise level for the whole batch: factor each distinct level once.
        levels, which = torch.unique(a_s, dim=0, return_inverse=True)
        la = levels[:, 0, None, None, None]
        cov_t = la**2 * self.covs[None] + levels[:, 1, None, None, None] ** 2 * torch.eye(d, dtype=torch.float64)
        chol_levels = torch.linalg.cholesky(cov_t)  # (levels, K, D, D)
        precision = torch.cholesky_inverse(chol_levels)[which]  # (n, K, D, D)
        a = a_s[:, 0, None, None]
        diff = x64[:, None, :] - a * self.means[None]  # (n, K, D)
        sol = torch.einsum("nkij,nkj->nki", precision, diff)  # C^{-1}(x - a mu)
        maha = (diff * sol).sum(-1)
        logdet = (2 * torch.log(torch.diagonal(chol_levels, dim1=-2, dim2=-1)).sum(-1))[which]
        log_comp = -0.5 * (maha + logdet + d * math.log(2 * math.pi))  # log N(x; a mu_k, C_k)
        log_joint = torch.log(self.weights)[None] + log_comp  # (n, K)
        return x64, a, log_joint, sol

    def log_prob(self, x: Tensor, alpha: float | Tensor = 1.0, sigma: float | Tensor = 0.0) -> Tensor:
        """Exact log-density of the noisy marginal (the data density at alpha=1, sigma=0)."""
        _, _, log_joint, _ = self._component_stats(x, alpha, sigma)
        return torch.logsumexp(log_joint, dim=-1).to(x.dtype)

    def class_log_posterior(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor) -> Tensor:
        """log p(k | x_t): the optimal noisy classifier (ADM-G), shape (n, K)."""
        _, _, log_joint, _ = self._component_stats(x, alpha, sigma)
        return torch.log_softmax(log_joint, dim=-1).to(x.dtype)

    def sample_discrepancy(
        self, x: Tensor, *, reference_size: int = 20_000, generator: torch.Generator | None = None
    ) -> dict[str, tuple[float, float]]:
        """How far samples ``x`` (n, D) are from this mixture: statistic -> (difference, standard error).

        Statistics: the mean of each coordinate ('mean_i'), the fraction of samples whose most
        probable component is k ('fraction_k'), and the mean exact log-density ('log_prob'), each
        compared with a fresh reference sample of ``reference_size``; the standard error is that
        of the difference of the two sample means. |difference| <= 5 se fails by chance ~1e-6.
        """
        ref, _ = self.sample(reference_size, generator=generator)
        out: dict[str, tuple[float, float]] = {}

        def compare(name: str, a: Tensor, b: Tensor) -> None:
            se = math.sqrt(a.var().item() / len(a) + b.var().item() / len(b))
            out[name] = ((a.mean() - b.mean()).item(), se)

        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        for i in range(self.dim):
            compare(f"mean_{i}", x64[:, i], ref[:, i])
        kx = self.class_log_posterior(x64, 1.0, 0.0).argmax(-1)
        kr = self.class_log_posterior(ref, 1.0, 0.0).argmax(-1)
        for k in range(self.num_components):
            compare(f"fraction_{k}", (kx == k).double(), (kr == k).double())
        compare("log_prob", self.log_prob(x64), self.log_prob(ref))
        return out

    # -- scores and denoisers ---------------------------------------------------------------

    def score(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor, y: Tensor | None = None) -> Tensor:
        """grad_x log p_t(x), or grad_x log p_t(x | k=y) when class labels y are given."""
        _, _, log_joint, sol = self._component_stats(x, alpha, sigma)
        if y is None:
            resp = torch.softmax(log_joint, dim=-1)
        else:
            resp = torch.nn.functional.one_hot(y.long(), self.num_components).to(torch.float64)
        out = -(resp[..., None] * sol).sum(1)
        return out.to(x.dtype).reshape(x.shape)

    def denoise(self, x: Tensor, alpha: float | Tensor, sigma: float | Tensor, y: Tensor | None = None) -> Tensor:
        """The optimal denoiser E[x0 | x_t] (optionally given the class): Tweedie's formula."""
        x64 = x.reshape(x.shape[0], -1).to(torch.float64)
        n = x64.shape[0]
        a = _per_example(alpha, n)[:, None]
        s = _per_example(sigma, n)[:, None]
        score = self.score(x, alpha, sigma, y).reshape(n, -1).to(torch.float64)
        x0 = (x64 + s**2 * score) / a  # E[alpha x0 | x_t] = x_t + sigma^2 grad log p_t
        return x0.to(x.dtype).reshape(x.shape)

    def predict(
        self,
        x: Tensor,
        alpha: float | Tensor,
        sigma: float | Tensor,
        parameterization: str = "eps",
        y: Tensor | None = None,
    ) -> Tensor:
        """The optimal network output for parameterization 'eps', 'x0', 'v' or 'score'."""
        if parameterization == "score":
            return self.score(x, alpha, sigma, y)
        n = x.shape[0]
        shape = (n,) + (1,) * (x.ndim - 1)
        a = _per_example(alpha, n).reshape(shape)
        s = _per_example(sigma, n).reshape(shape)
        x64 = x.to(torch.float64)
        eps = -s * self.score(x, alpha, sigma, y).to(torch.float64)  # E[eps | x_t] = -sigma * score
        x0 = (x64 - s * eps) / a
        if parameterization == "eps":
            out = eps
        elif parameterization == "x0":
            out = x0
        elif parameterization == "v":
            out = a * eps - s * x0  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
        else:
            raise ValueError(
                f"parameterization: {parameterization!r} is not allowed; expected one of 'eps', 'x0', 'v', 'score'"
            )
        return out.to(x.dtype)
