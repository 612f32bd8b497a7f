"""ADM-U cascade: the low-resolution conditioning, the upsampler objective, cascade sampling.

The conditioning math is checked analytically (area downsampling of piecewise-constant images,
a blurred impulse against the Gaussian it should be, the variance of the noise augmentation);
the per-image seeding by comparing an image augmented in its batch and alone. The end-to-end test
trains a tiny base model and a tiny upsampler through the real training loop and DeepSpeed engine
(single process, in a subprocess), exports both, and samples the cascade with launch/sample.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.diffusion.registry import build_objective, objective_options
from pipeline.diffusion.upsampler import (
    LowResConditioned,
    antialiased_downsample,
    augment_low_res,
    gaussian_blur,
    make_low_res,
    noise_augment,
)
from pipeline.models import PRESETS, build_model, meta_parameter_count

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import sample as sample_cli


def test_area_downsampling_averages_each_block():
    blocks = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    big = blocks.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 16x16, constant on 4x4 blocks
    torch.testing.assert_close(antialiased_downsample(big, 4), blocks)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(antialiased_downsample(x, 1).flatten(), x.mean().reshape(1))
    with pytest.raises(ValueError, match="low_res_size: 3 is not allowed for 8x8 images"):
        antialiased_downsample(x, 3)


def test_gaussian_blur_of_an_impulse_is_the_sampled_gaussian_per_image():
    x = torch.zeros(2, 1, 21, 21)
    x[:, :, 10, 10] = 1.0
    sigma = torch.tensor([1.5, 0.0])
    y = gaussian_blur(x, sigma)
    offsets = torch.arange(-10, 11, dtype=torch.float32)
    g = torch.exp(-0.5 * (offsets / 1.5) ** 2)
    radius = math.ceil(3 * 1.5)
    g[offsets.abs() > radius] = 0
    g = g / g.sum()
    torch.testing.assert_close(y[0, 0], g[:, None] * g[None, :])  # separable Gaussian, unit mass
    torch.testing.assert_close(y[1], x[1])  # sigma 0: unchanged
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([2.0])), flat)  # reflect padding keeps constants


def test_noise_augmentation_is_variance_preserving_at_its_level():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 20000, generator=g)
    eps = torch.randn(4, 20000, generator=g)
    level = torch.tensor([0.0, 0.3, 0.6, 0.9])
    z = noise_augment(x, level, eps)
    torch.testing.assert_close(z[0], x[0])
    assert torch.allclose(z.std(dim=1), torch.ones(4), atol=0.03)  # unit variance in, unit variance out
    corr = (z * x).mean(dim=1)  # E[z x] = sqrt(1 - s^2)
    assert torch.allclose(corr, (1 - level**2).sqrt(), atol=0.03)


def test_each_image_is_augmented_from_its_own_seed():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seeds = [11, 22, 33, 44]
    low, level = augment_low_res(x, 8, seeds, blur_sigma_max=1.0, noise_level_max=0.5)
    for i in range(4):
        alone, alone_level = augment_low_res(x[i:i + 1], 8, seeds[i:i + 1], blur_sigma_max=1.0, noise_level_max=0.5)
        torch.testing.assert_close(low[i:i + 1], alone)
        assert alone_level.item() == level[i].item()
    other, _ = augment_low_res(x[:1], 8, [12], blur_sigma_max=1.0, noise_level_max=0.5)
    assert not torch.allclose(other, low[:1])
    assert len(set(level.tolist())) == 4 and all(0 <= v < 0.5 for v in level.tolist())
    # the training path draws the seeds from the loop's generator: same stream, same conditioning
    a = make_low_res(x, 8, blur_sigma_max=1.0, noise_level_max=0.5, generator=torch.Generator().manual_seed(5))
    b = make_low_res(x, 8, blur_sigma_max=1.0, noise_level_max=0.5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # with no augmentation the conditioning is the area-downsampled image exactly
    plain, zero = augment_low_res(x, 4, seeds, blur_sigma_max=0.0, noise_level_max=0.0)
    assert torch.equal(plain, antialiased_downsample(x, 4)) and not zero.any()


UP = dict(image_size=16, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), norm_groups=4,
          num_classes=10, low_res_channels=3, cond_embed_dim=8, dropout=0.0)


def test_the_network_sees_the_low_res_image_and_the_level():
    torch.manual_seed(0)
    net = build_model("tiny", **UP).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    low = torch.rand(2, 3, 8, 8) * 2 - 1
    bound = LowResConditioned(net, 8)
    with torch.no_grad():
        a = bound.with_low_res(low, 0.0)(x, t)
        b = bound.with_low_res(-low, 0.0)(x, t)
        c = bound.with_low_res(low, 0.3)(x, t)
        doubled = bound.with_low_res(low, 0.3)(torch.cat([x, x]), torch.cat([t, t]))  # guidance's two halves
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(doubled, torch.cat([c, c]))
    with pytest.raises(ValueError, match=r"low_res: expected \(B, C, 8, 8\)"):
        bound.with_low_res(torch.zeros(2, 3, 4, 4))


def test_the_objective_trains_only_a_network_that_takes_the_low_res_image():
    options = objective_options("upsampler", {"low_res_size": 8, "noise_level_max": 0.2}, {"timesteps": 50})
    objective = build_objective("upsampler", options)
    torch.manual_seed(0)
    net = build_model("tiny", **UP)
    with torch.no_grad():
        net.out_conv.weight.normal_(0, 0.05)  # zero-initialised: no gradient would reach the input layer
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    y = torch.tensor([1, 2, 3])
    out = objective.training_loss(net, x0, y, generator=torch.Generator().manual_seed(1))
    out.loss.mean().backward()
    assert out.loss.shape == (3,) and torch.isfinite(out.loss).all()
    assert net.input_blocks[0][0].weight.grad[:, 3:].abs().sum() > 0  # the low-res channels get gradient
    plain = build_model("tiny", **{**UP, "low_res_channels": 0})
    with pytest.raises(ValueError, match="low_res_channels"):
        objective.training_loss(plain, x0, y, generator=torch.Generator().manual_seed(1))
    no_level_input = build_model("tiny", **{**UP, "cond_embed_dim": 0})
    with pytest.raises(ValueError, match="cond_embed_dim"):
        objective.training_loss(no_level_input, x0, y, generator=torch.Generator().manual_seed(1))


def test_imagenet_upsampler_preset_is_the_released_network():
    cfg = load_config(ROOT / "configs" / "imagenet64_256_upsampler.yaml")
    net = PRESETS[cfg.model.preset]
    # guided-diffusion's 64->256 upsampler flags, read by the converter, describe this exact network
    from pipeline.convert import network_config, parse_flags

    flags = ("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256 "
             "--small_size 64 --learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 "
             "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True")
    assert network_config("guided-diffusion", parse_flags("guided-diffusion", flags)) == net
    # 311,795,910 parameters in openai's UNet built with those flags (counted outside this repository)
    # + this U-Net's null-class embedding row (4 x 192 = 768)
    assert meta_parameter_count(cfg.model.preset) == 311_795_910 + 4 * 192
    assert cfg.diffusion.objective_options().low_res_size == 64 and cfg.data.resolution == 256


_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from pipeline.config import load_config
from pipeline.export import export_run
from pipeline.train.loop import train
root, data, base, up = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
for name, extra in (("base", base), ("up", up)):
    train(load_config(None, [*extra, f"data.url={data}", f"train.run_dir={root}/{name}"]))
    export_run(f"{root}/{name}", f"{root}/{name}_export")
print("DONE")
"""

_COMMON = ["model.preset=tiny", "data.shuffle_buffer=32", "train.micro_batch=8", "train.log_every_images=8",
           "train.ema_rates=[0.9]", "train.zero_stage=0", "train.total_images=16", "train.lr=1e-3",
           "train.checkpoint_every_images=16", "train.sample_every_images=0", "data.require_labels=true",
           "train.collective_timeout_s=120"]
_BASE = [*_COMMON, "data.resolution=8", "diffusion.timesteps=50",
         ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1], attention_resolutions: [], "
          "norm_groups: 4, num_classes: 10}")]
_UP = [*_COMMON, "data.resolution=16", "diffusion.objective=upsampler", "diffusion.timesteps=50",
       "diffusion.options={low_res_size: 8, blur_sigma_max: 0.5, noise_level_max: 0.3, sample_noise_level: 0.1}",
       ("model.overrides={image_size: 16, base_channels: 8, channel_mult: [1, 2], attention_resolutions: [], "
        "norm_groups: 4, num_classes: 10, low_res_channels: 3, cond_embed_dim: 8}")]


@pytest.fixture(scope="module")
def cascade(tmp_path_factory) -> Path:
    from pipeline.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("cascade")
    prepare_dataset("builtin:shapes10", str(root / "data"), shard_size=64, num_samples=64, workers=0, progress=False)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(root), str(root / "data"), json.dumps(_BASE),
                           json.dumps(_UP)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def test_cascade_sampling_makes_images_at_the_upsampler_resolution(cascade, tmp_path):
    grid = tmp_path / "grid.png"
    args = ["--model", str(cascade / "base_export"), "--upsampler", str(cascade / "up_export"), "--num", "4",
            "--steps", "3", "--upsampler-steps", "3", "--device", "cpu", "--seed", "7"]
    assert sample_cli.main([*args, "--out", str(grid)]) == 0
    assert Image.open(grid).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)  # 2x2 cells of 16x16, 2 px padding
    folder = tmp_path / "images"
    assert sample_cli.main([*args, "--out", str(folder)]) == 0
    info = json.loads((folder / "samples.json").read_text())
    assert info["cascade"]["noise_level"] == pytest.approx(0.1)  # the export's sample_noise_level
    assert info["cascade"]["source"]["kind"] == "export"
    assert all(Image.open(folder / r["file"]).size == (16, 16) for r in info["images"])
    # image i depends on its seed only: the same images from batches of one
    single = tmp_path / "single"
    assert sample_cli.main([*args, "--batch-size", "1", "--out", str(single)]) == 0
    for r in info["images"]:
        assert Image.open(folder / r["file"]).tobytes() == Image.open(single / r["file"]).tobytes()


def test_cascade_refuses_a_mismatched_second_stage_with_exit_2(cascade, tmp_path, capsys):
    common = ["--num", "2", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "g.png")]
    # the base model is not a super-resolution model
    code = sample_cli.main(["--model", str(cascade / "base_export"), "--upsampler", str(cascade / "base_export"),
                            *common])
    assert code == 2 and "not a super-resolution one" in capsys.readouterr().err
    # the upsampler's 16x16 output is not what it takes (8x8)
    code = sample_cli.main(["--model", str(cascade / "up_export"), "--upsampler", str(cascade / "up_export"),
                            *common])
    assert code == 2 and "upsamples 8x8 images, the first stage makes 16x16" in capsys.readouterr().err
    code = sample_cli.main(["--model", str(cascade / "base_export"), "--upsampler", str(cascade / "up_export"),
                            "--upsampler-noise-level", "1.5", *common])
    assert code == 2 and "--upsampler-noise-level: 1.5 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_scores_the_cascade_at_the_upsampler_resolution(cascade, tmp_path):
    """launch/evaluate.py --upsampler-run: the stored samples are the first stage's evaluation samples
    upsampled with their own seeds (bitwise), the metrics are at 16x16, and both stages are on record
    in metrics.json and in the first stage's model card."""
    import numpy as np

    from evaluation.cascade import upsample_images
    from evaluation.evaluate import sampler_settings
    from evaluation.model_sampling import CheckpointSampleFn
    from evaluation.sampling import read_samples, sample_seeds
    from pipeline.export import export_run
    from pipeline.loading import load_model, read_run_config

    base, up = str(cascade / "base"), str(cascade / "up")
    n = 4
    out = _evaluate("--run", base, "--upsampler-run", up, "--upsampler-steps", "2", "--steps", "2",
                    "--num-samples", str(n), "--metrics", "fid", "--bootstrap-resamples", "0", "--no-progress",
                    "--feature-extractor", "inception-v3-tf-torchscript", f"eval.samples_per_shard={n}",
                    "eval.reference_max_images=16", f"eval.reference_cache={tmp_path / 'ref'}")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    [metrics_file] = (cascade / "base" / "eval").glob("*/*-up*/metrics.json")
    record = json.loads(metrics_file.read_text())
    assert record["resolution"] == 16 and record["metrics"]["fid"] > 0
    stage = record["cascade"]
    assert stage["source"]["run"] == up and stage["source"]["kind"] == "checkpoint"
    assert (stage["resolution"], stage["low_res_size"], stage["steps"]) == (16, 8, 2)
    assert stage["noise_level"] == pytest.approx(0.1)  # the upsampler's sample_noise_level

    cfg = read_run_config(base)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"steps": 2, "num_samples": n})})
    images, labels = CheckpointSampleFn(base, record["checkpoint"]["images_seen"], record["ema_rate"],
                                        cfg.model.model_dump(mode="json"), cfg.diffusion.model_dump(mode="json"),
                                        sampler_settings(cfg.eval))()(np.arange(n), sample_seeds(0, range(n)))
    expected, _ = upsample_images(load_model(up), images, [int(s) for s in sample_seeds(0, range(n))], labels,
                                  steps=2)
    [stored] = list(read_samples(str(metrics_file.parent), n, n))
    assert stored.shape == (n, 16, 16, 3) and np.array_equal(stored, expected)

    card = export_run(base, str(tmp_path / "export"))
    text = (Path(card.path) / "README.md").read_text()
    assert f"upsampled to 16x16 by `{up}`" in text and "metrics of the cascade" in text


def test_evaluate_refuses_a_second_stage_that_does_not_fit_before_ray_starts(cascade):
    out = _evaluate("--run", str(cascade / "base"), "--upsampler-run", str(cascade / "base"), "--no-progress",
                    "--feature-extractor", "inception-v3-tf-torchscript")
    assert out.returncode == 2 and "not a super-resolution one" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stderr
    out = _evaluate("--run", str(cascade / "base"), "--upsampler-run", str(cascade / "up"),
                    "--upsampler-noise-level", "1.5", "--no-progress")
    assert out.returncode == 2 and "eval.upsampler_noise_level" in out.stderr, out.stderr[-2000:]
