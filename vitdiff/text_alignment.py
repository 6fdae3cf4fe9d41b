"""Judging text-to-image samples on the embedded shapes set (:mod:`vitdiff.shapes`): attribute accuracy beside
its measured baselines, FD-shapes-clf on the judge's features, and the key of this code.

The measuring code of notebook 07 (its layer is :mod:`vitdiff.text_workbook`): :func:`text_code_key` hashes the
functions here that a filed seed's numbers depend on.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from .config import Config
from .shapes import HELD_OUT_SHAPE
from .workbook.runs import code_key


def fd_shapes_label(n: int) -> str:
    return f"FD-shapes-clf@{n}"


@torch.no_grad()
def shapes_features(images: torch.Tensor, classifier=None, batch_size: int = 256) -> torch.Tensor:
    """The shapes judge's penultimate (256-d) features of images in [-1, 1]: the space of FD-shapes-clf."""
    from .shapes import load_attribute_classifier

    classifier = (classifier or load_attribute_classifier()).eval()
    captured: list[torch.Tensor] = []
    hook = classifier.trunk.register_forward_hook(lambda module, inputs, output: captured.append(output.cpu()))
    try:
        for chunk in images.split(batch_size):
            classifier(chunk.float())
    finally:
        hook.remove()
    return torch.cat(captured)


def fd_shapes(fake: torch.Tensor, real: torch.Tensor, classifier=None) -> float:
    """FD-shapes-clf: Fréchet distance between the judge's features of two image sets. A CPU proxy, not FID."""
    from .metrics import FeatureStats

    fake_stats = FeatureStats(256).update(shapes_features(fake, classifier))
    real_stats = FeatureStats(256).update(shapes_features(real, classifier))
    return fake_stats.frechet_distance(real_stats)


ALIGNMENT_METRICS = ("all_correct", "shape", "colour", "size", "position", "count")


# The metrics that shuffling only the shape word changes (the others equal the own-caption scores).
SHAPE_SHUFFLED_METRICS = ("all_correct", "shape", HELD_OUT_SHAPE)


def alignment_rows(model, process, config: Config, *, split: str = "test", guidances=(1.0,), n: int = 128,
                   seed: int = 0, batch_size: int = 64, classifier=None) -> list[dict[str, Any]]:
    """Sample n images for n captions of a shapes split at each guidance scale and judge them; one row per
    (guidance, attribute).

    ``split``: "test" (every caption names a held-out colour-shape pair, never seen in training) or "val" (new
    scenes of seen pairs). Each row holds the attribute's ``accuracy`` against the true captions beside three
    measured baselines: ``shuffled_baseline``, the same samples judged against other captions of the split
    (:func:`vitdiff.shapes.shuffled_caption_baseline`); ``shape_shuffled_baseline`` (shape and all-correct rows
    only, NaN elsewhere), the same samples against their captions with only the shape word shuffled
    (:func:`vitdiff.shapes.shape_shuffled_baseline`); and ``empty_caption_baseline``, samples drawn from the
    empty caption judged against the true captions. Counts for a count-based test: ``k`` correct of ``n_judged``
    (the objects the captions name for an attribute, the samples for count and all-correct), and ``k_shuffled``,
    ``k_shape_shuffled``, ``k_empty`` of the same ``n_judged`` (a shuffled baseline's count is its mean over the
    derangements, rounded). The test split has one more row, ``held_out_shape``: shape judged on the held-out
    objects alone (:data:`vitdiff.shapes.HELD_OUT_SHAPE`), with the same baselines.

    ``fd`` is FD-shapes-clf@n between the samples and the real images of the same captions; ``fd_redrawn`` the FD
    between those real images and the same captions drawn again with new position jitter
    (:meth:`vitdiff.shapes.ShapesDataset.redrawn_images`: what a perfect generator of these captions scores at this
    n); ``fd_floor`` the FD between the real images and n other real scenes of the split (the split's own spread at
    this n: samples matched to their captions can score below it). Samples are clipped to [-1, 1] first, as when
    saved."""
    from .build import data_geometry
    from .generate import generate
    from .shapes import (ShapesDataset, load_attribute_classifier, predict_attributes, score_counts,
                         shape_shuffled_baseline, shuffled_caption_baseline)

    classifier = classifier or load_attribute_classifier()
    _, image_size = data_geometry(config)
    captions = ShapesDataset(split, image_size=image_size, num_samples=n, seed=10_000 + seed)
    real = captions.images()
    # Other real scenes of the split (the split's spread at this n), and the same captions drawn again (a perfect
    # generator of these captions).
    fd_floor = fd_shapes(ShapesDataset(split, image_size=image_size, num_samples=n, seed=20_000 + seed).images(),
                         real, classifier)
    fd_redrawn = fd_shapes(captions.redrawn_images(seed=30_000 + seed), real, classifier)

    def draw(prompts: list[str], guidance: float) -> torch.Tensor:
        return generate(model, process, config, n=n, batch_size=batch_size, seed=seed, prompts=prompts,
                        guidance=guidance).clamp(-1, 1)

    # The caption-free samples (guidance changes nothing when the caption is empty), judged against the captions.
    empty = score_counts(predict_attributes(draw([""], 1.0), classifier), captions.attributes)
    rows = []
    for guidance in guidances:
        images = draw(captions.captions, guidance)
        predicted = predict_attributes(images, classifier)
        counts = score_counts(predicted, captions.attributes)
        shuffled = shuffled_caption_baseline(predicted, captions.attributes, seed=seed)
        shape_shuffled = shape_shuffled_baseline(predicted, captions.attributes, seed=seed)
        fd = fd_shapes(images, real, classifier)
        # Shape on the held-out objects alone where the captions name any (the test split): the composition row.
        for name in (name for name in (*ALIGNMENT_METRICS, HELD_OUT_SHAPE) if name in counts):
            (k, n_judged), k_empty = counts[name], empty[name][0]
            shape_only = name in SHAPE_SHUFFLED_METRICS
            rows.append({"split": split, "guidance": guidance, "attribute": name, "accuracy": k / n_judged,
                         "shuffled_baseline": shuffled[name],
                         "shape_shuffled_baseline": shape_shuffled[name] if shape_only else float("nan"),
                         "empty_caption_baseline": k_empty / n_judged, "n": n, "k": k, "n_judged": n_judged,
                         "k_shuffled": round(shuffled[name] * n_judged),
                         "k_shape_shuffled": round(shape_shuffled[name] * n_judged) if shape_only else None,
                         "k_empty": k_empty, "fd": fd, "fd_floor": fd_floor, "fd_redrawn": fd_redrawn})
    return rows


def alignment_summary(frame):
    """Mean over seeds of accuracy and its baselines per (split, guidance, attribute), with the ratio of the
    accuracy to its shuffled-caption baseline. Rows filed before the shape-shuffled baseline lack its column."""
    columns = [column for column in ("accuracy", "shuffled_baseline", "shape_shuffled_baseline",
                                     "empty_caption_baseline", "fd", "fd_redrawn", "fd_floor") if column in frame]
    table = frame.groupby(["split", "guidance", "attribute"], sort=False)[columns].mean()
    return table.assign(ratio=table["accuracy"] / table["shuffled_baseline"])


def held_out_shapes_drawn(predicted: torch.Tensor, attributes: torch.Tensor):
    """What the held-out objects came out as: for each of :data:`vitdiff.shapes.HELD_OUT_PAIRS`, the objects
    the captions name with that pair, and how many the judge saw drawn as each shape (``absent``: the sample has
    fewer objects than its caption). ``asked``: the share drawn as the caption's shape; ``seen_with_colour``: the
    share drawn as one of the shapes the colour comes with in training (the two other shapes), what a model that
    draws the colour it is asked for but not the unseen pairing falls back to. Descriptive: no test, one row a pair.
    ``predicted`` and ``attributes`` are (N, 2, 4) (:func:`vitdiff.shapes.predict_attributes`, the captions')."""
    import pandas as pd

    from .shapes import ABSENT, COLOURS, HELD_OUT_PAIRS, SHAPES

    attributes, predicted = torch.as_tensor(attributes), torch.as_tensor(predicted)
    if attributes.shape != predicted.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and caption attributes {tuple(attributes.shape)} "
                         "must both be (N, 2, 4)")
    rows = []
    for colour, shape in HELD_OUT_PAIRS:
        named = (attributes[:, :, 1] == COLOURS.index(colour)) & (attributes[:, :, 0] == SHAPES.index(shape))
        drawn = predicted[:, :, 0][named]
        counts = {name: int((drawn == index).sum()) for index, name in enumerate(SHAPES)}
        counts["absent"] = int((drawn == ABSENT).sum())
        n = int(named.sum())
        rows.append({"pair": f"{colour} {shape}", "n": n, **counts,
                     "asked": counts[shape] / n if n else float("nan"),
                     "seen_with_colour": sum(counts[other] for other in SHAPES if other != shape) / n
                     if n else float("nan")})
    return pd.DataFrame(rows)


def text_code_key(config: Config) -> str:
    """The code a text seed's numbers depend on: the model's and the numeric modules' (:func:`code_key`), the
    shapes set with its judge (:mod:`vitdiff.shapes`) and this module's measuring functions (:func:`alignment_rows`,
    :func:`fd_shapes`, :func:`shapes_features`), each without its docstrings. The rest of this module is left out,
    so a refactor of its helpers keeps the filed seeds; what they measure with (guidance scales, captions per
    split) is checked from the rows."""
    import hashlib

    from . import shapes
    from .build import build_model

    with torch.device("meta"):
        digest = hashlib.sha1(code_key(build_model(config, tokenizer=shapes.shapes_tokenizer())).encode())
    digest.update(_measuring_code().encode())
    return digest.hexdigest()[:12]


@functools.cache
def _measuring_code() -> str:
    """The source of the code that measures a text seed (:func:`text_code_key`), read once a process, when this
    module loads (its last line): a kernel whose file is edited while it trains keys its seeds by the code it runs,
    not by the edited file (``inspect`` would read the new file at the old code's line numbers)."""
    import inspect

    from . import shapes
    from .workbook.runs import _code_without_docs

    return "".join(_code_without_docs(inspect.getsource(code))
                   for code in (shapes, alignment_rows, fd_shapes, shapes_features))



_measuring_code()  # now, while the file on disk is the code loaded
