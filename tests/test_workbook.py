"""The notebooks' shared layer: profiles, configs, run reuse, tables and output checks."""
import json

import pandas as pd
import pytest
import torch

from vitdiff import workbook as wb


def test_profile_from_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("VITDIFF_PROFILE", "smoke")
    assert wb.get_profile().name == "smoke"
    monkeypatch.delenv("VITDIFF_PROFILE")
    assert wb.get_profile().name == "cpu"
    profile = wb.get_profile("smoke", steps=3, seeds=[4, 5], dataset="digits")
    assert (profile.steps, profile.seeds, profile.dataset) == (3, (4, 5), "digits")
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        wb.get_profile("laptop")


def test_variant_presets_follow_the_profile():
    assert wb.Variant("x", "IU-ViT").preset_for(wb.PROFILES["cpu"]) == "IU-ViT-tiny"
    assert wb.Variant("x", "UNet").preset_for(wb.PROFILES["gpu"]) == "DDPM-UNet"
    assert wb.Variant("x", "DiT").preset_for(wb.PROFILES["gpu"]) == "DiT-S/2"
    assert wb.Variant("x", "DiT", preset="DiT-B/4").preset_for(wb.PROFILES["cpu"]) == "DiT-B/4"


def test_make_config_carries_switches_and_protocol(tmp_path):
    profile = wb.get_profile("smoke")
    config = wb.make_config(wb.Variant("add", "IU-ViT", {"skip": "add"}), profile, 3, tmp_path, cond_drop_prob=0.1)
    assert config.model.preset == "IU-ViT-tiny" and config.model.overrides == {"skip": "add"}
    assert config.train.seed == 3 and config.train.steps == profile.steps
    assert config.diffusion.cond_drop_prob == 0.1 and config.sample.grid == profile.grid
    assert "FD-digits-clf@32" in wb.protocol(profile)


def test_text_config_takes_the_profiles_diffusion_recipe(tmp_path):
    profile = wb.text_profile("cpu")
    config = wb.make_text_config(profile, 0, tmp_path)
    assert (config.diffusion.process, config.diffusion.prediction) == (profile.process, profile.prediction)
    assert config.diffusion.process_kwargs == {"p_mean": 0.4, "p_std": 1.0} and config.diffusion.cond_drop_prob == 0.1
    assert "edm(p_mean=0.4, p_std=1)/v" in wb.protocol(profile)
    assert wb.make_text_config(wb.text_profile("gpu"), 0, tmp_path).diffusion.prediction == "v"


def test_run_variant_trains_evaluates_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("VITDIFF_CACHE", str(tmp_path / "cache"))
    profile = wb.get_profile("smoke", steps=2)
    variant = wb.Variant("DiT", "DiT")
    first = wb.run_variant(variant, profile, 0, tmp_path)
    assert first["preset"] == "DiT-tiny" and first["params_M"] > 0 and first["gflops"] > 0
    assert all(torch.isfinite(torch.tensor(first[key])) for key in ("val_loss", "fd", "train_loss"))
    saved = tmp_path / "DiT" / "seed0" / "result.json"
    assert json.loads(saved.read_text())["fd"] == first["fd"]
    # A finished run with the same config is read back, not retrained.
    assert wb.run_variant(variant, profile, 0, tmp_path) == first
    # A changed config is retrained.
    assert wb.run_variant(variant, wb.get_profile("smoke", steps=3), 0, tmp_path)["config_key"] != first["config_key"]


def test_summarize_reports_mean_and_sample_spread():
    frame = pd.DataFrame({"variant": ["b", "b", "a", "a"], "val_loss": [1.0, 3.0, 2.0, 2.0],
                          "fd": [0.0, 0.0, 1.0, 1.0], "params_M": [1, 1, 2, 2], "gflops": [0.1, 0.1, 0.2, 0.2]})
    table = wb.summarize(frame)
    assert list(table.index) == ["b", "a"]  # the notebook's order, not alphabetical
    assert table.loc["b", "val_loss"] == "2.0000 ± 1.4142"
    assert table.loc["a", "seeds"] == 2


def test_check_outputs_names_what_is_missing(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    wb.save_figure(fig, tmp_path, "curve")
    with pytest.raises(FileNotFoundError, match="results.csv"):
        wb.check_outputs(tmp_path, ["curve"])
    wb.save_results(pd.DataFrame([{"a": 1}]), wb.get_profile("smoke"), tmp_path)
    assert len(wb.check_outputs(tmp_path, ["curve"])) == 4
    assert json.loads((tmp_path / "results.json").read_text())["protocol"].startswith("digits")
