"""Colour-word dropout: a recipe-search switch of notebook 07 (``experiments/text_recipe_search.py
--colour-dropout P``), not yet a config key.

Why: a 64x64 model that draws every seen caption draws a held-out pair ("a large blue square") as a shape the
colour comes with in training (a blue disc, ``experiments/results/07_text_to_image/held_out_shapes.csv``): the colour
word decides the shape. Dropping the colour word from some training captions ("a large square on the left") gives
the shape word a meaning of its own, without a colour. Only the colour word goes: a caption without its shape word
would teach "blue" to mean the shapes blue comes with, the very entanglement.

It lives here, beside the trainer rather than in :mod:`vitdiff.data` or the config, because those modules key every
filed run (:data:`vitdiff.workbook.runs.NUMERIC_MODULES`): a keeper moves into the config when notebook 07 is next
retrained anyway. Runs that use it are kept apart by their run directory (:func:`dropout_runs_dir`).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..shapes import COLOURS

# Salts of the per-item draws (vitdiff.data.item_uniform): 0 and 1 are the data sets' flip and caption choice.
_FIRST_WORD_SALT = 16


class ColourWordDropout(Dataset):
    """A captioned shapes training set whose captions lose each colour word with probability ``p``, drawn per
    (seed, epoch, item, word) like the data sets' own augmentation, so a resumed run sees the same captions.

    ``captions`` stays the full captions: the word tokenizer is built from them, so the vocabulary (and a
    checkpoint's tokenizer) is the set's own."""

    def __init__(self, dataset, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"colour-word dropout p must be in [0, 1], got {p}")
        if not hasattr(dataset, "captions") or not hasattr(dataset, "uniform"):
            raise TypeError(f"colour-word dropout needs the shapes data set (captions and per-item draws), "
                            f"got {type(dataset).__name__}: train on data.dataset=shapes")
        self.dataset, self.p = dataset, p
        self.captions = dataset.captions

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def caption(self, index: int, caption: str) -> str:
        """``caption`` (item ``index``'s) with its colour words dropped as this epoch draws them."""
        words = caption.split()
        return " ".join(word for position, word in enumerate(words)
                        if word not in COLOURS or self.dataset.uniform(index, _FIRST_WORD_SALT + position) >= self.p)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, caption, *rest = self.dataset[index]
        return (image, self.caption(index, caption), *rest)


def dropout_trainer(p: float):
    """A :class:`vitdiff.trainer.Trainer` whose training set is wrapped in :class:`ColourWordDropout`."""
    from ..trainer import Trainer

    class ColourWordDropoutTrainer(Trainer):
        def _make_dataset(self):
            return ColourWordDropout(super()._make_dataset(), p)

    return ColourWordDropoutTrainer


def dropout_runs_dir(runs_dir, p: float):
    """Where runs with colour-word dropout ``p`` live: the config (hence the run's key) does not carry ``p``."""
    return runs_dir / f"colour-word-dropout-{p:g}"
