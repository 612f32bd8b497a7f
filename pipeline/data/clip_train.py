"""Train a small open_clip model contrastively on a source's image-caption pairs (CLIP, Radford et al. 2021).

The embedded default embedder: no CLIP weights can be downloaded here, so the project trains its
own on the data it has (the builtin dataset's generated captions, or any source with captions),
with open_clip's own ``CLIP`` class and its ``ClipLoss`` (the symmetric InfoNCE of CLIP's
Figure 3). Single process, a few minutes on a CPU; the weights go to a ``.safetensors`` file
whose metadata records the model name and config, beside a ``.json`` with the same record and the
held-out retrieval.

:func:`retrieval_top1` measures what the embedding is good for: for each held-out caption, is the
image with the highest cosine its own image (instance top-1, chance 1/M) and is it of the
caption's class (class top-1, chance about 1/classes)?
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from typing import Any

import numpy as np
import torch

from pipeline.data.clip_embed import TINY_MODELS, Embedder, build_clip

__all__ = ["ClipTrainResult", "retrieval_top1", "save_clip", "train_clip"]


@dataclasses.dataclass(frozen=True)
class ClipTrainResult:
    embedder: Embedder
    steps: int
    seconds: float
    final_loss: float
    heldout: dict[str, float]  # retrieval_top1 on the held-out pairs


def retrieval_top1(text_emb: torch.Tensor, image_emb: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Text -> image top-1 over M pairs (row i of each is pair i): instance and class accuracy, and chance."""
    if text_emb.shape != image_emb.shape or text_emb.ndim != 2:
        raise ValueError(f"text_emb {tuple(text_emb.shape)} and image_emb {tuple(image_emb.shape)} must both be [M, d]")
    m = text_emb.shape[0]
    best = (text_emb @ image_emb.T).argmax(dim=1)
    out = {"pairs": float(m), "top1": float((best == torch.arange(m)).float().mean()), "chance": 1.0 / m}
    if labels is not None:
        out["class_top1"] = float((labels[best] == labels).float().mean())
        counts = torch.bincount(labels[labels >= 0])
        out["class_chance"] = float(((counts.float() / m) ** 2).sum())  # P(random image shares the class)
    return out


def train_clip(
    source: Any,
    model_name: str = "shapes-tiny",
    *,
    num_train: int,
    num_heldout: int = 500,
    steps: int = 800,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> ClipTrainResult:
    """Train ``model_name`` on the first ``num_train`` samples of ``source`` (a Source with captions);
    the next ``num_heldout`` are held out for :func:`retrieval_top1`. ``threads``: torch intra-op
    threads while training (a tiny model on a busy machine runs fastest on 1); None leaves the setting."""
    if model_name not in TINY_MODELS:
        raise ValueError(f"clip model: {model_name!r} is not allowed for training here; use one of {', '.join(TINY_MODELS)}")
    if not source.captions:
        raise ValueError("source: it has no captions; CLIP trains on image-caption pairs (builtin:NAME has them; an "
                         "image folder needs a .txt beside each image, an .npz a 'captions' array)")
    if num_train < 2 or num_heldout < 2 or num_train + num_heldout > source.num_samples:
        raise ValueError(f"num_train {num_train} + num_heldout {num_heldout} must be >= 2 each and fit the source's "
                         f"{source.num_samples} samples")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}: {value!r} is not allowed; it must be >= 1")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(source, model_name, num_train, num_heldout, steps, batch_size, lr, weight_decay, seed, progress)
    finally:
        torch.set_num_threads(before)


def _train(source: Any, model_name: str, num_train: int, num_heldout: int, steps: int, batch_size: int, lr: float,
           weight_decay: float, seed: int, progress: bool) -> ClipTrainResult:
    from open_clip import ClipLoss
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    torch.manual_seed(seed)
    model, tokenizer, mean, std, size = build_clip(model_name)
    embedder = Embedder(model_name, model, tokenizer, mean, std, size, weights_sha256="")
    records = source.read(0, num_train + num_heldout, size)
    images = embedder.pixels(np.stack([r.image for r in records]))
    tokens = tokenizer([r.caption for r in records])
    labels = torch.tensor([-1 if r.label is None else r.label for r in records])
    train_x, train_t = images[:num_train], tokens[:num_train]
    batch_size = min(batch_size, num_train)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay (as open_clip's training recipe)
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=f"train CLIP {model_name}", disable=not progress)
    for _ in bar:
        idx = torch.randperm(num_train, generator=gen)[:batch_size]
        x = train_x[idx]
        flip = torch.rand(len(idx), generator=gen) < 0.5  # captions never say left/right
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(train_t[idx], normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP section 2.5: temperature clipped at 100
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    held = records[num_train:]
    heldout = retrieval_top1(embedder.embed_texts([r.caption for r in held]),
                             embedder.embed_images(np.stack([r.image for r in held])),
                             labels[num_train:] if (labels >= 0).all() else None)
    return ClipTrainResult(embedder, steps, time.monotonic() - t0, float(loss.item()), heldout)


def save_clip(result: ClipTrainResult, path: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the weights to ``path`` (.safetensors, metadata: model name and config) and ``path``'s
    ``.json`` record beside it; return the record (identity with the file's sha256)."""
    from safetensors.torch import save

    if not path.endswith(".safetensors"):
        raise ValueError(f"--out: {path!r} is not allowed; the weights file must end in .safetensors")
    from pipeline.data import storage

    name = result.embedder.model_name
    state = {k: v.detach().contiguous().cpu() for k, v in result.embedder.model.state_dict().items()}
    data = save(state, metadata={"open_clip_model": name, "open_clip_config": json.dumps(TINY_MODELS[name])})
    sha = hashlib.sha256(data).hexdigest()
    storage.write_bytes(path, data)
    result.embedder.weights_sha256 = sha
    record = {
        **result.embedder.identity(),
        "config": TINY_MODELS[name],
        "steps": result.steps,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "heldout_retrieval": result.heldout,
        **(extra or {}),
    }
    storage.write_bytes(path[: -len(".safetensors")] + ".json", (json.dumps(record, indent=1) + "\n").encode())
    return record
