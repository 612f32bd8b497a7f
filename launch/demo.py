"""`make demo`: the whole pipeline on this machine, CPU only, with the real entry points.

    python launch/demo.py [--out runs] [--skip-oracle] [--only representation|unclip]

1. the diffusion core against the Gaussian-mixture oracle (DDPM-1000 and DDIM-50 samples plotted
   over the exact density);
2. prepare_data: the builtin shapes10 dataset into local WebDataset shards, by Ray tasks;
3. train: configs/quickstart.yaml (2 Ray workers, DeepSpeed ZeRO-2, EMA, checkpoints);
4. evaluate: DDIM samples from the newest checkpoint's EMA; FID, sFID, precision/recall and KID against
   the data, with the offline NVlabs Inception (TorchScript) as the feature extractor;
5. export + sample: the EMA weights as safetensors, and a grid generated from the export alone.

``--only representation``: diffusion-based representation learning instead (configs/representation_shapes.yaml):
prepare builtin:shapes10_anycolour (and a held-out set), train, evaluate the linear probe (trained
encoder, random encoder, pixel PCA), export, and a reconstruction grid from held-out images' codes.

``--only unclip``: unCLIP (DALL-E 2) on the builtin shapes: train the small offline CLIP on the
captions, prepare the shards with CLIP embeddings, train the prior (configs/unclip_prior_quickstart.yaml)
and the decoder (configs/unclip_decoder_quickstart.yaml), export both, and sample a grid of prompts x
samples from captions alone (text -> CLIP text embedding -> prior -> image embedding -> decoder); the
demo's CLIP then ranks each generated image against the prompts (top-1 vs chance 1/P).

Each stage is the command a user would type; the demo only chains them and says where the
results are.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _stage(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(argv)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo: stage '{title}' failed with exit status {proc.returncode}")
    print(f"--- {title}: done in {time.monotonic() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where data and runs go (default: runs/)")
    parser.add_argument("--skip-oracle", action="store_true", help="skip the oracle plot")
    parser.add_argument("--only", choices=["representation", "unclip"], help="run only this demo")
    args = parser.parse_args(argv)
    out = args.out
    if args.only == "representation":
        return _representation_demo(out)
    if args.only == "unclip":
        return _unclip_demo(out)
    data, run = out / "data" / "builtin", out / "quickstart"

    if not args.skip_oracle:
        _stage("diffusion core vs the Gaussian-mixture oracle",
               ["launch/oracle_demo.py", "--out", str(out / "demo" / "oracle.png"), "--num", "2000"])
    _stage("prepare data (Ray tasks -> WebDataset shards)",
           ["launch/prepare_data.py", "--source", "builtin:shapes10", "--out", str(data), "--num-samples", "20000"])
    _stage("train (Ray Train + DeepSpeed ZeRO-2)",
           ["launch/train.py", "--config", "configs/quickstart.yaml", f"train.run_dir={run}", f"data.url={data}"])
    _stage("evaluate the newest checkpoint (EMA, DDIM-25)",
           ["launch/evaluate.py", "--run", str(run), "--checkpoint", "latest", "--num-samples", "256",
            "--steps", "25", "--workers", "2", "--feature-extractor", "inception-v3-tf-torchscript",
            "--metrics", "fid,sfid,pr,kid", "eval.reference_max_images=1000", "eval.samples_per_shard=64",
            "eval.kid_subset_size=200"])
    export = run / "export" / "ema"
    _stage("export the EMA weights (safetensors + config.json + model card)",
           ["launch/export.py", "--run", str(run), "--out", str(export), "--overwrite"])
    _stage("sample from the export alone (no DeepSpeed, no Ray)",
           ["launch/sample.py", "--model", str(export), "--num", "64",  # the run's evaluation sampler and steps
            "--out", str(run / "samples" / "from_export.png")])

    print("\nDemo finished. Look at:")
    if not args.skip_oracle:
        print(f"  {out / 'demo' / 'oracle.png'}            oracle samples over the exact density")
    print(f"  {run / 'samples'}/                  EMA sample grids during training, and from the export")
    print(f"  {run / 'checkpoints'}/              sharded checkpoints (manifest.json = committed)")
    print(f"  {run / 'logs'}/                     TensorBoard events and metrics.jsonl")
    print(f"  {run / 'eval'}/                     samples and metrics.json of the evaluation")
    print(f"  {export}/                    model.safetensors, config.json, README.md")


def _representation_demo(out: Path) -> None:
    """Representation learning (Abstreiter et al. 2021): probe table and reconstruction grid."""
    import json

    data, heldout, run = out / "data" / "shapes_anycolour", out / "data" / "shapes_anycolour_heldout", out / "representation"
    _stage("prepare builtin:shapes10_anycolour (class = shape; random colour, position, size)",
           ["launch/prepare_data.py", "--source", "builtin:shapes10_anycolour", "--out", str(data),
            "--num-samples", "8000", "--overwrite"])
    _stage("prepare a held-out labelled set (another seed) for the probe",
           ["launch/prepare_data.py", "--source", "builtin:shapes10_anycolour", "--seed", "1", "--out", str(heldout),
            "--num-samples", "2000", "--overwrite"])
    _stage("train encoder + U-Net (Ray Train + DeepSpeed ZeRO-2)",
           ["launch/train.py", "--config", "configs/representation_shapes.yaml", f"train.run_dir={run}",
            f"data.url={data}", "train.resume=never"])
    _stage("linear probe of the EMA encoder vs a random encoder and pixel PCA",
           ["launch/evaluate.py", "--run", str(run), "--checkpoint", "latest", "--metrics", "probe",
            "--num-samples", "16", "--name", "probe", f"eval.probe_url={heldout}"])
    export = run / "export" / "ema"
    _stage("export (network + encoder in objective.safetensors)",
           ["launch/export.py", "--run", str(run), "--out", str(export), "--overwrite"])
    images = run / "demo_inputs"
    images.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from pipeline.data.builtin import builtin_image

    for i in range(10):  # held-out images (seed 7), one per class
        Image.fromarray(builtin_image("shapes10_anycolour", i, 7, 16)).save(images / f"{i:02d}.png")
    grid = run / "samples" / "reconstruction.png"
    _stage("sample from the codes of 10 held-out images (6 seeds each) + an interpolation",
           ["launch/sample.py", "--model", str(export), "--from-images", str(images), "--num", "6",
            "--steps", "50", "--code-interpolate", "8", "--out", str(grid), "--overwrite"])
    metrics = sorted((run / "eval").glob("*/probe/metrics.json"))[-1]
    m = json.loads(metrics.read_text())["metrics"]
    print(f"\nLinear probe on {m['probe_test_count']} held-out images (fit on {m['probe_fit_count']}), d = "
          f"{m['probe_dim']}, accuracy [95% Wilson interval]:")
    for key, title in (("probe", "trained encoder (EMA)"), ("probe_random", "random encoder"),
                       ("probe_pca", "pixel PCA to d")):
        print(f"  {title:24s} {m[key + '_accuracy']:.3f}  [{m[key + '_ci_low']:.3f}, {m[key + '_ci_high']:.3f}]")
    print(f"\n  {metrics}\n  {grid}  (each row: a held-out image, then 6 samples from its code)\n"
          f"  {grid.with_name('reconstruction-interpolation.png')}")


UNCLIP_PROMPTS = ("a red circle", "a green square", "a blue triangle", "a yellow diamond", "a magenta ring",
                  "a cyan plus sign", "an orange cross", "a purple frame", "a white bar", "a pink pair of dots")
UNCLIP_SAMPLES = 6  # per prompt


def _unclip_demo(out: Path) -> None:
    """unCLIP (DALL-E 2): CLIP, embedded shards, prior, decoder, export, a grid of prompts x samples."""
    clip = out / "clip" / "shapes-tiny.safetensors"
    data, prior, decoder = out / "data" / "builtin_clip", out / "unclip" / "prior", out / "unclip" / "decoder"
    if not clip.is_file():
        _stage("train the small offline CLIP on the builtin captions (open_clip's model and loss)",
               ["launch/train_clip.py", "--source", "builtin:shapes10", "--out", str(clip)])
    _stage("prepare builtin:shapes10 with captions and CLIP embeddings (Ray tasks -> WebDataset shards)",
           ["launch/prepare_data.py", "--source", "builtin:shapes10", "--out", str(data), "--num-samples", "20000",
            "--embed", "clip", "--clip-model", "shapes-tiny", "--clip-weights", str(clip)])
    for run, config, title in ((prior, "unclip_prior_quickstart", "the prior: text embedding -> image embedding"),
                               (decoder, "unclip_decoder_quickstart", "the decoder: image embedding -> image")):
        _stage(f"train {title} (Ray Train + DeepSpeed ZeRO-2)",
               ["launch/train.py", "--config", f"configs/{config}.yaml", f"train.run_dir={run}", f"data.url={data}",
                "train.resume=never"])
        _stage(f"export the {run.name}", ["launch/export.py", "--run", str(run), "--out", str(run / "export" / "ema"),
                                      "--overwrite"])
    grid = decoder / "samples" / "prompts.png"
    argv = ["launch/sample.py", "--prior", str(prior / "export" / "ema"), "--model", str(decoder / "export" / "ema"),
            "--clip-model", "shapes-tiny", "--clip-weights", str(clip), "--num", str(UNCLIP_SAMPLES),
            "--prior-guidance", "1", "--guidance-scale", "3", "--batch-size", "12", "--out", str(grid), "--overwrite"]
    for prompt in UNCLIP_PROMPTS:
        argv += ["--prompt", prompt]
    _stage(f"sample {len(UNCLIP_PROMPTS)} prompts x {UNCLIP_SAMPLES} images from captions alone", argv)
    _prior_heldout(prior / "export" / "ema", clip)
    _rank_prompts(grid, clip)


def _prior_heldout(prior_export: Path, clip: Path, num: int = 500) -> None:
    """The prior on held-out pairs (builtin seed 7): cos(sampled, true image embedding) beside the caption's
    text embedding and the mean training image embedding (DALL-E 2 sec. 2.2's question: does the prior help?)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from evaluation.clip_score import prior_baselines
    from evaluation.unclip import sample_prior
    from pipeline.data.builtin import builtin_caption, builtin_image
    from pipeline.data.clip_embed import load_embedder
    from pipeline.loading import load_model

    embedder = load_embedder("shapes-tiny", str(clip))
    train_images = embedder.embed_images(np.stack([builtin_image("shapes10", i, 0) for i in range(2000)]))
    held = range(num)
    images = embedder.embed_images(np.stack([builtin_image("shapes10", i, 7) for i in held]))
    texts = embedder.embed_texts([builtin_caption("shapes10", i, 7) for i in held])
    sampled = sample_prior(load_model(prior_export), texts, list(held), steps=64)
    r = prior_baselines(sampled, texts, images, train_images.mean(0))
    print(f"\nThe prior on {r['n']} held-out caption/image pairs: mean cos(x, true CLIP image embedding) "
          "[95% bootstrap interval]")
    for key, title in (("prior", "prior sample (2 candidates)"), ("text", "the caption's text embedding"),
                       ("mean_image", "mean training image embedding"), ("prior_minus_text", "prior - text"),
                       ("prior_minus_mean_image", "prior - mean image")):
        iv = r[key]["interval"]
        print(f"  {title:32s} {r[key]['value']:.3f}  [{iv['low']:.3f}, {iv['high']:.3f}]")


def _rank_prompts(grid: Path, clip: Path) -> None:
    """The demo CLIP's verdict on the grid: how often an image's nearest prompt is its own (chance 1/P)."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from evaluation.clip_score import clip_score, prompt_top1
    from pipeline.data.clip_embed import load_embedder

    pixels = np.asarray(Image.open(grid).convert("RGB"))
    p, n, pad = len(UNCLIP_PROMPTS), UNCLIP_SAMPLES, 2
    side = (pixels.shape[1] - pad) // n - pad
    cells = [pixels[pad + r * (side + pad):pad + r * (side + pad) + side, pad + c * (side + pad):pad + c * (side + pad) + side]
             for r in range(p) for c in range(n)]
    embedder = load_embedder("shapes-tiny", str(clip))
    images, texts = embedder.embed_images(np.stack(cells)), embedder.embed_texts(list(UNCLIP_PROMPTS))
    index = torch.arange(p).repeat_interleave(n)
    top1 = prompt_top1(images, texts, index)
    score = clip_score(images, texts[index])["clip_score"]
    print(f"\nThe demo CLIP ranks each of the {p * n} generated images against the {p} prompts:")
    print(f"  top-1 (its own prompt nearest): {top1['top1']:.3f} of {int(top1['n'])} (chance {top1['chance']:.3f}, "
          f"sd at chance {top1['sd_at_chance']:.3f})")
    iv = score["interval"]
    print(f"  CLIP score (mean cosine image/prompt): {score['value']:.3f}  [{iv['low']:.3f}, {iv['high']:.3f}]")
    print(f"\n  {grid}  (row p: {n} images for prompt p: {', '.join(UNCLIP_PROMPTS)})")


if __name__ == "__main__":
    main()
