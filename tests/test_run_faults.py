"""Faults around a training run never lose the last good checkpoint: a zero-length last.pt, the save after a
fallback, divergence (non-finite steps or weights), a torn metrics line, temporaries of killed saves, a second
trainer on the same directory, a changed config on resume, a full disk."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from vitdiff import checkpoint as ckpt
from vitdiff.cli import main as vitdiff
from vitdiff.config import ConfigError, load_config
from vitdiff.trainer import Trainer, TrainingDiverged

TINY = {
    "model": {"preset": "U-ViT-tiny", "dim": 32, "depth": 2, "num_heads": 2},
    "data": {"dataset": "digits", "image_size": 8, "batch_size": 8, "num_workers": 0},
    "train": {"steps": 2, "lr": 1.0e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 1, "sample_every": 0,
              "progress": False, "max_consecutive_skips": 3},
    "sample": {"sampler": "dpmpp_2m", "steps": 2},
}


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def trainer(tmp_path: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(config_file(tmp_path), [f"out_dir={tmp_path / 'run'}", *overrides]))


def steps_of(run: Path) -> tuple[int, int]:
    return tuple(ckpt.load_checkpoint(run / name)["step"] for name in (ckpt.LAST, ckpt.PREVIOUS))


def assert_finite_checkpoints(run: Path) -> None:
    for name in (ckpt.LAST, ckpt.PREVIOUS):
        assert not ckpt.non_finite_weights(ckpt.load_checkpoint(run / name)), name


def test_zero_length_last_resumes_from_the_previous_one_and_keeps_it(tmp_path, capsys):
    trainer(tmp_path).fit()
    run = tmp_path / "run"
    (run / ckpt.LAST).write_bytes(b"")
    assert vitdiff(["sample", str(run), "--n", "1", "--steps", "1", "--out", str(tmp_path / "grid.png")]) == 0
    with pytest.warns(UserWarning, match="using the previous checkpoint"):
        resumed = trainer(tmp_path, "steps=2")
    assert resumed.step == 1
    assert (run / "last.unusable.pt").stat().st_size == 0 and not (run / ckpt.LAST).exists()
    resumed.fit()  # the first save after the fallback must not rotate the bad file over the good one
    assert steps_of(run) == (2, 1)


def test_divergence_mid_run_stops_with_the_good_checkpoints(tmp_path):
    """The weights blow up at step 3 while that step's loss was still finite: nothing non-finite is saved."""
    run_trainer = trainer(tmp_path, "steps=8")
    real_step = run_trainer.train_step

    def blow_up_at_step_3():
        result = real_step()
        if run_trainer.step == 3:
            with torch.no_grad():
                next(run_trainer.model.parameters()).mul_(float("inf"))
        return result

    run_trainer.train_step = blow_up_at_step_3
    with pytest.raises(TrainingDiverged,
                       match=r"diverged at step 3: .*not finite.*last good checkpoint .*last\.good\.pt \(step 2\) is kept"):
        run_trainer.fit()
    assert steps_of(tmp_path / "run") == (2, 1)
    assert_finite_checkpoints(tmp_path / "run")


@pytest.mark.parametrize("cause", ["lr=1e6", "nan-loss"])
def test_a_diverging_run_stops_with_exit_3_and_saves_nothing_broken(tmp_path, monkeypatch, capsys, cause):
    """lr=1e6: the first update leaves finite weights (~1e6) whose output overflows, which the probe at the first
    save catches; a NaN loss at every step: the steps are skipped, none is saved, and the third in a row stops."""
    if cause == "nan-loss":  # every batch NaN (e.g. broken data): every step is skipped
        from vitdiff.diffusion import DiffusionLoss

        real_loss_at = DiffusionLoss.loss_at
        monkeypatch.setattr(DiffusionLoss, "loss_at", lambda self, *a, **k: real_loss_at(self, *a, **k) * math.nan)
    overrides = ["steps=20", f"out_dir={tmp_path / 'run'}"] + (["lr=1e6", "grad_clip=null"] if cause == "lr=1e6" else [])
    code = vitdiff(["train", str(config_file(tmp_path)), *overrides])
    err = capsys.readouterr().err
    assert code == 3, err
    expected = {"lr=1e6": "diverged at step 1: the raw or EMA model gives a non-finite output or loss on the probe "
                          "batch: not saved; no checkpoint was saved",
                "nan-loss": "diverged at step 3: 3 steps in a row had a non-finite loss or gradient norm"}[cause]
    assert expected in err and "Traceback" not in err, err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] < 20
    assert not list((tmp_path / "run").glob("*.pt"))


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path):
    trainer(tmp_path).fit()
    log = tmp_path / "run" / "metrics.jsonl"
    with open(log, "a") as handle:
        handle.write('{"step": 3, "lo')  # killed while appending
    with pytest.warns(UserWarning, match="dropped an unreadable line"):
        trainer(tmp_path, "steps=4").fit()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_temporaries_of_killed_saves_are_removed_at_start(tmp_path, capsys):
    trainer(tmp_path).fit()
    orphan = tmp_path / "run" / ".last.pt.tmp-4242"
    orphan.write_bytes(b"\0" * 4096)
    trainer(tmp_path, "steps=3")
    assert not orphan.exists() and "left by an interrupted save" in capsys.readouterr().err


def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path, capsys):
    first = trainer(tmp_path, "steps=3")
    code = vitdiff(["train", str(config_file(tmp_path)), f"out_dir={tmp_path / 'run'}", "steps=3", "lr=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "is in use by another training run (pid " in err and len(err.strip().splitlines()) == 1
    first.fit()  # the first run is not disturbed, and releases the directory when done
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    trainer(tmp_path, "steps=4").fit()


def test_changed_recipe_on_resume_is_refused_with_the_keys(tmp_path):
    trainer(tmp_path).fit()
    with pytest.raises(ConfigError, match=r"another config: train.betas saved \[0.99, 0.999\], now \[0.9, 0.99\]; "
                                          r"train.weight_decay saved 0.03, now 0.1. Resume with the saved values"):
        trainer(tmp_path, "steps=3", "weight_decay=0.1", "betas=[0.9,0.99]")


def test_changed_lr_on_resume_is_applied_and_said(tmp_path, capsys):
    trainer(tmp_path).fit()
    resumed = trainer(tmp_path, "steps=3", "lr=5e-4")
    assert "changed on resume: " in capsys.readouterr().err
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [5e-4, 5e-4]  # warm-up is over
    resumed.fit()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 5e-4


def test_full_disk_during_training_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    trainer(tmp_path).fit()

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")

    monkeypatch.setattr(torch, "save", disk_full)
    code = vitdiff(["train", str(config_file(tmp_path)), f"out_dir={tmp_path / 'run'}", "steps=3"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("vitdiff train:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in "".join(err), err
    assert "could not write checkpoint" in errors[0] and "a full disk is the usual cause" in errors[0]
    monkeypatch.undo()
    assert steps_of(tmp_path / "run") == (2, 1)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".last")) == []


def test_kill_9_mid_run_then_resume(tmp_path):
    """A real SIGKILL while training and saving every step: the lock dies with the process, the next run cleans up,
    resumes from a whole checkpoint and keeps one metrics record per step."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "vitdiff.trainer", str(config_file(tmp_path)), f"out_dir={run}",
                                "steps=100000"], stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1",
                                    "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert process.poll() is None and time.monotonic() < deadline, "the training run did not start"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = trainer(tmp_path, "steps=100000")
    assert resumed.step >= 4 and not list(run.glob(".*.tmp-*"))
    resumed.config.train.steps = resumed.step + 2
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, resumed.step + 1))


def test_a_run_directory_that_turns_unwritable_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import vitdiff.trainer as trainer_module

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(trainer_module, "open", denied, raising=False)  # the metrics log, after training started
    code = vitdiff(["train", str(config_file(tmp_path)), f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == (f"vitdiff train: Permission denied: {tmp_path / 'run' / 'metrics.jsonl'} "
                      "(fix its permissions or choose another location)")


def test_os_errors_name_the_path_and_the_cause():
    import errno
    import os

    from vitdiff.cli import user_error_message

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")
    assert user_error_message(full) == ("No space left on device: /runs/x/metrics.jsonl (free space on that disk or "
                                        "write elsewhere)")
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/grid.png")
    assert "Read-only file system: /mnt/ro/grid.png" in user_error_message(read_only)
    assert user_error_message(RuntimeError("a bug")) is None  # not a user error: keeps its traceback
