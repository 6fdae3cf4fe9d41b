"""``vitdiff sample CKPT``: an image grid from a training checkpoint.

The model, diffusion process and sampler defaults come from the config stored
in the checkpoint, so a grid needs nothing but the file (or its run directory).
Samples come from the EMA weights unless ``--no-ema``. The same ``--seed`` and
``--batch-size`` give the same images. A text-to-image checkpoint takes
``--prompt "a small red circle on the left"`` (repeatable: prompts cycle over the
images); without it, the sample prompts saved at training time.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


def sample_batches(model, process, config, *, n: int, batch_size: int, seed: int, device: torch.device,
                   sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                   prompts: list[str] | None = None, progress: bool = False) -> torch.Tensor:
    """n samples in [-1, 1] drawn ``batch_size`` at a time from one seeded generator; labels cycle over classes,
    prompts (text models) over the images."""
    from .trainer import generate

    generator = torch.Generator(device).manual_seed(seed)
    num_classes = getattr(model, "num_classes", 0)
    labels = torch.arange(n) % num_classes if num_classes else None
    chunks = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        chunk_prompts = [prompts[i % len(prompts)] for i in range(start, start + count)] if prompts else None
        chunks.append(generate(model, process, config, n=count, generator=generator, device=device,
                               sampler=sampler, steps=steps, guidance=guidance, progress=progress,
                               labels=None if labels is None else labels[start:start + count],
                               prompts=chunk_prompts).cpu())
    return torch.cat(chunks)


def checkpoint_prompts(model, state: dict, prompts: list[str] | None) -> list[str] | None:
    """The prompts a text model samples: the given ones, else those saved at training time; None for other models."""
    if not getattr(model, "takes_token_ids", False):
        return None
    prompts = prompts or (state.get("text") or {}).get("sample_prompts")
    if not prompts:
        raise SystemExit("vitdiff: this text-to-image checkpoint saved no sample prompts: pass --prompt \"...\"")
    return list(prompts)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `vitdiff sample` and `vitdiff eval` (defaults: the checkpoint's config)."""
    parser.add_argument("checkpoint", help="a checkpoint file (last.pt) or a run directory")
    parser.add_argument("--sampler", help="sampler name (vitdiff.sampling.SAMPLERS); default: the config's")
    parser.add_argument("--steps", type=int, help="sampler steps; default: the config's")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale, in the config's sample.guidance_convention")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256, help="images per sampler call")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="use the EMA weights (default) or the raw ones (--no-ema)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    from torchvision.utils import save_image

    from .sampling import SPACINGS
    from .trainer import load_for_inference

    parser = argparse.ArgumentParser(prog="vitdiff sample", description=__doc__.splitlines()[0])
    add_sampling_arguments(parser)
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--out", type=Path, help="output PNG; default: grid_<sampler><steps>_seed<seed>.png beside the checkpoint")
    parser.add_argument("--spacing", choices=SPACINGS,
                        help="discrete processes: where the uniform_t grid's steps lie (trailing: t = T-1 ... "
                             "T/steps - 1; leading: multiples of T/steps, as DDIM and DiT's 'ddim50'; linspace: "
                             "T-1 ... 0, as DiT's '250'); default: the config's sample.spacing")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="text models: a caption (repeat for several; they cycle over the images); default: the "
                             "sample prompts saved with the checkpoint")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")

    device = torch.device(args.device)
    model, process, config, state, checkpoint = load_for_inference(args.checkpoint, ema=args.ema, device=device)
    prompts = checkpoint_prompts(model, state, args.prompts)
    if prompts is None and args.prompts:
        parser.error(f"--prompt: this checkpoint's model ({config.model.preset} on {config.data.dataset}) takes no text")
    sampler = args.sampler or config.sample.sampler
    steps = args.steps or config.sample.steps
    if args.spacing:
        config.sample.spacing = args.spacing
    images = sample_batches(model, process, config, n=args.n, batch_size=args.batch_size, seed=args.seed,
                            device=device, sampler=sampler, steps=steps, guidance=args.guidance, prompts=prompts,
                            progress=True)
    out = args.out or checkpoint.parent / f"grid_{sampler}{steps}_seed{args.seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, out, nrow=math.ceil(math.sqrt(args.n)))
    about = f", prompts {prompts[:3]}{' ...' if len(prompts) > 3 else ''}" if prompts else ""
    print(f"{args.n} samples{about} ({'EMA' if args.ema else 'raw'} weights, step {state['step']}, {sampler} {steps} steps, "
          f"seed {args.seed}) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
