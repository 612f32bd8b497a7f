"""Every preset at reduced width on CPU: shapes, determinism, gradients, conditioning paths,
autocast numerics, channels-last and activation-checkpointing parity, config round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.models import (
    PRESETS,
    ClassifierConfig,
    NoisyClassifier,
    UNet,
    UNetConfig,
    build_model,
    build_model_from_config,
    build_model_from_dict,
    count_parameters,
)
from pipeline.models.layers import AttentionBlock, AttentionPool2d, GroupNorm32, ResBlock, timestep_embedding

UNET_PRESETS = sorted(n for n, c in PRESETS.items() if isinstance(c, UNetConfig))
CLASSIFIER_PRESETS = sorted(n for n, c in PRESETS.items() if isinstance(c, ClassifierConfig))
B = 2


def small_overrides(preset: str) -> dict:
    """The preset's structure (levels, blocks, attention placement, AdaGN, up/down blocks,
    conditioning) at reduced width and 32x32."""
    cfg = PRESETS[preset]
    over = dict(base_channels=16, num_res_blocks=min(cfg.num_res_blocks, 1), image_size=32, norm_groups=8)
    if cfg.num_head_channels is not None:
        over["num_head_channels"] = 8
    else:
        over["num_heads"] = min(cfg.num_heads, 2)
    if cfg.num_classes:
        over["num_classes"] = 5
    return over


def small(preset: str, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(preset, **{**small_overrides(preset), **extra})


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give the zero-initialised layers random weights, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(model, seed: int = 0, batch: int = B):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.rand(batch, generator=g) * 999
    kw = {}
    if isinstance(cfg, UNetConfig):
        if cfg.num_classes:
            kw["y"] = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
        if cfg.low_res_channels:
            s = cfg.image_size // 4
            kw["low_res"] = torch.randn(batch, cfg.low_res_channels, s, s, generator=g)
        if cfg.cond_embed_dim:
            kw["emb"] = torch.randn(batch, cfg.cond_embed_dim, generator=g)
    return x, t, kw


# ---------------------------------------------------------------------------------------------
# Layers


def test_timestep_embedding_is_the_sinusoid_of_float_timesteps():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 16)
    half = 8
    freqs = torch.tensor([10000 ** (-i / half) for i in range(half)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 15).shape == (3, 15)
    with pytest.raises(ValueError, match="t"):
        timestep_embedding(torch.zeros(2, 1), 16)


def test_groupnorm32_runs_in_fp32_under_bf16_autocast():
    norm = GroupNorm32(4, 16)
    x = torch.randn(2, 16, 5, 5).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps).bfloat16()
    torch.testing.assert_close(y, ref, atol=0, rtol=0)


def test_attention_block_matches_explicit_softmax_attention_with_context_tokens():
    torch.manual_seed(0)
    block = randomize_(AttentionBlock(16, num_heads=2, num_head_channels=None, norm_groups=4, context_channels=6))
    x, ctx = torch.randn(2, 16, 3, 4), torch.randn(2, 5, 6)
    # Reference: softmax(q k^T / sqrt(d)) v per head, keys/values = [context tokens, pixels].
    tokens = block.norm(x).flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)
    ck, cv = block.context_kv(ctx).chunk(2, dim=-1)
    k, v = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
    heads = [slice(0, 8), slice(8, 16)]
    out = torch.cat(
        [torch.softmax(q[..., h] @ k[..., h].transpose(1, 2) / math.sqrt(8), dim=-1) @ v[..., h] for h in heads], -1
    )
    expected = x + block.proj_out(out).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(block(x, ctx), expected, atol=1e-5, rtol=1e-5)


def test_bf16_attention_softmax_is_accumulated_in_fp32():
    # The attention layers rely on SDPA keeping the softmax in fp32 for bf16 inputs: its error
    # must then be about the rounding of the output alone, well below a bf16 softmax's.
    g = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(1, 2, 1024, 64, generator=g).bfloat16() for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.scaled_dot_product_attention(q, k, v).float()
    rounding = (ref.bfloat16().float() - ref).norm()
    naive = (torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v).float()
    assert (naive - ref).norm() > 3 * rounding  # a bf16 softmax would be detected
    assert (out - ref).norm() < 1.5 * rounding


def test_attention_pool_equals_the_mean_token_row_of_full_attention():
    torch.manual_seed(0)
    pool = AttentionPool2d(3, 16, num_head_channels=8, out_channels=7)
    x = torch.randn(2, 16, 3, 3)
    tokens = x.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + pool.positional_embedding
    q = pool.q(tokens).view(2, 10, 2, 8).transpose(1, 2)
    k, v = pool.kv(tokens).view(2, 10, 2, 2, 8).permute(2, 0, 3, 1, 4)
    full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v  # (B, heads, 10, 8)
    expected = pool.proj_out(full[:, :, 0].reshape(2, 16))
    torch.testing.assert_close(pool(x), expected, atol=1e-5, rtol=1e-5)


def test_resblock_is_its_skip_path_at_initialisation():
    # Zero-initialised last convolution (DDPM / ADM): the residual branch starts at zero.
    torch.manual_seed(0)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    same = ResBlock(8, 8, 12, dropout=0.0, use_scale_shift_norm=True, norm_groups=4)
    torch.testing.assert_close(same(x, emb), x)
    down = ResBlock(8, 8, 12, dropout=0.0, use_scale_shift_norm=False, norm_groups=4, resample="down")
    torch.testing.assert_close(down(x, emb), F.avg_pool2d(x, 2))
    up = ResBlock(8, 16, 12, dropout=0.0, use_scale_shift_norm=True, norm_groups=4, resample="up")
    torch.testing.assert_close(up(x, emb), up.skip(F.interpolate(x, scale_factor=2.0)))


# ---------------------------------------------------------------------------------------------
# Every preset at reduced width


@pytest.mark.parametrize("preset", UNET_PRESETS)
def test_unet_preset_shapes_init_determinism_and_gradients(preset):
    model = small(preset).train()
    cfg = model.config
    x, t, kw = inputs(model)
    out = model(x, t, **kw)
    assert out.shape == (B, cfg.out_channels, 32, 32)
    assert out.shape[1] == (2 if cfg.learn_sigma else 1) * cfg.in_channels
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution

    # Same seed -> same weights and, with dropout active, the same output.
    randomize_(model)
    twin = randomize_(small(preset))
    torch.manual_seed(3)
    a = model(x, t, **kw)
    torch.manual_seed(3)
    b = twin(x, t, **kw)
    torch.testing.assert_close(a, b, atol=0, rtol=0)

    # Gradients reach every parameter.
    a.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("preset", UNET_PRESETS)
def test_unet_preset_bf16_autocast_forward_is_finite_and_close(preset):
    model = randomize_(small(preset)).eval()
    x, t, kw = inputs(model)
    with torch.no_grad():
        ref = model(x, t, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, **kw)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_learned_sigma_doubles_channels_and_keeps_the_prediction_path_shape():
    plain = small("ddpm_cifar10")
    sigma = small("ddpm_cifar10", learn_sigma=True)
    x, t, _ = inputs(plain)
    assert plain(x, t).shape[1] == 3 and sigma(x, t).shape[1] == 6


def test_null_class_behaves_as_unconditional_and_labels_condition():
    model = randomize_(small("adm_imagenet64")).eval()
    x, t, _ = inputs(model)
    null = torch.full((B,), model.config.num_classes)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, None), model(x, t, null), atol=0, rtol=0)
        a, b = model(x, t, torch.tensor([0, 1])), model(x, t, torch.tensor([1, 0]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="num_classes=0"):
        small("ddpm_cifar10")(x, t, torch.zeros(B, dtype=torch.long))


def test_scalar_and_float_timesteps_are_accepted_and_change_the_output():
    model = randomize_(small("tiny")).eval()
    x, _, _ = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor(10.5)), model(x, torch.full((B,), 10.5)))
        assert not torch.allclose(model(x, torch.full((B,), 0.25)), model(x, torch.full((B,), 0.5)))
    with pytest.raises(ValueError, match="t: expected"):
        model(x, torch.zeros(B + 1))
    with pytest.raises(ValueError, match="x: expected"):
        model(x[:, :2], torch.zeros(B))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(x[..., :31, :31], torch.zeros(B))


def test_upsampler_conditions_on_the_bilinearly_upsampled_low_res_image():
    model = randomize_(small("adm_upsampler_64_256")).eval()
    x, t, kw = inputs(model)
    low = kw["low_res"]  # 8x8 for a 32x32 output
    y = kw["y"]
    with torch.no_grad():
        out = model(x, t, y, low_res=low)
        # Pre-upsampling the low-res image to the output size must give the same network input.
        pre = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x, t, y, low_res=pre), out, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, t, y, low_res=low.flip(0)), out)
    with pytest.raises(ValueError, match="low_res"):
        model(x, t, y)
    with pytest.raises(ValueError, match="low_res"):
        small("tiny")(x, t, low_res=low)


def test_vector_embedding_conditioning_none_is_zeros_and_embedding_changes_output():
    model = randomize_(small("tiny", cond_embed_dim=12, cond_tokens=3)).eval()
    x, t, kw = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t, emb=torch.zeros(B, 12)), atol=0, rtol=0)
        assert not torch.allclose(model(x, t, emb=kw["emb"]), model(x, t))
    attn = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert attn and all(m.context_kv is not None for m in attn)
    with pytest.raises(ValueError, match="emb"):
        model(x, t, emb=torch.zeros(B, 5))


@pytest.mark.parametrize("preset", CLASSIFIER_PRESETS)
def test_classifier_preset_logits_gradients_and_bf16(preset):
    clf = small(preset).train()
    assert isinstance(clf, NoisyClassifier)
    x, t, _ = inputs(clf)
    x.requires_grad_(True)
    logits = clf(x, t)
    assert logits.shape == (B, clf.config.num_classes)
    # Classifier guidance needs d log p(y | x_t) / d x_t.
    (grad_x,) = torch.autograd.grad(logits.log_softmax(-1)[:, 0].sum(), x, retain_graph=True)
    assert grad_x.shape == x.shape and torch.isfinite(grad_x).all()
    logits.logsumexp(-1).sum().backward()
    randomize_(clf)
    clf.zero_grad()
    clf(x, t).square().mean().backward()
    missing = [n for n, p in clf.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.isfinite(clf.eval()(x, t)).all()
    with pytest.raises(ValueError, match="x: expected"):
        clf(x[..., :16, :16], t)


# ---------------------------------------------------------------------------------------------
# Runtime options: channels-last, activation checkpointing


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["ddpm_cifar10", "adm_imagenet64", "adm_classifier_64"])
def test_channels_last_matches_contiguous(preset):
    ref = randomize_(small(preset)).eval()
    cl = randomize_(small(preset)).eval().set_channels_last(True)
    assert cl.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x, t, kw = inputs(ref)
    out_ref, out_cl = ref(x, t, **kw), cl(x, t, **kw)
    torch.testing.assert_close(out_cl, out_ref, atol=1e-4, rtol=1e-4)
    out_ref.square().mean().backward()
    out_cl.square().mean().backward()
    for name, g in _grads(ref).items():
        torch.testing.assert_close(dict(cl.named_parameters())[name].grad, g, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("preset", ["ddpm_cifar10", "adm_imagenet64", "adm_classifier_64"])
def test_activation_checkpointing_gives_the_same_gradients(preset, monkeypatch):
    """Same gradients with and without checkpointing, and checkpointing does run: every block of the
    checkpointed model goes through torch.utils.checkpoint (counted), none of the plain one."""
    from pipeline.models import unet

    calls: list[int] = []
    real = unet.checkpoint
    monkeypatch.setattr(unet, "checkpoint", lambda fn, *a, **k: calls.append(1) or real(fn, *a, **k))
    plain = randomize_(small(preset)).train()
    ckpt = randomize_(small(preset)).train().set_activation_checkpointing(True)
    x, t, kw = inputs(plain)
    counts = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # dropout masks must be replayed identically on recomputation
        calls.clear()
        model(x, t, **kw).square().mean().backward()
        counts.append(len(calls))
    assert counts[0] == 0 and counts[1] >= 3, counts
    g_ckpt = _grads(ckpt)
    for name, g in _grads(plain).items():
        torch.testing.assert_close(g_ckpt[name], g, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Registry, configs, errors


def test_config_json_round_trip_rebuilds_the_same_network():
    model = randomize_(small("adm_upsampler_64_256")).eval()
    data = json.loads(json.dumps(dataclasses.asdict(model.config)))
    rebuilt = build_model_from_dict(data)
    rebuilt.load_state_dict(model.state_dict())  # strict: identical parameter names and shapes
    x, t, kw = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, **kw), model(x, t, **kw), atol=0, rtol=0)
    clf = small("adm_classifier_128")
    assert build_model_from_dict(dataclasses.asdict(clf.config)).config == clf.config
    with pytest.raises(ValueError, match="architecture"):
        build_model_from_dict({"architecture": "vit"})
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict({**data, "bogus": 1})


def test_prediction_channels_decouple_the_output_from_the_input():
    """VDM Fourier features: 9 input channels (image + sin/cos), 3 predicted; learn_sigma doubles
    the prediction; the default (None) is the old tie to in_channels, and JSON round-trips."""
    tiny = {"image_size": 8, "base_channels": 8, "channel_mult": (1,), "attention_resolutions": (), "norm_groups": 4}
    plain = build_model("tiny", **tiny)
    assert plain.config.prediction_channels is None and plain.config.out_channels == 3
    model = randomize_(build_model("tiny", **tiny, in_channels=9, prediction_channels=3)).eval()
    x = torch.randn(2, 9, 8, 8)
    with torch.no_grad():
        assert model(x, torch.tensor([1.0, 500.0])).shape == (2, 3, 8, 8)
    # only the first and last convolutions differ from the tied network
    diff = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert diff == 6 * 8 * 9  # in_conv: 6 more input channels x 8 outputs x 3x3
    sigma = build_model("tiny", **tiny, in_channels=9, prediction_channels=3, learn_sigma=True)
    assert sigma.config.out_channels == 6 and sigma.out_conv.out_channels == 6
    data = json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert data["prediction_channels"] == 3
    rebuilt = build_model_from_dict(data)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, torch.tensor([1.0, 500.0])), model(x, torch.tensor([1.0, 500.0])),
                                   atol=0, rtol=0)
    old = {k: v for k, v in dataclasses.asdict(plain.config).items() if k != "prediction_channels"}
    assert build_model_from_dict(old).config == plain.config  # exports written before the field existed
    with pytest.raises(ValueError, match="prediction_channels: 0 is not allowed"):
        UNetConfig(prediction_channels=0)


def test_unknown_preset_and_override_raise_value_errors_listing_the_allowed():
    with pytest.raises(ValueError, match=r"'unet_xl'.*adm_imagenet64"):
        build_model("unet_xl")
    with pytest.raises(ValueError, match=r"chanel_mult.*channel_mult"):
        build_model("tiny", chanel_mult=(1, 2))
    with pytest.raises(ValueError, match="attention_resolutions: 7"):
        build_model("tiny", attention_resolutions=(7,))
    with pytest.raises(ValueError, match="norm_groups"):
        build_model("ddpm_cifar10", base_channels=20)
    with pytest.raises(ValueError, match="num_head_channels"):
        build_model("adm_imagenet64", num_head_channels=50)
    with pytest.raises(ValueError, match="dropout"):
        build_model("tiny", dropout=1.5)
    with pytest.raises(ValueError, match="image_size"):
        build_model("tiny", image_size=33)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("adm_classifier_64", num_classes=0)
    with pytest.raises(ValueError, match="channel_mult"):
        build_model("tiny", channel_mult="1,2")
    with pytest.raises(ValueError, match="channel_mult"):
        build_model("tiny", channel_mult=())


def test_build_model_from_experiment_model_config():
    cfg = ModelConfig(
        preset="tiny",
        overrides={"num_classes": 10, "channel_mult": [1, 2]},  # YAML gives lists
        checkpoint_activations=True,
        channels_last=True,
    )
    model = build_model_from_config(cfg)
    assert isinstance(model, UNet)
    assert model.config.channel_mult == (1, 2) and model.config.num_classes == 10
    assert model.checkpoint_activations and model.channels_last
    x, t, _ = inputs(model, batch=3)
    assert model(x, t, torch.tensor([0, 5, 10])).shape == (3, 3, 32, 32)


def test_tiny_preset_is_small_and_trains_a_batch_of_16():
    model = build_model("tiny", num_classes=10)
    assert count_parameters(model) < 2_000_000
    x, t, _ = inputs(model, batch=16)
    model(x, t, torch.randint(0, 11, (16,))).square().mean().backward()


def test_models_package_imports_no_distributed_storage_or_benchmark_library():
    import subprocess
    import sys

    forbidden = ["ray", "deepspeed", "webdataset", "boto3", "diffusers"]
    code = (
        "import sys, pipeline.models, pipeline.models.presets; "
        f"print([m for m in {forbidden!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
