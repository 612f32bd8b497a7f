"""The per-rank training data: pipeline.data's resumable ShardReader, and class labels for the model."""

from __future__ import annotations

import torch

from pipeline.config import ExperimentConfig

__all__ = ["build_reader", "model_labels"]


def build_reader(cfg: ExperimentConfig, rank: int, world: int):
    """This rank's reader of micro-batches ``(images in [-1, 1], labels)``; checkpointable."""
    from pipeline.data.reader import ShardReader

    return ShardReader.from_config(cfg.data, rank=rank, world_size=world, batch_size=cfg.train.micro_batch,
                                   timeout_s=cfg.train.collective_timeout_s)


def model_labels(labels: torch.Tensor, num_classes: int, label_dropout: float,
                 generator: torch.Generator) -> torch.Tensor | None:
    """Labels as the model takes them: None for an unconditional model; unlabelled samples (-1) and a
    ``label_dropout`` fraction (classifier-free guidance training) become the null class ``num_classes``."""
    if num_classes == 0:
        return None
    y = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
    if label_dropout > 0:
        drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < label_dropout
        y = torch.where(drop, torch.full_like(y, num_classes), y)
    return y
