""""shapes": an embedded captioned data set with ground-truth attributes, and a judge for text alignment.

Text-to-image needs captions, and judging it needs to know whether a sample
shows what its caption says. Real caption sets (MS-COCO) cannot be downloaded
here and carry no machine-checkable truth, so this module draws one:

* **Scenes.** One or two objects on a plain dark background. Each object has a
  shape (circle, square, triangle), a colour (six), a size (small, large) and a
  position (left, right, top, bottom). One object is captioned with where it is
  ("a small red circle on the left"); two objects with their relation, and the
  first-named object is always the left / upper one ("a large green square left
  of a small blue triangle", "... above ..."). Layouts are unambiguous: objects
  in a "left of" scene share a row (up to jitter), in an "above" scene a column.
* **Compositional split.** Some colour-shape pairs (``HELD_OUT_PAIRS``) never
  appear in ``split="train"``; ``split="test"`` holds only scenes with at least
  one of them, ``split="val"`` new scenes of seen pairs, ``split="all"`` the
  full distribution (used to train the judge, which is a measuring tool, not a
  model under test). Every colour and every shape still appears in training.
* **Deterministic.** Scene parameters come from a numpy generator seeded by
  ``(seed, split)``; images are drawn on demand with PIL at twice the size and
  box-downsampled (antialiased). 10k images at 64x64 take 2-6 s on one CPU core.
* **Judge.** :class:`AttributeClassifier` is a small CNN with one head per
  attribute and object slot (plus the object count), trained on ``split="all"``
  in well under a minute on a CPU and pinned: ``vitdiff/assets/shapes-judge.pt``
  with its sha256 in the code (``vitdiff.metrics.ATTRIBUTE_JUDGE``).
  :func:`text_alignment_accuracy` scores samples against the attributes of the
  captions they were drawn from; :func:`shuffled_caption_baseline` scores the
  same samples against other captions of the set, the measured chance level.

Attributes are a (2, 4) long tensor per scene: rows are object slots (slot 0 is
the first-named object), columns ``ATTRIBUTES`` = shape, colour, size, position
as indices into the vocabularies below; an absent second object is ``-1``.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .data import ImageDataset
from .metrics import ATTRIBUTE_JUDGE
from .text import WordTokenizer

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
ATTRIBUTES = ("shape", "colour", "size", "position")
VOCABULARIES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
RELATIONS = ("left of", "above")  # two-object layouts; slot 0 is left / top
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"))
SPLITS = ("train", "val", "test", "all")

RGB = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 235), "yellow": (240, 210, 40),
       "purple": (160, 70, 210), "white": (235, 235, 235)}
BACKGROUND = (30, 30, 30)
HALF_EXTENT = {"small": 0.11, "large": 0.19}  # fraction of the image side
TWO_OBJECT_PROB = 0.5
ABSENT = -1

# --------------------------------------------------------------------------- scenes
def _split_seed(seed: int, split: str) -> int:
    # A stable hash (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256(f"shapes/{seed}/{split}".encode()).digest()[:8], "little")


def _is_held_out(colours: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Elementwise: is (colour, shape) one of ``HELD_OUT_PAIRS``? Works on any matching index arrays."""
    held = np.zeros(colours.shape, dtype=bool)
    for colour, shape in HELD_OUT_PAIRS:
        held |= (colours == COLOURS.index(colour)) & (shapes == SHAPES.index(shape))
    return held


def sample_scenes(num: int, seed: int = 0, split: str = "train") -> dict[str, np.ndarray]:
    """Draw ``num`` scene parameter sets for a split (vectorised, rejection-filtered, deterministic).

    Returns arrays: ``attributes`` (num, 2, 4) int64 with ``ABSENT`` rows, ``relation``
    (num,) int64 (index into ``RELATIONS``, -1 for one object) and ``centres`` (num, 2, 2)
    float (x, y) in [0, 1].
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
    rng = np.random.default_rng(_split_seed(seed, split))
    chunks: list[dict[str, np.ndarray]] = []
    have = 0
    while have < num:
        batch = max(2 * (num - have), 64)
        two = rng.random(batch) < TWO_OBJECT_PROB
        shapes = rng.integers(len(SHAPES), size=(batch, 2))
        colours = rng.integers(len(COLOURS), size=(batch, 2))
        sizes = rng.integers(len(SIZES), size=(batch, 2))
        where = rng.integers(len(POSITIONS), size=batch)       # one object: where it is
        relation = rng.integers(len(RELATIONS), size=batch)    # two objects: how they relate
        jitter = rng.uniform(-1, 1, size=(batch, 2, 2))

        positions = np.stack([where, np.full(batch, ABSENT)], axis=1)
        # "left of": slot 0 left, slot 1 right; "above": slot 0 top, slot 1 bottom.
        positions[two] = np.where(relation[two, None] == 0, [[0, 1]], [[2, 3]])
        attributes = np.stack([shapes, colours, sizes, positions], axis=2)
        attributes[~two, 1, :] = ABSENT
        relation = np.where(two, relation, -1)

        present = attributes[:, :, 0] != ABSENT
        held = _is_held_out(attributes[:, :, 1], attributes[:, :, 0]) & present
        keep = {"train": ~held.any(1), "val": ~held.any(1), "test": held.any(1), "all": np.ones(batch, bool)}[split]

        centres = _centres(attributes[:, :, 3], jitter, two)
        chunks.append({"attributes": attributes[keep], "relation": relation[keep], "centres": centres[keep]})
        have += int(keep.sum())
    return {key: np.concatenate([c[key] for c in chunks])[:num] for key in chunks[0]}


_ANCHOR = {0: (0.28, 0.5), 1: (0.72, 0.5), 2: (0.5, 0.28), 3: (0.5, 0.72)}  # position index -> (x, y)


def _centres(positions: np.ndarray, jitter: np.ndarray, two: np.ndarray) -> np.ndarray:
    """Object centres from positions plus jitter; pairs keep a clear gap along their relation's axis."""
    anchors = np.array([_ANCHOR.get(int(p), (0.5, 0.5)) for p in positions.reshape(-1)]).reshape(*positions.shape, 2)
    horizontal = np.isin(positions, (0, 1))[..., None]
    # Along the layout axis jitter little (two large objects never touch); across it, more.
    along, across = np.where(two[:, None, None], 0.03, 0.05), np.where(two[:, None, None], 0.08, 0.05)
    scale = np.where(horizontal, np.concatenate([along, across], -1), np.concatenate([across, along], -1))
    return anchors + jitter * scale


def caption_of(attributes: np.ndarray | torch.Tensor, relation: int) -> str:
    """The caption of one scene's (2, 4) attributes."""
    def noun(row) -> str:
        return f"a {SIZES[row[2]]} {COLOURS[row[1]]} {SHAPES[row[0]]}"

    rows = [[int(v) for v in row] for row in attributes]
    if rows[1][0] == ABSENT:
        return f"{noun(rows[0])} {WHERE[POSITIONS[rows[0][3]]]}"
    return f"{noun(rows[0])} {RELATIONS[relation]} {noun(rows[1])}"


_NOUN = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_ONE_RE = re.compile(rf"^{_NOUN} ({'|'.join(WHERE.values())})$")
_TWO_RE = re.compile(rf"^{_NOUN} ({'|'.join(RELATIONS)}) {_NOUN}$")


def parse_caption(caption: str) -> torch.Tensor:
    """Inverse of :func:`caption_of`: the (2, 4) attributes a shapes caption asks for (to score any prompt)."""
    text = " ".join(caption.lower().split())
    if match := _ONE_RE.match(text):
        size, colour, shape, where = match.groups()
        position = {v: k for k, v in WHERE.items()}[where]
        rows = [[SHAPES.index(shape), COLOURS.index(colour), SIZES.index(size), POSITIONS.index(position)],
                [ABSENT] * 4]
    elif match := _TWO_RE.match(text):
        s0, c0, h0, relation, s1, c1, h1 = match.groups()
        p0, p1 = (0, 1) if relation == "left of" else (2, 3)
        rows = [[SHAPES.index(h0), COLOURS.index(c0), SIZES.index(s0), p0],
                [SHAPES.index(h1), COLOURS.index(c1), SIZES.index(s1), p1]]
    else:
        raise ValueError(f"{caption!r} is not a shapes caption: expected e.g. 'a small red circle on the left' "
                         "or 'a large blue square left of a small green triangle'")
    return torch.tensor(rows, dtype=torch.long)


# Two "a <size> <colour> <shape>" nouns and the longest relation: "a small red circle left of a large blue square".
MAX_CAPTION_WORDS = 2 * 4 + max(len(relation.split()) for relation in RELATIONS)


def shapes_tokenizer() -> WordTokenizer:
    """A tokenizer that knows every shapes word, padded to the longest caption."""
    return WordTokenizer.from_corpus([], max_length=MAX_CAPTION_WORDS, extra_words=caption_vocabulary())


def caption_vocabulary() -> list[str]:
    """Every word a shapes caption can use (so a tokenizer built from it has no unknown words)."""
    words = ["a", *SIZES, *COLOURS, *SHAPES, *" ".join(WHERE.values()).split(), *" ".join(RELATIONS).split()]
    return list(dict.fromkeys(words))


# --------------------------------------------------------------------------- drawing
def render_scene(attributes: np.ndarray, centres: np.ndarray, image_size: int = 64, supersample: int = 2) -> np.ndarray:
    """Draw one scene as an (H, W, 3) uint8 array (antialiased by drawing ``supersample`` times larger)."""
    side = image_size * supersample
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, (cx, cy) in zip(attributes, centres):
        shape, colour, size = int(row[0]), int(row[1]), int(row[2])
        if shape == ABSENT:
            continue
        r, x, y, fill = HALF_EXTENT[SIZES[size]] * side, cx * side, cy * side, RGB[COLOURS[colour]]
        if SHAPES[shape] == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif SHAPES[shape] == "square":
            q = 0.88 * r  # about the circle's area, so size is not a shape cue
            draw.rectangle((x - q, y - q, x + q, y + q), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=fill)
    if supersample > 1:
        canvas = canvas.reduce(supersample)
    return np.asarray(canvas)


class ShapesDataset(ImageDataset):
    """Captioned compositions with ground-truth attributes; see the module docstring.

    Items are ``(image, caption, attributes)``: image (3, S, S) float in [-1, 1],
    the caption (a string, or (L,) long token ids when a ``tokenizer`` is given),
    and the (2, 4) long attributes (also ``dataset.attributes``, all at once).
    ``return_attributes=False`` gives the data registry's ``(image, caption)`` pairs.
    Never flipped: a mirror image would contradict "left of".
    """

    def __init__(self, split: str = "train", *, image_size: int = 64, num_samples: int | None = None,
                 seed: int = 0, tokenizer=None, return_attributes: bool = True, supersample: int = 2):
        super().__init__(flip=False, seed=seed)
        if image_size < 16:
            raise ValueError(f"image_size {image_size} is too small to tell shapes apart: use 16 or more (32, 64, 256)")
        self.split = split
        self.image_size = image_size
        self.num_samples = num_samples if num_samples is not None else (10_000 if split in ("train", "all") else 1_000)
        self.tokenizer = tokenizer
        self.return_attributes = return_attributes
        self.supersample = supersample
        scenes = sample_scenes(self.num_samples, seed=seed, split=split)
        self.attributes = torch.from_numpy(scenes["attributes"])
        self.relations = scenes["relation"]
        self.centres = scenes["centres"]
        self.captions = [caption_of(a, r) for a, r in zip(scenes["attributes"], self.relations)]

    def num_items(self) -> int:
        return self.num_samples

    def image(self, index: int) -> torch.Tensor:
        return self._render(self.attributes[index].numpy(), self.centres[index])

    def _render(self, attributes: np.ndarray, centres: np.ndarray) -> torch.Tensor:
        pixels = render_scene(attributes, centres, self.image_size, self.supersample)
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float().div(127.5).sub(1.0)

    def redrawn_images(self, seed: int) -> torch.Tensor:
        """Every scene drawn again for its caption, with new position jitter (all a caption leaves open): what a
        perfect generator of these captions draws, (N, 3, S, S)."""
        attributes = self.attributes.numpy()
        jitter = np.random.default_rng(seed).uniform(-1, 1, size=(len(attributes), 2, 2))
        centres = _centres(attributes[:, :, 3], jitter, attributes[:, 1, 0] != ABSENT)
        return torch.stack([self._render(a, c) for a, c in zip(attributes, centres)])

    def load(self, index: int) -> tuple[torch.Tensor, str | torch.Tensor]:
        caption = self.captions[index]
        return self.image(index), caption if self.tokenizer is None else self.tokenizer([caption])[0]

    def __getitem__(self, index: int):
        image, caption = super().__getitem__(index)
        return (image, caption, self.attributes[index]) if self.return_attributes else (image, caption)

    def images(self, indices: Iterable[int] | None = None) -> torch.Tensor:
        """A stacked (N, 3, S, S) batch of images (all of them by default)."""
        indices = range(len(self)) if indices is None else indices
        return torch.stack([self.image(i) for i in indices])


def build_shapes(*, root=None, image_size: int, train: bool, flip: bool, seed: int = 0,
                 split: str | None = None, num_samples: int | None = None, tokenizer=None) -> ShapesDataset:
    """Registry builder: ``train=True`` -> split "train", ``train=False`` -> "test" (held-out pairs);
    ``split="val"`` (seen pairs, new scenes) or ``"all"`` overrides. ``root`` is unused (nothing on disk)."""
    if flip:
        raise ValueError("shapes cannot be flipped: a mirror image contradicts its 'left of' caption; pass flip=False")
    return ShapesDataset(split or ("train" if train else "test"), image_size=image_size, num_samples=num_samples,
                         seed=seed, tokenizer=tokenizer, return_attributes=False)


# --------------------------------------------------------------------------- judge
CLASSIFIER_VERSION = "shapes-attr-v1"
CLASSIFIER_RESOLUTION = 32
_HEAD_SIZES = {"count": 2, **{f"{a}{slot}": len(VOCABULARIES[a]) for slot in (0, 1) for a in ATTRIBUTES}}


class AttributeClassifier(nn.Module):
    """Small CNN with one head per attribute and object slot, plus the object count.

    Any input size is area-resized to ``CLASSIFIER_RESOLUTION`` first, so
    samples at 32, 64 or 256 pixels are judged the same way.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        grid = CLASSIFIER_RESOLUTION // 8
        self.trunk = nn.Sequential(nn.Linear(channels * grid * grid, 256), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(256, k) for name, k in _HEAD_SIZES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != CLASSIFIER_RESOLUTION or images.shape[-2] != CLASSIFIER_RESOLUTION:
            images = F.interpolate(images, size=(CLASSIFIER_RESOLUTION,) * 2, mode="area")
        hidden = self.trunk(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}


def _targets(attributes: torch.Tensor) -> dict[str, torch.Tensor]:
    targets = {"count": (attributes[:, 1, 0] != ABSENT).long()}
    for slot in (0, 1):
        for column, name in enumerate(ATTRIBUTES):
            targets[f"{name}{slot}"] = attributes[:, slot, column]
    return targets


def train_attribute_classifier(num_images: int = 8_000, steps: int = 300, batch_size: int = 128, lr: float = 3e-3,
                               seed: int = 0, verbose: bool = False) -> AttributeClassifier:
    """Train the judge on ``split="all"`` (every combination) with light noise augmentation."""
    generator = torch.Generator().manual_seed(seed)
    # Drawn straight at the judge's resolution (4x supersampled: the same pixels as area-resizing a 2x
    # supersampled 64x64 image, which is what the judge does to 64x64 samples).
    data = ShapesDataset("all", image_size=CLASSIFIER_RESOLUTION, num_samples=num_images, seed=seed + 1, supersample=4)
    images = data.images()
    targets = _targets(data.attributes)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    start = time.time()
    for step in range(steps):
        batch = torch.randint(num_images, (batch_size,), generator=generator)
        # Noise makes the judge tolerant of imperfect samples without changing what it reads.
        sigma = 0.15 * torch.rand(batch_size, 1, 1, 1, generator=generator)
        x = images[batch] + sigma * torch.randn(images[batch].shape, generator=generator)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], targets[k][batch], ignore_index=ABSENT) for k in logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if verbose and step % 100 == 0:
            print(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)")
    return model.eval()


def make_judge_asset() -> dict:
    """The pinned judge's file content (``python -m vitdiff.metrics --make-assets``): trained with the default
    recipe, scored on new scenes of the val split."""
    recipe = {"num_images": 8_000, "steps": 300, "batch_size": 128, "lr": 3e-3, "seed": 0}
    model = train_attribute_classifier(**recipe)
    val = ShapesDataset("val", image_size=64, num_samples=1_000)
    accuracy = text_alignment_accuracy(val.images(), val.attributes, model)
    meta = {"version": CLASSIFIER_VERSION, "recipe": recipe, "val_accuracy_64px": accuracy}
    return {"state_dict": model.state_dict(), "config": {}, "meta": json.dumps(meta)}


def load_attribute_classifier() -> AttributeClassifier:
    """The pinned judge (``vitdiff.metrics.ATTRIBUTE_JUDGE``, checksum verified)."""
    return ATTRIBUTE_JUDGE.load()


@torch.no_grad()
def predict_attributes(images: torch.Tensor, classifier: AttributeClassifier | None = None,
                       batch_size: int = 256) -> torch.Tensor:
    """(N, 2, 4) predicted attributes of images in [-1, 1]; slot 1 is ``ABSENT`` when one object is seen."""
    classifier = classifier if classifier is not None else load_attribute_classifier()
    classifier = classifier.eval()
    device = next(classifier.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        logits = classifier(chunk.to(device, torch.float32))
        pred = torch.stack([torch.stack([logits[f"{a}{slot}"].argmax(1) for a in ATTRIBUTES], 1)
                            for slot in (0, 1)], 1)
        pred[logits["count"].argmax(1) == 0, 1] = ABSENT
        out.append(pred.cpu())
    return torch.cat(out)


def text_alignment_accuracy(images: torch.Tensor, attributes: torch.Tensor,
                            classifier: AttributeClassifier | None = None) -> dict[str, float]:
    """How often samples show what their captions asked for, judged by :class:`AttributeClassifier`.

    ``attributes`` (N, 2, 4) are the captions' attributes (``ShapesDataset.attributes``
    or :func:`parse_caption`). Returns the accuracy of the object count, of each
    attribute over the objects the caption names, and ``all_correct``: the
    fraction of images whose count and every attribute of every object match.
    Compare with :func:`shuffled_caption_baseline` of the same samples.
    """
    _check_pairs(images, attributes)
    return score_predictions(predict_attributes(images, classifier), attributes)


# Shape judged on the held-out objects alone: a test caption can also name a seen pair, whose shape a model that
# does not compose still gets right, so shape over every object a test caption names overstates composition.
HELD_OUT_SHAPE = "held_out_shape"


def held_out_objects(attributes: torch.Tensor) -> torch.Tensor:
    """(N, 2) bool: the objects the captions name whose colour-shape pair is one of ``HELD_OUT_PAIRS``."""
    attributes = np.asarray(attributes)
    return torch.from_numpy(_is_held_out(attributes[:, :, 1], attributes[:, :, 0]))


def score_counts(predicted: torch.Tensor, attributes: torch.Tensor,
                 held_out: torch.Tensor | None = None) -> dict[str, tuple[int, int]]:
    """(number correct, number judged) per metric: samples for ``count`` and ``all_correct``, the objects the
    captions name for each attribute, and for ``HELD_OUT_SHAPE`` (only where there are any) the objects in
    ``held_out`` (default :func:`held_out_objects` of ``attributes``; a baseline scoring other captions passes the
    true captions' objects) that the captions name. The unit a count-based test needs (:func:`score_predictions`:
    the rates)."""
    present = attributes[:, :, 0] != ABSENT
    count_ok = (predicted[:, 1, 0] != ABSENT) == present[:, 1]
    matches = predicted == attributes  # (N, 2, 4)
    n_samples, n_objects = len(attributes), int(present.sum())
    result = {"count": (int(count_ok.sum()), n_samples)}
    for column, name in enumerate(ATTRIBUTES):
        result[name] = (int(matches[:, :, column][present].sum()), n_objects)
    object_ok = matches.all(2) | ~present
    result["all_correct"] = (int((count_ok & object_ok.all(1)).sum()), n_samples)
    held = (held_out_objects(attributes) if held_out is None else held_out) & present
    if held.any():
        result[HELD_OUT_SHAPE] = (int(matches[:, :, 0][held].sum()), int(held.sum()))
    return result


def score_predictions(predicted: torch.Tensor, attributes: torch.Tensor,
                      held_out: torch.Tensor | None = None) -> dict[str, float]:
    """:func:`text_alignment_accuracy` on attributes already predicted by :func:`predict_attributes`."""
    return {name: k / n for name, (k, n) in score_counts(predicted, attributes, held_out).items()}


def shuffled_caption_baseline(predicted: torch.Tensor, attributes: torch.Tensor, *, draws: int = 16,
                              seed: int = 0) -> dict[str, float]:
    """What the same samples score against *other* captions of the same set, averaged over ``draws`` random
    derangements (no sample keeps its own caption).

    This is the chance level measured on the captions' real layout, not computed: a model that draws plausible
    scenes but ignores its caption scores it on average. (Uniform guessing is the wrong chance: a two-object
    caption always names the left or upper object first, so position agreement is far above 1/4.)"""
    generator = torch.Generator().manual_seed(seed)
    return _mean_score(predicted, (attributes[_derangement(len(attributes), generator)] for _ in range(draws)), draws,
                       held_out_objects(attributes))


def shape_shuffled_baseline(predicted: torch.Tensor, attributes: torch.Tensor, *, draws: int = 16,
                            seed: int = 0) -> dict[str, float]:
    """What the same samples score against their own captions with only the shape word shuffled: each named
    object takes the shape of another named object of the set (a random derangement of the objects, averaged over
    ``draws``); colour, size, position and the object count stay the caption's own.

    The null of "shape follows the caption" for a model that already follows the other words: unlike
    :func:`shuffled_caption_baseline` it keeps which objects are named, so shape is not penalised for slots the
    shuffled caption does not share. Only ``shape`` and ``all_correct`` differ from the own-caption scores."""
    generator = torch.Generator().manual_seed(seed)
    present = attributes[:, :, 0] != ABSENT

    def shape_shuffled() -> torch.Tensor:
        shuffled = attributes.clone()
        shapes = attributes[:, :, 0][present]
        shuffled[:, :, 0][present] = shapes[_derangement(len(shapes), generator)]
        return shuffled

    return _mean_score(predicted, (shape_shuffled() for _ in range(draws)), draws, held_out_objects(attributes))


def _derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) that moves every index: a cycle through a random order."""
    order = torch.randperm(n, generator=generator)
    shifted = torch.empty_like(order)
    shifted[order] = order.roll(1)
    return shifted


def _mean_score(predicted: torch.Tensor, captions: Iterable[torch.Tensor], draws: int,
                held_out: torch.Tensor) -> dict[str, float]:
    """:func:`score_predictions` averaged over ``draws`` alternative caption sets, ``HELD_OUT_SHAPE`` on the true
    captions' held-out objects (``held_out``)."""
    totals: dict[str, float] = {}
    for attributes in captions:
        for name, value in score_predictions(predicted, attributes, held_out).items():
            totals[name] = totals.get(name, 0.0) + value / draws
    return totals


def _check_pairs(images: torch.Tensor, attributes: torch.Tensor) -> None:
    if images.shape[0] != attributes.shape[0] or attributes.shape[1:] != (2, len(ATTRIBUTES)):
        raise ValueError(f"need N images and (N, 2, {len(ATTRIBUTES)}) attributes, got {tuple(images.shape)} "
                         f"and {tuple(attributes.shape)}")


__all__ = [
    "ATTRIBUTES", "COLOURS", "HELD_OUT_PAIRS", "POSITIONS", "RELATIONS", "SHAPES", "SIZES",
    "AttributeClassifier", "ShapesDataset", "build_shapes", "caption_of", "caption_vocabulary",
    "load_attribute_classifier", "make_judge_asset", "parse_caption", "predict_attributes", "render_scene",
    "sample_scenes", "score_counts", "score_predictions", "shape_shuffled_baseline", "shapes_tokenizer",
    "shuffled_caption_baseline", "text_alignment_accuracy", "train_attribute_classifier",
]
