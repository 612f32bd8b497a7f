"""The evaluation stage and launch/evaluate.py with sFID, FD-DINOv2, bootstrap intervals and seed sets,
on a tiny real checkpoint and a real reference set (fixtures of test_eval_pipeline)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_pipeline import commit_checkpoint, local_ray, make_config, write_dataset  # noqa: F401
from test_eval_sfid_dinov2 import _tiny_dinov2

from evaluation.evaluate import evaluate_checkpoint
from pipeline.config import config_to_yaml

INTERVALS = {"fid", "sfid", "precision", "recall", "kid", "fd_dinov2"}


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("dinov2") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny_dinov2().state_dict().items()}, str(path))
    return str(path)


def test_every_metric_with_intervals_in_json_table_and_plot(tmp_path, dinov2_file):
    data = write_dataset(tmp_path / "data", count=16, per_shard=8)
    cfg = make_config(data, tmp_path / "cache", num_samples=12, samples_per_shard=6, num_workers=1,
                      metrics=["fid", "sfid", "pr", "kid", "fd_dinov2"], dinov2_weights=dinov2_file,
                      bootstrap_resamples=30, bootstrap_level=0.9, bootstrap_kid_subsets=2)
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 64)
    record = evaluate_checkpoint(cfg, str(run), "latest", progress=False).record
    m = record["metrics"]
    assert m["fid"] > 0 and m["sfid"] > 0 and m["fd_dinov2"] > 0
    assert set(record["intervals"]) == INTERVALS
    for name, iv in record["intervals"].items():
        assert iv["low"] <= iv["high"] and iv["level"] == 0.9 and iv["resamples"] == 30, name
    assert record["dinov2"]["feature_extractor"] == "dinov2-vit-l-14-local" and record["dinov2"]["vit_l14"] is False
    assert record["metric_settings"]["inception_layers"] == ["2048", "mixed_6_conv"]
    with open(run / "eval" / "metrics.tsv") as fh:
        (row,) = list(csv.DictReader(fh, delimiter="\t"))
    assert float(row["sfid"]) == pytest.approx(m["sfid"]) and float(row["fd_dinov2"]) == pytest.approx(m["fd_dinov2"])
    assert float(row["fid_low"]) == pytest.approx(record["intervals"]["fid"]["low"])
    assert float(row["recall_high"]) == pytest.approx(record["intervals"]["recall"]["high"])
    assert (run / "eval" / "metrics.png").stat().st_size > 1000

    # The sample features are cached beside the shards; a second evaluation reproduces every interval.
    again = evaluate_checkpoint(cfg, str(run), 64, progress=False).record
    assert again["intervals"] == record["intervals"] and again["metrics"] == m


def test_cli_seed_sets_report_each_and_their_spread(tmp_path, capsys):
    """launch/evaluate.py's main in this process, on the Ray the module started."""
    from launch.evaluate import main

    data = write_dataset(tmp_path / "data", count=12, per_shard=6)
    cfg = make_config(data, tmp_path / "cache", num_samples=6, samples_per_shard=6, num_workers=1,
                      metrics=["fid", "sfid"], bootstrap_resamples=10)
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 32)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    code = main(["--run", str(run), "--no-progress", "--steps", "2", "--seeds", "0,1"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    folder = run / "eval" / f"{32:012d}"
    records = [json.loads((folder / f"ddim2-n6-ema0.999-seed{s}" / "metrics.json").read_text()) for s in (0, 1)]
    summary = json.loads((folder / "seeds-0-1-ddim2-n6-ema0.999-seed0.json").read_text())
    for metric in ("fid", "sfid"):
        values = [r["metrics"][metric] for r in records]
        assert values[0] != values[1]
        assert summary["spread"][metric]["values"] == values
        assert summary["spread"][metric]["mean"] == pytest.approx(sum(values) / 2)
        assert summary["spread"][metric]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "over seed sets [0, 1]" in out.out and "95% interval" in out.out



@pytest.mark.parametrize("args, message", [
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "3"], "at least two"),
    (["--seeds", "0,1", "--watch"], "not allowed with --watch"),
    (["--metrics", "fid,fd_dinov2"], "no DINOv2 weights"),
    (["--metrics", "fd_dinov2", "--dinov2-weights", "/nonexistent/model.safetensors"], "is not a file"),
    (["--metrics", "fid,sfd"], "eval.metrics"),
    (["--bootstrap-resamples", "1"], "bootstrap_resamples"),
])
def test_cli_bad_input_exits_2_before_anything_runs(tmp_path, capsys, monkeypatch, args, message):
    """launch/evaluate.py's main, in this process (tests/test_eval_cli.py runs it as a subprocess)."""
    from launch.evaluate import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached DINOv2 file

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(make_config(str(tmp_path / "data"), tmp_path / "cache")))
    try:
        code = main(["--run", str(run), "--no-progress", *args])
    except SystemExit as exc:  # argument and config errors exit from inside
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err[-2000:]
