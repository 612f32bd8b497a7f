"""A ``sample_fn(indices, seeds) -> uint8 images`` from a model and sampler settings.

Every objective of ``DiffusionConfig.objective`` has its samplers (:data:`OBJECTIVE_SAMPLERS`):

=================  ==========================================================================
objective          samplers
=================  ==========================================================================
ddpm               'ddpm' (ancestral), 'ddim' (eta), 'edm' (EDM Heun), 'dpm_solver' (DPM-Solver++ 2M)
vp/subvp/ve_sde    'pc' (reverse diffusion + Langevin corrector), 'ode' (adaptive dopri5),
                   'heun' (fixed-step probability-flow ODE), 'edm', 'dpm_solver'
ncsn               'langevin' (annealed Langevin dynamics)
vdm                'ddpm' (VDM's ancestral sampler)
=================  ==========================================================================

The network's conditioning input follows the objective (VP/sub-VP: 999 t; VE/NCSN: log sigma;
VDM: rescaled gamma; DDPM: the original timestep), adapted once by the core's adapters.

Labels and guidance: a class-conditional model gets one label per sample, fixed
(``class_label``) or drawn from the sample's own seed. ``guidance_scale`` w applies classifier-free
guidance (Ho & Salimans eq. 6: (1 + w) eps(x, y) - w eps(x, null), null class = num_classes;
w = 0 is the conditional model). A noisy ``classifier`` with ``classifier_scale`` s > 0 guides
'ddpm' / 'ddim' sampling of the discrete objective (ADM Algorithms 1-2).

Seeds: every noise tensor (the initial draw included) comes from the sample's seed
(``noise_from_seeds``), so image ``i`` depends on its seed only, not on the batch it was drawn in
('pc' uses per-example corrector norms for this). One exception: 'ode' chooses its adaptive
steps for the whole batch, so a sample matches its batch-of-one self only to the solver's
tolerance ('heun' is the fixed-step, exactly batch-independent ODE sampler).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.diffusion.samplers import ddim_sample, ddpm_sample, noise_from_seeds
from pipeline.diffusion.schedules import build_schedule, respace

__all__ = [
    "OBJECTIVE_SAMPLERS",
    "SAMPLERS",
    "CheckpointSampleFn",
    "ModelSampleFn",
    "SamplerSettings",
    "check_discrete",
    "check_sampler",
    "labels_from_seeds",
    "load_classifier",
    "load_ema_model",
    "load_ema_objective",
    "make_sample_fn",
    "to_uint8",
]

_SDE_SAMPLERS = ("pc", "ode", "heun", "edm", "dpm_solver")
OBJECTIVE_SAMPLERS: dict[str, tuple[str, ...]] = {
    "ddpm": ("ddpm", "ddim", "edm", "dpm_solver"),
    "vp_sde": _SDE_SAMPLERS,
    "subvp_sde": _SDE_SAMPLERS,
    "ve_sde": _SDE_SAMPLERS,
    "ncsn": ("langevin",),
    "vdm": ("ddpm",),
}
SAMPLERS = ("ddim", "ddpm", "pc", "ode", "heun", "edm", "dpm_solver", "langevin")
_CLASSIFIER_GUIDED = ("ddpm", "ddim")
PREDICTORS = ("reverse_diffusion", "euler_maruyama")  # of the 'pc' sampler


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn; recorded in metrics.json.

    ``steps``: sampler steps (ddpm/ddim: respaced steps; pc/heun/edm/dpm_solver: steps; langevin:
    steps per noise level; ode: ignored, adaptive). ``snr`` / ``corrector_steps``: the Langevin
    corrector of 'pc' (Song et al. 2021: snr 0.16, 1 step for VE; 0 steps = predictor only, as
    their VP configs), ``predictor``: 'reverse_diffusion' or 'euler_maruyama', ``langevin_step_lr``: the step size eps of NCSN's annealed Langevin dynamics.
    ``ode_tol``: rtol = atol of the adaptive ODE solver.
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 0.0
    classifier_scale: float = 0.0
    clip_denoised: bool = True
    class_label: int | None = None
    snr: float = 0.16
    corrector_steps: int = 1
    predictor: str = "reverse_diffusion"
    ode_tol: float = 1e-5
    langevin_step_lr: float = 2e-5

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: {self.sampler!r} is not allowed; available here: {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps!r} is not allowed; it must be >= 1")
        for name in ("guidance_scale", "classifier_scale", "eta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; it must be >= 0")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor: {self.predictor!r} is not allowed; allowed: {', '.join(PREDICTORS)}")
        if self.class_label is not None and self.class_label < 0:
            raise ValueError(f"class_label: {self.class_label!r} is not allowed; it must be >= 0 or None")
        if self.snr <= 0 or self.corrector_steps < 0 or self.ode_tol <= 0 or self.langevin_step_lr <= 0:
            raise ValueError(f"snr/corrector_steps/ode_tol/langevin_step_lr: ({self.snr}, {self.corrector_steps}, "
                             f"{self.ode_tol}, {self.langevin_step_lr}) not allowed; need > 0, >= 0, > 0, > 0")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def labels_from_seeds(seeds: np.ndarray, num_classes: int) -> np.ndarray:
    """One uniform class label per sample, from its seed alone."""
    return np.array([np.random.default_rng([int(s), 1]).integers(num_classes) for s in seeds], dtype=np.int64)


def _diffusion_dict(diffusion: Any) -> dict[str, Any]:
    from pipeline.config import DiffusionConfig

    if isinstance(diffusion, DiffusionConfig):
        return diffusion.model_dump(mode="json")
    return DiffusionConfig.model_validate(dict(diffusion)).model_dump(mode="json")


def check_sampler(objective: str, settings: SamplerSettings, *, has_classifier: bool = False) -> None:
    """ValueError unless ``settings`` fit a model trained with ``objective``."""
    if objective not in OBJECTIVE_SAMPLERS:
        allowed = ", ".join(sorted(OBJECTIVE_SAMPLERS))
        raise ValueError(f"diffusion.objective: {objective!r} has no sampler (a noisy classifier is not a generative "
                         f"model); objectives with samplers: {allowed}")
    allowed = OBJECTIVE_SAMPLERS[objective]
    if settings.sampler not in allowed:
        raise ValueError(f"sampler: {settings.sampler!r} is not allowed for objective {objective!r}; "
                         f"allowed: {', '.join(allowed)}")
    if settings.classifier_scale and not has_classifier:
        raise ValueError(f"classifier_scale: {settings.classifier_scale} needs a noisy classifier "
                         "(eval.classifier_run / --classifier-run)")
    if has_classifier and settings.classifier_scale and (objective != "ddpm" or settings.sampler not in
                                                         _CLASSIFIER_GUIDED):
        raise ValueError(f"classifier guidance is not allowed for objective {objective!r} with sampler "
                         f"{settings.sampler!r}; allowed: objective 'ddpm' with sampler 'ddpm' or 'ddim'")


def check_discrete(diffusion: dict[str, Any]) -> None:
    """ValueError unless the objective is the discrete-time DDPM family (bits/dim by the VLB)."""
    if diffusion["objective"] != "ddpm":
        raise ValueError(f"diffusion.objective: {diffusion['objective']!r} is not supported here; "
                         "allowed: 'ddpm' (discrete-time)")


def _data_channels(config: Any, objective: str, options: dict[str, Any]) -> int:
    """Image channels: the network's input channels less VDM's Fourier-feature channels (2 N per
    image channel, N exponents); they must equal what the network predicts."""
    channels = int(config.in_channels)
    if objective == "vdm" and options.get("fourier_features"):
        lo, hi = options.get("fourier_exponents", (7, 8))
        per_channel = 1 + 2 * (int(hi) - int(lo))
        if channels % per_channel:
            raise ValueError(f"model.in_channels: {channels} is not allowed with VDM Fourier features "
                             f"(exponents {lo}..{hi}); expected a multiple of {per_channel}")
        channels //= per_channel
        predicted = getattr(config, "prediction_channels", None)
        if predicted is not None and int(predicted) != channels:
            raise ValueError(f"model.prediction_channels: {predicted} is not allowed with in_channels "
                             f"{config.in_channels} and VDM Fourier features; expected {channels}")
    return channels


def make_sample_fn(
    model: torch.nn.Module,
    settings: SamplerSettings,
    schedule: str = "linear",
    timesteps: int = 1000,
    parameterization: str = "eps",
    variance: str = "fixed_large",
    device: str | torch.device = "cpu",
    *,
    diffusion: Any = None,
    objective: torch.nn.Module | None = None,
    classifier: torch.nn.Module | None = None,
):
    """``sample_fn(indices, seeds) -> images`` or ``(images, labels)`` drawing with ``settings`` from ``model``.

    ``diffusion`` (a DiffusionConfig or its dict) selects the objective's samplers; without it the
    model is a discrete DDPM-family one described by ``schedule`` ... ``variance``. ``objective``:
    the training objective module holding learned parameters (VDM's learned noise schedule, with the
    checkpoint's weights); built from ``diffusion.options`` when the objective has none.
    ``classifier``: a noisy classifier ``classifier(x_t, t) -> logits`` for ``classifier_scale``.
    The model's ``config`` (``image_size``, ``in_channels``, ``num_classes``) gives the shape and
    whether labels are drawn.
    """
    if diffusion is None:
        diffusion = {"objective": "ddpm", "schedule": schedule, "timesteps": timesteps,
                     "parameterization": parameterization, "variance": variance}
    d = _diffusion_dict(diffusion)
    kind, options = d["objective"], dict(d["options"])
    check_sampler(kind, settings, has_classifier=classifier is not None)
    config = model.config
    num_classes = int(getattr(config, "num_classes", 0) or 0)
    if settings.guidance_scale and not num_classes:
        raise ValueError(f"guidance_scale: {settings.guidance_scale} is not allowed for an unconditional model "
                         "(classifier-free guidance needs num_classes > 0 and label dropout in training)")
    label_classes = num_classes or (int(classifier.config.num_classes) if classifier is not None else 0)
    if settings.class_label is not None and not 0 <= settings.class_label < label_classes:
        allowed = f"0..{label_classes - 1}" if label_classes else "none: the model is unconditional"
        raise ValueError(f"class_label: {settings.class_label} is not allowed; classes: {allowed}")
    shape = (_data_channels(config, kind, options), int(config.image_size), int(config.image_size))
    model = model.to(device).eval()
    net = model
    if settings.guidance_scale:
        from pipeline.diffusion.guidance import classifier_free_guidance

        net = classifier_free_guidance(model, settings.guidance_scale, null_class=num_classes)
    if not num_classes:  # labels exist only for the classifier: the network never sees them
        def net(x, t, y=None, _model=model, **cond):
            return _model(x, t, None, **cond)
    draw = _make_drawer(kind, d, options, net, settings, objective, classifier, device)

    return ModelSampleFn(draw, shape, label_classes, settings.class_label, device)


class ModelSampleFn:
    """``sample_fn(indices, seeds) -> uint8 images`` (or ``(images, labels)`` for a labelled model);
    :meth:`samples` gives the sampler's float output before quantisation."""

    def __init__(self, draw, shape, label_classes: int, class_label: int | None, device):
        self.draw, self.shape, self.device = draw, tuple(shape), device
        self.label_classes, self.class_label = label_classes, class_label

    def labels(self, seeds: np.ndarray) -> np.ndarray | None:
        if not self.label_classes:
            return None
        if self.class_label is not None:
            return np.full(len(seeds), self.class_label, dtype=np.int64)
        return labels_from_seeds(seeds, self.label_classes)

    @torch.no_grad()
    def samples(self, seeds: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
        """(B, C, H, W) float samples (about [-1, 1]) and the labels, from one seed per sample."""
        seeds_t = torch.as_tensor(np.asarray(seeds, np.int64))
        labels = self.labels(np.asarray(seeds))
        y = torch.as_tensor(labels, device=self.device) if labels is not None else None
        return self.draw((len(seeds_t), *self.shape), seeds_t, y), labels

    def __call__(self, indices: np.ndarray, seeds: np.ndarray):
        x, labels = self.samples(seeds)
        images = to_uint8(x)
        return (images, labels) if labels is not None else images


def _initial(seeds: torch.Tensor, shape, std: float, device) -> torch.Tensor:
    """The sampler's starting point std * N(0, I) from each sample's seed (noise key 0)."""
    return noise_from_seeds(seeds, shape[1:], 0, device=device) * std


def _make_drawer(kind, d, options, net, settings: SamplerSettings, objective, classifier, device):
    """``draw(shape, seeds, y) -> x`` in [-1, 1] (unclipped for the continuous samplers)."""
    s = settings
    if kind == "ddpm":
        return _discrete_drawer(d, net, s, classifier, device)
    if kind == "ncsn":
        from pipeline.diffusion import annealed_langevin_sample, make_continuous_objective

        obj = make_continuous_objective("ncsn", options)
        sigmas = obj.sigmas

        def draw(shape, seeds, y):
            score_fn = obj.score_fn(net, y)
            x = _initial(seeds, shape, float(sigmas[0]), device)
            return annealed_langevin_sample(score_fn, sigmas, x, steps_per_level=s.steps,
                                            step_lr=s.langevin_step_lr, seeds=seeds)

        return draw
    if kind == "vdm":
        from pipeline.diffusion import make_continuous_objective, vdm_sample

        if objective is None:
            if options.get("schedule", "learned") == "learned":
                raise ValueError("objective: None is not allowed for a VDM with a learned noise schedule; pass the "
                                 "objective module with the checkpoint's schedule weights (load_ema_objective)")
            objective = make_continuous_objective("vdm", options)
        objective = objective.to(device).eval()

        def draw(shape, seeds, y):
            x = _initial(seeds, shape, 1.0, device)
            return vdm_sample(objective.eps_fn(net, y), objective.gamma, x, steps=s.steps, seeds=seeds)

        return draw
    # score SDEs
    from pipeline.diffusion import (
        denoiser_from_score_fn,
        dpm_solver_pp_2m_sample,
        edm_heun_sample,
        karras_sigmas,
        make_continuous_objective,
        ode_sample,
        pc_sample,
    )

    obj = make_continuous_objective(kind, options)
    sde, t_eps = obj.sde, 1e-3  # sampling stops at t = 1e-3 (Song et al. 2021, App. C)

    def draw(shape, seeds, y):
        score_fn = obj.score_fn(net, y)
        if s.sampler in ("edm", "dpm_solver"):
            ends = torch.tensor([t_eps, 1.0], dtype=torch.float64)
            alpha, sigma = sde.marginal(ends)
            ratio = (sigma / alpha).tolist()
            sigmas = karras_sigmas(s.steps, ratio[0], ratio[1])
            denoiser = denoiser_from_score_fn(score_fn, sde)
            x = _initial(seeds, shape, float(sigmas[0]), device)
            if s.sampler == "edm":
                return edm_heun_sample(denoiser, x, sigmas, seeds=seeds)
            return dpm_solver_pp_2m_sample(denoiser, x, sigmas)
        x = _initial(seeds, shape, float(sde.prior_std), device)
        if s.sampler == "pc":
            return pc_sample(score_fn, sde, x, steps=s.steps, predictor=s.predictor, snr=s.snr,
                             corrector_steps=max(s.corrector_steps, 1),
                             corrector="langevin" if s.corrector_steps else None, snr_norm="example", eps=t_eps,
                             seeds=seeds)
        method = "heun" if s.sampler == "heun" else "dopri5"
        return ode_sample(score_fn, sde, x, method=method, steps=s.steps, rtol=s.ode_tol, atol=s.ode_tol,
                          eps=t_eps)[0]

    return draw


def _discrete_drawer(d, net, s: SamplerSettings, classifier, device):
    full = build_schedule(d["schedule"], d["timesteps"])
    common = dict(parameterization=d["parameterization"], variance=d["variance"], device=device)
    if s.sampler in ("edm", "dpm_solver"):
        from pipeline.diffusion import denoiser_from_discrete, dpm_solver_pp_2m_sample, edm_heun_sample, karras_sigmas
        from pipeline.diffusion.fast_samplers import discrete_sigmas, round_sigmas

        levels = discrete_sigmas(full)
        # EDM's round_sigma: Karras levels snapped to the trained ones; duplicates (few trained levels) dropped
        sigmas = round_sigmas(karras_sigmas(s.steps, float(levels.min()), float(levels.max())), levels)
        sigmas = torch.cat([torch.unique_consecutive(sigmas[:-1]), sigmas[-1:]])

        def draw(shape, seeds, y):
            denoiser = denoiser_from_discrete(net, full, parameterization=d["parameterization"], y=y)
            x = _initial(seeds, shape, float(sigmas[0]), device)
            if s.sampler == "edm":
                return edm_heun_sample(denoiser, x, sigmas, seeds=seeds)
            return dpm_solver_pp_2m_sample(denoiser, x, sigmas)

        return draw
    if s.sampler == "ddim":
        sched = respace(full, f"ddim{s.steps}")
    else:
        sched = full if s.steps == d["timesteps"] else respace(full, s.steps)
    cond_fn = None
    if classifier is not None and s.classifier_scale:
        from pipeline.diffusion import classifier_cond_fn

        classifier = classifier.to(device).eval()
        cond_fn = classifier_cond_fn(classifier, s.classifier_scale)

    def draw(shape, seeds, y):
        if s.sampler == "ddim":
            return ddim_sample(net, sched, shape, seeds=seeds, y=y, eta=s.eta, clip_denoised=s.clip_denoised,
                               cond_fn=cond_fn, **common)
        return ddpm_sample(net, sched, shape, seeds=seeds, y=y, clip_denoised=s.clip_denoised, cond_fn=cond_fn,
                           **common)

    return draw


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _load_weights(run_url: str, checkpoint: int | str, ema_rate: float | None):
    from pipeline.train.checkpoint import load_ema_weights

    return load_ema_weights(run_url, checkpoint, ema_rate)[0]


def _network_from_weights(weights, model: dict[str, Any], where: str) -> torch.nn.Module:
    from pipeline.config import ModelConfig
    from pipeline.export import network_state_dict
    from pipeline.models import build_model_from_config

    torch.manual_seed(0)  # building initialises weights that are then replaced; keep it deterministic
    network = build_model_from_config(ModelConfig.model_validate(model))
    try:
        network.load_state_dict(network_state_dict(weights), strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where}: its EMA weights do not fit the configured network: "
                         f"{str(exc).splitlines()[0]}") from None
    return network.eval()


def load_ema_model(
    run_url: str, checkpoint: int | str, ema_rate: float | None, model: dict[str, Any]
) -> torch.nn.Module:
    """The network of ``model`` (a ModelConfig dict) with one EMA of a committed checkpoint, in eval mode."""
    weights = _load_weights(run_url, checkpoint, ema_rate)
    return _network_from_weights(weights, model, f"checkpoint {checkpoint} of {run_url}")


def load_ema_objective(weights: dict[str, torch.Tensor], diffusion: dict[str, Any]) -> torch.nn.Module | None:
    """The objective module with its learned parameters (``objective.*`` EMA weights; VDM's
    learned schedule), or None when the objective has none."""
    if diffusion["objective"] in ("ddpm", "classifier"):
        return None
    from pipeline.diffusion import make_continuous_objective

    torch.manual_seed(0)
    objective = make_continuous_objective(diffusion["objective"], dict(diffusion.get("options") or {}))
    state = {k[len("objective."):]: v for k, v in weights.items() if k.startswith("objective.")}
    if not list(objective.parameters()):
        return None
    try:
        objective.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint's objective weights do not fit diffusion.options: "
                         f"{str(exc).splitlines()[0]}") from None
    return objective.eval()


def load_classifier(run_url: str, checkpoint: int | str = "latest", ema_rate: float | None = None):
    """``(classifier, diffusion dict, checkpoint)``: one EMA of a noisy-classifier run (objective 'classifier')."""
    import yaml

    from pipeline.config import build_config
    from pipeline.data import storage
    from pipeline.train.checkpoint import resolve_checkpoint

    saved = storage.join(run_url, "config.yaml")
    if not storage.exists(saved):
        raise ValueError(f"classifier_run: {run_url!r} has no config.yaml; expected a run of objective 'classifier'")
    cfg = build_config(yaml.safe_load(storage.read_bytes(saved)) or {})
    if cfg.diffusion.objective != "classifier":
        raise ValueError(f"classifier_run: {run_url!r} trained objective {cfg.diffusion.objective!r}; "
                         "allowed: a run of objective 'classifier'")
    ckpt = resolve_checkpoint(run_url, checkpoint)
    weights = _load_weights(run_url, ckpt.images_seen, ema_rate)
    network = _network_from_weights(weights, cfg.model.model_dump(mode="json"),
                                    f"classifier checkpoint {ckpt.rel} of {run_url}")
    return network, cfg.diffusion.model_dump(mode="json"), ckpt


def check_classifier_fits(diffusion: dict[str, Any], classifier_diffusion: dict[str, Any]) -> None:
    """The classifier must have been trained on the diffusion model's noise schedule (same t input)."""
    ours = (diffusion["schedule"], diffusion["timesteps"])
    theirs = (classifier_diffusion["schedule"], classifier_diffusion["timesteps"])
    if ours != theirs:
        raise ValueError(f"classifier_run: trained on schedule/timesteps {theirs}, the model on {ours}; "
                         "guidance needs the same noise schedule")


@dataclass(frozen=True)
class CheckpointSampleFn:
    """Picklable builder: each evaluation worker loads one EMA of a checkpoint and samples from it.

    ``classifier`` (optional): ``{"run_url", "checkpoint", "ema_rate"}`` of a noisy-classifier run
    used for classifier guidance at ``settings.classifier_scale``.
    """

    run_url: str
    checkpoint: int
    ema_rate: float | None
    model: dict[str, Any]  # pipeline.config.ModelConfig as a dict
    diffusion: dict[str, Any]  # pipeline.config.DiffusionConfig as a dict
    settings: SamplerSettings
    device: str = "cpu"
    classifier: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_sampler(self.diffusion["objective"], self.settings,
                      has_classifier=self.classifier is not None and bool(self.settings.classifier_scale))

    def __call__(self):
        weights = _load_weights(self.run_url, self.checkpoint, self.ema_rate)
        network = _network_from_weights(weights, self.model, f"checkpoint {self.checkpoint} of {self.run_url}")
        objective = load_ema_objective(weights, self.diffusion)
        classifier = None
        if self.classifier is not None and self.settings.classifier_scale:
            c = self.classifier
            classifier, c_diffusion, _ = load_classifier(c["run_url"], c.get("checkpoint", "latest"),
                                                         c.get("ema_rate"))
            check_classifier_fits(self.diffusion, c_diffusion)
        return make_sample_fn(network, self.settings, device=self.device, diffusion=self.diffusion,
                              objective=objective, classifier=classifier)
