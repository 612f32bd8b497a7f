"""Helper of tests/test_elastic_unit.py: W gloo processes (torch.multiprocessing, no Ray) that
train a tiny network a few steps under real DeepSpeed engines and save a checkpoint (``save``),
or build engines at another world size, load that checkpoint and write what they hold (``load``).

Each writes, from rank 0, the full fp32 weights, Adam moments and step, the working weights, the
EMA and the loss scale it holds, gathered over ranks (``<run>/<mode>-<stage>.pt``)."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.multiprocessing as mp

STAGES = (0, 1, 2, 3)
ARGS = ["model.preset=tiny", "data.resolution=8", "train.lr=1e-3", "train.micro_batch=2",
        ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1], attention_resolutions: [], "
         "norm_groups: 4, num_classes: 10}")]


def _held(engine, ema) -> dict:
    """Full tensors held by all ranks (a collective)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict = {"ema": {r: ema.gather_full(r) for r in ema.rates}, "fp32": {}, "exp_avg": {}, "exp_avg_sq": {},
                 "working": {}}
    stage = engine.zero_optimization_stage()
    opt = engine.optimizer
    for name, p in engine.module.named_parameters():
        if stage == 0:
            state = opt.state[p]
            out["fp32"][name] = p.detach().float().clone()
            out["exp_avg"][name], out["exp_avg_sq"][name] = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
            out["step"] = float(state["step"])
        else:
            out["fp32"][name] = safe_get_full_fp32_param(p).clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[key][name] = safe_get_full_optimizer_state(p, key).clone()
    if stage:
        flat = opt.fp32_partitioned_groups_flat[0] if stage == 3 else opt.optimizer.param_groups[0]["params"][0]
        out["step"] = float(opt.optimizer.state[flat]["step"])
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        out["working"] = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    scaler = getattr(opt, "loss_scaler", None)
    out["loss_scale"] = float(getattr(scaler, "cur_scale", 1.0)) if scaler is not None else 1.0
    return out


def _rank(rank: int, world: int, mode: str, run: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from pipeline.config import load_config
    from pipeline.models import build_model_from_config
    from pipeline.train.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine
    from pipeline.train.objective import TrainModule

    for stage in STAGES:
        cfg = load_config(None, [*ARGS, f"train.zero_stage={stage}"])
        torch.manual_seed(0 if mode == "save" else 1)  # the loaded run starts from other weights
        engine = build_engine(TrainModule(build_model_from_config(cfg.model), cfg.diffusion), cfg.train, world)
        ema = EMA(engine.module, (0.9, 0.5), rank, world)
        url = os.path.join(run, f"zero{stage}")
        if mode == "save":
            for i in range(3):
                gen = torch.Generator().manual_seed(100 * rank + i)
                loss = engine(torch.randn(2, 3, 8, 8, generator=gen), torch.zeros(2, dtype=torch.long), gen).loss
                engine.backward(loss.float().mean())
                engine.step()
                ema.update()
            save_checkpoint(engine, url, images_seen=6 * world, step=3, ema=ema, rank_state={"data": {}},
                            shared_state={}, config_hash="c", model_hash="m", keep_last=2, keep_every=0)
        else:
            state = load_checkpoint(engine, url, resolve_checkpoint(url), ema)
            assert state["resharded"] and state["world_size"] != world and state["images_seen"] > 0
        held = _held(engine, ema)
        gen = torch.Generator().manual_seed(7)  # a step after loading works at this world size
        loss = engine(torch.randn(2, 3, 8, 8, generator=gen), torch.zeros(2, dtype=torch.long), gen).loss.float().mean()
        engine.backward(loss)
        engine.step()
        held["next_loss_finite"] = bool(torch.isfinite(loss))
        if rank == 0:
            torch.save(held, os.path.join(run, f"{mode}-{stage}.pt"))
        torch.distributed.barrier()
        del engine


if __name__ == "__main__":
    mode, world, run, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    mp.spawn(_rank, args=(world, mode, run, port), nprocs=world)
