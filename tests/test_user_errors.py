"""Every user error of `vitdiff train / sample / eval` is one line on stderr and exit status 2, with no traceback
and no file written; --debug (or VITDIFF_DEBUG=1) shows the traceback instead."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vitdiff import config as config_module
from vitdiff.cli import DEBUG_ENV
from vitdiff.cli import main as vitdiff
from vitdiff.config import ConfigError, check_guidance, load_config
from vitdiff.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": {"preset": "U-ViT-tiny", "dim": 32, "depth": 2, "num_heads": 2},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 8, "num_workers": 0},
    "train": {"steps": 2, "lr": 1.0e-3, "warmup_steps": 1, "sample_every": 0, "progress": False},
    "sample": {"sampler": "dpmpp_2m", "steps": 2},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny trained (unconditional) run, a config file, a file where a directory is expected, a broken YAML."""
    root = tmp_path_factory.mktemp("user-errors")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (root / "broken.yaml").write_text("model: {preset: [\n  bad")
    (root / "afile").write_text("not a directory")
    (root / "empty").mkdir()
    torch.save({"format": "vitdiff-checkpoint", "version": 1, "step": 3}, root / "marker-only.pt")
    Trainer(load_config(root / "tiny.yaml", [f"out_dir={root / 'run'}"])).fit()
    Trainer(load_config(root / "tiny.yaml", [f"out_dir={root / 'conditional'}", "model.num_classes=10",
                                             "diffusion.cond_drop_prob=0.1"])).fit()
    return root


def snapshot(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


TRAIN = ["train", "{root}/tiny.yaml", "out_dir={root}/new-run"]
SAMPLE = ["sample", "{root}/run", "--n", "2"]
EVAL = ["eval", "{root}/run", "--metric", "nll", "--nll-steps", "1"]
# Arguments are str.format templates ({root}): a literal brace is doubled.
BAD_INPUTS = {
    # train: the whole config is checked before training or writing anything
    "yaml-syntax": (["train", "{root}/broken.yaml", "out_dir={root}/new-run"], "not valid YAML at line 2"),
    "missing-config": (["train", "{root}/nope.yaml"], "config file .* not found"),
    "unknown-preset": ([*TRAIN, "model.preset=nope"], "model.preset='nope' is not one of"),
    "unknown-dataset": ([*TRAIN, "data.dataset=nope"], "data.dataset='nope' is not one of"),
    "unknown-process": ([*TRAIN, "diffusion.process=nope"], "diffusion.process='nope' is not one of"),
    "unknown-prediction": ([*TRAIN, "diffusion.prediction=nope"], "diffusion.prediction='nope' is not one of"),
    "unknown-sampler": ([*TRAIN, "sample.sampler=nope"], "sample.sampler='nope' is not one of"),
    "config-sample-steps-0": ([*TRAIN, "sample.steps=0"], "sample.steps and sample.n must be >= 1"),
    "eval-metric": ([*TRAIN, "eval.metric=nope"], "eval.metric must be one of"),
    "config-eval-n-0": ([*TRAIN, "eval.n=0"], "eval.n must be >= 1"),
    "lr-inf": ([*TRAIN, "lr=.inf"], r"train.lr must be finite"),
    "lr-nan": ([*TRAIN, "lr=.nan"], r"train.lr must be finite"),
    "lr-negative": ([*TRAIN, "lr=-1"], r"train.lr must be > 0"),
    "guidance-nan": ([*TRAIN, "sample.guidance=.nan"], r"sample.guidance must be finite"),
    "guidance-negative": ([*TRAIN, "sample.guidance=-1"], r"sample.guidance=-1.0 is not a guidance scale"),
    "max-skips-0": ([*TRAIN, "max_consecutive_skips=0"], r"train.max_consecutive_skips must be >= 1"),
    "out-dir-is-a-file": (["train", "{root}/tiny.yaml", "out_dir={root}/afile"], "exists and is not a directory"),
    "out-dir-under-a-file": (["train", "{root}/tiny.yaml", "out_dir={root}/afile/run"], "lies under .*afile, which is a file"),
    "data-root-missing": ([*TRAIN, "data.dataset=fashion-mnist", "data.root=/nonexistent"],
                          "data.root=/nonexistent does not exist"),
    "steps-0": ([*TRAIN, "steps=0"], r"train.steps must be >= 1"),
    "image-size-negative": ([*TRAIN, "data.image_size=-16"], r"data.image_size must be >= 1"),
    "image-size-0": ([*TRAIN, "data.image_size=0"], r"data.image_size must be >= 1"),
    "image-size-not-a-patch-multiple": ([*TRAIN, "data.image_size=15"], r"image size 15 is not divisible by patch"),
    "num-workers-negative": ([*TRAIN, "data.num_workers=-1"], r"data.num_workers must be >= 0"),
    "weight-decay-negative": ([*TRAIN, "train.weight_decay=-1"], r"train.weight_decay must be >= 0"),
    "beta-min-negative": ([*TRAIN, "diffusion.process=vp-sde", "diffusion.process_kwargs={{beta_min: -1}}"],
                          r"diffusion.process_kwargs.beta_min=-1 must be a finite number > 0"),
    "sigma-range-reversed": ([*TRAIN, "diffusion.process=edm",
                              "diffusion.process_kwargs={{sigma_min: 5, sigma_max: 1}}"],
                             r"sigma_min=5 must be below sigma_max=1"),
    "process-kwarg-unknown": ([*TRAIN, "diffusion.process=edm", "diffusion.process_kwargs={{beta_min: 1}}"],
                              r"diffusion.process_kwargs=\{'beta_min': 1\} do not fit 'edm' .*unexpected keyword"),
    "section-typo": ([*TRAIN, "trian.lr=1"], r"unknown section 'trian' in 'trian.lr': did you mean 'train.lr'\?"),
    "resume-true-in-a-new-dir": ([*TRAIN, "resume=true"], r"resume=true but .*new-run has no checkpoint"),
    # sample
    "sample-missing-checkpoint": (["sample", "{root}/missing.pt"], "checkpoint .*missing.pt does not exist"),
    "sample-missing-run-dir": (["sample", "{root}/missing-dir"], "does not exist"),
    "sample-dir-without-checkpoint": (["sample", "{root}/empty"], "holds no checkpoint"),
    "sample-sampler": ([*SAMPLE, "--sampler", "nope"], "--sampler 'nope' is not one of"),
    "sample-steps-negative": ([*SAMPLE, "--steps", "-3"], "--steps must be >= 1"),
    "sample-steps-0": ([*SAMPLE, "--steps", "0"], "--steps must be >= 1"),
    "sample-guidance-negative": ([*SAMPLE, "--guidance", "-1"], "not a guidance scale"),
    "sample-guidance-nan": ([*SAMPLE, "--guidance", "nan"], "--guidance must be a finite number"),
    "sample-guidance-unconditional": ([*SAMPLE, "--guidance", "3"], "model is unconditional"),
    "sample-guidance-negative-conditional": (["sample", "{root}/conditional", "--n", "2", "--guidance", "-1"],
                                             "not a guidance scale"),
    "sample-device-nonsense": ([*SAMPLE, "--device", "nonsense"], "is not a torch device"),
    "sample-device-meta": ([*SAMPLE, "--device", "meta"], "--device meta: the model's weights cannot be held"),
    "sample-not-a-regular-file": (["sample", "/dev/null"], "/dev/null is not a regular checkpoint file"),
    "sample-incomplete-checkpoint": (["sample", "{root}/marker-only.pt"],
                                     r"marker-only.pt is incomplete \(no skipped_steps, model, ema, .*config"),
    "sample-n-0": ([*SAMPLE[:2], "--n", "0"], r"--n must lie in 1\.\.4096"),
    "sample-n-huge": ([*SAMPLE[:2], "--n", "1000000000"], r"--n must lie in 1\.\.4096"),
    "sample-batch-size-0": ([*SAMPLE, "--batch-size", "0"], "--batch-size must be >= 1"),
    "out-is-a-directory": ([*SAMPLE, "--out", "{root}/empty"], "exists and is not a file"),
    "out-without-extension": ([*SAMPLE, "--out", "{root}/grid"], "no extension is not an image format"),
    "out-txt": ([*SAMPLE, "--out", "{root}/grid.txt"], r"\.txt is not an image format"),
    "out-under-a-file": ([*SAMPLE, "--out", "{root}/afile/grid.png"], "which is a file"),
    # eval
    "eval-n-negative": ([*EVAL, "--n", "-4"], r"--n must lie in 1\.\.50000"),
    "eval-n-0": ([*EVAL, "--n", "0"], r"--n must lie in 1\.\.50000"),
    "eval-n-huge": ([*EVAL, "--n", "1000000000"], r"--n must lie in 1\.\.50000"),
    "eval-n-above-test-set": ([*EVAL, "--n", "5000", "--results", "{root}/r.jsonl"], "exceeds the 297 test images"),
    "eval-missing-checkpoint": (["eval", "{root}/missing.pt"], "does not exist"),
    "eval-incomplete-checkpoint": (["eval", "{root}/marker-only.pt", "--n", "2"], r"marker-only.pt is incomplete"),
    "eval-results-is-a-directory": ([*EVAL, "--n", "2", "--results", "{root}/empty"], "exists and is not a file"),
    "eval-nll-steps-0": ([*EVAL, "--n", "2", "--nll-steps", "0"], "--nll-steps must be >= 1"),
}
if not torch.cuda.is_available():
    BAD_INPUTS["sample-device-cuda-without-gpu"] = ([*SAMPLE, "--device", "cuda"], "0 CUDA devices: use --device cpu")


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, workspace, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv, message = BAD_INPUTS[case]
    before = snapshot(workspace)
    code = vitdiff([arg.format(root=workspace) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitdiff "), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(workspace) == before


def test_unwritable_out_dir_fails_before_training(workspace, monkeypatch, capsys):
    """A read-only mount or a folder without permission (simulated: the tests may run as root, which
    permissions do not stop)."""
    real_access = os.access
    monkeypatch.setattr(config_module.os, "access",
                        lambda path, mode: False if Path(path) == workspace else real_access(path, mode))
    before = snapshot(workspace)
    assert vitdiff(["train", str(workspace / "tiny.yaml"), f"out_dir={workspace / 'new-run'}"]) == 2
    assert vitdiff(["sample", str(workspace / "run"), "--n", "2", "--out", str(workspace / "grid.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("is not writable (read-only file system or no permission)") == 2, err
    assert snapshot(workspace) == before


def test_guidance_ranges_per_convention():
    check_guidance(0.0, "dit", "g"), check_guidance(4.0, "dit", "g"), check_guidance(-1.0, "uvit", "g")
    for value, convention in [(-0.5, "dit"), (-1.5, "uvit"), (float("inf"), "dit"), (float("nan"), "uvit")]:
        with pytest.raises(ConfigError, match="is not a guidance scale"):
            check_guidance(value, convention, "g")


def test_debug_shows_the_traceback(workspace, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "0")  # off, and restored after the test (--debug sets it for child processes)
    with pytest.raises(FileNotFoundError):
        vitdiff(["--debug", "sample", str(workspace / "missing.pt")])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ConfigError):
        vitdiff(["sample", str(workspace / "run"), "--steps", "0"])


@pytest.mark.parametrize("argv", [["vitdiff.cli", "sample", "{root}/missing.pt"],
                                  ["vitdiff.trainer", "{root}/tiny.yaml", "lr=.inf", "out_dir={root}/new-run"]])
def test_a_real_process_prints_one_line(argv, workspace):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(DEBUG_ENV, None)
    result = subprocess.run([sys.executable, "-m", *[arg.format(root=workspace) for arg in argv]], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr


def test_ddp_launch_reports_a_user_error_in_one_line(workspace):
    """`vitdiff train --nproc-per-node 2`: each rank stops on the bad config, rank 0 says why, and torchrun's
    ChildFailedError report is not added."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(DEBUG_ENV, None)
    result = subprocess.run([sys.executable, "-m", "vitdiff.cli", "train", "--nproc-per-node", "2",
                             str(workspace / "tiny.yaml"), "lr=.inf", f"out_dir={workspace / 'new-run'}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["vitdiff train: train.lr must be finite (inf or nan given)"], \
        result.stderr[-3000:]


def test_guidance_on_a_conditional_model_still_works(workspace, tmp_path):
    assert vitdiff(["sample", str(workspace / "conditional"), "--n", "2", "--steps", "1", "--guidance", "2",
                    "--out", str(tmp_path / "guided.png")]) == 0
    assert (tmp_path / "guided.png").is_file()
