"""launch/evaluate.py as a user runs it: a watch pass over a run, and the missing-weights error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


from evaluation import inception
from pipeline.config import config_to_yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_pipeline import commit_checkpoint, make_config, write_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args, env_extra=None, timeout=300):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **(env_extra or {}))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(ROOT / "launch" / "evaluate.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def test_missing_weights_fail_fast_with_instructions(tmp_path):
    cfg = make_config(str(tmp_path / "data"), tmp_path / "cache", feature_extractor="inception-v3-compat",
                      download_weights=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    out = run_cli(["--run", str(run), "--no-progress"], {"TORCH_HOME": str(tmp_path / "empty-torch-home")})
    assert out.returncode == 2, out.stderr
    assert "no Inception weights" in out.stderr and "--inception-weights" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_flag_value_exits_2(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(make_config("d", tmp_path)))
    out = run_cli(["--run", str(run), "--sampler", "euler_a"])
    assert out.returncode == 2 and "eval.sampler" in out.stderr


def test_watch_once_evaluates_every_committed_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "data", count=12, per_shard=6)
    cfg = make_config(data, tmp_path / "cache", num_samples=6, samples_per_shard=3, num_workers=1,
                      metrics=["fid", "kid"])
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 100)
    commit_checkpoint(run, cfg, 200)
    commit_checkpoint(run, cfg, 300, committed=False)  # no manifest: not a checkpoint yet
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    out = run_cli(["--run", str(run), "--watch", "--once", "--no-progress", "--steps", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "evaluated 2 checkpoint(s)" in out.stdout
    assert f"feature extractor: {inception.FIDHELPER_EXTRACTOR}" in out.stdout
    assert not (run / "eval" / f"{300:012d}").exists()
    for images in (100, 200):
        record = json.loads((run / "eval" / f"{images:012d}" / "ddim2-n6-ema0.999-seed0" / "metrics.json").read_text())
        assert record["sampler"]["steps"] == 2 and record["metrics"]["fid"] > 0


def test_watch_a_run_directory_on_s3(tmp_path, s3_bucket):
    """The run directory on S3 (SeaweedFS): checkpoints are listed and read, and samples, metrics.json,
    the table, the plot and the TensorBoard events are written there."""
    from pipeline.data import storage

    data = write_dataset(tmp_path / "data", count=8, per_shard=8)
    cfg = make_config(data, tmp_path / "cache", num_samples=4, samples_per_shard=4, num_workers=1)
    local = tmp_path / "run"
    commit_checkpoint(local, cfg, 100)
    (local / "config.yaml").write_text(config_to_yaml(cfg))
    run = f"{s3_bucket}/runs/r1"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload_file(path, f"{run}/{path.relative_to(local).as_posix()}")

    out = run_cli(["--run", run, "--watch", "--once", "--no-progress", "--steps", "2"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "evaluated 1 checkpoint(s)" in out.stdout
    folder = f"{run}/eval/{100:012d}/ddim2-n4-ema0.999-seed0"
    record = json.loads(storage.read_bytes(f"{folder}/metrics.json"))
    assert record["run"] == run and record["metrics"]["fid"] > 0
    assert storage.exists(f"{folder}/samples-000000.tar") and storage.exists(f"{run}/eval/metrics.png")
    assert storage.read_bytes(f"{run}/eval/metrics.tsv").decode().count("\n") == 2
    assert any("events.out.tfevents" in u for u in storage.list_prefix(f"{run}/logs/eval"))
