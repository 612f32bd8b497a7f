"""Elastic resume: restore a checkpoint written by W workers into an engine of W' workers.

Choice: our own re-partitioning of DeepSpeed's per-rank files, not DeepSpeed's universal checkpoint
(``ds_to_universal`` + ``checkpoint.load_universal``). Why:

* the universal format is a second, converted copy of the checkpoint, written by an offline pass
  before the engine starts, and the engine must be built with ``load_universal`` already set; it
  covers DeepSpeed's state only, while the EMA slices, the post-hoc EMA, the data position and the
  RNG streams are ours and need a re-split of their own anyway;
* the per-rank files are simple, and readable with ``torch.load(weights_only=True)`` (the
  converter unpickles with ``weights_only=False``):

  - ZeRO 1-2: per rank and param group one flat fp32 partition
    (``single_partition_of_fp32_groups``) and Adam's ``exp_avg`` / ``exp_avg_sq`` over the same
    range; the concatenation over ranks is the group's parameters flattened in ``param_shapes``
    order (DeepSpeed stores the last partition without its padding; moments keep it);
  - ZeRO-3: every parameter is split into ``ceil(numel / W)`` elements per rank, the rank's
    pieces concatenated in ``param_shapes`` order (``fp32_flat_groups``; moments alike); this is
    the layout of our EMA slices too (:mod:`pipeline.train.ema`);
  - ZeRO 0: one file with the full model and optimizer, which DeepSpeed loads at any world size.

How: every new rank reads all W optimizer files and assembles, per parameter, the full fp32
weight, ``exp_avg`` and ``exp_avg_sq`` (:func:`full_optimizer_state`, pure); then writes its own
part into the live engine through DeepSpeed's fragment API (``safe_set_full_*`` for ZeRO 1-2,
whose fragment map knows the new layout; ``safe_set_local_*`` for ZeRO-3) and sets the working
(bit16 or partitioned) weights from the same fp32 values, as DeepSpeed's optimizer step does.
Adam's step count and the hyper-parameters come from the files; the loss scaler, overflow flag
and clipping from rank 0's optimizer file through DeepSpeed's own ``_load_global_state``
(every rank holds the same scaler: overflow is all-reduced); the LR schedule and DeepSpeed's
step counters from the model-states file. Memory: every new rank briefly holds the full fp32
weights and both moments in CPU memory (12 bytes per parameter).
"""

from __future__ import annotations

import glob
import math
import os
import re
from typing import Any

import torch

from pipeline.train.ema import partition_size

__all__ = ["MOMENTS", "full_optimizer_state", "load_resharded", "rank_slice", "read_rank_files"]

MOMENTS = ("exp_avg", "exp_avg_sq")
_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def _torch_load(path: str) -> Any:
    from pipeline.train.engine import _deepspeed_state_classes

    with torch.serialization.safe_globals(_deepspeed_state_classes()):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_rank_files(tag_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(model states, [optimizer state dict of rank 0, 1, ...]) of one DeepSpeed checkpoint tag folder."""
    optim = {}
    for path in glob.glob(os.path.join(tag_dir, "*_optim_states.pt")):
        m = _OPTIM.search(os.path.basename(path))
        if m:
            optim[int(m.group(1))] = path
    if sorted(optim) != list(range(len(optim))) or not optim:
        raise ValueError(f"{tag_dir}: ZeRO optimizer files of ranks {sorted(optim)}; expected ranks 0..W-1")
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(model_file):
        model_file = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    model_states = _torch_load(model_file)
    return model_states, [_torch_load(optim[r])["optimizer_state_dict"] for r in range(len(optim))]


def _stage(sd: dict[str, Any]) -> int:
    return int(sd["zero_stage"])


def _group_states(sd: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Base optimizer state per param group (ZeRO 1-2 and ZeRO-3 keep it under different keys)."""
    base = sd["optimizer_state_dict"] if _stage(sd) == 3 else sd["base_optimizer_state"]
    state = base["state"] if isinstance(base, dict) else dict(enumerate(base))
    return {int(k): v for k, v in state.items()}


def full_optimizer_state(param_shapes: list[dict[str, Any]], rank_sds: list[dict[str, Any]]
                         ) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Per parameter name ``{"fp32": full weight, "exp_avg": ..., "exp_avg_sq": ...}`` (fp32, full
    shape) from the ZeRO 1-3 optimizer state dicts of all W ranks, and Adam's step count."""
    world = len(rank_sds)
    stage = _stage(rank_sds[0])
    states = [_group_states(sd) for sd in rank_sds]
    steps = {float(s[g]["step"]) for s in states for g in s}
    if len(steps) != 1:
        raise ValueError(f"ranks disagree on Adam's step count ({sorted(steps)}); the checkpoint is inconsistent")
    step = states[0][min(states[0])]["step"].clone()
    out: dict[str, dict[str, torch.Tensor]] = {}
    if stage in (1, 2):
        for g, shapes in enumerate(param_shapes):
            flat = {"fp32": torch.cat([sd["single_partition_of_fp32_groups"][g].float() for sd in rank_sds])}
            for key in MOMENTS:  # moments keep the last partition's padding: cut to the fp32 length
                flat[key] = torch.cat([s[g][key][:sd["single_partition_of_fp32_groups"][g].numel()].float()
                                       for s, sd in zip(states, rank_sds)])
            # zeros DeepSpeed may insert after a parameter to align the next one (zero_to_fp32 skips them too)
            pads = (rank_sds[0].get("param_alignment_paddings") or [[]] * len(param_shapes))[g]
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                shape = tuple(shape)
                numel = math.prod(shape)
                if offset + numel > flat["fp32"].numel():
                    raise ValueError(f"ZeRO-{stage} files hold {flat['fp32'].numel()} elements in group {g}; "
                                     f"parameter {name} needs {offset + numel}")
                out[name] = {k: v[offset:offset + numel].view(shape).clone() for k, v in flat.items()}
                offset += numel + (int(pads[i]) if i < len(pads) else 0)
        return out, step
    if stage == 3:
        flats = [{"fp32": torch.cat([t.float() for t in sd["fp32_flat_groups"]]),
                  **{k: torch.cat([s[g][k].float() for g in sorted(s)]) for k in MOMENTS}}
                 for s, sd in zip(states, rank_sds)]
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                shape = tuple(shape)
                numel = math.prod(shape)
                part = partition_size(numel, world)
                out[name] = {k: torch.cat([f[k][offset:offset + part] for f in flats])[:numel].view(shape).clone()
                             for k in flats[0]}
                offset += part
        return out, step
    raise ValueError(f"zero_stage {stage}: no per-rank optimizer partitions to re-split")


def rank_slice(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s ZeRO-3 piece of ``full``: ``ceil(numel / world)`` elements, zero-padded at the end."""
    flat = full.reshape(-1)
    part = partition_size(flat.numel(), world)
    piece = flat[part * rank:part * (rank + 1)]
    if piece.numel() < part:
        piece = torch.cat([piece, piece.new_zeros(part - piece.numel())])
    return piece


@torch.no_grad()
def load_resharded(engine, tag_dir: str) -> dict[str, Any]:
    """Restore ``engine`` (ZeRO 1-3, any world size) from a DeepSpeed tag folder written at another
    world size. Collective-free: every rank reads the files and takes its part. Returns the model
    states dict (DeepSpeed's counters, the LR scheduler's state)."""
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    model_states, rank_sds = read_rank_files(tag_dir)
    stage = _stage(rank_sds[0])
    if stage != engine.zero_optimization_stage():
        raise ValueError(f"train.zero_stage: {engine.zero_optimization_stage()} differs from the checkpoint's "
                         f"ZeRO stage {stage}; resume with train.zero_stage={stage}")
    full, step = full_optimizer_state(model_states["param_shapes"], rank_sds)
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    if sorted(names) != sorted(full):
        raise ValueError(f"{tag_dir}: the checkpoint's parameters differ from the model's "
                         f"(missing {sorted(set(names) - set(full))[:3]}, extra {sorted(set(full) - set(names))[:3]})")
    opt = engine.optimizer
    base = opt.optimizer
    rank, world = engine.global_rank, engine.dp_world_size
    # Adam creates its state at the first step: create it (zeros, the partitions' shapes) to write into.
    flats = opt.fp32_partitioned_groups_flat if stage == 3 else [q for g in base.param_groups for q in g["params"]]
    for flat in flats:
        base.state[flat].update({key: torch.zeros_like(flat) for key in MOMENTS}, step=step.clone())
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        state = full[name]
        if stage == 3:
            local = {k: rank_slice(v, rank, world) for k, v in state.items()}
            p.ds_tensor.data.copy_(local["fp32"].to(p.ds_tensor.dtype))  # working partition
            safe_set_local_fp32_param(p, local["fp32"])
            for key in MOMENTS:
                safe_set_local_optimizer_state(p, local[key], key)
        else:
            mapping = p._hp_mapping  # where this parameter's fragment lies in the rank's flat partition
            if mapping is not None:
                flat = base.param_groups[mapping.param_group_index]["params"][0]
                mapping.set_optim_state_fragment(flat, base.state[flat])
            p.data.copy_(state["fp32"].to(p.dtype))  # every rank holds the full working weights
            safe_set_full_fp32_param(p, state["fp32"])
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, state[key], key)
    if stage == 3:
        opt._load_global_state_stage3(rank_sds[0])
    else:
        opt._load_global_state(rank_sds[0])
    if engine.lr_scheduler is not None and model_states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = int(model_states.get("global_steps", 0))
    engine.global_samples = int(model_states.get("global_samples", 0))
    engine.skipped_steps = int(model_states.get("skipped_steps", 0))
    return model_states
