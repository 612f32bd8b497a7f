"""Per-sample seeded noise at image sizes (the torch.Generator-per-sample regime of noise_from_seeds).

The small-sample (hashed) regime is covered by tests/test_samplers_oracle.py; these check the same
promises where samples are images: a sample's noise depends on its seed and step only, is
deterministic, standard normal, and uncorrelated across neighbouring seeds and steps.
"""

from __future__ import annotations

import torch

from pipeline.diffusion import build_schedule, ddim_sample, ddpm_sample, respace
from pipeline.diffusion.samplers import _GENERATOR_MIN_NUMEL, noise_from_seeds

IMAGE = (3, 16, 16)


def test_image_noise_does_not_depend_on_batch_size_or_position():
    alone = noise_from_seeds([7], IMAGE, 11)
    batch = noise_from_seeds([5, 9, 7, 2], IMAGE, 11)
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=0)
    torch.testing.assert_close(noise_from_seeds(torch.tensor([2, 7]), IMAGE, 11)[1:], alone, rtol=0, atol=0)
    assert (batch[0] - alone[0]).abs().max() > 0.5  # another seed: other noise
    assert (noise_from_seeds([7], IMAGE, 12) - alone).abs().max() > 0.5  # another step: other noise


def test_image_noise_is_deterministic_and_the_same_values_in_every_dtype():
    a = noise_from_seeds(range(4), IMAGE, 3)
    torch.testing.assert_close(noise_from_seeds(range(4), IMAGE, 3), a, rtol=0, atol=0)
    torch.testing.assert_close(noise_from_seeds(range(4), IMAGE, 3, dtype=torch.float64), a.double(), rtol=0, atol=0)
    torch.testing.assert_close(noise_from_seeds(range(4), IMAGE, 3, dtype=torch.bfloat16), a.bfloat16(), rtol=0, atol=0)


def test_image_noise_is_standard_normal_and_uncorrelated_across_seeds_and_steps():
    """Moments within 5 standard errors (mean 5/sqrt(n), variance 5 sqrt(2/n), kurtosis 5 sqrt(24/n))."""
    z = noise_from_seeds(range(200), IMAGE, 5, dtype=torch.float64)
    n = z.numel()
    assert z.mean().abs() < 5 / n**0.5 and (z.var() - 1).abs() < 5 * (2 / n) ** 0.5
    kurt = ((z - z.mean()) ** 4).mean() / z.var() ** 2
    assert (kurt - 3).abs() < 5 * (24 / n) ** 0.5
    per_sample = z.flatten(1)
    assert (per_sample.mean(1).abs() < 5 / per_sample.shape[1] ** 0.5).all()  # no sample is biased
    neighbours = (noise_from_seeds(range(1, 201), IMAGE, 5, dtype=torch.float64),  # seed + 1
                  noise_from_seeds(range(200), IMAGE, 6, dtype=torch.float64),  # step + 1
                  z.roll(1, dims=-1))  # neighbouring pixel
    for other in neighbours:
        corr = torch.corrcoef(torch.stack([z.flatten(), other.flatten()]))[0, 1]
        assert corr.abs() < 5 / n**0.5


def test_both_regimes_meet_at_the_threshold():
    """Just below and at the switch size: still per-seed, standard normal, and the two regimes differ."""
    for numel in (_GENERATOR_MIN_NUMEL - 1, _GENERATOR_MIN_NUMEL):
        z = noise_from_seeds(range(400), (numel,), 0, dtype=torch.float64)
        torch.testing.assert_close(noise_from_seeds([399], (numel,), 0, dtype=torch.float64), z[-1:], rtol=0, atol=0)
        assert z.mean().abs() < 5 / z.numel() ** 0.5 and (z.var() - 1).abs() < 5 * (2 / z.numel()) ** 0.5


def test_image_samplers_do_not_depend_on_batch_size():
    """DDPM and stochastic DDIM on 3x16x16 samples: an image is the same alone or in a batch."""
    schedule = respace(build_schedule("linear", 1000), 10)

    def model(x, t, y=None):  # a fixed eps-predictor: any deterministic function of (x, t) will do
        return 0.1 * x + 1e-4 * t.view(-1, 1, 1, 1)

    for fn, kw in ((ddpm_sample, {}), (ddim_sample, {"eta": 1.0})):
        alone = fn(model, schedule, (1, *IMAGE), seeds=[7], **kw)
        batch = fn(model, schedule, (3, *IMAGE), seeds=[1, 7, 4], **kw)
        torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-6)
        assert (batch[0] - alone[0]).abs().max() > 1e-2
