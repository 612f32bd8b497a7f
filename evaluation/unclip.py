"""unCLIP sampling (DALL-E 2): caption -> CLIP text embedding -> prior -> image embedding -> decoder.

    prior, decoder = load_model("exports/prior"), load_model("exports/decoder")
    z_img = sample_prior(prior, embedder.embed_texts(["a red circle"]), seeds=[0], steps=64)
    images = decode(decoder, z_img, seeds=[0], steps=50, guidance_scale=3.0)

Every draw comes from a per-sample seed (``registry.sample``): the prior's candidate k of the
caption with seed s is drawn from ``sample_seed(s, PRIOR_STAGE + k)``, the decoder's image from s
itself, so an image depends on its own seed only. Image variations (sec. 3.1) decode one image's
embedding with several seeds; interpolation (sec. 3.2) decodes points of the slerp between two
embeddings with one seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evaluation.seeds import sample_seed
from pipeline.diffusion import registry
from pipeline.diffusion.samplers import slerp
from pipeline.diffusion.unclip import (
    UnclipDecoderObjective,
    UnclipPriorObjective,
    embedding_guidance,
    select_by_text_similarity,
    unscale_embedding,
)

__all__ = ["PRIOR_STAGE", "UnclipSampleFn", "check_chain", "decode", "embedding_dim", "evaluation_prompts",
           "interpolate_embeddings", "sample_prior", "score_clip"]

PRIOR_STAGE = 1000  # candidate k of a caption with seed s: sample_seed(s, PRIOR_STAGE + k)


def embedding_dim(model: Any) -> int:
    """The CLIP dimension a loaded prior (``embed_dim``) or decoder (``cond_embed_dim``) takes."""
    config = model.network.config
    return int(getattr(config, "embed_dim", 0) or getattr(config, "cond_embed_dim", 0) or 0)


def check_chain(prior: Any | None, decoder: Any | None, clip_dim: int | None) -> None:
    """ValueError unless ``prior`` (a unCLIP prior), ``decoder`` (a unCLIP decoder) and the embedder's
    dimension ``clip_dim`` fit together (each may be None: not used)."""
    if prior is not None and not isinstance(prior.objective, UnclipPriorObjective):
        raise ValueError(f"--prior: the model's objective is {prior.diffusion.objective!r}, not unCLIP's prior; "
                         "give an export of a run trained with the prior objective")
    if decoder is not None and not isinstance(decoder.objective, UnclipDecoderObjective):
        raise ValueError(f"--model: the model's objective is {decoder.diffusion.objective!r}, not unCLIP's decoder; "
                         "give an export of a run trained with the decoder objective")
    dims = {name: d for name, d in (("the prior", prior and embedding_dim(prior)),
                                    ("the decoder", decoder and embedding_dim(decoder)),
                                    ("the CLIP embedder", clip_dim)) if d}
    if len(set(dims.values())) > 1:
        raise ValueError("embedding dimension mismatch: " + ", ".join(f"{k} takes {v}" for k, v in dims.items())
                         + "; they must be trained on the same CLIP model's embeddings")


@torch.no_grad()
def sample_prior(prior: Any, text: Tensor, seeds: Sequence[int], *, steps: int = 64, guidance_scale: float = 0.0,
                 candidates: int | None = None, sampler: str | None = None, eta: float = 0.0,
                 device: str | torch.device = "cpu") -> Tensor:
    """CLIP image embeddings (B, d) for text embeddings (B, d): ``candidates`` draws per caption (None: the
    prior's ``diffusion.options.candidates``, DALL-E 2's 2), the one with the highest dot product with
    the caption's text embedding kept (sec. 2.2); ``guidance_scale`` w: classifier-free guidance with the
    learned null text (w = 0: the conditional prior). Returned in CLIP units (unscaled by sqrt(d))."""
    check_chain(prior, None, int(text.shape[-1]))
    if text.ndim != 2 or text.shape[0] != len(seeds):
        raise ValueError(f"text: expected ({len(seeds)}, d) embeddings (one per seed), got {tuple(text.shape)}")
    options = prior.diffusion.objective_options()
    k = int(options.candidates if candidates is None else candidates)
    if k < 1:
        raise ValueError(f"candidates: {k} is not allowed; it must be >= 1")
    sampler = sampler or registry.OBJECTIVES[prior.diffusion.objective].default_sampler
    text = text.to(device=device, dtype=torch.float32)
    repeated = text.repeat(k, 1)  # (K B, d): candidate-major
    cand_seeds = [sample_seed(int(s), PRIOR_STAGE + j) for j in range(k) for s in seeds]
    view = prior.view(prior.network.to(device))
    view = view.with_net(embedding_guidance(view.net, guidance_scale, repeated))
    x = registry.sample(view, sampler, (len(cand_seeds), text.shape[1]), cand_seeds, steps=steps,
                        options={"clip_denoised": False, "eta": eta}, device=device)  # embeddings: no [-1, 1] clip
    return select_by_text_similarity(unscale_embedding(x).reshape(k, len(seeds), -1), text)


@torch.no_grad()
def decode(decoder: Any, emb: Tensor | None, seeds: Sequence[int], *, steps: int = 50, guidance_scale: float = 0.0,
           sampler: str | None = None, eta: float = 0.0, device: str | torch.device = "cpu") -> Tensor:
    """Images (N, C, H, W) in [-1, 1] from CLIP image embeddings (N, d) (DALL-E 2 sec. 2.1), image i from
    ``seeds[i]``; ``guidance_scale`` w: classifier-free guidance against the embedding-free model;
    ``emb`` None: the unconditional decoder."""
    check_chain(None, decoder, None if emb is None else int(emb.shape[-1]))
    config = decoder.network.config
    sampler = sampler or registry.OBJECTIVES[decoder.diffusion.objective].default_sampler
    view = decoder.view(decoder.network.to(device))
    if emb is not None:
        if emb.ndim != 2 or emb.shape[0] != len(seeds):
            raise ValueError(f"emb: expected ({len(seeds)}, d) embeddings (one per seed), got {tuple(emb.shape)}")
        view = view.with_net(embedding_guidance(view.net, guidance_scale, emb.to(device=device, dtype=torch.float32)))
    shape = (len(seeds), int(config.in_channels), int(config.image_size), int(config.image_size))
    return registry.sample(view, sampler, shape, list(seeds), steps=steps, options={"eta": eta}, device=device)


def interpolate_embeddings(z0: Tensor, z1: Tensor, frames: int) -> Tensor:
    """``frames`` embeddings along the great circle from z0 to z1 (d,) (DALL-E 2 sec. 3.2: slerp between
    two images' CLIP embeddings), endpoints included -> (frames, d)."""
    if frames < 2:
        raise ValueError(f"frames: {frames} is not allowed; it must be >= 2")
    alphas = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    return slerp(z0.expand(frames, -1), z1.expand(frames, -1), alphas)


# ---------------------------------------------------------------------------------------------
# The chain behind launch/sample.py --prior / --variations-of / --slerp (uint8 rows of a grid)


def read_image(path: str, resolution: int):
    """(R, R, 3) uint8: one image file, centre-cropped and resized to R."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from pipeline.data.images import center_crop_resize

    if not Path(path).is_file():
        raise ValueError(f"image: {path!r} does not exist or is not a file")
    try:
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image: {path!r} is not a readable image ({exc})") from None
    return array if array.shape[:2] == (resolution, resolution) else center_crop_resize(array, resolution)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts, or ValueError for none or an empty one."""
    if not prompts:
        raise ValueError("--prompt: none given; give at least one caption, e.g. --prompt 'a red circle'")
    for i, text in enumerate(prompts):
        if not str(text).strip():
            raise ValueError(f"--prompt: prompt {i} is empty ({text!r}); every prompt must have words")
    return [str(t) for t in prompts]


def text_to_images(prior: Any, decoder: Any, embedder: Any, prompts: Sequence[str], num: int, seed: int, *,
                   prior_steps: int = 64, prior_guidance: float = 0.0, candidates: int | None = None,
                   steps: int = 50, guidance_scale: float = 0.0, sampler: str | None = None, eta: float = 0.0,
                   batch_size: int = 16, device: str | torch.device = "cpu") -> tuple[Tensor, list[int], Tensor]:
    """``num`` images per prompt, prompt-major: (P num, C, H, W) in [-1, 1], their seeds (image j of
    prompt p: ``sample_seed(seed, p num + j)``) and the prior's image embeddings (P num, d)."""
    prompts = check_prompts(prompts)
    if num < 1:
        raise ValueError(f"--num: {num} is not allowed; it must be >= 1")
    check_chain(prior, decoder, int(embedder.dim))
    from tqdm.auto import tqdm

    text = embedder.embed_texts(prompts).repeat_interleave(num, dim=0)
    seeds = [sample_seed(seed, i) for i in range(len(prompts) * num)]
    images, zs = [], []
    for start in tqdm(range(0, len(seeds), batch_size), desc="unCLIP prior + decoder", unit="batch"):
        part = slice(start, start + batch_size)  # every draw is per seed: batching does not change the images
        z = sample_prior(prior, text[part], seeds[part], steps=prior_steps, guidance_scale=prior_guidance,
                         candidates=candidates, device=device)
        images.append(decode(decoder, z, seeds[part], steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                             eta=eta, device=device))
        zs.append(z)
    return torch.cat(images), seeds, torch.cat(zs)


def image_variations(decoder: Any, embedder: Any, image, num: int, seed: int, **decode_kw: Any
                     ) -> tuple[Tensor, list[int]]:
    """DALL-E 2 sec. 3.1: ``num`` decodings of one image's CLIP embedding ((H, W, 3) uint8), image j from
    ``sample_seed(seed, j)``."""
    check_chain(None, decoder, int(embedder.dim))
    z = embedder.embed_images(image[None]).repeat(num, 1)
    seeds = [sample_seed(seed, j) for j in range(num)]
    return decode(decoder, z, seeds, **decode_kw), seeds


def slerp_images(decoder: Any, embedder: Any, image_a, image_b, frames: int, seed: int, **decode_kw: Any) -> Tensor:
    """DALL-E 2 sec. 3.2: decodings of ``frames`` points on the slerp between two images' CLIP
    embeddings, all from one seed (``sample_seed(seed, 0)``), so only the embedding changes."""
    check_chain(None, decoder, int(embedder.dim))
    z = embedder.embed_images(torch.stack([torch.as_tensor(image_a), torch.as_tensor(image_b)]).numpy())
    path = interpolate_embeddings(z[0], z[1], frames).float()
    return decode(decoder, path, [sample_seed(seed, 0)] * frames, **decode_kw)


# ---------------------------------------------------------------------------------------------
# Evaluation (launch/evaluate.py --prior-run ... --metrics clip_score): prompts -> images on the actor pool

PROMPT_RULE = "sample i uses prompt i mod K (K = the number of prompts) and seed sample_seed(eval.seed, i)"


def evaluation_prompts(url: str, max_prompts: int) -> tuple[list[str], dict[str, Any]]:
    """The first ``max_prompts`` captions of the dataset at ``url`` (manifest order) and their provenance;
    ValueError when it has none."""
    import hashlib
    import json

    from pipeline.data.reader import read_fields
    from pipeline.data.shards import read_manifest

    shards, total = 0, 0  # read only as many shards as hold max_prompts samples
    for info in read_manifest(url).shards:
        shards, total = shards + 1, total + info.samples
        if total >= max_prompts:
            break
    captions = read_fields(url, fields=(), max_shards=shards)["captions"]
    prompts = [c for c in captions if c and c.strip()][:max_prompts]
    if not prompts:
        raise ValueError(f"eval.prompts_url: {url!r} has no captions (.txt members); prepare it from a source with "
                         "captions (builtin datasets, image folders with sidecar .txt, an .npz with 'captions')")
    sha = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return prompts, {"url": url, "count": len(prompts), "sha256": sha, "first": prompts[:3], "rule": PROMPT_RULE}


def prompts_of(prompts: Sequence[str], indices: Sequence[int]) -> list[str]:
    """The prompt of each sample index (``PROMPT_RULE``)."""
    return [prompts[int(i) % len(prompts)] for i in indices]


@dataclass(frozen=True)
class UnclipSampleFn:
    """Picklable builder for the evaluation workers: each loads the decoder (a run's checkpoint EMA), the
    prior and the CLIP embedder once, then draws sample i from prompt ``prompts[i mod K]`` with its own
    seed, as :func:`sample_prior` and :func:`decode` do (the images do not depend on the batch or worker)."""

    run_url: str
    checkpoint: int
    ema_rate: float | None
    prior: dict[str, Any]  # {"source", "checkpoint", "ema_rate"} for pipeline.loading.load_model
    clip_model: str
    clip_weights: str
    prompts: tuple[str, ...]
    prior_steps: int = 64
    prior_guidance_scale: float = 0.0
    steps: int = 50
    guidance_scale: float = 0.0
    sampler: str | None = None
    eta: float = 0.0
    device: str = "cpu"

    def __call__(self):
        from evaluation.model_sampling import to_uint8
        from pipeline.data.clip_embed import load_embedder
        from pipeline.loading import load_model

        decoder = load_model(self.run_url, checkpoint=self.checkpoint, ema_rate=self.ema_rate, device=self.device)
        p = self.prior
        prior = load_model(p["source"], checkpoint=p["checkpoint"], ema_rate=p["ema_rate"], device=self.device)
        embedder = load_embedder(self.clip_model, self.clip_weights)
        check_chain(prior, decoder, int(embedder.dim))
        texts = embedder.embed_texts(list(self.prompts))

        def sample_fn(indices, seeds):
            text = texts[[int(i) % len(self.prompts) for i in indices]]
            seeds = [int(s) for s in seeds]
            z = sample_prior(prior, text, seeds, steps=self.prior_steps, guidance_scale=self.prior_guidance_scale,
                             device=self.device)
            x = decode(decoder, z, seeds, steps=self.steps, guidance_scale=self.guidance_scale, sampler=self.sampler,
                       eta=self.eta, device=self.device)
            return to_uint8(x)

        return sample_fn


def score_clip(images: Any, prompts: Sequence[str], embedder: Any, *, resamples: int, level: float,
               seed: int) -> dict[str, Any]:
    """CLIP score of generated uint8 images (N, H, W, 3) against their prompts (N captions): the mean cosine of
    the embeddings, with a percentile-bootstrap interval over the N pairs when ``resamples`` > 0."""
    from evaluation.clip_score import clip_score, paired_cosines

    image_emb, text_emb = embedder.embed_images(images), embedder.embed_texts(list(prompts))
    if resamples:
        return clip_score(image_emb, text_emb, resamples=resamples, level=level, seed=seed)
    return {"clip_score": {"value": float(paired_cosines(image_emb, text_emb).mean()), "interval": None},
            "n": len(prompts)}
