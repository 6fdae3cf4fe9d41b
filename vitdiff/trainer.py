"""The training loop: ``Trainer(config).fit()``, or ``vitdiff train CONFIG [key=value ...]``.

Design:

* **Resume is bit-exact.** A checkpoint (:mod:`vitdiff.checkpoint`) holds model,
  EMA, optimizer, LR schedule, step, every RNG and the data position, so N steps
  straight equal N/2 steps + resume + N/2 steps, parameter for parameter, on CPU.
  A run resumes automatically when its ``out_dir`` holds ``last.pt``.
* **Per-example noise is a function of (seed, step, example).** Each step draws
  the diffusion times and noise for the whole global batch from a generator
  seeded by (seed, step), and every rank takes the rows of its own examples.
  With the data order of :class:`vitdiff.data.ResumableSampler` (rank r holds
  global-batch positions r, r + W, ...), one process and W processes see the
  same examples with the same noise, so DDP reproduces single-process losses.
* **The batch is global.** ``data.batch_size`` is the recipe's batch; each rank
  runs ``batch_size / (world_size * accumulate)`` examples per micro-batch.
* **Failures skip, not spoil.** A non-finite loss or gradient norm skips the
  optimizer and EMA update, and the count is logged (bf16 / fp16 NaNs); while
  steps are being skipped no checkpoint is written.
  ``train.max_consecutive_skips`` skips in a row, or a model that does not work
  at a save, stop the run as diverged (:class:`TrainingDiverged`, exit status 3).
* **Only a working model is saved.** Before a save the raw and EMA models run on
  a probe batch (the first training images at the process's smallest, middle and
  largest noise level, noise from the probe's own generator, in eval mode: no
  training randomness is touched); a non-finite weight, output or loss is
  divergence. Every save is thus verified and also linked as ``last.good.pt``,
  which rotation never removes; the divergence message names it, and resume and
  ``vitdiff sample`` / ``eval`` fall back to it. A resumed model is probed too.
* **One writer per run directory.** Rank 0 holds an OS lock on ``out_dir``
  (``fcntl.flock``, gone when the process dies) from resume to the end of
  ``fit``; a second trainer on the same directory stops with the holder's pid.
* **Resume refuses a changed recipe.** Only the keys in :data:`RESUMABLE_CHANGES`
  may differ from the checkpoint's config (``train.lr`` is applied to the
  restored optimizer, ``train.grad_clip`` at the next step); any other
  difference is listed and the run stops.
* **EMA warm-up.** The EMA decay after n updates is min(decay, (1+n)/(10+n)),
  so the EMA of a 300-step notebook run is already a usable model.
* **Stopping is safe.** SIGINT / SIGTERM set a flag; the loop saves a checkpoint
  at the next step boundary and returns (exit status 128 + signal number). A
  second signal stops at once, in one line (:class:`TrainingInterrupted`); during
  a save it waits for the save to finish (a third interrupts it, and the
  previous checkpoint stays).
* The LR warms up linearly from lr/warmup_steps (the first step already
  learns; U-ViT's schedule starts at 0) to lr, then stays constant.

**Text.** When the data set has captions the model is
:class:`vitdiff.text.TextToImage` (backbone + text encoder + tokenizer, see the
config's ``text`` section): the loop tokenizes each batch's captions and
condition dropout replaces them by the empty caption. The word tokenizer is
built from the training captions and saved in the checkpoint as JSON (with the
default sample prompts), so ``vitdiff sample CKPT --prompt "..."`` needs only
the file.

Rank 0 alone writes ``metrics.jsonl`` (one JSON record per ``log_every`` steps; a
non-finite value is written as null), sample grids (``samples/step_XXXXXXX.png``,
from the EMA model) and checkpoints. A file the trainer rewrites (checkpoints,
``config.yaml``, the trimmed ``metrics.jsonl``, sample grids) is replaced atomically.
Launch DDP with ``torchrun --nproc_per_node=N -m vitdiff.trainer CONFIG``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from . import checkpoint as ckpt
from .build import (batch_condition, build_diffusion, build_model, build_tokenizer, caption_corpus, check_names,
                    dataset_labels, load_experiment, takes_text, tokenizer_to_json)
from .cli import run_command
from .config import Config, ConfigError, UserError
from .diffusion import preconditioned_output
from .generate import generate

# Config keys a resumed run may change: bookkeeping, numerics-preserving switches, where the data lies, the lr (set
# on the restored optimizer) and gradient clipping (the ways out of a divergence), and the sample/eval sections
# (prefixes), which do not touch training. Every other key must equal the checkpoint's.
RESUMABLE_CHANGES = ("name", "out_dir", "resume", "profile", "train.steps", "train.lr", "train.grad_clip",
                     "train.log_every", "train.ckpt_every", "train.sample_every", "train.progress",
                     "train.max_consecutive_skips",
                     "train.compile", "train.grad_checkpointing", "data.root", "data.num_workers", "sample.", "eval.")


class TrainingDiverged(UserError):
    """Non-finite steps or weights: the run stops without saving them (exit status 3)."""
    exit_status = 3


class TrainingInterrupted(UserError):
    """A second SIGINT / SIGTERM: the run stops at once (exit status 128 + signal number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


PROBE_IMAGES = 4  # training images of the probe batch, each at each of the probe's noise levels


def ema_decay_at(updates: int, decay: float, warmup: bool) -> float:
    """EMA decay for the update after ``updates`` previous ones: min(decay, (1+n)/(10+n)) with warm-up."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class WarmupEMA:
    """``multi_avg_fn`` for AveragedModel: ema <- ema + (1 - decay_n) (param - ema), decay_n warming up.

    AveragedModel copies the parameters on its first update and calls this from the
    second on, passing how many updates came before (a tensor, read once per call on the host
    through the Python counter kept here, to avoid a device sync).
    """

    def __init__(self, decay: float, warmup: bool):
        self.decay, self.warmup, self.updates = decay, warmup, 1

    @torch.no_grad()
    def __call__(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], _num_averaged) -> None:
        torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay_at(self.updates, self.decay, self.warmup))
        self.updates += 1


def split_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and what the model exempts (its ``no_weight_decay()`` names,
    else biases, norm weights and position embeddings: every tensor with fewer than two dims or 'pos_embed')."""
    exempt_names = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else None
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if exempt_names is not None:
            exempt = name in exempt_names or any(name.startswith(prefix + ".") for prefix in exempt_names)
        else:
            exempt = param.ndim < 2 or "pos_embed" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of one step's per-example randomness: the same on every rank."""
    return torch.Generator(device).manual_seed((seed * 0x9E3779B1 + step) % (2**63))


# -- distributed --------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); joins the process group when launched by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0))


class Trainer:
    def __init__(self, config: Config, *, progress: bool | None = None):
        check_names(config)
        self.config = config
        train = config.train
        self.rank, self.world_size, local_rank = _init_distributed()
        self.is_main = self.rank == 0
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.show_progress = (train.progress if progress is None else progress) and self.is_main
        self.out_dir = Path(config.out_dir)

        per_step = self.world_size * train.accumulate
        if config.data.batch_size % per_step:
            raise ConfigError(f"data.batch_size={config.data.batch_size} is not divisible by world_size x accumulate "
                              f"= {self.world_size} x {train.accumulate}: pick a batch size that is")
        self.micro_batch = config.data.batch_size // per_step

        self.dataset = self._make_dataset()
        self.text = takes_text(config)
        tokenizer, self.sample_prompts = None, None
        if self.text:
            captions = caption_corpus(self.dataset)
            tokenizer = build_tokenizer(config, captions)
            self.sample_prompts = list(config.sample.prompts or captions[: config.sample.n])

        # Model init is seeded identically everywhere (DDP also broadcasts rank 0's weights);
        # dropout and other in-model randomness then differ per rank.
        _seed_everything(train.seed)
        self.model = build_model(config, tokenizer).to(self.device)
        _seed_everything(train.seed + self.rank)
        if train.grad_checkpointing:
            self.model.set_gradient_checkpointing(True)
        self.process, self.loss_fn = build_diffusion(config)
        self.ema_fn = WarmupEMA(train.ema_decay, train.ema_warmup)
        self.ema = AveragedModel(self.model, multi_avg_fn=self.ema_fn)
        self.ema.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(split_weight_decay(self.model, train.weight_decay), lr=train.lr,
                                           betas=tuple(train.betas))
        warmup = train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)

        forward_model: nn.Module = self.model
        if self.world_size > 1:
            forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward_model = torch.compile(forward_model) if train.compile else forward_model
        self.use_labels = bool(getattr(self.model, "num_classes", 0))
        if getattr(self.model, "context_dim", 0) and not self.text:
            raise ConfigError(f"model {config.model.preset!r} takes text but {config.data.dataset!r} has no captions: "
                              "train it on a captioned data set (shapes, cub200, captions) or set model.context_dim=0")
        if self.use_labels and dataset_labels(config) is None:
            raise ConfigError(f"the model is class-conditional (num_classes={self.model.num_classes}) but "
                              f"{config.data.dataset!r} has no class labels: train it unconditionally "
                              "(model.num_classes=0)")
        if config.diffusion.cond_drop_prob > 0 and not (self.use_labels or self.text):
            raise ConfigError("diffusion.cond_drop_prob > 0 needs a conditional model: set model.num_classes "
                              "(e.g. model.num_classes=10), train on captions, or set diffusion.cond_drop_prob=0")

        self.data = self._make_stream(self.dataset)
        self.step = 0
        self.skipped_steps = 0
        self.precision: str | None = None  # fp32 or bf16, resolved from train.precision at the first step
        self.consecutive_skips = 0
        self._stop_signal: int | None = None
        self._saving = False
        self._interrupt_after_save: int | None = None
        self._probe: tuple | None = None
        self.saved_step: int | None = None  # the step of the checkpoint this process last wrote or resumed from
        self._good_step: int | None = None  # the step of last.good.pt, where known
        self._lock = None
        if config.resume is True and ckpt.latest_path(self.out_dir) is None:  # before the lock creates out_dir
            raise FileNotFoundError(f"resume=true but {self.out_dir} has no checkpoint (last.pt)")
        self._hold_run_directory()
        self._resume()

    # -- setup ------------------------------------------------------------------------------------
    def _make_dataset(self):
        from .data import make_dataset

        section = self.config.data
        dataset = make_dataset(section.dataset, root=section.root, image_size=section.image_size, train=True,
                               flip=section.flip, seed=self.config.train.seed)
        if len(dataset) < section.batch_size:
            raise ConfigError(f"dataset {section.dataset!r} has {len(dataset)} training images, fewer than "
                              f"data.batch_size={section.batch_size}")
        return dataset

    def _make_stream(self, dataset):
        from .data import DataStream, make_loader

        loader = make_loader(dataset, self.micro_batch, seed=self.config.train.seed,
                             num_workers=self.config.data.num_workers, rank=self.rank, world_size=self.world_size)
        return DataStream(loader)

    def _hold_run_directory(self) -> None:
        """Rank 0 locks out_dir (until fit ends or the process dies) and removes what interrupted saves left."""
        if not self.is_main or self._lock is not None:
            return
        self._lock = ckpt.lock_run_directory(self.out_dir)
        for path in ckpt.remove_stale_temporaries(self.out_dir):
            print(f"removed {path}, left by an interrupted save", file=sys.stderr)

    def _release_run_directory(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _resume(self) -> None:
        resume = self.config.resume
        found = ckpt.latest_path(self.out_dir)
        if resume is False and found is not None:
            raise ConfigError(f"{self.out_dir} already holds a checkpoint ({found.name}) and resume=false: "
                              "pass resume=true to continue it, or choose another out_dir")
        if found is None:
            return
        state, path = ckpt.load_latest(self.out_dir, map_location=self.device)
        changed = self._restore(state, path)
        good = self.out_dir / ckpt.GOOD
        if not self._model_works():
            broken = f"{path} (step {self.step}) holds a model whose output or loss is not finite (it diverged before " \
                     "it was saved)"
            if not good.is_file() or os.path.samefile(good, path):
                raise TrainingDiverged(f"{broken} and there is no verified {ckpt.GOOD}: train in another out_dir")
            warnings.warn(f"{broken}; using the last good checkpoint {good} instead")
            path = good
            changed = self._restore(ckpt.load_checkpoint(good, map_location=self.device), good)
            if not self._model_works():  # a good checkpoint was verified when saved: only damage gets here
                raise TrainingDiverged(f"{good} (step {self.step}) does not work either: train in another out_dir")
        if path.name != ckpt.LAST and (self.out_dir / ckpt.LAST).exists() and self.is_main:
            # Out of the way, so the next save does not rotate it over the good checkpoint; kept for inspection.
            os.replace(self.out_dir / ckpt.LAST, self.out_dir / "last.unusable.pt")
            print(f"moved the unusable {ckpt.LAST} to last.unusable.pt", file=sys.stderr)
        self.saved_step = self.step
        if good.is_file() and os.path.samefile(good, path):
            self._good_step = self.step
        if self.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)
            if changed:
                print("changed on resume: " + "; ".join(f"{key} {old!r} -> {new!r}"
                                                        for key, (old, new) in changed.items()), file=sys.stderr)

    def _restore(self, state: dict, path: Path) -> dict[str, tuple[Any, Any]]:
        """Load a checkpoint's state into the run (model, EMA, optimizer, schedule, data position, step, RNGs);
        returns the config keys that changed ({key: (saved, now)})."""
        changed = self._check_compatible(state["config"])
        saved_tokenizer = state.get("text", {}).get("tokenizer")
        if saved_tokenizer != tokenizer_to_json(getattr(self.model, "tokenizer", None)):
            raise ConfigError(f"the checkpoint in {self.out_dir} was trained with another vocabulary than the "
                              "training captions give now: use the original data, or another out_dir")
        if state["world_size"] != self.world_size:
            raise ConfigError(f"{path} was written by {state['world_size']} processes and this run has "
                              f"{self.world_size}: resume with --nproc_per_node={state['world_size']} (each rank "
                              "continues its own data order and RNG streams)")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema_fn.updates = max(1, int(self.ema.n_averaged))  # AveragedModel's first update is a copy
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "train.lr" in changed:  # the restored schedule continues from the new base lr
            self.scheduler.base_lrs = [self.config.train.lr] * len(self.optimizer.param_groups)
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for group in self.optimizer.param_groups:
                group["initial_lr"], group["lr"] = self.config.train.lr, self.config.train.lr * factor
        self.data.load_state_dict(state["data"][self.rank])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        self.precision = state.get("precision")  # a resumed run keeps the precision `auto` chose (None: choose now)
        ckpt.restore_rng_state(state["rng"][self.rank])
        return changed

    def _check_compatible(self, saved: dict) -> dict[str, tuple[Any, Any]]:
        """The changed keys ({key: (saved, now)}) if all are in RESUMABLE_CHANGES; else a ConfigError listing the rest.
        Keys a checkpoint predates count with their defaults."""
        defaults = Config().to_dict()
        before = _flatten({**defaults, **{key: {**defaults[key], **value} if isinstance(defaults.get(key), dict) else value
                                          for key, value in saved.items()}})
        now = _flatten(self.config.to_dict())
        changed = {key: (before.get(key, "<unset>"), now.get(key, "<unset>")) for key in sorted({*before, *now})
                   if before.get(key, "<unset>") != now.get(key, "<unset>")}
        refused = [key for key in changed if not any(key == safe or (safe.endswith(".") and key.startswith(safe))
                                                     for safe in RESUMABLE_CHANGES)]
        if refused:
            raise ConfigError(f"the checkpoint in {self.out_dir} was trained with another config: "
                              + "; ".join(f"{key} saved {changed[key][0]!r}, now {changed[key][1]!r}" for key in refused)
                              + ". Resume with the saved values, or train in another out_dir. (These may change on "
                              "resume: " + ", ".join(f"{key}*" if key.endswith(".") else key for key in RESUMABLE_CHANGES)
                              + ")")
        return {key: value for key, value in changed.items() if key not in ("out_dir", "resume")}

    # -- one step ---------------------------------------------------------------------------------
    def _step_randomness(self, x_shape: torch.Size) -> dict[str, torch.Tensor]:
        """This rank's rows of the step's noise levels, noise and condition-drop draws for the global batch,
        indexed [micro-batch, example].

        Micro-batch m of rank r holds global examples m*G + r + j*W (the sampler strides ranks), so the
        rows are sliced the same way; a single process (W = 1) takes them all.
        """
        generator = step_generator(self.config.train.seed, self.step, self.device)
        total = self.config.data.batch_size
        draws = self.loss_fn.draw(total, x_shape[1:], generator=generator, device=self.device)
        rows = torch.arange(total, device=self.device).view(self.config.train.accumulate, -1)
        rows = rows[:, self.rank::self.world_size]
        return {name: value[rows] for name, value in draws.items()}

    def _micro_loss(self, x0: torch.Tensor, cond: torch.Tensor | None, sigma: torch.Tensor,
                    noise: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Mean loss of one micro-batch at given noise; the loss itself stays fp32 under bf16 autocast."""
        from .precision import autocast, resolve_precision

        if self.config.diffusion.cond_drop_prob > 0:
            cond = self.model.drop_cond(cond, drop)
        if self.precision is None:  # resolved once, on the first micro-batch: `auto` times this very batch

            def probe(precision: str) -> None:
                with autocast(precision, self.device):
                    per_example = self.loss_fn.loss_at(self.model, x0, sigma, noise, cond)
                per_example.float().mean().backward()

            self.precision = resolve_precision(self.config.train.precision, self.device, self.model, probe)
        with autocast(self.precision, self.device):
            per_example = self.loss_fn.loss_at(self.forward_model, x0, sigma, noise, cond)
        return per_example.float().mean()

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step over ``accumulate`` micro-batches: (global mean loss, grad norm, stop requested)."""
        accumulate = self.config.train.accumulate
        self.optimizer.zero_grad(set_to_none=True)
        draws = None
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accumulate):
            images, targets = next(self.data)
            x0 = images.to(self.device, non_blocking=True)
            cond = batch_condition(self.model, targets, self.device)
            if draws is None:
                draws = self._step_randomness(x0.shape)
            last = micro == accumulate - 1
            no_sync = self.forward_model.no_sync() if (self.world_size > 1 and not last) else contextlib.nullcontext()
            with no_sync:
                loss = self._micro_loss(x0, cond, **{name: value[micro] for name, value in draws.items()}) / accumulate
                loss.backward()
            loss_sum += loss.detach()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        if self.config.train.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.config.train.grad_clip, grad_norm)
        # Loss and stop votes are summed over ranks (the gradient norm already is global after DDP's all-reduce);
        # one host sync per step reads all three.
        stop = torch.tensor(float(self._stop_signal is not None), device=self.device)
        summary = torch.stack([loss_sum / self.world_size, stop])
        if self.world_size > 1:
            dist.all_reduce(summary)
        loss_value, stop_votes, norm_value = torch.cat([summary, grad_norm.reshape(1).to(summary)]).tolist()
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
            self.ema.update_parameters(self.model)
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        self.scheduler.step()
        self.step += 1
        return loss_value, norm_value, stop_votes > 0

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``; returns the last logged record plus ``stopped_by_signal``.

        Raises :class:`TrainingDiverged` after ``train.max_consecutive_skips`` non-finite steps in a row, when the
        model to save does not work (non-finite weights, or output or loss on the probe batch), or when the run
        ends while steps are being skipped; ``last.good.pt`` is then the last good model."""
        self._hold_run_directory()
        try:
            return self._fit()
        finally:
            self._release_run_directory()

    def _fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        train = self.config.train
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_atomically(self.out_dir / "config.yaml",
                                  lambda handle: handle.write(_to_yaml(self.config.to_dict()).encode()))
            self._trim_metrics_log()
        self.model.train()
        record: dict[str, Any] = {"step": self.step}
        window_loss, window_norm, window_steps, window_start = 0.0, 0.0, 0, time.perf_counter()
        images_per_step = self.config.data.batch_size
        # A text bar on stderr, not a notebook widget: a terminal, a notebook, a saved notebook and
        # `papermill --log-output` all show it. Off a terminal it redraws every 10 s, so logs stay short.
        bar = tqdm(total=train.steps, initial=self.step, disable=not self.show_progress, dynamic_ncols=True,
                   desc=self.config.name, unit="step", mininterval=0.1 if sys.stderr.isatty() else 10.0)
        stop_requested = False
        with self._signal_handlers(), bar:
            while self.step < train.steps and not stop_requested:
                loss, grad_norm, stop_requested = self.train_step()
                window_loss, window_norm, window_steps = window_loss + loss, window_norm + grad_norm, window_steps + 1
                bar.update(1)
                diverged = self.consecutive_skips >= train.max_consecutive_skips
                if self.step % train.log_every == 0 or self.step == train.steps or stop_requested or diverged:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": self.step, "loss": window_loss / window_steps,
                              "lr": self.scheduler.get_last_lr()[0], "grad_norm": window_norm / window_steps,
                              "img_per_s": images_per_step * window_steps / max(elapsed, 1e-9),
                              "skipped_steps": self.skipped_steps, "precision": self.precision}
                    self._log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.0f}")
                    window_loss, window_norm, window_steps, window_start = 0.0, 0.0, 0, time.perf_counter()
                if diverged:
                    raise self._diverged(f"{self.consecutive_skips} steps in a row had a non-finite loss or gradient "
                                         "norm (train.max_consecutive_skips)")
                if train.sample_every and self.step % train.sample_every == 0:
                    self.save_samples()
                if self.step % train.ckpt_every == 0 or self.step == train.steps or stop_requested:
                    self.save()
        if self.saved_step != self.step and not stop_requested:
            raise self._diverged(f"the run ended while steps were being skipped ({self.consecutive_skips} in a row), "
                                 "so its last model was not saved")
        record["stopped_by_signal"] = self._stop_signal
        return record

    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGINT/SIGTERM -> save at the next step boundary; a second one stops at once (after the save under way)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_signal is not None:
                if self._saving and self._interrupt_after_save is None:
                    self._interrupt_after_save = signum
                    print(f"\n{signal.Signals(signum).name}: stopping once the checkpoint is written (send it again "
                          "to abandon the save; the previous checkpoint stays)", file=sys.stderr)
                    return
                raise self._interrupted(signum)
            self._stop_signal = signum
            if self.is_main:
                print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                      "(send it again to stop at once)", file=sys.stderr)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- outputs ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = [ckpt.capture_rng_state()]
        data = [self.data.state_dict()]
        if self.world_size > 1:
            gathered: list = [None] * self.world_size
            dist.all_gather_object(gathered, (rng[0], data[0]))
            rng, data = [g[0] for g in gathered], [g[1] for g in gathered]
        text = {"tokenizer": tokenizer_to_json(getattr(self.model, "tokenizer", None)),
                "sample_prompts": self.sample_prompts}
        return {"step": self.step, "skipped_steps": self.skipped_steps, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng, "data": data,
                "config": self.config.to_dict(), "world_size": self.world_size, "text": text,
                "precision": self.precision}

    def save(self) -> Path | None:
        """Write a verified checkpoint (also linked as last.good.pt); None on ranks > 0, and while steps are being
        skipped (the weights may be on their way to overflow: the last good checkpoint stays)."""
        if self.consecutive_skips:  # the same on every rank (the loss is all-reduced), so all skip the collectives
            if self.is_main:
                print(f"step {self.step}: no checkpoint, the last {self.consecutive_skips} steps were skipped "
                      f"(non-finite loss or gradient norm); {self.kept_checkpoint()}", file=sys.stderr)
            return None
        state = self.state_dict()  # collective in DDP: every rank takes part
        # Checked on every rank (the weights are the same), so all ranks stop together.
        bad = ckpt.non_finite_weights(state)
        if bad:
            raise self._diverged(f"{len(bad)} weight tensors are not finite (e.g. {bad[0]}): not saved")
        if not self._model_works():
            raise self._diverged("the raw or EMA model gives a non-finite output or loss on the probe batch: not "
                                 "saved")
        path = None
        if self.is_main:
            self._saving = True
            try:
                path = ckpt.save_checkpoint(state, self.out_dir, verified=True)
            finally:
                self._saving = False
        self.saved_step = self._good_step = self.step
        if self._interrupt_after_save is not None:
            raise self._interrupted(self._interrupt_after_save)
        return path

    def _model_works(self) -> bool:
        """Whether the raw and the EMA model give a finite output and loss on the probe batch (on every rank).

        RNG-neutral: the probe's noise has its own generator, and eval mode turns dropout off."""
        x0, sigma, noise, cond = self._probe_batch()
        works = True
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            for model in (self.model, self.ema.module):
                was_training = model.training
                model.eval()
                try:
                    x = x0 + sigma.view(-1, *[1] * (x0.ndim - 1)) * noise
                    output = preconditioned_output(model, self.process, x, sigma, cond)
                    loss = self.loss_fn.loss_at(model, x0, sigma, noise, cond)
                    works = works and bool(torch.isfinite(output).all()) and bool(torch.isfinite(loss).all())
                finally:
                    model.train(was_training)
        if self.world_size > 1:  # one verdict for all ranks, so they stop (or save) together
            verdict = torch.tensor(float(works), device=self.device)
            dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
            works = bool(verdict.item())
        return works

    def _probe_batch(self) -> tuple:
        """(x0, sigma, noise, cond): the first PROBE_IMAGES training images, each at the process's smallest, middle
        (geometric) and largest noise level, with noise of a generator of their own; built once."""
        if self._probe is None:
            from torch.utils.data import default_collate

            low, high = self.process.sigma_min, self.process.sigma_max
            levels = torch.tensor([low, math.sqrt(low * high), high])
            count = min(PROBE_IMAGES, len(self.dataset))
            images, targets = default_collate([self.dataset[i] for i in range(count)] * len(levels))
            x0 = images.to(self.device)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.config.train.seed))
            self._probe = (x0, levels.repeat_interleave(count).to(self.device), noise.to(self.device),
                           batch_condition(self.model, targets, self.device))
        return self._probe

    def kept_checkpoint(self) -> str:
        """Which checkpoint a stopped run leaves to go back to: the verified last.good.pt, else (a run directory
        from before verification) the newest one."""
        good = self.out_dir / ckpt.GOOD
        if good.is_file():
            step = f" (step {self._good_step})" if self._good_step is not None else ""
            return f"the last good checkpoint {good}{step} is kept"
        found = ckpt.latest_path(self.out_dir)
        return f"the last checkpoint {found} is kept" if found else "no checkpoint was saved"

    def _diverged(self, reason: str) -> TrainingDiverged:
        return TrainingDiverged(f"training diverged at step {self.step}: {reason}; {self.kept_checkpoint()}. Run "
                                "again with a lower train.lr or a train.grad_clip (both may change on resume)")

    def _interrupted(self, signum: int) -> TrainingInterrupted:
        return TrainingInterrupted(f"stopped at once at step {self.step} by a second {signal.Signals(signum).name}; "
                                   f"{self.kept_checkpoint()}", signum)

    def save_samples(self) -> Path | None:
        """A grid from the EMA model; seeded and RNG-neutral, so it does not perturb training."""
        if not self.is_main:
            return None
        from torchvision.utils import save_image

        path = self.out_dir / "samples" / f"step_{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator(self.device).manual_seed(self.config.train.seed)
        images = generate(self.ema.module, self.process, self.config, n=self.config.sample.n,
                          generator=generator, device=self.device, prompts=self.sample_prompts)
        grid = (images + 1) / 2
        # Atomic: a resumed run rewrites the grids of the steps after its checkpoint.
        ckpt.write_atomically(path, lambda handle: save_image(grid, handle, format="png",
                                                               nrow=math.ceil(math.sqrt(len(images)))))
        return path

    def _log(self, record: dict[str, Any]) -> None:
        """Append a record; non-finite numbers become null (strict JSON readers refuse NaN and Infinity)."""
        if self.is_main:
            finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                      for key, value in record.items()}
            with open(self.out_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(finite, allow_nan=False) + "\n")

    def _trim_metrics_log(self) -> None:
        """Drop records past the resumed step (a crash after logging, before the checkpoint), so steps stay unique."""
        log = self.out_dir / "metrics.jsonl"
        if not log.exists():
            return
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a process killed while appending leaves a torn last line
                warnings.warn(f"{log}: dropped an unreadable line (a run killed while logging?): {line[:80]!r}")
                continue
            if record.get("step", 0) <= self.step:
                kept.append(line)
        if len(kept) != len(lines):  # replaced, not rewritten in place: a kill here keeps the old log
            ckpt.write_atomically(log, lambda handle: handle.write("".join(line + "\n" for line in kept).encode()))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; an empty mapping stays a value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _to_yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vitdiff train", description="Train a backbone from an experiments/*.yaml config.",
        epilog="Overrides are key=value with YAML values, e.g. steps=2000 train.lr=1e-4 data.batch_size=64 "
               "tiny=true (CPU-sized run of the same experiment) resume=true. "
               "DDP: vitdiff train --nproc-per-node=N CONFIG ... (one machine), or torchrun --nproc_per_node=N "
               "-m vitdiff.trainer CONFIG ...")
    parser.add_argument("config", help="experiment YAML (experiments/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="DDP on this machine: launch this many ranks (torchrun --standalone)")
    args = parser.parse_args(argv)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        from .cli import launch_ranks

        return launch_ranks("vitdiff.trainer", [args.config, *args.overrides], args.nproc_per_node)

    def train() -> int:
        try:
            trainer = Trainer(load_experiment(args.config, args.overrides))
            result = trainer.fit()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        if trainer.is_main and trainer.saved_step == trainer.step:
            print(f"step {trainer.step}: checkpoint {trainer.out_dir / ckpt.LAST}", file=sys.stderr)
        elif trainer.is_main:
            print(f"step {trainer.step}: not saved (steps were being skipped); {trainer.kept_checkpoint()}",
                  file=sys.stderr)
        return 128 + result["stopped_by_signal"] if result["stopped_by_signal"] else 0

    return run_command("vitdiff train", train)


if __name__ == "__main__":
    sys.exit(main())
