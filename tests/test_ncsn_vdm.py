"""NCSN (annealed Langevin, inpainting), VDM (learned schedule, VLB terms, continuous vs discrete VLB)
and a few training steps of a tiny model with every continuous-time objective."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.diffusion.ncsn import annealed_langevin_sample, ncsn_loss, ncsn_sigmas
from pipeline.diffusion.oracle import GaussianMixture
from pipeline.diffusion.registry import OBJECTIVES as REGISTRY
from pipeline.diffusion.registry import make_continuous_objective

OBJECTIVES = ("vp_sde", "subvp_sde", "ve_sde", "ncsn", "vdm")  # the continuous-time ones
assert set(OBJECTIVES) <= set(REGISTRY)
from pipeline.diffusion.vdm import (
    MonotoneGamma,
    VDMObjective,
    fourier_features,
    gamma_and_derivative,
    vdm_alpha_sigma,
    vdm_continuous_diffusion_loss,
    vdm_discrete_diffusion_loss,
    vdm_prior_loss,
    vdm_reconstruction_loss,
    vdm_sample,
)

GM = GaussianMixture.example_2d()
N = 2000



def assert_matches(mixture, x, seed, log_prob_allowance=0.05):
    """Every GaussianMixture.sample_discrepancy statistic within 5 standard errors (+ allowance for log p)."""
    stats = mixture.sample_discrepancy(x, generator=torch.Generator().manual_seed(seed))
    for name, (diff, se) in stats.items():
        tol = 5 * se + (log_prob_allowance if name == "log_prob" else 0.0)
        assert abs(diff) <= tol, f"{name}: difference {diff:.4f} exceeds {tol:.4f}; all: {stats}"


def correlated_gaussian():
    cov = torch.tensor([[0.04, 0.8 * 0.2 * 0.15], [0.8 * 0.2 * 0.15, 0.0225]])
    return GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.1, -0.2]]), cov[None])


def conditional_of_second_given_first(g: GaussianMixture, y0: float) -> tuple[float, float]:
    """x_1 | x_0 = y0 for a single Gaussian: mean mu_1 + S_10 / S_00 (y0 - mu_0), var S_11 - S_10^2 / S_00."""
    mu, s = g.means[0], g.covs[0]
    return (mu[1] + s[1, 0] / s[0, 0] * (y0 - mu[0])).item(), (s[1, 1] - s[1, 0] ** 2 / s[0, 0]).item()


def assert_conditional(x1: torch.Tensor, mean: float, var: float, mean_allowance: float, var_rel_allowance: float):
    n = len(x1)
    se_mean, se_var = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
    assert abs(x1.mean().item() - mean) < 5 * se_mean + mean_allowance, (x1.mean().item(), mean)
    assert abs(x1.var().item() - var) < 5 * se_var + var_rel_allowance * var, (x1.var().item(), var)


# -- NCSN -----------------------------------------------------------------------------------------


def test_ncsn_sigmas_are_geometric():
    s = ncsn_sigmas(1.0, 0.01, 10)
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == pytest.approx(0.01)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 0.01 ** (1 / 9)))
    with pytest.raises(ValueError, match="sigma"):
        ncsn_sigmas(0.01, 1.0, 10)


def oracle_sigma_score(mixture):
    return lambda x, sigma: mixture.score(x, 1.0, sigma)


def test_ncsn_loss_is_minimised_by_the_true_score_and_weights_by_sigma_squared():
    x0, _ = GM.sample(4000, generator=torch.Generator().manual_seed(0))
    sigmas = ncsn_sigmas(1.0, 0.01, 10)

    def loss(scale):
        return ncsn_loss(lambda x, s: scale * GM.score(x, 1.0, s), x0, sigmas,
                         generator=torch.Generator().manual_seed(1)).mean()

    assert loss(1.0) < loss(0.9) and loss(1.0) < loss(1.1)
    # lambda = sigma^2 makes a zero score cost 1/2 E||z||^2 = D/2 at every level
    torch.testing.assert_close(loss(0.0), torch.tensor(1.0, dtype=torch.float64), atol=0.05, rtol=0)


def test_annealed_langevin_with_exact_score_reproduces_the_mixture():
    sigmas = ncsn_sigmas(1.0, 0.01, 10)
    x_init = torch.rand(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x = annealed_langevin_sample(oracle_sigma_score(GM), sigmas, x_init, steps_per_level=100, step_lr=2e-5,
                                 generator=torch.Generator().manual_seed(3))
    assert_matches(GM, x, seed=4)


def test_annealed_langevin_and_vdm_sampler_with_seeds_are_batch_independent():
    x_init = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(30)) * 2 - 1
    run = lambda x, s: annealed_langevin_sample(oracle_sigma_score(GM), ncsn_sigmas(1.0, 0.01, 3), x,  # noqa: E731
                                                steps_per_level=5, seeds=s)
    torch.testing.assert_close(run(x_init, range(5))[1:], run(x_init[1:], range(1, 5)))
    gamma = MonotoneGamma(-10.0, 6.0, hidden=8).double()
    run = lambda x, s: vdm_sample(oracle_eps_fn, gamma, x, steps=10, seeds=s)  # noqa: E731
    torch.testing.assert_close(run(x_init, range(5))[:2], run(x_init[:2], range(2)))


def test_annealed_langevin_inpainting_follows_the_gaussian_conditional():
    g = correlated_gaussian()
    y0 = 0.3  # known first coordinate, 1 std above its mean
    known = torch.tensor([[y0, 0.0]], dtype=torch.float64).expand(N, 2)
    mask = torch.tensor([[True, False]])
    x_init = torch.rand(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    x = annealed_langevin_sample(oracle_sigma_score(g), ncsn_sigmas(1.0, 0.01, 10), x_init, steps_per_level=100,
                                 step_lr=2e-5, known=known, mask=mask, generator=torch.Generator().manual_seed(6))
    assert (x[:, 0] == y0).all()
    mean, var = conditional_of_second_given_first(g, y0)
    assert_conditional(x[:, 1], mean, var, mean_allowance=0.005, var_rel_allowance=0.1)


# -- VDM ------------------------------------------------------------------------------------------


def test_learned_gamma_is_monotone_with_fixed_ends_even_when_pushed_the_other_way():
    torch.manual_seed(0)
    gamma = MonotoneGamma(-13.3, 5.0, hidden=64)
    t = torch.linspace(0, 1, 1001)
    opt = torch.optim.Adam(gamma.parameters(), lr=0.05)
    for _ in range(50):  # try hard to make gamma decrease in the middle
        loss = gamma(torch.tensor([0.3])) - gamma(torch.tensor([0.7]))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    with torch.no_grad():
        g = gamma(t)
    assert (g[1:] > g[:-1]).all()
    torch.testing.assert_close(g[[0, -1]], torch.stack(gamma.ends(g.dtype)).detach())
    a, s = vdm_alpha_sigma(g)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(g))


def test_vdm_prior_and_reconstruction_terms():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    x = levels[torch.randint(0, 256, (64, 3, 4, 4), generator=torch.Generator().manual_seed(7))]
    g1 = torch.tensor(5.0, dtype=torch.float64)
    a1, s1 = vdm_alpha_sigma(g1)
    q = torch.distributions.Normal(a1 * x, s1.expand_as(x))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum((1, 2, 3))
    torch.testing.assert_close(vdm_prior_loss(x, g1), kl)
    gen = torch.Generator().manual_seed(8)
    sharp = vdm_reconstruction_loss(x, torch.tensor(-13.3, dtype=torch.float64), generator=gen)
    # noise std 0.0013 vs half a bin 0.0039 (3 std): only rare >2.5-sigma draws cost anything
    assert sharp.mean() / 48 < 0.05, sharp.mean() / 48
    blurred = vdm_reconstruction_loss(x, torch.tensor(12.0, dtype=torch.float64), generator=gen)
    torch.testing.assert_close(blurred / 48, torch.full((64,), math.log(256), dtype=torch.float64), atol=0.01, rtol=0)


def oracle_eps_fn(z, gamma):
    alpha, sigma = vdm_alpha_sigma(gamma)
    return GM.predict(z, alpha, sigma, "eps")


def test_vdm_continuous_vlb_is_the_limit_of_the_discrete_vlb():
    """With eps held fixed per example, L_T = 1/2 sum_i expm1(gamma_i - gamma_{i-1}) mse(t_i) is a Riemann sum of
    L_inf = 1/2 int gamma'(t) mse(t) dt: |L_T - L_inf| shrinks like 1/T. The random-time estimator is unbiased."""
    torch.manual_seed(1)
    gamma = MonotoneGamma(-10.0, 6.0, hidden=32).double()
    n = 50
    x, _ = GM.sample(n, generator=torch.Generator().manual_seed(9))
    eps = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def on_grid(values):  # repeat the batch at every grid value, same eps
        return x.repeat(len(values), 1), eps.repeat(len(values), 1), values.repeat_interleave(n)

    m = 4000
    xs, es, t = on_grid((torch.arange(m, dtype=torch.float64) + 0.5) / m)  # midpoint rule
    g, dg = gamma_and_derivative(gamma, t)
    with torch.no_grad():
        l_inf = vdm_continuous_diffusion_loss(oracle_eps_fn, xs, g, dg, noise=es).mean().item()
    errors = []
    for steps in (10, 100, 1000):
        xs, es, i = on_grid(torch.arange(1, steps + 1, dtype=torch.float64))
        with torch.no_grad():
            g_t, g_s = gamma(i / steps), gamma((i - 1) / steps)
            l_t = vdm_discrete_diffusion_loss(oracle_eps_fn, xs, g_t, g_s, steps, noise=es).mean().item()
        errors.append(abs(l_t - l_inf))
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3, errors
    assert errors[2] < 0.01 * l_inf, (errors, l_inf)
    # the training estimator (random t, random eps) averages to the same integral over eps
    big = 20000
    xb, _ = GM.sample(big, generator=torch.Generator().manual_seed(11))
    tb = torch.rand(big, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    gb, dgb = gamma_and_derivative(gamma, tb)
    xs, _, t = on_grid((torch.arange(400, dtype=torch.float64) + 0.5) / 400)
    g, dg = gamma_and_derivative(gamma, t)
    with torch.no_grad():
        est = vdm_continuous_diffusion_loss(oracle_eps_fn, xb, gb, dgb, generator=torch.Generator().manual_seed(13))
        ref = [vdm_continuous_diffusion_loss(oracle_eps_fn, xs, g, dg, generator=torch.Generator().manual_seed(14 + k))
               .mean() for k in range(5)]
    ref_mean = torch.stack(ref).mean().item()
    se = est.std().item() / math.sqrt(big) + torch.stack(ref).std().item() / math.sqrt(5)
    # x differ between the two (20000 fresh points vs 50 fixed ones): compare within 5 se + 10% of the value
    assert abs(est.mean().item() - ref_mean) < 5 * se + 0.1 * ref_mean, (est.mean().item(), ref_mean, se)


@pytest.mark.parametrize("timesteps", [0, 20])
def test_vdm_schedule_interior_follows_the_variance_and_its_ends_the_vlb(timesteps):
    """schedule_objective='variance': d/d(interior) of mean(loss) equals d/d(interior) of mean(loss^2);
    the endpoints (gamma_0, gamma_1) and the network get the plain VLB gradient (VDM, learning the noise schedule)."""
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    x = levels[torch.randint(0, 256, (32, 2), generator=torch.Generator().manual_seed(20))]
    torch.manual_seed(2)
    net = TinyNet(2).double()
    obj = VDMObjective(hidden=8, timesteps=timesteps).double()
    ref = VDMObjective(hidden=8, timesteps=timesteps, schedule_objective="vlb").double()
    ref.load_state_dict(obj.state_dict())

    def grads(objective, square):
        objective.zero_grad()
        net.zero_grad()
        loss = objective(net, x, generator=torch.Generator().manual_seed(21))
        (loss**2 if square else loss).mean().backward()
        return {k: p.grad.clone() for k, p in objective.named_parameters()}, [p.grad.clone() for p in net.parameters()]

    g_var, net_var = grads(obj, square=False)
    g_vlb, net_vlb = grads(ref, square=False)
    g_sq, _ = grads(ref, square=True)
    for name in g_var:
        want = g_vlb[name] if name in ("gamma.gamma_0", "gamma.gamma_1") else g_sq[name]
        torch.testing.assert_close(g_var[name], want, msg=name)
    for a, b in zip(net_var, net_vlb):
        torch.testing.assert_close(a, b)


def test_vdm_ancestral_sampler_with_exact_eps_reproduces_the_mixture():
    gamma = MonotoneGamma(-10.0, 6.0, hidden=16).double()
    x_init = torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    x = vdm_sample(oracle_eps_fn, gamma, x_init, steps=250, generator=torch.Generator().manual_seed(16))
    assert_matches(GM, x, seed=17)


def test_fourier_features():
    z = torch.rand(3, 2, 4, 4)
    f = fourier_features(z, (7, 9))
    assert f.shape == (3, 2 * 2 * 2, 4, 4)
    # channel order: sin(c0 n7), sin(c0 n8), sin(c1 n7), sin(c1 n8), then the same with cos
    torch.testing.assert_close(f[:, 1], torch.sin(2**8 * 2 * math.pi * z[:, 0]))
    torch.testing.assert_close(f[:, 6], torch.cos(2**7 * 2 * math.pi * z[:, 1]))


def test_vdm_objective_reports_bits_per_dim():
    obj = VDMObjective(schedule="fixed_linear")
    x = torch.linspace(-1, 1, 256)[torch.randint(0, 256, (8, 6), generator=torch.Generator().manual_seed(18))]
    out = obj.terms(lambda z, t, y=None: torch.zeros_like(z), x, generator=torch.Generator().manual_seed(19))
    torch.testing.assert_close(out.bpd, (out.loss_recon + out.loss_klz + out.loss_diff) / (6 * math.log(2)))
    assert (out.loss_klz >= 0).all() and (out.loss_recon >= 0).all() and (out.loss_diff >= 0).all()


# -- every objective trains a tiny model ----------------------------------------------------------


class TinyNet(nn.Module):
    """An MLP over (x, embedding of the noise input) for flat (B, D) data; out_dim = D."""

    def __init__(self, in_dim: int, out_dim: int = 2, width: int = 64) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.tensor([1e-3, 3e-3, 1e-2, 0.1, 0.3, 1.0]))
        self.net = nn.Sequential(nn.Linear(in_dim + 12, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, out_dim))

    def forward(self, x, t, y=None):
        arg = t.to(x.dtype)[:, None] * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, torch.sin(arg), torch.cos(arg)], dim=1))


CASES = [(name, {}) for name in OBJECTIVES] + [
    ("vp_sde", {"weighting": "likelihood"}),
    ("vdm", {"timesteps": 50, "hidden": 16}),
    ("vdm", {"fourier_features": True, "fourier_exponents": (1, 3), "hidden": 16}),
]


@pytest.mark.parametrize("objective,options", CASES, ids=[f"{o}-{sorted(p)}" for o, p in CASES])
def test_a_tiny_model_trains_with_every_objective(objective, options):
    torch.manual_seed(0)
    if objective == "ve_sde":
        options = {"sigma_max": 2.0, **options}
    obj = make_continuous_objective(objective, options)
    in_dim = 2 * (1 + 2 * 2) if options.get("fourier_features") else 2
    net = TinyNet(in_dim)
    params = list(net.parameters()) + list(obj.parameters())
    assert bool(list(obj.parameters())) == (objective == "vdm")
    opt = torch.optim.Adam(params, lr=3e-3)
    levels = torch.linspace(-1, 1, 256)

    def data(n, seed):
        x, _ = GM.sample(n, generator=torch.Generator().manual_seed(seed))
        return levels[torch.round((x.float().clamp(-1, 1) + 1) * 127.5).long()]  # on the 8-bit grid

    def eval_loss():
        with torch.no_grad() if objective != "vdm" else torch.enable_grad():
            return sum(obj(net, data(512, 100 + k), generator=torch.Generator().manual_seed(k)).mean().item()
                       for k in range(4)) / 4

    before = eval_loss()
    for step in range(150):
        loss = obj(net, data(128, step), generator=torch.Generator().manual_seed(1000 + step))
        assert loss.shape == (128,)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    after = eval_loss()
    assert after < 0.9 * before, (before, after)
