"""Score SDEs, the probability-flow ODE, likelihood and the few-step samplers against the mixture oracle.

Sample checks use GaussianMixture.sample_discrepancy: per-coordinate means, the fraction of samples
in each component and the mean exact log-density, each compared with a 20k reference sample; a check
passes when |difference| <= 5 standard errors (+ a stated discretisation allowance for log p).
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.fast_samplers import (
    denoiser_from_discrete,
    denoiser_from_score_fn,
    denoiser_from_sigma_score,
    discrete_sigmas,
    dpm_solver_pp_2m_sample,
    edm_heun_sample,
    karras_sigmas,
    round_sigmas,
)
from pipeline.diffusion.gaussian import oracle_model
from pipeline.diffusion.oracle import GaussianMixture
from pipeline.diffusion.registry import make_continuous_objective
from pipeline.diffusion.schedules import build_schedule
from pipeline.diffusion.sde import (
    SDEObjective,
    SubVPSDE,
    VESDE,
    VPSDE,
    bits_per_dim,
    dsm_loss,
    ode_likelihood,
    ode_sample,
    pc_sample,
    prediction_to_score,
    prediction_to_x0_eps,
    score_fn_from_model,
    uniform_dequantize,
)

N = 2000


GM = GaussianMixture.example_2d()
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(0.01, 3.0)}


def oracle_score(sde, y=None):
    def score_fn(x, t):
        alpha, sigma = sde.marginal(t)
        return GM.score(x, alpha, sigma, y)

    return score_fn


def assert_matches_mixture(x, seed=0, log_prob_allowance=0.05):
    """5 standard errors on every statistic; log p also gets a discretisation allowance (nats)."""
    assert torch.isfinite(x).all()
    stats = GM.sample_discrepancy(x, generator=torch.Generator().manual_seed(1000 + seed))
    for name, (diff, se) in stats.items():
        tol = 5 * se + (log_prob_allowance if name == "log_prob" else 0.0)
        assert abs(diff) <= tol, f"{name}: difference {diff:.4f} exceeds {tol:.4f} (se {se:.4f}); all: {stats}"


def prior(sde, seed, n=N):
    return sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the SDEs themselves --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_marginals_solve_the_moment_odes(name):
    """For dx = a(t) x dt + g dw: d alpha/dt = a alpha and d sigma^2/dt = 2 a sigma^2 + g^2 (moment equations)."""
    sde = SDES[name]
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    (a_hi, s_hi), (a_lo, s_lo) = sde.marginal(t + h), sde.marginal(t - h)
    alpha, sigma = sde.marginal(t)
    a, g = sde.coefficients(t)
    torch.testing.assert_close((a_hi - a_lo) / (2 * h), a * alpha, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close((s_hi**2 - s_lo**2) / (2 * h), 2 * a * sigma**2 + g**2, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sde.t_from_ratio(sigma / alpha), t)
    if name != "ve":  # VP and sub-VP start at the data: alpha(0) = 1, sigma(0) = 0
        a0, s0 = sde.marginal(torch.zeros(1, dtype=torch.float64))
        assert a0.item() == 1.0 and s0.item() == 0.0


def test_subvp_variance_is_below_vp():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert (SDES["subvp"].marginal(t)[1] < SDES["vp"].marginal(t)[1]).all()


@pytest.mark.parametrize("param", ["eps", "x0", "v", "score"])
def test_parameterisations_agree_with_the_oracle(param):
    x, _ = GM.sample(64, generator=torch.Generator().manual_seed(1))
    t = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    alpha, sigma = VPSDE().marginal(t)
    out = GM.predict(x, alpha, sigma, param)
    x0, eps = prediction_to_x0_eps(out, x, alpha, sigma, param)
    torch.testing.assert_close(x0, GM.predict(x, alpha, sigma, "x0"))
    torch.testing.assert_close(eps, GM.predict(x, alpha, sigma, "eps"))
    torch.testing.assert_close(prediction_to_score(out, x, alpha, sigma, param), GM.score(x, alpha, sigma))


# -- predictor-corrector sampling -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name,predictor,corrector",
    [
        ("vp", "reverse_diffusion", "langevin"),
        ("subvp", "euler_maruyama", "langevin"),
        ("ve", "reverse_diffusion", "langevin"),
        ("vp", "euler_maruyama", None),
        ("ve", None, "langevin"),
    ],
)
def test_pc_sampler_with_exact_score_reproduces_the_mixture(name, predictor, corrector):
    sde = SDES[name]
    g = torch.Generator().manual_seed(3)
    steps = 600 if predictor is None else 250  # corrector-only (annealed Langevin) needs more levels
    x = pc_sample(oracle_score(sde), sde, prior(sde, 4), steps=steps, predictor=predictor, corrector=corrector,
                  snr=0.16, generator=g)
    assert_matches_mixture(x, seed=5)


def test_per_sample_seeds_make_samples_independent_of_the_batch():
    """With seeds (and per-example corrector norms) sample k is a function of seed k only."""
    sde = SDES["vp"]
    x_init = prior(sde, 30, 6)
    known = torch.zeros(6, 2, dtype=torch.float64)
    mask = torch.tensor([[True, False]])
    full = pc_sample(oracle_score(sde), sde, x_init, steps=20, snr_norm="example", seeds=range(6),
                     known=known, mask=mask)
    part = pc_sample(oracle_score(sde), sde, x_init[3:], steps=20, snr_norm="example", seeds=range(3, 6),
                     known=known[3:], mask=mask)
    torch.testing.assert_close(full[3:], part)
    x80 = 80 * x_init
    a = edm_heun_sample(oracle_denoiser, x80, karras_sigmas(8, 0.01, 80.0), churn=5.0, seeds=range(6))
    b = edm_heun_sample(oracle_denoiser, x80[:2], karras_sigmas(8, 0.01, 80.0), churn=5.0, seeds=range(2))
    torch.testing.assert_close(a[:2], b)
    assert not torch.allclose(a[:2], edm_heun_sample(oracle_denoiser, x80[:2], karras_sigmas(8, 0.01, 80.0),
                                                      churn=5.0, seeds=[7, 8]))


def test_pc_sampler_rejects_bad_names():
    with pytest.raises(ValueError, match="predictor"):
        pc_sample(oracle_score(SDES["vp"]), SDES["vp"], prior(SDES["vp"], 0, 4), predictor="ancestral")
    with pytest.raises(ValueError, match="corrector"):
        pc_sample(oracle_score(SDES["vp"]), SDES["vp"], prior(SDES["vp"], 0, 4), corrector="hmc")


# -- probability-flow ODE ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,method", [("vp", "dopri5"), ("ve", "heun"), ("subvp", "heun")])
def test_probability_flow_ode_reproduces_the_mixture(name, method):
    sde = SDES[name]
    x, nfe = ode_sample(oracle_score(sde), sde, prior(sde, 6), method=method, steps=100, rtol=1e-4, atol=1e-4)
    assert nfe == 200 if method == "heun" else nfe > 10
    assert_matches_mixture(x, seed=7)


def test_probability_flow_ode_is_deterministic_and_heun_converges_to_dopri5():
    sde = SDES["vp"]
    z = prior(sde, 8, 200)
    ref, _ = ode_sample(oracle_score(sde), sde, z, method="dopri5", rtol=1e-7, atol=1e-7)
    err = [(ode_sample(oracle_score(sde), sde, z, method="heun", steps=s)[0] - ref).abs().max().item()
           for s in (25, 100)]
    assert err[1] < err[0] / 4  # second order: 4x the steps, ~16x smaller error
    assert err[1] < 1e-2


# -- likelihood -----------------------------------------------------------------------------------


def test_ode_likelihood_exact_divergence_matches_the_exact_density():
    sde = SDES["vp"]
    x, _ = GM.sample(100, generator=torch.Generator().manual_seed(9))
    eps = 1e-5
    res = ode_likelihood(oracle_score(sde), sde, x, divergence="exact", eps=eps, rtol=1e-6, atol=1e-6)
    alpha, sigma = sde.marginal(torch.tensor(eps, dtype=torch.float64))
    exact = GM.log_prob(x, alpha, sigma)  # the density the ODE transports: p_eps
    # with the true p_1 in place of the N(0, I) prior, the change of variables is exact up to the solver
    a1, s1 = sde.marginal(torch.tensor(1.0, dtype=torch.float64))
    transported = res.log_prob - sde.prior_log_prob(res.prior_latent) + GM.log_prob(res.prior_latent, a1, s1)
    err = (transported - exact).abs()
    assert err.max() < 2e-4, f"max |error| {err.max():.2e} nats"
    # with the N(0, I) prior: p_1 has means alpha(1) mu ~ 0.003, so |error| <~ 0.003 |x_1|
    assert (res.log_prob - exact).abs().max() < 1e-2
    # bits/dim of continuous data (no quantisation offset)
    bpd = bits_per_dim(transported, 2, num_bins=1, data_range=1.0)
    torch.testing.assert_close(bpd, -exact / (2 * math.log(2)), atol=2e-4, rtol=0)


def test_ode_likelihood_hutchinson_is_unbiased():
    sde = SDES["ve"]
    x, _ = GM.sample(400, generator=torch.Generator().manual_seed(10))
    eps = 1e-5
    res = ode_likelihood(oracle_score(sde), sde, x, divergence="hutchinson", eps=eps, rtol=1e-5, atol=1e-5,
                         generator=torch.Generator().manual_seed(11))
    alpha, sigma = sde.marginal(torch.tensor(eps, dtype=torch.float64))
    a1, s1 = sde.marginal(torch.tensor(1.0, dtype=torch.float64))
    transported = res.log_prob - sde.prior_log_prob(res.prior_latent) + GM.log_prob(res.prior_latent, a1, s1)
    err = transported - GM.log_prob(x, alpha, sigma)
    se = err.std().item() / math.sqrt(len(err))
    assert abs(err.mean().item()) < 5 * se + 1e-3, f"mean error {err.mean():.4f}, se {se:.4f}"
    assert err.std() < 1.0  # one Rademacher probe per example in 2-D: a noisy but sane estimate


def test_bits_per_dim_of_uniform_dequantized_data():
    """A density uniform on [-1, 1]^D gives each of 256 levels probability 1/256: exactly 8 bits/dim."""
    levels = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1
    x = levels[torch.randint(0, 256, (1000, 3), generator=torch.Generator().manual_seed(0))]
    deq = uniform_dequantize(x, generator=torch.Generator().manual_seed(1))
    k = torch.round((x + 1) * 255 / 2)
    assert ((deq + 1) / 2 * 256 >= k).all() and ((deq + 1) / 2 * 256 < k + 1).all()  # stays in its bin
    log_uniform = torch.full((1000,), -3 * math.log(2.0), dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(log_uniform, 3), torch.full_like(log_uniform, 8.0))


# -- training objectives --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_dsm_loss_is_minimised_by_the_true_score(name, weighting):
    sde = SDES[name]
    x0, _ = GM.sample(4000, generator=torch.Generator().manual_seed(12))

    def loss(scale):
        score_fn = oracle_score(sde)
        return dsm_loss(lambda x, t: scale * score_fn(x, t), sde, x0, weighting=weighting,
                        generator=torch.Generator().manual_seed(13)).mean()

    best = loss(1.0)
    assert best < loss(0.9) and best < loss(1.1)


def test_objective_adapts_the_network_output_once():
    """SDEObjective with an eps-predicting 'network' built from the oracle equals dsm_loss on the oracle score."""
    sde = SDES["vp"]

    def net(x, t_input, y=None):  # the network sees 999 t
        alpha, sigma = sde.marginal(t_input / 999)
        return GM.predict(x, alpha, sigma, "eps")

    x0, _ = GM.sample(256, generator=torch.Generator().manual_seed(14))
    obj = SDEObjective(sde)
    a = obj(net, x0, generator=torch.Generator().manual_seed(15))
    b = dsm_loss(oracle_score(sde), sde, x0, generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(a, b)
    assert a.shape == (256,)
    torch.testing.assert_close(score_fn_from_model(net, sde)(x0, torch.full((256,), 0.3, dtype=torch.float64)),
                               oracle_score(sde)(x0, torch.full((256,), 0.3, dtype=torch.float64)))


def test_objective_factory_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="objective"):
        make_continuous_objective("ddpm_sde", {})
    with pytest.raises(ValueError, match="sigma_max"):
        make_continuous_objective("vp_sde", {"sigma_max": 50})
    with pytest.raises(ValueError, match="weighting"):
        make_continuous_objective("ve_sde", {"weighting": "uniform"})
    obj = make_continuous_objective("ve_sde", {"sigma_max": 20, "weighting": "likelihood"})
    assert obj.sde.sigma_max == 20.0 and obj.weighting == "likelihood"
    assert list(make_continuous_objective("vdm", {"hidden": 8}).parameters())  # the schedule is trainable


# -- EDM Heun and DPM-Solver++ --------------------------------------------------------------------


def oracle_denoiser(x, sigma):
    return GM.denoise(x, 1.0, sigma)


def test_edm_heun_with_exact_denoiser_reproduces_the_mixture():
    x_init = 80.0 * torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    assert_matches_mixture(edm_heun_sample(oracle_denoiser, x_init, karras_sigmas(32, 0.002, 80.0)), seed=17)
    churned = edm_heun_sample(oracle_denoiser, x_init, karras_sigmas(40, 0.002, 80.0), churn=10.0, s_tmin=0.05,
                              s_tmax=50.0, generator=torch.Generator().manual_seed(18))
    assert_matches_mixture(churned, seed=19)


def test_dpm_solver_pp_2m_with_exact_denoiser_reproduces_the_mixture():
    sigmas = karras_sigmas(25, 0.002, 80.0)
    x_init = 80.0 * torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(20))
    assert_matches_mixture(dpm_solver_pp_2m_sample(oracle_denoiser, x_init, sigmas), seed=21)


def test_fast_samplers_converge_to_the_same_ode_solution():
    """Heun and DPM-Solver++(2M) solve the same probability-flow ODE: with more steps they agree."""
    x_init = 80.0 * torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    a = edm_heun_sample(oracle_denoiser, x_init, karras_sigmas(200, 0.002, 80.0))
    b = dpm_solver_pp_2m_sample(oracle_denoiser, x_init, karras_sigmas(200, 0.002, 80.0))
    err = (a - b).norm(dim=-1)
    # trajectories starting near the boundary between components are sensitive: use quantiles
    assert err.median() < 1e-4 and torch.quantile(err, 0.99) < 2e-3, (err.median(), err.max())


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_denoiser_adapter_of_a_score_sde_is_the_exact_denoiser(name):
    sde = SDES[name]
    x, _ = GM.sample(64, generator=torch.Generator().manual_seed(23))
    lo, hi = (0.02, 2.5) if name == "ve" else (0.01, 50.0)
    sigma = torch.exp(torch.linspace(math.log(lo), math.log(hi), 64, dtype=torch.float64))
    xn = x + sigma[:, None] * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(24))
    torch.testing.assert_close(denoiser_from_score_fn(oracle_score(sde), sde)(xn, sigma), GM.denoise(xn, 1.0, sigma))


def test_dpm_solver_over_an_ncsn_score_reproduces_the_mixture():
    denoiser = denoiser_from_sigma_score(lambda x, sigma: GM.score(x, 1.0, sigma))
    sigma = torch.exp(torch.linspace(-4, 2, 64, dtype=torch.float64))
    x = 0.3 * torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(27))
    torch.testing.assert_close(denoiser(x, sigma), GM.denoise(x, 1.0, sigma))
    x_init = 20.0 * torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(28))
    assert_matches_mixture(dpm_solver_pp_2m_sample(denoiser, x_init, karras_sigmas(25, 0.01, 20.0)), seed=29)


def test_dpm_solver_over_a_discrete_ddpm_model_reproduces_the_mixture():
    schedule = build_schedule("linear", 1000)
    levels = discrete_sigmas(schedule)
    sigmas = round_sigmas(karras_sigmas(30, float(levels[0]), float(levels[-1])), levels)
    denoiser = denoiser_from_discrete(oracle_model(GM, schedule, "eps"), schedule)
    x_init = float(sigmas[0]) * torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(25))
    assert_matches_mixture(dpm_solver_pp_2m_sample(denoiser, x_init, sigmas), seed=26)
