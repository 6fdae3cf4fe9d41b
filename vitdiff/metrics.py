"""Sample-quality metrics, each number saved with the protocol that produced it.

- ``frechet_distance``: the Fréchet distance between two Gaussians, in float64, through the symmetric form
  tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), whose eigenvalues are real and >= 0 (no complex sqrtm).
- ``FeatureStats``: running mean / covariance (float64, Chan's pairwise merge), saved as .npz.
- FID: Inception-v3 pool features from torch-fidelity's extractor (the TF-FID-compatible port), loaded from a
  local weights file only: ``weights_path``, ``$VITDIFF_INCEPTION_WEIGHTS``, or torch.hub's cache. Images
  are quantised to uint8 first (as if saved to PNG) and the extractor resizes them to 299 itself.
  Without weights it raises ``InceptionWeightsNotFound`` saying where to put the file; it never downloads.
- FD-<set>-clf: the same Fréchet distance on the 64-d penultimate features of a small CNN trained here on
  fashion-mnist or digits (32x32, 1 channel). A CPU/offline proxy, never comparable with FID: it has its own
  metric names. The trained classifier is cached in ``$VITDIFF_CACHE`` (default ~/.cache/vitdiff) under a name
  holding the recipe version and a hash of the training data + recipe, so a changed classifier can never be
  mixed with statistics of an old one. ``classifier_accuracy`` scores class-conditional samples with it.
- ``MetricResult`` / ``save_result`` / ``results_table``: every value carries metric, n ("FID@10k"), sampler,
  steps, guidance (+ convention), seed, reference set, checkpoint and dataset; a table refuses mixed n.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

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
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path) as data:
            mean, sigma, count = data["mu"], data["sigma"], int(data["count"])
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
        stats = cls(mean.shape[0], meta)
        stats.count, stats._mean, stats._scatter = count, mean.astype(np.float64), sigma * (count - 1)
        return stats


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
# The offline classifier and FD-<set>-clf

CLASSIFIER_VERSION = 1
CLASSIFIER_IMAGE_SIZE = 32
FD_METRIC_NAMES = {"fashion-mnist": "FD-fmnist-clf", "digits": "FD-digits-clf"}


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


def cache_dir() -> Path:
    return Path(os.environ.get("VITDIFF_CACHE", "~/.cache/vitdiff")).expanduser()


def _split_tensors(dataset: str, train: bool, root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8, N x 1 x 32 x 32) and labels of a split, straight from the in-memory set."""
    if dataset not in CLASSIFIER_RECIPES:
        raise ValueError(f"no classifier for {dataset!r}; choose one of {sorted(CLASSIFIER_RECIPES)}")
    data = make_dataset(dataset, root=root, image_size=CLASSIFIER_IMAGE_SIZE, train=train, flip=False)
    return data.images, data.labels


def _classifier_file(dataset: str, images: torch.Tensor, labels: torch.Tensor) -> Path:
    recipe = CLASSIFIER_RECIPES[dataset]
    digest = hashlib.sha256()
    digest.update(images.numpy().tobytes())
    digest.update(labels.numpy().astype(np.int64).tobytes())
    digest.update(repr(recipe).encode())
    return cache_dir() / f"clf-{dataset}-v{CLASSIFIER_VERSION}-{digest.hexdigest()[:12]}.pt"


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
    start = time.perf_counter()
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
                  "train_seconds": round(time.perf_counter() - start, 2),
                  "test_accuracy": _accuracy(model, x_test, test_labels)}
    return model


def load_classifier(dataset: str = "fashion-mnist", *, root=None, retrain: bool = False) -> SmallClassifier:
    """The cached classifier for ``dataset``, training and caching it on first use."""
    images, labels = _split_tensors(dataset, True, root)
    path = _classifier_file(dataset, images, labels)
    if path.is_file() and not retrain:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = SmallClassifier(saved["num_classes"])
        model.load_state_dict(saved["state_dict"])
        model.meta = json.loads(saved["meta"])
    else:
        model = train_classifier(dataset, images, labels, *_split_tensors(dataset, False, root))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": model.state_dict(), "num_classes": model.head.out_features,
                    "meta": json.dumps(model.meta)}, temporary)
        temporary.replace(path)  # atomic: concurrent runs never read a half-written file
    model.meta["file"] = str(path)
    return model.eval().requires_grad_(False)


def classifier_reference_stats(dataset: str = "fashion-mnist", *, split: str = "train", root=None) -> FeatureStats:
    """Classifier features of a real split, cached beside the classifier. The default is the training split,
    the data a generator learns (FID's convention); it is also the larger one (digits' test split has only
    297 images, too few for a 64-d covariance)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    model = load_classifier(dataset, root=root)
    path = Path(model.meta["file"]).with_suffix(f".ref-{split}.npz")
    if path.is_file():
        return FeatureStats.load(path)
    images, _ = _split_tensors(dataset, split == "train", root)
    stats = feature_stats(model.features, uint8_to_model_range(images), batch_size=500,
                          meta={"reference": f"{dataset}:{split}", "classifier": Path(model.meta["file"]).name})
    stats.save(path)
    return stats


def fd_classifier(images, *, dataset: str = "fashion-mnist", reference: FeatureStats | torch.Tensor | None = None,
                  batch_size: int = 500, root=None) -> float:
    """Fréchet distance of classifier features (metric name ``FD_METRIC_NAMES[dataset]``), images in [-1, 1].

    ``reference``: real images or their stats; default the dataset's training split ("<dataset>:train")."""
    model = load_classifier(dataset, root=root)
    if reference is None:
        reference = classifier_reference_stats(dataset, root=root)
    elif not isinstance(reference, FeatureStats):
        reference = feature_stats(model.features, reference, batch_size=batch_size)
    return feature_stats(model.features, images, batch_size=batch_size).frechet_distance(reference)


def classifier_accuracy(images: torch.Tensor, labels: torch.Tensor, *, dataset: str = "fashion-mnist",
                        root=None) -> float:
    """Fraction of class-conditional samples that the classifier assigns to their conditioning label."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return _accuracy(load_classifier(dataset, root=root), images.float(), torch.as_tensor(labels).long())


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
