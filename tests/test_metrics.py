"""Fréchet-distance maths, feature statistics, the offline FID error path, the pinned networks, the classifier FD,
the one Fréchet entry point and the protocol."""
from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import threadpoolctl
import torch

from vitdiff import metrics
from vitdiff.data import make_dataset
from vitdiff.metrics import (
    FD_METRIC_NAMES, FeatureStats, InceptionWeightsNotFound, MetricResult, check_frechet_metric, classifier_accuracy,
    compute_fid, fd_classifier, frechet_distance, frechet_metric, load_classifier, load_results, results_table,
    save_result,
)
from vitdiff.shapes import ShapesDataset, load_attribute_classifier, text_alignment_accuracy

ROOT = Path(__file__).resolve().parents[1]


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
# Pinned networks and the classifier FD


@pytest.mark.parametrize("network", metrics.PINNED_NETWORKS, ids=lambda network: network.name)
def test_pinned_files_have_the_committed_checksum_and_ship_with_the_package(network):
    data = network.path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == network.sha256
    assert len(data) < 1.5e6  # small enough to commit
    model = network.load()
    assert model.meta["sha256"] == network.sha256 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(network.path.match(f"vitdiff/{pattern}") for pattern in package_data["vitdiff"])


def test_fd_metric_names_carry_the_network_hash():
    for dataset, network in metrics.FD_NETWORKS.items():
        assert FD_METRIC_NAMES[dataset].endswith(f"-clf[{network.sha256[:6]}]")
    assert FD_METRIC_NAMES["digits"].startswith("FD-digits-clf[")
    assert FD_METRIC_NAMES["fashion-mnist"].startswith("FD-fmnist-clf[")
    assert check_frechet_metric("digits") == FD_METRIC_NAMES["digits"]


@pytest.fixture
def asset_copy(tmp_path, monkeypatch):
    """The assets copied to a temporary folder that the loader reads instead (and forgets afterwards)."""
    copy = tmp_path / "assets"
    shutil.copytree(metrics.ASSET_DIR, copy)
    monkeypatch.setattr(metrics, "ASSET_DIR", copy)
    metrics._read_asset.cache_clear()
    yield copy
    metrics._read_asset.cache_clear()


def test_a_changed_or_missing_pinned_file_is_refused(asset_copy):
    path = asset_copy / "clf-digits.pt"
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(metrics.AssetChecksumError, match="git checkout -- vitdiff/assets"):
        load_classifier("digits")
    with pytest.raises(metrics.AssetChecksumError, match="has sha256"):
        check_frechet_metric("digits")  # what a run checks before it trains
    path.unlink()
    with pytest.raises(metrics.AssetChecksumError, match="missing"):
        fd_classifier(torch.zeros(4, 1, 32, 32), dataset="digits")


def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    sets = [make_dataset("digits", train=train) for train in (True, False)]
    images = torch.cat([metrics.uint8_to_model_range(s.images) for s in sets])
    return images, torch.cat([s.labels for s in sets])


def smooth_noise(n: int, seed: int) -> torch.Tensor:
    """Fixed 32x32 grey images: upsampled uniform noise (a CPU generator draws the same numbers everywhere)."""
    coarse = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


# Regression values, measured once with the pinned files (python -m pytest prints them on failure). The
# tolerance covers float32 feature round-off between CPUs and BLAS builds, far below any real difference.
PINNED_FD = {"digits": 139.97587, "fashion-mnist": 2844.7858}


def test_fd_of_fixed_samples_is_a_fixed_number():
    digits_test = metrics.uint8_to_model_range(make_dataset("digits", train=False).images)
    measured = {"digits": fd_classifier(digits_test, dataset="digits"),
                "fashion-mnist": fd_classifier(smooth_noise(256, seed=0), dataset="fashion-mnist")}
    assert measured == pytest.approx(PINNED_FD, rel=1e-4), measured


def test_fd_clf_near_zero_for_real_halves_and_large_for_noise():
    images, _ = all_digits()
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    half_a, half_b = images[:898], images[898:]
    real_vs_real = fd_classifier(half_a, dataset="digits", reference=half_b)
    noise = torch.rand(898, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise_vs_real = fd_classifier(noise, dataset="digits", reference=half_b)
    blurred = torch.nn.functional.avg_pool2d(half_a, 5, stride=1, padding=2)
    blur_vs_real = fd_classifier(blurred, dataset="digits", reference=half_b)
    assert real_vs_real < 0.1 * blur_vs_real and blur_vs_real < noise_vs_real
    # Default reference: the committed statistics, which are those of the training split under the pinned net.
    train_images = metrics.uint8_to_model_range(make_dataset("digits").images)
    assert abs(fd_classifier(train_images, dataset="digits")) < 1e-4
    reference = metrics.classifier_reference_stats("digits")
    assert reference.meta["reference"] == "digits:train" and reference.count == len(train_images)


def test_classifier_accuracy_of_labelled_images():
    images, labels = all_digits()
    test_images, test_labels = images[1500:], labels[1500:]
    pinned = load_classifier("digits").meta
    assert pinned["test_accuracy"] > 0.85 and pinned["train_data_sha256"]
    assert classifier_accuracy(test_images, test_labels, dataset="digits") == pytest.approx(pinned["test_accuracy"])
    wrong = (test_labels + 1) % 10
    assert classifier_accuracy(test_images, wrong, dataset="digits") < 0.1
    smaller = torch.nn.functional.interpolate(test_images, size=16, mode="bilinear", antialias=True)
    assert classifier_accuracy(smaller, test_labels, dataset="digits") > 0.5  # other sizes are resized to 32
    with pytest.raises(ValueError, match="1-channel"):
        classifier_accuracy(torch.zeros(2, 3, 32, 32), torch.zeros(2), dataset="digits")


def test_pinned_shapes_judge_reads_new_scenes():
    judge = load_attribute_classifier()
    scenes = ShapesDataset("val", image_size=64, num_samples=100, seed=5)
    accuracy = text_alignment_accuracy(scenes.images(), scenes.attributes, judge)
    assert accuracy["all_correct"] > 0.8, accuracy
    assert judge.meta["val_accuracy_64px"]["all_correct"] > 0.8


# --------------------------------------------------------------------------------------------------
# One entry point for a data set's Fréchet metric


def test_the_default_metric_follows_the_data_set(no_inception_weights):
    assert [metrics.default_frechet_metric(d) for d in ("fashion-mnist", "digits", "cifar10", "shapes")] == \
        ["fd-clf", "fd-clf", "fid", "fid"]
    # Raised up front, before any training: which file is missing and how to pass it.
    with pytest.raises(InceptionWeightsNotFound) as error:
        check_frechet_metric("cifar10")
    assert "--inception-weights PATH" in str(error.value) and metrics.INCEPTION_WEIGHTS_ENV in str(error.value)
    with pytest.raises(ValueError, match="Inception FID"):
        check_frechet_metric("cifar10", metric="fd-clf")
    with pytest.raises(ValueError, match="'fd-clf' or 'fid'"):
        check_frechet_metric("digits", metric="nll")


class PooledStandIn(torch.nn.Module):
    """Inception's place in the FID path: 3x4x4 average-pooled pixels, from a (dummy) local weights file."""

    def __init__(self, weights_path=None):
        super().__init__()
        self.weights_path = metrics.inception_weights_path(weights_path)

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.expand(-1, 3, -1, -1), 4).flatten(1)


def test_fid_path_of_the_entry_point_on_a_stand_in(no_inception_weights, monkeypatch, tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    monkeypatch.setattr(metrics, "InceptionFeatures", PooledStandIn)
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 8, 8, generator=generator) * 2 - 1
    fake = torch.rand(30, 3, 8, 8, generator=generator) * 2 - 1
    train_sets = []

    def fake_make_dataset(name, *, root, image_size, train, flip):
        train_sets.append((name, image_size, train))
        return torch.utils.data.TensorDataset(real, torch.zeros(len(real)))

    monkeypatch.setattr(metrics, "make_dataset", fake_make_dataset)
    pooled = PooledStandIn(weights)
    expected = FeatureStats(48).update(pooled(fake)).frechet_distance(FeatureStats(48).update(pooled(real)))
    result = frechet_metric(fake, "cifar10", inception_weights=weights)
    assert train_sets == [("cifar10", 8, True)]
    assert result.metric == "FID" and result.reference == "cifar10:train (all 40)"
    assert result.value == pytest.approx(expected, rel=1e-9)
    # A reference .npz instead of the training split; the environment variable instead of the argument.
    metrics.feature_stats(pooled, real).save(tmp_path / "ref.npz")
    monkeypatch.setenv(metrics.INCEPTION_WEIGHTS_ENV, str(weights))
    from_file = frechet_metric(fake, "cifar10", reference=tmp_path / "ref.npz")
    assert from_file == (result.metric, pytest.approx(expected, rel=1e-9), str(tmp_path / "ref.npz"))
    assert len(train_sets) == 1


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


# --------------------------------------------------------------------------------------------------
# Precision / recall and confidence on the classifier's features


def test_manifold_precision_recall_separates_fidelity_from_coverage():
    # Real points in two clusters; k=1 radii are 1 (each point's neighbour is one step along its line).
    left, right = torch.arange(10.0)[:, None], 100 + torch.arange(10.0)[:, None]
    real = torch.cat([left, right])
    assert metrics.manifold_precision_recall(real, real, k=1) == (1.0, 1.0)
    # Samples covering one cluster only: all are real-looking (precision 1), half the real points are missed.
    assert metrics.manifold_precision_recall(left + 0.5, real, k=1) == (1.0, 0.5)
    # Samples far from both: nothing is real-looking and nothing real is covered.
    assert metrics.manifold_precision_recall(real + 50.5, real, k=1) == (0.0, 0.0)
    with pytest.raises(ValueError, match="k-NN"):
        metrics.manifold_precision_recall(left, real, k=10)
    with pytest.raises(ValueError, match="feature sizes"):
        metrics.manifold_precision_recall(torch.zeros(4, 2), torch.zeros(4, 3))


def test_classifier_precision_recall_and_confidence_rank_real_above_degraded():
    test = metrics.uint8_to_model_range(make_dataset("digits", train=False).images)
    real = metrics.classifier_precision_recall(test, dataset="digits")
    blurred = metrics.classifier_precision_recall(torch.nn.functional.avg_pool2d(test, 5, stride=1, padding=2),
                                                  dataset="digits")
    noise = metrics.classifier_precision_recall(smooth_noise(len(test), seed=0), dataset="digits")
    assert real.precision > 0.7 and real.recall > 0.6
    assert blurred.recall < real.recall - 0.2 and max(noise) < 0.1
    blends = (test + test.roll(1, 0)) / 2  # two digits on top of each other
    assert metrics.classifier_confidence(test, dataset="digits") > 0.95
    assert metrics.classifier_confidence(blends, dataset="digits") < 0.9


def test_reference_images_come_at_the_asked_size_as_training_reads_them():
    images = metrics.classifier_reference_images("digits", 16, 20, seed=3)
    data = make_dataset("digits", image_size=16, train=True, flip=False)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))[:20]
    assert images.shape == (20, 1, 16, 16)
    assert torch.equal(images, torch.stack([data[int(i)][0] for i in order]))
    with pytest.raises(ValueError, match="training split has"):
        metrics.classifier_reference_images("digits", 16, len(data) + 1)
