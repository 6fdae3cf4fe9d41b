"""Sample-quality metrics, each number saved with the protocol that produced it.

- ``frechet_distance``: the Fréchet distance between two Gaussians, in float64, through the symmetric form
  tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), whose eigenvalues are real and >= 0 (no complex sqrtm).
- ``FeatureStats``: running mean / covariance (float64, Chan's pairwise merge), saved as .npz.
- FID: Inception-v3 pool features from torch-fidelity's extractor (the TF-FID-compatible port), loaded from a
  local weights file only: ``weights_path``, ``$VITDIFF_INCEPTION_WEIGHTS``, or torch.hub's cache. Images
  are quantised to uint8 first (as if saved to PNG) and the extractor resizes them to 299 itself.
  Without weights it raises ``InceptionWeightsNotFound`` saying where to put the file; it never downloads.
- FD-<set>-clf[<hash>]: the same Fréchet distance on the 64-d penultimate features of a small CNN trained here on
  fashion-mnist or digits (32x32, 1 channel). A CPU/offline proxy, never comparable with FID: it has its own
  metric names, which carry the first 6 hex digits of the network file's sha256. The networks (and the shapes
  judge, ``vitdiff.shapes``) are ``PinnedNetwork``s: files committed under ``vitdiff/assets/``, made by their
  deterministic recipes with ``python -m vitdiff.metrics --make-assets`` and verified against the sha256 in the
  code on every load, so the same samples score the same on every machine. Each FD file also holds the feature
  statistics of its training split, the default reference. ``classifier_accuracy`` scores class-conditional
  samples with the classifier.
- ``classifier_precision_recall`` (improved precision / recall, Kynkäänniemi et al. 2019) and
  ``classifier_confidence`` on the same classifier: fidelity and coverage apart, where one Fréchet number mixes
  them (experiments/validate_fd.py measures how each ranks degraded real images).
- ``frechet_metric``: the one entry point for a data set's Fréchet metric (FD-clf where a pinned classifier
  exists, else FID); ``check_frechet_metric`` raises up front, saying what is missing, when it could not run.
- ``MetricResult`` / ``save_result`` / ``results_table``: every value carries metric, n ("FID@10k"), sampler,
  steps, guidance (+ convention), seed, reference set, checkpoint and dataset; a table refuses mixed n.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitdiff.data import make_dataset, uint8_to_model_range

# --------------------------------------------------------------------------------------------------
# Fréchet distance and feature statistics

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) for Gaussians N(mu1, S1), N(mu2, S2); float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    # Symmetrise away round-off, then S1^1/2 from its eigendecomposition (tiny negative eigenvalues -> 0).
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    values, vectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated batch by batch in float64."""

    def __init__(self, dim: int, meta: dict[str, Any] | None = None):
        self.dim = dim
        self.count = 0
        self._mean = np.zeros(dim, np.float64)
        self._scatter = np.zeros((dim, dim), np.float64)  # sum of centred outer products
        self.meta = dict(meta or {})

    def update(self, features) -> "FeatureStats":
        x = features.detach().double().cpu().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim}-d features, got {x.shape[1]}")
        n = x.shape[0]
        if n == 0:
            return self
        batch_mean = x.mean(0)
        centred = x - batch_mean
        delta = batch_mean - self._mean
        total = self.count + n
        # Chan et al.'s merge of two (count, mean, scatter) summaries: exact and stable in float64.
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
        self._mean += delta * (n / total)
        self.count = total
        return self

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        return self._scatter / (self.count - 1)

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, mu=self._mean, sigma=self.cov, count=self.count, meta=json.dumps(self.meta))

    @classmethod
    def from_moments(cls, mean, cov, count: int, meta: dict[str, Any] | None = None) -> "FeatureStats":
        stats = cls(len(mean), meta)
        stats.count, stats._mean = int(count), np.asarray(mean, np.float64).copy()
        stats._scatter = np.asarray(cov, np.float64) * (stats.count - 1)
        return stats

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path) as data:
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            return cls.from_moments(data["mu"], data["sigma"], int(data["count"]), meta)


def _image_batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    """A (N, C, H, W) tensor, or an iterable of tensors / (images, targets) batches, as image batches."""
    if torch.is_tensor(images):
        yield from images.split(batch_size)
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def feature_stats(extract, images, *, batch_size: int = 100, device=None, meta=None) -> FeatureStats:
    """Statistics of ``extract(batch)`` over images in [-1, 1]."""
    stats = None
    for batch in _image_batches(images, batch_size):
        features = extract(batch.to(device) if device is not None else batch).double()
        if stats is None:
            stats = FeatureStats(features.shape[1], meta)
        stats.update(features)
    if stats is None:
        raise ValueError("no images given")
    return stats


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255] with rounding, as when samples are written to PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --------------------------------------------------------------------------------------------------
# FID (Inception-v3, torch-fidelity)


def _inception_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


INCEPTION_WEIGHTS_ENV = "VITDIFF_INCEPTION_WEIGHTS"


class InceptionWeightsNotFound(FileNotFoundError):
    """FID needs the Inception-v3 weights file, which is never downloaded at run time."""


def inception_weights_path(weights_path: str | os.PathLike | None = None) -> Path:
    """The weights file: the argument, else $VITDIFF_INCEPTION_WEIGHTS, else torch.hub's checkpoint cache."""
    url = _inception_url()
    filename = url.rsplit("/", 1)[-1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    candidates = [Path(p).expanduser() for p in (weights_path, os.environ.get(INCEPTION_WEIGHTS_ENV)) if p]
    for candidate in candidates or [cached]:
        if candidate.is_file():
            return candidate
    raise InceptionWeightsNotFound(
        f"FID needs the Inception-v3 weights {filename} and none was found (looked at "
        f"{[str(c) for c in candidates or [cached]]}). Download it on a machine with internet from\n  {url}\n"
        f"then pass --inception-weights PATH (weights_path=PATH), set {INCEPTION_WEIGHTS_ENV}=PATH, or put it at "
        f"{cached}. Offline, use the classifier Fréchet distance (FD-fmnist-clf / FD-digits-clf) instead; "
        "it is not FID."
    )


class InceptionFeatures(nn.Module):
    """2048-d pool3 features of the TF-FID Inception-v3 (torch-fidelity's port) for images in [-1, 1]."""

    def __init__(self, weights_path: str | os.PathLike | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights_path = inception_weights_path(weights_path)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(self.weights_path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise ValueError(f"Inception takes 1- or 3-channel images, got {images.shape[1]} channels")
        device = next(self.net.parameters()).device
        return self.net(to_uint8(images).to(device))[0]


def compute_fid(fake, real, *, weights_path=None, batch_size: int = 50, device=None) -> float:
    """FID between two image sets; either may be given as precomputed ``FeatureStats`` (e.g. a reference .npz)."""
    extractor = InceptionFeatures(weights_path)
    if device is not None:
        extractor.to(device)
    stats = [s if isinstance(s, FeatureStats) else feature_stats(extractor, s, batch_size=batch_size, device=device)
             for s in (fake, real)]
    return stats[0].frechet_distance(stats[1])


# --------------------------------------------------------------------------------------------------
# Pinned measuring networks: committed files with their sha256

ASSET_DIR = Path(__file__).resolve().parent / "assets"


class AssetChecksumError(RuntimeError):
    """A pinned network's file is missing or is not the committed one."""


@dataclass(frozen=True)
class PinnedNetwork:
    """A measuring network committed under ``vitdiff/assets/`` with the sha256 of its file.

    The file is a ``torch.save``d dict: ``state_dict``, ``config`` (the architecture's keyword arguments), ``meta``
    (a JSON string: recipe, training data hash, held-out accuracy) and, for a Fréchet metric, ``reference``
    (``mean``, ``cov``, ``count`` of the real training split's features). Loading reads the bytes once per
    process, refuses any file whose sha256 differs, and unpickles with ``weights_only=True``.
    """

    name: str                               # file stem under vitdiff/assets/, e.g. "clf-digits"
    sha256: str                             # of the committed file; its first 6 hex digits tag the metric's name
    build: Callable[..., nn.Module] | str   # the architecture, called with the saved ``config``
    make: Callable[[], dict] | str          # the deterministic recipe that wrote the file (``--make-assets``)
    # build / make: a function, or "module:function" for one defined in a module that itself imports this one
    # (vitdiff.shapes), imported on first use.

    @property
    def path(self) -> Path:
        return ASSET_DIR / f"{self.name}.pt"

    @property
    def tag(self) -> str:
        return self.sha256[:6]

    def payload(self) -> dict[str, Any]:
        return _read_asset(self.path, self.sha256)

    def load(self) -> nn.Module:
        """A fresh copy (callers may move it to a device), in eval mode, without gradients."""
        payload = self.payload()
        model = _resolve(self.build)(**payload["config"])
        model.load_state_dict(payload["state_dict"])
        model.meta = {**json.loads(payload["meta"]), "file": str(self.path), "sha256": self.sha256}
        return model.eval().requires_grad_(False)


def _resolve(function: Callable | str) -> Callable:
    if isinstance(function, str):
        module, _, name = function.partition(":")
        return getattr(importlib.import_module(module), name)
    return function


@functools.lru_cache(maxsize=None)
def _read_asset(path: Path, sha256: str) -> dict[str, Any]:
    if not path.is_file():
        raise AssetChecksumError(f"the pinned network {path} is missing: it is committed in the repository and "
                                 "installed with the package; reinstall vitdiff (pip install -e .) or check out the "
                                 "file again (git checkout -- vitdiff/assets)")
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise AssetChecksumError(f"{path} has sha256 {found}, but the committed file has {sha256}: the metric would "
                                 "not be comparable with other machines. Restore it (git checkout -- vitdiff/assets); "
                                 "if you re-made it on purpose, update the sha256 in the code after review")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def asset_bytes(payload: dict[str, Any]) -> bytes:
    """The file content of a payload. Saved from memory so the archive's inner name (torch.save takes it from the
    file name) and hence the bytes depend on the payload only."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def make_assets() -> None:
    """Re-make the pinned files with their recipes (one CPU thread: the sums' order does not depend on the thread
    count) and say whether each matches its committed sha256."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for network in PINNED_NETWORKS:
            start = time.perf_counter()
            data = asset_bytes(_resolve(network.make)())
            network.path.parent.mkdir(parents=True, exist_ok=True)
            network.path.write_bytes(data)
            found = hashlib.sha256(data).hexdigest()
            verdict = ("matches the pinned sha256" if found == network.sha256 else
                       f"DIFFERS from the pinned {network.sha256}: review it, then pin the new sha256 in the code")
            print(f"{network.path.name}: {len(data) / 1e3:.0f} kB in {time.perf_counter() - start:.0f} s, "
                  f"sha256 {found} {verdict}")
    finally:
        torch.set_num_threads(threads)
    _read_asset.cache_clear()


# --------------------------------------------------------------------------------------------------
# The offline classifier and FD-<set>-clf

CLASSIFIER_VERSION = 1
CLASSIFIER_IMAGE_SIZE = 32


@dataclass(frozen=True)
class ClassifierRecipe:
    train_items: int | None  # first n training images (None: all)
    epochs: int
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


CLASSIFIER_RECIPES = {
    # Sized to train in about a minute (fashion-mnist) / seconds (digits) on one idle CPU thread.
    "fashion-mnist": ClassifierRecipe(train_items=30000, epochs=3),
    "digits": ClassifierRecipe(train_items=None, epochs=6, batch_size=32, lr=3e-3),
}


class SmallClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4) and a 64-d feature layer; features are taken before the ReLU."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.feature_dim),
        )
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.meta: dict[str, Any] = {}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (1, CLASSIFIER_IMAGE_SIZE, CLASSIFIER_IMAGE_SIZE):
            if images.shape[1] != 1:
                raise ValueError(f"the classifier takes 1-channel images, got shape {tuple(images.shape)}")
            # Part of the protocol: other sizes are resized to 32x32 (bilinear, antialiased).
            images = F.interpolate(images.float(), size=CLASSIFIER_IMAGE_SIZE, mode="bilinear", antialias=True)
        return self.body(images.float().clamp(-1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(images)))


def _split_tensors(dataset: str, train: bool, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8, N x 1 x 32 x 32) and labels of a split, straight from the in-memory set."""
    _fd_network(dataset)
    data = make_dataset(dataset, root=root, image_size=CLASSIFIER_IMAGE_SIZE, train=train, flip=False)
    return data.images, data.labels


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    batches = zip(images.split(batch_size), labels.split(batch_size))
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / len(labels)


def train_classifier(dataset: str, images: torch.Tensor, labels: torch.Tensor,
                     test_images: torch.Tensor, test_labels: torch.Tensor) -> SmallClassifier:
    """Deterministic training (own generator, forked global RNG) with the set's recipe."""
    recipe = CLASSIFIER_RECIPES[dataset]
    if recipe.train_items is not None:
        images, labels = images[: recipe.train_items], labels[: recipe.train_items]
    x, x_test = uint8_to_model_range(images), uint8_to_model_range(test_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = SmallClassifier(int(labels.max()) + 1)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        order_rng = torch.Generator().manual_seed(recipe.seed)
        for _ in range(recipe.epochs):
            model.train()
            for batch in torch.randperm(len(x), generator=order_rng).split(recipe.batch_size):
                loss = F.cross_entropy(model(x[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    model.eval()
    model.meta = {"dataset": dataset, "version": CLASSIFIER_VERSION, "recipe": dataclasses.asdict(recipe),
                  "test_accuracy": _accuracy(model, x_test, test_labels)}
    return model


def make_fd_asset(dataset: str, root=None) -> dict[str, Any]:
    """The pinned file's payload: the classifier trained by its recipe and its training split's statistics."""
    images, labels = _split_tensors(dataset, True, root)
    model = train_classifier(dataset, images, labels, *_split_tensors(dataset, False, root))
    data_hash = hashlib.sha256(images.numpy().tobytes() + labels.numpy().astype(np.int64).tobytes()).hexdigest()
    reference = feature_stats(model.features, uint8_to_model_range(images), batch_size=500)
    meta = {**model.meta, "train_data_sha256": data_hash, "reference": f"{dataset}:train"}
    return {"state_dict": model.state_dict(), "config": {"num_classes": model.head.out_features},
            "meta": json.dumps(meta), "reference": {"mean": torch.from_numpy(reference.mean),
                                                    "cov": torch.from_numpy(reference.cov), "count": reference.count}}


FD_NETWORKS = {
    "fashion-mnist": PinnedNetwork("clf-fashion-mnist",
                                   "7296299ad83b34ef046444712a716cd85fad2c4396acc9380cca1788d29ea90d",
                                   SmallClassifier, functools.partial(make_fd_asset, "fashion-mnist")),
    "digits": PinnedNetwork("clf-digits", "5a6c3d86eb2c58affd3bc329ad21e9fe02b2c2d4faf4a41cf47ee7c34d6c2a2c",
                            SmallClassifier, functools.partial(make_fd_asset, "digits")),
}
# The judge of text alignment on shapes (vitdiff.shapes), pinned the same way.
ATTRIBUTE_JUDGE = PinnedNetwork("shapes-judge", "b9b688970f2a80548d20e822666c0b84b9473121b8dc333f1876c956f8b0f851",
                                "vitdiff.shapes:AttributeClassifier", "vitdiff.shapes:make_judge_asset")
PINNED_NETWORKS = (*FD_NETWORKS.values(), ATTRIBUTE_JUDGE)
_FD_SHORT_NAMES = {"fashion-mnist": "fmnist", "digits": "digits"}
# The metric names carry the pinned file's hash prefix: a number from another network never shares a column.
FD_METRIC_NAMES = {dataset: f"FD-{_FD_SHORT_NAMES[dataset]}-clf[{net.tag}]" for dataset, net in FD_NETWORKS.items()}


def _fd_network(dataset: str) -> PinnedNetwork:
    if dataset not in FD_NETWORKS:
        raise ValueError(f"no pinned classifier for {dataset!r}; the classifier FD exists for {sorted(FD_NETWORKS)}; "
                         "other sets are measured with Inception FID (metric 'fid')")
    return FD_NETWORKS[dataset]


def load_classifier(dataset: str = "fashion-mnist") -> SmallClassifier:
    """The pinned classifier for ``dataset`` (checksum verified)."""
    return _fd_network(dataset).load()


def classifier_reference_stats(dataset: str = "fashion-mnist") -> FeatureStats:
    """Classifier features of the training split, committed with the classifier: the data a generator learns
    (FID's convention), and the larger split (digits' test split has only 297 images, too few for a 64-d
    covariance). Committed rather than computed, so the reference is the same bytes on every machine and needs
    no data on disk."""
    saved = _fd_network(dataset).payload()["reference"]
    return FeatureStats.from_moments(saved["mean"].numpy(), saved["cov"].numpy(), saved["count"],
                                     meta={"reference": f"{dataset}:train", "classifier": FD_METRIC_NAMES[dataset]})


@functools.lru_cache(maxsize=4)
def classifier_reference_stats_at(dataset: str, image_size: int) -> FeatureStats:
    """The training split's classifier statistics with the images first brought to ``image_size`` as the data set
    does for training, then through the classifier's own resize: the reference for samples generated at that size,
    so FD compares like with like instead of measuring the lost resolution. Computed on the CPU from the pinned
    network (deterministic); cached for the process."""
    if image_size == CLASSIFIER_IMAGE_SIZE:
        return classifier_reference_stats(dataset)
    train = make_dataset(dataset, image_size=image_size, train=True, flip=False)
    return feature_stats(load_classifier(dataset).features, uint8_to_model_range(train.images), batch_size=500,
                         device="cpu", meta={"reference": f"{dataset}:train at {image_size}x{image_size}",
                                             "classifier": FD_METRIC_NAMES[dataset]})


def fd_classifier(images, *, dataset: str = "fashion-mnist", reference: FeatureStats | torch.Tensor | None = None,
                  batch_size: int = 500) -> float:
    """Fréchet distance of classifier features (metric name ``FD_METRIC_NAMES[dataset]``), images in [-1, 1].

    ``reference``: real images or their stats; default the dataset's training split ("<dataset>:train")."""
    return frechet_metric(images, dataset, metric="fd-clf", reference=reference, batch_size=batch_size).value


@torch.no_grad()
def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor, *, dataset: str = "fashion-mnist") -> float:
    """Fraction of class-conditional samples that the classifier assigns to their conditioning label."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return _accuracy(load_classifier(dataset), images.float(), torch.as_tensor(labels).long())


class PrecisionRecall(NamedTuple):
    precision: float  # fraction of samples inside the real features' k-NN manifold: fidelity
    recall: float     # fraction of real images inside the samples' k-NN manifold: coverage


def _knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour in the same set (itself excluded)."""
    if not 0 < k < len(features):
        raise ValueError(f"k-NN radii need 0 < k < the number of points, got k={k} for {len(features)} points")
    return torch.cdist(features, features).kthvalue(k + 1, dim=1).values  # +1: the zero distance to itself


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``points`` within the radius of at least one of ``centres``."""
    return (torch.cdist(points, centres) <= radii).any(dim=1).double().mean().item()


def manifold_precision_recall(fake_features, real_features, *, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of two feature sets (N x D): each set's manifold
    is the union of balls around its points reaching their k-th nearest neighbour; precision is the share of fake
    points inside the real manifold, recall the share of real points inside the fake one. Unlike a Fréchet
    distance it separates fidelity from coverage and assumes no Gaussian. Compare values at one n and one k."""
    fake, real = (torch.as_tensor(f).double().reshape(len(f), -1) for f in (fake_features, real_features))
    if fake.shape[1] != real.shape[1]:
        raise ValueError(f"feature sizes differ: {fake.shape[1]} vs {real.shape[1]}")
    return PrecisionRecall(_inside_manifold(fake, real, _knn_radii(real, k)),
                           _inside_manifold(real, fake, _knn_radii(fake, k)))


@torch.no_grad()
def classifier_features(images: torch.Tensor, *, dataset: str = "fashion-mnist", batch_size: int = 500):
    """(64-d features, class probabilities) of images in [-1, 1] under the pinned classifier, on the CPU."""
    model = load_classifier(dataset)
    features = torch.cat([model.features(batch.cpu()) for batch in images.split(batch_size)])
    return features, model.head(F.relu(features)).softmax(1)


def classifier_reference_images(dataset: str, image_size: int, n: int, *, seed: int = 0) -> torch.Tensor:
    """n training images in [-1, 1] at ``image_size``, drawn without replacement with a fixed seed: the real set of
    ``classifier_precision_recall``. Read item by item, as training reads them, because that is where the data
    set resizes (its ``images`` tensor keeps the stored size)."""
    train = make_dataset(dataset, image_size=image_size, train=True, flip=False)
    if n > len(train):
        raise ValueError(f"{n} reference images asked, the {dataset} training split has {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([train[int(i)][0] for i in order])


def classifier_precision_recall(images: torch.Tensor, *, dataset: str = "fashion-mnist", reference=None,
                                k: int = 3) -> PrecisionRecall:
    """Precision and recall (``manifold_precision_recall``, k=3 as in the paper) of samples in [-1, 1] on the
    pinned classifier's features. ``reference``: real images; default as many training images as samples, at the
    samples' resolution (``classifier_reference_images``, seed 0), so both manifolds are built from equal n."""
    if reference is None:
        reference = classifier_reference_images(dataset, images.shape[-1], len(images))
    fake, real = (classifier_features(x, dataset=dataset)[0] for x in (images, reference))
    return manifold_precision_recall(fake, real, k=k)


def classifier_confidence(images: torch.Tensor, *, dataset: str = "fashion-mnist") -> float:
    """Mean top-class probability the pinned classifier gives to samples in [-1, 1]: how recognisable they are as
    some class, with no labels needed (it ignores diversity: read it with recall)."""
    return classifier_features(images, dataset=dataset)[1].max(1).values.mean().item()


# --------------------------------------------------------------------------------------------------
# One entry point: a data set's Fréchet metric


class FrechetResult(NamedTuple):
    metric: str     # MetricResult.metric: "FD-fmnist-clf[3fa2c1]", "FID" (its label adds "@n")
    value: float
    reference: str  # what the samples were compared with: "fashion-mnist:train", a .npz path, ...


def default_frechet_metric(dataset: str) -> str:
    """"fd-clf" where a pinned classifier exists (the embedded sets), else "fid"."""
    return "fd-clf" if dataset in FD_NETWORKS else "fid"


def check_frechet_metric(dataset: str, *, metric: str | None = None, inception_weights=None) -> str:
    """Raise now, saying what to do, if ``frechet_metric`` could not run for ``dataset``; return the metric's name.

    Call it before training so a run never ends in an evaluation that cannot run."""
    metric = metric or default_frechet_metric(dataset)
    if metric == "fd-clf":
        _fd_network(dataset).payload()  # verifies the committed file
        return FD_METRIC_NAMES[dataset]
    if metric == "fid":
        try:
            import torch_fidelity  # noqa: F401
        except ImportError as error:
            raise ImportError("FID needs torch-fidelity (the pinned version is in requirements.txt): "
                              "pip install torch-fidelity") from error
        inception_weights_path(inception_weights)
        return "FID"
    raise ValueError(f"a Fréchet metric is 'fd-clf' or 'fid', got {metric!r}")


def frechet_metric(images: torch.Tensor, dataset: str, *, metric: str | None = None, reference=None, root=None,
                   inception_weights=None, device=None, batch_size: int = 100) -> FrechetResult:
    """The Fréchet metric of samples (N, C, H, W) in [-1, 1] of ``dataset``.

    ``metric``: "fd-clf" (the pinned classifier; the default for fashion-mnist and digits) or "fid" (Inception-v3
    from local weights: ``inception_weights``, ``$VITDIFF_INCEPTION_WEIGHTS`` or torch.hub's cache; the default
    otherwise). ``reference``: a ``FeatureStats``, a .npz of them, or real images; default the training split at
    the samples' resolution (for fd-clf at 32x32 the committed statistics; for FID read with ``root``). ``device`` runs
    Inception; the small classifier always runs on the CPU, so its number is the same on every machine."""
    name = check_frechet_metric(dataset, metric=metric, inception_weights=inception_weights)
    if isinstance(reference, (str, os.PathLike)):
        reference, described = FeatureStats.load(reference), str(reference)
    elif isinstance(reference, FeatureStats):
        described = reference.meta.get("reference", "given statistics")
    elif reference is not None:
        described = f"{len(reference)} given images" if torch.is_tensor(reference) else "given images"
    elif name == "FID":
        from torch.utils.data import DataLoader

        train_set = make_dataset(dataset, root=root, image_size=images.shape[-1], train=True, flip=False)
        reference, described = DataLoader(train_set, batch_size=250), f"{dataset}:train (all {len(train_set)})"
    else:
        reference = classifier_reference_stats_at(dataset, images.shape[-1])
        described = reference.meta["reference"]
    if name == "FID":
        value = compute_fid(images, reference, weights_path=inception_weights, batch_size=batch_size, device=device)
        return FrechetResult(name, value, described)
    # The classifier always runs on the CPU in float32: a GPU's TF32 convolutions would change the number.
    features = load_classifier(dataset).features
    if not isinstance(reference, FeatureStats):
        reference = feature_stats(features, reference, batch_size=batch_size, device="cpu")
    samples = feature_stats(features, images, batch_size=batch_size, device="cpu")
    return FrechetResult(name, samples.frechet_distance(reference), described)


# --------------------------------------------------------------------------------------------------
# Results with their protocol


def count_label(n: int) -> str:
    """50000 -> '50k', 1500 -> '1.5k', 500 -> '500'."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


@dataclass
class MetricResult:
    metric: str  # "FID", "FD-fmnist-clf", "FD-digits-clf", "clf-accuracy", "NLL-bpd", ...
    value: float
    num_samples: int
    dataset: str
    reference: str  # e.g. "fashion-mnist:test" or a reference-stats file
    checkpoint: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_convention: str | None = None  # "dit": uncond + w (cond - uncond); "uvit": (1 + s) cond - s uncond
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def label(self) -> str:
        return f"{self.metric}@{count_label(self.num_samples)}"


def save_result(path: str | os.PathLike, result: MetricResult) -> None:
    """Append one JSON line (all protocol fields plus the label) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({**dataclasses.asdict(result), "label": result.label}) + "\n")


def load_results(path: str | os.PathLike) -> list[MetricResult]:
    names = {f.name for f in dataclasses.fields(MetricResult)}
    rows = (json.loads(line) for line in Path(path).read_text().splitlines() if line.strip())
    return [MetricResult(**{k: v for k, v in row.items() if k in names}) for row in rows]


RUN_FIELDS = ("checkpoint", "dataset", "sampler", "steps", "guidance", "guidance_convention", "seed", "reference")


def results_table(rows: Iterable[MetricResult]) -> list[dict[str, Any]]:
    """One row per run (protocol fields) with a column per metric label, e.g. "FID@10k".

    Raises if one metric appears with different sample counts: FID@1k and FID@50k never share a table."""
    rows = list(rows)
    counts: dict[str, set[int]] = {}
    for row in rows:
        counts.setdefault(row.metric, set()).add(row.num_samples)
    mixed = {metric: sorted(n) for metric, n in counts.items() if len(n) > 1}
    if mixed:
        raise ValueError(f"refusing to tabulate one metric at different sample counts: {mixed}; "
                         "split the rows into one table per n")
    table: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = tuple(getattr(row, name) for name in RUN_FIELDS)
        entry = table.setdefault(key, dict(zip(RUN_FIELDS, key)))
        if row.label in entry:
            raise ValueError(f"two {row.label} values for the same run {dict(zip(RUN_FIELDS, key))}")
        entry[row.label] = row.value
    return list(table.values())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vitdiff.metrics", description="Maintain the pinned networks.")
    parser.add_argument("--make-assets", action="store_true", required=True,
                        help="re-train every pinned network with its recipe (fashion-mnist from its default root), "
                             "write vitdiff/assets/, and compare each file with its pinned sha256")
    parser.parse_args()
    from vitdiff.metrics import make_assets as run  # the imported module, the one vitdiff.shapes shares

    run()
