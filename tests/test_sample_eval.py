"""`vitdiff sample` and `vitdiff eval` on a checkpoint from a tiny training run."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from vitdiff.cli import main as vitdiff
from vitdiff.config import load_config
from vitdiff.generate import load_for_inference
from vitdiff.metrics import FD_METRIC_NAMES
from vitdiff.trainer import Trainer

TINY = {
    "model": {"preset": "U-ViT-tiny", "dim": 32, "depth": 2, "num_heads": 2},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 8, "num_workers": 0},
    "train": {"steps": 3, "lr": 1.0e-3, "warmup_steps": 1, "ema_decay": 0.999, "sample_every": 0, "progress": False},
    "sample": {"sampler": "dpmpp_2m", "steps": 3},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    Trainer(load_config(root / "tiny.yaml", [f"out_dir={root / 'run'}"])).fit()
    return root / "run"


def test_sample_writes_a_seeded_grid(run_dir, tmp_path):
    args = ["sample", str(run_dir), "--n", "4", "--steps", "2", "--seed", "1"]
    assert vitdiff([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert vitdiff([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert vitdiff([*args, "--no-ema", "--out", str(tmp_path / "raw.png")]) == 0
    a, b = (Image.open(tmp_path / name) for name in ("a.png", "b.png"))
    assert a.size == (2 * (8 + 2) + 2,) * 2  # a 2x2 grid of 8x8 images with 2-px padding
    assert a.tobytes() == b.tobytes()  # same seed, same images
    assert (tmp_path / "raw.png").is_file()


def test_inference_loads_ema_or_raw_weights(run_dir):
    ema_model, *_ = load_for_inference(run_dir, ema=True)
    raw_model, _, config, state, path = load_for_inference(run_dir / "last.pt", ema=False)
    assert path.name == "last.pt" and state["step"] == 3 and config.model.preset == "U-ViT-tiny"
    for name, value in raw_model.state_dict().items():
        assert torch.equal(value, state["model"][name])
    assert any(not torch.equal(value, raw_model.state_dict()[name]) for name, value in ema_model.state_dict().items())


def test_eval_saves_the_number_with_its_protocol(run_dir, tmp_path):
    results = tmp_path / "results.jsonl"
    assert vitdiff(["eval", str(run_dir), "--metric", "nll", "--n", "4", "--nll-steps", "2",
                    "--results", str(results)]) == 0
    assert vitdiff(["eval", str(run_dir), "--metric", "fd-clf", "--n", "16", "--steps", "2", "--seed", "3",
                    "--results", str(results)]) == 0
    nll, fd = (json.loads(line) for line in results.read_text().splitlines())
    assert nll["metric"] == "NLL-bpd" and nll["label"] == "NLL-bpd@4" and nll["value"] > 0
    assert nll["reference"] == "digits:test" and nll["steps"] == 2
    assert fd["metric"] == FD_METRIC_NAMES["digits"] and fd["label"] == f"{FD_METRIC_NAMES['digits']}@16"
    assert fd["value"] > 0 and fd["reference"] == "digits:train at 8x8"  # the reference at the samples' size
    assert (fd["sampler"], fd["steps"], fd["guidance"], fd["guidance_convention"], fd["seed"]) == ("dpmpp_2m", 2, 1.0,
                                                                                                  "dit", 3)
    assert fd["checkpoint"] == str((run_dir / "last.pt").resolve())
    assert fd["extra"]["ema"] is True and fd["extra"]["step"] == 3


def test_fid_without_inception_weights_fails_cleanly(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VITDIFF_INCEPTION_WEIGHTS", raising=False)
    code = vitdiff(["eval", str(run_dir), "--metric", "fid", "--n", "2", "--steps", "1",
                    "--inception-weights", str(tmp_path / "missing.pth")])
    assert code == 2
    assert "Inception-v3 weights" in capsys.readouterr().err
