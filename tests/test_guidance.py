"""Classifier guidance, classifier-free guidance and inpainting against the Gaussian-mixture oracle.

Component checks compare the guided samples with the target component alone (a one-component
GaussianMixture) by GaussianMixture.sample_discrepancy (5 standard errors; log p gets a stated
allowance for the approximation of ADM's mean shift and the step count). Inpainting checks the
unknown coordinate against the closed-form Gaussian conditional mean and variance.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.gaussian import oracle_model
from pipeline.diffusion.guidance import (
    classifier_cond_fn,
    classifier_free_guidance,
    classifier_guided_score_fn,
    drop_labels,
    oracle_classifier,
)
from pipeline.diffusion.inpainting import inpaint_sample
from pipeline.diffusion.oracle import GaussianMixture
from pipeline.diffusion.samplers import ddim_sample, ddim_step, ddpm_sample
from pipeline.diffusion.schedules import build_schedule, respace
from pipeline.diffusion.sde import VPSDE, pc_sample

GM = GaussianMixture.example_2d()
NULL = GM.num_components  # the null class is the extra label index K
SCHEDULE = build_schedule("linear", 1000)
N = 1500



def component(k: int) -> GaussianMixture:
    return GaussianMixture(torch.ones(1), GM.means[k : k + 1], GM.covs[k : k + 1])


def assert_matches(mixture, x, seed, log_prob_allowance=0.05):
    stats = mixture.sample_discrepancy(x, generator=torch.Generator().manual_seed(seed))
    for name, (diff, se) in stats.items():
        tol = 5 * se + (log_prob_allowance if name == "log_prob" else 0.0)
        assert abs(diff) <= tol, f"{name}: difference {diff:.4f} exceeds {tol:.4f}; all: {stats}"


def discrete_alpha_sigma(t):
    abar = SCHEDULE.alphas_cumprod[t.detach().round().long().cpu()]
    return abar.sqrt(), (1 - abar).sqrt()


BASE = oracle_model(GM, SCHEDULE, "eps")  # conditional when given y, unconditional for y=None


def unconditional(x, t, y=None, **_):
    return BASE(x, t, None)


def with_null_class(x, t, y=None, **_):
    """The exact model a CFG network approximates: conditional for y < K, unconditional for the null class."""
    if y is None:
        return BASE(x, t, None)
    out_c = BASE(x, t, y.clamp(max=NULL - 1))
    return torch.where((y == NULL)[:, None], BASE(x, t, None), out_c)


# -- classifier-free guidance ---------------------------------------------------------------------


def test_cfg_follows_the_formula():
    x, _ = GM.sample(64, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 400.0)
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1))
    cond, uncond = with_null_class(x, t, y), with_null_class(x, t, None)
    torch.testing.assert_close(classifier_free_guidance(with_null_class, 0.0, NULL)(x, t, y), cond)
    torch.testing.assert_close(classifier_free_guidance(with_null_class, -1.0, NULL)(x, t, y), uncond)
    torch.testing.assert_close(classifier_free_guidance(with_null_class, 1.0, NULL)(x, t, y), 2 * cond - uncond)
    # a learned-variance model: the guided channels are the first C, the variance channels are conditional
    def two_c(x, t, y=None):
        v = torch.where((y == NULL)[:, None], 1.5, 0.5).to(x.dtype).expand_as(x)
        return torch.cat([with_null_class(x, t, y), v], 1)

    out = classifier_free_guidance(two_c, 1.0, NULL)(x, t, y)
    torch.testing.assert_close(out, torch.cat([2 * cond - uncond, torch.full_like(x, 0.5)], 1))


def test_cfg_at_w1_is_classifier_guidance_of_the_conditional_model():
    """(1 + w) eps_c - w eps_u at w = 1 equals eps_c - sqrt(1 - abar) grad log p(y | x_t): the same DDIM step."""
    x, _ = GM.sample(64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(3))
    cond_fn = classifier_cond_fn(oracle_classifier(GM, discrete_alpha_sigma), 1.0)
    for i in (50, 500, 900):
        a, _ = ddim_step(classifier_free_guidance(with_null_class, 1.0, NULL), SCHEDULE, x, i, y=y, clip_denoised=False)
        b, _ = ddim_step(BASE, SCHEDULE, x, i, y=y, cond_fn=cond_fn, clip_denoised=False)
        torch.testing.assert_close(a, b)


def test_cfg_w0_samples_the_requested_component():
    k = 1
    y = torch.full((N,), k)
    x = ddim_sample(classifier_free_guidance(with_null_class, 0.0, NULL), respace(SCHEDULE, "ddim250"), (N, 2),
                    seeds=range(N), y=y, clip_denoised=False, dtype=torch.float64)
    assert_matches(component(k), x, seed=4, log_prob_allowance=0.1)


def test_drop_labels():
    y = torch.randint(0, 3, (20000,), generator=torch.Generator().manual_seed(5))
    dropped = drop_labels(y, 0.2, NULL, generator=torch.Generator().manual_seed(6))
    frac = (dropped == NULL).double().mean().item()
    assert abs(frac - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 20000)
    assert torch.equal(dropped[dropped != NULL], y[dropped != NULL])
    assert torch.equal(drop_labels(y, 0.0, NULL), y) and (drop_labels(y, 1.0, NULL) == NULL).all()
    with pytest.raises(ValueError, match="p"):
        drop_labels(y, 1.5, NULL)


# -- classifier guidance --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_classifier_guidance_with_the_exact_classifier_samples_the_component(sampler):
    """The unconditional oracle + s = 1 times grad log p(y | x_t) of the exact noisy classifier targets p(x | y)."""
    k = 2
    y = torch.full((N,), k)
    cond_fn = classifier_cond_fn(oracle_classifier(GM, discrete_alpha_sigma), 1.0)
    common = dict(seeds=range(N), y=y, clip_denoised=False, cond_fn=cond_fn, dtype=torch.float64)
    if sampler == "ddim":
        # ADM Algorithm 2's eps shift makes the unconditional model + exact classifier the exact
        # conditional model, so guided DDIM equals conditional DDIM step by step (DDIM's own
        # discretisation bias, ~0.29 nats of log p at 100 linear steps, is common to both).
        fast = respace(SCHEDULE, "ddim100")
        x = ddim_sample(unconditional, fast, (N, 2), **common)
        conditional = ddim_sample(BASE, fast, (N, 2), seeds=range(N), y=y, clip_denoised=False, dtype=torch.float64)
        torch.testing.assert_close(x, conditional, rtol=0, atol=1e-8)
    else:  # ADM's mean shift Sigma grad is first-order accurate in the step size
        x = ddpm_sample(unconditional, respace(SCHEDULE, 250), (N, 2), **common)
        assert_matches(component(k), x, seed=7, log_prob_allowance=0.1)
    post = GM.class_log_posterior(x, 1.0, 0.0).argmax(-1)
    assert (post == k).double().mean() > 0.97


def test_classifier_guided_score_for_the_pc_sampler():
    sde = VPSDE()
    k = 0
    y = torch.full((N,), k)

    def score_fn(x, t):
        alpha, sigma = sde.marginal(t)
        return GM.score(x, alpha, sigma)

    classifier = oracle_classifier(GM, lambda t_in: sde.marginal(t_in / 999))
    guided = classifier_guided_score_fn(score_fn, classifier_cond_fn(classifier, 1.0), y, sde.noise_input)
    x_init = sde.prior_sample((N, 2), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    x = pc_sample(guided, sde, x_init, steps=250, generator=torch.Generator().manual_seed(9))
    assert_matches(component(k), x, seed=10)


# -- inpainting -----------------------------------------------------------------------------------


def correlated_gaussian():
    cov = torch.tensor([[0.04, 0.8 * 0.2 * 0.15], [0.8 * 0.2 * 0.15, 0.0225]])
    return GaussianMixture(torch.tensor([1.0]), torch.tensor([[0.1, -0.2]]), cov[None])


def check_inpainting(g, x, y0):
    """Known coordinate kept exactly; the other ~ N(m, v) = N(mu_1 + S_10/S_00 (y0 - mu_0), S_11 - S_10^2/S_00).

    Replacement-based inpainting is approximate: the unknown part is steered by a noisy copy of the
    known part, so it under-uses the correlation unless it mixes at low noise (RePaint resampling,
    Langevin corrector steps). Allowed: |mean - m| < 5 se + 0.15 sqrt(v) and |var / v - 1| < 5 se + 0.2.
    Plain replacement (no resampling, 1 corrector step) misses by ~0.35 sqrt(v) here and fails.
    """
    assert (x[:, 0] == y0).all()
    mu, s = g.means[0], g.covs[0]
    mean = (mu[1] + s[1, 0] / s[0, 0] * (y0 - mu[0])).item()
    var = (s[1, 1] - s[1, 0] ** 2 / s[0, 0]).item()
    n = len(x)
    x1 = x[:, 1]
    assert abs(x1.mean().item() - mean) < 5 * math.sqrt(var / n) + 0.15 * math.sqrt(var), (x1.mean().item(), mean)
    assert abs(x1.var().item() / var - 1) < 5 * math.sqrt(2 / (n - 1)) + 0.2, (x1.var().item(), var)


Y0 = 0.3  # one standard deviation above the first coordinate's mean


def test_ddpm_inpainting_follows_the_gaussian_conditional():
    g = correlated_gaussian()
    n = 1000
    known = torch.tensor([[Y0, 0.0]], dtype=torch.float64).expand(n, 2)
    mask = torch.tensor([[True, False]])
    x = inpaint_sample(oracle_model(g, SCHEDULE, "eps"), respace(SCHEDULE, 250), known, mask, seeds=range(n),
                       resample=5, variance="fixed_large", clip_denoised=False)
    check_inpainting(g, x, Y0)


def test_inpainting_with_a_plain_replacement_sampler_keeps_known_pixels_for_ddim():
    g = correlated_gaussian()
    known = torch.tensor([[Y0, 0.0]], dtype=torch.float64).expand(64, 2)
    x = inpaint_sample(oracle_model(g, SCHEDULE, "eps"), respace(SCHEDULE, 20), known, torch.tensor([[True, False]]),
                       seeds=range(64), sampler="ddim", eta=1.0, clip_denoised=False)
    assert (x[:, 0] == Y0).all() and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="sampler"):
        inpaint_sample(BASE, SCHEDULE, known, torch.tensor([[True, False]]), seeds=range(64), sampler="euler")


def test_pc_inpainting_follows_the_gaussian_conditional():
    g = correlated_gaussian()
    sde = VPSDE()

    def score_fn(x, t):
        alpha, sigma = sde.marginal(t)
        return g.score(x, alpha, sigma)

    known = torch.tensor([[Y0, 0.0]], dtype=torch.float64).expand(N, 2)
    x_init = sde.prior_sample((N, 2), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x = pc_sample(score_fn, sde, x_init, steps=250, corrector_steps=3, snr=0.3, known=known,
                  mask=torch.tensor([[True, False]]), generator=torch.Generator().manual_seed(12))
    check_inpainting(g, x, Y0)
