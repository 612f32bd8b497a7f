"""A ``sample_fn(indices, seeds) -> uint8 images`` from a model and sampler settings.

The samplers that fit each objective come from the registry (``pipeline.diffusion.OBJECTIVES`` /
``SAMPLERS``; ``registry.describe_samplers()`` lists them) and are all driven through its one
entry, ``pipeline.diffusion.registry.sample``, the same one ``launch/sample.py`` and the training-time
grid use. The network's conditioning input follows the objective (VP/sub-VP: 999 t; VE/NCSN:
log sigma; VDM: rescaled gamma; DDPM: the original timestep), adapted once by the registry's views.

Labels and guidance: a class-conditional model gets one label per sample, fixed
(``class_label``) or drawn from the sample's own seed. ``guidance_scale`` w applies classifier-free
guidance (Ho & Salimans eq. 6: (1 + w) eps(x, y) - w eps(x, null), null class = num_classes;
w = 0 is the conditional model). A noisy ``classifier`` with ``classifier_scale`` s > 0 guides the
discrete ancestral and DDIM samplers (ADM Algorithms 1-2).

Seeds: every noise tensor (the initial draw included) comes from the sample's seed
(``noise_from_seeds``), so image ``i`` depends on its seed only, not on the batch it was drawn in.
One exception: the adaptive ODE sampler chooses its steps for the whole batch, so a sample matches
its batch-of-one self only to the solver's tolerance (``SamplerSpec.batch_exact``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import DiffusionConfig
from pipeline.diffusion import registry
from pipeline.loading import from_weights, network_from_state, network_state_dict, objective_state_dict
from pipeline.pretrained import objective_from_state

__all__ = [
    "OBJECTIVE_SAMPLERS",
    "SAMPLERS",
    "CheckpointSampleFn",
    "ModelSampleFn",
    "SamplerSettings",
    "check_sampler",
    "labels_from_seeds",
    "load_classifier",
    "load_ema_model",
    "load_ema_objective",
    "make_sample_fn",
    "to_uint8",
]

SAMPLERS = tuple(registry.SAMPLERS)
# the image-generating objectives and their samplers (the unCLIP prior generates embeddings: evaluation/unclip.py)
OBJECTIVE_SAMPLERS: dict[str, tuple[str, ...]] = {name: registry.samplers_for(name)
                                                  for name, spec in registry.OBJECTIVES.items()
                                                  if spec.generative and spec.images}
PREDICTORS = tuple(registry.PCOptions.model_fields["predictor"].annotation.__args__)


@dataclass(frozen=True)
class SamplerSettings:
    """How samples are drawn; recorded in metrics.json.

    ``sampler``: a name of the registry; ``steps``: its steps (respaced steps of the discrete
    samplers, noise levels of the sigma-space ones, steps per level of annealed Langevin; ignored by
    the adaptive ODE). The other fields are the union of the samplers' typed options (see the
    registry's option models: each sampler takes the fields its model declares).
    """

    sampler: str = registry.DEFAULT_SAMPLER
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
    resample: int = 1

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
        registry.sampler_options(self.sampler, self.as_dict())  # the sampler's own typed options

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [-1, 1] on ``device``, as training reads images
    (the inverse of :func:`to_uint8` on its levels)."""
    return torch.tensor(np.asarray(images), device=device).permute(0, 3, 1, 2).float() / 127.5 - 1


def labels_from_seeds(seeds: np.ndarray, num_classes: int) -> np.ndarray:
    """One uniform class label per sample, from its seed alone."""
    return np.array([np.random.default_rng([int(s), 1]).integers(num_classes) for s in seeds], dtype=np.int64)


def _diffusion(diffusion: Any) -> DiffusionConfig:
    if isinstance(diffusion, DiffusionConfig):
        return diffusion
    return DiffusionConfig.model_validate(dict(diffusion))


def check_sampler(objective: str, settings: SamplerSettings, *, has_classifier: bool = False,
                  options: Any = None) -> None:
    """ValueError unless ``settings`` fit a model trained with ``objective`` (and its ``options``, typed or
    the ``diffusion.options`` mapping, where they choose the sampling family)."""
    spec = registry.objective_spec(objective)
    if spec.generative and not spec.images:
        raise ValueError(f"objective: {objective!r} generates embeddings, not images; it has no image samples or image "
                         "metrics (sample it in its chain: launch/sample.py --prior with a decoder)")
    if spec.generative and settings.classifier_scale and not has_classifier:
        raise ValueError(f"classifier_scale: {settings.classifier_scale} needs a noisy classifier "
                         "(eval.classifier_run / --classifier-run)")
    registry.check_sampler_fits(objective, settings.sampler,
                                classifier=bool(has_classifier and settings.classifier_scale), options=options)


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

    ``diffusion`` (a DiffusionConfig or its dict) names the objective; without it the model is a
    discrete DDPM-family one described by ``schedule`` ... ``variance``. ``objective``: the
    objective module with its trained parameters (VDM's learned noise schedule); built from the
    options when the objective has none. ``classifier``: a noisy classifier ``classifier(x_t, t) ->
    logits`` for ``classifier_scale``. The model's ``config`` (``image_size``, ``in_channels``,
    ``num_classes``) gives the shape and whether labels are drawn.
    """
    if diffusion is None:
        diffusion = {"objective": registry.DEFAULT_OBJECTIVE, "schedule": schedule, "timesteps": timesteps,
                     "parameterization": parameterization, "variance": variance}
    d = _diffusion(diffusion)
    options = d.objective_options()
    check_sampler(d.objective, settings, has_classifier=classifier is not None, options=options)
    config = model.config
    num_classes = int(getattr(config, "num_classes", 0) or 0)
    if settings.guidance_scale and not num_classes:
        raise ValueError(f"guidance_scale: {settings.guidance_scale} is not allowed for an unconditional model "
                         "(classifier-free guidance needs num_classes > 0 and label dropout in training)")
    label_classes = num_classes or (int(classifier.config.num_classes) if classifier is not None else 0)
    if settings.class_label is not None and not 0 <= settings.class_label < label_classes:
        allowed = f"0..{label_classes - 1}" if label_classes else "none: the model is unconditional"
        raise ValueError(f"class_label: {settings.class_label} is not allowed; classes: {allowed}")
    channels = registry.data_channels(d.objective, options, int(config.in_channels))
    predicted = getattr(config, "prediction_channels", None)
    if predicted is not None and int(predicted) != channels:
        raise ValueError(f"model.prediction_channels: {predicted} is not allowed with in_channels "
                         f"{config.in_channels} and objective {d.objective!r}; expected {channels}")
    shape = (channels, int(config.image_size), int(config.image_size))
    if objective is None:
        objective = objective_from_state(d, {}, f"objective {d.objective!r}")
    model = model.to(device).eval()
    net = model
    if not num_classes:  # labels exist only for the classifier: the network never sees them
        def net(x, t, y=None, _model=model, **cond):
            return _model(x, t, None, **cond)
    view = registry.make_view(d.objective, net, objective.to(device).eval(), options)
    cond_fn = None
    if classifier is not None and settings.classifier_scale:
        from pipeline.diffusion.guidance import classifier_cond_fn

        cond_fn = classifier_cond_fn(classifier.to(device).eval(), settings.classifier_scale)
    opts = registry.sampler_options(settings.sampler, settings.as_dict())

    def draw(shape, seeds, y):
        return registry.sample(view, settings.sampler, shape, seeds, steps=settings.steps, y=y, options=opts,
                               guidance_scale=settings.guidance_scale, null_class=num_classes, cond_fn=cond_fn,
                               device=device)

    return ModelSampleFn(draw, shape, label_classes, settings.class_label, device,
                         registry.steps_used(d.objective, options, settings.sampler, settings.steps))

class ModelSampleFn:
    """``sample_fn(indices, seeds) -> uint8 images`` (or ``(images, labels)`` for a labelled model);
    :meth:`samples` gives the sampler's float output before quantisation."""

    def __init__(self, draw, shape, label_classes: int, class_label: int | None, device, steps_used: int | None = None):
        self.draw, self.shape, self.device = draw, tuple(shape), device
        self.label_classes, self.class_label = label_classes, class_label
        self.steps_used = steps_used  # the steps the sampler takes: fewer than asked where Karras levels merged

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


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _load_weights(run_url: str, checkpoint: int | str, ema_rate: float | None):
    from pipeline.train.checkpoint import load_ema_weights

    return load_ema_weights(run_url, checkpoint, ema_rate)[0]


def load_ema_model(
    run_url: str, checkpoint: int | str, ema_rate: float | None, model: dict[str, Any]
) -> torch.nn.Module:
    """The network of ``model`` (a ModelConfig dict) with one EMA of a committed checkpoint, in eval mode."""
    weights = _load_weights(run_url, checkpoint, ema_rate)
    return network_from_state(model, network_state_dict(weights), f"checkpoint {checkpoint} of {run_url}")


def load_ema_objective(weights: dict[str, torch.Tensor], diffusion: dict[str, Any]) -> torch.nn.Module | None:
    """The objective module with its learned parameters (``objective.*`` EMA weights; VDM's
    learned schedule), or None when the objective has none."""
    objective = objective_from_state(diffusion, objective_state_dict(weights), "the checkpoint")
    return objective if list(objective.parameters()) else None


def _classifier_objectives() -> str:
    return " or ".join(repr(n) for n, s in registry.OBJECTIVES.items() if not s.generative)


def load_classifier(run_url: str, checkpoint: int | str = "latest", ema_rate: float | None = None):
    """``(classifier, diffusion dict, checkpoint)``: one EMA of a noisy-classifier run."""
    from pipeline.loading import load_checkpoint_model, read_run_config

    try:
        cfg = read_run_config(run_url)
    except ValueError:
        raise ValueError(f"classifier_run: {run_url!r} has no config.yaml; expected a run of objective "
                         f"{_classifier_objectives()}") from None
    if registry.OBJECTIVES[cfg.diffusion.objective].generative:
        raise ValueError(f"classifier_run: {run_url!r} trained objective {cfg.diffusion.objective!r}; "
                         f"allowed: a run of objective {_classifier_objectives()}")
    loaded = load_checkpoint_model(run_url, checkpoint, ema_rate, config=cfg)
    return loaded.network, cfg.diffusion.model_dump(mode="json"), loaded.extras["checkpoint"]


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
    used for classifier guidance at ``settings.classifier_scale``. ``posthoc_sigma`` (optional): use
    the post-hoc EMA of that relative length at ``checkpoint`` images instead of a checkpoint's EMA
    (each worker reconstructs it from the run's snapshots, :func:`pipeline.posthoc.reconstruct`).
    """

    run_url: str
    checkpoint: int
    ema_rate: float | None
    model: dict[str, Any]  # pipeline.config.ModelConfig as a dict
    diffusion: dict[str, Any]  # pipeline.config.DiffusionConfig as a dict
    settings: SamplerSettings
    device: str = "cpu"
    classifier: dict[str, Any] | None = None
    posthoc_sigma: float | None = None

    def __post_init__(self) -> None:
        check_sampler(self.diffusion["objective"], self.settings,
                      has_classifier=self.classifier is not None and bool(self.settings.classifier_scale),
                      options=self.diffusion.get("options"))

    def __call__(self):
        if self.posthoc_sigma is not None:
            from pipeline.posthoc import reconstruct

            weights = reconstruct(self.run_url, self.posthoc_sigma, self.checkpoint)
            where = f"post-hoc EMA {self.posthoc_sigma:g} at {self.checkpoint} images of {self.run_url}"
        else:
            weights = _load_weights(self.run_url, self.checkpoint, self.ema_rate)
            where = f"checkpoint {self.checkpoint} of {self.run_url}"
        network, objective = from_weights(self.model, self.diffusion, weights, where)
        classifier = None
        if self.classifier is not None and self.settings.classifier_scale:
            c = self.classifier
            classifier, c_diffusion, _ = load_classifier(c["run_url"], c.get("checkpoint", "latest"),
                                                         c.get("ema_rate"))
            check_classifier_fits(self.diffusion, c_diffusion)
        return make_sample_fn(network, self.settings, device=self.device, diffusion=self.diffusion,
                              objective=objective, classifier=classifier)
