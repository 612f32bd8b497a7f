"""Typed config: presets load, overrides apply, bad input names the key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, ExperimentConfig, config_to_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.diffusion.timesteps == 1000


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    out.write_text(config_to_yaml(cfg))
    assert load_config(out) == cfg


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.lr=2e-4", "train.ema_rates=[0.999, 0.9999]", "diffusion.schedule=cosine"])
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.train.ema_rates == (0.999, 0.9999)
    assert cfg.diffusion.schedule == "cosine"


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.learning_rate=1e-3"])
    msg = str(err.value)
    assert "train.learning_rate" in msg and "lr" in msg and "did you mean" in msg


def test_wrong_type_names_value():
    with pytest.raises(ConfigError, match=r"train\.micro_batch: value 'lots'"):
        load_config(None, ["train.micro_batch=lots"])


def test_out_of_range_names_bound():
    with pytest.raises(ConfigError, match=r"diffusion\.timesteps: value 1 .*greater than or equal to 2"):
        load_config(None, ["diffusion.timesteps=1"])
    with pytest.raises(ConfigError, match=r"ema_rates: 1\.5 is not allowed"):
        load_config(None, ["train.ema_rates=[1.5]"])


def test_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"diffusion\.schedule: value 'quadratic'.*'linear' or 'cosine'"):
        load_config(None, ["diffusion.schedule=quadratic"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_exits_2_with_message():
    code = "from pipeline.config import load_config_or_exit; load_config_or_exit(None, ['train.zero_stage=7'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert "train.zero_stage" in proc.stderr and "7" in proc.stderr


def test_classifier_objective_refuses_label_dropout():
    with pytest.raises(ConfigError, match=r"label_dropout: 0\.1 is not allowed with objective 'classifier'"):
        load_config(None, ["diffusion.objective=classifier", "diffusion.label_dropout=0.1"])
