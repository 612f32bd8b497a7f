"""Convert openai's released guided-diffusion / improved-diffusion checkpoints to a native export folder.

    from pipeline.convert import convert_checkpoint

    convert_checkpoint("guided-diffusion", "64x64_diffusion.pt", MODEL_FLAGS, "exports/adm64")

``MODEL_FLAGS`` is the flag string of the source's README (``--image_size 64 --num_channels 192
...``, the diffusion flags included). It is parsed with the source's own defaults into this
project's network config (:class:`~pipeline.models.UNetConfig` / :class:`~pipeline.models.ClassifierConfig`)
and diffusion config; the state dict (read with ``torch.load(weights_only=True)``: no code runs)
is renamed and re-laid-out key by key, and the folder written holds ``model.safetensors``,
``config.json`` and a model card, loadable with :func:`pipeline.loading.load_model`,
``launch/sample.py`` and ``train.init_from``.

What differs between the layouts (read from openai's ``unet.py``, ``script_util.py`` and
``gaussian_diffusion.py``; no code of theirs is used):

- attention ``qkv`` and ``proj_out`` are 1x1 ``Conv1d`` there (weight ``(3C, C, 1)``), ``Linear``
  here (``(3C, C)``). Their "legacy" order (``use_new_attention_order False``, and every
  improved-diffusion model) splits heads before q/k/v: output channel ``h*3d + s*d + j``; ours
  and their "new" order put q/k/v first: ``s*C + h*d + j``.
- their class embedding has ``num_classes`` rows; ours has one more, the null class of
  classifier-free guidance, which a released model never trained: it is written as zeros (no
  class contribution) and the model card says so.
- the classifier's attention pool has a ``(C, L+1)`` positional embedding and one ``qkv_proj``;
  ours is ``(L+1, C)`` with separate ``q`` and ``kv`` projections.
- improved-diffusion feeds the network ``t * 1000 / T`` (``rescale_timesteps``): recorded as the
  network's ``timestep_scale``.
- ``learn_sigma`` doubles the output channels (prediction, then the variance interpolation v in
  [-1, 1], Improved DDPM eq. 15): ``learn_sigma`` + ``diffusion.variance = learned_range``.

Every mismatch (missing, unexpected or mis-shaped key; flags this network cannot express) is a
ValueError naming what is wrong and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import DiffusionConfig
from pipeline.diffusion.registry import DEFAULT_OBJECTIVE, OBJECTIVES
from pipeline.models import ClassifierConfig, UNetConfig, build_network
from pipeline.models.layers import AttentionBlock, AttentionPool2d, Downsample, ResBlock, Upsample
from pipeline.pretrained import CONFIG_FILE, EXPORT_FORMAT, FORMAT_VERSION, WEIGHTS_FILE, model_config_dict

__all__ = [
    "SOURCES",
    "ConvertResult",
    "KeyMap",
    "convert_checkpoint",
    "convert_state_dict",
    "diffusion_config",
    "key_map",
    "network_config",
    "parse_flags",
    "read_openai_checkpoint",
    "to_openai_state_dict",
]

log = logging.getLogger(__name__)

SOURCES = ("guided-diffusion", "improved-diffusion", "guided-diffusion-classifier")
CARD_FILE = "README.md"
NUM_CLASSES = 1000  # both codebases' class-conditional models are ImageNet's

# ---------------------------------------------------------------------------------------------
# Flags: the sources' argparse names and defaults (script_util.py)


def _str2bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use True or False")


_DIFFUSION_FLAGS: dict[str, Any] = dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear",
                                        timestep_respacing="", use_kl=False, predict_xstart=False,
                                        rescale_timesteps=False, rescale_learned_sigmas=False, sigma_small=False)
_MODEL_FLAGS: dict[str, Any] = dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
                                    num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="16,8",
                                    channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
                                    use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
                                    use_new_attention_order=False, large_size=0, small_size=0)
_CLASSIFIER_FLAGS: dict[str, Any] = dict(image_size=64, classifier_use_fp16=False, classifier_width=128,
                                         classifier_depth=2, classifier_attention_resolutions="32,16,8",
                                         classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                                         classifier_pool="attention")
# improved-diffusion: no head width, BigGAN resampling, channel_mult or new attention order; its
# timesteps are rescaled to [0, 1000) and its learned-sigma loss is the rescaled hybrid by default.
_IMPROVED_ABSENT = ("num_head_channels", "resblock_updown", "channel_mult", "use_new_attention_order")
_IMPROVED_DEFAULTS = dict(rescale_timesteps=True, rescale_learned_sigmas=True)
# Sampling and training flags of the same READMEs: accepted (a whole README line can be pasted),
# with no effect on the weights.
_IGNORED_FLAGS = {"batch_size": str, "num_samples": str, "use_ddim": str, "clip_denoised": str, "model_path": str,
                  "classifier_path": str, "classifier_scale": str, "lr": str, "weight_decay": str, "iterations": str,
                  "anneal_lr": str, "save_interval": str, "microbatch": str, "ema_rate": str, "log_interval": str,
                  "lr_anneal_steps": str, "schedule_sampler": str, "noised": str, "eval_interval": str,
                  "data_dir": str, "val_data_dir": str, "resume_checkpoint": str, "fp16_scale_growth": str}


def _defaults(source: str) -> dict[str, Any]:
    if source == "guided-diffusion-classifier":
        return {**_CLASSIFIER_FLAGS, **_DIFFUSION_FLAGS}
    flags = {**_MODEL_FLAGS, **_DIFFUSION_FLAGS}
    if source == "improved-diffusion":
        for name in _IMPROVED_ABSENT:
            flags.pop(name)
        flags.update(_IMPROVED_DEFAULTS)
    return flags


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"--from: {source!r} is not allowed; use one of {', '.join(SOURCES)}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit; the caller decides
        raise ValueError(message)


def parse_flags(source: str, flags: str | list[str]) -> dict[str, Any]:
    """The source's flag values (its defaults, then ``flags``); unknown flags and bad values are refused."""
    _check_source(source)
    argv = shlex.split(flags) if isinstance(flags, str) else list(flags)
    defaults = _defaults(source)
    parser = _Parser(prog=f"--flags ({source})", add_help=False, allow_abbrev=False)
    for name, value in defaults.items():
        kind = _str2bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name}", default=value, type=kind)
    for name, kind in _IGNORED_FLAGS.items():
        parser.add_argument(f"--{name}", type=kind)
    try:
        parsed, unknown = parser.parse_known_args(argv)
    except ValueError as exc:
        raise ValueError(f"--flags: {exc}") from None
    if unknown:
        raise ValueError(f"--flags: {' '.join(unknown)!r} not allowed for --from {source}; allowed flags: "
                         f"{', '.join('--' + n for n in sorted(defaults))} (and the README's sampling/training "
                         f"flags, which do not change the weights)")
    return {k: v for k, v in vars(parsed).items() if k in defaults}


# ---------------------------------------------------------------------------------------------
# Flags -> this project's configs


def _int_list(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--{name}: {text!r} is not allowed; expected comma-separated integers") from None
    if not values:
        raise ValueError(f"--{name}: {text!r} is not allowed; expected comma-separated integers")
    return values


def _channel_mult(source: str, image_size: int, text: str, *, large: bool = False) -> tuple[int, ...]:
    """The sources' resolution -> channel multipliers (script_util.py ``create_model``)."""
    if text:
        return _int_list("channel_mult", text)
    if large:  # super-resolution models (sr_create_model)
        table = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
    elif source == "improved-diffusion":
        table = {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
    else:
        table = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
    if image_size not in table:
        extra = (" (guided-diffusion's 512 model has a 0.5 multiplier, which this U-Net, whose timestep "
                 "embedding width is tied to the base channels, cannot express)" if image_size == 512 else "")
        raise ValueError(f"--image_size: {image_size} is not allowed for {source}; allowed: "
                         f"{', '.join(map(str, sorted(table)))}{extra}")
    return table[image_size]


def network_config(source: str, flags: dict[str, Any]) -> UNetConfig | ClassifierConfig:
    """The network the flags describe, as this project's config (ValueError if it cannot be expressed)."""
    _check_source(source)
    f = flags
    if source == "guided-diffusion-classifier":
        if f["rescale_timesteps"] and f["diffusion_steps"] != 1000:
            raise ValueError("--rescale_timesteps: True with --diffusion_steps other than 1000 is not allowed for a "
                             "classifier (this classifier embeds the timestep index as is)")
        if f["classifier_pool"] != "attention":
            raise ValueError(f"--classifier_pool: {f['classifier_pool']!r} is not allowed; only 'attention' "
                             "(the released classifiers') is implemented here")
        return ClassifierConfig(
            image_size=f["image_size"], in_channels=3, base_channels=f["classifier_width"],
            channel_mult=_channel_mult(source, f["image_size"], ""), num_res_blocks=f["classifier_depth"],
            attention_resolutions=_int_list("classifier_attention_resolutions", f["classifier_attention_resolutions"]),
            num_heads=1, num_head_channels=64, dropout=0.0,
            use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
            resblock_updown=f["classifier_resblock_updown"], num_classes=NUM_CLASSES)
    super_res = bool(f.get("large_size"))
    if bool(f.get("small_size")) != super_res:
        raise ValueError("--large_size / --small_size: give both (a super-resolution model) or neither")
    image_size = f["large_size"] if super_res else f["image_size"]
    heads, head_channels = f["num_heads"], f.get("num_head_channels", -1)
    if head_channels == -1 and f["num_heads_upsample"] not in (-1, heads):
        raise ValueError(f"--num_heads_upsample: {f['num_heads_upsample']} is not allowed here; this U-Net uses "
                         f"the same head count ({heads}) in every attention layer: use -1")
    steps = f["diffusion_steps"]
    return UNetConfig(
        image_size=image_size, in_channels=3, base_channels=f["num_channels"],
        channel_mult=_channel_mult(source, image_size, f.get("channel_mult", ""), large=super_res),
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=_int_list("attention_resolutions", f["attention_resolutions"]),
        num_heads=heads, num_head_channels=None if head_channels == -1 else head_channels,
        dropout=float(f["dropout"]), use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f.get("resblock_updown", False), learn_sigma=f["learn_sigma"],
        num_classes=NUM_CLASSES if f["class_cond"] else 0, low_res_channels=3 if super_res else 0,
        timestep_scale=1000.0 / steps if f["rescale_timesteps"] else 1.0)


def _classifier_objective() -> str:
    """The registry's noisy-classifier objective (the discrete one with no sampler)."""
    return next(n for n, s in OBJECTIVES.items() if s.discrete and not s.generative)


def diffusion_config(source: str, flags: dict[str, Any]) -> DiffusionConfig:
    """The diffusion process and training loss the flags describe (gaussian_diffusion.py's
    ``create_gaussian_diffusion``): schedule, T, eps/x0, fixed or learned variance, loss."""
    _check_source(source)
    f = flags
    schedule = f["noise_schedule"]
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"--noise_schedule: {schedule!r} is not allowed; use linear or cosine")
    if source == "guided-diffusion-classifier":
        return DiffusionConfig(objective=_classifier_objective(), schedule=schedule, timesteps=f["diffusion_steps"])
    steps = f["diffusion_steps"]
    if f["learn_sigma"]:
        variance = "learned_range"
    else:
        variance = "fixed_small" if f["sigma_small"] else "fixed_large"
    if f["use_kl"]:
        loss, vlb_weight = "vlb", 0.001
    elif f["learn_sigma"]:
        # L_simple + L_t, the L_t term scaled by T/1000 with rescale_learned_sigmas (Improved DDPM
        # sec. 3.1's lambda = 0.001 on L_vlb = T E[L_t]); unscaled otherwise: lambda = 1/T.
        loss, vlb_weight = "hybrid", (0.001 if f["rescale_learned_sigmas"] else 1.0 / steps)
    else:
        loss, vlb_weight = "simple", 0.001
    return DiffusionConfig(objective=DEFAULT_OBJECTIVE, schedule=schedule, timesteps=steps,
                           parameterization="x0" if f["predict_xstart"] else "eps", variance=variance, loss=loss,
                           vlb_weight=vlb_weight)


# ---------------------------------------------------------------------------------------------
# State-dict layouts


def _conv1x1_to_linear(w: torch.Tensor) -> torch.Tensor:
    return w[..., 0] if w.ndim == 3 else w


def _linear_to_conv1x1(w: torch.Tensor) -> torch.Tensor:
    return w[..., None] if w.ndim == 2 else w


def _heads_first_to_qkv_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ``h*3d + s*d + j`` (their legacy order) -> ``s*C + h*d + j`` (ours)."""
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, d, *rest).transpose(0, 1).reshape(t.shape)


def _qkv_first_to_heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    return t.reshape(3, heads, d, *rest).transpose(0, 1).reshape(t.shape)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class KeyMap:
    """One tensor of theirs <-> one or more of ours: ``split`` theirs -> ours (in order), ``join`` back."""

    theirs: str
    ours: tuple[str, ...]
    split: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    join: Callable[..., torch.Tensor]


def _one(theirs: str, ours: str, to_ours: Callable = _identity, to_theirs: Callable = _identity) -> KeyMap:
    return KeyMap(theirs, (ours,), lambda t: (to_ours(t),), lambda t: to_theirs(t))


def _param_names(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False)]


def key_map(net: torch.nn.Module, *, new_attention_order: bool = False) -> list[KeyMap]:
    """The exact correspondence between ``net``'s state dict and an openai state dict of the same
    network (``net``: a UNet or NoisyClassifier of this project, on any device, meta included)."""
    maps: list[KeyMap] = []
    claimed: set[str] = set()

    def claim(prefix: str, names: list[str]) -> None:
        claimed.update(f"{prefix}{n}" for n in names)

    for name, mod in net.named_modules():
        p = f"{name}." if name else ""
        if isinstance(mod, ResBlock):
            for ours, theirs in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("emb_proj", "emb_layers.1"),
                                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("skip", "skip_connection")):
                for pname in _param_names(getattr(mod, ours)):
                    maps.append(_one(f"{p}{theirs}.{pname}", f"{p}{ours}.{pname}"))
                    claim(p, [f"{ours}.{pname}"])
        elif isinstance(mod, AttentionBlock):
            if mod.context_kv is not None:
                raise ValueError(f"{name}: attention with context tokens has no counterpart in openai's networks")
            heads = mod.heads
            for pname in ("weight", "bias"):
                maps.append(_one(f"{p}norm.{pname}", f"{p}norm.{pname}"))
                if new_attention_order:
                    maps.append(_one(f"{p}qkv.{pname}", f"{p}qkv.{pname}", _conv1x1_to_linear, _linear_to_conv1x1))
                else:
                    maps.append(_one(f"{p}qkv.{pname}", f"{p}qkv.{pname}",
                                     lambda t, h=heads: _heads_first_to_qkv_first(_conv1x1_to_linear(t), h),
                                     lambda t, h=heads: _linear_to_conv1x1(_qkv_first_to_heads_first(t, h))))
                maps.append(_one(f"{p}proj_out.{pname}", f"{p}proj_out.{pname}", _conv1x1_to_linear,
                                 _linear_to_conv1x1))
                claim(p, [f"norm.{pname}", f"qkv.{pname}", f"proj_out.{pname}"])
        elif isinstance(mod, Downsample) and mod.conv is not None:
            for pname in ("weight", "bias"):
                maps.append(_one(f"{p}op.{pname}", f"{p}conv.{pname}"))
                claim(p, [f"conv.{pname}"])
        elif isinstance(mod, Upsample) and mod.conv is not None:
            for pname in ("weight", "bias"):
                maps.append(_one(f"{p}conv.{pname}", f"{p}conv.{pname}"))
                claim(p, [f"conv.{pname}"])
        elif isinstance(mod, AttentionPool2d):
            # out = [GroupNorm, SiLU, AttentionPool2d]; qkv_proj is q/k/v-first (their QKVAttention)
            t = "out.2."
            maps.append(_one(f"{t}positional_embedding", f"{p}positional_embedding", lambda x: x.t().contiguous(),
                             lambda x: x.t().contiguous()))
            for pname in ("weight", "bias"):
                maps.append(KeyMap(f"{t}qkv_proj.{pname}", (f"{p}q.{pname}", f"{p}kv.{pname}"),
                                   lambda x: tuple(_conv1x1_to_linear(x).split([x.shape[0] // 3, 2 * x.shape[0] // 3])),
                                   lambda q, kv: _linear_to_conv1x1(torch.cat([q, kv]))))
                maps.append(_one(f"{t}c_proj.{pname}", f"{p}proj_out.{pname}", _conv1x1_to_linear,
                                 _linear_to_conv1x1))
                claim(p, [f"q.{pname}", f"kv.{pname}", f"proj_out.{pname}"])
            claim(p, ["positional_embedding"])
    top = {"out_norm": "out.0", "out_conv": "out.2"}
    for key in net.state_dict():
        if key in claimed:
            continue
        if key == "label_embed.weight":
            # theirs: num_classes rows; ours: + the null class, which they never trained (zeros: no class term)
            maps.append(_one("label_emb.weight", key, lambda t: torch.cat([t, t.new_zeros(1, t.shape[1])]),
                             lambda t: t[:-1]))
            continue
        head, _, rest = key.partition(".")
        if head in top:
            maps.append(_one(f"{top[head]}.{rest}", key))
        elif head in ("time_embed", "input_blocks", "middle_block", "output_blocks"):
            maps.append(_one(key, key))  # the input convolution, the time MLP: same names and shapes
        else:
            raise ValueError(f"{key}: this network has a part with no counterpart in openai's networks")
    return maps


def _structure(config: UNetConfig | ClassifierConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return build_network(config)


def _check_keys(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    if extra:
        problems.append(f"unexpected key(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} ({len(extra)} in all)")
    if wrong:
        shown = [f"{k}: {tuple(getattr(state[k], 'shape', ()))} (expected {expected[k]})" for k in wrong[:8]]
        problems.append(f"mis-shaped key(s) {shown}")
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}; check --flags (they must be the ones the checkpoint "
                         "was trained with)")


def _their_shapes(maps: list[KeyMap], ours: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {m.theirs: tuple(m.join(*(ours[k] for k in m.ours)).shape) for m in maps}


def convert_state_dict(state: dict[str, torch.Tensor], config: UNetConfig | ClassifierConfig, *,
                       new_attention_order: bool = False, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An openai state dict of the network ``config`` describes -> this project's state dict (fp32).
    Missing, unexpected and mis-shaped keys are refused, each named."""
    net = _structure(config)
    ours_meta = net.state_dict()
    maps = key_map(net, new_attention_order=new_attention_order)
    _check_keys(state, _their_shapes(maps, ours_meta), what)
    out: dict[str, torch.Tensor] = {}
    for m in maps:
        for key, tensor in zip(m.ours, m.split(state[m.theirs].detach().to(torch.float32)), strict=True):
            out[key] = tensor.contiguous().clone()
    _check_keys(out, {k: tuple(v.shape) for k, v in ours_meta.items()}, f"{what} (converted)")
    return out


def to_openai_state_dict(state: dict[str, torch.Tensor], config: UNetConfig | ClassifierConfig, *,
                         new_attention_order: bool = False) -> dict[str, torch.Tensor]:
    """The inverse: this project's state dict -> openai's key names and layouts (the null class row,
    which they do not have, is dropped)."""
    net = _structure(config)
    maps = key_map(net, new_attention_order=new_attention_order)
    _check_keys(state, {k: tuple(v.shape) for k, v in net.state_dict().items()}, "state dict")
    return {m.theirs: m.join(*(state[k] for k in m.ours)).contiguous().clone() for m in maps}


def read_openai_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A released ``.pt`` state dict, read with ``torch.load(weights_only=True)`` (a pickle that
    would run code or build objects other than tensors is refused)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--checkpoint: {str(path)!r} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, zip errors, ...: all mean "not a plain state dict"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--checkpoint: {str(path)!r} is refused: torch.load(weights_only=True) cannot read it as "
                         f"a plain state dict of tensors ({type(exc).__name__}: {first[:300]}); only released "
                         "state-dict files are accepted, never pickles that run code") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"--checkpoint: {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------
# Writing the export


@dataclass(frozen=True)
class ConvertResult:
    path: str
    source: str
    num_parameters: int
    files: tuple[str, ...]


def _sampling(flags: dict[str, Any], objective: str) -> dict[str, Any]:
    """Default sampler settings: the objective's default sampler, with the step count of
    ``--timestep_respacing`` (``250``, ``ddim25``) when given, else 250."""
    spec = OBJECTIVES[objective]
    if not spec.generative:
        return {}
    match = re.fullmatch(r"(?:ddim)?(\d+)", str(flags.get("timestep_respacing") or ""))
    return {"sampler": spec.default_sampler, "steps": int(match.group(1)) if match else 250, "eta": 0.0}


def _card(doc: dict[str, Any]) -> str:
    model, diff, src = doc["model"], doc["diffusion"], doc["source"]
    conditional = doc["num_classes"]
    lines = [
        f"# {Path(src['checkpoint']).name}: converted from openai/{src['from'].removesuffix('-classifier')}",
        "",
        (f"A {doc['resolution']}x{doc['resolution']} "
         f"{'diffusion model' if model.get('architecture') == 'unet' else 'noisy classifier'} "
         f"({'class-conditional, ' + str(conditional) + ' classes' if conditional else 'unconditional'}"
         f"{', super-resolution from a low-resolution image' if model.get('low_res_channels') else ''}), "
         "converted from a released checkpoint to this project's native format (model.safetensors + config.json)."),
        "",
        "## Model",
        "",
        "| field | value |",
        "|---|---|",
        f"| network | {model.get('architecture')}, {doc['weights']['num_parameters']:,} parameters, fp32 |",
        (f"| channels | base {model.get('base_channels')}, multipliers {model.get('channel_mult')}, "
         f"{model.get('num_res_blocks')} residual blocks per level, attention at {model.get('attention_resolutions')} |"),
        (f"| diffusion | objective `{diff['objective']}`, `{diff['schedule']}` schedule, T = {diff['timesteps']}, "
         f"predicts `{diff['parameterization']}`, variance `{diff['variance']}` |"),
    ]
    if model.get("architecture") == "unet" and conditional:
        lines.append(f"| null class (guidance) | {conditional}: NOT trained (the source has no null class; its "
                     "embedding row is zeros). Classifier-free guidance needs fine-tuning with "
                     "diffusion.label_dropout > 0 first |")
    if model.get("timestep_scale", 1.0) != 1.0:
        lines.append(f"| timestep scale | {model['timestep_scale']:g} (the source's rescale_timesteps) |")
    lines += [
        "",
        "## Provenance",
        "",
        "| field | value |",
        "|---|---|",
        f"| converted from | {src['from']} |",
        f"| checkpoint | `{src['checkpoint']}` |",
        f"| checkpoint sha256 | `{src['checkpoint_sha256']}` |",
        f"| flags | `{src['flags']}` |",
        f"| weights sha256 | `{doc['weights']['sha256']}` |",
        f"| created | {doc['created_utc']} |",
        "",
        "No evaluation was run by this conversion; the source's published numbers are not reproduced here.",
        "",
        "## Use",
        "",
        "```bash",
        "python launch/sample.py --model path/to/this/folder --num 16 --out grid.png",
        "python launch/train.py --config CONFIG train.init_from=path/to/this/folder  # fine-tune",
        "```",
        "",
        "## Made by",
        "",
        "```bash",
        doc["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def convert_checkpoint(source: str, checkpoint: str | Path, flags: str | list[str], out: str | Path, *,
                       overwrite: bool = False, command: str | None = None) -> ConvertResult:
    """Convert one released checkpoint to a native export folder at ``out`` (written atomically)."""
    from safetensors.torch import save_file

    from pipeline.export import _publish, _staging_dir
    from pipeline.train.rundir import sha256_file

    _check_source(source)
    parsed = parse_flags(source, flags)
    try:
        config = network_config(source, parsed)
        diffusion = diffusion_config(source, parsed)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--flags: {exc}") from None
    out = str(out)
    dest = Path(out).expanduser()
    if dest.exists() and not overwrite:
        raise ValueError(f"--out: {out!r} exists; pass --overwrite to replace it")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / CONFIG_FILE).is_file():
        raise ValueError(f"--out: {out!r} is a non-empty folder that holds no export; refusing to replace it")
    state = read_openai_checkpoint(checkpoint)
    converted = convert_state_dict(state, config, new_attention_order=bool(parsed.get("use_new_attention_order")),
                                   what=f"--checkpoint {Path(checkpoint).name}")
    flag_text = flags if isinstance(flags, str) else shlex.join(flags)
    staging = _staging_dir(out)
    try:
        save_file(converted, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "export_format": EXPORT_FORMAT})
        net_cfg = model_config_dict(config)
        num_classes = int(net_cfg.get("num_classes", 0) or 0)
        doc = {
            "format": EXPORT_FORMAT,
            "format_version": FORMAT_VERSION,
            "model": net_cfg,
            "diffusion": diffusion.model_dump(mode="json"),
            "resolution": int(config.image_size),
            "in_channels": int(config.in_channels),
            "num_classes": num_classes,
            "class_names": None,
            "sampling": _sampling(parsed, diffusion.objective),
            "source": {"kind": "converted", "from": source, "checkpoint": str(checkpoint),
                       "checkpoint_sha256": sha256_file(Path(checkpoint)), "flags": flag_text,
                       "flags_resolved": parsed, "null_class_trained": False if num_classes else None},
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(staging / WEIGHTS_FILE),
                        "bytes": (staging / WEIGHTS_FILE).stat().st_size, "dtype": "float32",
                        "num_parameters": int(sum(t.numel() for t in converted.values()))},
            "command": command or (f"pipeline.convert.convert_checkpoint({source!r}, {str(checkpoint)!r}, "
                                   f"{flag_text!r}, {out!r})"),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        (staging / CARD_FILE).write_text(_card(doc))
        files = tuple(sorted(p.name for p in staging.iterdir() if p.is_file()))
        _publish(staging, out, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s (%s) to %s", checkpoint, source, out)
    return ConvertResult(out, source, doc["weights"]["num_parameters"], files)
