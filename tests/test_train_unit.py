"""Training stage without Ray: pure helpers, and single-process DeepSpeed runs in a subprocess.

The subprocess keeps DeepSpeed's process group out of the pytest process (other areas' tests
run there too).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.train.checkpoint import (
    committed_checkpoints,
    find_resume_checkpoint,
    from_jsonable,
    load_ema_weights,
    retained,
    to_jsonable,
)
from pipeline.train.ema import EMA, assemble_full, ema_decay
from pipeline.train.engine import deepspeed_config, global_batch, lr_warmup_factor
from pipeline.train.loop import redacted_yaml, stream_seed
from pipeline.train.metrics import quartile_of

ROOT = Path(__file__).resolve().parents[1]

# A network of ~11k parameters at 8x8, class-conditional on the 10 builtin classes.
TINY = [
    "model.preset=tiny",
    ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1], attention_resolutions: [], "
     "norm_groups: 4, num_classes: 10}"),
    "data.resolution=8",
    "data.shuffle_buffer=32",
    "train.micro_batch=8",
    "train.log_every_images=8",
    "train.ema_rates=[0.9, 0.99]",
    "train.lr=1e-3",
    "train.collective_timeout_s=120",
]


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_retention_keeps_last_n_and_first_past_each_multiple():
    images = [100, 200, 300, 400, 500, 600, 700]
    assert retained(images, keep_last=2, keep_every=0) == {600, 700}
    # Multiples of 250: first checkpoint at or past 250 is 300, past 500 is 500.
    assert retained(images, keep_last=1, keep_every=250) == {300, 500, 700}
    assert retained([5], keep_last=3, keep_every=0) == {5}
    with pytest.raises(ValueError, match="keep_last"):
        retained(images, keep_last=0, keep_every=0)


def test_json_codec_round_trips_tensors_arrays_and_nesting():
    state = {
        "rng": torch.get_rng_state(),
        "f": torch.randn(3, 2, dtype=torch.float64),
        "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "empty": torch.empty(0, 4),
        "arr": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "nested": [1, "x", {"k": None, "t": (torch.arange(3),)}],
    }
    back = from_jsonable(json.loads(json.dumps(to_jsonable(state))))
    assert torch.equal(back["rng"], state["rng"])
    assert torch.equal(back["f"], state["f"]) and back["f"].dtype == torch.float64
    assert torch.equal(back["b"], state["b"]) and back["b"].dtype == torch.bfloat16
    assert back["empty"].shape == (0, 4)
    assert np.array_equal(back["arr"], state["arr"]) and back["arr"].dtype == np.uint32
    assert back["nested"][2]["k"] is None and torch.equal(back["nested"][2]["t"][0], torch.arange(3))
    with pytest.raises(TypeError, match="object"):
        to_jsonable({"bad": object()})


def test_ema_decay_warmup_follows_num_updates_formula():
    assert ema_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.9999, 90, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay(0.9, 10**6, warmup=True) == 0.9
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999


def test_ema_update_matches_the_recurrence_and_slices_assemble_to_full():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    rates = (0.9, 0.5)
    full = EMA(net, rates, rank=0, world=1, warmup=False)
    parts = [EMA(net, rates, rank=r, world=3, warmup=False) for r in range(3)]
    expected = {r: {k: v.detach().clone() for k, v in net.named_parameters()} for r in rates}
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        for ema in [full, *parts]:
            ema.update()
        for r in rates:
            for k, v in net.named_parameters():
                expected[r][k] = r * expected[r][k] + (1 - r) * v.detach()  # EMA recurrence
    for r in rates:
        whole = assemble_full([{"slices": full.slice_table(),
                                "tensors": {s.name: t for s, t in zip(full.specs, full.shadows[r])}}])
        sharded = assemble_full([{"slices": e.slice_table(),
                                  "tensors": {s.name: t for s, t in zip(e.specs, e.shadows[r])}} for e in parts])
        for k in expected[r]:
            assert torch.allclose(whole[k], expected[r][k], atol=1e-6)
            assert torch.equal(whole[k], sharded[k])
    # Each rank holds about a third of every parameter, no more.
    numel = sum(p.numel() for p in net.parameters())
    assert all(sum(t.numel() for t in e.shadows[0.9]) <= numel // 3 + len(e.specs) for e in parts)
    with pytest.raises(ValueError, match="rates"):
        EMA(net, (1.0,), rank=0, world=1)


def test_stream_seed_is_a_function_of_seed_rank_images_and_micro_step():
    a = stream_seed(0, 0, 64, 0)
    assert a == stream_seed(0, 0, 64, 0)
    others = {stream_seed(1, 0, 64, 0), stream_seed(0, 1, 64, 0), stream_seed(0, 0, 72, 0), stream_seed(0, 0, 64, 1)}
    assert a not in others and len(others) == 4
    assert 0 <= a < 2**63


def test_deepspeed_config_batch_precision_and_zero_stage():
    cfg = load_config(None, ["train.micro_batch=4", "train.grad_accum=3", "train.zero_stage=3",
                             "train.precision=fp16", "train.grad_clip=0.5"])
    ds = deepspeed_config(cfg.train, world_size=2)
    assert ds["train_batch_size"] == 24 == global_batch(cfg.train, 2)
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    assert "bf16" not in ds
    bf = deepspeed_config(load_config(None, ["train.precision=bf16"]).train, 1)
    assert "bf16" not in bf and "fp16" not in bf  # bf16 = fp32 engine + autocast


def test_lr_warmup_is_linear_then_constant():
    assert [lr_warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_warmup_factor(0, 0) == 1.0


def test_timestep_quartiles():
    t = torch.tensor([0, 249, 250, 499, 500, 999])
    assert quartile_of(t, 1000).tolist() == [0, 0, 1, 1, 2, 3]


def test_printed_config_hides_credentials():
    cfg = load_config(None, ["data.s3_endpoint_url=https://AKIDEXAMPLE:s3cr3tv4lue@store.local:8333",
                             "diffusion.objective=vp_sde", "diffusion.options={beta_max: 20}",
                             "model.overrides={api_token: abc123}"])
    text = redacted_yaml(cfg)
    assert "s3cr3tv4lue" not in text and "AKIDEXAMPLE" not in text and "abc123" not in text
    assert "https://store.local:8333" in text and "beta_max: 20" in text


# ---------------------------------------------------------------------------------------------
# Single-process DeepSpeed runs (subprocess)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("builtin:shapes10", str(out), shard_size=64, num_samples=512, workers=0, progress=False)
    return str(out)


def _train_subprocess(overrides: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = ("import sys, torch; torch.set_num_threads(1)\n"
            "from pipeline.config import load_config\n"
            "from pipeline.train.loop import train\n"
            "print('SUMMARY', train(load_config(None, sys.argv[1:])))\n")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["images_seen"]] = rec["loss"]
    return out


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def assert_same_checkpoint_tensors(a: Path, b: Path) -> float:
    """Every tensor in every DeepSpeed shard file equal; returns the max abs difference (0.0 = bitwise)."""
    files_a = sorted(p.relative_to(a) for p in (a / "state").rglob("*.pt"))
    assert files_a == sorted(p.relative_to(b) for p in (b / "state").rglob("*.pt")) and files_a
    worst = 0.0
    for rel in files_a:
        ta = dict(_tensors(torch.load(a / rel, map_location="cpu", weights_only=False)))
        tb = dict(_tensors(torch.load(b / rel, map_location="cpu", weights_only=False)))
        assert ta.keys() == tb.keys()
        for k, va in ta.items():
            if va.numel():
                worst = max(worst, (va.double() - tb[k].double()).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory) -> Path:
    """ZeRO-0, fp32, gradient accumulation 2, 64 images, checkpoints at 32 and 64, a sample grid."""
    run = tmp_path_factory.mktemp("ref") / "run"
    _ok(_train_subprocess([*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.zero_stage=0",
                           "train.grad_accum=2", "train.micro_batch=4", "train.total_images=64",
                           "train.checkpoint_every_images=32", "train.sample_every_images=64"],
                          env_extra={"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIxK7MDENGbPxRfiCYEXAMPLEKEY"}))
    return run


def test_run_layout_metrics_and_sample_grid(reference_run):
    run = reference_run
    assert (run / "config.yaml").is_file()
    assert load_config(run / "config.yaml").train.total_images == 64  # the resolved config round-trips
    assert [c.images_seen for c in committed_checkpoints(str(run))] == [32, 64]
    records = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in records] == list(range(8, 65, 8))
    for key in ("loss", "loss_q0", "lr", "grad_norm", "images_per_s", "skipped_steps"):
        assert key in records[-1]
    assert all(np.isfinite(r["loss"]) for r in records) and records[-1]["skipped_steps"] == 0
    assert list((run / "logs").glob("events.out.tfevents.*"))
    from PIL import Image

    grid = Image.open(run / "samples" / "000000000064.png")
    assert grid.size == (8 * 10 + 2, 8 * 10 + 2)  # 64 samples of 8x8 in an 8x8 grid, 2 px padding
    manifest = committed_checkpoints(str(run))[-1].manifest
    assert manifest["images_seen"] == 64 and manifest["step"] == 8 and manifest["world_size"] == 1
    assert manifest["ema"]["rates"] == [0.9, 0.99]
    assert manifest["ranks"][0]["state"]["data"]["consumed_batches"] == 16  # micro-batches read
    assert all(len(v["sha256"]) == 64 for v in manifest["files"].values())


def test_no_credentials_in_run_directory(reference_run):
    for path in reference_run.rglob("*"):
        if path.is_file():
            assert b"wJalrXUtnFEMIxK7MDENGbPxRfiCYEXAMPLEKEY" not in path.read_bytes(), path


def test_exact_resume_with_gradient_accumulation_single_process(dataset, reference_run, tmp_path):
    run = tmp_path / "run"
    common = [*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.zero_stage=0", "train.grad_accum=2",
              "train.micro_batch=4", "train.checkpoint_every_images=32", "train.sample_every_images=64"]
    _ok(_train_subprocess([*common, "train.total_images=32"]))
    out = _ok(_train_subprocess([*common, "train.total_images=64"]))
    assert "resumed from" in out
    assert _losses(run) == _losses(reference_run)
    diff = assert_same_checkpoint_tensors(run / "checkpoints/000000000064", reference_run / "checkpoints/000000000064")
    assert diff == 0.0
    for rate in (0.9, 0.99):
        a, _ = load_ema_weights(str(run), rate=rate)
        b, _ = load_ema_weights(str(reference_run), rate=rate)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_skips_uncommitted_and_corrupt_checkpoints(reference_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    assert find_resume_checkpoint(str(run)).images_seen == 64
    ema_file = run / "checkpoints/000000000064/ema_rank_00000.safetensors"
    ema_file.write_bytes(ema_file.read_bytes()[:-1] + b"\x00")  # flip the last byte
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(str(run)).images_seen == 32
    assert "sha256" in caplog.text
    (run / "checkpoints/000000000032/manifest.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(str(run)) is None
    assert "no manifest" in caplog.text


def test_load_ema_weights_match_a_network_and_reject_bad_requests(reference_run, tmp_path):
    from pipeline.models import build_model_from_config

    cfg = load_config(reference_run / "config.yaml")
    weights, manifest = load_ema_weights(str(reference_run), checkpoint=32, rate=0.99)
    net = build_model_from_config(cfg.model)
    net.load_state_dict({k[len("net."):]: v for k, v in weights.items()}, strict=True)
    assert manifest["images_seen"] == 32
    with pytest.raises(ValueError, match="ema rate"):
        load_ema_weights(str(reference_run), rate=0.5)
    with pytest.raises(ValueError, match="not in run"):
        load_ema_weights(str(reference_run), checkpoint=48)
    with pytest.raises(ValueError, match="no committed checkpoint"):
        load_ema_weights(str(tmp_path))


def _copy_with_nan_checkpoint_64(reference_run, tmp_path) -> Path:
    """The reference run, its checkpoint 64 a diverged model: NaN weights in the file that resume loads
    (ZeRO-0 keeps them there)."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    path = run / "checkpoints/000000000064/state/mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    for v in state["module"].values():
        v.fill_(float("nan"))
    torch.save(state, path)
    return run


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(reference_run, dataset, tmp_path):
    run = _copy_with_nan_checkpoint_64(reference_run, tmp_path)
    proc = _train_subprocess([*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.zero_stage=0",
                              "train.grad_accum=1", "train.micro_batch=4", "train.total_images=200",
                              "train.checkpoint_every_images=400", "train.max_consecutive_nonfinite=3",
                              "train.resume=64", "train.max_nonfinite_rollbacks=0"])
    assert proc.returncode != 0
    assert "4 consecutive optimizer steps had a non-finite loss" in proc.stderr
    assert [c.images_seen for c in committed_checkpoints(str(run))] == [32, 64]  # nothing new committed
    records = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] >= 1


def test_non_finite_streak_rolls_back_and_skips_the_data_stretch(reference_run, dataset, tmp_path):
    """Checkpoint 64 holds NaN weights, so the run resumed from it has a streak of non-finite steps;
    it rolls back to checkpoint 32 (the newest from before the streak) and finishes, with the data
    read during the streak skipped, not replayed."""
    import math

    run = _copy_with_nan_checkpoint_64(reference_run, tmp_path)
    # train.resume=64 names the checkpoint without a checksum check; the rollback target must pass it.
    out = _ok(_train_subprocess([*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.zero_stage=0",
                                 "train.grad_accum=1", "train.micro_batch=4", "train.total_images=96",
                                 "train.checkpoint_every_images=400", "train.max_consecutive_nonfinite=3",
                                 "train.resume=64"]))
    assert "checkpoints/000000000032 after 4 non-finite steps" in out
    ckpts = {c.images_seen: c for c in committed_checkpoints(str(run))}
    assert 96 in ckpts and ckpts[96].manifest["shared"]["nonfinite_rollbacks"] == 1
    records = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["loss"] is None for r in records)  # the streak was logged
    last = {r["images_seen"]: r["loss"] for r in records}  # a step re-run after the rollback logs again
    assert all(math.isfinite(last[n]) for n in range(40, 97, 8))
    # samples read: 64 up to checkpoint 64, 16 in the 4 bad steps (skipped), 64 from 32 to 96 images
    assert ckpts[96].manifest["ranks"][0]["state"]["data"]["workers"][0]["yielded"] == 64 + 16 + 64


def test_bad_resume_request_is_a_clear_error(reference_run):
    from pipeline.train.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(str(reference_run), 32).images_seen == 32
    assert resolve_checkpoint(str(reference_run), "latest").images_seen == 64
    with pytest.raises(ValueError, match="checkpoint: 48 is not in run"):
        resolve_checkpoint(str(reference_run), 48)
    with pytest.raises(ValueError, match="use 'latest' or images seen"):
        resolve_checkpoint(str(reference_run), "newest")


def test_other_objectives_train_through_the_same_engine(dataset, tmp_path):
    """The ADM-G noisy classifier, VDM (a continuous-time objective that draws its own t from the
    loop's generator) and the VLB with importance-sampled timesteps, a few steps each, in one process."""
    code = r"""
import json, sys, torch
torch.set_num_threads(1)
from pipeline.config import load_config
from pipeline.train.loop import train
from pipeline.train.checkpoint import load_ema_weights
base, root = json.loads(sys.argv[1]), sys.argv[2]
runs = {
  "classifier": ["model.preset=adm_classifier_64", "model.overrides={image_size: 8, base_channels: 8, "
                 "channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [4], num_head_channels: 8, "
                 "norm_groups: 4, num_classes: 10}", "diffusion.objective=classifier", "data.require_labels=true"],
  "vdm": ["diffusion.objective=vdm", "diffusion.options={schedule: fixed_linear}"],
  "vlb_is": ["diffusion.objective=ddpm", "diffusion.loss=vlb", "diffusion.importance_sampling=true",
             "diffusion.timesteps=50", "diffusion.schedule=cosine"],
}
for name, extra in runs.items():
    cfg = load_config(None, [*base, f"train.run_dir={root}/{name}", *extra])
    summary = train(cfg)
    weights, manifest = load_ema_weights(f"{root}/{name}", rate=0.9)
    finite = all(torch.isfinite(v).all() for v in weights.values())
    objective_keys = sorted(k for k in weights if k.startswith("objective."))
    print("RESULT", json.dumps({"name": name, "images": summary["images_seen"], "finite": bool(finite),
          "objective_keys": len(objective_keys), "sampler": manifest["shared"]["importance_sampler"] is not None}))
"""
    base = [*[o for o in TINY if not o.startswith("model.")], f"data.url={dataset}", "train.zero_stage=1",
            "train.micro_batch=4", "train.total_images=24", "train.checkpoint_every_images=24",
            "model.preset=tiny", TINY[1]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(base), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {r["name"]: r for r in (json.loads(x.split(" ", 1)[1]) for x in proc.stdout.splitlines()
                                      if x.startswith("RESULT "))}
    assert set(results) == {"classifier", "vdm", "vlb_is"}
    assert all(r["images"] == 24 and r["finite"] for r in results.values())
    assert results["classifier"]["objective_keys"] == 0
    assert results["vlb_is"]["sampler"]  # the importance sampler's history is checkpointed


def test_run_directory_on_s3_checkpoints_resumes_and_holds_no_secret(dataset, s3_bucket, s3_env):
    """A run dir at s3:// (SeaweedFS): committed checkpoints, a resume from the s3 checkpoint (the second
    launch continues at 16 images; bitwise equality with an uninterrupted run is checked on local run
    dirs by test_exact_resume_* and test_zero3_interrupted_and_resumed_run_equals_uninterrupted), logs,
    no credentials."""
    from pipeline.data import storage

    run = f"{s3_bucket}/runs/tiny"
    common = [*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.zero_stage=2",
              "train.checkpoint_every_images=16", "train.sample_every_images=32"]
    _ok(_train_subprocess([*common, "train.total_images=16"]))
    out = _ok(_train_subprocess([*common, "train.total_images=32"]))
    assert "resumed from s3://" in out
    assert [c.images_seen for c in committed_checkpoints(run)] == [16, 32]
    weights, manifest = load_ema_weights(run, rate=0.99)
    assert manifest["images_seen"] == 32 and all(torch.isfinite(v).all() for v in weights.values())
    lines = storage.read_bytes(f"{run}/logs/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["images_seen"] for x in lines] == [8, 16, 24, 32]
    assert storage.exists(f"{run}/samples/000000000032.png")
    urls = storage.list_prefix(run)
    assert any("tfevents" in u for u in urls)
    secret = s3_env.secret_key.encode()
    for url in urls:
        assert secret not in storage.read_bytes(url), url


def test_launch_refuses_bad_input_with_exit_status_2(tmp_path):
    script = str(ROOT / "launch" / "train.py")
    missing = subprocess.run([sys.executable, script, f"data.url={tmp_path}/nothing"], capture_output=True, check=False,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "holds no dataset.json" in missing.stderr
    typo = subprocess.run([sys.executable, script, "train.zero_stag=2"], capture_output=True, text=True, timeout=120, check=False)
    assert typo.returncode == 2 and "did you mean 'zero_stage'" in typo.stderr
    scheme = subprocess.run([sys.executable, script, "train.run_dir=ftp://host/run"], capture_output=True, check=False,
                            text=True, timeout=120)
    assert scheme.returncode == 2 and "run_dir" in scheme.stderr


class _Payload:
    """Unpickling this would create a marker file: proof that a checkpoint ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_loads_deepspeed_files_weights_only(dataset, tmp_path):
    """A checkpoint whose DeepSpeed optimizer file carries a pickled callable (with a matching
    manifest checksum, so only the loader stands in the way) is refused, and the code never runs."""
    import torch

    from pipeline.train.rundir import sha256_file

    run = tmp_path / "run"
    common = [*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.zero_stage=2",
              "train.checkpoint_every_images=32", "train.sample_every_images=0"]
    _ok(_train_subprocess([*common, "train.total_images=32"]))
    ckpt = run / "checkpoints" / "000000000032"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    optim = next(rel for rel in manifest["files"] if rel.endswith("optim_states.pt"))
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / optim, weights_only=False)
    state["payload"] = _Payload(str(marker))
    torch.save(state, ckpt / optim)
    manifest["files"][optim]["sha256"] = sha256_file(ckpt / optim)
    manifest["files"][optim]["size"] = (ckpt / optim).stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))

    proc = _train_subprocess([*common, "train.total_images=64"])
    assert proc.returncode != 0
    assert "weights_only" in proc.stdout + proc.stderr or "Unpickl" in proc.stdout + proc.stderr
    assert not marker.exists(), "unpickling the checkpoint ran code"
