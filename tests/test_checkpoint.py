"""Checkpoints: atomic writes survive a crash mid-save, damaged files fail clearly and fall back to the previous
one, hostile pickles are refused without running, and every RNG round-trips."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdiff import checkpoint as ckpt


def state(step: int) -> dict:
    """A small state with every key a training checkpoint must hold."""
    return {"step": step, "skipped_steps": 0, "model": {"weight": torch.full((4, 4), float(step))}, "ema": {},
            "optimizer": {}, "scheduler": {}, "rng": [ckpt.capture_rng_state()], "data": [{}], "config": {},
            "world_size": 1}


def test_save_rotates_the_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(state(1), tmp_path)
    ckpt.save_checkpoint(state(2), tmp_path)
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert ckpt.load_checkpoint(tmp_path / "last.prev.pt")["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pt", "last.pt"]  # no temporary file left


def test_crash_while_writing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(state(1), tmp_path)
    real_save = torch.save

    def save_half_then_die(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(handle.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint .*last\.pt \(disk full; \d+ MiB free"):
        ckpt.save_checkpoint(state(2), tmp_path)
    assert ckpt.load_latest(tmp_path)[0]["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_torch_write_error_of_a_full_disk_names_the_cause(tmp_path, monkeypatch):
    """torch reports ENOSPC as "[enforce fail at inline_container.cc] . unexpected pos": the message says disk."""
    ckpt.save_checkpoint(state(1), tmp_path)

    def disk_full(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4000")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0})())
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected pos .*a full disk is the usual cause; 0 MiB free"):
        ckpt.save_checkpoint(state(2), tmp_path)
    assert ckpt.load_latest(tmp_path)[0]["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_non_finite_weights_are_never_saved(tmp_path):
    ckpt.save_checkpoint(state(1), tmp_path)
    ckpt.save_checkpoint(state(2), tmp_path)
    for bad in (float("nan"), float("inf")):
        diverged = state(3)
        diverged["ema"] = {"module.weight": torch.tensor([1.0, bad])}
        with pytest.raises(ckpt.NonFiniteStateError, match=r"ema\.module\.weight.*last good checkpoint stays"):
            ckpt.save_checkpoint(diverged, tmp_path)
    assert ckpt.load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert ckpt.load_checkpoint(tmp_path / "last.prev.pt")["step"] == 1


def test_zero_length_last_falls_back_to_the_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(state(1), tmp_path)
    ckpt.save_checkpoint(state(2), tmp_path)
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(ckpt.CorruptCheckpointError, match="corrupt or truncated"):
        ckpt.load_checkpoint(tmp_path / "last.pt")
    with pytest.warns(UserWarning, match="using the previous checkpoint"):
        loaded, path = ckpt.load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == "last.prev.pt"


def test_crash_between_the_renames_falls_back_to_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(state(1), tmp_path)
    real_replace = os.replace
    calls = []

    def die_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after last.pt -> last.prev.pt, before the new file took its name
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(state(2), tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "last.pt").exists()
    loaded, path = ckpt.load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == "last.prev.pt"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bit-flip-in-a-tensor"])
def test_damaged_file_gives_a_clear_error_and_load_latest_falls_back(tmp_path, damage):
    ckpt.save_checkpoint(state(1), tmp_path)
    ckpt.save_checkpoint(state(2), tmp_path)
    newest = tmp_path / "last.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "garbage":
        data[100:-100] = os.urandom(len(data) - 200)
    else:  # the structure stays intact: only the record checksums can tell
        data[data.find(torch.full((4, 4), 2.0).numpy().tobytes())] ^= 0x10
    newest.write_bytes(data)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"last\.pt is corrupt or truncated .*delete it to fall back "
                                                           r"to last\.prev\.pt / retrain"):
        ckpt.load_checkpoint(newest)
    with pytest.warns(UserWarning, match="using the previous checkpoint"):
        loaded, path = ckpt.load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == "last.prev.pt"


def test_no_usable_checkpoint_is_an_error(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.load_latest(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a vitdiff training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "plain.pt")


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, container):
    marker = tmp_path / "code-ran"
    payload = {"format": ckpt.FORMAT, "version": 1, "step": 1, "model": RunsCode(marker)}
    path = tmp_path / "hostile.pt"
    if container == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="weights_only"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCode(marker)))  # the payload is live: plain unpickling runs it
    assert marker.exists()


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    ckpt.save_checkpoint({**state(0), "rng": [ckpt.capture_rng_state()]}, tmp_path)
    expected = random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "last.pt")["rng"][0])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_run_directory_lock_names_its_holder_and_dies_with_it(tmp_path):
    held = ckpt.lock_run_directory(tmp_path / "run")
    with pytest.raises(ckpt.RunLockedError, match=rf"in use by another training run \(pid {os.getpid()} on "):
        ckpt.lock_run_directory(tmp_path / "run")
    held.close()
    ckpt.lock_run_directory(tmp_path / "run").close()

    # A holder killed with SIGKILL cannot clean up: the kernel releases the lock.
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vitdiff import checkpoint as c; "
                               f"h = c.lock_run_directory({str(tmp_path / 'run')!r}); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ckpt.RunLockedError, match=rf"pid {holder.pid} "):
        ckpt.lock_run_directory(tmp_path / "run")
    holder.kill()
    holder.wait()
    ckpt.lock_run_directory(tmp_path / "run").close()


def test_stale_temporaries_are_removed(tmp_path):
    ckpt.save_checkpoint(state(1), tmp_path)
    (tmp_path / ".last.pt.tmp-999999").write_bytes(b"x" * 1000)  # what kill -9 during a save leaves
    assert [p.name for p in ckpt.remove_stale_temporaries(tmp_path)] == [".last.pt.tmp-999999"]
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_verified_save_is_linked_as_last_good_which_rotation_keeps(tmp_path):
    ckpt.save_checkpoint(state(1), tmp_path, verified=True)
    ckpt.save_checkpoint(state(2), tmp_path)
    ckpt.save_checkpoint(state(3), tmp_path)
    assert ckpt.load_checkpoint(tmp_path / ckpt.GOOD)["step"] == 1  # rotated out of last.pt and last.prev.pt
    ckpt.save_checkpoint(state(4), tmp_path, verified=True)
    assert os.path.samefile(tmp_path / ckpt.GOOD, tmp_path / ckpt.LAST)  # a link, not a second copy
    assert sorted(os.listdir(tmp_path)) == ["last.good.pt", "last.prev.pt", "last.pt"]


def test_load_latest_falls_back_to_last_good_past_non_finite_weights(tmp_path):
    ckpt.save_checkpoint(state(1), tmp_path, verified=True)
    for step in (2, 3):
        ckpt.save_checkpoint(state(step), tmp_path)
        broken = ckpt.load_checkpoint(tmp_path / ckpt.LAST)
        broken["model"]["weight"][0, 0] = float("nan")
        torch.save(broken, tmp_path / ckpt.LAST)  # as an older vitdiff could have left it
    with pytest.warns(UserWarning, match=r"last\.pt holds 1 non-finite weight tensors \(e\.g\. model\.weight\)"):
        loaded, path = ckpt.load_latest(tmp_path)
    assert loaded["step"] == 1 and path.name == ckpt.GOOD


@pytest.mark.parametrize("missing", ckpt.REQUIRED_KEYS)
def test_a_checkpoint_missing_a_key_is_corrupt(tmp_path, missing):
    incomplete = {key: value for key, value in state(1).items() if key != missing}
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, **incomplete}, tmp_path / "last.pt")
    with pytest.raises(ckpt.CorruptCheckpointError, match=rf"last\.pt is incomplete \(no {missing}\)"):
        ckpt.load_checkpoint(tmp_path / "last.pt")


def test_a_device_file_is_not_a_regular_checkpoint():
    with pytest.raises(ckpt.CheckpointError, match="/dev/null is not a regular checkpoint file"):
        ckpt.load_checkpoint("/dev/null")


def test_a_full_disk_on_a_fresh_directory_claims_no_previous_checkpoint(tmp_path, monkeypatch):
    def disk_full(obj, handle, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write .*: no checkpoint was saved yet; fix it") as error:
        ckpt.save_checkpoint(state(1), tmp_path)
    assert "intact" not in str(error.value) and os.listdir(tmp_path) == []
