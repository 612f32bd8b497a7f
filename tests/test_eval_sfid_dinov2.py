"""sFID from the Inception pass (checked against the TorchScript network's own mixed_6/conv), its
closed form on Gaussian features, and FD-DINOv2's loader on DINOv2-architecture weights made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluation import inception
from evaluation.dinov2 import (
    DINOV2_EXTRACTOR,
    build_dinov2,
    is_vit_l14,
    load_dinov2_state_dict,
    resolve_dinov2,
)
from evaluation.features import extract_features
from evaluation.metrics import compute_metrics, feature_statistics

FIDHELPER = inception.fidhelper_weights_path()


def _with_exact_moments(rng, n, mean, cov):
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(cov).T + mean


def test_sfid_equals_closed_form_frechet_distance_for_gaussian_spatial_features():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: FD = |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2 (Dowson & Landau 1982).
    rng = np.random.default_rng(0)
    d = 40
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    f1 = _with_exact_moments(rng, 300, m1, q @ np.diag(a) @ q.T)
    f2 = _with_exact_moments(rng, 200, m2, q @ np.diag(b) @ q.T)
    expected = float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    pool = rng.standard_normal((300, 8))
    out = compute_metrics({"2048": pool, "mixed_6_conv": f1}, {}, {"mixed_6_conv": feature_statistics(f2),
                          "2048": feature_statistics(pool)}, metrics=("fid", "sfid"))
    assert out["sfid"] == pytest.approx(expected, rel=1e-7)
    assert abs(out["fid"]) < 1e-9  # pool3 against its own statistics
    assert compute_metrics({"mixed_6_conv": f1}, {"mixed_6_conv": f2}, metrics=("sfid",))["sfid"] == pytest.approx(
        expected, rel=1e-7)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sfid_features_are_the_torchscript_networks_own_mixed_6_conv_and_a_set_against_itself_is_zero():
    """The hook on torch-fidelity's network gives, per image, the first 7 channels of the TorchScript
    TF-Inception's ``mixed_6.conv`` (conv, batch norm, ReLU) in (H, W, C) order: 7 x 17 x 17 = 2023."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    source = inception.resolve_feature_extractor(inception.FIDHELPER_EXTRACTOR)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    feats = extract_features(source, [images], batch_size=2)
    assert feats["mixed_6_conv"].shape == (3, 2023) and feats["2048"].shape == (3, 2048)

    layers = torch.jit.load(source.weights_path, map_location="cpu").eval().net.layers
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
    with torch.no_grad():
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1",
                     "mixed_2", "mixed_3", "mixed_4", "mixed_5"]:
            x = getattr(layers, name)(x)
        theirs = layers.mixed_6.conv(x)
    assert theirs.shape == (3, 192, 17, 17)
    theirs = theirs[:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy()
    np.testing.assert_allclose(feats["mixed_6_conv"], theirs, rtol=1e-4, atol=1e-5)
    assert theirs.mean() > 0.01  # real activations

    more = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    f = extract_features(source, [np.concatenate([images, more])])
    out = compute_metrics(f, f, metrics=("fid", "sfid"))
    assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-6


# -- FD-DINOv2 ----------------------------------------------------------------------------------


def _tiny_dinov2(seed: int = 0):
    """timm's DINOv2 ViT at 518 pixels (as published) with 64 wide, 2 deep blocks and seeded weights."""
    import timm

    torch.manual_seed(seed)
    net = timm.create_model("vit_large_patch14_dinov2", pretrained=False, embed_dim=64, depth=2, num_heads=1,
                            img_size=518, num_classes=0, dynamic_img_size=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net.eval()


@pytest.fixture(scope="module")
def dinov2_files(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("dinov2")
    net = _tiny_dinov2()
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))  # timm's layout
    hub = dict(state, mask_token=torch.zeros(1, 64))  # torch hub's layout (facebookresearch/dinov2)
    torch.save(hub, folder / "dinov2_vitl14_pretrain.pth")
    return net, folder / "model.safetensors", folder / "dinov2_vitl14_pretrain.pth"


def test_dinov2_loads_both_published_layouts_and_matches_the_network_at_224(dinov2_files):
    net, timm_file, hub_file = dinov2_files
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = net(x)  # the 518-pixel network, position embeddings interpolated at run time
        a, b = build_dinov2(timm_file)(x), build_dinov2(hub_file)(x)
    assert a.shape == (2, 64)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, expected, rtol=1e-5, atol=1e-5)
    assert not is_vit_l14(timm_file)


def test_dinov2_extractor_bicubic_224_imagenet_normalised_cls_and_fd_of_a_set_against_itself(dinov2_files):
    net, timm_file, _ = dinov2_files
    source = resolve_dinov2(timm_file)
    assert source.name == DINOV2_EXTRACTOR and len(source.sha256) == 64
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    feats = extract_features(source, [images], batch_size=2)
    assert set(feats) == {"dinov2"} and feats["dinov2"].shape == (5, 64)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True).clamp(0, 255) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net.forward_features(x)[:, 0]  # CLS token after the final norm
    np.testing.assert_allclose(feats["dinov2"], expected.numpy(), rtol=1e-4, atol=1e-4)
    assert abs(compute_metrics(feats, feats, metrics=("fd_dinov2",))["fd_dinov2"]) < 1e-6


def test_dinov2_weights_from_torch_hub_cache_or_a_clear_error(tmp_path, monkeypatch, dinov2_files):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(inception.MissingWeightsError, match="eval.dinov2_weights is not set") as err:
        resolve_dinov2(None)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth"
    assert str(cached) in str(err.value) and "--dinov2-weights" in str(err.value)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(dinov2_files[2].read_bytes())  # torch hub's layout
    source = resolve_dinov2(None)
    assert source.origin == "torch-hub-cache" and source.weights_path == str(cached)


def test_missing_or_wrong_dinov2_weights_are_clear_errors(tmp_path):
    with pytest.raises(inception.MissingWeightsError, match="is not a file.*--dinov2-weights"):
        resolve_dinov2(tmp_path / "nope.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINOv2 ViT state dict"):
        load_dinov2_state_dict(tmp_path / "other.pth")
    torch.save({"cls_token": torch.zeros(1, 1, 64), "patch_embed.proj.weight": object()}, tmp_path / "pickle.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        load_dinov2_state_dict(tmp_path / "pickle.pth")  # weights_only=True refuses arbitrary objects
