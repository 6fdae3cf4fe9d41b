"""vitdiff sample CKPT: an image grid from a training checkpoint.

The model, diffusion process and sampler defaults come from the config stored
in the checkpoint, so a grid needs nothing but the file (or its run directory).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .cli import run_command
from .config import Config, ConfigError, check_guidance, check_writable

MAX_GRID_IMAGES = 4096  # one PNG of a 64 x 64 grid; past that the grid is no longer a picture to look at

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
        raise ConfigError("this text-to-image checkpoint saved no sample prompts: pass --prompt \"...\"")
    return list(prompts)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `vitdiff sample` and `vitdiff eval` (None: the checkpoint's config decides)."""
    parser.add_argument("checkpoint", help="a checkpoint file (last.pt) or a run directory")
    parser.add_argument("--sampler", help="sampler name (vitdiff.sampling.SAMPLERS); default: the config's sample.sampler")
    parser.add_argument("--steps", type=int, help="sampler steps; default: the config's sample.steps")
    parser.add_argument("--guidance", type=float,
                        help="classifier-free guidance scale, read in --guidance-convention; default: the config's "
                             "sample.guidance")
    parser.add_argument("--spacing", metavar="{trailing,leading,linspace}",
                        help="discrete processes: where the uniform_t grid's steps lie (trailing: t = T-1 ... "
                             "T/steps - 1; leading: multiples of T/steps, as DDIM and DiT's 'ddim50'; linspace: "
                             "T-1 ... 0, as DiT's '250'); default: the config's sample.spacing (unset: trailing)")
    parser.add_argument("--variance", metavar="{fixed_small,fixed_large,learned_range}",
                        help="the ddpm sampler's variance: fixed_small (beta_tilde), fixed_large (beta) or "
                             "learned_range (a learn_sigma model's, as DiT); default: the config's sample.variance "
                             "(unset: fixed_small)")
    parser.add_argument("--beta-dt", metavar="{exact,start}",
                        help="the euler_maruyama sampler's beta dt: exact (integrated over each step) or start "
                             "(beta at the step's start, as U-ViT's sde.py); default: the config's sample.beta_dt "
                             "(unset: exact)")
    parser.add_argument("--guidance-convention", metavar="{dit,dit_official,uvit}",
                        help="how --guidance is read: dit (u + w (c - u)), dit_official (the same on the network "
                             "output's first 3 channels, as DiT's forward_with_cfg) or uvit ((1 + s) c - s u); "
                             "default: the config's sample.guidance_convention (unset: dit)")
    parser.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction,
                        help="clamp x0 estimates to [-1, 1] (pixel models; --no-clip-denoised for latent models, "
                             "as DiT's sample.py); default: the config's sample.clip_denoised (unset: on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--batch-size", type=int, default=256, help="images per sampler call (memory vs speed)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                        help="sample the EMA weights (--no-ema: the raw weights)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda:0; auto: cuda if available")


def resolve_device(name: str):
    """The torch device of --device (auto: cuda if available); an unknown or absent device is a ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices: use --device "
                          "cpu (or auto)")
    return device


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """The options of add_sampling_arguments, checked before the checkpoint is loaded."""
    from .sampling import SAMPLERS

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {args.sampler!r} is not one of: {', '.join(SAMPLERS)}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise ConfigError(f"--guidance must be a finite number, got {args.guidance}")


SAMPLE_OPTIONS = ("spacing", "variance", "beta_dt", "guidance_convention", "clip_denoised")  # --X: sample.X


def sampling_config(args: argparse.Namespace, config: Config, sampler: str) -> Config:
    """The checkpoint's config with the sampler that runs and the sample settings given as options, checked as a
    config file is. A setting the config holds for its own sampler only (sample.variance: ddpm, sample.beta_dt:
    euler_maruyama) is dropped when --sampler picks another one."""
    from .build import check_names
    from .sampling import NO_GUIDANCE, SAMPLER_SETTINGS

    given = {key: getattr(args, key) for key in SAMPLE_OPTIONS if getattr(args, key) is not None}
    raw = config.to_dict()
    section = raw["sample"]
    for key, (reader, unset) in SAMPLER_SETTINGS.items():
        if sampler != reader and key not in given:
            section[key] = unset
    section.update(given, sampler=sampler)
    raw["eval"]["sampler"] = None  # `sampler` is the one that runs
    try:
        checked = Config.from_dict(raw)
        check_names(checked)
    except ConfigError as error:
        raise ConfigError(f"the checkpoint's sample settings with these options: {error} (--X sets sample.X)") from None
    convention, saved = checked.sample.guidance_convention, config.sample.guidance_convention
    if args.guidance is None and NO_GUIDANCE[convention] != NO_GUIDANCE[saved]:
        raise ConfigError(f"--guidance-convention {convention} reads a guidance scale differently from the config's "
                          f"{saved!r}: pass --guidance in the {convention!r} convention too")
    return checked


def check_guidance_for(model, config, guidance: float) -> None:
    """A guidance scale the loaded model can use: in range for the config's convention, and none at all for an
    unconditional model."""
    from .sampling import NO_GUIDANCE

    convention = config.sample.guidance_convention
    check_guidance(guidance, convention, "--guidance")
    if guidance != NO_GUIDANCE[convention] and not getattr(model, "is_conditional", False):
        raise ConfigError(f"--guidance {guidance}: this checkpoint's model is unconditional, there is nothing to "
                          f"guide towards: drop --guidance (or pass {NO_GUIDANCE[convention]:g}, no guidance in the "
                          f"{convention!r} convention)")


def check_image_path(path: Path, what: str) -> None:
    """``path`` can be written as an image: a format PIL saves, in a writable place."""
    from PIL import Image

    check_writable(path, what, directory=False)
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise ConfigError(f"{what} {path}: {path.suffix or 'no extension'} is not an image format: end it in .png "
                          "(or .jpg, .webp)")


def check_grid_arguments(args: argparse.Namespace) -> None:
    """`vitdiff sample`'s own options, checked before anything is loaded."""
    if not 1 <= args.n <= MAX_GRID_IMAGES:
        raise ConfigError(f"--n must lie in 1..{MAX_GRID_IMAGES} (one grid image), got {args.n}: for many samples, "
                          "run `vitdiff eval`, or call vitdiff.generate.generate in batches")
    check_sampling_arguments(args)
    if args.out is not None:
        check_image_path(args.out, "--out")


def check_against_checkpoint(args: argparse.Namespace, model, config, checkpoint: Path) -> None:
    """What depends on the loaded checkpoint: the guidance its model can take, where the grid goes by default."""
    if args.guidance is not None:
        check_guidance_for(model, config, args.guidance)
    if args.out is None:
        check_writable(checkpoint.parent, "the checkpoint's directory (the grid's place without --out)", directory=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitdiff sample", description=DESCRIPTION, formatter_class=HelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--out", type=Path,
                        help="output PNG; default: grid_<sampler><steps>_seed<seed>.png beside the checkpoint")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="text models: a caption (repeat for several; they cycle over the images); default: the "
                             "sample prompts saved with the checkpoint")
    args = parser.parse_args(argv)
    return run_command("vitdiff sample", lambda: sample_grid(args))


def sample_grid(args: argparse.Namespace) -> int:
    check_grid_arguments(args)

    from torchvision.utils import save_image

    from .generate import generate, load_for_inference

    device = resolve_device(args.device)
    model, process, config, state, checkpoint = load_for_inference(args.checkpoint, ema=args.ema, device=device)
    sampler = args.sampler or config.sample.sampler
    config = sampling_config(args, config, sampler)
    check_against_checkpoint(args, model, config, checkpoint)
    prompts = checkpoint_prompts(model, state, args.prompts)
    if prompts is None and args.prompts:
        raise ConfigError(f"--prompt: this checkpoint's model ({config.model.preset} on {config.data.dataset}) "
                          "takes no text")
    steps = args.steps or config.sample.steps
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
