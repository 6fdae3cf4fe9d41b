"""Trainer overhead: ``Trainer.train_step`` against a bare forward + backward + AdamW loop.

Both run the same architecture, weights, optimizer settings and batch size; the
bare loop reuses one batch already on the device and draws its noise inline,
while the trainer also loads data, draws per-step seeded noise, computes the
gradient norm, checks for NaNs, updates the EMA and steps the LR schedule.
Rounds alternate (bare, trainer, bare, ...) so drifting machine load hits both;
the medians of the per-round step times give the ratio (CPU: process CPU time,
GPU: wall time). Target: < 5% overhead.

    python benchmarks/bench_trainer.py                      # IU-ViT-tiny, 32x32 digits, batch 32
    python benchmarks/bench_trainer.py --rounds 20 model.preset=U-ViT-S/2 data.batch_size=128
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitdiff.config import load_config  # noqa: E402
from vitdiff.precision import autocast  # noqa: E402
from vitdiff.trainer import Trainer, split_weight_decay  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, as for `vitdiff train`")
    parser.add_argument("--config", default=str(ROOT / "experiments" / "fmnist_tiny.yaml"))
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds per loop")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as out_dir:
        config = load_config(args.config, ["data.dataset=digits", "progress=false", "sample_every=0",
                                           f"out_dir={out_dir}", "resume=false", *args.overrides])
        trainer = Trainer(config)
        device = trainer.device
        model = copy.deepcopy(trainer.model)
        optimizer = torch.optim.AdamW(split_weight_decay(model, config.train.weight_decay), lr=config.train.lr,
                                      betas=tuple(config.train.betas))
        images, labels = next(iter(trainer.data.loader))
        x0 = images.to(device)
        cond = labels.to(device) if trainer.use_labels else None

        def bare_step() -> None:
            sigma = trainer.process.sample_sigma(x0.shape[0], device=device)
            with autocast(trainer.precision, device):
                loss = trainer.loss_fn.loss_at(model, x0, sigma, torch.randn_like(x0), cond).float().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        # On a shared CPU, this process's CPU time is far steadier than wall time (other jobs steal the cores
        # but not our CPU seconds); on a GPU only wall time means anything.
        clock = time.perf_counter if device.type == "cuda" else time.process_time

        def timed(step) -> float:
            synchronize(device)
            start = clock()
            for _ in range(args.steps):
                step()
            synchronize(device)
            return (clock() - start) / args.steps

        for step in (trainer.train_step, bare_step):  # warm-up: allocator, lazy init, caches; the trainer's first
            timed(step)                                 # step resolves train.precision, which both loops then use
        bare, full = [], []
        for _ in range(args.rounds):
            bare.append(timed(bare_step))
            full.append(timed(trainer.train_step))

    bare_ms, full_ms = 1e3 * statistics.median(bare), 1e3 * statistics.median(full)
    batch = config.data.batch_size
    print(f"model {config.model.preset} {config.model.overrides or ''}, batch {batch}, "
          f"{config.data.image_size or 'native'} px, device {device}, precision {trainer.precision}, "
          f"threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds x {args.steps} steps, clock: {'wall' if device.type == 'cuda' else 'process CPU'} time")
    print(f"bare loop : {bare_ms:8.2f} ms/step  {batch / bare_ms * 1e3:8.1f} img/s")
    print(f"trainer   : {full_ms:8.2f} ms/step  {batch / full_ms * 1e3:8.1f} img/s")
    print(f"ratio trainer/bare = {full_ms / bare_ms:.3f}  (overhead {100 * (full_ms / bare_ms - 1):+.1f}%; "
          f"round-to-round spread bare {1e3 * (max(bare) - min(bare)):.2f} ms, trainer "
          f"{1e3 * (max(full) - min(full)):.2f} ms)")


if __name__ == "__main__":
    main()
