"""The quick start as a new user meets it: `make demo` per profile, its terminal output, and the set-up's torch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_dry_run(*arguments: str) -> str:
    """The commands `make` would run (nothing is executed), with a venv path that does not exist."""
    result = subprocess.run(["make", "-n", "-B", *arguments, "VENV=/nonexistent/venv"], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    return result.stdout


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@needs_make
def test_each_demo_profile_has_its_own_folder_and_streams_its_output():
    for profile in ("smoke", "cpu"):
        commands = make_dry_run("demo", f"PROFILE={profile}")
        papermill = next(line for line in commands.splitlines() if "papermill" in line)
        assert "--log-output" in papermill
        assert f"-p out_dir outputs/01_quickstart/{profile}" in commands
        assert f"outputs/01_quickstart/{profile}/01_quickstart.ipynb" in papermill


@needs_make
def test_setup_asks_the_cpu_index_for_torch_only_without_an_nvidia_driver():
    pins = "torch==2.14.1 torchvision==0.29.1"
    cpu = make_dry_run("setup", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert f"--index-url https://download.pytorch.org/whl/cpu {pins}" in cpu
    assert "install -r requirements.txt" in cpu  # then the rest, torch already satisfied
    pypi_only = make_dry_run("setup", "TORCH_INDEX=")
    assert "--index-url" not in pypi_only
    default = make_dry_run("setup")
    assert ("--index-url https://download.pytorch.org/whl/cpu" in default) == (shutil.which("nvidia-smi") is None)


def test_the_notebook_shows_training_progress_in_the_terminal(tmp_path):
    """papermill --log-output (as `make demo` runs it) prints the trainer's progress bar as it trains."""
    pytest.importorskip("papermill")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "papermill", "--log-output", "notebooks/01_quickstart.ipynb",
                             str(tmp_path / "out.ipynb"), "-p", "profile", "smoke", "-p", "out_dir", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    terminal = result.stdout + result.stderr
    assert "IU-ViT (class-conditional): 100%" in terminal and "4/4" in terminal
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "results.csv").is_file()
