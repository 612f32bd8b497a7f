"""Forward process, parameterisations, reverse variances and p_mean_variance (DDPM, Improved DDPM, v-prediction)."""

import pytest
import torch

from pipeline.diffusion import (
    GaussianMixture,
    build_schedule,
    model_log_variance,
    oracle_model,
    output_from_x0_eps,
    p_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    respace,
    x0_eps_from_output,
)
from pipeline.diffusion.gaussian import extract



def _batch(schedule, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=g)
    return x0, eps, t


@pytest.mark.parametrize("src", ["eps", "x0", "v"])
@pytest.mark.parametrize("dst", ["eps", "x0", "v"])
def test_parameterisations_convert_into_each_other_without_loss(src, dst):
    """Any target -> (x0, eps) -> any other target recovers x0, eps and the target itself to float64 rounding."""
    s = build_schedule("cosine", 1000)
    x0, eps, t = _batch(s)
    t[:4] = torch.tensor([0, 1, 998, 999])  # include both ends, where alpha or sigma is tiny
    alpha, sigma = extract(s.sqrt_alphas_cumprod, t, x0), extract(s.sqrt_one_minus_alphas_cumprod, t, x0)
    x_t = q_sample(s, x0, t, eps)
    out_src = output_from_x0_eps(x0, eps, alpha, sigma, src)
    rx0, reps = x0_eps_from_output(out_src, x_t, alpha, sigma, src)
    # x0 from x_t divides by alpha (~5e-5 at t=999) and eps by sigma (~0.006 at t=0): compare in that scale
    torch.testing.assert_close(alpha * rx0, alpha * x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma * reps, sigma * eps, rtol=0, atol=1e-12)
    out_dst = output_from_x0_eps(rx0, reps, alpha, sigma, dst)
    back = output_from_x0_eps(*x0_eps_from_output(out_dst, x_t, alpha, sigma, dst), alpha, sigma, src)
    ok = (t > 0) & (t < 999)
    torch.testing.assert_close(back[ok], out_src[ok], rtol=1e-9, atol=1e-9)


def test_q_sample_and_posterior_are_the_equations():
    s = build_schedule("linear", 1000)
    x0, eps, t = _batch(s)
    x_t = q_sample(s, x0, t, eps)
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    mean, var, _ = q_posterior_mean_variance(s, x0, x_t, t)
    # the posterior mean written in eps form, DDPM eq. 11 with the true eps, on t >= 1
    a, b = s.alphas[t].reshape(-1, 1, 1, 1), s.betas[t].reshape(-1, 1, 1, 1)
    eps_form = (x_t - b / (1 - ab).sqrt() * eps) / a.sqrt()
    ok = t > 0
    torch.testing.assert_close(mean[ok], eps_form[ok], rtol=1e-9, atol=1e-9)
    assert (var[~ok] == 0).all()


def test_oracle_parameterisations_give_the_same_reverse_step():
    """The closed-form optimal model in eps, x0 and v form implies one and the same p(x_{t-1} | x_t)."""
    gm = GaussianMixture.example_2d()
    s = build_schedule("cosine", 1000)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 2, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1000, (200,), generator=g)
    outs = {p: p_mean_variance(oracle_model(gm, s, p), s, x, t, parameterization=p) for p in ("eps", "x0", "v")}
    for p in ("x0", "v"):
        for field in ("mean", "pred_x0", "eps", "variance"):
            torch.testing.assert_close(getattr(outs[p], field), getattr(outs["eps"], field), rtol=1e-7, atol=1e-7)


def test_learned_range_interpolates_between_fixed_small_and_fixed_large():
    """Improved DDPM eq. 15: v = -1 is log beta-tilde, v = +1 is log beta, v = 0 their geometric mean."""
    s = build_schedule("linear", 1000)
    x0, _, t = _batch(s)
    t[0] = 0
    small = model_log_variance(s, t, x0, "fixed_small")
    large = model_log_variance(s, t, x0, "fixed_large")
    learned = {v: model_log_variance(s, t, x0, "learned_range", torch.full_like(x0, v)) for v in (-1.0, 0.0, 1.0)}
    torch.testing.assert_close(learned[-1.0], small)
    ok = t > 0  # fixed_large uses beta-tilde_1 instead of beta_0 at t = 0
    torch.testing.assert_close(learned[1.0][ok], large[ok])
    torch.testing.assert_close(learned[0.0], 0.5 * (small + torch.log(s.betas[t]).reshape(-1, 1, 1, 1)))
    assert torch.equal(large[0], small[0])


def test_model_is_called_with_original_timesteps_after_respacing():
    base = build_schedule("linear", 1000)
    r = respace(base, "ddim50")
    seen = []

    def model(x, t, y=None):
        seen.append((t.dtype, t.tolist()))
        return torch.zeros_like(x)

    x = torch.randn(3, 2, dtype=torch.float64)
    p_mean_variance(model, r, x, torch.tensor([0, 1, 49]))
    assert seen == [(torch.float32, [0.0, 20.0, 980.0])]


def test_clipping_keeps_x0_in_range_and_eps_consistent():
    s = build_schedule("linear", 1000)
    x = 3 * torch.randn(16, 2, dtype=torch.float64)
    t = torch.full((16,), 500)
    out = p_mean_variance(lambda x, t, y=None: -x, s, x, t, clip_denoised=True)
    assert out.pred_x0.abs().max() <= 1
    a, sg = s.sqrt_alphas_cumprod[500], s.sqrt_one_minus_alphas_cumprod[500]
    torch.testing.assert_close(a * out.pred_x0 + sg * out.eps, x)


def test_bad_inputs_name_argument_value_and_allowed():
    s = build_schedule("linear", 100)
    x = torch.zeros(4, 2)
    zero = lambda x, t, y=None: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"t_index: values in \[0, 100\].*0\.\.99"):
        p_mean_variance(zero, s, x, torch.tensor([0, 1, 2, 100]))
    with pytest.raises(ValueError, match=r"t_index: torch.float32.*int64"):
        p_mean_variance(zero, s, x, torch.zeros(4))
    with pytest.raises(ValueError, match=r"t_index: .*shape \(3,\).*\(4,\)"):
        p_mean_variance(zero, s, x, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"parameterization: 'score'.*'eps', 'x0', 'v'"):
        p_mean_variance(zero, s, x, torch.zeros(4, dtype=torch.int64), parameterization="score")
    with pytest.raises(ValueError, match=r"variance: 'learned'.*'fixed_small', 'fixed_large', 'learned_range'"):
        p_mean_variance(zero, s, x, torch.zeros(4, dtype=torch.int64), variance="learned")
    with pytest.raises(ValueError, match=r"model output: shape \(4, 2\).*\(4, 4\)"):
        p_mean_variance(zero, s, x, torch.zeros(4, dtype=torch.int64), variance="learned_range")
    with pytest.raises(ValueError, match=r"x_t: torch.int64"):
        p_mean_variance(zero, s, torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"noise: torch.float32 of shape \(4, 3\).*\(4, 2\)"):
        q_sample(s, x, torch.zeros(4, dtype=torch.int64), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"noise: torch.float64.*expected torch.float32"):
        q_sample(s, x, torch.zeros(4, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"t: \[5\] is not allowed"):
        oracle_model(GaussianMixture.example_2d(), respace(s, "ddim10"))(x[:1], torch.tensor([5.0]))
