"""Every objective end to end: a few steps of the real training loop (single-process DeepSpeed in a
subprocess, as tests/test_train_unit.py), then evaluation's samplers on the checkpoints and on tiny
random-initialised networks: each (objective, sampler) pair, per-sample seeds, classifier-free and
classifier guidance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation.model_sampling import (
    OBJECTIVE_SAMPLERS,
    CheckpointSampleFn,
    SamplerSettings,
    check_sampler,
    make_sample_fn,
)
from pipeline.config import DiffusionConfig, load_config
from pipeline.diffusion import make_continuous_objective
from pipeline.models import build_model

ROOT = Path(__file__).resolve().parents[1]

# ~11k-parameter U-Net at 8x8, class-conditional on 10 classes (as tests/test_train_unit.py).
TINY = dict(image_size=8, base_channels=8, channel_mult=(1,), attention_resolutions=(), norm_groups=4,
            num_classes=10, dropout=0.0)
TINY_CLASSIFIER = dict(image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(4,), num_head_channels=8, norm_groups=4, num_classes=10)
OPTIONS = {"vdm": {"hidden": 16}, "ncsn": {"num_scales": 5}}  # small learned schedule, few NCSN levels


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Non-zero weights everywhere (a zero-initialised output layer would make every sampler trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return _randomize(build_model("tiny", **TINY), 0)


def _objective(kind: str):
    """The objective module a checkpoint would hold (VDM's learned schedule), for random-init tests."""
    if kind not in ("vdm", "representation"):  # the objectives with parameters of their own
        return None
    torch.manual_seed(1)
    return make_continuous_objective(kind, OPTIONS.get(kind, {}))


PAIRS = [(kind, s, {}) for kind, samplers in OBJECTIVE_SAMPLERS.items() for s in samplers] + [
    ("ve_sde", "pc", {"predictor": "euler_maruyama", "corrector_steps": 0}),  # predictor only
    ("subvp_sde", "pc", {"corrector_steps": 2}),
]


@pytest.mark.parametrize("kind,sampler,extra", PAIRS, ids=[f"{k}-{s}" + "".join(f"-{v}" for v in e.values()) for k, s, e in PAIRS])
def test_every_sampler_is_finite_shaped_and_batch_independent(net, kind, sampler, extra):
    d = DiffusionConfig(objective=kind, timesteps=100, options=OPTIONS.get(kind, {}))
    fn = make_sample_fn(net, SamplerSettings(sampler, steps=3, ode_tol=1e-3, **extra), diffusion=d,
                        objective=_objective(kind))
    seeds = np.array([101, 202, 303])
    images, labels = fn(np.arange(3), seeds)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (3,)
    x, _ = fn.samples(seeds)
    assert x.shape == (3, 3, 8, 8) and torch.isfinite(x).all()
    alone, label = fn.samples(seeds[1:2])
    assert label[0] == labels[1]
    # 'ode' picks its adaptive steps for the whole batch: equal to the solver's tolerance only.
    tol = 1e-2 if sampler == "ode" else 1e-4
    torch.testing.assert_close(alone[0], x[1], rtol=tol, atol=tol * x[1].abs().max().item())
    shuffled, _ = fn.samples(seeds[[2, 1, 0]])  # nor does the position in the batch
    torch.testing.assert_close(shuffled[1], x[1], rtol=tol, atol=tol * x[1].abs().max().item())
    assert not torch.allclose(x[0], x[1])


def test_the_sample_function_reports_the_steps_its_sampler_takes(net):
    """Karras levels snapped to a discrete schedule merge: EDM asked for 40 levels of the 1000-step cosine
    schedule takes 22 steps, and the sample function (what samples.json and metrics.json record) says so."""
    cosine = DiffusionConfig(objective="ddpm", schedule="cosine", timesteps=1000)
    assert make_sample_fn(net, SamplerSettings("edm", steps=40), diffusion=cosine).steps_used == 22
    assert make_sample_fn(net, SamplerSettings("ddim", steps=40), diffusion=cosine).steps_used == 40
    assert make_sample_fn(net, SamplerSettings("edm", steps=40), diffusion=DiffusionConfig(objective="vp_sde")).steps_used == 40


def test_unsupported_pairs_name_objective_sampler_and_allowed(net):
    with pytest.raises(ValueError, match=r"sampler: 'langevin' is not allowed for objective 'vp_sde'; allowed: pc, ode"):
        make_sample_fn(net, SamplerSettings("langevin"), diffusion=DiffusionConfig(objective="vp_sde"))
    with pytest.raises(ValueError, match=r"sampler: 'pc' is not allowed for objective 'ddpm'; allowed: ddpm, ddim"):
        make_sample_fn(net, SamplerSettings("pc"))
    with pytest.raises(ValueError, match="objective: 'classifier' has no sampler"):
        check_sampler("classifier", SamplerSettings("ddim"))
    with pytest.raises(ValueError, match="learned noise schedule"):
        make_sample_fn(net, SamplerSettings("ddpm"), diffusion=DiffusionConfig(objective="vdm"))
    with pytest.raises(ValueError, match="sampler: 'euler_a' is not allowed"):
        SamplerSettings("euler_a")
    with pytest.raises(ValueError, match="class_label: 10 is not allowed; classes: 0..9"):
        make_sample_fn(net, SamplerSettings("ddim", class_label=10))
    unconditional = _randomize(build_model("tiny", **{**TINY, "num_classes": 0}), 3)
    with pytest.raises(ValueError, match="guidance_scale: 2.0 is not allowed for an unconditional model"):
        make_sample_fn(unconditional, SamplerSettings("ddim", guidance_scale=2.0))
    with pytest.raises(ValueError, match="classifier_scale: 1.0 needs a noisy classifier"):
        make_sample_fn(net, SamplerSettings("ddim", classifier_scale=1.0))


class _HandGuided(torch.nn.Module):
    """Classifier-free guidance written out: (1 + w) out(x, t, y) - w out(x, t, null) (Ho & Salimans eq. 6)."""

    def __init__(self, model: torch.nn.Module, w: float):
        super().__init__()
        self.model, self.w, self.config = model, w, model.config

    def forward(self, x, t, y=None):
        null = torch.full_like(y, self.config.num_classes)
        return (1 + self.w) * self.model(x, t, y) - self.w * self.model(x, t, null)


@pytest.mark.parametrize("kind,sampler", [("ddpm", "ddim"), ("vp_sde", "heun"), ("ncsn", "langevin")])
def test_classifier_free_guidance_follows_the_formula_and_w0_is_conditional(net, kind, sampler):
    d = DiffusionConfig(objective=kind, timesteps=100, options=OPTIONS.get(kind, {}))
    seeds = np.array([5, 6])

    def draw(model, w=0.0, label=3):
        return make_sample_fn(model, SamplerSettings(sampler, steps=3, guidance_scale=w, class_label=label),
                              diffusion=d)(np.arange(2), seeds)

    conditional, labels = draw(net)
    assert labels.tolist() == [3, 3]
    assert np.array_equal(draw(net, 0.0)[0], conditional)
    assert np.array_equal(draw(_HandGuided(net, 0.0))[0], conditional)
    guided = draw(net, 1.5)[0]
    assert np.array_equal(guided, draw(_HandGuided(net, 1.5))[0])
    assert not np.array_equal(guided, conditional)


def test_classifier_guidance_changes_the_samples_and_keeps_them_per_seed(net):
    classifier = _randomize(build_model("adm_classifier_64", **TINY_CLASSIFIER), 4, scale=0.2)
    seeds = np.arange(6) + 40
    for sampler in ("ddim", "ddpm"):
        base = make_sample_fn(net, SamplerSettings(sampler, steps=3), classifier=classifier)
        guided = make_sample_fn(net, SamplerSettings(sampler, steps=3, classifier_scale=20.0), classifier=classifier)
        (plain, labels), (images, guided_labels) = base(np.arange(6), seeds), guided(np.arange(6), seeds)
        assert np.array_equal(labels, guided_labels) and not np.array_equal(plain, images)
        alone, _ = guided(np.arange(1), seeds[2:3])
        assert np.array_equal(alone[0], images[2])
    # An unconditional model guided by the classifier: labels come from the classifier's classes.
    unconditional = _randomize(build_model("tiny", **{**TINY, "num_classes": 0}), 5)
    images, labels = make_sample_fn(unconditional, SamplerSettings("ddim", steps=3, classifier_scale=1.0),
                                    classifier=classifier)(np.arange(4), seeds[:4])
    assert images.shape == (4, 8, 8, 3) and labels.min() >= 0 and labels.max() < 10
    with pytest.raises(ValueError, match="classifier guidance is not allowed for objective 'vp_sde'"):
        make_sample_fn(net, SamplerSettings("pc", classifier_scale=1.0), classifier=classifier,
                       diffusion=DiffusionConfig(objective="vp_sde"))


# ---------------------------------------------------------------------------------------------
# The real training loop, every objective (one subprocess), then evaluation on the checkpoints


TRAIN_BASE = [
    "model.preset=tiny",
    ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1], attention_resolutions: [], "
     "norm_groups: 4, num_classes: 10}"),
    "data.resolution=8", "data.shuffle_buffer=32", "train.micro_batch=4", "train.log_every_images=8",
    "train.ema_rates=[0.9]", "train.lr=1e-3", "train.collective_timeout_s=120", "train.zero_stage=1",
    "train.total_images=16", "train.checkpoint_every_images=16", "diffusion.label_dropout=0.2",
]
RUNS = {
    "ddpm": ["diffusion.objective=ddpm"],
    "vp_sde": ["diffusion.objective=vp_sde"],
    "subvp_sde": ["diffusion.objective=subvp_sde"],
    "ve_sde": ["diffusion.objective=ve_sde", "diffusion.options={sigma_max: 10}"],
    "ncsn": ["diffusion.objective=ncsn", "diffusion.options={num_scales: 5}"],
    "vdm": ["diffusion.objective=vdm", "diffusion.options={hidden: 16}"],
    # VDM with Fourier features (Kingma et al. 2021, App. B): 3 + 6 input channels, 3 predicted
    "vdm_fourier": [("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1], attention_resolutions: [], "
                     "norm_groups: 4, num_classes: 10, in_channels: 9, prediction_channels: 3}"),
                    "diffusion.objective=vdm", "diffusion.options={hidden: 16, fourier_features: true}"],
    "classifier": ["model.preset=adm_classifier_64",
                   ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1, 2], num_res_blocks: 1, "
                    "attention_resolutions: [4], num_head_channels: 8, norm_groups: 4, num_classes: 10}"),
                   "diffusion.objective=classifier", "data.require_labels=true",
                   "diffusion.label_dropout=0"],  # the loop would drop labels to the null class 10 otherwise
}
TRAIN_CODE = r"""
import json, sys, torch
torch.set_num_threads(1)
from pipeline.config import load_config
from pipeline.train.loop import train
base, runs, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name, extra in runs.items():
    summary = train(load_config(None, [*base, f"train.run_dir={root}/{name}", *extra]))
    print("RESULT", json.dumps({"name": name, "images": summary["images_seen"]}), flush=True)
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from pipeline.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("objectives")
    data = root / "data"
    prepare_dataset("builtin:shapes10", str(data), shard_size=64, num_samples=128, workers=0, progress=False)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", TRAIN_CODE, json.dumps([*TRAIN_BASE, f"data.url={data}"]),
                           json.dumps(RUNS), str(root)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    done = [json.loads(x.split(" ", 1)[1]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert [r["name"] for r in done] == list(RUNS) and all(r["images"] == 16 for r in done)
    return root


@pytest.mark.parametrize("name", list(RUNS))
def test_each_objective_trains_with_finite_loss_and_commits(trained, name):
    from pipeline.train.checkpoint import committed_checkpoints, load_ema_weights

    run = trained / name
    losses = [json.loads(x)["loss"] for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert [c.images_seen for c in committed_checkpoints(str(run))] == [16]
    weights, _ = load_ema_weights(str(run))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(k.startswith("objective.gamma.") for k in weights) == name.startswith("vdm")  # learned schedule


CHECKPOINT_SAMPLERS = {"ddpm": "dpm_solver", "vp_sde": "edm", "subvp_sde": "pc", "ve_sde": "heun",
                       "ncsn": "langevin", "vdm": "ddpm", "vdm_fourier": "ddpm"}


@pytest.mark.parametrize("name", list(CHECKPOINT_SAMPLERS))
def test_evaluation_samples_each_trained_checkpoint(trained, name):
    cfg = load_config(trained / name / "config.yaml")
    builder = CheckpointSampleFn(str(trained / name), 16, None, cfg.model.model_dump(mode="json"),
                                 cfg.diffusion.model_dump(mode="json"),
                                 SamplerSettings(CHECKPOINT_SAMPLERS[name], steps=2, guidance_scale=1.0))
    images, labels = builder()(np.arange(2), np.array([7, 8]))
    assert images.shape == (2, 8, 8, 3) and labels.shape == (2,)


def test_vdm_ema_objective_loads_the_checkpointed_learned_schedule(trained):
    """Evaluation's objective from the EMA weights holds the checkpoint's learned schedule, tensor for
    tensor (sampling through a VDM's learned schedule: tests/test_oracle_front_door.py, vdm-ddpm250)."""
    from evaluation.model_sampling import load_ema_objective
    from pipeline.train.checkpoint import load_ema_weights

    cfg = load_config(trained / "vdm" / "config.yaml")
    weights, _ = load_ema_weights(str(trained / "vdm"))
    objective = load_ema_objective(weights, cfg.diffusion.model_dump(mode="json"))
    for key, value in objective.state_dict().items():
        assert torch.equal(value, weights[f"objective.{key}"])


def test_vdm_export_with_learned_schedule_samples_like_evaluation_on_the_checkpoint(trained, tmp_path, capsys):
    """A learned-schedule VDM (with Fourier features) exported and sampled by launch/sample.py gives
    the images evaluation's sampler draws from the checkpoint itself, seed for seed; the export
    carries the schedule (objective.safetensors, sha256 in config.json) and refuses without it."""
    import shutil

    from PIL import Image

    from evaluation.seeds import sample_seeds
    from pipeline.export import export_run
    from pipeline.pretrained import load_pretrained
    from pipeline.train.checkpoint import load_ema_weights
    from pipeline.train.rundir import sha256_file

    sys.path.insert(0, str(ROOT))
    from launch import sample as sample_cli

    run, out = trained / "vdm_fourier", tmp_path / "export"
    export_run(str(run), str(out))
    doc = json.loads((out / "config.json").read_text())
    assert doc["objective_weights"]["file"] == "objective.safetensors"
    assert doc["objective_weights"]["sha256"] == sha256_file(out / "objective.safetensors")
    model, config = load_pretrained(out)
    assert (model.config.in_channels, model.config.out_channels) == (9, 3)
    weights, _ = load_ema_weights(str(run))
    state = config.objective.state_dict()
    assert state and all(torch.equal(v, weights[f"objective.{k}"]) for k, v in state.items())

    cfg = load_config(run / "config.yaml")
    seeds = sample_seeds(5, np.arange(5))
    expected, labels = CheckpointSampleFn(str(run), 16, None, cfg.model.model_dump(mode="json"),
                                          cfg.diffusion.model_dump(mode="json"),
                                          SamplerSettings("ddpm", steps=3))()(np.arange(5), seeds)
    argv = ["--model", str(out), "--num", "5", "--sampler", "ddpm", "--steps", "3", "--seed", "5",
            "--batch-size", "3", "--device", "cpu"]
    assert sample_cli.main([*argv, "--out", str(tmp_path / "images")]) == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "images" / "samples.json").read_text())
    got = np.stack([np.array(Image.open(tmp_path / "images" / r["file"])) for r in info["images"]])
    assert got.shape == expected.shape == (5, 8, 8, 3)
    assert np.array_equal(got, expected) and [r["label"] for r in info["images"]] == labels.tolist()
    assert len({img.tobytes() for img in got}) == 5  # distinct seeds, distinct images
    torch.manual_seed(0)  # the schedule matters: its initial values give other images
    fresh = make_continuous_objective("vdm", dict(cfg.diffusion.options))
    untrained, _ = make_sample_fn(model, SamplerSettings("ddpm", steps=3), diffusion=config.diffusion,
                                  objective=fresh)(np.arange(5), seeds)
    assert not np.array_equal(untrained, expected)

    old = tmp_path / "old"  # an export from before objective weights were written
    shutil.copytree(out, old)
    (old / "objective.safetensors").unlink()
    doc_old = {k: v for k, v in doc.items() if k != "objective_weights"}
    (old / "config.json").write_text(json.dumps(doc_old))
    capsys.readouterr()
    assert sample_cli.main([*argv, "--out", str(tmp_path / "x")]) == 0  # the intact export still samples
    assert sample_cli.main(["--model", str(old), *argv[2:], "--out", str(tmp_path / "y")]) == 2
    assert "holds no objective weights" in capsys.readouterr().err
    (out / "objective.safetensors").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="objective.safetensors: the file is corrupted"):
        load_pretrained(out)


def test_classifier_run_guides_the_ddpm_checkpoint(trained):
    cfg = load_config(trained / "ddpm" / "config.yaml")
    args = (str(trained / "ddpm"), 16, None, cfg.model.model_dump(mode="json"), cfg.diffusion.model_dump(mode="json"))
    classifier = {"run_url": str(trained / "classifier"), "checkpoint": "latest", "ema_rate": None}
    plain = CheckpointSampleFn(*args, SamplerSettings("ddim", steps=3))()(np.arange(2), np.array([1, 2]))
    guided = CheckpointSampleFn(*args, SamplerSettings("ddim", steps=3, classifier_scale=50.0),
                                classifier=classifier)()(np.arange(2), np.array([1, 2]))
    assert np.array_equal(plain[1], guided[1]) and not np.array_equal(plain[0], guided[0])
    with pytest.raises(ValueError, match="trained objective 'ddpm'; allowed: a run of objective 'classifier'"):
        CheckpointSampleFn(*args, SamplerSettings("ddim", steps=3, classifier_scale=1.0),
                           classifier={"run_url": str(trained / "ddpm")})()


def test_sample_cli_uses_the_objectives_samplers_and_a_classifier_run(trained, tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    from launch import sample as sample_cli
    from pipeline.export import export_run

    def cli(argv):
        rc = sample_cli.main(argv)
        captured = capsys.readouterr()
        return rc, captured.out + captured.err

    for name, sampler in (("vp_sde", "heun"), ("ddpm", "ddim")):
        export_run(str(trained / name), str(tmp_path / name))
    common = ["--num", "3", "--steps", "2", "--seed", "4", "--class-label", "2"]
    rc, text = cli(["--model", str(tmp_path / "vp_sde"), "--sampler", "heun", *common, "--guidance-scale", "1",
                    "--out", str(tmp_path / "vp")])
    assert rc == 0, text
    info = json.loads((tmp_path / "vp" / "samples.json").read_text())
    assert [r["label"] for r in info["images"]] == [2, 2, 2] and info["sampler"]["sampler"] == "heun"
    rc, text = cli(["--model", str(tmp_path / "ddpm"), *common, "--classifier-run", str(trained / "classifier"),
                    "--classifier-scale", "5", "--out", str(tmp_path / "guided")])
    assert rc == 0, text
    assert json.loads((tmp_path / "guided" / "samples.json").read_text())["classifier_scale"] == 5.0
    rc, text = cli(["--model", str(tmp_path / "vp_sde"), "--sampler", "langevin", *common,
                    "--out", str(tmp_path / "x")])
    assert rc == 2 and "sampler: 'langevin' is not allowed for objective 'vp_sde'; allowed: pc, ode, heun" in text
    rc, text = cli(["--model", str(tmp_path / "ddpm"), *common, "--classifier-scale", "5", "--out", str(tmp_path / "y")])
    assert rc == 2 and "--classifier-scale: 5.0 needs --classifier-run" in text


def test_evaluate_flags_and_guidance_provenance(trained):
    sys.path.insert(0, str(ROOT))
    from evaluation.evaluate import default_name, guidance_provenance, sampler_settings
    from launch.evaluate import build_overrides, parse_args

    args = parse_args(["--run", "r", "--guidance-scale", "1.5", "--classifier-run", str(trained / "classifier"),
                       "--classifier-scale", "2", "--class-label", "3"])
    cfg = load_config(trained / "ddpm" / "config.yaml", build_overrides(args))
    ev = cfg.eval
    assert (ev.guidance_scale, ev.classifier_scale, ev.class_label) == (1.5, 2.0, 3)
    assert ev.classifier_run == str(trained / "classifier")
    assert default_name(ev, 0.9) == "ddim50-cfg1.5-cls2-class3-n50000-ema0.9-seed0"
    assert default_name(load_config(None).eval, 0.9) == "ddim50-n50000-ema0.9-seed0"  # unguided names unchanged
    record, classifier = guidance_provenance(cfg)
    assert record["guidance_scale"] == 1.5 and record["null_class"] == 10 and record["label_dropout"] == 0.2
    assert record["classifier"]["images_seen"] == 16 and record["classifier"]["ema_rate"] == 0.9
    assert classifier == {"run_url": str(trained / "classifier"), "checkpoint": 16, "ema_rate": 0.9}
    unguided = load_config(trained / "ddpm" / "config.yaml", ["eval.classifier_scale=2"])  # no classifier_run
    with pytest.raises(ValueError, match="classifier_scale: 2.0 needs a noisy classifier"):
        CheckpointSampleFn(str(trained / "ddpm"), 16, None, unguided.model.model_dump(mode="json"),
                           unguided.diffusion.model_dump(mode="json"), sampler_settings(unguided.eval))


PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_sampler_and_channels_fit_the_objective(path):
    """The evaluation sampler fits the objective; the network's input/output channels fit what the
    objective feeds it (VDM Fourier features add 2 N channels per image channel on the input only)."""
    from evaluation.evaluate import sampler_settings
    from pipeline.models import resolve_preset

    cfg = load_config(path)
    kind = cfg.diffusion.objective
    if kind == "classifier":
        return
    from pipeline.diffusion.registry import OBJECTIVES

    if not OBJECTIVES[kind].images:  # the unCLIP prior: CLIP embeddings in and out, no image channels
        net = resolve_preset(cfg.model.preset, **dict(cfg.model.overrides))
        assert net.embed_dim > 0 and set(OBJECTIVES[kind].cond_fields) <= set(cfg.data.fields)
        return
    # a preset with classifier_scale expects eval.classifier_run at evaluation time (ADM-G presets)
    check_sampler(kind, sampler_settings(cfg.eval), has_classifier=bool(cfg.eval.classifier_scale))
    net = resolve_preset(cfg.model.preset, **dict(cfg.model.overrides))
    options = dict(cfg.diffusion.options)
    extra = 0
    if kind == "vdm" and options.get("fourier_features"):
        lo, hi = options.get("fourier_exponents", (7, 8))
        extra = 2 * (hi - lo)
    data_channels = net.in_channels // (1 + extra)
    assert net.out_channels == data_channels * (2 if net.learn_sigma else 1)
    from pipeline.diffusion.registry import build_objective

    build_objective(kind, cfg.diffusion.objective_options())  # every objective builds from its typed options


def test_evaluate_checkpoint_samples_continuous_and_guided_runs_with_provenance(trained):
    """Sampling on the Ray actor pool (no metrics: no Inception weights needed); metrics.json records
    the objective, the sampler and the guidance with the classifier checkpoint it resolved."""
    import ray

    from evaluation.evaluate import evaluate_checkpoint
    from evaluation.pool import ensure_ray, shutdown_pool
    from evaluation.sampling import read_samples

    started = not ray.is_initialized()
    ensure_ray()
    try:
        common = ["eval.metrics=[]", "eval.num_samples=4", "eval.batch_size=2", "eval.samples_per_shard=2",
                  "eval.steps=2"]
        cfg = load_config(trained / "vp_sde" / "config.yaml", [*common, "eval.sampler=pc", "eval.guidance_scale=1",
                                                                "eval.predictor=euler_maruyama"])
        record = evaluate_checkpoint(cfg, str(trained / "vp_sde"), progress=False).record
        assert record["objective"] == "vp_sde" and record["sampler"]["sampler"] == "pc"
        assert record["sampler"]["predictor"] == "euler_maruyama"
        assert record["guidance"]["guidance_scale"] == 1.0 and record["guidance"]["null_class"] == 10
        assert record["name"] == "pc2-cfg1-n4-ema0.9-seed0"
        cfg = load_config(trained / "ddpm" / "config.yaml",
                          [*common, "eval.sampler=ddim", f"eval.classifier_run={trained / 'classifier'}",
                           "eval.classifier_scale=3"])
        result = evaluate_checkpoint(cfg, str(trained / "ddpm"), progress=False)
        guidance = json.loads((Path(result.url) / "metrics.json").read_text())["guidance"]
        assert guidance["classifier_scale"] == 3.0
        assert guidance["classifier"]["run"] == str(trained / "classifier")
        assert guidance["classifier"]["images_seen"] == 16 and guidance["classifier"]["ema_rate"] == 0.9
        images = np.concatenate(list(read_samples(result.url, 4, 2)))
        assert images.shape == (4, 8, 8, 3)
    finally:
        shutdown_pool()
        if started:
            ray.shutdown()
