"""Inference: a trained model back from its checkpoint, and batches of samples with the config's settings.

``vitdiff sample``, ``vitdiff eval``, the trainer's sample grids and the workbook all
sample through :func:`generate`, so labels and prompts are assigned to images one way
everywhere. Nothing here imports the trainer.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .build import build_diffusion, build_model, check_names, data_geometry, tokenizer_from_json
from .config import Config


def generate(model: nn.Module, process, config: Config, *, n: int, batch_size: int | None = None,
             generator: torch.Generator | None = None, seed: int | None = None,
             device: torch.device | str | None = None, sampler: str | None = None, steps: int | None = None,
             guidance: float | None = None, labels: torch.Tensor | None = None, prompts: list[str] | None = None,
             grid: str | None = None, progress: bool = False) -> torch.Tensor:
    """n samples in [-1, 1], on the CPU, with the config's sample settings (each overridable); RNG-neutral.

    Images are drawn ``batch_size`` at a time (default: all n at once) from one generator: ``generator``,
    else a new one seeded with ``seed`` (default 0), so the same seed and batch size give the same images.
    ``device`` defaults to the model's. A class-conditional model gets ``labels`` (default: 0, 1, 2, ...
    cycling over the classes); a text model gets ``prompts``, cycled over the images (image i shows
    ``prompts[i % len(prompts)]``)."""
    from .sampling import sample

    section = config.sample
    channels, image_size = data_geometry(config)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device).manual_seed(0 if seed is None else seed)
    elif seed is not None:
        raise ValueError("pass a generator or a seed, not both")
    num_classes = getattr(model, "num_classes", 0)
    if num_classes and labels is None:
        labels = torch.arange(n) % num_classes
    takes_text = getattr(model, "takes_token_ids", False)
    if takes_text and not prompts:
        raise ValueError("a text-to-image model needs prompts=[...] (captions, cycled over the n samples)")
    if prompts and not takes_text:
        raise ValueError(f"{type(model).__name__} takes no text: drop prompts (use labels for class-conditional models)")
    batch_size = batch_size or n
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            for start in range(0, n, batch_size):
                count = min(batch_size, n - start)
                if takes_text:
                    cond = model.encode_prompts([prompts[i % len(prompts)] for i in range(start, start + count)])
                    cond = cond.to(device)
                else:
                    cond = labels[start:start + count].to(device) if num_classes else None
                chunks.append(sample(
                    model, process, (count, channels, image_size, image_size),
                    sampler=sampler or section.sampler, steps=steps or section.steps,
                    prediction=config.diffusion.prediction, cond=cond,
                    guidance=section.guidance if guidance is None else guidance,
                    guidance_convention=section.guidance_convention, grid=grid or section.grid,
                    spacing=section.spacing, variance=section.variance, beta_dt=section.beta_dt,
                    clip_denoised=section.clip_denoised, generator=generator, progress=progress, device=device).cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def load_for_inference(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, process, config, checkpoint state, checkpoint file) from a file or a run directory.

    A text model comes back as :class:`vitdiff.text.TextToImage` with the tokenizer saved in the checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = ckpt.load_latest(path, map_location=device)
        if found is None:
            raise FileNotFoundError(f"{path} holds no checkpoint (last.pt); train with `vitdiff train` first")
        state, path = found
    else:
        state = ckpt.load_checkpoint(path, map_location=device)
    config = Config.from_dict(state["config"])
    check_names(config)
    model = build_model(config, tokenizer_from_json(state.get("text", {}).get("tokenizer")))
    if ema:
        weights = {name[len("module."):]: value for name, value in state["ema"].items() if name.startswith("module.")}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    process, _ = build_diffusion(config)
    return model.to(device).eval(), process, config, state, path
