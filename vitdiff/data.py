"""Datasets, a seeded resumable data order, and the registry that names them.

Every dataset yields ``(image, target)``: ``image`` is a float32 tensor (C, H, W) in [-1, 1]; ``target`` is
an int class label, a caption string for captioned sets, or ``NO_LABEL`` (-1) for unlabelled sets.

Design:
- One registry, ``DATASETS``: name -> (builder, ``DatasetInfo``). ``make_dataset(name, ...)`` resolves the
  defaults (image size, flip) from the info; other modules add sets with ``register_dataset``.
- Files are read in their real published layouts (CIFAR-10 pickles, CelebA ``img_align_celeba`` +
  ``list_eval_partition.txt``, CUB-200-2011 + Reed et al.'s ``text_c10`` captions, LSUN lmdb, idx .gz).
  We parse those layouts ourselves where torchvision's classes would demand md5-exact full downloads, so a
  small copy in the same format (what the tests write) loads the same way as the full set.
- Missing data raises ``DatasetNotFoundError`` naming the expected paths and how to obtain the files.
  Nothing is downloaded unless ``download=True`` is passed (fashion-mnist only).
- Random choices per item (horizontal flip, which of several captions) are a hash of
  (seed, epoch, index), never the global RNG: the same run sees the same augmented batches with any
  number of workers, and a resumed run continues bit-exactly. ``ResumableSampler.set_epoch`` forwards the
  epoch to the dataset.
- Flip defaults (training only): on for CIFAR-10, CelebA, LSUN and CUB (the anchors' recipes flip them);
  off for digits and fashion-mnist (digits are not mirror-symmetric; fashion-mnist stays comparable with
  its classifier-FD reference), and off for arbitrary folders (content unknown). ``flip=`` overrides.
"""
from __future__ import annotations

import gzip
import importlib
import io
import json
import math
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

NO_LABEL = -1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """The data set's files are not where they were looked for; the message says where to put them."""


@dataclass(frozen=True)
class DatasetInfo:
    channels: int
    image_size: int  # default side length; images are square
    num_classes: int | None  # None: unlabelled (targets are NO_LABEL) or captions only
    has_captions: bool = False
    flip_for_training: bool = False  # the default of make_dataset(flip=None, train=True)
    source: str = ""  # where the files come from, for listings and error context


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., Dataset] | str  # a function, or "module:function" for a set defined in a module
    info: DatasetInfo                      # that itself imports this one (vitdiff.shapes), imported on first use

    def build(self, **kw) -> Dataset:
        if isinstance(self.builder, str):
            module, _, function = self.builder.partition(":")
            return getattr(importlib.import_module(module), function)(**kw)
        return self.builder(**kw)


DATASETS: dict[str, _Entry] = {}


def register_dataset(name: str, builder: Callable[..., Dataset] | str, info: DatasetInfo) -> None:
    """Add a data set. ``builder(root=, image_size=, train=, flip=, **kw)`` returns a Dataset of (image, target)."""
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = _Entry(builder, info)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)}")
    return DATASETS[name].info


def make_dataset(
    name: str,
    *,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    train: bool = True,
    flip: bool | None = None,
    max_items: int | None = None,
    **kw: Any,
) -> Dataset:
    """Build a registered data set. ``flip=None`` takes the set's training default (never flips for test).

    ``max_items`` keeps the first n items (in the set's fixed order) for quick runs. Builders take further
    keywords: ``seed`` (of the per-item flip / caption choice, default 0) for every built-in set, and
    per-set options (``download``, ``split``, ``category``, ``crop``, ``target``, ``random_caption``, ``channels``).
    """
    info = dataset_info(name)
    flip = (info.flip_for_training and train) if flip is None else flip
    dataset = DATASETS[name].build(
        root=root, image_size=image_size or info.image_size, train=train, flip=flip, **kw
    )
    if max_items is not None:
        subset = getattr(dataset, "subset", None)
        dataset = subset(max_items) if subset else Subset(dataset, range(min(max_items, len(dataset))))
    return dataset


def data_root(root: str | os.PathLike | None, default_dir: str) -> Path:
    """The given root, else ``$VITDIFF_DATA/<default_dir>`` (``$VITDIFF_DATA`` defaults to ./data)."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("VITDIFF_DATA", "data")).expanduser() / default_dir


# --------------------------------------------------------------------------------------------------
# Per-item randomness and image conversion


def item_uniform(seed: int, epoch: int, index: int, salt: int) -> float:
    """A uniform [0, 1) number fixed by (seed, epoch, index, salt): augmentation without shared RNG state."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, salt]).generate_state(1)[0]
    return float(state) / 2.0**32


def uint8_to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)


def pil_to_uint8(image: Image.Image, channels: int) -> torch.Tensor:
    """PIL image -> uint8 tensor (C, H, W) with the requested channel count."""
    image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to ``size`` then centre-crop a square (the LSUN / ImageNet convention)."""
    width, height = image.size
    scale = size / min(width, height)
    if scale != 1.0:
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageDataset(Dataset):
    """Base: subclasses give ``num_items`` and ``load(index) -> (image (C,H,W) float [-1,1], target)``.

    This class adds the seeded flip, the epoch used by per-item randomness, and ``subset``.
    """

    def __init__(self, *, flip: bool, seed: int = 0, max_items: int | None = None):
        self.flip = flip
        self.seed = seed
        self.epoch = 0
        self.max_items = max_items

    def num_items(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def subset(self, n: int) -> "ImageDataset":
        """A shallow copy limited to the first ``n`` items (shares loaded arrays)."""
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.max_items = min(n, len(self))
        return clone

    def uniform(self, index: int, salt: int) -> float:
        return item_uniform(self.seed, self.epoch, index, salt)

    def __len__(self) -> int:
        total = self.num_items()
        return total if self.max_items is None else min(total, self.max_items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        image, target = self.load(index)
        if self.flip and self.uniform(index, salt=0) < 0.5:
            image = image.flip(-1)
        return image, target


class TensorImageDataset(ImageDataset):
    """In-memory uint8 images (N, C, H, W) with integer labels, resized on access when needed."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, image_size: int, flip: bool, seed: int = 0):
        super().__init__(flip=flip, seed=seed)
        self.images, self.labels, self.image_size = images, labels, image_size

    def num_items(self) -> int:
        return self.images.shape[0]

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        image = uint8_to_model_range(self.images[index])
        if image.shape[-1] != self.image_size:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", antialias=True)[0]
        return image, int(self.labels[index])


# --------------------------------------------------------------------------------------------------
# digits: scikit-learn's embedded UCI handwritten digits (no download ever)

DIGITS_TEST_SIZE = 297  # the last 297 of sklearn's fixed order are the test split (1500 train)


@lru_cache(maxsize=1)
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.from_numpy(digits.images).float()[:, None] / 16.0, torch.from_numpy(digits.target).long()


def build_digits(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0) -> ImageDataset:
    images, labels = _load_digits()  # 8x8 values 0..16 scaled to [0, 1]
    split = slice(None, -DIGITS_TEST_SIZE) if train else slice(-DIGITS_TEST_SIZE, None)
    images, labels = images[split], labels[split]
    # Resize once here (all 1797 images are tiny) and store uint8 like every other set.
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=image_size, mode="bilinear", antialias=True, align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorImageDataset(images, labels, image_size=image_size, flip=flip, seed=seed)


# --------------------------------------------------------------------------------------------------
# fashion-mnist: idx .gz files from a root, the Debian package, or torchvision's download

FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx_gz(path: Path) -> np.ndarray:
    """Parse an idx file (gzipped): magic (0, 0, dtype=0x08 uint8, ndim), big-endian dims, then data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


@lru_cache(maxsize=4)
def _load_fashion_mnist(directory: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    image_file, label_file = FASHION_MNIST_FILES[train]
    images = torch.from_numpy(read_idx_gz(Path(directory) / image_file).copy())
    labels = torch.from_numpy(read_idx_gz(Path(directory) / label_file).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images[:, None], labels


def _find_fashion_mnist(root, train: bool, download: bool) -> Path:
    wanted = FASHION_MNIST_FILES[train]
    candidates = []
    if root is not None:
        root = Path(root).expanduser()
        candidates += [root, root / "FashionMNIST" / "raw"]  # a folder of the files, or torchvision's layout
    candidates += [FASHION_MNIST_DEBIAN_DIR, data_root(None, "fashion-mnist"),
                   data_root(None, "fashion-mnist") / "FashionMNIST" / "raw"]
    for directory in candidates:
        if all((directory / name).is_file() for name in wanted):
            return directory
    if download:
        from torchvision.datasets import FashionMNIST

        target = Path(root).expanduser() if root is not None else data_root(None, "fashion-mnist")
        FashionMNIST(str(target), train=train, download=True)
        return target / "FashionMNIST" / "raw"
    raise DatasetNotFoundError(
        f"fashion-mnist: files {list(wanted)} not found in any of {[str(c) for c in candidates]}.\n"
        "Get them with `apt-get install dataset-fashion-mnist` (files land in /usr/share/datasets/fashion-mnist), "
        "or put the four idx .gz files from https://github.com/zalandoresearch/fashion-mnist (data/fashion/) in "
        "a folder and pass root=that folder, or pass download=True to fetch them through torchvision."
    )


def build_fashion_mnist(
    *, root=None, image_size: int, train: bool, flip: bool, seed: int = 0, download: bool = False
) -> ImageDataset:
    """28x28 images padded by 2 px of background (-1) to 32x32, then resized if another size is asked."""
    directory = _find_fashion_mnist(root, train, download)
    images, labels = _load_fashion_mnist(str(directory), train)
    if image_size != 28:
        images = F.pad(images, (2, 2, 2, 2), value=0)  # uint8 0 maps to -1 in model range
    return TensorImageDataset(images, labels, image_size=image_size, flip=flip, seed=seed)


# --------------------------------------------------------------------------------------------------
# cifar10: the python pickles (cifar-10-batches-py)

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def build_cifar10(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0) -> ImageDataset:
    base = data_root(root, "cifar10")
    folder = base if base.name == "cifar-10-batches-py" else base / "cifar-10-batches-py"
    names = CIFAR10_TRAIN_BATCHES if train else ("test_batch",)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"cifar10: missing {missing} in {folder}.\nExpected layout: <root>/cifar-10-batches-py/"
            "{data_batch_1..5,test_batch} (the python version). Get it with "
            "`wget https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz && "
            "tar xzf cifar-10-python.tar.gz -C <root>` "
            "or torchvision.datasets.CIFAR10(<root>, download=True)."
        )
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            # Python 2 pickles: latin1 turns their str keys into str and keeps numpy's raw bytes intact.
            batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in pickle.load(f, encoding="latin1").items()}
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"])
    return TensorImageDataset(
        torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long),
        image_size=image_size, flip=flip, seed=seed,
    )


# --------------------------------------------------------------------------------------------------
# Sets read from image files


class FileImageDataset(ImageDataset):
    """Image files on disk with a per-file target; ``prepare`` turns a PIL image into the final square."""

    def __init__(self, files: list[Path], targets: list[Any], prepare: Callable[[Image.Image, int], Image.Image],
                 *, channels: int, flip: bool, seed: int = 0):
        super().__init__(flip=flip, seed=seed)
        self.files, self.targets, self.prepare, self.channels = files, targets, prepare, channels

    def num_items(self) -> int:
        return len(self.files)

    def target(self, index: int) -> Any:
        return self.targets[index]

    def load(self, index: int) -> tuple[torch.Tensor, Any]:
        with Image.open(self.files[index]) as image:
            image = self.prepare(image.convert("RGB"), index)
            return uint8_to_model_range(pil_to_uint8(image, self.channels)), self.target(index)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


# celeba64 -----------------------------------------------------------------------------------------

CELEBA_CROP_CENTER = (89, 121)  # (x, y) of U-ViT's 128x128 crop box on the 178x218 aligned images
CELEBA_CROP_SIZE = 128
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


def celeba_crop(image: Image.Image, size: int) -> Image.Image:
    cx, cy = CELEBA_CROP_CENTER
    half = CELEBA_CROP_SIZE // 2
    image = image.crop((cx - half, cy - half, cx + half, cy + half))
    return image.resize((size, size), Image.BILINEAR) if size != CELEBA_CROP_SIZE else image


def build_celeba(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0,
                 split: str | None = None) -> ImageDataset:
    """CelebA aligned images, U-ViT's crop. Layout: torchvision's <root>/celeba/{img_align_celeba/,
    list_eval_partition.txt}, or <root>/img_align_celeba/, or a flat folder of jpgs (all used; no split)."""
    base = data_root(root, "celeba")
    split = split or ("train" if train else "test")
    if split not in (*CELEBA_SPLITS, "all"):
        raise ValueError(f"celeba split must be one of {[*CELEBA_SPLITS, 'all']}, got {split!r}")
    folder = next((f for f in (base / "celeba", base) if (f / "img_align_celeba").is_dir()), None)
    if folder is not None:
        image_dir, partition = folder / "img_align_celeba", folder / "list_eval_partition.txt"
    else:  # root is the image folder itself; a partition file may sit beside it
        image_dir, partition = base, base.parent / "list_eval_partition.txt"
    files = _list_images(image_dir) if image_dir.is_dir() else []
    if not files:
        raise DatasetNotFoundError(
            f"celeba64: no images under {base}.\nExpected torchvision's layout <root>/celeba/img_align_celeba/"
            "000001.jpg... plus <root>/celeba/list_eval_partition.txt (or a flat folder of the aligned jpgs). "
            "Get img_align_celeba.zip and list_eval_partition.txt from "
            "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive) or "
            "torchvision.datasets.CelebA(<root>, download=True)."
        )
    if split != "all" and partition is not None and partition.is_file():
        wanted = {line.split()[0] for line in partition.read_text().splitlines()
                  if line.strip() and int(line.split()[1]) == CELEBA_SPLITS[split]}
        files = [f for f in files if f.name in wanted]
    return FileImageDataset(files, [NO_LABEL] * len(files), lambda image, _: celeba_crop(image, image_size),
                            channels=3, flip=flip, seed=seed)


# imagefolder --------------------------------------------------------------------------------------


def build_imagefolder(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0,
                      channels: int = 3) -> ImageDataset:
    """torchvision ImageFolder layout (<root>/<class>/<image>); labels are the sorted class-folder indices.

    ``train`` is ignored: point ``root`` at the split you want."""
    from torchvision.datasets import ImageFolder

    folder = data_root(root, "imagefolder")
    if not folder.is_dir():
        raise DatasetNotFoundError(f"imagefolder: {folder} does not exist; expected <root>/<class_name>/<image>.png")
    samples = ImageFolder(str(folder)).samples  # raises its own clear error when no class folder has images
    return FileImageDataset([Path(path) for path, _ in samples], [label for _, label in samples],
                            lambda image, _: resize_square(image, image_size), channels=channels, flip=flip, seed=seed)


# captions: a folder of images + captions.jsonl ----------------------------------------------------


class CaptionedFiles(FileImageDataset):
    """Each file has one or more captions; one is picked per (seed, epoch, item), or always the first."""

    def __init__(self, *args, random_caption: bool, **kw):
        super().__init__(*args, **kw)
        self.random_caption = random_caption

    def target(self, index: int) -> str:
        captions = self.targets[index]
        if not self.random_caption or len(captions) == 1:
            return captions[0]
        return captions[int(self.uniform(index, salt=1) * len(captions))]


def build_captions(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0,
                   random_caption: bool = True) -> ImageDataset:
    """<root>/captions.jsonl lines {"file": "a.png", "caption": "..." or [...], "split": "train"|"test" (optional)};
    files are relative to <root>. Lines without "split" are used for both splits."""
    folder = data_root(root, "captions")
    index_file = folder / "captions.jsonl"
    if not index_file.is_file():
        raise DatasetNotFoundError(
            f"captions: {index_file} not found. Put images in {folder} and one JSON line per image in "
            'captions.jsonl: {"file": "0001.png", "caption": "a red bird"} (caption may be a list).'
        )
    files, captions = [], []
    for number, line in enumerate(index_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "file" not in record or "caption" not in record:
            raise ValueError(f"{index_file}:{number}: each line needs 'file' and 'caption' keys")
        if record.get("split", "train" if train else "test") != ("train" if train else "test"):
            continue
        path = folder / record["file"]
        if not path.is_file():
            raise DatasetNotFoundError(f"{index_file}:{number}: image {path} does not exist")
        caption = record["caption"]
        files.append(path)
        captions.append([caption] if isinstance(caption, str) else list(caption))
    return CaptionedFiles(files, captions, lambda image, _: resize_square(image, image_size), channels=3,
                          flip=flip, seed=seed, random_caption=random_caption)


# cub200 -------------------------------------------------------------------------------------------


def _read_id_table(path: Path) -> dict[int, list[str]]:
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {int(row[0]): row[1:] for row in rows}


def bbox_square(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """StackGAN/AttnGAN's crop: a square of side 1.5 x max(w, h) centred on the bird, clipped to the image."""
    x, y, w, h = box
    radius = int(max(w, h) * 0.75)
    cx, cy = int(x + w / 2), int(y + h / 2)
    left, top = max(0, cx - radius), max(0, cy - radius)
    right, bottom = min(image.width, cx + radius), min(image.height, cy + radius)
    return image.crop((left, top, right, bottom))


def build_cub200(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0,
                 crop: str = "bbox", target: str | None = None, random_caption: bool = True) -> ImageDataset:
    """CUB-200-2011 birds. ``crop``: "bbox" (1.5x box around the bird, the text-to-image convention; needs
    bounding_boxes.txt) or "center". ``target``: "caption" (default when text_c10/ exists) or "label" (0..199)."""
    base = data_root(root, "cub200")
    cub = base / "CUB_200_2011" if (base / "CUB_200_2011").is_dir() else base
    needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt"]
    missing = [name for name in [*needed, "images"] if not (cub / name).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"cub200: missing {missing} in {cub}.\nExpected <root>/CUB_200_2011/{{images/<class>/<image>.jpg, "
            "images.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt}} from "
            "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz), and for captions Reed et al.'s "
            "<root>/text_c10/<class>/<image>.txt (10 lines each; cvpr2016_cub from "
            "https://github.com/reedscot/cvpr2016)."
        )
    if crop not in ("bbox", "center"):
        raise ValueError(f"cub200 crop must be 'bbox' or 'center', got {crop!r}")
    paths = _read_id_table(cub / "images.txt")
    labels = _read_id_table(cub / "image_class_labels.txt")
    is_train = _read_id_table(cub / "train_test_split.txt")
    ids = sorted(i for i in paths if (is_train[i][0] == "1") == train)
    boxes = None
    if crop == "bbox":
        if not (cub / "bounding_boxes.txt").is_file():
            raise DatasetNotFoundError(
                f"cub200: crop='bbox' needs {cub / 'bounding_boxes.txt'} (or pass crop='center')")
        table = _read_id_table(cub / "bounding_boxes.txt")
        boxes = [tuple(float(v) for v in table[i]) for i in ids]
    text_dir = next((d for d in (base / "text_c10", cub / "text_c10", base / "text") if d.is_dir()), None)
    target = target or ("caption" if text_dir is not None else "label")
    files = [cub / "images" / paths[i][0] for i in ids]

    def prepare(image: Image.Image, index: int) -> Image.Image:
        image = bbox_square(image, boxes[index]) if boxes is not None else image
        return resize_square(image, image_size)

    if target == "label":
        return FileImageDataset(files, [int(labels[i][0]) - 1 for i in ids], prepare, channels=3, flip=flip, seed=seed)
    if target != "caption":
        raise ValueError(f"cub200 target must be 'caption' or 'label', got {target!r}")
    if text_dir is None:
        raise DatasetNotFoundError(f"cub200: target='caption' but no text_c10/ folder in {base} or {cub}")
    captions = []
    for i in ids:
        caption_file = (text_dir / paths[i][0]).with_suffix(".txt")
        if not caption_file.is_file():
            raise DatasetNotFoundError(f"cub200: caption file {caption_file} is missing")
        captions.append([c.strip() for c in caption_file.read_text().splitlines() if c.strip()])
    return CaptionedFiles(files, captions, prepare, channels=3, flip=flip, seed=seed, random_caption=random_caption)


# lsun ---------------------------------------------------------------------------------------------


_LMDB_ENVIRONMENTS: dict[str, Any] = {}


def lmdb_environment(path: Path):
    """One read-only handle per path and process: lmdb refuses to open an environment twice in a process
    (forked DataLoader workers inherit the handle and read through it, as torchvision's LSUN does)."""
    import lmdb

    key = str(path)
    if key not in _LMDB_ENVIRONMENTS:
        _LMDB_ENVIRONMENTS[key] = lmdb.open(str(path), readonly=True, lock=False, readahead=False,
                                            subdir=path.is_dir())
    return _LMDB_ENVIRONMENTS[key]


class LmdbImages(ImageDataset):
    """LSUN's lmdb export: keys are image ids, values encoded images (webp/jpeg). Keys are listed once."""

    def __init__(self, path: Path, image_size: int, *, flip: bool, seed: int = 0):
        super().__init__(flip=flip, seed=seed)
        self.path, self.image_size = path, image_size
        with lmdb_environment(path).begin() as txn:
            self.keys = list(txn.cursor().iternext(keys=True, values=False))

    def num_items(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        with lmdb_environment(self.path).begin() as txn:
            encoded = txn.get(self.keys[index])
        with Image.open(io.BytesIO(encoded)) as image:
            image = resize_square(image.convert("RGB"), self.image_size)
            return uint8_to_model_range(pil_to_uint8(image, 3)), NO_LABEL


def build_lsun(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0,
               category: str = "church_outdoor") -> ImageDataset:
    """LSUN scenes. Looks for <root>/<category>_<train|val>_lmdb (needs the `lmdb` package), then an image
    folder <root>/<category>_<train|val>/ (or <root>/<category>/). Short side resized, centre-cropped."""
    base = data_root(root, "lsun")
    split = "train" if train else "val"
    lmdb_dir = base / f"{category}_{split}_lmdb"
    if lmdb_dir.exists():
        try:
            import lmdb  # noqa: F401
        except ImportError as error:
            raise ImportError(f"lsun: reading {lmdb_dir} needs `pip install lmdb` (or export the images "
                              f"to a folder {base / f'{category}_{split}'})") from error
        return LmdbImages(lmdb_dir, image_size, flip=flip, seed=seed)
    for folder in (base / f"{category}_{split}", base / category):
        files = _list_images(folder) if folder.is_dir() else []
        if files:
            return FileImageDataset(files, [NO_LABEL] * len(files), lambda image, _: resize_square(image, image_size),
                                    channels=3, flip=flip, seed=seed)
    raise DatasetNotFoundError(
        f"lsun: found neither {lmdb_dir} nor an image folder {base / f'{category}_{split}'}.\nGet the lmdb "
        f"with `python download.py -c {category}` from https://github.com/fyu/lsun (unzip into {base}), "
        "or put exported images in the folder."
    )


# --------------------------------------------------------------------------------------------------

register_dataset("digits", build_digits, DatasetInfo(
    1, 32, 10, source="sklearn.datasets.load_digits (embedded; 1500 train / 297 test)"))
register_dataset("fashion-mnist", build_fashion_mnist, DatasetInfo(
    1, 32, 10, source=f"idx .gz files: root, {FASHION_MNIST_DEBIAN_DIR}, or download=True"))
register_dataset("cifar10", build_cifar10, DatasetInfo(
    3, 32, 10, flip_for_training=True, source="cifar-10-batches-py pickles"))
register_dataset("celeba64", build_celeba, DatasetInfo(
    3, 64, None, flip_for_training=True, source="img_align_celeba + list_eval_partition.txt"))
register_dataset("lsun", build_lsun, DatasetInfo(
    3, 64, None, flip_for_training=True, source="<category>_<split>_lmdb or an image folder"))
register_dataset("cub200", build_cub200, DatasetInfo(
    3, 64, 200, has_captions=True, flip_for_training=True, source="CUB_200_2011 + text_c10 captions"))
register_dataset("imagefolder", build_imagefolder, DatasetInfo(
    3, 64, None, source="torchvision ImageFolder layout; num_classes = number of class folders"))
register_dataset("captions", build_captions, DatasetInfo(
    3, 64, None, has_captions=True, source="image folder + captions.jsonl"))
register_dataset("shapes", "vitdiff.shapes:build_shapes", DatasetInfo(
    3, 64, None, has_captions=True,
    source="vitdiff.shapes (drawn on the fly; train / val / test split with held-out colour-shape pairs)"))


# --------------------------------------------------------------------------------------------------
# Seeded, resumable order


class ResumableSampler(Sampler[int]):
    """A seeded epoch order, split across ranks, that can restart mid-epoch.

    Epoch ``e`` uses the permutation from ``torch.Generator().manual_seed(seed + e)`` (as DistributedSampler
    does), padded by wrapping to a multiple of ``world_size``; rank r takes every world_size-th index from r.
    ``position`` counts this rank's indices already consumed; iteration starts there. The consumer
    (``DataStream``) advances the position, because a DataLoader with workers prefetches ahead of use.
    """

    def __init__(self, num_items: int, seed: int = 0, rank: int = 0, world_size: int = 1, *,
                 shuffle: bool = True, dataset: Dataset | None = None):
        if num_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items, self.seed, self.rank, self.world_size, self.shuffle = num_items, seed, rank, world_size, shuffle
        self.dataset = dataset  # told the epoch, for per-item augmentation
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return math.ceil(self.num_items / self.world_size)

    def epoch_order(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_items)
        total = len(self) * self.world_size
        order = torch.cat([order, order[: total - self.num_items]]) if total > self.num_items else order
        return order[self.rank::self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.position:])

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch, self.position = epoch, position
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_items": self.num_items, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_items", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume data order: saved {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}; use the same dataset, seed and number of processes")
        self.set_epoch(state["epoch"], state["position"])


def make_loader(dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = True,
                num_workers: int = 0, distributed: bool = False, rank: int | None = None,
                world_size: int | None = None) -> DataLoader:
    """A DataLoader whose ``sampler`` is a ResumableSampler; ``distributed`` takes rank/world size from
    torch.distributed. The loader's generator (worker seeds) is seeded too; augmentation does not use it."""
    if distributed:
        import torch.distributed as dist

        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    sampler = ResumableSampler(len(dataset), seed=seed, rank=rank or 0, world_size=world_size or 1,
                               shuffle=shuffle, dataset=dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


class DataStream:
    """Endless batches from a ``make_loader`` loader, epoch after epoch, with a resumable position.

    ``state_dict()`` after n batches, loaded into a fresh stream over the same data and seed, yields
    exactly the batches n, n+1, ... of the original.
    """

    def __init__(self, loader: DataLoader):
        if not isinstance(loader.sampler, ResumableSampler):
            raise TypeError("DataStream needs a loader from make_loader (its sampler must be a ResumableSampler)")
        self.loader, self.sampler = loader, loader.sampler
        self._iterator: Iterator | None = None

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self):
        while True:
            if self._iterator is None:
                self.sampler.set_epoch(self.sampler.epoch, self.sampler.position)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                if self.sampler.position == 0:
                    raise RuntimeError("the loader yields no batch: dataset smaller than batch_size with drop_last")
                self.sampler.set_epoch(self.sampler.epoch + 1)
                continue
            self.sampler.position += len(batch[0])
            return batch

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self._iterator = None

