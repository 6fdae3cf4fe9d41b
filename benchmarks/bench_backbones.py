"""Training-step throughput and peak memory: vitdiff's DiT-S/2 and DDPM U-Net against diffusers.

Pairs, each at one configuration:

* ``DiT-S/2`` (12 layers, width 384, 6 heads, patch 2, 4x32x32 latents, 1000 classes,
  learned sigma) vs diffusers ``DiTTransformer2DModel`` at the same config;
* ``DDPM-UNet`` (Ho et al. CIFAR-10, 35.7M) vs diffusers ``UNet2DModel`` in the DDPM
  CIFAR-10 config.

A step is forward + MSE backward + AdamW. Models are timed alternately (ours, peer,
ours, peer, ...) for ``--rounds`` rounds of ``--steps`` steps after a warm-up, so that
load from other processes on a shared machine hits both; the reported throughput is
the median over rounds and the ratio is ours / peer images per second.

Peak memory: bytes of live tensors at the peak of one step (weights, AdamW state,
activations, gradients): ``torch.cuda.max_memory_allocated`` on CUDA, torch's
``MemTracker`` (a dispatch-level tensor tracker) on CPU, where the allocator has no
peak counter. The first number is therefore independent of allocator caching.

    python benchmarks/bench_backbones.py --batch 8 --rounds 3
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from torch.distributed._tools.mem_tracker import MemTracker

from vitdiff.models import create_model


def diffusers_dit_s2():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)


def shared_embedder_params(peer) -> int:
    """diffusers' DiT keeps its own timestep+label embedder in every block where the official model
    shares one; the parameter count with the copies removed is what the official DiT-S/2 has."""
    copies = len(peer.transformer_blocks) - 1
    return sum(p.numel() for p in peer.parameters()) - copies * sum(
        p.numel() for p in peer.transformer_blocks[0].norm1.emb.parameters())


def diffusers_ddpm_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       layers_per_block=2, dropout=0.1, norm_eps=1e-6, downsample_padding=0)


class Runner:
    """One model, its optimiser and a fixed batch; ``step()`` is one training step."""

    def __init__(self, label: str, model: torch.nn.Module, call, batch: dict, args):
        self.label = label
        self.params = sum(p.numel() for p in model.parameters())
        self.model = model.to(args.device).train()
        self.forward = torch.compile(call) if args.compile else call
        self.batch = {k: v.to(args.device) for k, v in batch.items()}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.device = torch.device(args.device)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if args.bf16 \
            else contextlib.nullcontext
        self.throughputs: list[float] = []
        self.peak_bytes = 0

    def step(self) -> None:
        with self.autocast():
            out = self.forward(self.model, **self.batch)
        loss = F.mse_loss(out.float(), self.batch["target"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_round(self, steps: int) -> None:
        self.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.synchronize()
        self.throughputs.append(steps * self.batch["x"].shape[0] / (time.perf_counter() - start))

    def measure_memory(self) -> None:
        """Peak bytes of live tensors (weights, optimiser state, activations, gradients) over one step."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.step()
            self.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            return
        tracker = MemTracker()
        tracker.track_external(self.model, self.optimizer)
        with tracker:
            self.step()
        self.peak_bytes = tracker.get_tracker_snapshot("peak")[self.device]["Total"]


def ours_call(model, x, t, target, y=None):
    return model(x, t, y)


def dit_peer_call(model, x, t, target, y):
    return model(x, timestep=t, class_labels=y).sample


def unet_peer_call(model, x, t, target):
    return model(x, t).sample


def make_pairs(args) -> list[tuple[Runner, Runner]]:
    b = args.batch
    latent = dict(x=torch.randn(b, 4, 32, 32), t=torch.randint(0, 1000, (b,)).float(),
                  y=torch.randint(0, 1000, (b,)), target=torch.randn(b, 8, 32, 32))
    pixels = dict(x=torch.randn(b, 3, 32, 32), t=torch.randint(0, 1000, (b,)).float(),
                  target=torch.randn(b, 3, 32, 32))
    pairs = []
    if args.models in ("all", "dit"):
        peer = diffusers_dit_s2()
        print(f"diffusers DiT params without its per-block embedder copies: {shared_embedder_params(peer):,} "
              f"(vitdiff DiT-S/2: {sum(p.numel() for p in create_model('DiT-S/2').parameters()):,})")
        pairs.append((Runner("vitdiff DiT-S/2", create_model("DiT-S/2"), ours_call, latent, args),
                      Runner("diffusers DiTTransformer2DModel", peer, dit_peer_call, latent, args)))
    if args.models in ("all", "unet"):
        ours, peer = create_model("DDPM-UNet"), diffusers_ddpm_unet()
        if args.channels_last:  # both or neither: a layout choice, not an architecture difference
            ours, peer = ours.to(memory_format=torch.channels_last), peer.to(memory_format=torch.channels_last)
        pairs.append((Runner("vitdiff DDPM-UNet", ours, ours_call, pixels, args),
                      Runner("diffusers UNet2DModel", peer, unet_peer_call, pixels, args)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per model")
    parser.add_argument("--steps", type=int, default=2, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for both models")
    parser.add_argument("--compile", action="store_true", help="torch.compile both forwards")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights for both U-Nets")
    parser.add_argument("--models", choices=["all", "dit", "unet"], default="all")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"device={args.device} batch={args.batch} rounds={args.rounds}x{args.steps} steps bf16={args.bf16} "
          f"compile={args.compile} threads={torch.get_num_threads()} torch={torch.__version__}")
    for ours, peer in make_pairs(args):
        print(f"\n{ours.label}: {ours.params / 1e6:.2f}M params | {peer.label}: {peer.params / 1e6:.2f}M params")
        for runner in (ours, peer):
            for _ in range(args.warmup):
                runner.step()
            runner.measure_memory()
        for _ in range(args.rounds):
            ours.time_round(args.steps)
            peer.time_round(args.steps)
        for runner in (ours, peer):
            rounds = ", ".join(f"{v:.2f}" for v in runner.throughputs)
            print(f"  {runner.label:<34} {statistics.median(runner.throughputs):8.2f} img/s (rounds: {rounds})  "
                  f"peak mem {runner.peak_bytes / 2**20:8.1f} MiB")
        ratio = statistics.median(ours.throughputs) / statistics.median(peer.throughputs)
        paired = [a / b for a, b in zip(ours.throughputs, peer.throughputs)]
        print(f"  ratio ours/peer (median img/s): {ratio:.3f}  per round: {', '.join(f'{r:.3f}' for r in paired)}")


if __name__ == "__main__":
    main()
