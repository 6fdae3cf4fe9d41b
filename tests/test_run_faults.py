"""Faults around a training run never lose the last good checkpoint: a zero-length last.pt, the save after a
fallback, divergence (non-finite steps or weights), a torn metrics line, temporaries of killed saves, a second
trainer on the same directory, a changed config on resume, a full disk."""
from __future__ import annotations

import json
import math
import os
import re
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


def finite_samples(checkpoint: Path) -> bool:
    """Whether the EMA model of ``checkpoint`` samples finite images."""
    from vitdiff.generate import generate, load_for_inference

    model, process, config, _, _ = load_for_inference(checkpoint)
    return bool(torch.isfinite(generate(model, process, config, n=2, steps=3)).all())


@pytest.mark.parametrize("first_steps, ckpt_every, second_steps", [(10, 5, 20), (20, 2, 60), (20, 10, 60)],
                         ids=["resume-with-a-huge-lr", "frequent-saves", "rare-saves"])
def test_after_a_divergence_the_message_names_a_working_model(tmp_path, capsys, first_steps, ckpt_every, second_steps):
    """The issue's three scenarios: a good run, then a resume with lr=1e6, whose weights stay finite (~1e6) while
    the model's output overflows. The run stops (exit 3) naming a checkpoint that samples finite images, and resuming
    as the message advises continues from it."""
    run, config = tmp_path / "run", str(config_file(tmp_path))
    common = [f"out_dir={run}", f"ckpt_every={ckpt_every}", "max_consecutive_skips=10", "grad_clip=null"]
    assert vitdiff(["train", config, f"steps={first_steps}", *common]) == 0
    capsys.readouterr()
    code = vitdiff(["train", config, f"steps={second_steps}", "lr=1e6", *common])
    err = capsys.readouterr().err
    assert code == 3, err
    named = re.search(r"training diverged at step \d+: .*; the last good checkpoint (\S+) \(step (\d+)\) is kept", err)
    assert named, err
    good, step = Path(named[1]), int(named[2])
    assert good == run / ckpt.GOOD and step == first_steps
    assert ckpt.load_checkpoint(good)["step"] == step and finite_samples(good)
    for path in run.glob("*.pt"):  # nothing broken was saved under any name
        assert finite_samples(path), path.name
    assert vitdiff(["train", config, f"steps={first_steps + 2}", *common]) == 0  # as advised: a lower lr
    assert f"resumed from {run / ckpt.LAST} at step {first_steps}" in capsys.readouterr().err
    assert finite_samples(run / ckpt.GOOD) and ckpt.load_checkpoint(run / ckpt.GOOD)["step"] == first_steps + 2


def test_a_model_with_finite_weights_but_overflowing_output_is_not_saved(tmp_path):
    run_trainer = trainer(tmp_path, "steps=8")
    real_step = run_trainer.train_step

    def overflow_at_step_3():
        result = real_step()
        if run_trainer.step == 3:
            with torch.no_grad():
                for param in run_trainer.model.parameters():
                    param.mul_(1e15)
        return result

    run_trainer.train_step = overflow_at_step_3
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: the raw or EMA model gives a non-finite output "
                                               r"or loss on the probe batch: not saved; the last good checkpoint "
                                               r".*last\.good\.pt \(step 2\) is kept"):
        run_trainer.fit()
    assert not ckpt.non_finite_weights(run_trainer.state_dict())  # the weights alone would have passed
    assert steps_of(tmp_path / "run") == (2, 1)


def test_resume_skips_a_broken_last_checkpoint_for_the_good_one(tmp_path):
    """A last.pt whose model overflows (written by an older vitdiff, before saves were verified): resume warns and
    continues from last.good.pt; the broken file is moved aside, not rotated over a good one."""
    trainer(tmp_path, "steps=2").fit()
    run = tmp_path / "run"
    trainer(tmp_path, "steps=3").fit()
    broken = ckpt.load_checkpoint(run / ckpt.LAST)
    broken["model"] = {name: value * 1e15 if value.is_floating_point() else value
                       for name, value in broken["model"].items()}
    (run / ckpt.LAST).unlink()  # last.good.pt is a link to it: the broken file replaces only last.pt
    ckpt.save_checkpoint({key: value for key, value in broken.items() if key not in ("format", "version")}, run)
    assert not os.path.samefile(run / ckpt.LAST, run / ckpt.GOOD)
    (run / ckpt.PREVIOUS).unlink()
    with pytest.warns(UserWarning, match=r"last\.pt \(step 3\) holds a model whose output or loss is not finite.*"
                                         r"using the last good checkpoint .*last\.good\.pt"):
        resumed = trainer(tmp_path, "steps=4")
    assert resumed.step == 3 and (run / "last.unusable.pt").is_file()
    resumed.fit()
    assert ckpt.load_checkpoint(run / ckpt.LAST)["step"] == 4


def test_an_incomplete_checkpoint_falls_back_in_train_sample_and_eval(tmp_path, capsys):
    trainer(tmp_path).fit()
    run = tmp_path / "run"
    torch.save({"format": "vitdiff-checkpoint", "version": 1, "step": 3}, run / ckpt.LAST)
    assert vitdiff(["sample", str(run), "--n", "1", "--steps", "1", "--out", str(tmp_path / "grid.png")]) == 0
    assert vitdiff(["eval", str(run), "--metric", "nll", "--n", "2", "--nll-steps", "1",
                    "--results", str(tmp_path / "r.jsonl")]) == 0
    with pytest.warns(UserWarning, match=r"last\.pt is incomplete \(no skipped_steps, model, .*config.*using the "
                                         r"previous checkpoint .*last\.prev\.pt \(step 1\)"):
        resumed = trainer(tmp_path, "steps=3")
    assert resumed.step == 1
    resumed.fit()
    assert steps_of(run) == (3, 2)


def test_a_kill_while_trimming_the_metrics_log_keeps_it(tmp_path, monkeypatch):
    """The log is replaced by rename: a process killed before the rename leaves the old log whole."""
    trainer(tmp_path).fit()
    log = tmp_path / "run" / "metrics.jsonl"
    with open(log, "a") as handle:  # a record past the checkpoint (a crash after logging, before saving)
        handle.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    before = log.read_text()
    real_replace = os.replace

    def killed_at_the_metrics_rename(src, dst):
        if Path(dst) == log:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_metrics_rename)
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, "steps=4").fit()
    monkeypatch.undo()
    assert log.read_text() == before and not list(log.parent.glob(".*.tmp-*"))
    trainer(tmp_path, "steps=4").fit()
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_non_finite_metrics_are_written_as_null(tmp_path, monkeypatch):
    from vitdiff.diffusion import DiffusionLoss

    real_loss_at = DiffusionLoss.loss_at
    monkeypatch.setattr(DiffusionLoss, "loss_at", lambda self, *a, **k: real_loss_at(self, *a, **k) * math.inf)
    with pytest.raises(TrainingDiverged):
        trainer(tmp_path, "steps=5").fit()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    records = [json.loads(line, parse_constant=refuse)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["loss"] for record in records] == [None, None, None]


@pytest.mark.parametrize("signals_during_save", [1, 2])
def test_a_second_signal_during_a_save_is_one_line(tmp_path, monkeypatch, capsys, signals_during_save):
    """SIGINT at step 2 asks for a save; another during that save waits for it to finish (then stops, exit 130);
    a third abandons it and the previous checkpoint stays. One line either way, no traceback."""
    import signal

    trainer(tmp_path).fit()  # steps 1-2 saved
    real_step, real_save = Trainer.train_step, ckpt.save_checkpoint

    def step_then_interrupt(self):
        result = real_step(self)
        os.kill(os.getpid(), signal.SIGINT)
        return result

    def save_while_interrupted(*args, **kwargs):
        for _ in range(signals_during_save):
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    monkeypatch.setattr(ckpt, "save_checkpoint", save_while_interrupted)
    code = vitdiff(["train", str(config_file(tmp_path)), f"out_dir={tmp_path / 'run'}", "steps=5"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("vitdiff train:")]
    assert code == 130 and len(errors) == 1 and "Traceback" not in err, err
    saved = 3 if signals_during_save == 1 else 2
    assert errors[0].startswith("vitdiff train: stopped at once at step 3 by a second SIGINT; the last good checkpoint")
    assert f"last.good.pt (step {saved}) is kept" in errors[0]
    monkeypatch.undo()
    assert ckpt.load_latest(tmp_path / "run")[0]["step"] == saved
    assert not list((tmp_path / "run").glob(".*.tmp-*"))
