"""train.precision: bf16 training on CPU agrees with fp32 within seed noise; `auto` chooses by device and speed."""
from __future__ import annotations

import gc
import json
import math
import time

import pytest
import torch

from vitdiff import precision as precision_module
from vitdiff.config import Config, ConfigError, load_config
from vitdiff.precision import resolve_precision
from vitdiff.trainer import Trainer

# A dropout-free U-ViT on 8x8 digits (4 patch tokens): ~5 ms a step on one thread, 300 steps a run.
AGREEMENT_RUN = {
    "model": {"preset": "U-ViT-tiny", "dim": 32, "depth": 2, "num_heads": 2},
    "diffusion": {"process": "vp-sde"},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 16, "num_workers": 0},
    "train": {"steps": 300, "lr": 2e-3, "warmup_steps": 10, "log_every": 20, "ckpt_every": 10_000,
              "sample_every": 0, "progress": False},
}


def train_curve(tmp_path, precision: str, seed: int) -> tuple[list[float], set]:
    """(logged losses, the precisions the records say) of one run."""
    raw = {**AGREEMENT_RUN, "out_dir": str(tmp_path / f"{precision}-{seed}"),
           "train": {**AGREEMENT_RUN["train"], "precision": precision, "seed": seed}}
    trainer = Trainer(Config.from_dict(raw), progress=False)
    trainer.fit()
    records = [json.loads(line) for line in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records], {r["precision"] for r in records}


def mean_log_gap(a: list[float], b: list[float]) -> float:
    return sum(abs(math.log(x) - math.log(y)) for x, y in zip(a, b)) / len(a)


def test_bf16_loss_curve_agrees_with_fp32_within_seed_noise(tmp_path):
    fp32, fp32_said = train_curve(tmp_path, "fp32", seed=0)
    bf16, bf16_said = train_curve(tmp_path, "bf16", seed=0)
    other_seed, _ = train_curve(tmp_path, "fp32", seed=1)
    assert fp32_said == {"fp32"} and bf16_said == {"bf16"}
    assert bf16 != fp32                            # autocast really changed the arithmetic
    assert fp32[-1] < 0.8 * fp32[0] and bf16[-1] < 0.8 * bf16[0]  # both learned
    precision_gap, seed_gap = mean_log_gap(bf16, fp32), mean_log_gap(other_seed, fp32)
    assert precision_gap < seed_gap, f"bf16 vs fp32 {precision_gap:.4f}, seed 1 vs seed 0 {seed_gap:.4f}"


def test_resume_keeps_the_chosen_precision(tmp_path, monkeypatch):
    """auto decides once, at the first step; a resumed run keeps that choice whatever a new probe would say
    (resume stays bit-exact), and a changed train.precision is refused like any other recipe change."""
    raw = {**AGREEMENT_RUN, "out_dir": str(tmp_path / "run"),
           "train": {**AGREEMENT_RUN["train"], "steps": 2, "precision": "auto"}}
    monkeypatch.setattr(precision_module, "resolve_precision", lambda *args: "bf16")
    first = Trainer(Config.from_dict(raw), progress=False)
    first.fit()
    assert first.precision == "bf16"
    monkeypatch.setattr(precision_module, "resolve_precision", lambda *args: "fp32")
    raw["train"] = {**raw["train"], "steps": 3}
    resumed = Trainer(Config.from_dict(raw), progress=False)
    assert resumed.step == 2 and resumed.precision == "bf16"
    del resumed  # a trainer holds its run directory's lock until it is gone
    gc.collect()
    raw["train"] = {**raw["train"], "precision": "fp32"}
    with pytest.raises(ConfigError, match="train.precision saved 'auto', now 'fp32'"):
        Trainer(Config.from_dict(raw), progress=False)


def test_precision_setting_and_the_old_bf16_key(tmp_path):
    assert load_config(None, ["precision=bf16"]).train.precision == "bf16"
    assert Config().train.precision == "auto"
    with pytest.raises(ConfigError, match="fp32, bf16, auto"):
        load_config(None, ["precision=fp16"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.bf16=true"])
    # Checkpoints written before the rename still load: bf16 true meant bf16 where it pays, false fp32.
    assert Config.from_dict({"train": {"bf16": True}}).train.precision == "auto"
    assert Config.from_dict({"train": {"bf16": False}}).train.precision == "fp32"


def fake_step(seconds: dict[str, float], calls: list[str]):
    def step(precision: str) -> None:
        calls.append(precision)
        time.sleep(seconds[precision])
    return step


@pytest.mark.parametrize("bf16_seconds, expected", [(0.002, "bf16"), (0.03, "fp32")])
def test_auto_on_cpu_takes_bf16_only_when_the_probe_finds_it_faster(monkeypatch, bf16_seconds, expected):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: True)
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    calls: list[str] = []
    before = torch.random.get_rng_state()
    step = fake_step({"fp32": 0.01, "bf16": bf16_seconds}, calls)
    assert resolve_precision("auto", torch.device("cpu"), model, step) == expected
    assert set(calls) == {"fp32", "bf16"}
    assert all(p.grad is None for p in model.parameters())   # the probe's gradients are dropped
    assert torch.equal(torch.random.get_rng_state(), before)


def test_auto_without_native_bf16_is_fp32_and_explicit_settings_are_kept(monkeypatch):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: False)
    calls: list[str] = []
    step = fake_step({"fp32": 0.0, "bf16": 0.0}, calls)
    model = torch.nn.Linear(2, 2)
    assert resolve_precision("auto", torch.device("cpu"), model, step) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu"), model, step) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu"), model, step) == "fp32"
    assert calls == []                                         # nothing to measure
