"""Text conditioning for pixel-space text-to-image: tokenizer, text encoders, and the model wrapper.

Backbones take text as a (B, L, context_dim) float sequence (see
:mod:`vitdiff.models.base`). This module turns captions into that sequence:

* :class:`WordTokenizer`: a word-level vocabulary built from a caption corpus,
  fixed length, padded, saved as JSON. Works offline.
* :class:`TextEncoder`: a small Transformer (token embedding + learned
  positions + pre-LN blocks) trained jointly from scratch with the diffusion
  model. It attends over every position, padding included (no mask): the
  padding tokens are learned inputs, which keeps the all-padding *empty
  caption* a well-defined input (see below) and the attention on SDPA's fast path.
* :class:`FrozenCLIPEncoder`: CLIP's text tower through ``transformers``, from a
  local folder only (nothing is downloaded); its last hidden states, as U-ViT
  conditions on (77 x 768 for ViT-L/14).
* :class:`PrecomputedTextEmbeddings`: U-ViT-style ``.npy`` files, one per
  caption, plus the empty caption's embedding.
* :class:`TextToImage`: ``backbone + text encoder + tokenizer`` behind the
  backbone interface, so :class:`vitdiff.diffusion.DiffusionLoss` and the
  samplers drive it unchanged with ``cond`` = (B, L) long token ids.

**The null condition is the empty caption.** Condition dropout (training) and
classifier-free guidance (sampling) replace a caption by the tokens of ``""``
(all padding for :class:`WordTokenizer`; CLIP's ``<bos><eos><pad>...``) and
encode it like any caption. This is U-ViT's convention (its null context is the
CLIP embedding of the empty string); the backbone's own learned null token is
used only when a :class:`TextToImage` gets precomputed embeddings and no empty-
caption embedding.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .nn import Attention, Mlp

PAD, UNK = "<pad>", "<unk>"
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def split_words(text: str) -> list[str]:
    """Lower-case words and single punctuation marks: "A red, big ball." -> a red , big ball ."""
    return _WORD_RE.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer with a fixed output length.

    ``tokenizer(["a red circle"])`` -> (1, max_length) long ids, right-padded with
    ``<pad>`` (id 0); words outside the vocabulary map to ``<unk>`` (id 1);
    longer captions are truncated. The empty caption is all padding.
    """

    def __init__(self, vocab: Sequence[str], max_length: int):
        if list(vocab[:2]) != [PAD, UNK]:
            raise ValueError(f"vocab must start with {PAD!r}, {UNK!r}; build one with WordTokenizer.from_corpus(...)")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate words")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.vocab = list(vocab)
        self.max_length = max_length
        self.index = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.unk_id = 0, 1

    @classmethod
    def from_corpus(cls, captions: Iterable[str], max_length: int | None = None, min_count: int = 1,
                    extra_words: Iterable[str] = ()) -> "WordTokenizer":
        """Vocabulary of words seen at least ``min_count`` times (most frequent first, ties alphabetical).

        ``max_length`` defaults to the longest caption, in words.
        """
        counts: Counter[str] = Counter()
        longest = 0
        for caption in captions:
            words = split_words(caption)
            counts.update(words)
            longest = max(longest, len(words))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        words += [w for w in extra_words if w not in counts]
        if not words:
            raise ValueError("the caption corpus is empty: pass the training captions")
        return cls([PAD, UNK, *dict.fromkeys(words)], max_length if max_length is not None else longest)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(word, self.unk_id) for word in split_words(text)][: self.max_length]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("pass a list of captions, e.g. tokenizer([caption])")
        ids = torch.tensor([self.encode(text) for text in texts], dtype=torch.long)
        return ids.reshape(len(texts), self.max_length)  # keeps the shape for an empty list

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return " ".join(self.vocab[i] for i in ids if i != self.pad_id)

    def save(self, path: str | Path) -> None:
        state = {"type": "word", "max_length": self.max_length, "vocab": self.vocab}
        Path(path).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        state = json.loads(Path(path).read_text())
        if state.get("type") != "word":
            raise ValueError(f"{path} is not a WordTokenizer file (written by WordTokenizer.save)")
        return cls(state["vocab"], state["max_length"])


class TextBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Small text Transformer trained from scratch with the diffusion model: ids (B, L) -> (B, L, context_dim)."""

    def __init__(
        self,
        vocab_size: int,       # WordTokenizer.vocab_size
        max_length: int,       # WordTokenizer.max_length (learned positions)
        context_dim: int = 256,  # output width = the backbone's context_dim
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.vocab_size, self.max_length, self.context_dim = vocab_size, max_length, context_dim
        self.token_embed = nn.Embedding(vocab_size, context_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, context_dim))
        self.blocks = nn.ModuleList(TextBlock(context_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(context_dim)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @classmethod
    def for_tokenizer(cls, tokenizer: WordTokenizer, **kwargs) -> "TextEncoder":
        return cls(tokenizer.vocab_size, tokenizer.max_length, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.long or ids.ndim != 2 or ids.shape[1] != self.max_length:
            raise ValueError(f"TextEncoder expects (B, {self.max_length}) long token ids, got {ids.dtype} "
                             f"{tuple(ids.shape)}: tokenize captions with the tokenizer it was built for")
        if (ids < 0).any() or (ids >= self.vocab_size).any():
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}): the tokenizer and encoder disagree")
        x = self.token_embed(ids) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


_TRANSFORMERS_HELP = ("FrozenCLIPEncoder needs the optional dependency `transformers`: pip install transformers "
                      "(or pip install 'vitdiff[text]'). The CLIP weights must be a LOCAL folder (e.g. one saved with "
                      "CLIPTextModel.save_pretrained and CLIPTokenizer.save_pretrained); nothing is downloaded.")


class CLIPTokenizerAdapter:
    """``adapter(list[str]) -> (B, max_length) long ids``, CLIP's tokenizer padded to a fixed length."""

    def __init__(self, hf_tokenizer, max_length: int):
        self.hf_tokenizer = hf_tokenizer
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("pass a list of captions, e.g. tokenizer([caption])")
        return self.hf_tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")["input_ids"]


class FrozenCLIPEncoder(nn.Module):
    """CLIP's text Transformer, frozen, loaded from a local folder: ids (B, 77) -> last hidden states (B, 77, 768).

    ``encoder.tokenizer`` is the matching tokenizer; pass both to :class:`TextToImage`.
    """

    def __init__(self, path: str | Path, max_length: int = 77):
        super().__init__()
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP folder {str(path)!r} does not exist. {_TRANSFORMERS_HELP}")
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as error:
            raise ImportError(_TRANSFORMERS_HELP) from error
        try:
            self.model = CLIPTextModel.from_pretrained(path, local_files_only=True)
            hf_tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(f"could not load CLIP text model and tokenizer from {str(path)!r} ({error}). "
                                    f"{_TRANSFORMERS_HELP}") from error
        self.model.requires_grad_(False).eval()
        self.tokenizer = CLIPTokenizerAdapter(hf_tokenizer, max_length)
        self.context_dim = self.model.config.hidden_size

    def train(self, mode: bool = True) -> "FrozenCLIPEncoder":
        return super().train(False)  # frozen: dropout and the like stay off

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).last_hidden_state


class PrecomputedTextEmbeddings:
    """A folder of per-caption embeddings saved as ``.npy`` (U-ViT's layout for MS-COCO).

    Every ``*.npy`` file is one (L, D) caption embedding, listed in sorted file
    order (``embeddings[i]``, or ``embeddings["name"]`` by file stem);
    ``empty_context.npy``, if present, is the empty caption's embedding, the null
    condition for guidance (``embeddings.empty``).
    """

    EMPTY_NAME = "empty_context"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"embedding folder {str(self.directory)!r} does not exist: point it at a folder "
                                    "of per-caption .npy files (U-ViT's scripts/extract_*_feature.py layout)")
        files = sorted(self.directory.glob("*.npy"))
        self.files = [f for f in files if f.stem != self.EMPTY_NAME]
        if not self.files:
            raise FileNotFoundError(f"no caption .npy files in {str(self.directory)!r}")
        self.stems = {f.stem: i for i, f in enumerate(self.files)}
        empty = self.directory / f"{self.EMPTY_NAME}.npy"
        self.empty = self._load(empty) if empty.exists() else None

    def _load(self, path: Path) -> torch.Tensor:
        array = np.load(path)
        if array.ndim != 2:
            raise ValueError(f"{path} holds shape {array.shape}; each file must be one (L, D) caption embedding")
        return torch.from_numpy(np.asarray(array, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if isinstance(key, str):
            if key not in self.stems:
                raise KeyError(f"no embedding file {key}.npy in {self.directory}")
            key = self.stems[key]
        return self._load(self.files[key])

    @property
    def context_dim(self) -> int:
        return int(self[0].shape[-1])


class TextToImage(nn.Module):
    """A text-conditioned backbone behind the backbone interface: ``model(x, t, ids)``.

    Two modes:

    * ``text_encoder`` and ``tokenizer`` given: ``cond`` is (B, L) long token ids
      (``model.encode_prompts(captions)``); the encoder runs inside ``forward``,
      so a :class:`TextEncoder` trains jointly with the backbone. The null
      condition is the empty caption's tokens (module docstring).
    * both ``None``: ``cond`` is already (B, L, context_dim) embeddings (e.g. from
      :class:`PrecomputedTextEmbeddings`); ``null_context`` (the empty caption's
      embedding) is the null condition, else the backbone's learned null token.
    """

    is_conditional = True
    num_classes = 0

    def __init__(self, backbone: nn.Module, text_encoder: nn.Module | None = None, tokenizer=None, *,
                 null_context: torch.Tensor | None = None):
        super().__init__()
        if not getattr(backbone, "context_dim", 0):
            raise ValueError(f"{type(backbone).__name__} takes no text: build it with context_dim=... "
                             "(the text encoder's output width)")
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("pass both text_encoder and tokenizer (token ids in), or neither (embeddings in)")
        encoder_dim = getattr(text_encoder, "context_dim", None)
        if encoder_dim is not None and encoder_dim != backbone.context_dim:
            raise ValueError(f"text encoder outputs width {encoder_dim} but the backbone's context_dim is "
                             f"{backbone.context_dim}: build them with the same width")
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        if tokenizer is not None:
            self.register_buffer("empty_ids", tokenizer([""])[0], persistent=False)
        else:
            self.empty_ids = None
        if null_context is not None:
            if null_context.ndim != 2 or null_context.shape[-1] != backbone.context_dim:
                raise ValueError(f"null_context must be (L, {backbone.context_dim}), got {tuple(null_context.shape)}")
            self.register_buffer("null_context", null_context.float(), persistent=False)
        else:
            self.null_context = None

    # The attributes trainers and samplers read from a backbone.
    image_size = property(lambda self: self.backbone.image_size)
    in_channels = property(lambda self: self.backbone.in_channels)
    out_channels = property(lambda self: self.backbone.out_channels)
    learn_sigma = property(lambda self: self.backbone.learn_sigma)
    context_dim = property(lambda self: self.backbone.context_dim)
    patch_size = property(lambda self: getattr(self.backbone, "patch_size", 1))

    @property
    def takes_token_ids(self) -> bool:
        return self.text_encoder is not None

    def no_weight_decay(self) -> set[str]:
        """The backbone's exemptions (plus the text positions, alike), else the trainer's default rule for all."""
        if hasattr(self.backbone, "no_weight_decay"):
            names = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
            return names | ({"text_encoder.pos_embed"} if isinstance(self.text_encoder, TextEncoder) else set())
        return {name for name, param in self.named_parameters() if param.ndim < 2 or "pos_embed" in name}

    def set_gradient_checkpointing(self, enabled: bool = True) -> "TextToImage":
        self.backbone.set_gradient_checkpointing(enabled)
        return self

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Captions -> (B, L) long token ids on the model's device (the ``cond`` this model takes)."""
        if not self.takes_token_ids:
            raise ValueError("this TextToImage takes precomputed embeddings; build it with a text_encoder and "
                             "tokenizer to pass captions")
        return self.tokenizer(prompts).to(self.empty_ids.device)

    def encode_text(self, cond: torch.Tensor) -> torch.Tensor:
        """Token ids -> (B, L, context_dim) context; embeddings pass through."""
        if self.takes_token_ids:
            if cond.dtype != torch.long or cond.ndim != 2:
                raise ValueError(f"TextToImage expects (B, L) long token ids as cond (model.encode_prompts(captions)), "
                                 f"got {cond.dtype} {tuple(cond.shape)}")
            return self.text_encoder(cond)
        if cond.dtype == torch.long:
            raise ValueError("this TextToImage takes (B, L, context_dim) float embeddings, got token ids: "
                             "build it with a text_encoder and tokenizer to pass ids")
        return cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            raise ValueError("TextToImage needs cond: pass model.encode_prompts(captions), or "
                             "model.null_cond(ids) for unconditional samples")
        return self.backbone(x, t, self.encode_text(cond))

    def drop_cond(self, cond: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Replace the captions where ``drop`` (B,) is True by the empty caption (the null condition)."""
        if self.takes_token_ids:
            return torch.where(drop[:, None], self.empty_ids.to(cond.device), cond)
        if self.null_context is None:
            return self.backbone.drop_cond(cond, drop)
        return torch.where(drop[:, None, None], self.null_context.to(cond), cond)

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return self.drop_cond(cond, torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device))


__all__ = ["CLIPTokenizerAdapter", "FrozenCLIPEncoder", "PrecomputedTextEmbeddings", "TextEncoder", "TextToImage",
           "WordTokenizer", "split_words"]
