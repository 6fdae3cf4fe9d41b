"""The notebooks' shared layer: profiles, configs, run reuse, tables and output checks."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from vitdiff import text_workbook as tw
from vitdiff import workbook as wb


def test_profile_from_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("VITDIFF_PROFILE", "smoke")
    assert wb.get_profile().name == "smoke"
    monkeypatch.delenv("VITDIFF_PROFILE")
    assert wb.get_profile().name == "cpu"
    profile = wb.get_profile("smoke", steps=3, seeds=[4, 5], dataset="digits")
    assert (profile.steps, profile.seeds, profile.dataset) == (3, (4, 5), "digits")
    with pytest.raises(ValueError, match="smoke, cpu, cpu-long, gpu, paper"):
        wb.get_profile("laptop")


def test_variant_presets_follow_the_profile():
    assert wb.Variant("x", "IU-ViT").preset_for(wb.PROFILES["cpu"]) == "IU-ViT-tiny"
    assert wb.Variant("x", "UNet").preset_for(wb.PROFILES["paper"]) == "DDPM-UNet"
    assert wb.Variant("x", "DiT").preset_for(wb.PROFILES["paper"]) == "DiT-S/2"
    assert wb.Variant("x", "DiT", preset="DiT-B/4").preset_for(wb.PROFILES["cpu"]) == "DiT-B/4"


def test_make_config_carries_switches_and_protocol(tmp_path):
    profile = wb.get_profile("smoke")
    config = wb.make_config(wb.Variant("add", "IU-ViT", {"skip": "add"}), profile, 3, tmp_path, cond_drop_prob=0.1)
    assert config.model.preset == "IU-ViT-tiny" and config.model.overrides == {"skip": "add"}
    assert config.train.seed == 3 and config.train.steps == profile.steps
    assert config.diffusion.cond_drop_prob == 0.1 and config.sample.grid == profile.grid
    assert "FD-digits-clf[" in wb.protocol(profile) and "]@32 vs train split" in wb.protocol(profile)


def test_text_config_takes_the_profiles_diffusion_recipe(tmp_path):
    profile = tw.text_profile("cpu")
    config = tw.make_text_config(profile, 0, tmp_path)
    assert (config.diffusion.process, config.diffusion.prediction) == (profile.process, profile.prediction)
    assert config.diffusion.process_kwargs == {"p_mean": -0.2, "p_std": 1.4} and config.diffusion.cond_drop_prob == 0.1
    assert "shapes 32x32, edm(p_mean=-0.2, p_std=1.4)/v" in tw.text_protocol(profile)
    assert config.data.image_size == tw.TEXT_SETUPS["cpu"].image_size == 32
    assert tw.make_text_config(tw.text_profile("gpu"), 0, tmp_path).diffusion.prediction == "v"


def test_run_variant_trains_evaluates_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("VITDIFF_CACHE", str(tmp_path / "cache"))
    profile = wb.get_profile("smoke", steps=2)
    variant = wb.Variant("DiT", "DiT")
    first = wb.run_variant(variant, profile, 0, tmp_path)
    assert first["preset"] == "DiT-tiny" and first["params_M"] > 0 and first["gflops"] > 0
    assert all(torch.isfinite(torch.tensor(first[key])) for key in ("loss", "loss@1", "fd", "train_loss"))
    saved = tmp_path / "DiT" / "seed0" / "result.json"
    assert json.loads(saved.read_text())["fd"] == first["fd"]
    # A finished run with the same config is read back, not retrained.
    assert wb.run_variant(variant, profile, 0, tmp_path) == first
    # A changed config is retrained.
    assert wb.run_variant(variant, wb.get_profile("smoke", steps=3), 0, tmp_path)["config_key"] != first["config_key"]


def test_summarize_reports_mean_and_sample_spread():
    frame = pd.DataFrame({"variant": ["b", "b", "a", "a"], "loss": [1.0, 3.0, 2.0, 2.0],
                          "fd": [0.0, 0.0, 1.0, 1.0], "params_M": [1, 1, 2, 2], "gflops": [0.1, 0.1, 0.2, 0.2]})
    table = wb.summarize(frame)
    assert list(table.index) == ["b", "a"]  # the notebook's order, not alphabetical
    assert table.loc["b", "loss"] == "2.0000 ± 1.4142"
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


def test_profiles_are_experiment_files_plus_overrides():
    paper = wb.PROFILES["paper"].recipe
    from vitdiff.build import load_experiment

    uvit = load_experiment(wb.REPO_ROOT / "experiments" / "cifar10_uvit_s2.yaml")
    # The paper profile is U-ViT's recipe, unchanged but for the notebook's run bookkeeping.
    for section in ("model", "diffusion", "data", "sample", "eval"):
        assert getattr(paper, section) == getattr(uvit, section), section
    assert (paper.train.grad_clip, paper.train.ema_warmup, paper.train.lr) == (None, False, 2e-4)
    cpu = wb.PROFILES["cpu"]
    assert (cpu.dataset, cpu.recipe.data.image_size, len(cpu.seeds)) == ("fashion-mnist", 16, 4)


def test_held_out_loss_is_fixed_per_image_and_level(tmp_path):
    from vitdiff.build import build_diffusion, build_model

    config = wb.make_config(wb.Variant("x", "IU-ViT"), wb.get_profile("smoke"), 0, tmp_path)
    model, (_, loss_fn) = build_model(config), build_diffusion(config)
    whole = wb.sigma_losses(model, loss_fn, config, 20)
    assert set(whole) == {"loss", *map(wb.sigma_column, wb.LOSS_SIGMAS)}
    assert whole == wb.sigma_losses(model, loss_fn, config, 20)  # same images, same noise: the same numbers
    assert whole["loss@0.05"] < whole["loss@40"]  # an untrained v-model at init: far off at high noise


def test_ablation_in_two_processes_equals_one(tmp_path, monkeypatch):
    monkeypatch.setenv("VITDIFF_CACHE", str(tmp_path / "cache"))
    profile = wb.get_profile("smoke", steps=3, seeds=[0, 1])
    variants = [wb.Variant("ViT", "ViT")]
    one, _ = wb.run_ablation(variants, profile, tmp_path / "one", workers=1, progress=False)
    two, two_curves = wb.run_ablation(variants, profile, tmp_path / "two", workers=2, progress=False, notebook="nb")
    columns = ["loss", "fd", "train_loss"]
    assert one[columns].values.tolist() == two[columns].values.tolist()
    assert (tmp_path / "two" / "results" / "nb" / "smoke.csv").is_file()  # smoke files its rows beside its outputs
    curves = pd.read_csv(tmp_path / "two" / "results" / "nb" / "smoke_curves.csv")
    assert list(curves["step"]) == list(two_curves["step"])
    assert len(curves) == 2 * 3 and "loss@1" in curves  # 3 steps: pauses at steps 1 and 2, and the end


def test_every_profile_builds_and_its_evaluation_can_run_or_says_why_not(tmp_path, monkeypatch):
    from vitdiff.build import check_names
    from vitdiff.metrics import InceptionWeightsNotFound

    for name, profile in wb.PROFILES.items():
        check_names(wb.make_config(wb.Variant("x", "IU-ViT"), profile, 0, tmp_path))
        if profile.dataset in ("digits", "fashion-mnist"):
            assert wb.fd_label(profile).startswith("FD-"), name
    # The paper profile (CIFAR-10, Inception FID) refuses to start when the Inception weights are not on disk.
    monkeypatch.setenv("VITDIFF_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(InceptionWeightsNotFound, match="VITDIFF_INCEPTION_WEIGHTS|inception"):
        wb.run_ablation([wb.Variant("U-ViT", "U-ViT")], wb.PROFILES["paper"], tmp_path / "paper")
    assert not (tmp_path / "paper" / "runs").exists()  # nothing was trained


def test_quickstart_profile_applies_its_changes_before_the_notebooks_overrides():
    cpu = wb.quickstart_profile("cpu")
    assert (cpu.recipe.data.image_size, cpu.seeds, cpu.steps) == (16, (0,), 3000)
    assert wb.quickstart_profile("cpu", steps=7, seeds=[3]).steps == 7
    assert wb.quickstart_profile("cpu", seeds=[3]).seeds == (3,)
    assert wb.get_profile("cpu").steps != 3000 and wb.get_profile("cpu").seeds == (0, 1, 2, 3)  # others unchanged
    config = wb.make_config(wb.Variant("x", "IU-ViT"), cpu, 0, Path("unused"))
    assert config.data.image_size == 16


def test_labels_name_the_seeds_and_quote_the_sampler_only_for_samples():
    one, two = wb.get_profile("cpu", seeds=[0]), wb.get_profile("cpu")
    assert "seed 0," in wb.training_protocol(one) and "seeds 0, 1, 2, 3," in wb.training_protocol(two)
    assert "seed(s)" not in wb.protocol(two)
    assert two.sampler not in wb.training_protocol(two) and two.sampler in wb.protocol(two)
    assert "fashion-mnist 16x16," in wb.training_protocol(wb.quickstart_profile("cpu"))


def test_explorer_draws_a_plain_figure_then_redraws_only_on_request():
    import ipywidgets as widgets

    calls = []
    panel = wb.explorer(lambda **values: calls.append(values),
                        {"steps": widgets.IntSlider(value=5), "seed": widgets.IntText(value=2)})
    assert calls == [{"steps": 5, "seed": 2}]  # drawn once, outside the widget: a static viewer sees it
    panel.children[0].value = 9
    assert len(calls) == 1  # moving a control alone does not redraw ...
    panel.manual_button.click()
    assert calls[-1] == {"steps": 9, "seed": 2}  # ... "draw" does


def test_sample_explorer_shows_a_figure_without_a_front_end(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitdiff.models import create_model
    from vitdiff.build import build_diffusion

    config = wb.make_config(wb.Variant("x", "IU-ViT", {"num_classes": 10}), wb.get_profile("smoke"), 0, tmp_path)
    model = create_model("IU-ViT-tiny", in_channels=1, image_size=16, num_classes=10).eval()  # the smoke size

    before = len(plt.get_fignums())
    wb.sample_explorer(model, build_diffusion(config)[0], config, n=10, guidance=2.0)
    assert len(plt.get_fignums()) == before + 1
    assert "guidance 2" in plt.gcf().axes[0].get_title()


def test_class_rows_put_one_class_per_row_with_the_classifiers_count(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")

    monkeypatch.setenv("VITDIFF_CACHE", str(tmp_path / "cache"))
    labels = wb.class_labels(10, 3)
    assert labels.tolist()[:7] == [0, 0, 0, 1, 1, 1, 2]
    fig = wb.show_class_rows(torch.rand(30, 1, 32, 32) * 2 - 1, labels, dataset="digits", title="t")
    texts = [text.get_text() for text in fig.axes[0].texts]
    assert texts[:2] == ["0", texts[1]] and texts[1].endswith("/3") and len(texts) == 20
    with pytest.raises(ValueError, match="class_labels"):
        wb.show_class_rows(torch.zeros(30, 1, 32, 32), torch.arange(30) % 10, dataset="digits", title="t")
