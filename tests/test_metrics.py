"""Fréchet-distance maths, feature statistics, the offline FID error path, the classifier FD and the protocol."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.linalg
import threadpoolctl
import torch

from vitdiff import metrics
from vitdiff.data import make_dataset
from vitdiff.metrics import (
    FeatureStats, InceptionWeightsNotFound, MetricResult, classifier_accuracy, compute_fid, fd_classifier,
    frechet_distance, load_classifier, load_results, results_table, save_result,
)


def random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# --------------------------------------------------------------------------------------------------
# Fréchet distance


def test_fd_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    sigma = random_spd(rng, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9, abs=1e-9)


def test_fd_one_dimensional_gaussians():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)
    assert frechet_distance(0.5, 0.25, 0.5, 1.0) == pytest.approx(0.25)  # scalars accepted


def test_fd_zero_for_identical_and_symmetric_and_matches_sqrtm_form():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.normal(size=8), rng.normal(size=8), random_spd(rng, 8), random_spd(rng, 8)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the textbook (pytorch-fid) expression
    textbook = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(textbook, rel=1e-8)


def test_fd_singular_covariances_stay_real_and_finite():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(5, 20))  # 5 samples in 20-d: rank-4 covariance
    stats = FeatureStats(20).update(features)
    # sqrt of round-off eigenvalues (~1e-16) on the null space bounds the error near 1e-8 per dimension.
    assert abs(stats.frechet_distance(stats)) < 1e-6 * np.trace(stats.cov)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------------
# FeatureStats


def test_feature_stats_match_numpy_and_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    features = rng.normal(loc=100.0, size=(57, 5))  # large mean: checks the stable merge
    stats = FeatureStats(5, meta={"reference": "toy"})
    for i, chunk in enumerate(np.split(features, [1, 10, 11, 40])):  # uneven batches, two of size 1
        stats.update(torch.from_numpy(chunk) if i % 2 else chunk)  # tensors and arrays
    assert stats.count == 57
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)
    stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(tmp_path / "ref.npz")
    assert loaded.count == 57 and loaded.meta == {"reference": "toy"}
    np.testing.assert_allclose(loaded.cov, stats.cov)
    with pytest.raises(ValueError, match="expected 5-d"):
        stats.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(3).update(np.zeros((1, 3))).cov


# --------------------------------------------------------------------------------------------------
# FID (Inception) offline


@pytest.fixture
def no_inception_weights(tmp_path, monkeypatch):
    """An empty torch.hub cache, no env override, and a download that fails the test if ever attempted."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    monkeypatch.delenv(metrics.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kw):
        raise AssertionError("FID tried to download the Inception weights")

    monkeypatch.setattr(inception_module, "load_state_dict_from_url", no_download)
    return tmp_path


def test_fid_without_weights_fails_with_instructions(no_inception_weights):
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(InceptionWeightsNotFound) as error:
        compute_fid(images, images)
    message = str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert "https://github.com/toshas/torch-fidelity/releases" in message
    assert metrics.INCEPTION_WEIGHTS_ENV in message and "--inception-weights" in message
    assert str(no_inception_weights / "hub" / "checkpoints") in message
    with pytest.raises(InceptionWeightsNotFound, match="nope.pth"):
        compute_fid(images, images, weights_path=no_inception_weights / "nope.pth")


def test_fid_weights_from_env_and_hub_cache(no_inception_weights, monkeypatch):
    weights = no_inception_weights / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv(metrics.INCEPTION_WEIGHTS_ENV, str(weights))
    assert metrics.inception_weights_path() == weights
    monkeypatch.delenv(metrics.INCEPTION_WEIGHTS_ENV)
    cached = no_inception_weights / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert metrics.inception_weights_path() == cached


@pytest.mark.slow
def test_fid_runs_from_a_local_weights_file(no_inception_weights, monkeypatch):
    """The whole FID path on a weights file with random values (the real file is not available offline)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with monkeypatch.context() as patch:  # build the architecture once without any weights, to save a file
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: None)
        torch.manual_seed(0)
        random_net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = no_inception_weights / "random-inception.pth"
    torch.save(random_net.state_dict(), weights)

    generator = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
    fake = torch.rand(3, 1, 16, 16, generator=generator) * 2 - 1  # grey images are expanded to RGB
    extractor = metrics.InceptionFeatures(weights)
    assert torch.equal(extractor(real[:2]), extractor(real)[:2])
    real_stats = metrics.feature_stats(extractor, real, batch_size=2)
    assert real_stats.dim == 2048 and real_stats.count == 3
    # Multi-threaded OpenBLAS crawls on an oversubscribed CI box; one thread keeps the 2048-d FD to seconds.
    with threadpoolctl.threadpool_limits(1):
        assert compute_fid(fake, real_stats, weights_path=weights) > 0
    weights.unlink()  # ~95 MB; pytest keeps recent tmp dirs


# --------------------------------------------------------------------------------------------------
# Classifier FD (digits, for speed)


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITDIFF_CACHE", str(tmp_path_factory.mktemp("vitdiff-cache")))
        yield load_classifier("digits")


def test_classifier_trains_caches_and_reloads(digits_classifier):
    meta = digits_classifier.meta
    assert meta["test_accuracy"] > 0.85, meta
    file = os.path.basename(meta["file"])
    assert file.startswith(f"clf-digits-v{metrics.CLASSIFIER_VERSION}-") and file.endswith(".pt")
    assert os.path.dirname(meta["file"]) == os.environ["VITDIFF_CACHE"]
    reloaded = load_classifier("digits")
    assert reloaded.meta == meta  # read back, not retrained
    x = make_dataset("digits", train=False)[0][0][None]
    assert torch.equal(reloaded.features(x), digits_classifier.features(x))


def test_classifier_file_name_changes_with_the_training_data(digits_classifier):
    images, labels = metrics._split_tensors("digits", True)
    same = metrics._classifier_file("digits", images, labels)
    changed = labels.clone()
    changed[0] = (changed[0] + 1) % 10
    assert same.name == os.path.basename(digits_classifier.meta["file"])
    assert metrics._classifier_file("digits", images, changed) != same


def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    sets = [make_dataset("digits", train=train) for train in (True, False)]
    images = torch.cat([metrics.uint8_to_model_range(s.images) for s in sets])
    return images, torch.cat([s.labels for s in sets])


def test_fd_clf_near_zero_for_real_halves_and_large_for_noise(digits_classifier):
    images, _ = all_digits()
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    half_a, half_b = images[:898], images[898:]
    real_vs_real = fd_classifier(half_a, dataset="digits", reference=half_b)
    noise = torch.rand(898, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise_vs_real = fd_classifier(noise, dataset="digits", reference=half_b)
    blurred = torch.nn.functional.avg_pool2d(half_a, 5, stride=1, padding=2)
    blur_vs_real = fd_classifier(blurred, dataset="digits", reference=half_b)
    assert real_vs_real < 0.1 * blur_vs_real and blur_vs_real < noise_vs_real
    # Default reference: the cached statistics of the training split.
    train_images = metrics.uint8_to_model_range(make_dataset("digits").images)
    assert abs(fd_classifier(train_images, dataset="digits")) < 1e-6
    assert metrics.classifier_reference_stats("digits").meta["reference"] == "digits:train"
    assert metrics.FD_METRIC_NAMES["digits"] == "FD-digits-clf"


def test_classifier_accuracy_of_labelled_images(digits_classifier):
    images, labels = all_digits()
    test_images, test_labels = images[1500:], labels[1500:]
    assert classifier_accuracy(test_images, test_labels, dataset="digits") == pytest.approx(
        digits_classifier.meta["test_accuracy"])
    wrong = (test_labels + 1) % 10
    assert classifier_accuracy(test_images, wrong, dataset="digits") < 0.1
    smaller = torch.nn.functional.interpolate(test_images, size=16, mode="bilinear", antialias=True)
    assert classifier_accuracy(smaller, test_labels, dataset="digits") > 0.5  # other sizes are resized to 32
    with pytest.raises(ValueError, match="1-channel"):
        classifier_accuracy(torch.zeros(2, 3, 32, 32), torch.zeros(2), dataset="digits")


# --------------------------------------------------------------------------------------------------
# Protocol records


def result(metric="FID", n=10_000, value=3.0, **kw) -> MetricResult:
    protocol = dict(dataset="cifar10", reference="cifar10:train", checkpoint="runs/a/ckpt.pt", sampler="dpmpp_2m",
                    steps=50, guidance=1.0, guidance_convention="dit", seed=0)
    return MetricResult(metric=metric, value=value, num_samples=n, **{**protocol, **kw})


def test_labels_name_the_sample_count():
    assert result().label == "FID@10k"
    assert result("FD-fmnist-clf", 1000).label == "FD-fmnist-clf@1k"
    assert result(n=50_000).label == "FID@50k" and result(n=1500).label == "FID@1.5k"
    assert result(n=500).label == "FID@500" and result(n=1234).label == "FID@1234"


def test_save_and_load_results_jsonl(tmp_path):
    path = tmp_path / "results" / "metrics.jsonl"
    save_result(path, result())
    save_result(path, result("FD-fmnist-clf", 1000, 12.5, extra={"ema": True}))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["label"] == "FID@10k"
    loaded = load_results(path)
    assert loaded[1].extra == {"ema": True} and loaded[1].guidance_convention == "dit"
    assert loaded[0] == result(created=loaded[0].created)


def test_results_table_refuses_mixed_sample_counts():
    table = results_table([result(), result("FD-fmnist-clf", 1000, 9.0), result(seed=1, value=3.2)])
    assert len(table) == 2 and table[0]["FID@10k"] == 3.0 and table[0]["FD-fmnist-clf@1k"] == 9.0
    assert table[1]["seed"] == 1
    with pytest.raises(ValueError, match="different sample counts"):
        results_table([result(), result(n=50_000, checkpoint="other")])
    with pytest.raises(ValueError, match="two FID@10k"):
        results_table([result(), result(value=4.0)])
