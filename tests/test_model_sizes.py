"""Presets reproduce the published parameter counts (counted on the meta device: no memory)."""

import dataclasses
import json

import pytest
import torch

from pipeline.models import PRESETS, PUBLISHED_PARAMETERS, build_model, count_parameters, meta_parameter_count


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMETERS))
def test_published_parameter_counts(preset):
    count = meta_parameter_count(preset)
    published = PUBLISHED_PARAMETERS[preset]
    assert abs(count - published) / published < 0.005, f"{preset}: {count} parameters vs published {published:.0f}"


def test_published_counts_cover_the_issue():
    assert set(PUBLISHED_PARAMETERS) == {"ddpm_cifar10", "adm_imagenet64", "adm_imagenet128", "adm_imagenet256"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_on_meta_and_its_config_round_trips(preset):
    with torch.device("meta"):
        model = build_model(preset)
    assert all(p.is_meta for p in model.parameters())
    data = json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert type(model.config).from_dict(data) == model.config == PRESETS[preset]
    assert count_parameters(model) > 0


def test_learned_sigma_and_class_embedding_add_the_expected_parameters():
    # Analytic: learned sigma doubles the output conv's channels (3 -> 6): +3 * (ch * 9 + 1);
    # the class embedding adds (num_classes + 1) rows of width 4 * base_channels.
    base = meta_parameter_count("ddpm_cifar10")
    ch = 128
    assert meta_parameter_count("ddpm_cifar10", learn_sigma=True) - base == 3 * (ch * 9 + 1)
    assert meta_parameter_count("ddpm_cifar10", num_classes=10) - base == 11 * 4 * ch
