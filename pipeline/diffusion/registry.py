"""The plug-in seams: every objective and every sampler, by name, in one place.

:data:`OBJECTIVES` maps an objective name (``diffusion.objective``) to an :class:`ObjectiveSpec`:
its typed options, how to build its training module (``training_loss(net, x0, y, generator=)``),
whether it is generative, the samplers it prefers and how (network, objective module) becomes the
view a sampler drives (``pipeline.diffusion.sampling``). :data:`SAMPLERS` maps a sampler name to a
:class:`SamplerSpec`: its typed options, its runner (one signature for all) and the views it can
drive. :func:`sample` is the one entry that evaluation, ``launch/sample.py`` and the training-time
grid call.

An objective that trains on per-sample extras of the data (unCLIP's CLIP embeddings) lists their names in
``cond_fields`` and takes them as ``training_loss(..., cond={name: (B, d) tensor})``; the config's
``data.fields`` must hold them (checked before training starts).

Adding a sampler: write its pure function (e.g. in ``fast_samplers.py``) and one entry below.
Adding an objective: write its module (with ``training_loss``) and one entry below (plus a view
in ``sampling.py`` if none of the existing ones fits). This is the only module where the names of
objectives and samplers are written out; config choices and CLI help are generated from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor, nn

from .fast_samplers import ddim_sigma_sample, dpm_solver_pp_2m_sample, edm_heun_sample, euler_sample
from .guidance import classifier_free_guidance
from .inpainting import inpaint_sample
from .likelihood import vlb_bits_per_dim
from .ncsn import NCSNObjective, annealed_langevin_sample, ncsn_sigmas
from .objectives import ClassifierObjective, DDPMObjective
from .representation import CodeHead, CodeView, ConvEncoder, RepresentationObjective, SDECodeView, ddpm_time_input
from .samplers import ddim_sample, ddpm_sample, noise_from_seeds
from .schedules import respace
from .unclip import CLIP_IMAGE, CLIP_TEXT, UnclipDecoderObjective, UnclipPriorObjective
from .sampling import DiscreteView, Guide, NCSNView, SDEView, SigmaView, VDMView
from .sde import SDEObjective, make_sde, ode_likelihood, ode_sample, pc_sample, uniform_dequantize
from .sde import bits_per_dim as sde_bits_per_dim
from .upsampler import UpsamplerObjective
from .vdm import VDMObjective, vdm_sample

__all__ = [
    "DEFAULT_OBJECTIVE",
    "DEFAULT_SAMPLER",
    "OBJECTIVES",
    "SAMPLERS",
    "ObjectiveSpec",
    "SamplerSpec",
    "build_objective",
    "check_sampler_fits",
    "data_channels",
    "describe_samplers",
    "diffusion_options",
    "make_continuous_objective",
    "make_view",
    "objective_options",
    "objective_spec",
    "sample",
    "sampler_options",
    "sampler_spec",
    "samplers_for",
    "steps_used",
]


class Options(BaseModel):
    """Typed options of one objective or sampler: unknown keys and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Objective options

Schedule = Literal["linear", "cosine"]
Parameterization = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["simple", "hybrid", "vlb"]
Predictor = Literal["reverse_diffusion", "euler_maruyama"]


class DDPMOptions(Options):
    """DDPM / Improved DDPM (the top-level fields of the config's ``diffusion`` section)."""

    schedule: Schedule = "linear"
    timesteps: int = Field(1000, ge=2, le=100_000)
    parameterization: Parameterization = "eps"
    variance: Variance = "fixed_large"
    loss: LossType = "simple"
    vlb_weight: float = Field(0.001, ge=0.0)
    importance_sampling: bool = False


_DDPM_FIELDS = tuple(DDPMOptions.model_fields)


class UpsamplerOptions(DDPMOptions):
    """ADM-U super-resolution: a DDPM-family model of x given its low-resolution version (the DDPM
    settings are the diffusion section's fields; these in ``diffusion.options``)."""

    low_res_size: int | None = Field(None, ge=1)  # low-res side (must divide the image's); None: a quarter (ADM-U)
    blur_sigma_max: float = Field(0.0, ge=0.0)  # training: Gaussian blur sigma ~ U(0, max) pixels (0: none)
    noise_level_max: float = Field(0.0, ge=0.0, lt=1.0)  # training: noise level s ~ U(0, max) (0: none)
    sample_noise_level: float = Field(0.0, ge=0.0, lt=1.0)  # sampling: the level the first stage's output gets


class ClassifierOptions(Options):
    """ADM-G noisy classifier: trained on the diffusion model's noise schedule."""

    schedule: Schedule = "linear"
    timesteps: int = Field(1000, ge=2, le=100_000)


class _DSMOptions(Options):
    weighting: Literal["sigma2", "likelihood"] = "sigma2"  # lambda = sigma^2, or g^2 (likelihood weighting)
    eps: float = Field(1e-5, gt=0.0, lt=1.0)  # training t ~ U(eps, 1)
    reduce_mean: bool = True


class VPSDEOptions(_DSMOptions):
    beta_min: float = Field(0.1, gt=0)
    beta_max: float = Field(20.0, gt=0)
    parameterization: Literal["eps", "x0", "v", "score"] = "eps"


class VESDEOptions(_DSMOptions):
    sigma_min: float = Field(0.01, gt=0)
    sigma_max: float = Field(50.0, gt=0)
    parameterization: Literal["eps", "x0", "score"] = "eps"  # no 'v': needs alpha^2 + sigma^2 = 1


class NCSNOptions(Options):
    sigma_max: float = Field(1.0, gt=0)
    sigma_min: float = Field(0.01, gt=0)
    num_scales: int = Field(10, ge=2)
    parameterization: Literal["eps", "score"] = "eps"


class VDMOptions(Options):
    schedule: Literal["learned", "fixed_linear"] = "learned"
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    timesteps: int = Field(0, ge=0)  # 0: continuous time; T > 0: the discrete-time-T loss
    num_bins: int = Field(256, ge=2)
    fourier_features: bool = False
    fourier_exponents: tuple[int, int] = (7, 8)
    antithetic: bool = True
    hidden: int = Field(1024, ge=1)
    schedule_objective: Literal["variance", "vlb"] = "variance"


class RepresentationOptions(DDPMOptions):
    """Diffusion-based representation learning (Abstreiter et al. 2021) on a base objective: the DDPM
    fields above (base 'ddpm'), or a score SDE's options in ``base_options`` (base 'vp_sde',
    'subvp_sde', 've_sde', validated by that objective's options); plus the encoder E_phi (code
    dimension d = the network's ``cond_embed_dim``) and the weight of its regulariser."""

    code_dim: int = Field(16, ge=1)  # d; the model needs cond_embed_dim = d
    lambda_z: float = Field(1e-4, ge=0.0)  # weight of ||z||_1 (or of the KL for encoder 'gaussian') per example
    image_channels: int = Field(3, ge=1)  # the encoder's input channels (the data's)
    encoder_channels: int = Field(32, ge=1)  # width of the first conv layer (then 2x)
    base: Literal["ddpm", "vp_sde", "subvp_sde", "ve_sde"] = "ddpm"  # the denoising objective z conditions
    base_options: dict[str, Any] = Field(default_factory=dict)  # an SDE base's diffusion.options
    time_dependent: bool = False  # E_phi(x0, t): the code also sees the network's time input (sec. 3.2)
    encoder: Literal["deterministic", "gaussian"] = "deterministic"  # gaussian: q(z|x0) with lambda_z KL

    @model_validator(mode="after")
    def _base_settings(self) -> RepresentationOptions:
        # messages start with the key they are about (``_validate`` prefixes diffusion.options.)
        if self.base == "ddpm":
            if self.base_options:
                raise ValueError(f"base_options: {dict(self.base_options)!r} is not allowed with base 'ddpm'; "
                                 f"its settings are the fields {', '.join(_DDPM_FIELDS)} of diffusion.options")
            return self
        changed = [k for k in _DDPM_FIELDS if getattr(self, k) != DDPMOptions.model_fields[k].default]
        if changed:
            allowed = ", ".join(sorted(OBJECTIVES[self.base].options.model_fields))
            raise ValueError(f"{changed[0]}: not allowed with base {self.base!r} (DDPM settings given: "
                             f"{', '.join(changed)}); the base's settings go in diffusion.options.base_options "
                             f"(allowed keys: {allowed})")
        _validate(OBJECTIVES[self.base].options, dict(self.base_options), "base_options")
        return self

    def base_typed(self) -> Options:
        """The base objective's typed options."""
        if self.base == "ddpm":
            return DDPMOptions(**{k: getattr(self, k) for k in _DDPM_FIELDS})
        return OBJECTIVES[self.base].options.model_validate(dict(self.base_options))


class UnclipPriorOptions(Options):
    """unCLIP's diffusion prior (DALL-E 2 sec. 2.2): x0-prediction of the sqrt(d)-scaled CLIP image embedding
    given the text embedding, on a DDPM schedule (in ``diffusion.options``)."""

    schedule: Schedule = "cosine"
    timesteps: int = Field(1000, ge=2, le=100_000)
    text_dropout: float = Field(0.1, ge=0.0, le=1.0)  # text embedding -> learned null (classifier-free guidance)
    candidates: int = Field(2, ge=1, le=64)  # sampling: draws per caption, the highest dot product with z_t is kept


class UnclipDecoderOptions(DDPMOptions):
    """unCLIP's decoder (DALL-E 2 sec. 2.1): a DDPM-family model conditioned on the CLIP image embedding
    (the DDPM settings are the diffusion section's fields; this one in ``diffusion.options``)."""

    embedding_dropout: float = Field(0.1, ge=0.0, le=1.0)  # z_i -> zero (= withheld) for classifier-free guidance


# ---------------------------------------------------------------------------------------------
# Sampler options


class NoOptions(Options):
    pass


class AncestralOptions(Options):
    clip_denoised: bool = True
    resample: int = Field(1, ge=1)  # inpainting: RePaint resampling rounds per step


class DDIMOptions(AncestralOptions):
    eta: float = Field(0.0, ge=0.0)


class PCOptions(Options):
    snr: float = Field(0.16, gt=0)  # Langevin corrector signal-to-noise ratio (Song et al. 2021: 0.16)
    corrector_steps: int = Field(1, ge=0)  # 0: predictor only
    predictor: Predictor = "reverse_diffusion"


class ODEOptions(Options):
    ode_tol: float = Field(1e-5, gt=0)  # rtol = atol of the adaptive solver


class LangevinOptions(Options):
    langevin_step_lr: float = Field(2e-5, gt=0)  # NCSN's step size eps


# ---------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective. ``top_level``: option names that live directly in the config's ``diffusion``
    section (the discrete objectives); the others take ``diffusion.options``."""

    name: str
    summary: str
    options: type[Options]
    build: Callable[[Any], nn.Module]
    view: Callable[[Any, nn.Module, Any], Any] | None  # (net, objective, options) -> sampling view; None: no sampler
    view_type: type | None = None
    samplers: tuple[str, ...] = ()  # the objective's own samplers; those of its view's family follow
    default: str | None = None  # default sampler (None: the first that fits)
    label_dropout: bool = True  # labels may be dropped for classifier-free guidance
    top_level: tuple[str, ...] = ()
    classifier_guidance: bool = False  # ADM classifier guidance applies (discrete steps)
    data_channels: Callable[[Any, int], int] | None = None  # (options, network in_channels) -> image channels
    # (view, x0 on the 8-bit grid in [-1, 1], y, seeds) -> bits/dim per image; None: no likelihood
    likelihood: Callable[..., Tensor] | None = None
    # per-sample extras the training loss needs from the data (a batch's ``extras``, data.fields); () for none
    cond_fields: tuple[str, ...] = ()
    images: bool = True  # False: the model generates vectors (embeddings), not images
    # typed options -> this spec with the view, samplers and default of the family a model with those
    # options is sampled in (representation learning on an SDE base); None: the same for all options
    family: Callable[[Any], ObjectiveSpec] | None = None

    @property
    def generative(self) -> bool:
        return self.view is not None

    @property
    def discrete(self) -> bool:
        return "timesteps" in self.top_level

    @property
    def default_sampler(self) -> str | None:
        """The default sampler (of the family with default options; :meth:`for_options` for a model's own)."""
        fits = _fits(self)
        return self.default or (fits[0] if fits else None)

    def for_options(self, options: Any = None) -> ObjectiveSpec:
        """This spec as a model with ``options`` (typed, or the ``diffusion.options`` mapping) is sampled."""
        if self.family is None or options is None:
            return self
        typed = options if isinstance(options, self.options) else objective_options(self.name, options)
        return self.family(typed)

    def has_parameters(self, options: Any) -> bool:
        with torch.random.fork_rng(devices=[]):
            return any(True for _ in self.build(options).parameters())


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: ``run(view, x, seeds, y, steps, options, guide) -> samples`` where ``x`` is unit
    Gaussian noise from each sample's seed (noise key 0), which the sampler scales to its start."""

    name: str
    summary: str
    options: type[Options]
    run: Callable[..., Tensor]
    accepts: tuple[type, ...]
    classifier_guidance: bool = False
    inpainting: tuple[type, ...] = ()  # the views it can inpaint (known/mask); () for none
    batch_exact: bool = True  # False: adaptive steps chosen per batch (equal to batch-of-one within tolerance)
    karras: bool = False  # steps to EDM's Karras levels (snapped to a discrete model's trained levels)


def _vdm_channels(o: VDMOptions, in_channels: int) -> int:
    """Image channels of a VDM network: its input less the Fourier-feature channels (2 N per channel)."""
    if not o.fourier_features:
        return in_channels
    lo, hi = o.fourier_exponents
    per_channel = 1 + 2 * (int(hi) - int(lo))
    if in_channels % per_channel:
        raise ValueError(f"model.in_channels: {in_channels} is not allowed with VDM Fourier features "
                         f"(exponents {lo}..{hi}); expected a multiple of {per_channel}")
    return in_channels // per_channel


def _sde_spec(name: str, kind: str, options: type[Options], summary: str) -> ObjectiveSpec:
    def build(o):
        sde = make_sde(kind, **{k: getattr(o, k) for k in ("beta_min", "beta_max", "sigma_min", "sigma_max")
                                if k in type(o).model_fields})
        return SDEObjective(sde, weighting=o.weighting, parameterization=o.parameterization, eps=o.eps,
                            reduce_mean=o.reduce_mean)

    return ObjectiveSpec(name, summary, options, build, lambda net, obj, o: SDEView(net, obj), SDEView,
                         samplers=("pc", "ode", "heun"), likelihood=ode_bpd)


def _seeded(x: Tensor, seeds: Tensor) -> torch.Generator:
    """One generator for a batch, seeded by its first image's seed (the batches of the evaluation
    stage are fixed by the data, not by the worker count)."""
    return torch.Generator(device=x.device).manual_seed(int(seeds[0]))


def vlb_bpd(view: DiscreteView, x0: Tensor, y: Tensor | None, seeds: Tensor) -> Tensor:
    """Full-chain variational bound (DDPM eq. 5), per-image noise from each image's seed."""
    return vlb_bits_per_dim(view.net, view.schedule, x0, seeds=seeds, y=y, parameterization=view.parameterization,
                            variance=view.variance).total


def ode_bpd(view: SDEView, x0: Tensor, y: Tensor | None, seeds: Tensor) -> Tensor:
    """Probability-flow ODE likelihood (Song et al. 2021, App. D.2) of uniformly dequantized data, with
    Hutchinson's divergence estimator, in bits/dim of the 8-bit data."""
    g = _seeded(x0, seeds)
    x = uniform_dequantize(x0, generator=g)
    log_prob = ode_likelihood(view.score_fn(y), view.sde, x, divergence="hutchinson", generator=g).log_prob
    return sde_bits_per_dim(log_prob, x0[0].numel())


def vdm_bpd(view: VDMView, x0: Tensor, y: Tensor | None, seeds: Tensor) -> Tensor:
    """VDM's VLB (reconstruction + prior + diffusion terms, Kingma et al. 2021 eq. 11), one Monte-Carlo
    draw of t per image, in bits/dim of the 8-bit data."""
    with torch.no_grad():
        return view.objective.terms(view.net, x0, y, generator=_seeded(x0, seeds)).bpd


def _representation(o: RepresentationOptions) -> RepresentationObjective:
    base = OBJECTIVES[o.base].build(o.base_typed())
    if o.time_dependent or o.encoder == "gaussian":  # E_phi(x0[, t]) = a head on the conv features
        width = 2 * o.encoder_channels
        encoder = CodeHead(ConvEncoder(o.image_channels, width, o.encoder_channels), width, o.code_dim,
                           time_dependent=o.time_dependent, gaussian=o.encoder == "gaussian")
    else:
        encoder = ConvEncoder(o.image_channels, o.code_dim, o.encoder_channels)
    time_input = (functools.partial(ddpm_time_input, o.timesteps) if o.base == "ddpm"
                  else base.sde.noise_input)  # diffusion time in [0, 1] -> what the network is given
    return RepresentationObjective(base, encoder, o.lambda_z, time_input)


def _code_view(net, obj: RepresentationObjective, o: RepresentationOptions) -> CodeView | SDECodeView:
    if o.base == "ddpm":
        return CodeView(net, obj.schedule, o.parameterization, o.variance, obj.encoder, o.time_dependent)
    return SDECodeView(net, obj.base, encoder=obj.encoder, time_dependent=o.time_dependent)


def _representation_family(o: RepresentationOptions) -> ObjectiveSpec:
    """A representation model samples in its base's family: CodeView (DDPM) or SDECodeView (score SDEs)."""
    spec = OBJECTIVES["representation"]
    if o.base == "ddpm":
        return spec
    base = OBJECTIVES[o.base]
    return dataclasses.replace(spec, view_type=SDECodeView, samplers=base.samplers, default=base.default,
                               family=None)


def _unclip_decoder(o: UnclipDecoderOptions) -> UnclipDecoderObjective:
    return UnclipDecoderObjective(o.embedding_dropout, **{k: getattr(o, k) for k in _DDPM_FIELDS})


OBJECTIVES: dict[str, ObjectiveSpec] = {
    spec.name: spec
    for spec in (
        ObjectiveSpec(
            "ddpm", "DDPM / Improved DDPM (eps, x0 or v; fixed or learned variance; L_simple, L_hybrid, L_vlb)",
            DDPMOptions, lambda o: DDPMObjective(**o.model_dump()),
            lambda net, obj, o: DiscreteView(net, obj.schedule, o.parameterization, o.variance), DiscreteView,
            samplers=("ddpm", "ddim"), default="ddim", top_level=_DDPM_FIELDS, classifier_guidance=True,
            likelihood=vlb_bpd),
        _sde_spec("vp_sde", "vp", VPSDEOptions, "variance-preserving SDE (Song et al. 2021), denoising score matching"),
        _sde_spec("subvp_sde", "subvp", VPSDEOptions, "sub-VP SDE (Song et al. 2021)"),
        _sde_spec("ve_sde", "ve", VESDEOptions, "variance-exploding SDE (Song et al. 2021)"),
        ObjectiveSpec(
            "ncsn", "NCSN (Song & Ermon 2019): noise-conditional score network on geometric levels",
            NCSNOptions,
            lambda o: NCSNObjective(ncsn_sigmas(o.sigma_max, o.sigma_min, o.num_scales),
                                    parameterization=o.parameterization),
            lambda net, obj, o: NCSNView(net, obj), NCSNView, samplers=("langevin",)),
        ObjectiveSpec(
            "vdm", "Variational Diffusion Model (Kingma et al. 2021): learned noise schedule, continuous VLB",
            VDMOptions, lambda o: VDMObjective(**o.model_dump()), lambda net, obj, o: VDMView(net, obj), VDMView,
            samplers=("ddpm",), data_channels=_vdm_channels, likelihood=vdm_bpd),
        ObjectiveSpec(
            "upsampler", "ADM-U super-resolution: DDPM family on x, conditioned on its augmented low-res image",
            UpsamplerOptions, lambda o: UpsamplerObjective(**o.model_dump()),
            lambda net, obj, o: DiscreteView(obj.bind(net), obj.schedule, o.parameterization, o.variance),
            DiscreteView, samplers=("ddpm", "ddim"), default="ddim", top_level=_DDPM_FIELDS),
        ObjectiveSpec(
            "representation", "diffusion-based representation learning (Abstreiter et al. 2021): DDPM or a score "
            "SDE (base) with the network conditioned on a learned encoder's code z (cond_embed_dim = code_dim), plus "
            "lambda_z ||z||_1 (or lambda_z KL for a Gaussian encoder); optionally a time-dependent code",
            RepresentationOptions, _representation, _code_view, CodeView, samplers=("ddpm", "ddim"), default="ddim",
            family=_representation_family),
        ObjectiveSpec(
            "unclip_prior", "unCLIP diffusion prior (DALL-E 2 sec. 2.2): a causal Transformer predicting the CLIP "
            "image embedding from the text embedding (model.preset prior_*)",
            UnclipPriorOptions, lambda o: UnclipPriorObjective(o.schedule, o.timesteps, o.text_dropout),
            lambda net, obj, o: CodeView(net, obj.schedule, "x0", "fixed_small"), CodeView,
            samplers=("ddim", "ddpm"), default="ddim", cond_fields=(CLIP_IMAGE, CLIP_TEXT), images=False),
        ObjectiveSpec(
            "unclip_decoder", "unCLIP decoder (DALL-E 2 sec. 2.1): DDPM family with the U-Net conditioned on the "
            "CLIP image embedding (model.overrides.cond_embed_dim = d)",
            UnclipDecoderOptions, _unclip_decoder,
            lambda net, obj, o: CodeView(net, obj.schedule, o.parameterization, o.variance), CodeView,
            samplers=("ddpm", "ddim"), default="ddim", top_level=_DDPM_FIELDS, cond_fields=(CLIP_IMAGE,)),
        ObjectiveSpec(
            "classifier", "ADM-G noisy classifier for classifier guidance (cross-entropy on x_t)",
            ClassifierOptions, lambda o: ClassifierObjective(o.schedule, o.timesteps), None,
            top_level=tuple(ClassifierOptions.model_fields), label_dropout=False),
    )
}
DEFAULT_OBJECTIVE = "ddpm"


# ---------------------------------------------------------------------------------------------
# Sampler runners: one signature; the math is in the pure functions they call


def _discrete_schedule(view: DiscreteView, steps: int, ddim: bool):
    full = view.schedule
    if ddim:
        return respace(full, f"ddim{steps}")
    return full if steps == full.num_timesteps else respace(full, steps)


def _run_discrete(view: DiscreteView, x, seeds, y, steps, o, guide: Guide, *, ddim: bool):
    sched = _discrete_schedule(view, steps, ddim)
    eta = o.eta if ddim else 0.0
    common = dict(y=y, clip_denoised=o.clip_denoised, parameterization=view.parameterization,
                  variance=view.variance, cond_fn=guide.cond_fn)
    if guide.inpainting:
        # RePaint's step rule: 'ancestral' DDPM steps, or DDIM steps with eta
        return inpaint_sample(view.net, sched, guide.known, guide.mask, seeds=seeds, resample=o.resample,
                              sampler="ddim" if ddim else "ddpm", eta=eta if ddim else 1.0, **common)
    if ddim:
        return ddim_sample(view.net, sched, tuple(x.shape), seeds=seeds, eta=eta, x_T=x, **common)
    return ddpm_sample(view.net, sched, tuple(x.shape), seeds=seeds, x_T=x, **common)


def ddim_schedule(view: DiscreteView, steps: int):
    """The respaced schedule DDIM runs a discrete model on with ``steps`` steps (what DDIM inversion inverts)."""
    return _discrete_schedule(view, steps, ddim=True)


def run_ddpm(view, x, seeds, y, steps, o, guide):
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2); VDM's ancestral sampler for VDM models."""
    if isinstance(view, VDMView):
        if guide.inpainting:
            raise ValueError("known/mask: VDM's ancestral sampler does not inpaint; use a discrete or score-SDE model")
        return vdm_sample(view.objective.eps_fn(view.net, y), view.objective.gamma, x, steps=steps, seeds=seeds)
    return _run_discrete(view, x, seeds, y, steps, o, guide, ddim=False)


def run_ddim(view, x, seeds, y, steps, o, guide):
    """DDIM (Song et al. 2021): on a discrete schedule respaced to ``steps``; for a continuous-time
    model, the same update in sigma form on ``steps`` times uniform in t."""
    if isinstance(view, DiscreteView):
        return _run_discrete(view, x, seeds, y, steps, o, guide, ddim=True)
    t = torch.linspace(1.0, view.t_eps, steps, dtype=torch.float64)  # DDIM's uniform time grid, then 0
    sigmas = torch.cat([view.ratio(t), torch.zeros(1, dtype=torch.float64)])
    return ddim_sigma_sample(view.denoiser(y), x * float(sigmas[0]), sigmas, eta=o.eta, seeds=seeds)


def run_pc(view: SDEView, x, seeds, y, steps, o, guide):
    """Predictor-corrector (Song et al. 2021, Algorithm 1). The Langevin corrector's step is
    2 alpha_i (snr sigma_t)^2, the snr rule with the norms of pure noise at the current level
    (``snr_norm='noise_level'``): batch-independent and stable in any dimension. Differs from
    score_sde on purpose: its batch-mean norms make a sample depend on its batch, and each
    example's own norms (Algorithm 4 literally) let a near-zero score explode the step in low
    dimension (the 2-D oracle over-dispersed ~5x); equal to score_sde's step for images at high
    noise, smaller at low noise (see ``sde.langevin_corrector``)."""
    return pc_sample(view.score_fn(y), view.sde, x * float(view.sde.prior_std), steps=steps, predictor=o.predictor,
                     snr=o.snr, corrector_steps=max(o.corrector_steps, 1),
                     corrector="langevin" if o.corrector_steps else None, snr_norm="noise_level", eps=view.t_eps,
                     seeds=seeds, known=guide.known, mask=guide.mask)


def _run_ode(view: SDEView, x, seeds, y, steps, o, guide, method: str):
    return ode_sample(view.score_fn(y), view.sde, x * float(view.sde.prior_std), method=method, steps=steps,
                      rtol=getattr(o, "ode_tol", 1e-5), atol=getattr(o, "ode_tol", 1e-5), eps=view.t_eps)[0]


def run_ode(view, x, seeds, y, steps, o, guide):
    """Probability-flow ODE with torchdiffeq's adaptive dopri5 (``steps`` ignored)."""
    return _run_ode(view, x, seeds, y, steps, o, guide, "dopri5")


def run_heun(view, x, seeds, y, steps, o, guide):
    """Probability-flow ODE with ``steps`` fixed Heun steps (batch-independent)."""
    return _run_ode(view, x, seeds, y, steps, o, guide, "heun")


def _karras(view: SigmaView, steps: int, sampler: str) -> Tensor:
    """The view's Karras levels; a warning when snapping them to a discrete model's trained levels merged
    some (EDM's round_sigma: e.g. 40 asked of a 1000-step cosine schedule give 22 distinct steps)."""
    sigmas = view.karras(steps)
    if len(sigmas) - 1 < steps:
        warnings.warn(f"sampler {sampler!r}: {steps} Karras levels snapped to the model's trained noise levels "
                      f"give {len(sigmas) - 1} distinct steps (duplicates dropped); metrics.json and samples.json "
                      "record them as steps_used", stacklevel=4)
    return sigmas


def steps_used(objective: str, options: Any, sampler: str, steps: int) -> int:
    """How many steps ``sample(..., sampler, steps=steps)`` takes on a model of ``objective``: fewer than
    ``steps`` where Karras levels snapped to a discrete schedule's trained levels coincide."""
    spec = objective_spec(objective)
    if not sampler_spec(sampler).karras:
        return int(steps)
    typed = options if isinstance(options, spec.options) else objective_options(objective, None, options)
    view_type = spec.for_options(typed).view_type
    if not (view_type is not None and issubclass(view_type, DiscreteView)):
        return int(steps)
    with torch.random.fork_rng(devices=[]):  # an encoder's initialisation must not move the global stream
        view = make_view(objective, None, build_objective(objective, typed), typed)
    return len(view.karras(steps)) - 1


def run_edm(view: SigmaView, x, seeds, y, steps, o, guide):
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 1) on Karras levels."""
    sigmas = _karras(view, steps, "edm")
    return edm_heun_sample(view.denoiser(y), x * float(sigmas[0]), sigmas, seeds=seeds)


def run_dpm_solver(view: SigmaView, x, seeds, y, steps, o, guide):
    """DPM-Solver++(2M) (Lu et al. 2022) on Karras levels."""
    sigmas = _karras(view, steps, "dpm_solver")
    return dpm_solver_pp_2m_sample(view.denoiser(y), x * float(sigmas[0]), sigmas)


def run_euler(view: SigmaView, x, seeds, y, steps, o, guide):
    """EDM's Euler sampler (Karras et al. 2022, Algorithm 1 without the 2nd-order step) on Karras levels."""
    sigmas = _karras(view, steps, "euler")
    return euler_sample(view.denoiser(y), x * float(sigmas[0]), sigmas)


def run_langevin(view: NCSNView, x, seeds, y, steps, o, guide):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1), ``steps`` per noise level."""
    sigmas = view.objective.sigmas
    return annealed_langevin_sample(view.score_fn(y), sigmas, x * float(sigmas[0]), steps_per_level=steps,
                                    step_lr=o.langevin_step_lr, seeds=seeds, known=guide.known, mask=guide.mask)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddpm", "ancestral sampling (DDPM; VDM's ancestral sampler)", AncestralOptions, run_ddpm,
                    (DiscreteView, VDMView), classifier_guidance=True, inpainting=(DiscreteView,)),
        SamplerSpec("ddim", "DDIM with eta (discrete schedules; sigma form for continuous time)", DDIMOptions, run_ddim,
                    (DiscreteView, SDEView), classifier_guidance=True, inpainting=(DiscreteView,)),
        SamplerSpec("pc", "predictor-corrector (reverse diffusion / Euler-Maruyama + Langevin)", PCOptions, run_pc,
                    (SDEView,), inpainting=(SDEView,)),
        SamplerSpec("ode", "probability-flow ODE, adaptive dopri5", ODEOptions, run_ode, (SDEView,),
                    batch_exact=False),
        SamplerSpec("heun", "probability-flow ODE, fixed-step Heun", NoOptions, run_heun, (SDEView,)),
        SamplerSpec("edm", "EDM Heun (2nd order) on Karras levels", NoOptions, run_edm, (SigmaView,), karras=True),
        SamplerSpec("dpm_solver", "DPM-Solver++(2M) on Karras levels", NoOptions, run_dpm_solver, (SigmaView,),
                    karras=True),
        SamplerSpec("euler", "EDM Euler (1st order) on Karras levels", NoOptions, run_euler, (SigmaView,),
                    karras=True),
        SamplerSpec("langevin", "annealed Langevin dynamics (NCSN)", LangevinOptions, run_langevin, (NCSNView,),
                    inpainting=(NCSNView,)),
    )
}
DEFAULT_SAMPLER = "ddim"


# ---------------------------------------------------------------------------------------------
# Look-ups, validation, the one sampling entry


def _unknown(kind: str, name: str, known: Sequence[str]) -> ValueError:
    hint = difflib.get_close_matches(name, list(known), n=1)
    extra = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ValueError(f"{kind}: {name!r} is not allowed{extra}; expected one of {', '.join(known)}")


def objective_spec(name: str) -> ObjectiveSpec:
    if name not in OBJECTIVES:
        raise _unknown("objective", name, list(OBJECTIVES))
    return OBJECTIVES[name]


def sampler_spec(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise _unknown("sampler", name, list(SAMPLERS))
    return SAMPLERS[name]


def _fits(spec: ObjectiveSpec) -> tuple[str, ...]:
    if spec.view_type is None:
        return ()
    others = [s.name for s in SAMPLERS.values()
              if s.name not in spec.samplers and issubclass(spec.view_type, s.accepts)]
    return (*spec.samplers, *others)


def samplers_for(objective: str, options: Any = None) -> tuple[str, ...]:
    """The samplers that fit an objective: its own first (the first is its default), then every other
    sampler that can drive its view (e.g. the sigma-space samplers). ``options`` (typed, or the
    ``diffusion.options`` mapping): a model's own options, where they choose its sampling family."""
    return _fits(objective_spec(objective).for_options(options))


def _validate(model: type[Options], values: dict[str, Any], where: str) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as err:
        allowed = sorted(model.model_fields)
        lines = []
        for item in err.errors():
            key = ".".join(str(p) for p in item["loc"])
            if not key:  # a check across fields: its message starts with the key it is about
                lines.append(f"{where}.{item['msg'].removeprefix('Value error, ')}")
            elif item["type"] == "extra_forbidden":
                hint = difflib.get_close_matches(key, allowed, n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                lines.append(f"{where}.{key}: unknown key{extra}; allowed keys: {', '.join(allowed)}")
            else:
                lines.append(f"{where}.{key}: value {item.get('input')!r} is not allowed: {item['msg']}")
        raise ValueError("; ".join(lines)) from None


def objective_options(name: str, options: dict[str, Any] | None = None, top_level: dict[str, Any] | None = None):
    """The typed options of objective ``name``: ``options`` (the config's ``diffusion.options``) and, for
    the discrete objectives, their fields of the ``diffusion`` section (``top_level``)."""
    spec = objective_spec(name)
    options = dict(options or {})
    # a discrete objective's own settings beyond the section's fields (the upsampler's) go in options
    own = [k for k in spec.options.model_fields if k not in spec.top_level]
    if spec.top_level and options and not set(options) <= set(own):
        extra = f"; diffusion.options takes {', '.join(own)}" if own else ""
        raise ValueError(f"diffusion.options: {sorted(set(options) - set(own))} not allowed for objective {name!r}; "
                         f"its settings are the fields {', '.join(spec.top_level)} of the diffusion section{extra}")
    if spec.top_level:
        values = {**{k: v for k, v in (top_level or {}).items() if k in spec.top_level}, **options}
    else:
        values = options
    where = "diffusion" if spec.top_level else "diffusion.options"
    try:
        return _validate(spec.options, values, where)
    except ValueError as exc:
        raise ValueError(f"{exc} (objective {name!r})") from None


def build_objective(name: str, options: Any = None) -> nn.Module:
    """The training module of objective ``name`` (``training_loss(net, x0, y, generator=)``)."""
    spec = objective_spec(name)
    typed = options if isinstance(options, spec.options) else objective_options(name, options)
    return spec.build(typed)


def make_continuous_objective(objective: str, options: dict[str, Any] | None = None) -> nn.Module:
    """The per-example loss module of a continuous-time objective, from ``diffusion.options``."""
    if objective_spec(objective).top_level:
        continuous = [n for n, s in OBJECTIVES.items() if not s.top_level]
        raise ValueError(f"objective: {objective!r} is not allowed here; expected one of {', '.join(continuous)}")
    return build_objective(objective, options)


def sampler_options(name: str, values: dict[str, Any] | None = None) -> Any:
    """Typed options of sampler ``name`` from a flat mapping (keys of other samplers are ignored)."""
    model = sampler_spec(name).options
    return _validate(model, {k: v for k, v in (values or {}).items() if k in model.model_fields}, "sampler")


def check_sampler_fits(objective: str, sampler: str, *, classifier: bool = False, inpainting: bool = False,
                       options: Any = None) -> None:
    """ValueError unless ``sampler`` can sample a model of ``objective`` (with the guidance asked for);
    ``options``: the model's own (typed, or the ``diffusion.options`` mapping), see :func:`samplers_for`."""
    spec = objective_spec(objective).for_options(options)
    if not spec.generative:
        generative = ", ".join(n for n, s in OBJECTIVES.items() if s.generative)
        raise ValueError(f"diffusion.objective: {objective!r} has no sampler (it is not a generative model); "
                         f"objectives with samplers: {generative}")
    fits = _fits(spec)
    if sampler not in fits:
        if sampler not in SAMPLERS:
            raise _unknown("sampler", sampler, list(SAMPLERS))
        raise ValueError(f"sampler: {sampler!r} is not allowed for objective {objective!r}; allowed: {', '.join(fits)}")
    if classifier and not (spec.classifier_guidance and SAMPLERS[sampler].classifier_guidance):
        pairs = [f"objective {o!r} with sampler {s!r}" for o, os in OBJECTIVES.items() if os.classifier_guidance
                 for s in samplers_for(o) if SAMPLERS[s].classifier_guidance]
        raise ValueError(f"classifier guidance is not allowed for objective {objective!r} with sampler {sampler!r}; "
                         f"allowed: {' or '.join(pairs)}")
    if inpainting and not issubclass(spec.view_type, SAMPLERS[sampler].inpainting):
        allowed = [s for s in fits if issubclass(spec.view_type, SAMPLERS[s].inpainting)]
        raise ValueError(f"sampler: {sampler!r} cannot inpaint; for objective {objective!r} use one of "
                         f"{', '.join(allowed) or '(none)'}")


def diffusion_options(diffusion: dict[str, Any]) -> Any:
    """Typed options of the objective described by a ``diffusion`` section (a DiffusionConfig dump)."""
    return objective_options(diffusion["objective"], diffusion.get("options"), diffusion)


def make_view(objective: str, net, objective_module: nn.Module, options: Any):
    """(network, objective module) as the samplers of ``objective`` see it; ``options`` typed."""
    spec = objective_spec(objective)
    if spec.view is None:
        check_sampler_fits(objective, DEFAULT_SAMPLER)  # raises: not a generative model
    return spec.view(net, objective_module, options)


def data_channels(objective: str, options: Any, in_channels: int) -> int:
    """Image channels of a network trained with ``objective`` (its input may carry extra features)."""
    spec = objective_spec(objective)
    return spec.data_channels(options, in_channels) if spec.data_channels else in_channels


def sample(view, sampler: str, shape: Sequence[int], seeds: Sequence[int] | Tensor, *, steps: int,
           y: Tensor | None = None, options: Any = None, guidance_scale: float = 0.0, null_class: int | None = None,
           cond_fn=None, known: Tensor | None = None, mask: Tensor | None = None,
           device: torch.device | str | None = None, noise: Tensor | None = None) -> Tensor:
    """Draw ``shape[0]`` samples from ``view`` with ``sampler``: every noise tensor comes from each sample's
    seed (``noise_from_seeds``), so sample i depends on ``seeds[i]`` only, not on its batch.

    ``guidance_scale`` w: classifier-free guidance (Ho & Salimans eq. 6), ``null_class`` the label of
    the unconditional model; ``cond_fn``: classifier guidance (ADM); ``known``/``mask``: inpainting;
    ``noise``: the unit start noise (shape ``shape``) instead of each seed's, e.g. a DDIM-inverted x_T.
    """
    spec = sampler_spec(sampler)
    if not isinstance(view, spec.accepts):
        raise ValueError(f"sampler: {sampler!r} cannot drive a {type(view).__name__}; it takes "
                         f"{', '.join(t.__name__ for t in spec.accepts)}")
    if steps < 1:
        raise ValueError(f"steps: {steps!r} is not allowed; it must be >= 1")
    if cond_fn is not None and not (spec.classifier_guidance and isinstance(view, DiscreteView)):
        raise ValueError(f"classifier guidance is not allowed with sampler {sampler!r} on a {type(view).__name__}")
    if (known is None) != (mask is None) or (known is not None and not isinstance(view, spec.inpainting)):
        raise ValueError(f"known/mask: inpainting needs both, and a sampler that inpaints a {type(view).__name__} "
                         f"(not {sampler!r})")
    opts = options if isinstance(options, spec.options) else sampler_options(sampler, options)
    if guidance_scale:
        if null_class is None:
            raise ValueError("null_class: None is not allowed with guidance_scale > 0 (the unconditional label)")
        view = view.with_net(classifier_free_guidance(view.net, guidance_scale, null_class=null_class))
    seeds_t = torch.as_tensor(seeds, dtype=torch.int64)
    x = noise_from_seeds(seeds_t, tuple(shape)[1:], 0, device=device) if noise is None else noise
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"noise: shape {tuple(x.shape)} is not allowed; expected {tuple(shape)}")
    return spec.run(view, x, seeds_t, y, steps, opts, Guide(cond_fn, known, mask))


def describe_samplers() -> str:
    """One line per generative objective with the samplers that fit it (CLI help)."""
    return "; ".join(f"{name}: {', '.join(samplers_for(name))}" for name, spec in OBJECTIVES.items()
                     if spec.generative)
