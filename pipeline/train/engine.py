"""DeepSpeed engine construction: the config dict (pure), the client AdamW, LR warm-up.

Precision: fp32; bf16 = fp32 weights with the forward under ``torch.autocast(bfloat16)``; fp16 =
DeepSpeed's fp16 mode (fp16 weights, fp32 master copy in the optimizer, dynamic loss scaling),
also with the forward under autocast.

DeepSpeed runs on the process group that Ray Train created (gloo on CPU, nccl on GPU); this
module never creates one of its own. The default configuration compiles no DeepSpeed op:

* the optimizer is a client ``torch.optim.AdamW`` (no DeepSpeed fused / CPU Adam build), with
  torch's own fused kernel on CUDA (``fused=True``) and the plain one on CPU;
* on the CPU accelerator DeepSpeed would JIT-compile its shared-memory communication op
  (``deepspeed_shm_comm``, about 70 s on 2 cores) at the first ``initialize``. That op only serves
  ``inference_all_reduce`` (tensor-parallel inference), never training collectives, so
  :func:`disable_cpu_shm_comm_op` marks it incompatible in DeepSpeed's op table (the documented,
  cached ``deepspeed.ops.__compatible_ops__`` dict) and DeepSpeed falls back to plain gloo.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from pipeline.config import TrainConfig

__all__ = [
    "build_engine",
    "deepspeed_config",
    "disable_cpu_shm_comm_op",
    "global_batch",
    "lr_warmup_factor",
    "precision_dtype",
]


def global_batch(train: TrainConfig, world_size: int) -> int:
    """Images per optimizer step: micro batch x accumulation x workers."""
    return train.micro_batch * train.grad_accum * world_size


def precision_dtype(precision: str) -> torch.dtype:
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"precision: {precision!r} is not allowed; choose one of {sorted(table)}")
    return table[precision]


def lr_warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up of the learning rate over ``warmup_steps`` optimizer steps, then constant."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


class _Warmup:
    """Picklable LR multiplier (a callable object, so LambdaLR checkpoints it by value)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return lr_warmup_factor(step, self.warmup_steps)


def deepspeed_config(train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``train`` (ZeRO stage, precision, batch, clipping)."""
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch(train, world_size),
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(train.grad_clip),
        "zero_optimization": {"stage": int(train.zero_stage)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if train.zero_stage == 3:
        # Keep every parameter partitioned outside forward/backward (the EMA reads partitions).
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                         "stage3_max_live_parameters": 1e9,
                                         "stage3_prefetch_bucket_size": 5e7})
    # bf16: fp32 weights, optimizer and gradient all-reduce, with the forward under torch.autocast
    # (bf16 has fp32's range, so no loss scaling); the EMA then averages the fp32 weights exactly.
    if train.precision == "fp16":
        # loss_scale 0 = dynamic loss scaling (scale halves on overflow, doubles after a window).
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                       "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def disable_cpu_shm_comm_op() -> None:
    """Skip the JIT build of DeepSpeed's CPU shared-memory comm op (see the module docstring)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(model: torch.nn.Module, train: TrainConfig, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine with a client AdamW and LR warm-up.

    Must run on every rank of an initialised process group (or in a single process, where
    DeepSpeed starts a world of one on its own). Returns the engine.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO level prints the whole config per rank
    disable_cpu_shm_comm_op()
    if not torch.distributed.is_initialized():
        # A single process outside Ray: a world of one on gloo (loopback rendezvous).
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=_timedelta(train.collective_timeout_s))
    scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
    if scalars:
        # DeepSpeed broadcasts parameters as byte views, which a 0-dim tensor cannot give.
        raise ValueError(f"parameters {scalars} are 0-dimensional; DeepSpeed cannot broadcast them. "
                         "Store them with shape (1,) in the module that defines them")
    fused = torch.cuda.is_available()
    if fused:
        # torch's fused AdamW (one kernel per step) needs the parameters on the GPU when it is built;
        # DeepSpeed would move the module to the current device anyway.
        model.to(torch.device("cuda", torch.cuda.current_device()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=tuple(train.adam_betas),
                                  weight_decay=train.weight_decay, eps=1e-8, fused=fused)
    warmup_steps = math.ceil(train.warmup_images / global_batch(train, world_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(warmup_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(train, world_size))
    _load_checkpoints_weights_only(engine)
    if world_size == 1 and train.zero_stage > 0:
        logging.getLogger(__name__).warning(
            "train.zero_stage=%d with one worker partitions nothing and costs about 9%% of the step on CPU "
            "(benchmarks/results/train_cpu.json); train.zero_stage=0 does the same work", train.zero_stage)
    if world_size == 1 and train.zero_stage == 0:
        # A world of one has nothing to all-reduce: skip DeepSpeed's flatten / all-reduce / copy-back
        # of every gradient after backward (it divides by a world size of 1, so gradients are the same).
        engine.enable_backward_allreduce = False
    return engine


def _deepspeed_state_classes() -> list[type]:
    """The few non-tensor classes DeepSpeed's own checkpoint files hold (loss scaler, ZeRO stage,
    fragment addresses): the allowlist for ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load_checkpoints_weights_only(engine) -> None:
    """DeepSpeed's torch checkpoint engine loads with ``weights_only=False``; ours resumes with
    ``weights_only=True`` and an explicit allowlist, so a checkpoint can never run code."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if not isinstance(engine.checkpoint_engine, TorchCheckpointEngine):
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                           "only the torch engine is supported (loaded with weights_only=True)")
    allowed = _deepspeed_state_classes()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
