"""Post-hoc EMA with power-function profiles (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", EDM2: section 3.1 and appendix C).

A power-function EMA of the weights at time ``t`` (images seen) averages the trajectory
``theta(tau), 0 <= tau <= t`` with the density ``p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)``.
Its width relative to ``t`` is ``sigma_rel``. Training tracks a few profiles and stores snapshots
of them; afterwards any profile ``(t, sigma_rel)`` is a least-squares combination of the snapshots
(the profiles are functions of ``tau``, so the combination is solved on the profiles alone and
then applied to the weights).

Pure numpy: no torch, no distributed or storage imports. Times may be in any unit (images seen
here); the weights do not depend on the unit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SIGMA_REL_MAX",
    "PosthocSolution",
    "check_sigma_rel",
    "gamma_from_sigma_rel",
    "posthoc_weights",
    "power_ema_beta",
    "power_profile_correlation",
    "power_profile_density",
    "sigma_rel_from_gamma",
]

# sigma_rel of gamma -> 0 (the uniform average over [0, t]): sqrt(1 / (4 * 3)); gamma > 0 needs less.
SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)


def check_sigma_rel(sigma_rel: float, what: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or a ValueError naming the allowed range (0, 0.2887)."""
    try:
        value = float(sigma_rel)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {sigma_rel!r} is not a number; give a relative EMA length in "
                         f"(0, {SIGMA_REL_MAX:.4f})") from None
    if not 0.0 < value < SIGMA_REL_MAX:
        raise ValueError(f"{what}: {sigma_rel!r} is not allowed; a power-function EMA's relative standard "
                         f"deviation lies in (0, {SIGMA_REL_MAX:.4f}) (EDM2 uses 0.05 to 0.2)")
    return value


def sigma_rel_from_gamma(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent gamma (EDM2 eq. 123)."""
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """Exponent gamma of the profile with relative std sigma_rel (EDM2 eq. 126, algorithm 2)."""
    s = check_sigma_rel(sigma_rel)
    inv = s ** -2
    # eq. 123 squared and rearranged: gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0; largest real root
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-9 * max(1.0, inv)].real.max())


def power_ema_beta(gamma: float, t: float, delta: float) -> float:
    """Decay of one update that advances the profile from t - delta to t (EDM2 eq. 127: (1 - delta/t)^(gamma+1))."""
    if t <= 0 or delta <= 0 or delta > t:
        raise ValueError(f"power_ema_beta: need 0 < delta <= t, got delta={delta!r}, t={t!r}")
    return (1.0 - delta / t) ** (gamma + 1.0)


def power_profile_density(tau: np.ndarray, t: float, gamma: float) -> np.ndarray:
    """Weight density of the profile (t, gamma) over the trajectory time tau (EDM2 eq. 121)."""
    tau = np.asarray(tau, dtype=np.float64)
    return np.where((tau >= 0) & (tau <= t), (gamma + 1.0) * np.clip(tau, 0, None) ** gamma / t ** (gamma + 1.0), 0.0)


def power_profile_correlation(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """Inner product of two profiles, int p_a p_b dtau, in closed form (EDM2 eq. 151, algorithm 3).

    ``(ga+1)(gb+1) / (ga+gb+1) * min^(ga+gb+1) / (t_a^(ga+1) t_b^(gb+1))``, written with the ratio of
    the times so that nothing overflows for large t. Broadcasts over its arguments.
    """
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = np.where(t_a < t_b, t_a / t_b, t_b / t_a)  # min / max, in (0, 1]
    exponent = np.where(t_a < t_b, g_b, g_a)  # the exponent of the profile that ends later
    return (g_a + 1.0) * (g_b + 1.0) * ratio ** exponent / ((g_a + g_b + 1.0) * np.maximum(t_a, t_b))


@dataclass(frozen=True)
class PosthocSolution:
    """Weights of the stored profiles that best match a target profile, and how well they do."""

    weights: np.ndarray  # (n,) one per stored profile, summing to 1
    relative_error: float  # ||sum w_i p_i - p_target|| / ||p_target|| in L2 over tau (before the sum-to-1 rescale)


def posthoc_weights(times: Sequence[float], gammas: Sequence[float], target_time: float,
                    target_gamma: float) -> PosthocSolution:
    """Least-squares weights of stored profiles (times[i], gammas[i]) for the target profile
    (EDM2 algorithm 3: solve A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_target>, then x / sum x)."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    g = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if t.shape != g.shape or t.size == 0:
        raise ValueError(f"posthoc_weights: need as many stored times as exponents (>= 1), got {t.size} and {g.size}")
    gram = power_profile_correlation(t[:, None], g[:, None], t[None, :], g[None, :])
    rhs = power_profile_correlation(t, g, target_time, target_gamma)
    try:
        x = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:  # duplicate profiles: the minimum-norm least-squares solution
        x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    target_norm2 = float(power_profile_correlation(target_time, target_gamma, target_time, target_gamma))
    # ||sum x_i p_i - p||^2 = x^T A x - 2 x^T b + <p, p>
    residual2 = max(float(x @ gram @ x - 2.0 * x @ rhs + target_norm2), 0.0)
    return PosthocSolution(weights=x / x.sum(), relative_error=math.sqrt(residual2 / target_norm2))
