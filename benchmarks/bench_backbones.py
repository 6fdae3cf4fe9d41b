"""Training-step throughput against diffusers, and the fraction of the machine's matmul peak it reaches (MFU).

Rows, each in fp32 and in bf16 (``torch.autocast``, as ``train.precision=bf16``; the same precision on both
sides of a pair):

* ``DiT-S/2`` (12 layers, width 384, 6 heads, patch 2, 4x32x32 latents, 1000 classes, learned sigma) vs
  diffusers ``DiTTransformer2DModel`` at the same config;
* ``DDPM-UNet`` (Ho et al. CIFAR-10, 35.7M) vs diffusers ``UNet2DModel`` in the DDPM CIFAR-10 config;
* ``U-ViT-S/2`` (CIFAR-10) alone (peer and ratio null), for its MFU.

A step is forward + MSE backward + AdamW (``--optimizer``, the same on both sides). The two models of a pair
are timed alternately (ours, peer, ours, peer, ...) for ``--rounds`` rounds of ``--steps`` steps after
``--warmup`` untimed steps, so that load from other processes on a shared machine hits both; throughput is
the median over rounds and ``ratio`` is ours / peer images per second.

MFU: achieved training FLOP/s over the machine's matmul peak in the row's dtype, both measured here. A
training step costs 3 forwards (backward is two matmuls per forward one), a forward 2 FLOPs per
multiply-accumulate of :func:`vitdiff.models.catalog.count_gflops`; the peak is the median over the rounds
of the best of a few ``--peak-size``-square matmuls with this process's threads, timed between the models'
rounds so that it shares their load.

    python benchmarks/bench_backbones.py --quick --json       # the rows as JSON, < 10 min on 2 cores
    python benchmarks/bench_backbones.py --batch 16 --rounds 5 --precisions bf16 --memory
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitdiff.models import create_model  # noqa: E402
from vitdiff.models.catalog import count_gflops  # noqa: E402
from vitdiff.precision import autocast  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def diffusers_dit_s2():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def diffusers_ddpm_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, dropout=0.1, norm_eps=1e-6, downsample_padding=0)


class MatmulPeak:
    """The kernels' practical peak in one dtype: GFLOP/s of ``size``-square matmuls. Timed once per round
    between the models' rounds (best of ``repeats``), so that it sees the same machine load they do."""

    def __init__(self, precision: str, size: int, device: torch.device, repeats: int = 3):
        self.a, self.b = (torch.randn(size, size, device=device, dtype=DTYPES[precision]) for _ in range(2))
        self.device, self.repeats, self.flops = device, repeats, 2 * size**3
        self.a @ self.b  # warm-up: the BLAS / oneDNN kernel choice
        self.throughputs: list[float] = []   # GFLOP/s, one per round

    def time_round(self) -> None:
        best = float("inf")
        for _ in range(self.repeats):
            synchronize(self.device)
            start = time.perf_counter()
            self.a @ self.b
            synchronize(self.device)
            best = min(best, time.perf_counter() - start)
        self.throughputs.append(self.flops / best / 1e9)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """AdamW; ``kind``: for-loop (torch's CPU default), foreach (multi-tensor) or fused (one kernel)."""
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **flags)


class Runner:
    """One model, its optimiser and a fixed batch in one precision; ``step()`` is one training step."""

    def __init__(self, label: str, model: torch.nn.Module, call, batch: dict, precision: str, args):
        self.label = label                   # printed name
        self.device = torch.device(args.device)
        self.precision = precision           # fp32 | bf16: the forward's autocast
        self.model = model.to(self.device).train()
        if args.channels_last:               # a layout choice for both sides of a pair, not an architecture one
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(call) if args.compile else call
        self.batch = {k: v.to(self.device) for k, v in batch.items()}
        self.optimizer = make_optimizer(self.model, args.optimizer)
        self.throughputs: list[float] = []   # images per second, one per timed round
        self.peak_bytes = 0

    def step(self) -> None:
        with autocast(self.precision, self.device):
            out = self.forward(self.model, **self.batch)
        loss = F.mse_loss(out.float(), self.batch["target"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time_round(self, steps: int) -> None:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        self.throughputs.append(steps * self.batch["x"].shape[0] / (time.perf_counter() - start))

    def measure_memory(self) -> None:
        """Peak bytes of live tensors (weights, optimiser state, activations, gradients) over one step:
        ``torch.cuda.max_memory_allocated`` on CUDA, torch's dispatch-level ``MemTracker`` on CPU."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.step()
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(self.model, self.optimizer)
        with tracker:
            self.step()
        self.peak_bytes = tracker.get_tracker_snapshot("peak")[self.device]["Total"]

    @property
    def img_per_s(self) -> float:
        return statistics.median(self.throughputs)


def ours_call(model, x, t, target, y=None):
    return model(x, t, y)


def dit_peer_call(model, x, t, target, y):
    return model(x, timestep=t, class_labels=y).sample


def unet_peer_call(model, x, t, target):
    return model(x, t).sample


def pair_specs(batch: int) -> list[dict]:
    """What each row trains: our preset, the peer's builder and call (None: alone), and the batch."""
    latent = dict(x=torch.randn(batch, 4, 32, 32), t=torch.randint(0, 1000, (batch,)).float(),
                  y=torch.randint(0, 1000, (batch,)), target=torch.randn(batch, 8, 32, 32))
    pixels = dict(x=torch.randn(batch, 3, 32, 32), t=torch.randint(0, 1000, (batch,)).float(),
                  target=torch.randn(batch, 3, 32, 32))
    return [
        dict(model="DiT-S/2", peer="diffusers DiTTransformer2DModel", build_peer=diffusers_dit_s2,
             peer_call=dit_peer_call, batch=latent),
        dict(model="DDPM-UNet", peer="diffusers UNet2DModel", build_peer=diffusers_ddpm_unet,
             peer_call=unet_peer_call, batch=pixels),
        dict(model="U-ViT-S/2", peer=None, build_peer=None, peer_call=None, batch=pixels),
    ]


def run_row(spec: dict, precision: str, args) -> dict:
    torch.manual_seed(0)
    ours_model = create_model(spec["model"])
    flops_per_image = 3 * 2 * count_gflops(ours_model) * 1e9
    ours = Runner(f"vitdiff {spec['model']}", ours_model, ours_call, spec["batch"], precision, args)
    runners = [ours]
    if spec["peer"] and not args.no_peers:
        runners.append(Runner(spec["peer"], spec["build_peer"](), spec["peer_call"], spec["batch"], precision, args))
    for runner in runners:
        for _ in range(args.warmup):
            runner.step()
        if args.memory:
            runner.measure_memory()
    peak_meter = MatmulPeak(precision, args.peak_size, ours.device)
    for _ in range(args.rounds):
        for runner in runners:  # alternating, so that drifting load hits both
            runner.time_round(args.steps)
        peak_meter.time_round()
    peer = runners[1] if len(runners) > 1 else None
    peak = statistics.median(peak_meter.throughputs)
    gflops_per_s = ours.img_per_s * flops_per_image / 1e9
    row = {"model": spec["model"], "peer": peer.label if peer else None, "precision": precision, "ours_img_s": ours.img_per_s,
           "peer_img_s": peer.img_per_s if peer else None,
           "ratio": ours.img_per_s / peer.img_per_s if peer else None,
           "gflops_per_s": gflops_per_s, "peak_gflops_per_s": peak, "mfu": gflops_per_s / peak}
    if not args.json:
        rounds = "; ".join(f"{r.label}: " + ", ".join(f"{v:.2f}" for v in r.throughputs) for r in runners)
        memory = ("  peak mem " + ", ".join(f"{r.peak_bytes / 2**20:.0f} MiB" for r in runners)) if args.memory else ""
        ratio = f"ratio {row['ratio']:.3f}" if peer else "alone"
        print(f"{spec['model']:<10} {precision}  ours {ours.img_per_s:7.2f} img/s  "
              f"peer {row['peer_img_s'] or float('nan'):7.2f} img/s  {ratio}  {gflops_per_s:7.1f} GFLOP/s "
              f"= MFU {row['mfu']:.2f} of {peak:.0f}{memory}\n    rounds (img/s) {rounds}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 rounds of 1 step: minutes on 2 CPU cores")
    parser.add_argument("--json", action="store_true", help="print only the rows, as a JSON list")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per model")
    parser.add_argument("--steps", type=int, default=2, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--precisions", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--models", nargs="+", choices=["DiT-S/2", "DDPM-UNet", "U-ViT-S/2"],
                        default=["DiT-S/2", "DDPM-UNet", "U-ViT-S/2"])
    parser.add_argument("--optimizer", choices=["for-loop", "foreach", "fused"], default="fused",
                        help="AdamW implementation, both sides")
    parser.add_argument("--compile", action="store_true", help="torch.compile both forwards (inductor)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights, both sides")
    parser.add_argument("--no-peers", action="store_true", help="ours alone (MFU only; no diffusers needed)")
    parser.add_argument("--memory", action="store_true", help="also measure each model's peak memory of a step")
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak GFLOP/s")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.rounds, args.steps = 8, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.json:
        print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} batch={args.batch} "
              f"rounds={args.rounds}x{args.steps} optimizer={args.optimizer} compile={args.compile} "
              f"channels_last={args.channels_last} peak: {args.peak_size}^2 matmuls", flush=True)
    rows = [run_row(spec, precision, args)
            for spec in pair_specs(args.batch) if spec["model"] in args.models for precision in args.precisions]
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
