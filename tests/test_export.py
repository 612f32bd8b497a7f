"""Export for serving: EMA weights after real ZeRO-2 / ZeRO-3 training, sampling from an export,
diffusers interoperability, and the bad-input cases.

The training runs are real (Ray Train + DeepSpeed, 2 gloo workers, the ~11k-parameter network of
tests/test_train_unit.py), one per ZeRO stage, shared by the module. The other tests build a run
directory in the training stage's committed layout from a real network and real EMA slices of a
2-rank partition, which is enough to test the export format and the CLIs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.config import build_config, config_to_yaml, load_config
from pipeline.diffusers_export import (
    UnsupportedArchitectureError,
    build_diffusers_unet,
    check_mappable,
    scheduler_config,
)
from pipeline.diffusion import build_schedule, ddim_sample, respace
from pipeline.export import export_run
from pipeline.models import build_model, build_model_from_config, resolve_preset
from pipeline.pretrained import load_pretrained
from pipeline.train.checkpoint import checkpoint_name
from pipeline.train.ema import EMA

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch import export as export_cli
from launch import sample as sample_cli


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is several times faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Non-zero weights everywhere (the zero-initialised output layers would hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


# ---------------------------------------------------------------------------------------------
# A run directory in the committed checkpoint layout (no training): 2 ranks' EMA slices + manifest


def make_run(run: Path, model: dict, *, diffusion: dict | None = None, rates=(0.9, 0.99), images_seen: int = 48,
             committed: bool = True, objective: torch.nn.Module | None = None) -> Path:
    cfg = build_config({"model": model, "diffusion": diffusion or {"timesteps": 100},
                        "data": {"url": str(run / "no-data"), "resolution": 8},
                        "train": {"run_dir": str(run), "ema_rates": list(rates)},
                        "eval": {"sampler": "ddim", "steps": 4}})
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    torch.manual_seed(images_seen)
    net = _randomize(build_model_from_config(cfg.model), images_seen)
    # training's EMA covers the training module: names "net.*" (and "objective.*", VDM's learned schedule)
    wrapped = torch.nn.ModuleDict({"net": net, **({"objective": objective} if objective is not None else {})})
    folder = run / "checkpoints" / checkpoint_name(images_seen)
    folder.mkdir(parents=True)
    files = []
    for rank in range(2):
        ema = EMA(wrapped, tuple(rates), rank=rank, world=2)
        name = f"ema_rank_{rank:05d}.safetensors"
        save_file(ema.local_state(), str(folder / name),
                  metadata={"slices": json.dumps(ema.slice_table()), "rates": json.dumps(ema.rates)})
        files.append(name)
    if committed:
        manifest = {"format": 1, "images_seen": images_seen, "step": 6, "world_size": 2, "config_hash": "test",
                    "ema": {"rates": list(rates), "num_updates": 6, "files": files}, "ranks": [], "shared": {},
                    "files": {}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return run


TINY_MODEL = {"preset": "tiny", "overrides": {"image_size": 8, "base_channels": 8, "channel_mult": [1],
                                              "attention_resolutions": [], "norm_groups": 4, "num_classes": 10}}
TINY_UNCOND = {"preset": "tiny", "overrides": {"image_size": 8, "base_channels": 8, "channel_mult": [1, 2],
                                               "attention_resolutions": [4], "norm_groups": 4}}


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("fake") / "run", TINY_MODEL)


@pytest.fixture(scope="module")
def fake_export(fake_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "native"
    export_run(str(fake_run), str(out))
    return out


def _cli(module, argv: list[str], capsys) -> tuple[int, str]:
    rc = module.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# ---------------------------------------------------------------------------------------------
# The native format and its loader


def test_export_round_trips_the_checkpoint_ema_and_records_what_it_is(fake_run, fake_export):
    from pipeline.train.checkpoint import load_ema_weights

    model, config = load_pretrained(fake_export)
    weights, _ = load_ema_weights(str(fake_run), rate=0.9)
    state = model.state_dict()
    assert set(state) == {k.removeprefix("net.") for k in weights}
    assert all(torch.equal(state[k.removeprefix("net.")], v) for k, v in weights.items())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    doc = json.loads((fake_export / "config.json").read_text())
    assert doc["ema_rate"] == 0.9 == config.ema_rate and doc["images_seen"] == 48 == config.images_seen
    assert config.diffusion.timesteps == 100 and config.resolution == 8 and config.num_classes == 10
    assert config.class_names is None  # the run's dataset is not readable here: recorded as unknown
    assert doc["source"]["checkpoint"] == "checkpoints/000000000048"
    assert sorted(p.name for p in fake_export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl") for p in fake_export.rglob("*"))


def test_loader_imports_neither_deepspeed_nor_ray(fake_export):
    code = ("import sys, torch\n"
            "import pipeline\n"
            f"model, config = pipeline.load_pretrained({str(fake_export)!r})\n"
            "out = model(torch.zeros(2, 3, 8, 8), torch.tensor([1.0, 50.0]), torch.tensor([0, 3]))\n"
            "assert out.shape == (2, 3, 8, 8)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'ray'))\n"
            "print('IMPORTED', bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout


def test_vdm_export_carries_its_learned_schedule_and_the_loader_restores_it(tmp_path):
    """objective.* EMA weights go to objective.safetensors (sha256 in config.json); load_pretrained
    restores the objective without DeepSpeed or Ray; weights that do not fit the run's options are refused."""
    from pipeline.diffusion import make_continuous_objective
    from pipeline.train.checkpoint import load_ema_weights

    options = {"hidden": 16}
    objective = _randomize(make_continuous_objective("vdm", options), 7)
    run = make_run(tmp_path / "run", TINY_MODEL, diffusion={"objective": "vdm", "options": options},
                   objective=objective)
    out = tmp_path / "export"
    export_run(str(run), str(out))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                   "objective.safetensors"]
    assert not any(k.startswith("objective.") for k in load_file(str(out / "model.safetensors")))
    doc = json.loads((out / "config.json").read_text())
    record = doc["objective_weights"]
    assert record["file"] == "objective.safetensors" and record["bytes"] == (out / "objective.safetensors").stat().st_size
    weights, _ = load_ema_weights(str(run), rate=0.9)
    restored = {f"objective.{k}": v for k, v in load_file(str(out / "objective.safetensors")).items()}
    assert restored.keys() == {k for k in weights if k.startswith("objective.")} and restored
    assert all(torch.equal(v, weights[k]) for k, v in restored.items())
    assert record["num_parameters"] == sum(v.numel() for v in restored.values())
    assert "objective.safetensors" in (out / "README.md").read_text()
    code = ("import sys, torch\n"
            "import pipeline\n"
            f"model, config = pipeline.load_pretrained({str(out)!r})\n"
            "g = config.objective.gamma(torch.tensor([0.0, 0.5, 1.0]))\n"
            "assert torch.isfinite(g).all() and g[0] < g[1] < g[2] and not config.objective.training\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'ray'))\n"
            "print('IMPORTED', bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "IMPORTED []" in proc.stdout
    _, config = load_pretrained(out)
    assert all(torch.equal(v, weights[f"objective.{k}"]) for k, v in config.objective.state_dict().items())
    # the run's config says a smaller schedule network than the checkpoint holds: refused, nothing written
    bad = make_run(tmp_path / "bad", TINY_MODEL, diffusion={"objective": "vdm", "options": {"hidden": 8}},
                   objective=objective)
    with pytest.raises(ValueError, match="objective weights do not fit diffusion.options"):
        export_run(str(bad), str(tmp_path / "bad_export"))
    assert not (tmp_path / "bad_export").exists()
    # a plain DDPM export holds no objective file and its config has no objective
    plain = tmp_path / "plain"
    export_run(str(make_run(tmp_path / "plain_run", TINY_MODEL)), str(plain))
    assert load_pretrained(plain)[1].objective is None and not (plain / "objective.safetensors").exists()


def test_model_card_holds_provenance_metrics_and_command(tmp_path, capsys):
    evaluated = tmp_path / "run"
    make_run(evaluated, TINY_MODEL)
    record = {"run": str(evaluated), "checkpoint": {"name": "000000000048", "images_seen": 48},
              "ema_rate": 0.99, "name": "ddim4-n8-ema0.99-seed0", "sampler": {"sampler": "ddim", "steps": 4},
              "num_samples": 8, "seeds": {"eval_seed": 0}, "metrics": {"fid": 123.25, "kid": 0.5},
              "feature_extractor": {"feature_extractor": "inception-v3-compat", "weights_sha256": "ab" * 32},
              "reference": {"dataset_url": "s3://data/cifar10", "count": 50000, "manifest_sha256": "cd" * 32},
              "created_utc": "2026-01-01T00:00:00Z"}
    folder = evaluated / "eval" / "000000000048" / record["name"]
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(record))
    out = tmp_path / "card"
    rc, text = _cli(export_cli, ["--run", str(evaluated), "--ema", "0.99", "--out", str(out)], capsys)
    assert rc == 0, text
    card = (out / "README.md").read_text()
    assert "EMA 0.99 at 48 images" in card and "| images seen | 48 (step 6) |" in card
    assert "123.25" in card and "ddim4-n8-ema0.99-seed0" in card and str(folder / "metrics.json") in card
    assert "`s3://data/cifar10` (50000 images" in card and "weights sha256 abababababab" in card
    assert f"python launch/export.py --run {evaluated} --ema 0.99 --out {out}" in card
    doc = json.loads((out / "config.json").read_text())
    assert doc["metrics"]["evaluations"][0]["metrics"] == {"fid": 123.25, "kid": 0.5}
    # Another EMA rate: the record is of a different EMA, and the card says so.
    rc, _ = _cli(export_cli, ["--run", str(evaluated), "--ema", "0.9", "--out", str(tmp_path / "other")], capsys)
    assert rc == 0
    assert "different checkpoint or EMA rate" in (tmp_path / "other" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_run_without_committed_checkpoint_is_refused(tmp_path, capsys):
    run = make_run(tmp_path / "run", TINY_MODEL, committed=False)
    rc, text = _cli(export_cli, ["--run", str(run), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "no committed checkpoint" in text
    assert not (tmp_path / "out").exists()


def test_ema_rate_not_held_is_refused(fake_run, tmp_path, capsys):
    rc, text = _cli(export_cli, ["--run", str(fake_run), "--ema", "0.5", "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "ema rate: 0.5 is not held" in text and "[0.9, 0.99]" in text
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(fake_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert _cli(export_cli, ["--run", str(fake_run), "--out", str(out)], capsys)[0] == 0
    first = json.loads((out / "config.json").read_text())["ema_rate"]
    rc, text = _cli(export_cli, ["--run", str(fake_run), "--ema", "0.99", "--out", str(out)], capsys)
    assert rc == 2 and "exists; pass --overwrite" in text
    assert json.loads((out / "config.json").read_text())["ema_rate"] == first == 0.9
    rc, text = _cli(export_cli, ["--run", str(fake_run), "--ema", "0.99", "--out", str(out), "--overwrite"], capsys)
    assert rc == 0, text
    assert json.loads((out / "config.json").read_text())["ema_rate"] == 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or replaced folders left behind
    # --overwrite never replaces a folder that is not an export (or the run itself).
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    rc, text = _cli(export_cli, ["--run", str(fake_run), "--out", str(tmp_path / "notes"), "--overwrite"], capsys)
    assert rc == 2 and "holds no export" in text and (tmp_path / "notes" / "keep.txt").exists()
    rc, text = _cli(export_cli, ["--run", str(fake_run), "--out", str(fake_run), "--overwrite"], capsys)
    assert rc == 2 and "would replace the run directory" in text


def test_corrupted_safetensors_is_refused(fake_export, tmp_path, capsys):
    import shutil

    flipped = tmp_path / "flipped"
    shutil.copytree(fake_export, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # one weight byte: safetensors itself cannot notice, the recorded sha256 does
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_pretrained(flipped)
    rc, text = _cli(sample_cli, ["--model", str(flipped), "--num", "1", "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 2 and "corrupted" in text and not (tmp_path / "g.png").exists()
    truncated = tmp_path / "truncated"
    shutil.copytree(fake_export, truncated)
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupted"):
        load_pretrained(truncated)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(truncated, verify=False)
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(tmp_path)


def test_sample_cli_rejects_bad_requests(fake_export, tmp_path, capsys):
    rc, text = _cli(sample_cli, ["--model", str(fake_export), "--num", "2", "--class-label", "10",
                                 "--out", str(tmp_path / "a.png")], capsys)
    assert rc == 2 and "--class-label: 10 is not allowed; classes: 0..9" in text
    rc, text = _cli(sample_cli, ["--model", str(fake_export), "--num", "2", "--sampler", "euler_a",
                                 "--out", str(tmp_path / "a.png")], capsys)
    assert rc == 2 and "sampler: 'euler_a' is not allowed" in text
    rc, text = _cli(sample_cli, ["--model", str(tmp_path / "missing"), "--num", "2", "--out", str(tmp_path / "a.png")],
                    capsys)
    assert rc == 2 and "does not exist" in text


def test_sample_cli_class_label_and_guidance(fake_export, tmp_path, capsys):
    """A fixed label and w = 0 give the conditional model's images; w > 0 changes them."""
    common = ["--model", str(fake_export), "--num", "3", "--steps", "3", "--seed", "5"]
    for name, extra in (("fixed", ["--class-label", "7"]), ("w0", ["--class-label", "7", "--guidance-scale", "0"]),
                        ("w2", ["--class-label", "7", "--guidance-scale", "2"])):
        rc, text = _cli(sample_cli, [*common, *extra, "--out", str(tmp_path / name)], capsys)
        assert rc == 0, text
    read = lambda name: np.stack([np.asarray(Image.open(tmp_path / name / f"{i:06d}.png")) for i in range(3)])
    info = json.loads((tmp_path / "fixed" / "samples.json").read_text())
    assert [r["label"] for r in info["images"]] == [7, 7, 7]
    assert np.array_equal(read("fixed"), read("w0"))
    assert not np.array_equal(read("fixed"), read("w2"))
    rc, text = _cli(sample_cli, [*common, "--class-label", "7", "--out", str(tmp_path / "grid.png")], capsys)
    assert rc == 0, text
    sheet = np.asarray(Image.open(tmp_path / "grid.png"))  # 3 images: 2 per row, 2 rows, 2-pixel gaps
    assert sheet.shape == (2 * 10 + 2, 2 * 10 + 2, 3)
    assert np.array_equal(sheet[2:10, 12:20], read("fixed")[1])


def test_export_between_s3_run_and_s3_folder(fake_run, s3_bucket, tmp_path):
    from pipeline.data import storage

    for path in sorted(p for p in fake_run.rglob("*") if p.is_file()):
        storage.upload_file(str(path), f"{s3_bucket}/run/{path.relative_to(fake_run).as_posix()}")
    result = export_run(f"{s3_bucket}/run", f"{s3_bucket}/export", ema_rate=0.99)
    assert result.files == ("README.md", "config.json", "model.safetensors")
    for name in result.files:
        storage.download_file(f"{s3_bucket}/export/{name}", str(tmp_path / "export" / name))
    _model, config = load_pretrained(tmp_path / "export")
    assert config.ema_rate == 0.99 and config.source["run"] == f"{s3_bucket}/run"
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        export_run(f"{s3_bucket}/run", f"{s3_bucket}/export")
    export_run(f"{s3_bucket}/run", f"{s3_bucket}/export", overwrite=True)
    assert json.loads(storage.read_bytes(f"{s3_bucket}/export/config.json"))["ema_rate"] == 0.9


# ---------------------------------------------------------------------------------------------
# diffusers


DIFFUSERS_CASES = {
    # DDPM CIFAR-10's layout (4 levels, 2 blocks, attention at 16, conv resampling), reduced width.
    "ddpm_cifar10": {"base_channels": 16, "norm_groups": 8, "dropout": 0.0},
    # ADM: AdaGN, BigGAN up/down blocks, 16-channel heads, learned sigma, class-conditional; reduced.
    "adm_imagenet64": {"image_size": 16, "base_channels": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
                       "attention_resolutions": (16, 8), "num_head_channels": 8, "norm_groups": 8, "num_classes": 5,
                       "dropout": 0.0},
}


@pytest.mark.parametrize("preset", sorted(DIFFUSERS_CASES))
def test_diffusers_unet_output_equals_ours(preset):
    ours = _randomize(build_model(preset, **DIFFUSERS_CASES[preset]).eval(), 1)
    theirs = build_diffusers_unet(ours.state_dict(), ours.config)
    size = ours.config.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.0, 417.0, 999.0])
    y = torch.tensor([0, 4, 5]) if ours.config.num_classes else None  # 5: the null class
    with torch.no_grad():
        a = ours(x, t, y)
        b = theirs(x, t, class_labels=y).sample
    assert a.shape == b.shape == (3, ours.config.out_channels, size, size)
    assert a.abs().max() > 1e-2  # the comparison is not between two zeros
    assert (a - b).abs().max().item() <= 1e-5


def test_which_presets_map_onto_diffusers():
    for preset in ("ddpm_cifar10", "iddpm_cifar10", "adm_imagenet64", "adm_imagenet256"):
        check_mappable(resolve_preset(preset))
    # ADM-128 has 4 heads over 512-, 768- and 1024-channel layers: three head widths.
    with pytest.raises(UnsupportedArchitectureError, match="one attention_head_dim"):
        check_mappable(resolve_preset("adm_imagenet128"))
    with pytest.raises(UnsupportedArchitectureError, match="super-resolution"):
        check_mappable(resolve_preset("adm_upsampler_64_256"))
    with pytest.raises(UnsupportedArchitectureError, match="ClassifierConfig"):
        check_mappable(resolve_preset("adm_classifier_64"))
    with pytest.raises(UnsupportedArchitectureError, match="first multiplier"):
        check_mappable(resolve_preset("tiny", channel_mult=(2, 2)))
    with pytest.raises(UnsupportedArchitectureError, match="vp_sde"):
        check_mappable(resolve_preset("tiny"), load_config(None, ["diffusion.objective=vp_sde"]).diffusion)


def test_diffusers_folder_loads_as_ddpm_pipeline_with_the_training_schedule(tmp_path, capsys):
    from diffusers import DDPMPipeline, UNet2DModel

    run = make_run(tmp_path / "run", TINY_UNCOND,
                   diffusion={"timesteps": 50, "schedule": "cosine", "variance": "fixed_small"})
    out = tmp_path / "hf"
    rc, text = _cli(export_cli, ["--run", str(run), "--format", "diffusers", "--out", str(out)], capsys)
    assert rc == 0, text
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    record = json.loads((out / "export.json").read_text())
    assert record["weights"]["file"] == "unet/diffusion_pytorch_model.safetensors"
    assert record["weights"]["sha256"] in (out / "README.md").read_text()
    pipe = DDPMPipeline.from_pretrained(str(out))
    ours = build_schedule("cosine", 50)
    assert torch.allclose(pipe.scheduler.alphas_cumprod.double(), ours.alphas_cumprod, atol=1e-6)
    assert pipe.scheduler.config.num_train_timesteps == 50
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.variance_type == "fixed_small"
    unet = UNet2DModel.from_pretrained(str(out), subfolder="unet")
    model, _ = load_pretrained_from_run(run)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([3.0, 40.0])
    with torch.no_grad():
        assert (unet(x, t).sample - model(x, t)).abs().max().item() <= 1e-5
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    # A learned-variance linear-schedule model: learned_range, v-prediction, the scaled linear betas.
    cfg = build_config({"diffusion": {"timesteps": 200, "parameterization": "v", "variance": "learned_range"}})
    sched = scheduler_config(cfg.diffusion)
    assert sched["variance_type"] == "learned_range" and sched["prediction_type"] == "v_prediction"
    assert sched["beta_end"] == pytest.approx(0.02 * 1000 / 200)
    assert torch.allclose(torch.tensor(sched["trained_betas"], dtype=torch.float64),
                          build_schedule("linear", 200).betas)


def test_unmappable_network_is_refused_for_diffusers(tmp_path, capsys):
    run = make_run(tmp_path / "run", {"preset": "tiny", "overrides": {
        "image_size": 8, "base_channels": 8, "channel_mult": [2], "attention_resolutions": [], "norm_groups": 4}})
    rc, text = _cli(export_cli, ["--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "hf")], capsys)
    assert rc == 2 and "first multiplier must be 1" in text and not (tmp_path / "hf").exists()


def load_pretrained_from_run(run: Path):
    out = run.parent / "native-of-run"
    if not out.exists():
        export_run(str(run), str(out))
    return load_pretrained(out)


# ---------------------------------------------------------------------------------------------
# After real training (Ray Train + DeepSpeed, 2 workers): ZeRO-2 and ZeRO-3


TOTAL = 32  # images: 2 workers x micro-batch 4 = 8 per step -> 4 steps, checkpoints at 16 and 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[int, Path]:
    import ray
    from test_train_unit import TINY

    from pipeline.data.prepare import prepare_dataset
    from pipeline.train.ray_launch import init_ray, run_training

    data = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("builtin:shapes10", str(data), shard_size=64, num_samples=256, workers=0, progress=False)
    started = not ray.is_initialized()
    runs = {}
    try:
        for stage in (2, 3):
            run = tmp_path_factory.mktemp(f"zero{stage}") / "run"
            cfg = load_config(None, [*TINY, f"data.url={data}", f"train.run_dir={run}", "train.num_workers=2",
                                     "train.micro_batch=4", "train.checkpoint_every_images=16",
                                     f"train.total_images={TOTAL}", f"train.sample_every_images={TOTAL}",
                                     f"train.zero_stage={stage}", "diffusion.timesteps=100", "eval.steps=4"])
            init_ray(cfg)
            assert run_training(cfg)["images_seen"] == TOTAL
            runs[stage] = run
    finally:
        if started:
            ray.shutdown()
    return runs


def _slices_by_hand(ckpt: Path, rate: float) -> dict[str, torch.Tensor]:
    """Each parameter rebuilt from the ranks' EMA files; every element must be written exactly once."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    flat, hits, shapes = {}, {}, {}
    for fname in manifest["ema"]["files"]:
        with safe_open(str(ckpt / fname), framework="pt") as f:
            table = json.loads(f.metadata()["slices"])
            for name, (start, length, *shape) in table.items():
                numel = int(np.prod(shape)) if shape else 1
                flat.setdefault(name, torch.full((numel,), float("nan")))
                hits.setdefault(name, torch.zeros(numel, dtype=torch.int64))
                shapes[name] = shape
                flat[name][start:start + length] = f.get_tensor(f"{rate!r}/{name}")[:length]
                hits[name][start:start + length] += 1
    assert all(bool((h == 1).all()) for h in hits.values())
    return {name.removeprefix("net."): flat[name].view(*shapes[name]) for name in flat}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_export_after_zero_training_holds_the_ema_training_held(stage, trained, tmp_path, capsys):
    run = trained[stage]
    out = tmp_path / "export"
    rc, text = _cli(export_cli, ["--run", str(run), "--ema", "0.9", "--out", str(out)], capsys)
    assert rc == 0, text
    exported = load_file(str(out / "model.safetensors"))
    by_hand = _slices_by_hand(run / f"checkpoints/{TOTAL:012d}", 0.9)
    assert set(exported) == set(by_hand)
    assert all(torch.equal(exported[k], by_hand[k]) for k in exported)
    doc = json.loads((out / "config.json").read_text())
    assert doc["images_seen"] == TOTAL and doc["source"]["zero_stage"] == stage and doc["source"]["world_size"] == 2
    from pipeline.data.shards import read_manifest

    assert doc["class_names"] == list(read_manifest(load_config(run / "config.yaml").data.url).classes)
    assert len(doc["class_names"]) == 10
    # What training held in memory: at the last step it gathered the first EMA over the workers
    # (a collective, not the files) and drew samples/<images>.png from it: 64 images of seeds 0..63,
    # labels seed % 10, 50 DDIM steps, 8 per row. Each image depends on its own seed only, so the
    # export's first 8 images must reproduce the grid's first row pixel for pixel.
    model, config = load_pretrained(out)
    schedule = respace(build_schedule(config.diffusion.schedule, config.diffusion.timesteps), "ddim50")
    seeds = list(range(8))
    with torch.no_grad():
        x = ddim_sample(model, schedule, (8, 3, 8, 8), seeds=seeds, y=torch.tensor([s % 10 for s in seeds]),
                        parameterization=config.diffusion.parameterization, variance=config.diffusion.variance)
    from pipeline.train.metrics import image_grid_png

    ours = np.asarray(Image.open(io.BytesIO(image_grid_png(x, nrow=8))))
    theirs = np.asarray(Image.open(run / f"samples/{TOTAL:012d}.png"))
    assert theirs.shape == (8 * 10 + 2, 8 * 10 + 2, 3) and ours.shape == (12, 82, 3)
    assert np.array_equal(ours, theirs[:12])
    # An earlier checkpoint is a different EMA.
    rc, _ = _cli(export_cli, ["--run", str(run), "--checkpoint", "16", "--ema", "0.9", "--out", str(tmp_path / "e16")],
                 capsys)
    assert rc == 0
    early = load_file(str(tmp_path / "e16" / "model.safetensors"))
    assert any(not torch.equal(early[k], exported[k]) for k in exported)


@pytest.mark.slow
def test_zero2_and_zero3_exports_agree(trained, tmp_path):
    """Same seeds and data under two sharding layouts: only the order of float reductions differs
    (measured: 6e-8 after 4 steps, weights of magnitude ~4), so the exports agree far below 1e-6."""
    for stage in (2, 3):
        export_run(str(trained[stage]), str(tmp_path / f"z{stage}"), ema_rate=0.99)
    a, b = load_file(str(tmp_path / "z2" / "model.safetensors")), load_file(str(tmp_path / "z3" / "model.safetensors"))
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_corrupted_checkpoint_ema_file_is_refused(trained, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[3], run, ignore=shutil.ignore_patterns("ray"))
    ema_file = run / f"checkpoints/{TOTAL:012d}/ema_rank_00001.safetensors"
    data = bytearray(ema_file.read_bytes())
    data[-1] ^= 0x01
    ema_file.write_bytes(bytes(data))
    rc, text = _cli(export_cli, ["--run", str(run), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and "ema_rank_00001.safetensors fails its sha256 check" in text
    assert _cli(export_cli, ["--run", str(run), "--checkpoint", "16", "--out", str(tmp_path / "out")], capsys)[0] == 0


@pytest.mark.slow
def test_loaded_export_generates_the_evaluation_images(trained, tmp_path, capsys):
    from evaluation.model_sampling import CheckpointSampleFn, SamplerSettings
    from evaluation.sampling import sample_seeds

    run = trained[2]
    out = tmp_path / "export"
    assert _cli(export_cli, ["--run", str(run), "--ema", "0.99", "--out", str(out)], capsys)[0] == 0
    rc, text = _cli(sample_cli, ["--model", str(out), "--num", "6", "--steps", "4", "--seed", "11", "--batch-size", "4",
                                 "--out", str(tmp_path / "samples")], capsys)
    assert rc == 0, text
    info = json.loads((tmp_path / "samples" / "samples.json").read_text())
    ours = np.stack([np.asarray(Image.open(tmp_path / "samples" / r["file"])) for r in info["images"]])
    labels = [r["label"] for r in info["images"]]
    indices = np.arange(6)
    seeds = sample_seeds(11, indices)
    assert [r["seed"] for r in info["images"]] == seeds.tolist()
    cfg = load_config(run / "config.yaml")
    d = cfg.diffusion
    # The evaluation worker's builder on the same checkpoint and EMA, in one batch of 6.
    sample_fn = CheckpointSampleFn(str(run), TOTAL, 0.99, cfg.model.model_dump(mode="json"),
                                   d.model_dump(mode="json"), SamplerSettings("ddim", 4))()
    theirs, their_labels = sample_fn(indices, seeds)
    assert np.array_equal(ours, theirs)
    assert labels == their_labels.tolist()
