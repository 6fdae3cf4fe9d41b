"""vitdiff sample CKPT: an image grid from a training checkpoint.

The model, diffusion process and sampler defaults come from the config stored
in the checkpoint, so a grid needs nothing but the file (or its run directory).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

DESCRIPTION = """An image grid from a training checkpoint (or its run directory). Model, diffusion process and sampler
settings come from the config saved in the checkpoint; every option below overrides one of them. Samples come from the
EMA weights unless --no-ema. The same --seed and --batch-size give the same images. A text-to-image checkpoint takes
--prompt "a small red circle on the left" (repeat it: prompts cycle over the images); without it, the sample prompts
saved at training time."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (an option without one says in its help what decides) and keeps the
    description's line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def checkpoint_prompts(model, state: dict, prompts: list[str] | None) -> list[str] | None:
    """The prompts a text model samples: the given ones, else those saved at training time; None for other models."""
    if not getattr(model, "takes_token_ids", False):
        return None
    prompts = prompts or (state.get("text") or {}).get("sample_prompts")
    if not prompts:
        raise SystemExit("vitdiff: this text-to-image checkpoint saved no sample prompts: pass --prompt \"...\"")
    return list(prompts)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `vitdiff sample` and `vitdiff eval` (None: the checkpoint's config decides)."""
    parser.add_argument("checkpoint", help="a checkpoint file (last.pt) or a run directory")
    parser.add_argument("--sampler", help="sampler name (vitdiff.sampling.SAMPLERS); default: the config's sample.sampler")
    parser.add_argument("--steps", type=int, help="sampler steps; default: the config's sample.steps")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale, in the config's sample.guidance_convention; "
                             "default: the config's sample.guidance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--batch-size", type=int, default=256, help="images per sampler call (memory vs speed)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="sample the EMA weights (--no-ema: the raw weights)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda:0; auto: cuda if available")


def resolve_device(name: str):
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitdiff sample", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--out", type=Path,
                        help="output PNG; default: grid_<sampler><steps>_seed<seed>.png beside the checkpoint")
    parser.add_argument("--spacing",
                        help="discrete processes: where the uniform_t grid's steps lie (trailing: t = T-1 ... "
                             "T/steps - 1; leading: multiples of T/steps, as DDIM and DiT's 'ddim50'; linspace: "
                             "T-1 ... 0, as DiT's '250'); default: the config's sample.spacing")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="text models: a caption (repeat for several; they cycle over the images); default: the "
                             "sample prompts saved with the checkpoint")
    args = parser.parse_args(argv)
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")

    from torchvision.utils import save_image

    from .build import check_names
    from .generate import generate, load_for_inference

    device = resolve_device(args.device)
    model, process, config, state, checkpoint = load_for_inference(args.checkpoint, ema=args.ema, device=device)
    prompts = checkpoint_prompts(model, state, args.prompts)
    if prompts is None and args.prompts:
        parser.error(f"--prompt: this checkpoint's model ({config.model.preset} on {config.data.dataset}) takes no text")
    sampler = args.sampler or config.sample.sampler
    steps = args.steps or config.sample.steps
    if args.spacing:
        config.sample.spacing = args.spacing
        check_names(config)
    images = generate(model, process, config, n=args.n, batch_size=args.batch_size, seed=args.seed, device=device,
                      sampler=sampler, steps=steps, guidance=args.guidance, prompts=prompts, progress=True)
    out = args.out or checkpoint.parent / f"grid_{sampler}{steps}_seed{args.seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image((images + 1) / 2, out, nrow=math.ceil(math.sqrt(args.n)))
    about = f", prompts {prompts[:3]}{' ...' if len(prompts) > 3 else ''}" if prompts else ""
    print(f"{args.n} samples{about} ({'EMA' if args.ema else 'raw'} weights, step {state['step']}, {sampler} {steps} steps, "
          f"seed {args.seed}) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
