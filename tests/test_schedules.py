"""Beta schedules and respacing against their closed forms (DDPM sec. 4, Improved DDPM eq. 17 and sec. 4)."""

import math

import pytest
import torch

from pipeline.diffusion import (
    build_schedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    respace,
    space_timesteps,
)


def test_linear_alpha_bar_matches_the_product_of_one_minus_beta():
    """DDPM: beta_t linear from 1e-4 to 0.02 over T=1000; abar_t = prod_{s<=t} (1 - beta_s), computed here in plain floats."""
    s = build_schedule("linear", 1000)
    assert s.betas.dtype == torch.float64 and s.num_timesteps == 1000
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12) and s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    expected, acc = [], 1.0
    for i in range(1000):
        acc *= 1.0 - (1e-4 + i * (0.02 - 1e-4) / 999)
        expected.append(acc)
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(expected, dtype=torch.float64), rtol=1e-11, atol=0)
    # Improved DDPM scales the endpoints by 1000/T for other T
    torch.testing.assert_close(linear_betas(500)[[0, -1]], torch.tensor([2e-4, 0.04], dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_cosine_alpha_bar_is_f_t_over_f_0(T):
    """Improved DDPM eq. 17: abar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008; betas clipped at 0.999."""
    s = build_schedule("cosine", T)
    f = [math.cos((k / T + 0.008) / 1.008 * math.pi / 2) ** 2 for k in range(T + 1)]
    expected = torch.tensor([f[i + 1] / f[0] for i in range(T)], dtype=torch.float64)
    unclipped = cosine_betas(T) < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]  # only the last step (f(T) ~ 0) is clipped
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=1e-15)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_posterior_coefficients_follow_from_bayes_rule():
    """DDPM eq. 7 against the product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0): precisions add."""
    s = build_schedule("cosine", 200)
    a, b, abar_prev = s.alphas[1:], s.betas[1:], s.alphas_cumprod_prev[1:]
    var = 1 / (a / b + 1 / (1 - abar_prev))
    torch.testing.assert_close(s.posterior_variance[1:], var, rtol=1e-9, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef1[1:], var * abar_prev.sqrt() / (1 - abar_prev), rtol=1e-9, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef2[1:], var * a.sqrt() / b, rtol=1e-9, atol=0)
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


@pytest.mark.parametrize("spec", ["ddim50", "ddim30", "10,15,20", 25, [3, 7], "1000"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_respacing_keeps_alpha_bar_at_the_kept_steps(name, spec):
    base = build_schedule(name, 1000)
    r = respace(base, spec)
    kept = r.timestep_map
    assert torch.equal(r.alphas_cumprod, base.alphas_cumprod[kept])
    # betas recomputed from the kept marginals reproduce them when multiplied out
    torch.testing.assert_close(torch.cumprod(1 - r.betas, 0), base.alphas_cumprod[kept], rtol=1e-10, atol=1e-15)  # atol: 1 - beta cancels where beta ~ 1
    # respacing twice composes the maps
    rr = respace(r, max(1, r.num_timesteps // 2))
    assert set(rr.timestep_map.tolist()) <= set(kept.tolist())
    assert torch.equal(rr.alphas_cumprod, base.alphas_cumprod[rr.timestep_map])


def test_spacing_rules():
    """'ddimN': DDIM's even stride; 'a,b,c': Improved DDPM's sections with ends included; an int is one section."""
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "ddim30")) == 30  # no integer stride gives 30: rounded even grid
    kept = space_timesteps(99, "10,15,20")
    assert len(kept) == 45 and kept == sorted(set(kept))
    sections = [kept[:10], kept[10:25], kept[25:]]
    assert [(sec[0], sec[-1]) for sec in sections] == [(0, 32), (33, 65), (66, 98)]
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(10, 10) == list(range(10))


def test_bad_schedule_inputs_name_argument_value_and_allowed():
    with pytest.raises(ValueError, match=r"schedule name: 'quadratic'.*'linear', 'cosine'"):
        build_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match=r"num_timesteps: 0"):
        build_schedule("linear", 0)
    with pytest.raises(ValueError, match=r"num_timesteps: 10 .*linear.*T > 20"):
        build_schedule("linear", 10)
    with pytest.raises(ValueError, match=r"betas: values"):
        make_schedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match=r"betas: shape"):
        make_schedule(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"spec: 'ddimx'"):
        respace(build_schedule("linear", 100), "ddimx")
    with pytest.raises(ValueError, match=r"spec: 'ddim200'.*1\.\.100"):
        respace(build_schedule("linear", 100), "ddim200")
    with pytest.raises(ValueError, match=r"spec: '5,a'"):
        respace(build_schedule("linear", 100), "5,a")
    with pytest.raises(ValueError, match=r"spec: '60,1'.*1\.\.50"):
        respace(build_schedule("linear", 100), "60,1")
