"""Data sets read from tiny copies in their real on-disk formats; seeded order, resume and flips."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitdiff import data
from vitdiff.data import (
    DATASETS, NO_LABEL, DataStream, DatasetInfo, DatasetNotFoundError, ResumableSampler, dataset_info,
    make_dataset, make_loader, register_dataset,
)


def save_image(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_planned_set():
    for name in ("digits", "fashion-mnist", "cifar10", "celeba64", "lsun", "cub200", "imagefolder", "captions"):
        assert name in DATASETS
    info = dataset_info("cifar10")
    assert (info.channels, info.image_size, info.num_classes, info.has_captions) == (3, 32, 10, False)
    assert dataset_info("cub200").has_captions
    with pytest.raises(KeyError, match="registered"):
        dataset_info("imagenet-typo")


def test_register_dataset_hook_and_duplicate_name(monkeypatch):
    monkeypatch.setattr(data, "DATASETS", dict(DATASETS))
    seen = {}

    def builder(*, root, image_size, train, flip, **kw):
        seen.update(image_size=image_size, train=train, flip=flip, **kw)
        return torch.utils.data.TensorDataset(torch.zeros(3, 1, image_size, image_size), torch.arange(3))

    register_dataset("toy", builder, DatasetInfo(1, 8, 3, flip_for_training=True))
    dataset = make_dataset("toy", extra=5)
    assert seen == {"image_size": 8, "train": True, "flip": True, "extra": 5}
    assert len(dataset) == 3 and dataset[0][0].shape == (1, 8, 8)
    make_dataset("toy", train=False)
    assert seen["flip"] is False  # never flip evaluation data by default
    assert len(make_dataset("toy", max_items=2)) == 2  # plain Datasets are cut with torch's Subset
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy", builder, DatasetInfo(1, 8, 3))


# --------------------------------------------------------------------------------------------------
# digits (embedded)


def test_digits_splits_range_and_size():
    train, test = make_dataset("digits"), make_dataset("digits", train=False)
    assert (len(train), len(test)) == (1500, 297)
    image, label = train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0.5 and image.min() == -1
    assert isinstance(label, int) and 0 <= label < 10
    from sklearn.datasets import load_digits

    assert test[0][1] == int(load_digits().target[1500])  # the test split is the last 297, in order
    small = make_dataset("digits", image_size=8)
    expected = torch.from_numpy(load_digits().images[0]).float() / 16 * 2 - 1
    assert torch.allclose(small[0][0][0], expected, atol=1 / 127.5)  # within one uint8 step
    assert not train.flip


def test_max_items_and_subset():
    dataset = make_dataset("digits", max_items=10)
    assert len(dataset) == 10
    assert torch.equal(dataset[9][0], make_dataset("digits")[9][0])
    with pytest.raises(IndexError):
        dataset[10]
    assert len(dataset.subset(4)) == 4


# --------------------------------------------------------------------------------------------------
# fashion-mnist


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder: Path, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx_gz(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx_gz(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_root_idx_files(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    arrays = write_fashion_mnist(folder)
    train = make_dataset("fashion-mnist", root=tmp_path)
    test = make_dataset("fashion-mnist", root=tmp_path, train=False)
    assert (len(train), len(test)) == (6, 4)
    image, label = train[3]
    assert image.shape == (1, 32, 32)
    assert label == int(arrays["train"][1][3])
    # 2 px of background (-1) around the original 28x28 pixels.
    assert torch.all(image[:, :2] == -1) and torch.all(image[:, :, -2:] == -1)
    expected = torch.from_numpy(arrays["train"][0][3]).float() / 127.5 - 1
    assert torch.equal(image[0, 2:-2, 2:-2], expected)
    unpadded = make_dataset("fashion-mnist", root=tmp_path, image_size=28, train=False)[1][0]
    assert torch.equal(unpadded[0], torch.from_numpy(arrays["t10k"][0][1]).float() / 127.5 - 1)


def test_fashion_mnist_rejects_non_idx_file(tmp_path):
    write_fashion_mnist(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + b"\x00" * 12)  # float idx, not uint8
    with pytest.raises(ValueError, match="not an unsigned-byte idx"):
        make_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.skipif(not (data.FASHION_MNIST_DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    train, test = make_dataset("fashion-mnist"), make_dataset("fashion-mnist", train=False)
    assert (len(train), len(test)) == (60000, 10000)
    labels = test.labels
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))  # the published balanced test split
    image, _ = train[0]
    assert image.shape == (1, 32, 32) and image.max() > 0.9 and torch.all(image[:, :2] == -1)
    assert train.images.dtype == torch.uint8  # whole split held in memory once, as uint8


def test_fashion_mnist_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("VITDIFF_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        make_dataset("fashion-mnist", root=tmp_path / "empty")
    assert "train-images-idx3-ubyte.gz" in str(error.value) and "download=True" in str(error.value)


# --------------------------------------------------------------------------------------------------
# cifar10


class Python2Pickler(pickle._Pickler):
    """Writes bytes with Python 2's `str` opcodes, as in the published CIFAR-10 python pickles."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def write_cifar10(root: Path, per_batch: int = 2, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [*data.CIFAR10_TRAIN_BATCHES, "test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            Python2Pickler(f, protocol=2).dump(batch)
        batches[name] = batch
    meta = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                             b"ship", b"truck"], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        Python2Pickler(f, protocol=2).dump(meta)
    return batches


def test_cifar10_pickles_match_torchvision_reader(tmp_path, monkeypatch):
    batches = write_cifar10(tmp_path)
    train = make_dataset("cifar10", root=tmp_path, flip=False)
    test = make_dataset("cifar10", root=tmp_path, train=False)
    assert (len(train), len(test)) == (10, 2)
    # torchvision's own reader (its md5 check disabled for the tiny copy) sees the same pixels and labels.
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    reference = CIFAR10(str(tmp_path), train=True)
    for index in (0, 3, 9):
        image, label = train[index]
        pil, reference_label = reference[index]
        expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.equal(image, expected) and label == reference_label
    assert test[1][1] == batches["test_batch"][b"labels"][1]


def test_cifar10_flip_is_seeded_per_item_and_epoch(tmp_path):
    write_cifar10(tmp_path, per_batch=8)
    plain = make_dataset("cifar10", root=tmp_path, flip=False)
    flipped = make_dataset("cifar10", root=tmp_path)  # training default: random flip on
    again = make_dataset("cifar10", root=tmp_path)
    assert flipped.flip and not make_dataset("cifar10", root=tmp_path, train=False).flip
    decisions = []
    for index in range(len(plain)):
        image, original = flipped[index][0], plain[index][0]
        assert torch.equal(image, again[index][0])
        mirrored = torch.equal(image, original.flip(-1))
        assert mirrored or torch.equal(image, original)
        decisions.append(mirrored)
    assert 5 < sum(decisions) < 35  # about half of 40
    flipped.set_epoch(1)
    assert [torch.equal(flipped[i][0], plain[i][0].flip(-1)) for i in range(len(plain))] != decisions


# --------------------------------------------------------------------------------------------------
# celeba64


def write_celeba(root: Path, n: int = 4) -> list[np.ndarray]:
    """Aligned-CelebA-sized images (178x218): black outside U-ViT's crop box, white inside with a red mark."""
    folder = root / "celeba"
    arrays = []
    for i in range(1, n + 1):
        array = np.zeros((218, 178, 3), np.uint8)
        array[121 - 64:121 + 64, 89 - 64:89 + 64] = 255
        array[121 - 64:121 - 32, 89 - 64:89 - 32] = (255, 0, 0)  # top-left quarter-quarter of the box
        save_image(folder / "img_align_celeba" / f"{i:06d}.jpg", array, quality=100)
        arrays.append(array)
    (folder / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n")
    return arrays


def test_celeba_split_and_uvit_crop(tmp_path):
    write_celeba(tmp_path)
    train = make_dataset("celeba64", root=tmp_path, flip=False)
    assert len(train) == 2
    assert len(make_dataset("celeba64", root=tmp_path, train=False)) == 1
    assert len(make_dataset("celeba64", root=tmp_path, split="valid")) == 1
    image, target = train[0]
    assert image.shape == (3, 64, 64) and target == NO_LABEL
    # The crop box is exactly the white square: no black border survives; the red mark is top-left.
    green = image[1]
    assert green[20:, 20:].min() > 0.9 and green[:, 40:].min() > 0.9
    red_corner = image[:, 2:14, 2:14]
    assert red_corner[0].min() > 0.9 and red_corner[1].max() < -0.8
    assert dataset_info("celeba64").flip_for_training and make_dataset("celeba64", root=tmp_path).flip


def test_celeba_flat_folder_of_jpgs(tmp_path):
    write_celeba(tmp_path)
    flat = make_dataset("celeba64", root=tmp_path / "celeba" / "img_align_celeba", split="all")
    assert len(flat) == 4 and flat[3][0].shape == (3, 64, 64)


# --------------------------------------------------------------------------------------------------
# lsun


def test_lsun_lmdb(tmp_path):
    lmdb = pytest.importorskip("lmdb")
    rng = np.random.default_rng(0)
    arrays = [random_rgb(rng, 80, 100) for _ in range(3)]
    with lmdb.open(str(tmp_path / "church_outdoor_train_lmdb"), map_size=1 << 24) as env:
        with env.begin(write=True) as txn:
            for i, array in enumerate(arrays):
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="WEBP", lossless=True)  # LSUN stores webp
                txn.put(f"{i:040x}".encode(), buffer.getvalue())
    dataset = make_dataset("lsun", root=tmp_path, image_size=80, flip=False)
    assert len(dataset) == 3
    image, target = dataset[1]
    assert target == NO_LABEL and image.shape == (3, 80, 80)
    expected = torch.from_numpy(arrays[1][:, 10:90]).permute(2, 0, 1).float() / 127.5 - 1  # centre crop
    assert torch.equal(image, expected)
    # Worker processes get the dataset pickled and open their own lmdb handle.
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[2][0], dataset[2][0])
    loader = make_loader(dataset, 3, seed=0, num_workers=1, shuffle=False)
    assert torch.equal(next(iter(loader))[0][1], image)
    assert make_dataset("lsun", root=tmp_path)[0][0].shape == (3, 64, 64)


def test_lsun_image_folder_and_missing(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(2):
        save_image(tmp_path / "bedroom_val" / f"{i}.png", random_rgb(rng, 300, 260))
    dataset = make_dataset("lsun", root=tmp_path, category="bedroom", train=False, image_size=256)
    assert len(dataset) == 2 and dataset[0][0].shape == (3, 256, 256)
    with pytest.raises(DatasetNotFoundError, match="fyu/lsun"):
        make_dataset("lsun", root=tmp_path, category="bedroom", train=True)


# --------------------------------------------------------------------------------------------------
# cub200


def write_cub(root: Path) -> None:
    cub = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
    image_id = 0
    for class_index, class_name in enumerate(classes, 1):
        for k in range(2):
            image_id += 1
            relative = f"{class_name}/{class_name[4:]}_{k:04d}_{image_id}.jpg"
            array = np.zeros((120, 160, 3), np.uint8)
            array[40:80, 60:100] = 255  # the "bird": a white 40x40 box at x=60, y=40
            save_image(cub / "images" / relative, array, quality=100)
            lines["images.txt"].append(f"{image_id} {relative}")
            lines["image_class_labels.txt"].append(f"{image_id} {class_index}")
            lines["train_test_split.txt"].append(f"{image_id} {1 if k == 0 else 0}")
            lines["bounding_boxes.txt"].append(f"{image_id} 60.0 40.0 40.0 40.0")
            captions = root / "text_c10" / Path(relative).with_suffix(".txt")
            captions.parent.mkdir(parents=True, exist_ok=True)
            captions.write_text("".join(f"bird {image_id} caption {c}\n" for c in range(10)))
    for name, rows in lines.items():
        (cub / name).write_text("\n".join(rows) + "\n")


def test_cub200_captions_labels_and_bbox_crop(tmp_path):
    write_cub(tmp_path)
    train = make_dataset("cub200", root=tmp_path, flip=False)
    assert len(train) == 2 and len(make_dataset("cub200", root=tmp_path, train=False)) == 2
    image, caption = train[1]
    assert image.shape == (3, 64, 64)
    assert caption.startswith("bird 3 caption ")  # ids 1 and 3 are the training images
    # Seeded choice among the 10: fixed for (seed, epoch, item), varies over epochs, first when not random.
    assert make_dataset("cub200", root=tmp_path, flip=False)[1][1] == caption
    chosen = set()
    for epoch in range(12):
        train.set_epoch(epoch)
        chosen.add(train[1][1])
    assert len(chosen) > 3
    assert make_dataset("cub200", root=tmp_path, random_caption=False)[0][1] == "bird 1 caption 0"
    labels = make_dataset("cub200", root=tmp_path, target="label", train=False)
    assert [labels[i][1] for i in range(2)] == [0, 1]
    # bbox crop: a 60x60 square centred on the 40x40 bird, so the bird fills the middle 2/3.
    assert image[:, 16:48, 16:48].min() > 0.9 and image[:, :, :6].max() < -0.9
    center = make_dataset("cub200", root=tmp_path, crop="center", flip=False)[0][0]
    assert center[:, 32, 5].max() < -0.9 and center[:, 32, 32].min() > 0.9


def test_cub200_without_captions_returns_labels(tmp_path):
    write_cub(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "text_c10")
    assert make_dataset("cub200", root=tmp_path)[0][1] == 0
    with pytest.raises(DatasetNotFoundError, match="text_c10"):
        make_dataset("cub200", root=tmp_path, target="caption")


# --------------------------------------------------------------------------------------------------
# imagefolder, captions


def test_imagefolder_labels_from_folders(tmp_path):
    rng = np.random.default_rng(2)
    for class_name in ("cats", "dogs"):
        for i in range(2):
            save_image(tmp_path / class_name / f"{i}.png", random_rgb(rng, 40, 48))
    dataset = make_dataset("imagefolder", root=tmp_path, image_size=32)
    assert [dataset[i][1] for i in range(4)] == [0, 0, 1, 1]
    assert dataset[0][0].shape == (3, 32, 32) and not dataset.flip
    assert make_dataset("imagefolder", root=tmp_path, image_size=16, channels=1)[0][0].shape == (1, 16, 16)


def test_captions_jsonl(tmp_path):
    rng = np.random.default_rng(3)
    records = [{"file": "a.png", "caption": "a red square"},
               {"file": "sub/b.png", "caption": ["one", "two", "three"]},
               {"file": "c.png", "caption": "held out", "split": "test"}]
    for record in records:
        save_image(tmp_path / record["file"], random_rgb(rng, 64, 64))
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    train = make_dataset("captions", root=tmp_path)
    assert len(train) == 2 and train[0][1] == "a red square" and train[1][1] in ("one", "two", "three")
    assert train[0][0].shape == (3, 64, 64)
    test = make_dataset("captions", root=tmp_path, train=False)
    assert len(test) == 3 and test[2][1] == "held out"  # lines without "split" belong to both splits
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "missing.png", "caption": "x"}) + "\n")
    with pytest.raises(DatasetNotFoundError, match="missing.png"):
        make_dataset("captions", root=tmp_path)


@pytest.mark.parametrize("name, hint", [
    ("cifar10", "cifar-10-python.tar.gz"),
    ("celeba64", "list_eval_partition.txt"),
    ("lsun", "fyu/lsun"),
    ("cub200", "CUB_200_2011"),
    ("captions", "captions.jsonl"),
    ("imagefolder", "<class_name>"),
])
def test_missing_data_error_says_where_and_how(tmp_path, name, hint):
    with pytest.raises(DatasetNotFoundError) as error:
        make_dataset(name, root=tmp_path / "absent")
    assert hint in str(error.value) and str(tmp_path / "absent") in str(error.value)


# --------------------------------------------------------------------------------------------------
# Seeded order, distributed split, resume


def test_sampler_is_seeded_and_splits_ranks():
    orders = [ResumableSampler(10, seed=3).epoch_order() for _ in range(2)]
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(10))
    assert ResumableSampler(10, seed=4).epoch_order() != orders[0]
    sampler = ResumableSampler(10, seed=3)
    sampler.set_epoch(1)
    assert sampler.epoch_order() != orders[0]
    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=3).epoch_order() for r in range(3)]
    assert all(len(r) == 4 for r in ranks)  # padded by wrapping to 12
    assert set(sum(ranks, [])) == set(range(10))
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def batches_of(stream, n):
    return [next(stream) for _ in range(n)]


def test_data_stream_resume_is_exact_across_epochs(tmp_path):
    write_cifar10(tmp_path, per_batch=3)  # 15 train images, flipped at random
    dataset = make_dataset("cifar10", root=tmp_path)
    stream = DataStream(make_loader(dataset, 4, seed=7))  # 3 batches per epoch (drop_last)
    first = batches_of(stream, 5)
    state = stream.state_dict()
    assert state["epoch"] == 1 and state["position"] == 8
    rest = batches_of(stream, 4)
    assert stream.epoch == 2

    resumed = DataStream(make_loader(make_dataset("cifar10", root=tmp_path), 4, seed=7))
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(rest, batches_of(resumed, 4)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # An uninterrupted stream with the same seed agrees, and a different seed does not.
    again = batches_of(DataStream(make_loader(make_dataset("cifar10", root=tmp_path), 4, seed=7)), 9)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first + rest, again))
    other = next(DataStream(make_loader(dataset, 4, seed=8)))
    assert not torch.equal(other[0], first[0][0])


def test_worker_processes_give_the_same_batches(tmp_path):
    write_cifar10(tmp_path, per_batch=2)
    dataset = make_dataset("cifar10", root=tmp_path)
    single = batches_of(DataStream(make_loader(dataset, 2, seed=1)), 6)
    workers = batches_of(DataStream(make_loader(dataset, 2, seed=1, num_workers=2)), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(single, workers))


def test_resume_refuses_a_different_setup():
    sampler = ResumableSampler(10, seed=1)
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({**ResumableSampler(10, seed=2).state_dict()})
    with pytest.raises(ValueError, match="num_items"):
        sampler.load_state_dict({**ResumableSampler(11, seed=1).state_dict()})


def test_loader_too_small_for_one_batch():
    stream = DataStream(make_loader(make_dataset("digits", max_items=3), 4, seed=0))
    with pytest.raises(RuntimeError, match="no batch"):
        next(stream)
