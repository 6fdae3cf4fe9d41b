"""Training precision: ``fp32``, or ``bf16`` autocast around the model's forward; ``auto`` chooses one.

Under ``bf16`` only the model's matmuls and convolutions run in bf16 (``torch.autocast``); the weights,
gradients, loss, EMA and AdamW state stay fp32, so there is no loss scaling and nothing to convert in a
checkpoint.

``auto`` takes bf16 where the device computes it natively *and* it is faster for the model at hand:

* CUDA: bf16 when the GPU supports it (Ampere and later); there every backbone here gains from it.
* CPU: bf16 only with native bf16 matmuls (AVX512-BF16 or AMX through oneDNN), and then only when a short
  probe of the run's own first micro-batch finds the bf16 training step at least ``PROBE_MARGIN`` times
  faster. No rule by device alone works: on a 2-core EPYC with avx512_bf16 (issue 11) U-ViT-S/2 trains
  2.75x faster in bf16, UNet-tiny 1.38x, but IU-ViT-tiny 0.91x and ASCEND-H-tiny 0.68x (casts and small
  GEMMs dominate at width 96); ``benchmarks/bench_notebook.py`` measures the workbook's models.

The precision a run used is recorded with its results (each ``metrics.jsonl`` record has ``precision``).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
import torch.distributed as dist

from .config import PRECISIONS

PROBE_MARGIN = 1.1      # bf16 must beat fp32 by 10%: less is within a short probe's timing noise on a shared CPU
PROBE_ROUNDS = 3        # timed steps per precision, alternating, after one untimed warm-up step each


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware (CPU: oneDNN's AVX512-BF16 / AMX check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def autocast(precision: str, device: torch.device):
    """The forward's context for a resolved precision (``fp32`` or ``bf16``)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast needs a resolved precision, fp32 or bf16, not {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def resolve_precision(precision: str, device: torch.device, model: torch.nn.Module,
                      training_step: Callable[[str], None]) -> str:
    """``fp32`` or ``bf16`` for a run configured with ``precision``.

    ``training_step(p)`` runs one forward and backward of ``model`` in resolved precision ``p``; ``auto`` times
    it on CPUs with native bf16. The probe leaves no trace: the RNG state is restored and the gradients it
    made are dropped (call it where ``model``'s gradients are None, i.e. after ``zero_grad(set_to_none=True)``).
    Under DDP every rank takes rank 0's choice."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if not native_bf16(device):
        choice = "fp32"
    elif device.type == "cuda":
        choice = "bf16"
    else:
        with torch.random.fork_rng(devices=[]):
            seconds = _time_alternating(training_step, ("fp32", "bf16"))
        for param in model.parameters():
            param.grad = None
        choice = "bf16" if seconds["fp32"] >= PROBE_MARGIN * seconds["bf16"] else "fp32"
    if dist.is_initialized() and dist.get_world_size() > 1:
        shared = [choice]
        dist.broadcast_object_list(shared, src=0)
        choice = shared[0]
    return choice


def _time_alternating(step: Callable[[str], None], precisions: tuple[str, ...]) -> dict[str, float]:
    """Fastest of ``PROBE_ROUNDS`` wall-clock timings of ``step(p)`` per precision, alternated so that load from
    other processes hits both (the fastest round is the one least disturbed)."""
    for precision in precisions:
        step(precision)   # warm-up: oneDNN picks and caches its kernels per dtype and shape
    best = {precision: float("inf") for precision in precisions}
    for _ in range(PROBE_ROUNDS):
        for precision in precisions:
            start = time.perf_counter()
            step(precision)
            best[precision] = min(best[precision], time.perf_counter() - start)
    return best
