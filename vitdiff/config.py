"""Experiment configs: one YAML file per experiment in ``experiments/``.

A config has the sections ``model``, ``diffusion``, ``data``, ``text``, ``train``,
``sample`` and ``eval`` plus a few top-level keys (``out_dir``, ``resume``,
``profile``). Each section is a dataclass, so every key has a type and a
default, and an unknown key fails with the list of valid ones. ``model`` is
the exception: besides ``preset`` its keys are constructor overrides of that
preset (``model.skip=add``), checked by the model builder.

Command-line overrides are ``section.key=value`` with YAML-typed values
(``train.betas=[0.9,0.99]``, ``data.root=null``). A bare key names a top-level
key, else a ``train`` key, else a key found in exactly one section
(``steps=200`` is ``train.steps``; ``sample.steps`` needs its prefix).

``tiny=true`` (or ``profile=tiny``) keeps the experiment's research switches but
shrinks it to a CPU run; the shrinking needs the model and data registries, so
:func:`load_config` takes it as a function (``shrink``) and
:func:`vitdiff.build.load_experiment` passes it in. Command-line overrides apply
after the profile, so ``tiny=true steps=6`` trains six steps; ``model.preset=X``
applies before it, so ``model.preset=DiT-XL/2 tiny=true`` trains DiT-tiny.

This module is a schema: it imports nothing else from vitdiff. Registry names
(presets, data sets, processes, samplers) are checked where they are built
(:func:`vitdiff.build.check_names`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml


@dataclass
class ModelConfig:
    preset: str = "IU-ViT-tiny"
    # Constructor keyword overrides of the preset (research switches such as ``skip``).
    # image_size and in_channels always come from the data.
    overrides: dict = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    process: str = "vp-sde"            # ddpm-linear | ddpm-cosine | vp-sde | edm (vitdiff.diffusion.make_process)
    process_kwargs: dict = field(default_factory=dict)  # e.g. {beta_min: 0.1, beta_max: 20.0}
    prediction: str = "eps"            # eps | x0 | v
    weighting: str = "uniform"         # uniform | min_snr | edm
    min_snr_gamma: float = 5.0
    cond_drop_prob: float = 0.0        # classifier-free guidance training: chance to drop the condition
    # learn_sigma models (DiT): lambda of iDDPM's hybrid loss L_simple + lambda L_vlb, which trains the variance
    # channels (needs ddpm-linear or ddpm-cosine); 0 trains the mean only. Models without learn_sigma ignore it.
    vlb_weight: float = 0.001


@dataclass
class DataConfig:
    dataset: str = "digits"            # a name in vitdiff.data.DATASETS
    root: str | None = None            # on-disk location for datasets that need one
    image_size: int | None = None      # None: the dataset's native size
    batch_size: int = 128              # GLOBAL batch: split over ranks and accumulation steps
    flip: bool = False                 # random horizontal flip, drawn per example from (seed, step)
    num_workers: int = 2


@dataclass
class TextConfig:
    """Text conditioning, on whenever the data set has captions (``vitdiff.data.dataset_info(name).has_captions``).

    The trainer then wraps the backbone (built with ``context_dim`` and ``context_len``) in
    :class:`vitdiff.text.TextToImage` with the encoder below; the empty caption is the null condition.
    """
    encoder: str = "jointly-trained"   # jointly-trained: vitdiff.text.TextEncoder + a word tokenizer of the training
    #                                    captions, trained with the backbone; clip: a frozen CLIP text tower from `path`
    context_dim: int = 256             # jointly-trained: the encoder's width (CLIP: its own hidden size, e.g. 768)
    layers: int = 2                    # jointly-trained: Transformer blocks
    heads: int = 4                     # jointly-trained: attention heads
    max_length: int | None = None      # tokens per caption; None: the longest training caption (words), 77 for CLIP
    min_count: int = 1                 # jointly-trained: words seen fewer times in the captions become <unk>
    path: str | None = None            # clip: a LOCAL folder of CLIPTextModel + CLIPTokenizer (nothing is downloaded)


TEXT_ENCODERS = ("jointly-trained", "clip")


@dataclass
class TrainConfig:
    steps: int = 500_000
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: tuple = (0.99, 0.999)
    warmup_steps: int = 2500           # linear warm-up, then constant (U-ViT)
    grad_clip: float | None = None     # max global grad norm; None: no clipping (the norm is still logged)
    ema_decay: float = 0.9999
    ema_warmup: bool = True            # decay_t = min(ema_decay, (1 + n) / (10 + n)) after n updates
    accumulate: int = 1                # micro-batches per optimizer step
    # fp32 | bf16 (autocast of the forward; loss, EMA and optimizer state stay fp32) | auto: bf16 where the device
    # has it natively and it is faster for this model, else fp32 (vitdiff.precision; each metrics record says which)
    precision: str = "auto"
    compile: bool = False              # torch.compile the backbone
    grad_checkpointing: bool = False   # recompute block activations in backward
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 5000
    max_consecutive_skips: int = 10    # this many non-finite steps in a row stop the run as diverged
    sample_every: int = 10_000         # 0: never
    progress: bool = True              # tqdm bar (rank 0)


@dataclass
class SampleConfig:
    sampler: str = "dpmpp_2m"          # a name in vitdiff.sampling.SAMPLERS
    steps: int = 50
    guidance: float = 1.0
    guidance_convention: str = "dit"   # dit: u + w (c - u); dit_official: the same on channels 0-2 only, as DiT's
    #                                    forward_with_cfg (its FIDs); uvit: (1 + s) c - s u
    n: int = 64
    # Sigma grid (vitdiff.sampling.GRIDS: uniform_t | quadratic | karras); null: the process's own (uniform_t for the
    # VP processes, karras for edm). The grid sets a solver's order of accuracy (benchmarks/sampler_orders.py).
    grid: str | None = None
    # Discrete processes, uniform_t grid: trailing | leading | linspace; null: trailing (t = T-1 ... T/steps - 1).
    # DiT's respacing "250" is linspace (t = T-1 ... 0), "ddim50" leading.
    spacing: str | None = None
    # The ddpm sampler's variance: fixed_small (null: the posterior's, beta_tilde) | fixed_large (beta) |
    # learned_range (a learn_sigma model's, as DiT samples). Other samplers take none: leave null.
    variance: str | None = None
    # The euler_maruyama sampler's beta dt per step: exact (its integral over the step) | start (beta read at the
    # step's start, as U-ViT's sde.py; its final FIDs). Needs the vp-sde process; other samplers: leave exact.
    beta_dt: str = "exact"
    # Clamp the denoiser's x0 estimates to the data range [-1, 1] (DDPM/ADM's clip_denoised). Pixel data: on;
    # latent models (SD-VAE latents are not bounded by 1): set false.
    clip_denoised: bool = True
    prompts: tuple | None = None       # text models: captions of the sample grids; null: the first training captions


METRICS = ("fd-clf", "fid", "nll")  # what a config's eval.metric and `vitdiff eval --metric` take
PRECISIONS = ("fp32", "bf16", "auto")  # train.precision (vitdiff.precision)


@dataclass
class EvalConfig:
    metric: str = "fd-clf"             # one of METRICS
    n: int = 1000
    sampler: str | None = None         # None: the sample section's (final FIDs often use a slower sampler)
    steps: int | None = None
    guidance: float | None = None
    reference: str | None = None       # reference feature statistics (.npz); None: the data set's training split


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "text": TextConfig,
    "train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig,
}
TOP_LEVEL_KEYS = ("name", "out_dir", "resume", "profile")
PROFILES = ("full", "tiny")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "experiment"
    out_dir: str | None = None         # None: runs/<name>
    resume: Any = "auto"               # auto: resume when out_dir has a checkpoint; true: must; false: must not
    profile: str = "full"              # full | tiny

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(self.train.betas)
        if self.sample.prompts is not None:
            out["sample"]["prompts"] = list(self.sample.prompts)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        """The config a checkpoint stored (``to_dict``); older checkpoints' ``train.bf16`` reads as its precision."""
        config = cls()
        _apply(config, _upgrade_legacy(raw), where="config")
        _validate(config)
        return config


class UserError(Exception):
    """Something the user can fix: the ``vitdiff`` commands print its message (no traceback) and exit with
    ``exit_status`` (:func:`vitdiff.cli.run_command`)."""
    exit_status = 2


class ConfigError(UserError, ValueError):
    """A config value, command-line argument or path that cannot work."""


def check_writable(path: str | Path, what: str, *, directory: bool) -> None:
    """Raise :class:`ConfigError` unless ``path`` can be written as a ``directory`` (else a file), before any work."""
    path = Path(path).expanduser()
    kind = "a directory" if directory else "a file"
    if path.exists() and path.is_dir() != directory:
        raise ConfigError(f"{what} {path} exists and is not {kind}: pass {kind} path")
    existing = path
    while not existing.exists():  # the part that exists decides: the rest is created
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise ConfigError(f"{what} {path} lies under {existing}, which is a file: choose another location")
    if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
        raise ConfigError(f"{what} {path}: {existing} is not writable (read-only file system or no permission): "
                          "choose another location")


def check_guidance(guidance: float, convention: str, what: str) -> None:
    """A guidance scale must be finite and at least 'unconditional' (w >= 0 in the dit convention, s >= -1 in uvit);
    anything lower pushes samples away from their condition."""
    lowest = {"dit": 0.0, "uvit": -1.0}.get(convention, 0.0)
    if not (math.isfinite(guidance) and guidance >= lowest):
        raise ConfigError(f"{what}={guidance} is not a guidance scale: in the {convention!r} convention it must be a "
                          f"finite number >= {lowest:g} ({lowest:g}: unconditional, "
                          f"{1.0 + lowest:g}: conditional without guidance)")


def load_config(path: str | Path | None = None, overrides: list[str | tuple[str, Any]] | None = None, *,
                shrink: Callable[[Config], dict[str, Any]] | None = None) -> Config:
    """Read a YAML experiment file (or start from defaults), then apply ``key=value`` overrides.

    ``shrink(config) -> {dotted key: value}`` gives the tiny profile's overrides (:func:`vitdiff.build.tiny_overrides`);
    they apply after the model choice and before the other overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found; the experiments are in experiments/*.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        config.name = path.stem
        _apply(config, raw, where=str(path))
    parsed = [(key, _resolve_key(key) if key not in ("tiny", "profile") else key, value)
              for key, value in map(_parse_override, overrides or [])]
    # Order, wherever they appear: the model choice, then the profile (which shrinks that model), then the rest,
    # so explicit overrides win over the profile.
    for _, resolved, value in parsed:
        if resolved == "model.preset":
            _set(config, resolved, value)
        elif resolved in ("tiny", "profile"):
            config.profile = _profile_from(resolved, value)
    if config.profile == "tiny":
        if shrink is None:
            raise ConfigError("profile=tiny needs the model and data registries: load the config with "
                              "vitdiff.build.load_experiment")
        for dotted, value in shrink(config).items():
            _set(config, dotted, value)
    for _, resolved, value in parsed:
        if resolved not in ("tiny", "profile", "model.preset"):
            _set(config, resolved, value)
    _validate(config)
    if config.out_dir is None:
        config.out_dir = str(Path("runs") / (config.name + ("-tiny" if config.profile == "tiny" else "")))
    _check_paths(config)
    return config


def _check_paths(config: Config) -> None:
    """What training will read and write exists and is writable, so a run fails before it starts, not at its first
    save. (Only here: a checkpoint's config names the paths of the machine it was trained on.)"""
    check_writable(config.out_dir, "out_dir", directory=True)
    if config.data.root is not None and not Path(config.data.root).expanduser().exists():
        raise ConfigError(f"data.root={config.data.root} does not exist: point it at the data set's folder, or "
                          "set data.root=null for the default location")


# -- parsing -------------------------------------------------------------------
def _upgrade_legacy(raw: dict) -> dict:
    """``train.bf16`` (bf16 autocast on CUDA only) became ``train.precision``: true meant bf16 where it runs well,
    which is what ``auto`` does, false meant fp32."""
    train = raw.get("train")
    if not isinstance(train, dict) or "bf16" not in train:
        return raw
    train = {key: value for key, value in train.items() if key != "bf16"}
    train.setdefault("precision", "auto" if raw["train"]["bf16"] else "fp32")
    return {**raw, "train": train}


def _profile_from(key: str, value: Any) -> str:
    if key == "tiny":
        if not isinstance(value, bool):
            raise ConfigError(f"tiny expects true or false, got {value!r}")
        return "tiny" if value else "full"
    if value not in PROFILES:
        raise ConfigError(f"profile must be one of {PROFILES}, got {value!r}")
    return value


def _parse_override(item: str | tuple[str, Any]) -> tuple[str, Any]:
    """``"key=value"`` (the value read as YAML), or an already typed ``(key, value)`` pair from Python."""
    if isinstance(item, tuple):
        return item
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4 or steps=200)")
    try:
        return key.strip(), yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML (quote strings with special "
                          "characters, e.g. key='a: b')") from None


def _resolve_key(key: str) -> str:
    if "." in key:
        return key
    if key in TOP_LEVEL_KEYS:
        return key
    if key in _field_names(TrainConfig):
        return f"train.{key}"
    owners = [name for name, cls in SECTIONS.items() if key in _field_names(cls)]
    if len(owners) == 1:
        return f"{owners[0]}.{key}"
    if owners:
        raise ConfigError(f"key {key!r} is ambiguous: write one of {[f'{o}.{key}' for o in owners]}")
    raise ConfigError(f"unknown key {key!r}. {_valid_keys_text()}")


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _valid_keys_text() -> str:
    lines = [f"top level: {', '.join(TOP_LEVEL_KEYS)}, tiny"]
    for name, cls in SECTIONS.items():
        keys = ["preset", "overrides", "<any constructor argument of the preset>"] if cls is ModelConfig else _field_names(cls)
        lines.append(f"{name}: {', '.join(keys)}")
    return "Valid keys:\n  " + "\n  ".join(lines)


def _apply(config: Config, raw: dict, where: str) -> None:
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: section {key!r} must be a mapping, got {value!r}")
            for sub, sub_value in value.items():
                _set(config, f"{key}.{sub}", sub_value, where)
        elif key in TOP_LEVEL_KEYS:
            _set(config, key, value, where)
        else:
            near = difflib.get_close_matches(str(key), [*SECTIONS, *TOP_LEVEL_KEYS], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}. {_valid_keys_text()}")


def _set(config: Config, dotted: str, value: Any, where: str = "override") -> None:
    parts = dotted.split(".")
    if len(parts) == 1:
        if parts[0] not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{where}: unknown key {dotted!r}. {_valid_keys_text()}")
        setattr(config, parts[0], _coerce(Config, parts[0], value, dotted))
        return
    section_name, key = parts[0], ".".join(parts[1:])
    if section_name not in SECTIONS:
        raise ConfigError(f"{where}: unknown section {section_name!r} in {dotted!r}. {_valid_keys_text()}")
    section = getattr(config, section_name)
    if section_name == "model" and key == "overrides":
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: model.overrides must be a mapping of constructor arguments, got {value!r}")
        section.overrides.update(value)
        return
    if section_name == "model" and key != "preset":
        section.overrides[key] = value   # checked by the preset's constructor when it is built
        return
    if section_name == "model" and key == "preset" and not isinstance(value, str):
        raise ConfigError(f"{where}: model.preset must be a preset name, got {value!r}")
    if section_name == "train" and key == "bf16":
        raise ConfigError(f"{where}: train.bf16 was replaced by train.precision: fp32 | bf16 | auto "
                          "(auto: bf16 where the device has it and it is faster for the model)")
    if "." in key or key not in _field_names(type(section)):
        near = difflib.get_close_matches(key, _field_names(type(section)), n=1)
        hint = f" (did you mean {section_name}.{near[0]}?)" if near else ""
        raise ConfigError(f"{where}: unknown key {dotted!r}{hint}. "
                          f"Valid {section_name} keys: {', '.join(_field_names(type(section)))}")
    setattr(section, key, _coerce(type(section), key, value, dotted))


def _coerce(cls: type, key: str, value: Any, dotted: str) -> Any:
    """Check a YAML value against the field's annotation; accept ints for floats and '2e-4' strings."""
    hint = typing.get_type_hints(cls)[key]
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed or hint is Any:
            return None
        raise ConfigError(f"{dotted} cannot be null")
    if hint is Any:
        return value
    for kind in allowed:
        if kind is type(None):
            continue
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)   # YAML 1.1 reads 2e-4 (no dot) as a string
            except ValueError:
                pass
        if kind is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (bool, str, dict) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{dotted} expects {names}, got {type(value).__name__} {value!r}")


def _validate(config: Config) -> None:
    non_finite = [f"{name}.{key}" for name in SECTIONS for key, value in vars(getattr(config, name)).items()
                  if isinstance(value, float) and not math.isfinite(value)]
    if non_finite:
        raise ConfigError(f"{', '.join(non_finite)} must be finite (inf or nan given)")
    train, sample, evaluation = config.train, config.sample, config.eval
    checks = [
        (train.steps >= 0, "train.steps must be >= 0"),
        (train.lr > 0, "train.lr must be > 0"),
        (len(train.betas) == 2 and all(0 <= b < 1 for b in train.betas), "train.betas must be two numbers in [0, 1)"),
        (train.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (train.grad_clip is None or train.grad_clip > 0, "train.grad_clip must be > 0 or null (no clipping)"),
        (0 <= train.ema_decay < 1, "train.ema_decay must lie in [0, 1)"),
        (train.accumulate >= 1, "train.accumulate must be >= 1"),
        (train.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}"),
        (min(train.log_every, train.ckpt_every) >= 1, "train.log_every and train.ckpt_every must be >= 1"),
        (train.max_consecutive_skips >= 1, "train.max_consecutive_skips must be >= 1"),
        (min(sample.steps, sample.n) >= 1, "sample.steps and sample.n must be >= 1"),
        (evaluation.n >= 1 and (evaluation.steps is None or evaluation.steps >= 1),
         "eval.n must be >= 1 and eval.steps >= 1 or null"),
        (train.sample_every >= 0, "train.sample_every must be >= 0 (0: never)"),
        (config.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (0 <= config.diffusion.cond_drop_prob < 1, "diffusion.cond_drop_prob must lie in [0, 1)"),
        (config.diffusion.vlb_weight >= 0, "diffusion.vlb_weight must be >= 0 (0: train the mean only)"),
        (config.sample.variance is None or (config.sample.sampler == "ddpm" and config.eval.sampler in (None, "ddpm")),
         "sample.variance is read by the ddpm sampler only: set sample.sampler=ddpm (and eval.sampler=null or ddpm), "
         "or sample.variance=null"),
        (config.sample.spacing is None or (config.diffusion.process in ("ddpm-linear", "ddpm-cosine")
                                           and config.sample.grid in (None, "uniform_t")),
         "sample.spacing places the uniform_t grid of a discrete process (ddpm-linear, ddpm-cosine): set "
         "sample.spacing=null, or use such a process with sample.grid=null or uniform_t"),
        (config.sample.beta_dt != "start" or (config.sample.sampler == "euler_maruyama"
                                              and config.eval.sampler in (None, "euler_maruyama")),
         "sample.beta_dt=start is read by the euler_maruyama sampler only: set sample.sampler=euler_maruyama (and "
         "eval.sampler=null or euler_maruyama), or sample.beta_dt=exact"),
        (config.sample.beta_dt != "start" or config.diffusion.process == "vp-sde",
         "sample.beta_dt=start reads the beta(t) of the continuous VP-SDE: set diffusion.process=vp-sde, or "
         "sample.beta_dt=exact"),
        (config.sample.prompts is None or (len(config.sample.prompts) > 0
                                           and all(isinstance(p, str) for p in config.sample.prompts)),
         "sample.prompts must be a non-empty list of captions or null"),
        (config.text.encoder in TEXT_ENCODERS,
         f"text.encoder must be one of {', '.join(TEXT_ENCODERS)}; precomputed embeddings are not driven by the "
         "trainer: pass them to vitdiff.text.TextToImage from Python"),
        (config.text.encoder != "clip" or config.text.path is not None,
         "text.encoder=clip needs text.path: a local folder holding CLIPTextModel and CLIPTokenizer files"),
        (min(config.text.context_dim, config.text.layers, config.text.heads, config.text.min_count) >= 1,
         "text.context_dim, text.layers, text.heads and text.min_count must be >= 1"),
        (config.text.max_length is None or config.text.max_length >= 1, "text.max_length must be >= 1 or null"),
        (config.eval.metric in METRICS, f"eval.metric must be one of {', '.join(METRICS)}"),
        (config.resume in ("auto", True, False), "resume must be auto, true or false"),
        (config.profile in PROFILES, f"profile must be one of {PROFILES}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_guidance(sample.guidance, sample.guidance_convention, "sample.guidance")
    if evaluation.guidance is not None:
        check_guidance(evaluation.guidance, sample.guidance_convention, "eval.guidance")
