"""Representation learning variants: a score-SDE base, the time-dependent code E_phi(x0, t) and the
Gaussian encoder with its KL regulariser (Abstreiter et al. 2021, sec. 3-4).

Parity with the base objective (the code withheld: the same losses from the same generator draws),
the regularisers exactly (the KL in closed form against torch.distributions, and by Monte Carlo
over the training step's own draws of z with a derived tolerance), the code the network sees at
the time the base drew, sampling given codes or images with the base's samplers (code 0 is the
unconditional view), the options' validation and the weights' round trip through the one loader.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, DiffusionConfig, load_config
from pipeline.diffusion.objectives import DDPMObjective
from pipeline.diffusion.registry import (
    OBJECTIVES,
    build_objective,
    check_sampler_fits,
    make_view,
    objective_options,
    sample,
    samplers_for,
)
from pipeline.diffusion.representation import gaussian_kl, with_code
from pipeline.models import build_model

OBJ = "representation"
D = 8
TINY = {"image_size": 8, "base_channels": 8, "channel_mult": (1,), "attention_resolutions": (), "norm_groups": 4,
        "cond_embed_dim": D, "dropout": 0.0}
SDE_BASES = ("vp_sde", "subvp_sde", "ve_sde")
# small SDE ranges so a few-step sampler on a random network stays finite
BASE_OPTIONS = {"vp_sde": {"beta_max": 5.0}, "subvp_sde": {"beta_max": 5.0}, "ve_sde": {"sigma_max": 5.0}}


def _net(seed=0, scale=0.05):
    net = build_model("tiny", **TINY)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def _options(**options):
    return objective_options(OBJ, {"code_dim": D, **options})


def _objective(**options):
    torch.manual_seed(0)
    return build_objective(OBJ, _options(**options))


def _x0(n=4, seed=1):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gen(seed=7):
    return torch.Generator().manual_seed(seed)


class _Recorder:
    """A network that records the time input and code it is called with (and predicts 0.1 x)."""

    def __init__(self, net=None):
        self.net, self.calls = net, []

    def __call__(self, x, t, y=None, emb=None, **kwargs):
        self.calls.append((t.detach().clone(), None if emb is None else emb.detach().clone()))
        return 0.1 * x if self.net is None else self.net(x, t, y, emb=emb, **kwargs)


# ---------------------------------------------------------------------------------------------
# 1. The score-SDE base


@pytest.mark.parametrize("base", SDE_BASES)
def test_sde_base_withheld_code_gives_the_sde_loss_exactly_and_l1_adds_lambda_times_the_norm(base):
    net, x0 = _net(), _x0()
    rep = _objective(base=base, base_options=BASE_OPTIONS[base], lambda_z=0.5)
    sde = build_objective(base, BASE_OPTIONS[base])
    withheld = rep.loss_given_code(net, x0, None, None, generator=_gen())
    assert torch.equal(withheld.loss, sde.training_loss(net, x0, None, generator=_gen()).loss)
    coded = rep.training_loss(net, x0, None, generator=_gen())
    unpenalised = _objective(base=base, base_options=BASE_OPTIONS[base], lambda_z=0.0).training_loss(
        net, x0, None, generator=_gen())
    torch.testing.assert_close(coded.loss - unpenalised.loss, 0.5 * rep.encode(x0).abs().sum(1))
    assert not torch.allclose(unpenalised.loss, withheld.loss)  # the code reaches the network


@pytest.mark.parametrize("base,sampler", [("ve_sde", "pc"), ("vp_sde", "heun"), ("subvp_sde", "ode")])
def test_sde_base_samples_given_codes_and_images_and_code_zero_is_the_unconditional_view(base, sampler):
    options = _options(base=base, base_options=BASE_OPTIONS[base])
    assert samplers_for(OBJ, options)[:3] == OBJECTIVES[base].samplers == ("pc", "ode", "heun")
    assert OBJECTIVES[OBJ].for_options(options).default_sampler == OBJECTIVES[base].default_sampler == "pc"
    assert OBJECTIVES[OBJ].default_sampler == "ddim" and "pc" not in samplers_for(OBJ)  # the DDPM base's
    with pytest.raises(ValueError, match=r"sampler: 'ddpm' is not allowed for objective 'representation'"):
        check_sampler_fits(OBJ, "ddpm", options={"code_dim": D, "base": base})
    # the callers that only hold a model's documents follow the base too (launch/serve.py, evaluation jobs)
    from evaluation.model_sampling import SamplerSettings, check_sampler
    from evaluation.serving import ModelInfo

    info = ModelInfo.from_document({"diffusion": {"objective": OBJ, "options": {"code_dim": D, "base": base}},
                                    "model": {}})
    assert info.samplers == samplers_for(OBJ, options) and info.default_sampler == "pc"
    check_sampler(OBJ, SamplerSettings(sampler), options={"code_dim": D, "base": base})
    from evaluation.editing import EditModel, _inpaint_sampler  # launch/edit.py's default inpainting sampler

    edit = EditModel(None, OBJ, (3, 8, 8), 0, {}, "cpu", options={"code_dim": D, "base": base})
    assert _inpaint_sampler(edit, None) == "pc" and _inpaint_sampler(EditModel(None, OBJ, (3, 8, 8), 0, {}, "cpu"),
                                                                      None) == "ddpm"
    rep = _objective(base=base, base_options=BASE_OPTIONS[base])
    view = make_view(OBJ, _net(), rep, options)
    x0, seeds, shape = _x0(2), [3, 4], (2, 3, 8, 8)
    with torch.no_grad():
        plain = sample(view, sampler, shape, seeds, steps=3)
        zero = sample(view.with_code(torch.zeros(2, D)), sampler, shape, seeds, steps=3)
        coded = sample(view.with_code(rep.encode(x0)), sampler, shape, seeds, steps=3)
        imaged = sample(view.with_images(x0), sampler, shape, seeds, steps=3)
    assert torch.isfinite(coded).all()
    torch.testing.assert_close(plain, zero)
    assert not torch.allclose(coded, zero)
    torch.testing.assert_close(imaged, coded)


def test_base_options_are_validated_by_the_base_and_bad_ones_are_refused_with_a_message():
    typed = _options(base="ve_sde", base_options={"sigma_max": 10.0, "weighting": "likelihood"})
    assert typed.base_typed().sigma_max == 10.0 and build_objective(OBJ, typed).base.weighting == "likelihood"
    bad = [({"base": "ve_sde", "base_options": {"sigma_mx": 3}},
            r"diffusion\.options\.base_options\.sigma_mx: unknown key \(did you mean 'sigma_max'\?\)"),
           ({"base": "ve_sde", "base_options": {"parameterization": "v"}},
            r"diffusion\.options\.base_options\.parameterization: value 'v' is not allowed"),
           ({"base": "vp_sde", "schedule": "cosine"},
            r"diffusion\.options\.schedule: not allowed with base 'vp_sde'.*base_options \(allowed keys: beta_max"),
           ({"base_options": {"beta_max": 10}}, r"diffusion\.options\.base_options: .* not allowed with base 'ddpm'"),
           ({"base": "ncsn"}, r"diffusion\.options\.base: value 'ncsn' is not allowed"),
           ({"encoder": "laplace"}, r"diffusion\.options\.encoder: value 'laplace' is not allowed")]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):  # launch/*.py exit 2 with it
            load_config(None, [f"diffusion.objective={OBJ}", f"diffusion.options={options}"])


# ---------------------------------------------------------------------------------------------
# 2. The time-dependent code E_phi(x0, t)


def test_time_independent_encoder_ignores_t_and_keeps_its_loss():
    net, x0 = _net(), _x0()
    rep = _objective(lambda_z=0.25, schedule="cosine", timesteps=100)
    view = make_view(OBJ, net, rep, _options(schedule="cosine", timesteps=100))
    assert torch.equal(view.encode(x0, torch.full((4,), 3.0)), view.encode(x0))
    z = rep.encoder(x0)  # parity with the objective before the variants: DDPM on net(., emb=E_phi(x0)) + L1
    before = DDPMObjective("cosine", 100, "eps", "fixed_large", "simple", 0.001).training_loss(
        with_code(net, z), x0, None, generator=_gen())
    assert torch.equal(rep.training_loss(net, x0, None, generator=_gen()).loss, before.loss + 0.25 * z.abs().sum(1))


@pytest.mark.parametrize("base", ["ddpm", "ve_sde"])
def test_time_dependent_code_is_computed_at_the_networks_time_input_and_changes_with_t(base):
    options = {"base": base, "time_dependent": True, "lambda_z": 0.5}
    if base == "ddpm":
        options["timesteps"] = 100
    rep, x0 = _objective(**options), _x0()
    rep.encoder.time.weight.data.mul_(20.0)  # a visible dependence on t at initialisation
    recorder = _Recorder()
    out = rep.training_loss(recorder, x0, None, generator=_gen())
    ((t_input, emb),) = recorder.calls
    torch.testing.assert_close(emb, rep.encode(x0, t_input))  # E_phi(x0, t) at the t the base drew
    if base == "ddpm":  # DDPM: the timestep indices the base drew; VE SDE: log sigma(t) in its range
        assert torch.equal(t_input, out.t_index.float())
    else:
        assert (t_input >= math.log(0.01) - 1e-4).all() and (t_input <= math.log(50.0) + 1e-4).all()
    low, high = rep.encode(x0, torch.zeros(4)), rep.encode(x0, torch.full((4,), float(t_input.max())))
    assert (low - high).abs().max() > 1e-3
    unpenalised = _objective(**{**options, "lambda_z": 0.0})
    unpenalised.load_state_dict(rep.state_dict())
    torch.testing.assert_close(out.loss - unpenalised.training_loss(_Recorder(), x0, None, generator=_gen()).loss,
                               0.5 * emb.abs().sum(1))
    # the code withheld: exactly the base objective's loss
    base_obj = rep.base
    withheld = rep.loss_given_code(_Recorder(), x0, None, None, generator=_gen())
    assert torch.equal(withheld.loss, base_obj.training_loss(_Recorder(), x0, None, generator=_gen()).loss)


class _RecordingNet(torch.nn.Module):
    """The tiny U-Net, recording the time input and code of every call (a network the loader's view takes)."""

    def __init__(self):
        super().__init__()
        self.net, self.calls = _net(), []
        self.config = self.net.config

    def forward(self, x, t, y=None, emb=None, **kwargs):
        self.calls.append((t.detach().clone(), None if emb is None else emb.detach().clone()))
        return self.net(x, t, y, emb=emb, **kwargs)


def test_time_dependent_reconstruction_and_interpolation_condition_on_the_code_at_each_call():
    """Samples from images condition on E_phi(x0, t) at the t of every network call (Heun: 3 distinct
    times in 2 steps); the interpolation row on (1 - s) E_phi(a, t) + s E_phi(b, t) at each call."""
    from evaluation.model_sampling import SamplerSettings
    from evaluation.reconstruction import interpolation_row, sample_from_images
    from pipeline.loading import TrainedModel

    options = {"code_dim": D, "base": "vp_sde", "base_options": BASE_OPTIONS["vp_sde"], "time_dependent": True}
    rep = _objective(**{k: v for k, v in options.items() if k != "code_dim"})
    rep.encoder.time.weight.data.mul_(20.0)
    net = _RecordingNet()
    model = TrainedModel(net, rep, DiffusionConfig(objective=OBJ, options=options), {})
    images = ((_x0(2, seed=5) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    settings = SamplerSettings("heun", 2)
    assert sample_from_images(model, images, np.array([1, 2]), settings, "cpu").shape == (2, 8, 8, 3)
    assert len(net.calls) == 4 and len({float(t[0]) for t, _ in net.calls}) == 3  # Heun: t0, t1, t1, t2
    for t_input, emb in net.calls:
        torch.testing.assert_close(emb, rep.encode(x0, t_input))
    net.calls.clear()
    row = interpolation_row(model, images[0], images[1], 3, settings, seed=11, device="cpu")
    assert row.shape == (5, 8, 8, 3) and len(net.calls) == 4
    s = torch.tensor([[0.0], [0.5], [1.0]])
    for t_input, emb in net.calls:
        za, zb = rep.encode(x0[:1].expand(3, -1, -1, -1), t_input), rep.encode(x0[1:].expand(3, -1, -1, -1), t_input)
        torch.testing.assert_close(emb, (1 - s) * za + s * zb)
    assert (net.calls[0][1] - net.calls[-1][1]).abs().max() > 1e-3  # the code moves along the trajectory


def test_probe_encoder_of_a_time_dependent_model_is_the_encoder_at_eval_probe_t():
    from evaluation.probe import encoder_of, random_like

    rep, x0 = _objective(base="ve_sde", time_dependent=True), _x0()
    probed = encoder_of(rep, OBJ, 0.25)
    log_sigma = math.log(0.01 * (50.0 / 0.01) ** 0.25)  # the VE network's time input at t = 0.25
    torch.testing.assert_close(probed(x0), rep.encode(x0, torch.full((4,), log_sigma)))
    assert random_like(probed, 0)(x0).shape == (4, D)
    plain = _objective()
    assert encoder_of(plain, OBJ, 0.25) is plain.encoder  # a time-independent encoder ignores eval.probe_t
    ddpm = _objective(time_dependent=True, timesteps=100)
    torch.testing.assert_close(encoder_of(ddpm, OBJ, 0.5)(x0), ddpm.encode(x0, torch.full((4,), 50.0)))
    assert load_config(None, [f"diffusion.objective={OBJ}"]).eval.probe_t == 0.5
    with pytest.raises(ConfigError, match=r"eval\.probe_t"):
        load_config(None, ["eval.probe_t=1.5"])


# ---------------------------------------------------------------------------------------------
# 3. The Gaussian encoder and its KL regulariser


def test_gaussian_kl_matches_its_closed_form():
    mu = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(4.0), math.log(0.25)], [0.0, 0.0, 0.0]])
    # by hand: 0.5 (mu^2 + sigma^2 - 1 - log sigma^2) per dimension
    by_hand = 0.5 * (1.0 + 0.0) + 0.5 * (4.0 - 1.0 - math.log(4.0)) + 0.5 * (4.0 + 0.25 - 1.0 - math.log(0.25))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.tensor([by_hand, 0.0]))
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), reference)


def test_gaussian_encoder_draws_z_from_the_steps_generator_and_its_kl_holds_by_monte_carlo():
    """z = mu + sigma noise, drawn in the training step: the Monte-Carlo mean of log q(z) - log p(z)
    over N draws matches KL(q || N(0, I)) within 5 standard errors, the variance known in closed form:
    per dimension Var[log q - log p] = (sigma^2 - 1)^2 / 2 + mu^2 sigma^2 (z = mu + sigma e, e ~ N(0, 1)).
    Broken variants fail it: the KL with + log sigma^2, and z drawn with sigma^2 in place of sigma."""
    n = 10000
    rep = _objective(encoder="gaussian", lambda_z=1.0)
    with torch.no_grad():  # a code away from the prior: mu 0.5, sigma 2 (log sigma^2 = log 4)
        rep.encoder.head.weight.mul_(0.01)
        rep.encoder.head.bias.copy_(torch.cat([torch.full((D,), 0.5), torch.full((D,), math.log(4.0))]))
    x0 = _x0(1).expand(n, -1, -1, -1)
    recorder = _Recorder()
    out = rep.training_loss(recorder, x0, None, generator=_gen(3))
    z = recorder.calls[0][1]
    with torch.no_grad():
        mu, logvar = rep.encoder.moments(x0)
    sigma = torch.exp(0.5 * logvar)
    q, p = torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
    log_ratio = (q.log_prob(z) - p.log_prob(z)).sum(1).double()
    kl = gaussian_kl(mu, logvar).double()
    se = math.sqrt(float((0.5 * (sigma**2 - 1) ** 2 + mu**2 * sigma**2).sum(1).mean().detach()) / n)
    print({"mc": float(log_ratio.mean()), "kl": float(kl.mean()), "se": se})
    assert abs(float(log_ratio.mean() - kl.mean())) < 5 * se
    broken_kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 + logvar).sum(1).double()
    assert abs(float(log_ratio.mean() - broken_kl.mean())) > 5 * se
    z_broken = mu + sigma**2 * (z - mu) / sigma
    broken_ratio = (q.log_prob(z_broken) - p.log_prob(z_broken)).sum(1).double()
    assert abs(float(broken_ratio.mean() - kl.mean())) > 5 * se
    # the regulariser is lambda_z KL exactly: the same draws with lambda_z = 0 differ by it
    unpenalised = _objective(encoder="gaussian", lambda_z=0.0)
    unpenalised.load_state_dict(rep.state_dict())
    rest = unpenalised.training_loss(_Recorder(), x0, None, generator=_gen(3)).loss
    torch.testing.assert_close(out.loss - rest, gaussian_kl(mu, logvar))
    print({"broken_kl_gap_se": float((broken_kl.mean() - kl.mean()) / se),
           "broken_draw_gap_se": float((broken_ratio.mean() - kl.mean()) / se)})


@pytest.mark.parametrize("base", ["ddpm", "ve_sde"])
def test_gaussian_encoder_resumes_exactly_encodes_its_mean_and_withheld_is_the_base(base):
    rep, net, x0 = _objective(base=base, encoder="gaussian", time_dependent=base == "ve_sde"), _net(), _x0()
    first = rep.training_loss(net, x0, None, generator=_gen(5)).loss
    assert torch.equal(first, rep.training_loss(net, x0, None, generator=_gen(5)).loss)  # the step's own draws
    assert not torch.equal(first, rep.training_loss(net, x0, None, generator=_gen(6)).loss)
    t = torch.full((4,), 1.0)
    torch.testing.assert_close(rep.encode(x0, t), rep.encoder.moments(x0, t)[0])  # encode() is mu
    withheld = rep.loss_given_code(net, x0, None, None, generator=_gen(5))
    assert torch.equal(withheld.loss, rep.base.training_loss(net, x0, None, generator=_gen(5)).loss)


def test_variant_weights_round_trip_through_the_loader_and_train_the_encoder():
    """The training module's encoder receives gradients (through the network and the KL) and its
    weights (``objective.encoder.*``) load back strictly into the same view."""
    from pipeline.loading import from_weights
    from pipeline.train.objective import TrainModule

    cfg = load_config(None, [f"diffusion.objective={OBJ}", "model.preset=tiny",
                             *[f"model.overrides.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()],
                             (f"diffusion.options={{code_dim: {D}, base: ve_sde, time_dependent: true, "
                              "encoder: gaussian}")])
    torch.manual_seed(0)
    module = TrainModule(_net(), cfg.diffusion)
    module.objective.training_loss(module.net, _x0(), None, generator=_gen()).loss.mean().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if n.startswith("objective.encoder.")}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    net, objective = from_weights(cfg.model, cfg.diffusion, weights, "test")
    assert all(torch.equal(v, weights[f"net.{k}"]) for k, v in net.state_dict().items())
    t = torch.full((4,), 0.3)
    torch.testing.assert_close(objective.encode(_x0(), t), module.objective.encode(_x0(), t))
