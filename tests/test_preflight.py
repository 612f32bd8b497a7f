"""Bad input to ``launch/train.py`` is refused before Ray starts: exit 2 and one message naming the
key, the value and what is allowed. Real SeaweedFS for the S3 cases; no Ray is started here
(``ray`` never appears among the CLI's child processes because the CLI exits first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_unit import TINY

from pipeline.config import load_config
from pipeline.train.loop import model_hash
from pipeline.train.preflight import PreflightError, check_config_file, preflight

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 30  # generous: the CLI imports torch and reads one manifest; Ray alone takes ~20 s to start


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    from pipeline.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "shapes"
    prepare_dataset("builtin:shapes10", str(out), shard_size=32, num_samples=64, workers=0, progress=False)
    return str(out)


def _cli(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=120, check=False)
    return proc, time.monotonic() - start


def _refused(args: list[str], *needles: str, env: dict[str, str] | None = None) -> str:
    proc, wall = _cli(args, env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Ray" not in proc.stdout + proc.stderr  # refused before Ray started
    assert wall < BOUND_S, wall
    return err


def _base(dataset: str, run: Path) -> list[str]:
    return [*TINY, f"data.url={dataset}", f"train.run_dir={run}", "train.num_workers=2", "train.micro_batch=4"]


def test_unknown_model_preset(dataset, tmp_path):
    _refused([*_base(dataset, tmp_path / "run"), "model.preset=unet_xl"], "model.preset", "'unet_xl'", "tiny",
             "ddpm_cifar10")


@pytest.mark.parametrize("key", ["data.url", "train.run_dir"])
def test_unsupported_url_scheme(dataset, tmp_path, key):
    _refused([*_base(dataset, tmp_path / "run"), f"{key}=gs://bucket/prefix"], key, "gs://bucket/prefix", "gs://",
             "s3://bucket/prefix", "local path")


def test_data_resolution_differs_from_model_image_size(dataset, tmp_path):
    # TINY builds the network for 8x8 images; a 16x16 reader would run it at another size.
    _refused([*_base(dataset, tmp_path / "run"), "data.resolution=16"], "data.resolution", "16", "image_size 8",
             "data.resolution=8")


def test_empty_and_non_mapping_config_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    _refused(["--config", str(empty)], "--config", str(empty), "empty", "mapping")
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- model\n")
    _refused(["--config", str(listed)], str(listed), "list", "mapping")


def test_unreachable_s3_endpoint(dataset, tmp_path, s3_env):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    _refused([*_base(dataset, tmp_path / "run"), "data.url=s3://no-bucket/data"], "data.url", "s3://no-bucket/data",
             "cannot reach", f"127.0.0.1:{port}", "reachable endpoint", env=env)


def test_wrong_s3_secret_and_missing_bucket(dataset, tmp_path, s3_env, s3_bucket):
    from pipeline.data.prepare import prepare_dataset

    url = f"{s3_bucket}/shapes"
    prepare_dataset("builtin:shapes10", url, shard_size=32, num_samples=64, workers=0, progress=False)
    wrong = {**os.environ, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    err = _refused([*_base(dataset, tmp_path / "run"), f"data.url={url}"], "data.url", url, "refused",
                   "credentials", env=wrong)
    assert "not-the-secret" not in err
    _refused([*_base(dataset, tmp_path / "run"), "train.run_dir=s3://missing-bucket-x/run"], "train.run_dir",
             "s3://missing-bucket-x/run", "does not exist", "existing bucket")
    # The same S3 dataset with the right secret passes every check (in-process, no Ray).
    preflight(load_config(None, [*_base(dataset, tmp_path / "run"), f"data.url={url}"]))


def _commit_fake_checkpoint(run: Path, images: int, **manifest) -> None:
    folder = run / "checkpoints" / f"{images:012d}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"images_seen": images, "step": 1, **manifest}))


def test_checkpoint_that_cannot_be_resumed(dataset, tmp_path):
    run = tmp_path / "run"
    args = _base(dataset, run)
    # A checkpoint of another network (other base_channels) in the run directory.
    other = load_config(None, [*args, "model.overrides.base_channels=16"])
    _commit_fake_checkpoint(run, 16, model_hash=model_hash(other), world_size=2)
    _refused(args, "train.resume", "'auto'", "different model", "train.resume=never", "new train.run_dir")
    preflight(load_config(None, [*args, "train.resume=never"]))  # allowed: start afresh
    preflight(load_config(None, [*args, "model.overrides.base_channels=16"]))  # allowed: the same model


def test_resume_names_a_missing_checkpoint_and_allows_another_worker_count(dataset, tmp_path):
    run = tmp_path / "run"
    args = _base(dataset, run)
    cfg = load_config(None, args)
    data = {"seed": cfg.data.seed, "shuffle_buffer": cfg.data.shuffle_buffer}
    _commit_fake_checkpoint(run, 16, model_hash=model_hash(cfg), world_size=2, zero_stage=cfg.train.zero_stage,
                            ranks=[{"rank": 0, "state": {"data": data}}])
    with pytest.raises(PreflightError, match=r"train.resume: 99 .*committed: \[16\]"):
        preflight(load_config(None, [*args, "train.resume=99"]))
    preflight(load_config(None, [*args, "train.num_workers=1"]))  # elastic resume: another worker count
    preflight(load_config(None, [*args, "train.resume=16"]))
    other = 3 if cfg.train.zero_stage != 3 else 2
    with pytest.raises(PreflightError, match=rf"train.zero_stage: {other} .*ZeRO stage {cfg.train.zero_stage}"):
        preflight(load_config(None, [*args, f"train.zero_stage={other}"]))
    with pytest.raises(PreflightError, match=rf"data.seed: {cfg.data.seed + 1} .*read {cfg.data.seed}"):
        preflight(load_config(None, [*args, f"data.seed={cfg.data.seed + 1}"]))


def test_data_checks_from_the_manifest(dataset, tmp_path):
    args = _base(dataset, tmp_path / "run")
    with pytest.raises(PreflightError, match=r"data.url: .*no dataset.json.*prepare_data"):
        preflight(load_config(None, [*args, f"data.url={tmp_path / 'nothing'}"]))
    # 2 shards cannot feed 4 workers.
    with pytest.raises(PreflightError, match=r"train.num_workers: 4 .*2 shard\(s\).*<= 2"):
        preflight(load_config(None, [*args, "train.num_workers=4"]))
    with pytest.raises(PreflightError, match=r"model.overrides: .*channels"):
        preflight(load_config(None, [*args, "model.overrides.channels=3"]))


def test_config_file_checks_accept_a_preset():
    check_config_file(ROOT / "configs" / "quickstart.yaml")
    check_config_file(None)
