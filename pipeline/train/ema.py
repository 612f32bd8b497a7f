"""Exponential moving averages of the weights, several rates at once, kept in fp32.

Each rank averages only its own slice of every parameter, so memory and work per rank shrink
with the number of workers and no step gathers full parameters:

* ZeRO-3: the slice is the rank's DeepSpeed partition (``param.ds_tensor``), read in place;
* ZeRO 0-2: every rank holds the full parameters; the slice is the same contiguous range of the
  flattened parameter that ZeRO-3 would give the rank (``ceil(numel / world)`` elements).

A slice is described by its start offset in the flattened parameter, so the full weights are the
concatenation of all ranks' slices (:func:`assemble_full`), with or without DeepSpeed.
Under bf16/fp16 the average is of the low-precision working weights, accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["EMA", "SliceSpec", "assemble_full", "ema_decay"]


def ema_decay(rate: float, num_updates: int, warmup: bool) -> float:
    """Decay at update ``num_updates``; with warm-up min(rate, (1 + n) / (10 + n)) (TF's EMA num_updates)."""
    if not warmup:
        return rate
    return min(rate, (1.0 + num_updates) / (10.0 + num_updates))


@dataclass(frozen=True)
class SliceSpec:
    name: str
    shape: tuple[int, ...]
    start: int  # offset of this rank's slice in the flattened parameter
    length: int  # number of real (unpadded) elements this rank holds


def _partition_size(numel: int, world: int) -> int:
    return -(-numel // world)


def _local_view(param: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """(1-D view of this rank's real elements, start offset, full shape)."""
    ds_tensor = getattr(param, "ds_tensor", None)
    if ds_tensor is not None:  # ZeRO-3 partition
        numel, shape = int(param.ds_numel), tuple(param.ds_shape)
        size = int(ds_tensor.ds_numel)
        start = size * rank
        length = max(0, min(size, numel - start))
        return ds_tensor.view(-1)[:length], min(start, numel), shape
    numel, shape = param.numel(), tuple(param.shape)
    size = _partition_size(numel, world)
    start = min(size * rank, numel)
    length = max(0, min(size, numel - start))
    return param.detach().view(-1)[start:start + length], start, shape


class EMA:
    """fp32 moving averages of the rank's parameter slices for each rate in ``rates``."""

    def __init__(self, module: torch.nn.Module, rates: tuple[float, ...], rank: int, world: int,
                 warmup: bool = True):
        if not rates:
            raise ValueError("rates: () is not allowed; give at least one EMA rate in (0, 1)")
        for r in rates:
            if not 0.0 < r < 1.0:
                raise ValueError(f"rates: {r!r} is not allowed; each rate must lie in (0, 1)")
        self.rates = tuple(float(r) for r in rates)
        self.warmup = warmup
        self.num_updates = 0
        self._rank, self._world = rank, world
        self._params = [p for _, p in module.named_parameters()]
        self.specs: list[SliceSpec] = []
        sources = self._sources()
        for (name, _), view in zip(module.named_parameters(), sources):
            _, start, shape = _local_view(_, rank, world)
            self.specs.append(SliceSpec(name, shape, start, view.numel()))
        self.shadows: dict[float, list[torch.Tensor]] = {
            r: [v.detach().float().clone() for v in sources] for r in self.rates}

    def _sources(self) -> list[torch.Tensor]:
        # Resolved at each use: DeepSpeed may re-point ``param.data`` (flat buffers, partitions).
        return [_local_view(p, self._rank, self._world)[0] for p in self._params]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step for every rate: shadow <- decay * shadow + (1 - decay) * weight."""
        sources = [s.float() for s in self._sources()]
        for r in self.rates:
            decay = ema_decay(r, self.num_updates, self.warmup)
            torch._foreach_lerp_(self.shadows[r], sources, 1.0 - decay)
        self.num_updates += 1

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's slices as a flat name -> tensor dict (for a safetensors file)."""
        out = {}
        for r in self.rates:
            for spec, t in zip(self.specs, self.shadows[r]):
                out[f"{r!r}/{spec.name}"] = t.contiguous()
        return out

    def slice_table(self) -> dict[str, list[int]]:
        return {s.name: [s.start, s.length, *s.shape] for s in self.specs}

    def load_local_state(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        for r in self.rates:
            for spec, t in zip(self.specs, self.shadows[r]):
                key = f"{r!r}/{spec.name}"
                if key not in tensors:
                    raise ValueError(f"EMA state: missing {key!r}; the checkpoint holds rates/params "
                                     f"{sorted({k.split('/')[0] for k in tensors})}")
                t.copy_(tensors[key])
        self.num_updates = num_updates

    def gather_full(self, rate: float) -> dict[str, torch.Tensor]:
        """Full fp32 EMA weights for ``rate`` on every rank (a collective; for periodic sampling)."""
        from pipeline.train import dist

        if rate not in self.shadows:
            raise ValueError(f"rate: {rate!r} is not held; EMA rates are {list(self.rates)}")
        mine = {"slices": self.slice_table(),
                "tensors": {s.name: t for s, t in zip(self.specs, self.shadows[rate])}}
        return assemble_full(dist.all_gather_object(mine))


def assemble_full(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Full parameters from every rank's ``{"slices": {name: [start, length, *shape]}, "tensors": {...}}``."""
    full: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, (start, length, *shape) in part["slices"].items():
            if name not in full:
                numel = 1
                for d in shape:
                    numel *= d
                full[name] = torch.zeros(numel, dtype=torch.float32)
            if length:
                full[name][start:start + length] = part["tensors"][name].reshape(-1)[:length]
    return {name: flat.view(*part_shape(parts, name)) for name, flat in full.items()}


def part_shape(parts: list[dict], name: str) -> tuple[int, ...]:
    return tuple(parts[0]["slices"][name][2:])
