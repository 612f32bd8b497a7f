"""Diffusion-based representation learning (Abstreiter et al. 2021) and its linear-probe metric.

The objective against the DDPM objective it extends (exact parity with the code withheld, the L1
term exactly), its training through the real loop (single-process DeepSpeed in a subprocess, as
tests/test_objectives_integration.py), the export and ``launch/sample.py --from-images``, the
probe (deterministic; the encoder trained by the objective alone, no labels, beats a random one and
pixel PCA by a stated margin, a constant encoder does not) and bad input at the CLIs (exit 2).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.probe import linear_probe, probe_checkpoint, wilson_interval
from pipeline.config import load_config
from pipeline.diffusion.objectives import DDPMObjective
from pipeline.diffusion.registry import OBJECTIVES, build_objective, make_view, objective_options, sample
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]
OBJ = "representation"
D = 8
TINY = dict(image_size=8, base_channels=8, channel_mult=(1,), attention_resolutions=(), norm_groups=4,
            cond_embed_dim=D, dropout=0.0)
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONPATH": str(ROOT)}


def _randomized(model, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def _objective(**options):
    torch.manual_seed(0)
    return build_objective(OBJ, {"code_dim": D, "timesteps": 100, **options})


def test_withheld_code_gives_the_ddpm_loss_exactly_and_l1_adds_lambda_times_the_norm():
    net = _randomized(build_model("tiny", **TINY))
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    rep = _objective(lambda_z=0.5, parameterization="v", schedule="cosine")
    ddpm = DDPMObjective("cosine", 100, "v", "fixed_large", "simple", 0.001)

    def gen():
        return torch.Generator().manual_seed(7)

    withheld = rep.loss_given_code(net, x0, None, None, generator=gen())
    base = ddpm.training_loss(net, x0, None, generator=gen())
    assert torch.equal(withheld.loss, base.loss) and torch.equal(withheld.t_index, base.t_index)
    z = rep.encode(x0)
    coded = rep.training_loss(net, x0, None, generator=gen())
    unpenalised = _objective(lambda_z=0.0, parameterization="v", schedule="cosine").training_loss(
        net, x0, None, generator=gen())
    torch.testing.assert_close(coded.loss - unpenalised.loss, 0.5 * z.abs().sum(1))
    assert not torch.allclose(unpenalised.loss, base.loss)  # the code reaches the network


def test_network_without_the_code_dimension_is_refused():
    net = build_model("tiny", **{**TINY, "cond_embed_dim": 4})
    with pytest.raises(ValueError, match=r"model.overrides.cond_embed_dim: 4 is not allowed with "
                                         r"diffusion.options.code_dim 8"):
        _objective().training_loss(net, torch.zeros(2, 3, 8, 8))


def test_samplers_draw_given_codes_and_code_zero_is_the_unconditional_view():
    net = _randomized(build_model("tiny", **TINY)).eval()
    rep = _objective()
    view = make_view(OBJ, net, rep, objective_options(OBJ, {"code_dim": D, "timesteps": 100}))
    seeds = [3, 4]
    with torch.no_grad():
        plain = sample(view, OBJECTIVES[OBJ].default_sampler, (2, 3, 8, 8), seeds, steps=3)
        zero = sample(view.with_code(torch.zeros(2, D)), "ddim", (2, 3, 8, 8), seeds, steps=3)
        coded = sample(view.with_code(torch.ones(2, D)), "ddim", (2, 3, 8, 8), seeds, steps=3)
    torch.testing.assert_close(plain, zero)
    assert not torch.allclose(coded, zero)


def test_wilson_interval_matches_its_closed_form():
    low, high = wilson_interval(50, 100)  # p = 1/2: centre 1/2, half-width z/(2 sqrt(n + z^2))
    half = 1.959964 / (2 * np.sqrt(100 + 1.959964**2))
    assert abs(low - (0.5 - half)) < 1e-12 and abs(high - (0.5 + half)) < 1e-12
    assert wilson_interval(0, 10)[0] == 0.0 and abs(wilson_interval(10, 10)[1] - 1.0) < 1e-12


class _Constant(torch.nn.Module):
    """A broken encoder: the same code for every image."""

    def __init__(self, d):
        super().__init__()
        self.z = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.z.expand(x.shape[0], -1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pipeline.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("representation")
    prepare_dataset("builtin:shapes10_anycolour", str(root / "train"), shard_size=2000, num_samples=8000,
                    resolution=16, workers=0, progress=False)
    prepare_dataset("builtin:shapes10_anycolour", str(root / "heldout"), shard_size=2000, num_samples=PROBE_IMAGES,
                    resolution=16, workers=0, progress=False, seed=1)
    flat = root / "flat"
    flat.mkdir()
    from PIL import Image

    from pipeline.data.builtin import builtin_image

    for i in range(6):
        Image.fromarray(builtin_image("shapes10_anycolour", i, 2, 16)).save(flat / f"{i}.png")
    prepare_dataset(str(flat), str(root / "unlabelled"), shard_size=10, workers=0, progress=False)
    return root


# The probe compares accuracies on PROBE_IMAGES / 2 held-out test images. Two accuracies near 0.3
# on n = 2000 test images differ by sampling alone with standard error sqrt(2 * 0.3 * 0.7 / n) =
# 0.0145; the trained encoder must beat the better baseline by 4 of those.
PROBE_IMAGES = 4000
MARGIN = 4 * float(np.sqrt(2 * 0.3 * 0.7 / (PROBE_IMAGES / 2)))
STEPS = 1000  # diffusion training steps of the encoder (batch 32)


@pytest.fixture(scope="module")
def diffusion_encoder(data):
    """The objective's encoder trained with a small U-Net by the representation objective alone (x0
    parameterisation, as configs/representation_shapes.yaml; no labels), in-process: the demo data,
    1000 steps of 32 images. Measured on this machine (probe of 2000 test images; random encoder
    0.258, pixel PCA 0.231, so the bar is 0.316): torch seeds 0 and 3 give 0.355 and 0.409 at 1000
    steps, 0.307 and 0.376 at 750 (seeds 1 and 2: 0.397 and 0.380 at 750), 0.45 at 1250: the code
    keeps improving with training (the demo trains 3000 steps through Ray and DeepSpeed, README).
    Training with the code withheld from the network (the broken variant: the encoder gets no
    gradient) leaves the probe at 0.260, the random encoder's, and fails the margin."""
    from evaluation.model_sampling import from_uint8
    from evaluation.probe import labelled_images

    x = from_uint8(labelled_images(str(data / "train"), 8000)[0])
    torch.manual_seed(0)
    objective = build_objective(OBJ, {"code_dim": 16, "timesteps": 1000, "schedule": "cosine",
                                      "parameterization": "x0", "variance": "fixed_small", "lambda_z": 1e-4})
    net = build_model("tiny", image_size=16, base_channels=16, channel_mult=(1, 2), attention_resolutions=(),
                      num_classes=0, cond_embed_dim=16, dropout=0.0)
    params = [*net.parameters(), *objective.parameters()]
    opt = torch.optim.AdamW(params, lr=4e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        loss = objective.training_loss(net, x[torch.randint(0, len(x), (32,), generator=g)], None, generator=g)
        opt.zero_grad()
        loss.loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return objective.encoder.eval()


def test_the_diffusion_trained_encoder_beats_both_baselines_and_a_constant_one_fails(data, diffusion_encoder):
    heldout = str(data / "heldout")
    result = linear_probe(diffusion_encoder, heldout, max_images=PROBE_IMAGES, seed=0)
    print({k: round(v, 3) for k, v in result.items() if k.endswith("accuracy")}, "margin", round(MARGIN, 3))
    assert result["probe_test_count"] == PROBE_IMAGES // 2
    best_baseline = max(result["probe_random_accuracy"], result["probe_pca_accuracy"])
    assert result["probe_accuracy"] >= best_baseline + MARGIN
    broken = linear_probe(_Constant(16), heldout, max_images=PROBE_IMAGES, seed=0)
    assert broken["probe_accuracy"] < max(broken["probe_random_accuracy"], broken["probe_pca_accuracy"]) + MARGIN
    assert broken["probe_accuracy"] <= 0.13  # chance is 0.1 (sd 0.007 at n = 2000): a constant code carries nothing
    # the pixel baseline is far from perfect on this data (the point of shapes10_anycolour)
    assert result["probe_pca_accuracy"] < 0.6
    # deterministic given the seed; another seed splits and initialises differently
    assert linear_probe(diffusion_encoder, heldout, max_images=PROBE_IMAGES, seed=0) == result
    assert linear_probe(diffusion_encoder, heldout, max_images=PROBE_IMAGES, seed=1) != result


RUN_CODE = r"""
import json, sys, torch
torch.set_num_threads(1)
from pipeline.config import load_config
from pipeline.train.loop import train
print("RESULT", json.dumps(train(load_config(sys.argv[1], sys.argv[2:]))["images_seen"]), flush=True)
"""


def _cli(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_trains_through_the_loop_exports_probes_and_samples_from_images(data, tmp_path):
    run = tmp_path / "run"
    overrides = [f"train.run_dir={run}", f"data.url={data / 'train'}", "train.total_images=32",
                 "train.micro_batch=8", "train.num_workers=1", "train.checkpoint_every_images=32",
                 "train.log_every_images=16", "train.sample_every_images=32", "train.warmup_images=0",
                 f"eval.probe_url={data / 'heldout'}", "eval.probe_max_images=200"]
    proc = subprocess.run([sys.executable, "-c", RUN_CODE, "configs/representation_shapes.yaml", *overrides],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (run / "samples" / "latest.png").is_file()  # the training-time grid samples at code z = 0
    from pipeline.train.checkpoint import load_ema_weights

    weights, _ = load_ema_weights(str(run))
    assert any(k.startswith("objective.encoder.") for k in weights)

    cfg = load_config(run / "config.yaml", [f"eval.probe_url={data / 'heldout'}", "eval.probe_max_images=200"])
    probe = probe_checkpoint(cfg, str(run), 32, None)
    assert probe == probe_checkpoint(cfg, str(run), 32, None)
    assert {"probe_accuracy", "probe_random_accuracy", "probe_pca_accuracy"} <= set(probe)
    assert probe["probe_ci_low"] <= probe["probe_accuracy"] <= probe["probe_ci_high"]

    # no labels for the probe: exit 2 with a message, before any sampling
    bad = _cli("launch/evaluate.py", "--run", str(run), "--metrics", "probe", "--num-samples", "2",
               f"eval.probe_url={data / 'unlabelled'}")
    assert bad.returncode == 2 and "has no 'cls' labels" in bad.stderr, bad.stderr[-2000:]

    export = tmp_path / "export"
    done = _cli("launch/export.py", "--run", str(run), "--out", str(export))
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "recon.png"
    done = _cli("launch/sample.py", "--model", str(export), "--from-images", str(data / "flat"), "--num", "3",
                "--steps", "2", "--code-interpolate", "4", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    from PIL import Image

    with Image.open(out) as grid:  # 6 rows of (image + 3 samples), 16 px cells with 2 px padding
        assert grid.size == (4 * 18 + 2, 6 * 18 + 2)
    assert (tmp_path / "recon-interpolation.png").is_file()


def test_bad_code_dimension_exits_2_with_a_message(tmp_path):
    proc = _cli("launch/train.py", "--config", "configs/representation_shapes.yaml",
                f"train.run_dir={tmp_path / 'r'}", "diffusion.options.code_dim=0", timeout=120)
    assert proc.returncode == 2
    assert "diffusion.options.code_dim" in proc.stderr and "greater than or equal to 1" in proc.stderr, proc.stderr
