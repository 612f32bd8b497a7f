"""Typed experiment configuration: YAML presets, dotted ``key=value`` overrides, validation.

One ``ExperimentConfig`` with a section per stage (model, diffusion, data, train, eval, export).
Every section forbids unknown keys, so a typo fails fast with the key, the value and what is
allowed. Entry points call :func:`load_config_or_exit`, which exits with status 2 on bad input.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.diffusion.phema import check_sigma_rel
from pipeline.diffusion.registry import (
    DEFAULT_OBJECTIVE,
    DEFAULT_SAMPLER,
    OBJECTIVES,
    SAMPLERS,
    LossType,
    Parameterization,
    Predictor,
    Schedule,
    Variance,
    objective_options,
)

# The choices of diffusion.objective and eval.sampler, generated from the registries.
ObjectiveName = Literal[tuple(OBJECTIVES)]  # type: ignore[valid-type]
SamplerName = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]

__all__ = [
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ExportConfig",
    "InitFrom",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_yaml",
    "load_config",
    "load_config_or_exit",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the key, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    """Which network to build: a preset from ``pipeline.models`` plus field overrides."""

    preset: str = "ddpm_cifar10"
    # Overrides of the preset's fields (base_channels, channel_mult, num_res_blocks, ...);
    # validated by the model registry when the network is built.
    overrides: dict[str, Any] = Field(default_factory=dict)
    checkpoint_activations: bool = False
    channels_last: bool = False


class DiffusionConfig(_Section):
    """The diffusion process and objective (``pipeline.diffusion.OBJECTIVES``).

    The discrete objectives (DDPM family, noisy classifier) take the fields below; the continuous
    ones take ``options``, validated by the objective's own typed options model (unknown keys are
    refused with a did-you-mean). :meth:`objective_options` gives the typed options either way.
    """

    objective: ObjectiveName = DEFAULT_OBJECTIVE
    schedule: Schedule = "linear"
    timesteps: int = Field(1000, ge=2, le=100_000)
    parameterization: Parameterization = "eps"
    variance: Variance = "fixed_large"
    loss: LossType = "simple"
    vlb_weight: float = Field(0.001, ge=0.0)
    importance_sampling: bool = False
    # Fraction of labels replaced by the null class in training (classifier-free guidance).
    label_dropout: float = Field(0.0, ge=0.0, le=1.0)
    # Options of the continuous-time objectives (score SDEs, NCSN, VDM); see the registry.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_objective(self) -> DiffusionConfig:
        spec = OBJECTIVES[self.objective]
        if self.label_dropout > 0 and not spec.label_dropout:
            raise ValueError(
                f"label_dropout: {self.label_dropout!r} is not allowed with objective {self.objective!r} "
                f"({spec.summary}): it must see every true label (label dropout is for classifier-free guidance): "
                "use 0"
            )
        self.objective_options()
        return self

    def objective_options(self) -> Any:
        """The typed options of the objective (ValueError naming the key and what is allowed)."""
        return objective_options(self.objective, self.options, self.model_dump())


class DataConfig(_Section):
    """Where the shards are and how they are decoded."""

    url: str = "runs/data/builtin"
    resolution: int = Field(32, ge=4, le=1024)
    hflip: bool = True
    shuffle_buffer: int = Field(1000, ge=1)
    loader_workers: int = Field(0, ge=0, le=64)
    require_labels: bool = False
    max_corrupt_fraction: float = Field(0.01, ge=0.0, le=1.0)
    s3_endpoint_url: str | None = None
    seed: int = 0
    # Check each shard's sha256 against the manifest while streaming it.
    verify_sha256: bool = True
    # botocore retry policy and timeouts of every S3 call (see pipeline.data.storage.S3Settings).
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    s3_max_attempts: int = Field(5, ge=1, le=20)
    s3_connect_timeout_s: float = Field(10.0, gt=0)
    s3_read_timeout_s: float = Field(60.0, gt=0)
    # How long the reader waits for a DataLoader worker's next batch before failing.
    loader_timeout_s: float = Field(600.0, gt=0)
    # Per-sample vectors each batch carries as a last element {field: (B, d)}, e.g. [clip_img, clip_txt]
    # (CLIP embeddings written by prepare_data --embed clip); empty: none.
    fields: tuple[str, ...] = ()


class PosthocEMAConfig(_Section):
    """Post-hoc EMA (EDM2): power-function EMAs tracked in training, snapshots for choosing the EMA
    length afterwards (``pipeline.posthoc``). ``snapshot_every_images`` 0: off."""

    sigma_rels: tuple[float, ...] = (0.05, 0.10)
    snapshot_every_images: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_sigma_rels(self) -> PosthocEMAConfig:
        if not self.sigma_rels:
            raise ValueError("sigma_rels: [] is not allowed; give at least one relative EMA length")
        for s in self.sigma_rels:
            check_sigma_rel(s, "sigma_rels")
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels: {list(self.sigma_rels)} repeats a value; give distinct values")
        return self


class InitFrom(_Section):
    """Weights a run starts from (fine-tuning): an export folder, or a run directory with a
    checkpoint and EMA rate; loaded by ``pipeline.loading.load_model`` (see pipeline/train/init.py).
    ``train.init_from=PATH`` is short for ``{path: PATH}``."""

    path: str
    checkpoint: Literal["latest"] | int = "latest"  # a run directory's checkpoint (images seen)
    ema_rate: float | None = None  # a run directory's EMA (None: the checkpoint's first)

    @model_validator(mode="after")
    def _check_path(self) -> InitFrom:
        if not self.path.strip():
            raise ValueError("path: '' is not allowed; give an export folder or a run directory")
        return self


class TrainConfig(_Section):
    """Training loop, DeepSpeed engine, EMA, checkpoints and logging."""

    run_dir: str = "runs/quickstart"
    num_workers: int = Field(2, ge=1, le=4096)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, ge=0, le=1.0)  # 0 is allowed: the weights stay as initialised (train.init_from checks)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_images: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    total_images: int = Field(10_000, ge=1)
    ema_rates: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = True
    posthoc_ema: PosthocEMAConfig = Field(default_factory=PosthocEMAConfig)
    checkpoint_every_images: int = Field(5_000, ge=1)
    keep_last: int = Field(3, ge=1)
    keep_every_images: int = Field(0, ge=0)
    # "auto": newest committed checkpoint in run_dir; "never"; or the images seen of one checkpoint.
    resume: Literal["auto", "never"] | int | str = "auto"
    seed: int = 0
    collective_timeout_s: float = Field(600.0, gt=0)
    log_every_images: int = Field(1_000, ge=1)
    sample_every_images: int = Field(0, ge=0)
    max_consecutive_nonfinite: int = Field(10, ge=1)
    # After that many non-finite steps in a row: roll back to the newest committed checkpoint from
    # before the streak began and go on with the data after it, at most this many times per run.
    max_nonfinite_rollbacks: int = Field(2, ge=0)
    max_failures: int = Field(0, ge=0)
    # After SIGTERM/SIGINT to the driver: seconds the workers have to commit a checkpoint at the next
    # step boundary before the driver stops at once (see pipeline/train/preemption.py).
    preemption_grace_s: float = Field(120.0, gt=0)
    ray_address: str | None = None
    # Fine-tuning: initialise the network (and its EMA) from these weights; None: from scratch.
    init_from: InitFrom | None = None

    @field_validator("init_from", mode="before")
    @classmethod
    def _init_from_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_ema(self) -> TrainConfig:
        for rate in self.ema_rates:
            if not 0.0 < rate < 1.0:
                raise ValueError(f"ema_rates: {rate!r} is not allowed; each rate must lie in (0, 1)")
        return self


class EvalConfig(_Section):
    """Sampling for metrics and the metrics themselves."""

    num_samples: int = Field(50_000, ge=1)
    batch_size: int = Field(64, ge=1)
    sampler: SamplerName = DEFAULT_SAMPLER
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0.0)
    # Guidance: classifier-free weight w (Ho & Salimans eq. 6; 0 = conditional model) and classifier
    # guidance (ADM; 'ddpm'/'ddim' of the discrete objective) with the EMA of a noisy-classifier run.
    guidance_scale: float = Field(0.0, ge=0.0)
    classifier_scale: float = Field(0.0, ge=0.0)
    classifier_run: str | None = None  # run directory of a training run with diffusion.objective=classifier
    classifier_checkpoint: Literal["latest"] | int = "latest"
    classifier_ema_rate: float | None = None  # None: the classifier checkpoint's first EMA rate
    class_label: int | None = Field(None, ge=0)  # None: each sample's label is drawn from its seed
    # Cascade (ADM-U): every sample is upsampled by a super-resolution model (a run directory with
    # upsampler_checkpoint / upsampler_ema_rate, or an export folder); metrics at its resolution.
    upsampler_run: str | None = None
    upsampler_checkpoint: Literal["latest"] | int = "latest"
    upsampler_ema_rate: float | None = None  # None: the checkpoint's first EMA rate
    upsampler_sampler: SamplerName | None = None  # None: its objective's default sampler
    upsampler_steps: int = Field(50, ge=1)
    upsampler_noise_level: float | None = Field(None, ge=0.0, lt=1.0)  # None: the model's sample_noise_level
    # unCLIP (DALL-E 2): with prior_run, a decoder run is sampled from prompts (caption -> CLIP text
    # embedding -> prior -> image embedding -> decoder); sample i takes prompt i mod K of the captions of
    # prompts_url. 'clip_score': mean cosine of each image's CLIP embedding with its prompt's.
    prior_run: str | None = None  # run directory (prior_checkpoint, its first EMA) or export folder
    prior_checkpoint: Literal["latest"] | int = "latest"
    prior_steps: int = Field(64, ge=1)
    prior_guidance_scale: float = Field(0.0, ge=0.0)
    clip_model: str | None = None  # the embedder of the data (dataset.json 'embedder'), e.g. shapes-tiny
    clip_weights: str | None = None  # its local (or s3://) weights file
    prompts_url: str | None = None  # a dataset with captions; None: reference_url, else data.url
    prompts_max: int = Field(1000, ge=1)  # the non-empty captions of the first prompts_max samples
    # Continuous-time samplers: 'pc' Langevin corrector signal-to-noise ratio and steps (Song et al.
    # 2021: 0.16 and 1 for CIFAR-10), 'ode' solver tolerance, 'langevin' step size (NCSN eps).
    snr: float = Field(0.16, gt=0)
    corrector_steps: int = Field(1, ge=0)  # 0: predictor only
    predictor: Predictor = "reverse_diffusion"  # of the predictor-corrector sampler
    ode_tol: float = Field(1e-5, gt=0)
    langevin_step_lr: float = Field(2e-5, gt=0)
    seed: int = 0
    num_workers: int = Field(1, ge=1)
    metrics: tuple[Literal["fid", "sfid", "is", "pr", "kid", "fd_dinov2", "bpd", "probe", "clip_score"], ...] = (
        "fid", "sfid", "is", "pr", "kid")
    feature_extractor: str = "inception-v3-compat"
    inception_weights: str | None = None
    ema_rate: float | None = None
    # Where the samples go and how the work is split (see evaluation/sampling.py).
    name: str | None = None  # folder under <run>/eval/<checkpoint>/; None: derived from the settings
    samples_per_shard: int = Field(1000, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    write_npz: bool = False  # also write samples.npz in the openai reference-batch format
    worker_timeout_s: float = Field(3600.0, gt=0)
    # Metrics (torch-fidelity's defaults) and the reference set.
    pr_k: int = Field(3, ge=1)
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    is_splits: int = Field(10, ge=1)
    dinov2_weights: str | None = None  # local DINOv2 ViT-L/14 file (timm or torch hub layout) for fd_dinov2
    # Percentile bootstrap over the generated samples (evaluation/bootstrap.py); 0 resamples: no intervals.
    bootstrap_resamples: int = Field(100, ge=0)
    bootstrap_level: float = Field(0.95, gt=0, lt=1)
    bootstrap_seed: int = 0
    bootstrap_kid_subsets: int = Field(10, ge=1)  # KID subsets per resample (the estimate uses kid_subsets)
    reference_url: str | None = None  # dataset for reference statistics; None: data.url
    reference_max_images: int | None = Field(None, ge=2)
    reference_cache: str | None = None  # None: ~/.cache/diffusion-pipeline/reference-stats
    download_weights: bool = True
    download_timeout_s: float = Field(60.0, gt=0)
    # Bits/dim: full-chain VLB over held-out shards.
    bpd_url: str | None = None  # None: data.url
    bpd_max_images: int = Field(1000, ge=1)
    # Linear probe of a representation model's encoder (evaluation/probe.py): labelled held-out data.
    probe_url: str | None = None  # None: data.url
    probe_max_images: int = Field(2000, ge=4)
    probe_test_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # diffusion time t in [0, 1] at which a time-dependent encoder E_phi(x0, t) is probed (ignored otherwise)
    probe_t: float = Field(0.5, ge=0.0, le=1.0)
    # Scheduled evaluation.
    poll_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _check_clip_score(self) -> EvalConfig:
        if "clip_score" in self.metrics and not self.prior_run:
            raise ValueError("metrics: clip_score needs eval.prior_run (--prior-run): the images of a unCLIP decoder "
                             "drawn from prompts through its prior")
        return self


class ExportConfig(_Section):
    ema_rate: float | None = None
    format: Literal["native", "diffusers"] = "native"


class ExperimentConfig(_Section):
    name: str = "experiment"
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()


# ---------------------------------------------------------------------------------------------
# Loading, overrides, errors


def _allowed_keys(section: type[BaseModel]) -> list[str]:
    return sorted(section.model_fields)


def _section_at(path: list[str]) -> type[BaseModel] | None:
    """The pydantic class that owns the dotted ``path`` (None for free-form dict fields)."""
    cls: type[BaseModel] = ExperimentConfig
    for part in path:
        field = cls.model_fields.get(part)
        if field is None:
            return cls
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        else:
            return None
    return cls


def _format_validation_error(err: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        key = ".".join(loc) or "<root>"
        if item["type"] == "extra_forbidden":
            owner = _section_at(loc[:-1])
            allowed = _allowed_keys(owner) if owner else []
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            lines.append(f"unknown key '{key}'{extra}; allowed keys here: {', '.join(allowed)}")
        elif item["type"] == "value_error":  # a validator's own message names the key and what is allowed
            lines.append(f"{key}: {item['msg'].removeprefix('Value error, ')}")
        else:
            value = item.get("input")
            lines.append(f"{key}: value {value!r} is not allowed: {item['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override key '{key}' is malformed; expected dotted names like train.lr")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings to a raw config tree; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=2e-4)")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{key}': value {text!r} is not valid YAML: {exc}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def build_config(tree: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, tree)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML preset (or the defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded or {}
    return build_config(apply_overrides(tree, list(overrides)))


def load_config_or_exit(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """:func:`load_config` for entry points: print the error and exit with status 2."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, exactly what ran (round-trips through :func:`load_config`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
