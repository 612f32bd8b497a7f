"""Every rank-dependent helper of the training stage, in one place.

Works unchanged in a single process (no process group): rank 0 of a world of 1, and every
collective becomes the identity. Collectives run on the default process group, whose timeout
was set when it was created (Ray Train's ``TorchConfig(timeout_s=...)``), so none can hang.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist

__all__ = [
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "is_initialized",
    "is_main",
    "local_rank",
    "rank",
    "world_size",
]


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """The rank within this node (Ray Train sets LOCAL_RANK); 0 in a single process."""
    import os

    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        # monitored_barrier honours the process group's timeout on gloo and names the missing rank.
        if torch_dist.get_backend() == "gloo":
            torch_dist.monitored_barrier()
        else:
            torch_dist.barrier()


def _collective_device() -> torch.device:
    if is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (a new tensor on ``value``'s device)."""
    if not is_initialized():
        return value.clone()
    buf = value.detach().to(_collective_device(), copy=True)
    torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.SUM)
    return buf.to(value.device)


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if not is_initialized():
        return value.clone()
    buf = value.detach().to(_collective_device(), copy=True)
    torch_dist.all_reduce(buf, op=torch_dist.ReduceOp.MAX)
    return buf.to(value.device)


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]
