"""Fine-tuning: ``train.init_from`` (pipeline/train/init.py).

A base run trains a few steps of the ~11k-parameter network of tests/test_train_unit.py and is
exported; runs initialised from that export and from the base run's checkpoint (a chosen EMA)
train with lr = 0 through the real loop and DeepSpeed engine (single process, in a subprocess), so
their network, both EMAs and their export must equal the source bitwise. The strict key checks and
the class-embedding rules are tested on the same export.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, InitFrom, load_config
from pipeline.loading import load_model
from pipeline.models import build_model_from_config
from pipeline.train.checkpoint import load_ema_weights
from pipeline.train.init import _adapt_classes, check_init_from, init_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = [
    "model.preset=tiny",
    ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1], attention_resolutions: [], "
     "norm_groups: 4, num_classes: 10}"),
    "data.resolution=8", "data.shuffle_buffer=32", "train.micro_batch=8", "train.log_every_images=8",
    "train.ema_rates=[0.9, 0.99]", "train.collective_timeout_s=120", "train.zero_stage=0",
    "train.sample_every_images=0",
]

# base run (lr 1e-3, 16 images) -> export; then two lr = 0 runs from the export and from the run's EMA 0.99
_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from pipeline.config import load_config
from pipeline.export import export_run
from pipeline.train.loop import train
base, root, data = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
common = [*base, f"data.url={data}"]
train(load_config(None, [*common, f"train.run_dir={root}/base", "train.lr=1e-3", "train.total_images=16",
                         "train.checkpoint_every_images=16"]))
export_run(f"{root}/base", f"{root}/base_export", ema_rate=0.9)
train(load_config(None, [*common, f"train.run_dir={root}/from_export", f"train.init_from={root}/base_export",
                         "train.lr=0", "train.total_images=16", "train.checkpoint_every_images=16"]))
train(load_config(None, [*common, f"train.run_dir={root}/from_run", "train.lr=0", "train.total_images=8",
                         "train.checkpoint_every_images=8",
                         "train.init_from={path: " + root + "/base, checkpoint: 16, ema_rate: 0.99}"]))
export_run(f"{root}/from_export", f"{root}/from_export_export", ema_rate=0.99)
print("DONE")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from pipeline.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("finetune")
    data = root / "shapes"
    prepare_dataset("builtin:shapes10", str(data), shard_size=64, num_samples=128, workers=0, progress=False)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(TINY), str(root), str(data)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def _engine_net(run: Path) -> dict[str, torch.Tensor]:
    """The trained network's own weights (not an EMA) from the DeepSpeed checkpoint's model file."""
    (path,) = list(run.glob("checkpoints/*/state/**/mp_rank_00_model_states.pt"))
    module = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {k.removeprefix("net."): v for k, v in module.items() if k.startswith("net.")}


def test_init_from_an_export_with_lr_zero_keeps_the_weights_bitwise(runs):
    source = load_model(runs / "base_export").network.state_dict()
    trained = _engine_net(runs / "from_export")
    assert trained.keys() == source.keys() and all(torch.equal(trained[k], source[k]) for k in source)
    for rate in (0.9, 0.99):
        ema, _ = load_ema_weights(str(runs / "from_export"), rate=rate)
        assert all(torch.equal(ema[f"net.{k}"], source[k]) for k in source)
    # without init_from the run would start from the seed's initialisation, which the source is not
    torch.manual_seed(load_config(runs / "from_export" / "config.yaml").train.seed)
    fresh = build_model_from_config(load_config(runs / "from_export" / "config.yaml").model).state_dict()
    assert any(not torch.equal(fresh[k], source[k]) for k in source)


def test_init_from_a_run_directory_takes_the_chosen_checkpoint_and_ema(runs):
    source, _ = load_ema_weights(str(runs / "base"), checkpoint=16, rate=0.99)
    trained = _engine_net(runs / "from_run")
    assert all(torch.equal(trained[k], source[f"net.{k}"]) for k in trained)
    record = json.loads((runs / "from_run" / "init_from.json").read_text())
    assert record["source"]["kind"] == "checkpoint" and record["source"]["ema_rate"] == 0.99
    assert record["source"]["images_seen"] == 16


def test_init_from_is_recorded_in_the_config_and_the_model_card(runs):
    cfg = load_config(runs / "from_export" / "config.yaml")
    assert cfg.train.init_from == InitFrom(path=str(runs / "base_export"))
    doc = json.loads((runs / "from_export_export" / "config.json").read_text())
    init = doc["source"]["init_from"]
    assert init["path"] == str(runs / "base_export") and init["source"]["kind"] == "export"
    card = (runs / "from_export_export" / "README.md").read_text()
    assert "fine-tuned from" in card and str(runs / "base_export") in card
    # the exported fine-tuned network is the source, since lr = 0
    a = load_model(runs / "from_export_export").network.state_dict()
    b = load_model(runs / "base_export").network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cfg(runs: Path, *extra: str):
    return load_config(None, [*TINY, f"train.init_from={runs / 'base_export'}", *extra])


def test_mismatched_networks_are_refused_naming_the_keys(runs):
    wider = ("model.overrides={image_size: 8, base_channels: 12, channel_mult: [1], attention_resolutions: [], "
             "norm_groups: 4, num_classes: 10}")
    with pytest.raises(ValueError, match=r"mis-shaped key\(s\) \[.*time_embed.0.weight: \(32, 8\) \(configured \(48, 12\)\)"):
        check_init_from(_cfg(runs, wider))
    attention = ("model.overrides={image_size: 8, base_channels: 8, channel_mult: [1], attention_resolutions: [8], "
                 "norm_groups: 4, num_classes: 10}")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['input_blocks.1.1.norm.bias'"):
        check_init_from(_cfg(runs, attention))
    other_classes = TINY[1].replace("num_classes: 10", "num_classes: 5")
    with pytest.raises(ValueError, match="label_embed.weight: the source has 10 classes \\+ null, the configured "
                                         "network 5 \\+ null"):
        check_init_from(_cfg(runs, other_classes))
    unconditional = TINY[1].replace("num_classes: 10", "num_classes: 0")
    with pytest.raises(ValueError, match="source is class-conditional .* configured network is unconditional"):
        check_init_from(_cfg(runs, unconditional))
    with pytest.raises(ValueError, match="train.init_from: .*nothing.* cannot be loaded"):
        check_init_from(load_config(None, [*TINY, f"train.init_from={runs / 'nothing'}"]))
    with pytest.raises(ConfigError, match="train.init_from: path: .. is not allowed"):
        load_config(None, [*TINY, "train.init_from={path: ''}"])


def test_class_embedding_changes_are_explicit():
    target = {"label_embed.weight": torch.randn(11, 4), "w": torch.ones(2)}
    no_null = {"label_embed.weight": torch.randn(10, 4), "w": torch.zeros(2)}
    state, note = _adapt_classes(no_null, target, source_trained_null=False)
    assert torch.equal(state["label_embed.weight"][:10], no_null["label_embed.weight"])
    assert torch.equal(state["label_embed.weight"][10], torch.zeros(4)) and "added the null class" in note
    state, note = _adapt_classes({"w": torch.zeros(2)}, target, source_trained_null=False)
    assert torch.equal(state["label_embed.weight"], target["label_embed.weight"]) and "unconditional" in note
    same = {"label_embed.weight": torch.randn(11, 4), "w": torch.zeros(2)}
    assert _adapt_classes(same, target, source_trained_null=True) == (same, None)
    _, note = _adapt_classes(same, target, source_trained_null=False)
    assert "never trained" in note and "label_dropout" in note


def test_conditioning_an_unconditional_source_is_logged(runs, tmp_path, caplog):
    """An unconditional export (converted from openai's layout) into a class-conditional network."""
    from pipeline.convert import convert_checkpoint, network_config, parse_flags, to_openai_state_dict
    from pipeline.models import build_network

    flags = ("--image_size 32 --channel_mult 1,2 --num_channels 32 --num_res_blocks 1 --attention_resolutions 16 "
             "--num_heads 1")
    cfg = network_config("guided-diffusion", parse_flags("guided-diffusion", flags))
    torch.save(to_openai_state_dict(build_network(cfg).state_dict(), cfg), tmp_path / "m.pt")
    convert_checkpoint("guided-diffusion", tmp_path / "m.pt", flags, tmp_path / "export")
    overrides = {**{k: v for k, v in vars(cfg).items() if k != "architecture"}, "num_classes": 10}
    model_cfg = load_config(None, ["model.preset=tiny", f"model.overrides={json.dumps(overrides)}",
                                   f"train.init_from={tmp_path / 'export'}"])
    net = build_model_from_config(model_cfg.model)
    with caplog.at_level(logging.INFO):
        state, _, record = init_state(model_cfg.train.init_from, net)
    assert "source is unconditional" in record["classes"]
    assert torch.equal(state["label_embed.weight"], net.state_dict()["label_embed.weight"])


def test_launch_train_refuses_a_bad_init_from_with_exit_2(runs, tmp_path):
    data = tmp_path / "data"
    from pipeline.data.prepare import prepare_dataset

    prepare_dataset("builtin:shapes10", str(data), shard_size=64, num_samples=64, workers=0, progress=False)
    other = TINY[1].replace("num_classes: 10", "num_classes: 5")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *TINY, other, f"data.url={data}",
                           f"train.init_from={runs / 'base_export'}", f"train.run_dir={tmp_path / 'run'}",
                           "train.num_workers=1"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 2 and "label_embed.weight" in proc.stderr, proc.stderr[-2000:]
