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

__all__ = ["EMA", "PowerEMA", "SliceSpec", "assemble_full", "ema_decay", "partition_size"]


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


def partition_size(numel: int, world: int) -> int:
    """ZeRO-3's elements per rank of a tensor of ``numel`` elements: ceil(numel / world)."""
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
    size = partition_size(numel, world)
    start = min(size * rank, numel)
    length = max(0, min(size, numel - start))
    return param.detach().view(-1)[start:start + length], start, shape


class _RankSlices:
    """fp32 copies of the rank's parameter slices, one set per key (an EMA rate, a sigma_rel)."""

    kind = "EMA"

    def __init__(self, module: torch.nn.Module, keys: tuple[float, ...], rank: int, world: int):
        self._keys = tuple(float(k) for k in keys)
        self.num_updates = 0
        self._rank, self._world = rank, world
        self._params = [p for _, p in module.named_parameters()]
        self.specs: list[SliceSpec] = []
        sources = self._sources()
        for (name, _), view in zip(module.named_parameters(), sources):
            _, start, shape = _local_view(_, rank, world)
            self.specs.append(SliceSpec(name, shape, start, view.numel()))
        self.shadows: dict[float, list[torch.Tensor]] = {
            k: [v.detach().float().clone() for v in sources] for k in self._keys}

    def _sources(self) -> list[torch.Tensor]:
        # Resolved at each use: DeepSpeed may re-point ``param.data`` (flat buffers, partitions).
        return [_local_view(p, self._rank, self._world)[0] for p in self._params]

    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's slices as a flat name -> tensor dict (for a safetensors file)."""
        out = {}
        for k in self._keys:
            for spec, t in zip(self.specs, self.shadows[k]):
                out[f"{k!r}/{spec.name}"] = t.contiguous()
        return out

    def slice_table(self) -> dict[str, list[int]]:
        return {s.name: [s.start, s.length, *s.shape] for s in self.specs}

    def load_local_state(self, tensors: dict[str, torch.Tensor], num_updates: int) -> None:
        for k in self._keys:
            for spec, t in zip(self.specs, self.shadows[k]):
                key = f"{k!r}/{spec.name}"
                if key not in tensors:
                    raise ValueError(f"{self.kind} state: missing {key!r}; the checkpoint holds keys/params "
                                     f"{sorted({k.split('/')[0] for k in tensors})}")
                t.copy_(tensors[key])
        self.num_updates = num_updates

    def load_full_state(self, full: dict[float, dict[str, torch.Tensor]], num_updates: int) -> None:
        """This rank's slices cut from full weights (one dict per key): an elastic resume, where the
        checkpoint was written by another number of ranks (:func:`assemble_full` made ``full``)."""
        for k in self._keys:
            if k not in full:
                raise ValueError(f"{self.kind} state: {k!r} is not in the checkpoint; it holds {sorted(full)}")
            for spec, t in zip(self.specs, self.shadows[k]):
                if spec.name not in full[k]:
                    raise ValueError(f"{self.kind} state: parameter {spec.name!r} is not in the checkpoint")
                t.copy_(full[k][spec.name].reshape(-1)[spec.start:spec.start + spec.length])
        self.num_updates = num_updates

    def gather_full(self, key: float) -> dict[str, torch.Tensor]:
        """Full fp32 weights of one average on every rank (a collective; for periodic sampling)."""
        from pipeline.train import dist

        if key not in self.shadows:
            raise ValueError(f"{self.kind}: {key!r} is not held; held are {list(self._keys)}")
        mine = {"slices": self.slice_table(),
                "tensors": {s.name: t for s, t in zip(self.specs, self.shadows[key])}}
        return assemble_full(dist.all_gather_object(mine))


class EMA(_RankSlices):
    """fp32 moving averages of the rank's parameter slices for each rate in ``rates``."""

    def __init__(self, module: torch.nn.Module, rates: tuple[float, ...], rank: int, world: int,
                 warmup: bool = True):
        if not rates:
            raise ValueError("rates: () is not allowed; give at least one EMA rate in (0, 1)")
        for r in rates:
            if not 0.0 < r < 1.0:
                raise ValueError(f"rates: {r!r} is not allowed; each rate must lie in (0, 1)")
        super().__init__(module, rates, rank, world)
        self.rates = self._keys
        self.warmup = warmup

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step for every rate: shadow <- decay * shadow + (1 - decay) * weight."""
        sources = [s.float() for s in self._sources()]
        for r in self.rates:
            decay = ema_decay(r, self.num_updates, self.warmup)
            torch._foreach_lerp_(self.shadows[r], sources, 1.0 - decay)
        self.num_updates += 1


class PowerEMA(_RankSlices):
    """Power-function EMAs (EDM2 section 3.1) of the rank's parameter slices, one per ``sigma_rels``.

    The profile at time t (images seen) averages the weights with density ~ tau^gamma on [0, t];
    :meth:`update` advances it by the images of one step. The state is the shadows alone: the decay
    depends only on (gamma, images seen), so a resumed run continues exactly.
    """

    kind = "post-hoc EMA"

    def __init__(self, module: torch.nn.Module, sigma_rels: tuple[float, ...], rank: int, world: int):
        from pipeline.diffusion.phema import gamma_from_sigma_rel

        if not sigma_rels:
            raise ValueError("sigma_rels: () is not allowed; give at least one relative EMA length")
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in sigma_rels)
        super().__init__(module, sigma_rels, rank, world)
        self.sigma_rels = self._keys

    @torch.no_grad()
    def update(self, images_seen: int, images_this_step: int) -> None:
        """Advance every profile to ``images_seen``: shadow <- beta shadow + (1 - beta) weight (EDM2 eq. 127)."""
        from pipeline.diffusion.phema import power_ema_beta

        sources = [s.float() for s in self._sources()]
        for sigma, gamma in zip(self.sigma_rels, self.gammas):
            beta = power_ema_beta(gamma, images_seen, images_this_step)
            torch._foreach_lerp_(self.shadows[sigma], sources, 1.0 - beta)
        self.num_updates += 1


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
