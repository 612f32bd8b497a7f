"""Diffusion math, pure torch (no distributed or storage imports). Discrete-time core:

Schedules (schedules.py; float64 tensors, frozen `Schedule` from `make_schedule(betas)`):
    linear_betas(T), cosine_betas(T, s=0.008, max_beta=0.999), cosine_alpha_bar(t, s),
    make_schedule(betas), build_schedule(name, T), respace(schedule, 'ddim50' | '10,15,20' | int),
    space_timesteps(T, spec). A respaced schedule keeps `timestep_map`: the model is always called
    with ORIGINAL timesteps t (float).
Forward process, posterior, parameterisations (gaussian.py):
    q_sample, q_mean_variance, q_posterior_mean_variance, x0_eps_from_output, output_from_x0_eps,
    model_log_variance, p_mean_variance(model, schedule, x_t, t_index, y, parameterization='eps'|'x0'|'v',
    variance='fixed_small'|'fixed_large'|'learned_range', clip_denoised) -> PMeanVariance(mean, variance,
    log_variance, pred_x0, eps), oracle_model(GaussianMixture, schedule, parameterization).
Losses (losses.py): training_losses(..., loss_type='simple'|'hybrid'|'vlb') -> LossOutput(loss, mse, vlb),
    ImportanceSampler, normal_kl, discretized_gaussian_log_likelihood, vlb_term_bpd.
Samplers (samplers.py): ddpm_sample, ddim_sample(eta), ddim_invert, ddpm_step, ddim_step, slerp,
    noise_from_seeds (per-sample noise: a generator per sample for images, a counter-based hash for small samples).
Likelihood (likelihood.py): vlb_bits_per_dim -> VLBOutput(total, prior, terms), prior_bpd.
Continuous time and guidance (sde.py, ncsn.py, vdm.py, guidance.py, inpainting.py, fast_samplers.py):
    VPSDE, SubVPSDE, VESDE, make_sde, dsm_loss, pc_sample, ode_sample, ode_likelihood, bits_per_dim,
    uniform_dequantize, make_continuous_objective; NCSN: ncsn_sigmas, NCSNObjective,
    annealed_langevin_sample; VDM: MonotoneGamma, VDMObjective, vdm_sample; guidance:
    classifier_cond_fn, classifier_free_guidance, drop_labels; inpaint_sample; EDM Heun and
    DPM-Solver++: edm_heun_sample, dpm_solver_pp_2m_sample, karras_sigmas.
unCLIP (unclip.py): UnclipPriorObjective (x0-prediction of sqrt(d)-scaled CLIP image embeddings given the
    text embedding), UnclipDecoderObjective (DDPM family given the image embedding), embedding_guidance,
    select_by_text_similarity (DALL-E 2's 2-candidate choice), scale_embedding / unscale_embedding.
Oracle (oracle.py): GaussianMixture with closed-form score, denoiser, classifier and density.
Seams (registry.py; loaded on first use, so the pure-math modules need no pydantic):
    OBJECTIVES (name -> ObjectiveSpec: typed options, training module, samplers, sampling view),
    SAMPLERS (name -> SamplerSpec: typed options, one runner signature), sample(view, sampler, ...),
    build_objective, make_view, samplers_for, make_continuous_objective. Every objective module has
    ``training_loss(net, x0, y, generator=) -> ObjectiveLoss`` (objectives.py); the views a sampler
    drives are in sampling.py; EDM's Euler and DDIM in sigma form are in fast_samplers.py.

The model callable is `model(x, t, y=None, **cond) -> Tensor` (2C channels for learned_range).
"""

from .gaussian import (
    PARAMETERIZATIONS,
    VARIANCES,
    PMeanVariance,
    model_log_variance,
    oracle_model,
    output_from_x0_eps,
    p_mean_variance,
    p_mean_variance_from_output,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    x0_eps_from_output,
)
from .likelihood import VLBOutput, prior_bpd, vlb_bits_per_dim
from .losses import (
    LOSS_TYPES,
    ImportanceSampler,
    LossOutput,
    discretized_gaussian_log_likelihood,
    normal_kl,
    training_losses,
    vlb_term_bpd,
)
from .oracle import GaussianMixture
from .samplers import ddim_invert, ddim_sample, ddim_step, ddpm_sample, ddpm_step, noise_from_seeds, slerp
from .fast_samplers import (
    ddim_sigma_sample,
    euler_sample,
    denoiser_from_discrete,
    denoiser_from_score_fn,
    denoiser_from_sigma_score,
    dpm_solver_pp_2m_sample,
    edm_heun_sample,
    karras_sigmas,
    round_sigmas,
)
from .guidance import (
    classifier_cond_fn,
    classifier_free_guidance,
    classifier_guided_score_fn,
    drop_labels,
    oracle_classifier,
)
from .inpainting import inpaint_sample
from .ncsn import NCSNObjective, annealed_langevin_sample, ncsn_sigmas
from .objectives import ClassifierObjective, DDPMObjective, ObjectiveLoss
from .sde import (
    SDEObjective,
    SubVPSDE,
    VESDE,
    VPSDE,
    bits_per_dim,
    dsm_loss,
    make_noise_fn,
    make_sde,
    ode_likelihood,
    ode_sample,
    pc_sample,
    prediction_to_x0_eps,
    score_fn_from_model,
    uniform_dequantize,
)
from .vdm import MonotoneGamma, VDMObjective, VDMOutput, vdm_sample
from .schedules import (
    SCHEDULE_NAMES,
    Schedule,
    build_schedule,
    cosine_alpha_bar,
    cosine_betas,
    linear_betas,
    make_schedule,
    respace,
    space_timesteps,
)

_REGISTRY_NAMES = ("OBJECTIVES", "SAMPLERS", "ObjectiveSpec", "SamplerSpec", "build_objective", "make_view",
                   "make_continuous_objective", "sample", "samplers_for", "objective_spec", "sampler_spec")


def __getattr__(name: str):
    """The registry's names, imported on first use (it needs pydantic; the math above does not)."""
    if name in _REGISTRY_NAMES:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_REGISTRY_NAMES,
    "ClassifierObjective",
    "DDPMObjective",
    "ObjectiveLoss",
    "ddim_sigma_sample",
    "euler_sample",
    "LOSS_TYPES",
    "PARAMETERIZATIONS",
    "SCHEDULE_NAMES",
    "VARIANCES",
    "VESDE",
    "VPSDE",
    "GaussianMixture",
    "ImportanceSampler",
    "LossOutput",
    "MonotoneGamma",
    "NCSNObjective",
    "PMeanVariance",
    "SDEObjective",
    "Schedule",
    "SubVPSDE",
    "VDMObjective",
    "VDMOutput",
    "VLBOutput",
    "annealed_langevin_sample",
    "bits_per_dim",
    "build_schedule",
    "classifier_cond_fn",
    "classifier_free_guidance",
    "classifier_guided_score_fn",
    "cosine_alpha_bar",
    "cosine_betas",
    "ddim_invert",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "denoiser_from_discrete",
    "denoiser_from_score_fn",
    "denoiser_from_sigma_score",
    "discretized_gaussian_log_likelihood",
    "dpm_solver_pp_2m_sample",
    "drop_labels",
    "dsm_loss",
    "edm_heun_sample",
    "inpaint_sample",
    "karras_sigmas",
    "linear_betas",
    "make_noise_fn",
    "make_schedule",
    "make_sde",
    "model_log_variance",
    "ncsn_sigmas",
    "noise_from_seeds",
    "normal_kl",
    "ode_likelihood",
    "ode_sample",
    "oracle_classifier",
    "oracle_model",
    "output_from_x0_eps",
    "p_mean_variance",
    "p_mean_variance_from_output",
    "pc_sample",
    "prediction_to_x0_eps",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "round_sigmas",
    "score_fn_from_model",
    "slerp",
    "space_timesteps",
    "training_losses",
    "uniform_dequantize",
    "vdm_sample",
    "vlb_bits_per_dim",
    "vlb_term_bpd",
    "x0_eps_from_output",
]
