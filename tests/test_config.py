"""Experiment configs: every paper config loads, overrides are typed, unknown keys name the valid ones, and the tiny
profile turns any experiment into a CPU run of the same family."""
from __future__ import annotations

from pathlib import Path

import pytest

from vitdiff.build import load_experiment, tiny_preset_for
from vitdiff.config import Config, ConfigError, load_config
from vitdiff.data import dataset_info
from vitdiff.models import PRESETS

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_the_paper_configs_exist():
    names = {path.stem for path in EXPERIMENTS}
    assert {"cifar10_uvit_s2", "cifar10_iuvit_s2", "cifar10_ascend_s2", "celeba64_uvit_s4",
            "fmnist_tiny"} <= names
    assert any(name.startswith("lsun_church64_") for name in names)
    assert {"shapes64_t2i_ascend_h", "cub256_t2i_ascend_h", "cub64_t2i_uvit"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_loads_and_has_a_tiny_version(path):
    config = load_config(path)
    assert config.model.preset in PRESETS
    tiny = load_experiment(path, ["tiny=true", "steps=6"])
    assert tiny.model.preset.endswith("-tiny") and tiny.model.preset in PRESETS
    embedded = ("shapes",) if dataset_info(config.data.dataset).has_captions else ("digits", "fashion-mnist")
    assert tiny.data.dataset in embedded and tiny.train.steps == 6  # text-to-image stays text-to-image
    assert tiny.out_dir == f"runs/{path.stem}-tiny"
    assert Config.from_dict(tiny.to_dict()) == tiny  # what a checkpoint stores rebuilds the same config


def test_cifar10_uvit_is_the_published_recipe():
    config = load_config(EXPERIMENTS[0].parent / "cifar10_uvit_s2.yaml")
    train = config.train
    assert (config.model.preset, config.diffusion.process, config.diffusion.prediction) == ("U-ViT-S/2", "vp-sde", "eps")
    assert (train.lr, train.weight_decay, train.betas, train.warmup_steps) == (2e-4, 0.03, (0.99, 0.999), 2500)
    assert (config.data.batch_size, train.steps, train.ema_decay, config.data.flip) == (128, 500_000, 0.9999, True)
    assert (config.eval.sampler, config.eval.steps, config.sample.sampler, config.sample.steps) == (
        "euler_maruyama", 1000, "dpmpp_2m", 50)
    celeba = load_config(EXPERIMENTS[0].parent / "celeba64_uvit_s4.yaml").train
    assert (celeba.betas, celeba.warmup_steps) == ((0.99, 0.99), 5000)


def test_overrides_are_yaml_typed_and_checked(tmp_path):
    config = load_config(None, ["train.betas=[0.9, 0.95]", "lr=2e-4", "steps=7", "data.root=null",
                                "model.skip=add", "sample.steps=9", "train.grad_clip=1"])
    assert config.train.betas == (0.9, 0.95) and config.train.lr == 2e-4 and config.train.steps == 7
    assert config.data.root is None and config.model.overrides == {"skip": "add"}
    assert config.sample.steps == 9 and config.train.grad_clip == 1.0
    with pytest.raises(ConfigError, match="train.lr expects float"):
        load_config(None, ["lr=fast"])
    with pytest.raises(ConfigError, match="ambiguous"):
        load_config(None, ["n=3"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["steps"])


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean train\.lr.*Valid train keys: steps, lr"):
        load_config(None, ["train.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"(?s)unknown key 'trainer' \(did you mean 'train'\?\).*train: steps, lr"):
        load_config(bad)
    bad.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="did you mean data.batch_size"):
        load_config(bad)


def test_overrides_win_over_the_tiny_profile_wherever_they_appear():
    config = load_experiment(None, ["steps=9", "data.batch_size=4", "model.preset=DiT-XL/2", "tiny=true"])
    assert config.train.steps == 9 and config.data.batch_size == 4
    assert config.model.preset == "DiT-tiny"  # the profile shrinks the chosen model
    assert load_experiment(None, ["profile=tiny", "model.preset=U-ViT-tiny"]).model.preset == "U-ViT-tiny"


def test_tiny_preset_follows_the_family():
    assert tiny_preset_for("U-ViT-S/2") == "U-ViT-tiny"
    assert tiny_preset_for("IU-ViT-S/2") == "IU-ViT-tiny"
    assert tiny_preset_for("ASCEND-H-S/8") == "ASCEND-H-tiny"
    assert tiny_preset_for("DDPM-UNet") == "UNet-tiny"
    with pytest.raises(ConfigError, match="no tiny preset"):
        tiny_preset_for("Mystery-XL")


def test_invalid_values_are_rejected():
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(None, ["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="resume must be"):
        load_config(None, ["resume=maybe"])


def test_the_tiny_profile_says_what_it_swapped(capsys):
    config = load_experiment(EXPERIMENTS[0].parent / "cifar10_uvit_s2.yaml", ["tiny=true"])
    assert (config.model.preset, config.data.dataset) == ("U-ViT-tiny", "digits")
    assert "tiny profile: model U-ViT-S/2 -> U-ViT-tiny; data cifar10 -> digits" in capsys.readouterr().err


def test_the_schema_alone_cannot_resolve_tiny():
    with pytest.raises(ConfigError, match="load_experiment"):
        load_config(None, ["tiny=true"])


def test_registry_names_are_checked_before_anything_is_built():
    for override, key in [("model.preset=U-ViT-XXL", "model.preset"), ("data.dataset=mnist2", "data.dataset"),
                          ("diffusion.process=vp-ode", "diffusion.process"), ("sample.sampler=nope", "sample.sampler"),
                          ("sample.grid=cosine", "sample.grid")]:
        with pytest.raises(ConfigError, match=key):
            load_experiment(None, [override])


def test_yaml_syntax_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
