"""Full-state training checkpoints that survive crashes and cannot run code.

A checkpoint holds everything a run needs to continue bit-exactly: model,
EMA, optimizer and LR-scheduler state, the step, every random generator
(python, numpy, torch CPU, CUDA) and the data position, plus the config.

Writing is atomic: the new file is written to a temporary name in the same
directory, flushed and fsynced, then the current ``last.pt`` is renamed to
``last.prev.pt`` and the new file renamed to ``last.pt`` (``os.replace``), and
the directory is fsynced. A crash at any moment leaves at least one whole
checkpoint, and :func:`load_latest` falls back to ``last.prev.pt``, then
``last.good.pt``, with a warning when ``last.pt`` is missing, truncated, corrupt,
lacks a required key or holds non-finite weights. A state whose model or EMA
weights are not finite is refused before anything is written, so a diverged run
never rotates a good checkpoint out. A save the caller has verified (the trainer
runs the model on a probe batch first) is also linked as ``last.good.pt``, which
rotation never touches. Torch's own "unexpected pos" write error is reported with
the free space of the disk, its usual cause. :func:`write_atomically` is the same
temporary-then-rename write for any other file a run rewrites.

A training run holds an OS lock on its directory (:func:`lock_run_directory`,
``fcntl.flock``: released when the process dies, however it dies) so two trainers
never write one run; the holder then removes what dead writers left
(:func:`remove_stale_temporaries`).

Reading first checks every record's CRC32 (torch.load does not, so a flipped
bit in a tensor would load silently), then uses ``torch.load(weights_only=True)``,
which refuses any pickle that would import or call code, so a hostile file
raises instead of running. That is why the RNG states are stored as tensors and
plain Python types.
"""
from __future__ import annotations

import fcntl
import os
import pickle
import random
import shutil
import socket
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch

from .config import UserError

FORMAT = "vitdiff-checkpoint"
VERSION = 1
LAST = "last.pt"
PREVIOUS = "last.prev.pt"
GOOD = "last.good.pt"  # the newest verified checkpoint: a hard link to it (a copy where links are not supported)
LOCK = ".lock"
TEMPORARY_GLOB = ".*.tmp-*"  # write_atomically's temporary names: .<name>.tmp-<pid>
# What a training checkpoint must hold (``text`` and ``precision`` are optional: older checkpoints lack them).
REQUIRED_KEYS = ("step", "skipped_steps", "model", "ema", "optimizer", "scheduler", "rng", "data", "config",
                 "world_size")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be used, or a state that must not be written."""


class CorruptCheckpointError(CheckpointError):
    pass


class UnsafeCheckpointError(CheckpointError):
    pass


class NonFiniteStateError(CheckpointError):
    pass


class RunLockedError(UserError):
    pass


# -- random generators ------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Every global generator's state as tensors and plain types (loadable with weights_only=True)."""
    version, internal, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            warnings.warn(f"checkpoint has CUDA RNG states for {len(state['cuda'])} devices, this machine has "
                          f"{torch.cuda.device_count()}: the CUDA generators are not restored")
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


# -- writing -----------------------------------------------------------------------
def non_finite_weights(state: dict[str, Any]) -> list[str]:
    """Names of the model and EMA tensors (``state["model"]``, ``state["ema"]``) holding inf or nan."""
    named = [(f"{part}.{name}", value) for part in ("model", "ema") for name, value in (state.get(part) or {}).items()
             if torch.is_tensor(value) and value.is_floating_point() and value.numel()]
    if not named:
        return []
    # A tensor's min and max show any nan (they propagate it) or inf: one pass, no boolean copy (isfinite().all() is
    # ~40x slower on CPU), and one host sync for all tensors.
    device = named[0][1].device
    extremes = torch.stack([torch.stack(torch.aminmax(value)).float().to(device) for _, value in named])
    finite = torch.isfinite(extremes).all(dim=1).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def check_finite(state: dict[str, Any]) -> None:
    bad = non_finite_weights(state)
    if bad:
        raise NonFiniteStateError(f"{len(bad)} weight tensors are not finite (e.g. {bad[0]}): not saved, so the last "
                                  "good checkpoint stays")


def save_checkpoint(state: dict[str, Any], directory: str | Path, name: str = LAST, *,
                    verified: bool = False) -> Path:
    """Atomically write ``state`` to ``directory/name``, keeping the previous file as ``last.prev.pt``; a
    ``verified`` state (its model was checked to work) also becomes ``last.good.pt``.

    Non-finite model or EMA weights raise :class:`NonFiniteStateError` and write nothing."""
    check_finite(state)
    directory = Path(directory)
    target = directory / name
    payload = {"format": FORMAT, "version": VERSION, **state}

    def rotate():
        if name == LAST and target.exists():
            os.replace(target, directory / PREVIOUS)

    try:
        write_atomically(target, lambda handle: torch.save(payload, handle), before_rename=rotate)
    except (OSError, RuntimeError) as error:  # torch's writer turns ENOSPC into "unexpected pos"
        if isinstance(error, OSError):
            cause = error.strerror or _first_line(error)
        else:
            cause = f"{_first_line(error)}, a full disk is the usual cause"
        free = shutil.disk_usage(directory).free
        kept = latest_path(directory)
        kept = f"the previous checkpoint {kept.name} is intact" if kept else "no checkpoint was saved yet"
        raise CheckpointError(f"could not write checkpoint {target} ({cause}; {free / 2**20:.0f} MiB free on "
                              f"that disk): {kept}; fix it and run again") from error
    if verified:
        _link_atomically(target, directory / GOOD)
    return target


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], *,
                     before_rename: Callable[[], None] | None = None) -> None:
    """Replace ``path`` by what ``write(handle)`` writes: into a temporary file beside it, fsynced, then renamed
    over ``path`` (``before_rename`` runs just before) and the directory fsynced. A crash at any moment leaves the
    old file or the new one, never a part; the temporary of a killed process is :data:`TEMPORARY_GLOB`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def copy_atomically(source: str | Path, target: str | Path) -> None:
    """Replace ``target`` by a copy of ``source`` (:func:`write_atomically`: the old file or the whole copy)."""
    def copy(handle):
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)

    write_atomically(target, copy)


def _link_atomically(source: Path, link: Path) -> None:
    """Make ``link`` name the file ``source`` names (a hard link: no extra space), replacing it atomically."""
    temporary = link.parent / f".{link.name}.tmp-{os.getpid()}"
    try:
        os.link(source, temporary)
    except OSError:  # a file system without hard links
        copy_atomically(source, link)
        return
    try:
        os.replace(temporary, link)
        _fsync_directory(link.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable: a rename lives in the directory entry, not in the file."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading -----------------------------------------------------------------------
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint safely; corrupt, truncated or code-carrying files raise :class:`CheckpointError`."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular checkpoint file: pass a checkpoint (last.pt) or its run "
                              "directory")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        _verify_zip_checksums(path)
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds objects that safe loading (weights_only=True) refuses: it was not written "
            f"by vitdiff, is damaged, or carries code. Do not load it with weights_only=False unless you trust "
            f"its source; delete it to fall back to {PREVIOUS} / retrain. ({str(error).split('.')[0]})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as error:
        raise CorruptCheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {_first_line(error)}): "
            f"delete it to fall back to {PREVIOUS} / retrain") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a vitdiff training checkpoint (no '{FORMAT}' marker); "
                              "`vitdiff train` writes them as <out_dir>/last.pt")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state['version']}, newer than this "
                              f"vitdiff ({VERSION}): upgrade vitdiff")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete (no {', '.join(missing)}): delete it to fall "
                                     f"back to {PREVIOUS} / retrain")
    return state


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "no message"


def _verify_zip_checksums(path: Path) -> None:
    """torch.load does not check the CRC32 of each record, so a flipped bit in a tensor would load silently."""
    if not zipfile.is_zipfile(path):
        return  # not torch's zip format: torch.load reports it
    with zipfile.ZipFile(path) as archive:
        damaged = archive.testzip()
    if damaged is not None:
        raise zipfile.BadZipFile(f"record {damaged} fails its CRC32 check")


def load_latest(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest usable checkpoint in ``directory``: ``last.pt``, else ``last.prev.pt``, else ``last.good.pt``
    (unusable: unreadable, incomplete, or non-finite weights); None if none exists."""
    directory = Path(directory)
    existing = [directory / name for name in (LAST, PREVIOUS, GOOD) if (directory / name).is_file()]
    if not existing:
        return None
    failures = []
    for path in existing:
        try:
            state = load_checkpoint(path, map_location)
            bad = non_finite_weights(state)
            if bad:
                raise NonFiniteStateError(f"checkpoint {path} holds {len(bad)} non-finite weight tensors "
                                          f"(e.g. {bad[0]})")
        except CheckpointError as error:
            failures.append(error)
            continue
        for error in failures:
            warnings.warn(f"{error}; using the previous checkpoint {path} (step {state.get('step')}) instead")
        return state, path
    raise CheckpointError("no usable checkpoint in " + str(directory) + ":\n  " + "\n  ".join(map(str, failures)))


def latest_path(directory: str | Path) -> Path | None:
    """The path :func:`load_latest` would try first, without loading it."""
    for name in (LAST, PREVIOUS, GOOD):
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


# -- the run directory -------------------------------------------------------------------
def lock_run_directory(directory: str | Path):
    """Hold an exclusive OS lock on ``directory`` (created if needed) for as long as the returned file stays open;
    the kernel releases it when the process dies. A directory held by another process raises
    :class:`RunLockedError` naming the holder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(f"{directory} is in use by another training run ({holder}): wait for it to finish or "
                             "stop it, or choose another out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files of interrupted saves (a process killed while writing), in ``directory`` and its
    sub-folders (sample grids). Call it only while holding :func:`lock_run_directory`: then no live process is
    writing them."""
    stale = sorted(Path(directory).rglob(TEMPORARY_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
