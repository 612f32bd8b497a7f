"""Likelihood in the evaluation stage for every objective that has one, against the oracle's exact density.

Data: a 2-component Gaussian mixture over 2 x 2 RGB images (D = 12, component sd 0.2), quantized
to 8 bits and written as real WebDataset shards. The model is the VP SDE's closed-form eps network
of that mixture, driven through the evaluation stage (``evaluation.bpd.bits_per_dim`` on the Ray
actor pool) with the registry's probability-flow-ODE likelihood (uniform dequantization,
Hutchinson divergence). The exact answer per image is E_u[-log p(x + u)] / (D ln 2) + 7 bits
(the dequantization offset log2(256 / 2)), averaged over 64 dequantization draws per image.

Tolerance: the per-image difference (ODE estimate - exact, the same images, computed by the
evaluation stage's own shard function) has noise from Hutchinson's probe and the one
dequantization draw; its sample standard deviation s over N = 48 images gives the standard
error s / sqrt(N), and the mean difference must lie within 5 of them plus 0.01 bits for the
solver (rtol = atol = 1e-5) and the prior mismatch of the VP SDE at t = 1 (alpha(1)^2 ~ 4e-5).
A correct estimate fails this with probability ~6e-7 (normal approximation). A model whose
means are off by 0.1 (KL ~ 0.18 bits/dim) fails it (checked). A 5% variance error would not:
its KL is second order (~0.001 bits/dim), below any per-image likelihood check at this N.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import ray.cloudpickle
import torch

from evaluation.bpd import LikelihoodModel, bits_per_dim
from pipeline.diffusion import GaussianMixture, registry

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the oracle builder travels to the Ray workers

D, N, SIZE = 12, 48, 2


def mixture(shift: float = 0.0) -> GaussianMixture:
    means = torch.tensor([[0.3] * D, [-0.3] * D]) * torch.tensor([1.0, -1.0] * (D // 2)) + shift
    cov = torch.eye(D, dtype=torch.float64) * 0.04
    return GaussianMixture(torch.tensor([0.6, 0.4]), means, torch.stack([cov, cov]))


@dataclass(frozen=True)
class OracleBuilder:
    """A LikelihoodModel whose network is the VP SDE's exact eps for the mixture (means moved by ``shift``)."""

    shift: float = 0.0

    def __call__(self) -> LikelihoodModel:
        gm = mixture(self.shift)
        options = registry.objective_options("vp_sde", {})
        objective = registry.build_objective("vp_sde", options)
        sde = objective.sde

        def net(x, t_input, y=None):
            t = (t_input / 999.0).to(torch.float64)
            alpha, sigma = sde.marginal(t)
            flat = x.reshape(x.shape[0], -1).to(torch.float64)
            eps = -sigma[:, None] * gm.score(flat, alpha, sigma)
            return eps.reshape(x.shape).to(x.dtype)

        view = registry.make_view("vp_sde", net, objective, options)
        return LikelihoodModel(view, registry.OBJECTIVES["vp_sde"].likelihood, SIZE, 0, "cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pipeline.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("mixture")
    x, _ = mixture().sample(N, generator=torch.Generator().manual_seed(0))
    images = torch.round((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).reshape(N, 3, SIZE, SIZE).permute(0, 2, 3, 1)
    np.savez(root / "mixture.npz", arr_0=images.numpy())
    prepare_dataset(str(root / "mixture.npz"), str(root / "shards"), shard_size=16, workers=0, progress=False)
    return root / "shards", images


def exact_bpd(images: torch.Tensor, gm: GaussianMixture, draws: int = 64) -> torch.Tensor:
    """E_u[-log p(x + u)] / (D ln 2) + log2(256 / 2) per image, u the uniform dequantization in [-1, 1] units."""
    x = images.permute(0, 3, 1, 2).reshape(len(images), -1).to(torch.float64)
    g = torch.Generator().manual_seed(1)
    nll = torch.stack([-gm.log_prob((x + torch.rand(x.shape, generator=g, dtype=torch.float64)) / 256 * 2 - 1)
                       for _ in range(draws)]).mean(0)
    return nll / (D * math.log(2)) + math.log2(256 / 2)


def _evaluate(shards, workers: int, shift: float = 0.0) -> dict:
    return bits_per_dim(OracleBuilder(shift), str(shards), max_images=N, eval_seed=3, batch_size=8,
                        num_workers=workers, progress=False)


def _per_image(shards, shift: float = 0.0) -> torch.Tensor:
    """The same per-image values the actors compute (the evaluation stage's own shard function, in-process)."""
    from evaluation.bpd import _shard_bpd
    from evaluation.reference import dataset_manifest, leading_shards

    state = OracleBuilder(shift)()
    items = list(enumerate(leading_shards(dataset_manifest(str(shards))[2], N)))
    return torch.from_numpy(np.concatenate([_shard_bpd(state, item, 3, 8) for item in items]))


def test_ode_bits_per_dim_of_the_oracle_match_the_exact_density_with_1_and_2_workers(dataset):
    import ray

    shards, images = dataset
    started = not ray.is_initialized()
    try:
        one, two = _evaluate(shards, 1), _evaluate(shards, 2)
    finally:
        if started:
            ray.shutdown()
    assert one["bpd"] == two["bpd"] and one["bpd_stderr"] == two["bpd_stderr"] and one["bpd_count"] == N
    values = _per_image(shards)
    assert values.mean().item() == pytest.approx(one["bpd"], rel=1e-12)
    diff = values - exact_bpd(images, mixture())
    bound = 5 * diff.std().item() / math.sqrt(N) + 0.01
    print(f"ODE bpd {one['bpd']:.4f}, mean difference from the exact density {diff.mean():.4f} (bound {bound:.4f})")
    assert abs(diff.mean().item()) <= bound


def test_the_check_catches_a_model_with_shifted_means(dataset):
    """A deliberately broken model (every mean shifted by 0.1, KL ~ 1.5 nats = 0.18 bits/dim) fails the bound."""
    shards, images = dataset
    diff = _per_image(shards, shift=0.1) - exact_bpd(images, mixture())
    assert abs(diff.mean().item()) > 5 * diff.std().item() / math.sqrt(N) + 0.01


def test_every_objective_with_a_likelihood_is_refused_or_estimated():
    from evaluation.bpd import check_likelihood

    for name, spec in registry.OBJECTIVES.items():
        if spec.likelihood is None:
            with pytest.raises(ValueError, match="has no likelihood estimate"):
                check_likelihood({"objective": name})
        else:
            check_likelihood({"objective": name})
