"""Distributed training pipeline for pixel-space diffusion models.

``pipeline.load_pretrained(DIR)`` loads an exported model (see :mod:`pipeline.pretrained`); it is
imported lazily, so ``import pipeline`` stays free of torch until it is used.
"""

__all__ = ["load_pretrained"]


def __getattr__(name: str):
    if name == "load_pretrained":
        from pipeline.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
