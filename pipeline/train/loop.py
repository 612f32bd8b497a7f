"""The training loop that runs on every worker (a Ray Train worker, or a single process).

Progress is counted in images seen. The timesteps and noise of every micro-batch come from a
generator seeded by (run seed, rank, images seen, micro-step), and the data reader's cursor,
the RNG states (dropout), the EMA and DeepSpeed's state are all checkpointed, so a resumed run
continues exactly the stream an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import nullcontext
from typing import Any

import torch

from pipeline.config import ExperimentConfig, config_to_yaml
from pipeline.train import dist, preemption
from pipeline.train.checkpoint import (
    committed_checkpoints,
    find_resume_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from pipeline.train.data import model_labels
from pipeline.train.ema import EMA, PowerEMA
from pipeline.train.engine import build_engine, global_batch, precision_dtype
from pipeline.train.init import apply_init_from
from pipeline.train.metrics import MetricsLogger, Progress, image_grid_png, quartile_of_time
from pipeline.train.objective import TrainModule
from pipeline.train.posthoc_snapshots import discard_snapshots_after, save_snapshot
from pipeline.train.rundir import RunDir

__all__ = ["NonFiniteLossError", "config_hash", "redacted_yaml", "stream_seed", "train"]

log = logging.getLogger(__name__)

_SECRET_WORDS = ("secret", "password", "token", "credential", "access_key", "session_key")


GRID_STEPS = 50  # sampler steps of the training-time sample grid


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is left intact."""


def stream_seed(seed: int, rank: int, images_seen: int, micro_step: int) -> int:
    """Seed of one micro-batch's timesteps and noise, a hash of (run seed, rank, images seen, micro-step)."""
    digest = hashlib.sha256(f"{seed}:{rank}:{images_seen}:{micro_step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def config_hash(cfg: ExperimentConfig) -> str:
    return hashlib.sha256(config_to_yaml(cfg).encode()).hexdigest()


def model_hash(cfg: ExperimentConfig) -> str:
    """Hash of what a checkpoint's tensors depend on: the ``model`` and ``diffusion`` sections alone
    (hashing the other sections at their defaults made every new train/data/eval field orphan the
    checkpoints written before it)."""
    import json

    text = json.dumps({"model": cfg.model.model_dump(mode="json"), "diffusion": cfg.diffusion.model_dump(mode="json")},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def redacted_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML with any credential-like value masked (and URL user info removed)."""
    import re

    import yaml

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: scrub(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v, key) for v in node]
        if isinstance(node, str):
            if any(w in key.lower() for w in _SECRET_WORDS):
                return "***"
            return re.sub(r"(://)[^/@\s]+@", r"\1", node)  # scheme://user:pass@host -> scheme://host
        return node

    return yaml.safe_dump(scrub(cfg.model_dump(mode="json")), sort_keys=False)


# ---------------------------------------------------------------------------------------------


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Train on this worker until ``cfg.train.total_images``; returns a summary (rank 0's view)."""
    return _Trainer(cfg).run()


def _continue_warmup(engine, images_seen: int, gbatch: int, warmup_images: int) -> None:
    """After an elastic resume: the LR schedule at the step of the new global batch ``gbatch`` that
    has seen ``images_seen`` images (the warm-up is fixed in images, its step count is not)."""
    sched = engine.lr_scheduler
    lam = sched.lr_lambdas[0] if sched is not None and getattr(sched, "lr_lambdas", None) else None
    if lam is None or not hasattr(lam, "warmup_steps"):
        return
    lam.warmup_steps = math.ceil(warmup_images / gbatch)
    sched.last_epoch = images_seen // gbatch - 1
    sched.step()  # sets every param group's lr to base_lr * factor(images_seen // gbatch)


def _crossed(now: int, before: int, every: int) -> bool:
    """Whether a multiple of ``every`` images lies in (before, now]."""
    return now // every > before // every


class _Trainer:
    """One worker's training run: setup, resume, optimizer steps, and what happens at step boundaries.

    Counters and the data cursor are checkpointed, so a resumed run continues the same stream.
    """

    def __init__(self, cfg: ExperimentConfig):
        from pipeline.models import build_model_from_config
        from pipeline.train.data import build_reader

        self.cfg, tc = cfg, cfg.train
        self.rank, world = dist.rank(), dist.world_size()
        self.device = _device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # DeepSpeed and nccl collectives use the current device
        self.run_dir = RunDir(tc.run_dir)
        self.main = self.rank == 0
        if self.main:
            self.run_dir.write_text("config.yaml", redacted_yaml(cfg))
        # Identical initial weights on every rank (ZeRO-3 partitions each rank's own copy).
        torch.manual_seed(tc.seed)
        net = build_model_from_config(cfg.model)
        self.module = TrainModule(net, cfg.diffusion)
        apply_init_from(self.module, cfg, self.run_dir, write_record=self.main)  # train.init_from: fine-tuning
        self.engine = build_engine(self.module, tc, world)
        # Dropout draws from the global generator: a per-rank stream, checkpointed with the run.
        torch.manual_seed(stream_seed(tc.seed, self.rank, -1, 0))
        self.ema = EMA(self.engine.module, tc.ema_rates, self.rank, world, warmup=tc.ema_warmup)
        self.phema = _posthoc_ema(tc, self.engine.module, self.rank, world)  # post-hoc EMA (EDM2); None when off
        self.sampler = getattr(self.module.objective, "importance", None)  # Improved DDPM's importance-sampled t
        self.reader = build_reader(cfg, self.rank, world)
        self.gbatch = global_batch(tc, world)
        self.num_classes = int(getattr(getattr(net, "config", None), "num_classes", 0) or 0)
        self.images_seen = self.step = self.consecutive_bad = self.skipped_total = self.overflow_total = 0
        self.rollbacks = 0
        self._resume()
        if self.phema is not None and self.main:
            discard_snapshots_after(tc.run_dir, self.images_seen)  # a later one is from a run past this checkpoint
        self.logger = MetricsLogger(tc.run_dir, enabled=self.main)
        self.progress = Progress(tc.total_images, self.images_seen, enabled=self.main)
        dtype = precision_dtype(tc.precision)
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        self.acc = _Accumulator()
        self.last_log_time, self.last_log_images = time.perf_counter(), self.images_seen
        self.last_ckpt = self.images_seen

    def _resume(self) -> None:
        cfg = self.cfg
        ckpt = _resume_target(cfg)
        if ckpt is None:
            return
        if ckpt.model_hash not in (None, model_hash(cfg)):
            raise ValueError(f"train.resume: checkpoint {ckpt.rel} was trained with a different model or "
                             f"diffusion configuration; start a new run_dir or set train.resume=never")
        if ckpt.config_hash != config_hash(cfg) and self.main:
            log.warning("resuming %s with a changed configuration (config hash differs)", ckpt.rel)
        state = load_checkpoint(self.engine, cfg.train.run_dir, ckpt, self.ema, posthoc=self.phema)
        self.images_seen, self.step = state["images_seen"], state["step"]
        if state["resharded"]:
            # Elastic resume: the rest of the epoch in progress re-split over this run's ranks; the
            # per-rank dropout stream re-keyed on (run seed, rank, images seen); the LR warm-up
            # continued in images seen at the new global batch.
            self.reader.load_resplit([s["data"] for s in state["rank_states"]])
            torch.manual_seed(stream_seed(cfg.train.seed, self.rank, self.images_seen, -1))
            _continue_warmup(self.engine, self.images_seen, self.gbatch, cfg.train.warmup_images)
            if self.main:
                print(f"re-partitioned checkpoint {ckpt.rel} of {state['world_size']} workers over "
                      f"{dist.world_size()}", flush=True)
        elif state["rank_state"]["data"].get("loader_workers") != self.reader.num_workers:
            # Same ranks, another data.loader_workers: the epoch in progress is re-split the same way.
            self.reader.load_resplit([s["data"] for s in state["rank_states"]])
        else:
            self.reader.load_state_dict(state["rank_state"]["data"])
        shared = state["shared_state"]
        self.skipped_total = int(shared.get("skipped_steps", 0))
        self.overflow_total = int(shared.get("overflow_steps", 0))
        self.rollbacks = int(shared.get("nonfinite_rollbacks", 0))
        if self.sampler is not None and shared.get("importance_sampler") is not None:
            self.sampler.load_state_dict(shared["importance_sampler"])
        if self.main:
            print(f"resumed from {self.run_dir.join(ckpt.rel)} at {self.images_seen} images (step {self.step})",
                  flush=True)

    def checkpoint(self) -> None:
        tc = self.cfg.train
        shared = {"skipped_steps": self.skipped_total, "overflow_steps": self.overflow_total,
                  "nonfinite_rollbacks": self.rollbacks,
                  "importance_sampler": self.sampler.state_dict() if self.sampler is not None else None}
        save_checkpoint(self.engine, tc.run_dir, images_seen=self.images_seen, step=self.step, ema=self.ema,
                        rank_state={"data": self.reader.state_dict()}, shared_state=shared,
                        config_hash=config_hash(self.cfg), model_hash=model_hash(self.cfg),
                        keep_last=tc.keep_last, keep_every=tc.keep_every_images, posthoc=self.phema)

    def optimizer_step(self, batches) -> bool:
        """One optimizer step over ``grad_accum`` micro-batches; True when a loss was not finite."""
        tc, engine = self.cfg.train, self.engine
        bad_step = False
        for micro in range(tc.grad_accum):
            batch = next(batches)  # (images, labels) or, with data.fields, (images, labels, extras)
            x0, labels = batch[0], batch[1]
            cond = {k: v.to(self.device, non_blocking=True) for k, v in batch[2].items()} if len(batch) > 2 else None
            x0 = x0.to(self.device, non_blocking=True)
            gen = torch.Generator(device=self.device).manual_seed(
                stream_seed(tc.seed, self.rank, self.images_seen, micro))
            y = model_labels(labels.to(self.device), self.num_classes, self.cfg.diffusion.label_dropout, gen)
            with self.autocast:  # TrainModule passes cond on only when the data has fields
                out = engine(x0, y, gen, cond=cond)
            losses = out.loss.float()
            weighted = losses * out.weight if out.weight is not None else losses
            loss = weighted.mean()
            finite = torch.isfinite(loss.detach()).to(torch.float32)
            # Every rank must agree to skip, or the next collective would hang.
            all_finite = bool(dist.all_reduce_max(1.0 - finite.cpu()).item() == 0.0)
            if not all_finite:
                bad_step = True
                if tc.grad_accum == 1:
                    break  # nothing accumulated yet: skip backward and the optimizer step
            # With accumulation the bad micro-batch's gradients are non-finite: ZeRO 1-3 and fp16
            # detect the overflow and skip the optimizer step on every rank; without ZeRO the
            # gradients are dropped here, and AdamW skips parameters that have none.
            engine.backward(loss)
            if bad_step and micro == tc.grad_accum - 1 and tc.zero_stage == 0 and tc.precision != "fp16":
                for p in engine.module.parameters():
                    p.grad = None
            engine.step()
            if all_finite:
                self.acc.add(losses.detach(), quartile_of_time(out.time) if out.time is not None else None)
                if self.sampler is not None:
                    _update_sampler(self.sampler, out.t_index, losses.detach())
        return bad_step

    def count_step(self, bad_step: bool) -> None:
        """Advance the counters and the EMA; stop after too many non-finite steps in a row."""
        tc = self.cfg.train
        self.images_seen += self.gbatch
        self.step += 1
        if bad_step:
            self.skipped_total += 1
            self.consecutive_bad += 1
        elif _step_applied(self.engine):
            self.ema.update()
            self.consecutive_bad = 0
        else:
            # Finite loss, overflowing fp16 gradients: DeepSpeed skipped the step and lowered the
            # loss scale. Counted apart; a streak of these is the loss scaler's normal search.
            self.overflow_total += 1
        if self.phema is not None:  # every step, applied or skipped: the profile averages the weights over images seen
            self.phema.update(self.images_seen, self.gbatch)
            every = tc.posthoc_ema.snapshot_every_images
            if _crossed(self.images_seen, self.images_seen - self.gbatch, every) or self.images_seen >= tc.total_images:
                save_snapshot(tc.run_dir, self.phema, images_seen=self.images_seen, config_hash=config_hash(self.cfg),
                              model_hash=model_hash(self.cfg))
        if bad_step and self.consecutive_bad > tc.max_consecutive_nonfinite:
            if self.rollbacks < tc.max_nonfinite_rollbacks and self.roll_back():
                return
            self.logger.close()
            self.progress.close()
            raise NonFiniteLossError(
                f"{self.consecutive_bad} consecutive optimizer steps had a non-finite loss or gradient "
                f"(limit train.max_consecutive_nonfinite={tc.max_consecutive_nonfinite}) at {self.images_seen} "
                f"images, after {self.rollbacks} rollback(s) (train.max_nonfinite_rollbacks="
                f"{tc.max_nonfinite_rollbacks}); training stopped. The last good checkpoint is the newest under "
                f"{self.run_dir.join('checkpoints')}; lower train.lr or use precision=bf16/fp32")

    def roll_back(self) -> bool:
        """After a streak of non-finite steps (every rank agrees: the flag is all-reduced): restore the
        newest committed checkpoint written before the streak began, keep the data reader where it is
        (the offending stretch of data is skipped, not replayed) and go on. False when there is none."""
        tc = self.cfg.train
        began = self.images_seen - self.consecutive_bad * self.gbatch
        pick = None
        if self.main:  # rank 0 checks the checksums and tells the others
            good = [c.images_seen for c in committed_checkpoints(tc.run_dir)
                    if c.images_seen < began and verify_checkpoint(self.run_dir, c) is None]
            pick = good[-1] if good else None
        pick = dist.broadcast_object(pick)
        if pick is None:
            return False
        ckpt, bad = resolve_checkpoint(tc.run_dir, pick), self.consecutive_bad
        state = load_checkpoint(self.engine, tc.run_dir, ckpt, self.ema, posthoc=self.phema)
        skipped_to = self.images_seen
        self.images_seen, self.step = state["images_seen"], state["step"]
        if state["resharded"]:  # a checkpoint from before an elastic resume
            _continue_warmup(self.engine, self.images_seen, self.gbatch, tc.warmup_images)
        self.rollbacks += 1
        self.consecutive_bad = 0
        self.last_ckpt = self.images_seen
        if self.phema is not None and self.main:
            discard_snapshots_after(tc.run_dir, self.images_seen)
        if self.main:
            log.warning("%d non-finite steps in a row at %d images: rolled back to checkpoint %s (rollback %d of %d); "
                        "the data read since %d images is skipped", bad, skipped_to, ckpt.rel, self.rollbacks,
                        tc.max_nonfinite_rollbacks, began)
            print(f"rolled back to {self.run_dir.join(ckpt.rel)} after {bad} non-finite steps", flush=True)
        return True

    def log_point(self) -> None:
        now = time.perf_counter()
        scalars = self.acc.reduce_and_reset()
        scalars.update(lr=self.engine.get_lr()[0], grad_norm=_grad_norm(self.engine),
                       loss_scale=_loss_scale(self.engine),
                       images_per_s=(self.images_seen - self.last_log_images) / max(now - self.last_log_time, 1e-9),
                       skipped_steps=self.skipped_total, overflow_steps=self.overflow_total, step=self.step)
        self.logger.log(self.images_seen, scalars)
        self.last_log_time, self.last_log_images = now, self.images_seen

    def at_boundary(self) -> None:
        """Logging, sample grids and checkpoints due at the step that just ended."""
        tc, seen, before = self.cfg.train, self.images_seen, self.images_seen - self.gbatch
        done = seen >= tc.total_images
        self.progress.update(self.gbatch, loss=self.acc.last_loss)
        if _crossed(seen, before, tc.log_every_images) or done:
            self.log_point()
        if tc.sample_every_images and _crossed(seen, before, tc.sample_every_images):
            write_sample_grid(self.cfg, self.ema, seen)
        if _crossed(seen, self.last_ckpt, tc.checkpoint_every_images) or done:
            # Logs first: a run killed between the two resumes from this checkpoint with its log
            # complete (on s3 the log lines are buffered until a flush); killed before the commit,
            # it replays the steps since the previous one, whose records then appear twice.
            self.logger.flush()
            self.checkpoint()
            self.last_ckpt = seen

    def stop_if_preempted(self) -> None:
        """A collective (the same answer on every rank): after a preemption signal to the driver
        (pipeline/train/preemption.py), commit a checkpoint at this step boundary and stop."""
        if self.images_seen < self.cfg.train.total_images and preemption.requested(self.cfg.train.run_dir):
            if self.last_ckpt != self.images_seen:
                self.checkpoint()
            self.logger.close()
            self.progress.close()
            raise preemption.Preempted(self.images_seen)

    def run(self) -> dict[str, Any]:
        tc = self.cfg.train
        batches = iter(self.reader)
        while self.images_seen < tc.total_images:
            self.count_step(self.optimizer_step(batches))
            self.at_boundary()
            self.stop_if_preempted()
        if tc.sample_every_images and self.images_seen % tc.sample_every_images and self.images_seen > 0:
            write_sample_grid(self.cfg, self.ema, self.images_seen)
        self.progress.close()
        self.logger.close()
        return {"images_seen": self.images_seen, "step": self.step, "skipped_steps": self.skipped_total,
                "overflow_steps": self.overflow_total, "run_dir": tc.run_dir}


def _posthoc_ema(tc, module: torch.nn.Module, rank: int, world: int) -> PowerEMA | None:
    if not tc.posthoc_ema.snapshot_every_images:
        return None
    return PowerEMA(module, tc.posthoc_ema.sigma_rels, rank, world)


def _resume_target(cfg: ExperimentConfig):
    resume = cfg.train.resume
    if resume == "never":
        return None
    if resume == "auto":
        found = None
        if dist.is_main():
            # Nobody is saving now: leftovers of an interrupted save can go.
            RunDir(cfg.train.run_dir).delete_tree("checkpoints/.staging")
            found = find_resume_checkpoint(cfg.train.run_dir)
        name = dist.broadcast_object(found.images_seen if found else None)
        return resolve_checkpoint(cfg.train.run_dir, name) if name is not None else None
    return resolve_checkpoint(cfg.train.run_dir, resume)


def _step_applied(engine) -> bool:
    fn = getattr(engine, "was_step_applied", None)
    return bool(fn()) if fn is not None else True


def _grad_norm(engine) -> float | None:
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _loss_scale(engine) -> float | None:
    """The dynamic loss scale (fp16 only)."""
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "cur_scale", None)
    return float(scale) if scale is not None else None


def _update_sampler(sampler, t: torch.Tensor, losses: torch.Tensor) -> None:
    """Every rank feeds the same all-gathered (t, loss) pairs, so all hold the same history."""
    pairs = dist.all_gather_object((t.cpu(), losses.float().cpu()))
    sampler.update(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))


class _Accumulator:
    """Local sums of the loss (overall and per timestep quartile) between log points."""

    def __init__(self):
        self.by_quartile = False  # set once an objective reports each example's diffusion time
        self.last_loss = math.nan
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(10, dtype=torch.float64)  # [sum, count, q0 sum, q0 count, ...]

    def add(self, losses: torch.Tensor, quartile: torch.Tensor | None) -> None:
        losses = losses.double().cpu()
        self.sums[0] += losses.sum()
        self.sums[1] += losses.numel()
        self.last_loss = float(losses.mean())
        if quartile is not None:
            self.by_quartile = True
            q = quartile.cpu()
            for i in range(4):
                mask = q == i
                self.sums[2 + 2 * i] += losses[mask].sum()
                self.sums[3 + 2 * i] += mask.sum()

    def reduce_and_reset(self) -> dict[str, float | None]:
        total = dist.all_reduce_sum(self.sums)
        self._reset()
        out: dict[str, float | None] = {"loss": (total[0] / total[1]).item() if total[1] > 0 else None}
        if self.by_quartile:
            for i in range(4):
                c = total[3 + 2 * i]
                out[f"loss_q{i}"] = (total[2 + 2 * i] / c).item() if c > 0 else None
        return out


def write_sample_grid(cfg: ExperimentConfig, ema: EMA, images_seen: int, num: int = 64,
                      steps: int = GRID_STEPS) -> str | None:
    """Collective: materialise the first EMA on every rank, rank 0 samples ``num`` images from fixed
    seeds 0..num-1 with the objective's default sampler (``steps`` steps) and writes
    ``<run>/samples/<images seen>.png``. Objectives with no sampler (a noisy classifier) write none."""
    from pipeline.diffusion.registry import OBJECTIVES

    full = ema.gather_full(ema.rates[0])
    if not dist.is_main() or not OBJECTIVES[cfg.diffusion.objective].generative:
        return None
    with torch.random.fork_rng(devices=[]):  # building the network must not move training's RNG
        return _sample_grid(cfg, full, images_seen, num, steps)


def _sample_grid(cfg: ExperimentConfig, full: dict[str, torch.Tensor], images_seen: int, num: int,
                 steps: int) -> str:
    from pipeline.diffusion.registry import OBJECTIVES, data_channels, make_view, sample
    from pipeline.loading import from_weights

    device = _device()
    where = f"the EMA at {images_seen} images"
    net, objective = from_weights(cfg.model, cfg.diffusion, full, where, device)
    options = cfg.diffusion.objective_options()
    view = make_view(cfg.diffusion.objective, net, objective, options)
    conf = net.config
    seeds = list(range(num))
    num_classes = getattr(conf, "num_classes", 0)
    y = torch.tensor([s % num_classes for s in seeds], device=device) if num_classes else None
    shape = (num, data_channels(cfg.diffusion.objective, options, conf.in_channels), conf.image_size, conf.image_size)
    with torch.no_grad():
        images = sample(view, OBJECTIVES[cfg.diffusion.objective].for_options(options).default_sampler, shape, seeds,
                        steps=steps, y=y,
                        device=device)
    png = image_grid_png(images, nrow=int(math.sqrt(num)))
    run = RunDir(cfg.train.run_dir)
    rel = f"samples/{images_seen:012d}.png"
    run.write_bytes(rel, png)
    run.write_bytes("samples/latest.png", png)
    return run.join(rel)
