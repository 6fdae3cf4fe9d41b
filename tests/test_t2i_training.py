"""Text-to-image through the trainer: `vitdiff train` on captions, bit-exact resume, `vitdiff sample --prompt`,
the sample.grid key, and the notebook helpers that judge text alignment."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitdiff import checkpoint as ckpt
from vitdiff.cli import main as vitdiff
from vitdiff.build import load_experiment
from vitdiff.config import ConfigError, load_config
from vitdiff.shapes import HELD_OUT_SHAPE
from vitdiff.sampling import sample
from vitdiff.shapes import AttributeClassifier, ShapesDataset
from vitdiff.text import TextToImage
from vitdiff.build import tokenizer_from_json
from vitdiff.generate import generate, load_for_inference
from vitdiff.trainer import Trainer
from vitdiff import text_alignment
from vitdiff import text_workbook as tw

ROOT = Path(__file__).resolve().parents[1]
SHAPES_T2I = ROOT / "experiments" / "shapes64_t2i_ascend_h.yaml"
# The experiment's tiny version (ASCEND-H-tiny, 64-wide text encoder, 64x64 shapes), shrunk further for a test.
# fp32: the yaml's `auto` times bf16 against fp32 on a CPU with native bf16, and a loaded machine can flip that
# choice between two fresh runs that a test compares.
SMALL = ["tiny=true", "data.batch_size=4", "text.context_dim=32", "text.layers=1", "text.heads=2",
         "model.decoder_blocks=1", "log_every=1", "sample_every=0", "sample.steps=2", "progress=false",
         "train.precision=fp32"]


def small_config(out_dir: Path, *overrides: str):
    return load_experiment(SHAPES_T2I, [*SMALL, f"out_dir={out_dir}", *overrides])


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_resume_and_sample_a_prompt(tmp_path):
    run = tmp_path / "run"
    assert vitdiff(["train", str(SHAPES_T2I), *SMALL, "steps=2", f"out_dir={run}"]) == 0
    state = ckpt.load_checkpoint(run / "last.pt")  # weights_only=True: the tokenizer travels as a JSON string
    tokenizer = tokenizer_from_json(state["text"]["tokenizer"])
    assert tokenizer.decode(tokenizer(["a small red circle on the left"])[0]) == "a small red circle on the left"
    assert len(state["text"]["sample_prompts"]) == state["config"]["sample"]["n"]
    assert any(name.startswith("text_encoder.") for name in state["model"])  # the encoder trains with the model

    # Two more steps after a resume equal four straight steps, parameter for parameter.
    resumed = Trainer(small_config(run, "steps=4"))
    assert resumed.step == 2
    resumed.fit()
    straight = Trainer(small_config(tmp_path / "straight", "steps=4"))
    straight.fit()
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert_same_state(straight.ema.state_dict(), resumed.ema.state_dict())

    common = ["sample", str(run), "--n", "2", "--steps", "2", "--guidance", "2"]
    assert vitdiff([*common, "--prompt", "a small red circle on the left", "--out", str(tmp_path / "red.png")]) == 0
    assert vitdiff([*common, "--prompt", "a large blue square at the top", "--out", str(tmp_path / "blue.png")]) == 0
    assert vitdiff([*common, "--out", str(tmp_path / "saved.png")]) == 0  # the prompts saved with the checkpoint
    # `vitdiff eval` scores test images with their own captions.
    assert vitdiff(["eval", str(run), "--metric", "nll", "--n", "2", "--nll-steps", "2",
                    "--results", str(tmp_path / "results.jsonl")]) == 0
    assert '"reference": "shapes:test"' in (tmp_path / "results.jsonl").read_text()
    red, blue = Image.open(tmp_path / "red.png"), Image.open(tmp_path / "blue.png")
    assert red.size == (2 * (64 + 2) + 2, 64 + 4)
    assert red.tobytes() != blue.tobytes()  # the prompt reaches the model


def test_inference_rebuilds_the_text_model_and_samples_a_grid_choice(tmp_path):
    config = small_config(tmp_path / "run", "steps=1", "diffusion.cond_drop_prob=0.5")
    Trainer(config).fit()
    model, process, config, state, _ = load_for_inference(tmp_path / "run")
    assert isinstance(model, TextToImage) and model.takes_token_ids
    prompts = ["a small red circle on the left"]
    ids = model.encode_prompts(prompts * 2)
    # sample.grid reaches the sampler: generate(grid=...) is sample(grid=...) with the same noise.
    karras = generate(model, process, config, n=2, seed=3, steps=4, prompts=prompts, grid="karras", guidance=2.0)
    direct = sample(model, process, (2, 3, 64, 64), sampler=config.sample.sampler, steps=4,
                    cond=ids, guidance=2.0, grid="karras", clip_denoised=config.sample.clip_denoised,
                    generator=torch.Generator().manual_seed(3), progress=False)
    torch.testing.assert_close(karras, direct)
    default = generate(model, process, config, n=2, seed=3, steps=4, prompts=prompts, guidance=2.0)  # uniform_t
    assert not torch.allclose(default, karras)
    assert load_config(SHAPES_T2I, ["sample.grid=karras"]).sample.grid == "karras"
    with pytest.raises(ConfigError, match="sample.grid=.cosine. is not one of"):
        load_experiment(SHAPES_T2I, ["sample.grid=cosine"])
    with pytest.raises(ValueError, match="needs prompts"):
        generate(model, process, config, n=1, seed=0)


def test_text_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="text.path"):
        load_config(SHAPES_T2I, ["text.encoder=clip"])
    with pytest.raises(ConfigError, match="text.encoder must be one of"):
        load_config(SHAPES_T2I, ["text.encoder=precomputed"])
    with pytest.raises(ConfigError, match="no captions"):
        Trainer(load_config(None, ["model.preset=U-ViT-tiny", "model.context_dim=16", "data.batch_size=4",
                                   "data.num_workers=0", f"out_dir={tmp_path}"]))
    # The tiny profile keeps a caption experiment captioned (CUB is not on disk): shapes and a small text encoder.
    tiny_cub = load_experiment(ROOT / "experiments" / "cub256_t2i_ascend_h.yaml", ["tiny=true"])
    assert tiny_cub.data.dataset == "shapes" and tiny_cub.text.encoder == "jointly-trained"
    assert tiny_cub.sample.prompts is None and tiny_cub.model.preset == "ASCEND-H-tiny"


def test_shapes_fd():
    judge = AttributeClassifier().eval()  # untrained: the distance is a property of the features, whatever they are
    real = ShapesDataset("val", image_size=32, num_samples=40, seed=1).images()
    other = ShapesDataset("val", image_size=32, num_samples=40, seed=2).images()
    assert tw.shapes_features(real, judge).shape == (40, 256)
    assert tw.fd_shapes(real, real, judge) == pytest.approx(0.0, abs=1e-6)
    assert tw.fd_shapes(torch.zeros_like(real), real, judge) > tw.fd_shapes(other, real, judge) > 0


def test_alignment_rows_hold_accuracy_beside_its_measured_baselines(tmp_path):
    config = small_config(tmp_path / "run", "steps=1", "data.image_size=32", "sample.steps=2")
    trainer = Trainer(config)
    trainer.fit()
    rows = tw.alignment_rows(trainer.ema.module, trainer.process, trainer.config, split="val", guidances=(1.0, 3.0),
                             n=6, seed=1, batch_size=4)
    assert [(row["guidance"], row["attribute"]) for row in rows] == [(g, a) for g in (1.0, 3.0)
                                                                     for a in tw.ALIGNMENT_METRICS]
    for row in rows:
        assert {"accuracy", "shuffled_baseline", "empty_caption_baseline"} <= row.keys()
        assert all(0.0 <= row[key] <= 1.0 for key in ("accuracy", "shuffled_baseline", "empty_caption_baseline"))
        assert row["fd"] > 0 and row["fd_floor"] > 0 and row["fd_redrawn"] > 0
        # Counts for a count-based test: correct of judged, samples for count and all-correct, objects otherwise.
        assert row["accuracy"] == row["k"] / row["n_judged"] and row["empty_caption_baseline"] * row["n_judged"] \
            == row["k_empty"]
        assert abs(row["k_shuffled"] - row["shuffled_baseline"] * row["n_judged"]) <= 0.5
        if row["attribute"] in ("count", "all_correct"):
            assert row["n_judged"] == 6
        else:
            assert 6 <= row["n_judged"] <= 12
        # Shuffling the shape word changes shape and all-correct only; the other rows carry no such baseline.
        if row["attribute"] in tw.SHAPE_SHUFFLED_METRICS:
            assert 0.0 <= row["shape_shuffled_baseline"] <= 1.0 and row["k_shape_shuffled"] is not None
        else:
            assert row["shape_shuffled_baseline"] != row["shape_shuffled_baseline"] and row["k_shape_shuffled"] is None
    # The caption-free samples do not depend on guidance: one baseline per split.
    assert len({row["empty_caption_baseline"] for row in rows if row["attribute"] == "colour"}) == 1


def fake_alignment_rows(accuracy: dict, seeds=range(3), **columns):
    """Alignment rows of ``seeds`` at w = 3, 100 samples (or objects) judged a seed: each (split, attribute) at
    ``accuracy`` (0.5 where absent) + 0.01 x seed, its shuffled baseline 0.25 (val shape 0.2, test shape and
    held-out shape 0.3 + 0.01 x seed, all-correct 0.01) + 0.01 for odd seeds, shape's shape-shuffled baseline 0.3
    (+0.03). Test rows include the held-out objects' shape (``held_out_shape``)."""
    import pandas as pd

    shapes = ("shape", HELD_OUT_SHAPE)
    rows = [{"seed": seed, "split": split, "guidance": 3.0, "attribute": name, "n": 100,
             "accuracy": accuracy.get((split, name), 0.5) + 0.01 * seed,
             "shuffled_baseline": ((0.2 if split == "val" else 0.3 + 0.01 * seed) if name in shapes else
                                   {"all_correct": 0.01}.get(name, 0.25)) + 0.01 * (seed % 2),
             "shape_shuffled_baseline": 0.3 + 0.03 * (seed % 2) if name in shapes else float("nan"),
             "empty_caption_baseline": 0.2, "fd": 100.0, "fd_redrawn": 20.0, "fd_floor": 50.0, **columns}
            for seed in seeds for split in ("val", "test")
            for name in (*tw.ALIGNMENT_METRICS, *([HELD_OUT_SHAPE] if split == "test" else []))]
    frame = pd.DataFrame(rows).assign(n_judged=100)
    for rate, count in (("accuracy", "k"), ("shuffled_baseline", "k_shuffled"),
                        ("shape_shuffled_baseline", "k_shape_shuffled")):
        frame[count] = (frame[rate] * 100).round()
    return frame


def test_alignment_verdicts_and_targets_read_accuracy_against_its_shuffled_baseline():
    from vitdiff.findings import verdict_table

    # Three seeds: val shape at 3x its baseline, test shape level with it, val all-correct at 4x.
    frame = fake_alignment_rows({("val", "shape"): 0.6, ("test", "shape"): 0.3, ("test", HELD_OUT_SHAPE): 0.3,
                                 ("val", "all_correct"): 0.04})
    table = verdict_table(tw.alignment_arms(frame), tw.alignment_comparisons(3.0), notebook="07", profile="test")
    assert set(table["test"]) == {"rate"}
    # The count test pools the seeds: val shape is 183 of 300 against 61 of 300.
    val_shape = table[(table["comparison"] == "val, w=3: own captions - val, w=3: shuffled captions")
                      & (table["metric"] == "shape")].iloc[0]
    assert val_shape["mean_diff"] == pytest.approx((183 - 61) / 300) and val_shape["n_seeds"] == 3
    verdicts = {(row.comparison, row.metric): row.verdict for row in table.itertuples()}
    own, shuffled, shape_only = (f"{{}}, w=3: {captions}" for captions in (tw.OWN, tw.SHUFFLED, tw.SHAPE_SHUFFLED))
    assert verdicts[(f"{own} - {shuffled}".format("val", "val"), "shape")] == "supported"
    assert verdicts[(f"{own} - {shuffled}".format("test", "test"), "shape")] == "unresolved"
    assert verdicts[(f"{own} - {shape_only}".format("val", "val"), "shape")] == "supported"   # 0.6 vs 0.3
    assert verdicts[(f"{own} - {shape_only}".format("test", "test"), HELD_OUT_SHAPE)] == "unresolved"  # +0, -.02, +.02
    assert (f"{own} - {shape_only}".format("test", "test"), "shape") not in verdicts
    lines = tw.target_lines(frame, table, 3.0)
    assert "val shape" in lines[0] and lines[0].endswith("**met**")
    assert "5.0 of 100 samples a seed" in lines[1] and lines[1].endswith("**not met**")  # 0.05 < 0.25
    assert lines[2].startswith("test, held-out objects' shape minus its shape-shuffled") and lines[2].endswith(
        "**not met**")
    assert lines[3] == "seeds: 3 (0, 1, 2) of the 3 the targets are judged on"
    one_seed = frame[frame["seed"] == 1]
    table = verdict_table(tw.alignment_arms(one_seed), tw.alignment_comparisons(3.0), notebook="07", profile="test")
    assert tw.target_lines(one_seed, table, 3.0)[3].endswith("seeds: 1 (1) of the 3 the targets are judged on: "
                                                             "the lines above are provisional")


def test_a_longer_budget_is_judged_against_the_shorter_on_the_same_seeds(tmp_path):
    import pandas as pd

    short = fake_alignment_rows({("val", "shape"): 0.6, ("test", "shape"): 0.3, ("test", HELD_OUT_SHAPE): 0.3,
                                 ("val", "all_correct"): 0.04}, profile="cpu-64", steps=10800)
    # Twice as long: all-correct up to 0.3 and held-out shape above its shape-shuffled baseline (0.3, 0.33).
    long = fake_alignment_rows({("val", "shape"): 0.6, ("test", "shape"): 0.45, ("test", HELD_OUT_SHAPE): 0.45,
                                ("val", "all_correct"): 0.3}, profile="cpu-64-long", steps=21600)
    rows = pd.concat([short, long], ignore_index=True)
    table = tw.verdicts_at_both_budgets(rows, 3.0, 64)
    assert sorted(set(zip(table["profile"], table["steps"]))) == [
        ("cpu-64", 10800), ("cpu-64 -> cpu-64-long", 21600), ("cpu-64-long", 21600)]
    growth = table[table["profile"] == "cpu-64 -> cpu-64-long"].set_index(["comparison", "metric"])["verdict"]
    own = "{}, w=3: own captions @ {} steps"
    assert growth[(f"{own} - {own}".format("val", 21600, "val", 10800), "all_correct")] == "supported"  # 15 -> 93
    assert growth[(f"{own} - {own}".format("val", 21600, "val", 10800), "colour")] == "unresolved"  # 153 both
    assert growth[(f"{own} - {own}".format("test", 21600, "test", 10800), HELD_OUT_SHAPE)] == "supported"  # 93->138
    lines = tw.longer_training_lines(rows, table, 3.0)
    assert lines[0].startswith("seeds judged at both budgets: 3 (0, 1, 2)")
    assert lines[1].startswith("target val shape >= 2x its shuffled-caption baseline: met at 10800 steps, **met** at "
                               "21600")
    assert lines[2].startswith("target val all_correct >= 0.25: not met at 10800 steps, **met** at 21600")
    assert lines[3].startswith("target held-out shape above its shape-shuffled baseline (interval above 0, verdict "
                               "supported): not met at 10800 steps, **met** at 21600")
    # Held-out shape moves above both its baselines; nothing else changes.
    assert lines[4:6] == ["test, w=3: own captions - test, w=3: shuffled captions (shape): unresolved at 10800, "
                          "supported at 21600",
                          "test, w=3: own captions - test, w=3: shape word shuffled (held_out_shape): unresolved at 10800, "
                          "supported at 21600"]
    assert "val all_correct: 0.050 at 10800 steps -> 0.310 at 21600" in "\n".join(lines)
    # Each seed's own change beside the pooled test, so seeds that disagree are seen.
    assert "; by seed: 0 +0.260, 1 +0.260, 2 +0.260): **supported**" in "\n".join(lines)
    assert lines[-2:] == [f"FD-shapes-clf@100 on {split} at w = 3, mean over the seeds: 100 at 10800 steps -> 100 at "
                          "21600; the same captions drawn again score 20, other real scenes 50 (descriptive)"
                          for split in ("val", "test")]
    # The same samples at both budgets: every growth row is 0 and nothing changes.
    same = pd.concat([short, short.assign(profile="cpu-64-long", steps=21600)], ignore_index=True)
    same_table = tw.verdicts_at_both_budgets(same, 3.0, 64)
    growth = same_table[same_table["profile"] == "cpu-64 -> cpu-64-long"]
    assert (growth["mean_diff"] == 0).all() and set(growth["verdict"]) == {"unresolved"}
    assert "no pre-registered verdict changes with the budget" in tw.longer_training_lines(same, same_table, 3.0)
    # The growth rows are filed (into the run's own results unless asked); each budget's own rows are its profile's.
    tw.file_growth_verdicts(table, tmp_path)
    filed = pd.read_csv(tmp_path / "results" / "verdicts.csv")
    assert set(filed["profile"]) == {"cpu-64 -> cpu-64-long"} and len(filed) == len(growth)
    fig = tw.plot_both_budgets(rows, 3.0)
    assert [ax.get_xlabel() for ax in fig.axes] == ["training steps"] * 2 and "cpu-64 -> cpu-64-long" in (
        fig._suptitle.get_text())


def test_the_budget_pair_reads_each_profile_from_the_first_folder_that_files_it(monkeypatch, tmp_path):
    import pandas as pd

    filed = {("run", "cpu-64-long"): [0], ("committed", "cpu-64"): [0, 1, 2], ("run", "cpu-64"): []}

    def fake_filed(folder, profile, runs_dir):
        seeds = filed.get((folder.name, profile.name), [])
        return pd.DataFrame({"seed": seeds, "steps": profile.steps}), pd.DataFrame({"seed": seeds})

    monkeypatch.setattr(tw.longer, "filed_text_seeds", fake_filed)
    assert tw.budget_pair("cpu-64-long") == tw.budget_pair("cpu-64") == ("cpu-64", "cpu-64-long")
    rows = tw.rows_at_both_budgets("cpu-64", [tmp_path / "run", tmp_path / "committed"], tmp_path / "runs")
    assert sorted(zip(rows["seed"], rows["steps"])) == [(0, 10800), (0, 21600)]
    assert tw.budget_pair("cpu") is None and not len(tw.rows_at_both_budgets("cpu", [tmp_path / "run"], tmp_path))


def test_text_profiles_name_their_size_and_shift_the_noise_with_it():
    import math

    for name, size in (("cpu", 32), ("cpu-64", 64), ("cpu-128", 128)):
        profile = tw.text_profile(name)
        assert profile.name == name and profile.recipe.data.image_size == size == tw.TEXT_SETUPS[name].image_size
        # ln sigma's mean moves by ln 2 per doubling of the side, from the 32x32 recipe.
        assert profile.process_kwargs["p_mean"] == pytest.approx(-0.2 + math.log(size / 32), abs=1e-3)
        assert f"profile={name}" in tw.text_protocol(profile)
    assert tw.text_profile("cpu-64").seeds == (0, 1, 2) and tw.text_profile("cpu-128").seeds == (0,)
    with pytest.raises(ValueError, match="cpu-64"):
        tw.text_profile("cpu-long")


def test_alignment_arms_carry_each_arms_counts():
    import pandas as pd

    rows = [{"seed": 0, "split": "val", "guidance": 3.0, "attribute": name, "accuracy": 0.5, "shuffled_baseline": 0.25,
             "shape_shuffled_baseline": 0.3 if name == "shape" else float("nan"), "n_judged": 8, "k": 4,
             "k_shuffled": 2, "k_shape_shuffled": 3 if name == "shape" else None}
            for name in ("shape", "colour")]
    arms = tw.alignment_arms(pd.DataFrame(rows)).set_index("variant")
    own, shape_only = (tw.alignment_arm("val", 3.0, captions) for captions in (tw.OWN, tw.SHAPE_SHUFFLED))
    assert arms.loc[own, "k_shape"] == 4 and arms.loc[own, "n_colour"] == 8
    # A shuffled baseline's count stays the unrounded mean over derangements (0.3 x 8), so seeds pool before it is
    # rounded: three seeds at 0.33% of 96 expect 0.95 correct in all, not 3 x round(0.32) = 0.
    assert arms.loc[shape_only, "k_shape"] == pytest.approx(2.4) and arms.loc[shape_only, "shape"] == 0.3
    rare = pd.DataFrame([{**rows[0], "seed": seed, "shuffled_baseline": 0.0033, "k_shuffled": 0, "n_judged": 96}
                         for seed in range(3)])
    pooled = tw.alignment_arms(rare).set_index("variant").loc[tw.alignment_arm("val", 3.0, tw.SHUFFLED), "k_shape"]
    assert round(pooled.sum()) == 1
    # Filed rows without counts (or without the shape-shuffled baseline) still make arms, without those columns.
    old = tw.alignment_arms(pd.DataFrame(rows).drop(columns=["k", "k_shuffled", "k_shape_shuffled", "n_judged",
                                                              "shape_shuffled_baseline"]))
    assert len(old) == 2 and not any(column.startswith("k_") for column in old)


def test_the_prompt_grid_shows_every_grid_caption_above_its_samples(tmp_path):
    profile = tw.text_profile("smoke")
    trainer = tw.train_text_model(profile, 0, tmp_path, progress=False)
    fig = tw.prompt_grid_figure(trainer.ema.module, trainer.process, trainer.config, profile, guidance=3.0, seed=0)
    assert [ax.get_title() for ax in fig.axes] == list(tw.GRID_PROMPTS)
    assert fig._suptitle.get_text().startswith("guidance 3, ") and "the model of seed 0" in fig._suptitle.get_text()
    assert "one thread a run" in fig._suptitle.get_text()
    two = tw.text_training_protocol(profile, {0: 2})
    assert "2 threads a run" in two and "one thread" not in two
    # Seeds on different thread counts are named each; a seed filed before its count was recorded ran on one.
    mixed = tw.text_training_protocol(tw.text_profile("smoke", seeds=[0, 1, 2]), {0: float("nan"), 1: 2})
    assert "seeds 0, 1, 2, threads a run: seed 0 on 1, seed 1 on 2, seed 2 on 1;" in mixed
    width = tw.TEXT_SETUPS["smoke"].grid_n * (tw.TEXT_SETUPS["smoke"].image_size + 1) + 1  # one row of samples
    assert fig.axes[0].images[0].get_array().shape[1] == width


def _hierarchical_tiny(image_size: int, patch_size: int, decoder_channels: tuple[int, ...]):
    from vitdiff.models.ascend import PRESETS

    torch.manual_seed(image_size)
    return PRESETS["ASCEND-H-tiny"](image_size=image_size, patch_size=patch_size, decoder_channels=decoder_channels,
                                    decoder_block="conv", decoder_blocks=1, hires_channels=16).eval()


def test_a_model_grown_to_twice_the_side_keeps_the_encoder_and_sees_the_pooled_image():
    from vitdiff.models.grow import grow_state_dict

    small, large = _hierarchical_tiny(32, 4, (64, 32)), _hierarchical_tiny(64, 8, (64, 32, 32))
    state, report = grow_state_dict(small.state_dict(), large)
    large.load_state_dict(state)
    assert report["spread"] == ["patch_embed.proj.weight"] and not report["dropped"]
    assert {name.split(".")[1] for name in report["new"]} == {"2"}  # only the new x2 stage: decoder_stages.2.*
    assert all(name.startswith("decoder_stages.2.") for name in report["new"])
    assert "pos_embed" in report["copied"] and "out.2.weight" in report["copied"]
    # The grown patch embedding applied to an image is the old one applied to the image average-pooled x2, so the
    # encoder's tokens (time and all) are the small model's on the pooled image.
    x = torch.randn(2, 3, 64, 64)
    pooled = torch.nn.functional.avg_pool2d(x, 2)
    torch.testing.assert_close(large.patch_embed(x), small.patch_embed(pooled), rtol=1e-5, atol=1e-5)
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        tokens = [model.forward_blocks(*model.embed(image, t, None)) for model, image in ((large, x), (small, pooled))]
    torch.testing.assert_close(tokens[0], tokens[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot carry over"):
        grow_state_dict({"other.weight": torch.zeros(1)}, large)


def test_a_text_run_grows_from_a_smaller_runs_ema_weights(tmp_path):
    small_shape = ["data.image_size=32", "model.patch_size=4", "model.decoder_channels=[64,32]",
                   "model.hires_channels=16"]
    source = Trainer(small_config(tmp_path / "small", "steps=2", *small_shape))
    source.fit()
    source.save()
    grown = Trainer(small_config(tmp_path / "large", "steps=2", "model.decoder_channels=[64,32,32]",
                                 "model.hires_channels=16"))
    report = tw.grow_trainer(grown, ckpt.load_checkpoint(tmp_path / "small" / "last.pt"))
    ema = {name.removeprefix("module."): value for name, value in source.ema.state_dict().items()}
    for name in report["copied"]:
        assert torch.equal(grown.model.state_dict()[name], ema[name]), name
        assert torch.equal(grown.ema.module.state_dict()[name], ema[name]), name
    assert any(name.startswith("text_encoder.") for name in report["copied"])  # the caption encoder carries over
    assert report["new"] and all(".decoder_stages.2." in name for name in report["new"])
    grown.fit()  # and it trains on from there
    assert grown.step == 2
    # A model whose token grid does not match (patch 4 at 64x64: 16x16 tokens) is refused, not half-grown.
    mismatched = Trainer(small_config(tmp_path / "bad", "steps=1", "model.patch_size=4",
                                      "model.decoder_channels=[64,32]", "model.hires_channels=16"))
    with pytest.raises(ValueError, match="pos_embed"):
        tw.grow_trainer(mismatched, ckpt.load_checkpoint(tmp_path / "small" / "last.pt"))


def test_a_grown_text_run_lives_by_its_source_and_grows_once(tmp_path, monkeypatch, capsys):
    from dataclasses import replace

    setup, profile = tw.TEXT_SETUPS["smoke"], tw.text_profile("smoke")
    monkeypatch.setitem(tw.TEXT_SETUPS, "smoke", replace(setup, image_size=32, model={
        **setup.model, "patch_size": 4, "decoder_channels": (64, 32)}))
    source = tw.train_text_model(tw.text_profile("smoke"), 0, tmp_path / "small", progress=False)
    monkeypatch.setitem(tw.TEXT_SETUPS, "smoke", setup)
    capsys.readouterr()
    grown = tw.train_text_model(profile, 0, tmp_path / "large", progress=False, grow_from=source.out_dir)
    assert "grown from a step-3 model" in capsys.readouterr().out
    assert grown.out_dir.parent == tmp_path / "large" / f"grown-from-{source.out_dir.name}-step3"
    again = tw.train_text_model(profile, 0, tmp_path / "large", progress=False, grow_from=source.out_dir)
    assert "grown from" not in capsys.readouterr().out and again.out_dir == grown.out_dir and again.step == 3


def test_a_longer_profile_continues_the_shorter_ones_run_to_the_model_trained_at_once(tmp_path, monkeypatch):
    import dataclasses

    import pandas as pd

    short = tw.text_profile("smoke", steps=2)
    longer = dataclasses.replace(tw.text_profile("smoke", steps=4), name="smoke-long")
    monkeypatch.setitem(tw.TEXT_SETUPS, "smoke-long", tw.TEXT_SETUPS["smoke"])
    monkeypatch.setitem(tw.TEXT_CONTINUES, "smoke-long", "smoke")
    tw.train_text_model(short, 0, tmp_path / "smoke" / "runs", progress=False)
    tw.continue_shorter_run(longer, 0, tmp_path / "smoke-long" / "runs")
    continued = tw.train_text_model(longer, 0, tmp_path / "smoke-long" / "runs", progress=False)
    fresh = tw.train_text_model(longer, 0, tmp_path / "fresh" / "runs", progress=False)
    assert (continued.step, tw.continued_from_step(continued.out_dir), tw.continued_from_step(fresh.out_dir)) == \
        (4, 2, 0)
    assert_same_state(continued.model.state_dict(), fresh.model.state_dict())
    assert_same_state(continued.ema.module.state_dict(), fresh.ema.module.state_dict())
    # Its log holds both parts (the training seconds count them), as the run trained at once logs them.
    logs = [pd.read_json(run.out_dir / "metrics.jsonl", lines=True) for run in (continued, fresh)]
    pd.testing.assert_frame_equal(logs[0][["step", "loss"]], logs[1][["step", "loss"]])
    # Once it has a checkpoint of its own, it is never restarted from the shorter run.
    before = (continued.out_dir / "last.pt").read_bytes()
    tw.continue_shorter_run(longer, 0, tmp_path / "smoke-long" / "runs")
    assert (continued.out_dir / "last.pt").read_bytes() == before
    # A shorter run past the profile's steps, or none on this machine: the seed trains from step 0.
    for runs_dir in (tmp_path / "other" / "smoke-long" / "runs", tmp_path / "fresh-again" / "runs"):
        tw.continue_shorter_run(dataclasses.replace(tw.text_profile("smoke", steps=1), name="smoke-long"), 0,
                                runs_dir)
        assert not runs_dir.exists()


def test_cpu_64_long_is_cpu_64_trained_longer_and_shares_its_runs():
    import dataclasses

    shorter, longer = tw.text_profile("cpu-64"), tw.text_profile("cpu-64-long")
    assert tw.TEXT_CONTINUES["cpu-64-long"] == "cpu-64" and longer.steps == 2 * shorter.steps
    for seed in shorter.seeds:
        configs = [dataclasses.asdict(tw.make_text_config(profile, seed, Path("runs")))
                   for profile in (shorter, longer)]
        differences = {(section, key) for section in configs[0] if isinstance(configs[0][section], dict)
                       for key in configs[0][section] if configs[0][section][key] != configs[1][section][key]}
        # Logging and checkpoint intervals follow the steps; neither touches the weights.
        assert differences == {("train", "steps"), ("train", "log_every"), ("train", "ckpt_every")}
        assert tw.text_run_dir(tw.make_text_config(shorter, seed, Path("runs")), seed, Path("runs")) == \
            tw.text_run_dir(tw.make_text_config(longer, seed, Path("runs")), seed, Path("runs"))


def test_a_text_run_stopped_by_a_signal_is_saved_and_never_judged_as_finished(tmp_path, monkeypatch):
    import os
    import signal

    real_step = Trainer.train_step

    def step_then_sigterm(self):
        result = real_step(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    profile = tw.text_profile("smoke")
    with pytest.raises(tw.TrainingStopped, match="stopped at step 2 of 3"):
        tw.train_text_model(profile, 0, tmp_path, progress=False)
    monkeypatch.undo()
    assert tw.train_text_model(profile, 0, tmp_path, progress=False).step == 3  # resumed from the saved step


@pytest.fixture
def trained(monkeypatch):
    """The seeds :func:`tw.train_text_model` is asked for, in order (it still trains them)."""
    seeds, real_train = [], tw.train_text_model

    def counted(profile, seed, runs_dir, **kwargs):
        seeds.append(seed)
        return real_train(profile, seed, runs_dir, **kwargs)

    monkeypatch.setattr(tw.runs, "train_text_model", counted)
    return seeds


def test_text_seeds_are_filed_one_by_one_and_read_back_while_config_and_code_are_the_same(tmp_path, monkeypatch,
                                                                                           trained):
    import pandas as pd

    first, _, _ = tw.run_text_seeds(tw.text_profile("smoke", seeds=[0]), tmp_path, workers=1, progress=False)
    folder = tw.text_seed_folder(tmp_path)
    filed = pd.read_csv(folder / "smoke.csv")
    assert set(filed["seed"]) == {0} and filed["code_key"].nunique() == 1
    assert tw.prompt_grid_file(folder, tw.text_profile("smoke"), 0).is_file()

    # A later sitting asks for seeds 0 and 1: seed 0 is read back (same rows), only seed 1 trains, here on two
    # threads, which its row records; the caller's thread count is left as it was.
    threads_before = torch.get_num_threads()
    rows, curves, runs = tw.run_text_seeds(tw.text_profile("smoke", seeds=[0, 1]), tmp_path, workers=1, threads=2,
                                           progress=False)
    assert trained == [0, 1] and list(runs["seed"]) == [0, 1] and set(curves["seed"]) == {0, 1}
    assert list(runs["threads"]) == [1, 2] and torch.get_num_threads() == threads_before
    record = json.loads((folder / "smoke.json").read_text())  # the protocol of every seed filed, as each ran
    assert "seeds 0, 1, threads a run: seed 0 on 1, seed 1 on 2;" in record["protocol"]
    assert record["profile"]["seeds"] == [0, 1]
    columns = ["split", "guidance", "attribute", "k", "n_judged", "fd"]
    pd.testing.assert_frame_equal(rows[rows["seed"] == 0][columns].reset_index(drop=True),
                                  first[columns].reset_index(drop=True))

    # A seed whose curve is missing (filing killed half-way, or a file left out of a commit) is not filed.
    curves_file = folder / "smoke_curves.csv"
    saved_curves = curves_file.read_text()
    pd.read_csv(curves_file).query("seed == 0").to_csv(curves_file, index=False)
    assert list(tw.filed_text_seeds(folder, tw.text_profile("smoke", seeds=[0, 1]), tmp_path / "runs")[0]
                ["seed"].unique()) == [0]
    curves_file.write_text(saved_curves)

    # An edit to the code the seeds ran makes their filed rows stale. Into the committed results that refuses,
    # before any training, to replace them; in the notebook's own folder the seed is trained again and replaces them.
    monkeypatch.setattr(tw.runs, "text_code_key", lambda config: "edited")
    monkeypatch.setattr(tw.seeds, "results_dir", lambda out_dir, file_results=False: out_dir / "results")
    with pytest.raises(ConfigError, match=r"holds seeds \[0, 1\] filed by another config or code"):
        tw.run_text_seeds(tw.text_profile("smoke", seeds=[0]), tmp_path, workers=1, progress=False,
                          file_results=True)
    assert trained == [0, 1]
    tw.run_text_seeds(tw.text_profile("smoke", seeds=[0, 1]), tmp_path, workers=1, progress=False)
    assert trained == [0, 1, 0, 1]
    refiled = pd.read_csv(folder / "smoke.csv")  # both stale seeds retrained, and both kept
    assert set(refiled["seed"]) == {0, 1} and set(refiled["code_key"]) == {"edited"}
    # Judged again on one thread, their runs already finished: each row keeps the threads its seed trained on.
    assert list(refiled.drop_duplicates("seed")["threads"]) == [1, 2]
    monkeypatch.setattr(tw.runs, "text_code_key", lambda config: "edited again")
    tw.run_text_seeds(tw.text_profile("smoke", seeds=[0]), tmp_path, workers=1, progress=False)
    assert trained == [0, 1, 0, 1, 0]
    refiled = pd.read_csv(folder / "smoke.csv")
    assert set(refiled["seed"]) == {0} and set(refiled["code_key"]) == {"edited again"}  # stale seed 1 dropped


def test_a_default_run_reads_the_committed_seeds_back_and_leaves_them_untouched(tmp_path, monkeypatch, trained):
    committed_root = tmp_path / "committed"
    monkeypatch.setattr(tw.seeds, "results_dir", lambda out_dir, file_results=False:
                        committed_root if file_results else out_dir / "results")
    profile = tw.text_profile("smoke", seeds=[0])
    filed, _, _ = tw.run_text_seeds(profile, tmp_path / "sitting", workers=1, progress=False, file_results=True)
    committed = tw.text_seed_folder(tmp_path, file_results=True)
    before = {path: path.read_bytes() for path in committed.rglob("*") if path.is_file()}

    # A user's default run on a fresh machine (no checkpoints): seed 0 is read back, seed 1 trains, and only the
    # run's own folder is written.
    rows, curves, runs = tw.run_text_seeds(tw.text_profile("smoke", seeds=[0, 1]), tmp_path / "user", workers=1,
                                           progress=False)
    assert trained == [0, 1] and list(runs["seed"]) == [0, 1] and set(curves["seed"]) == {0, 1}
    columns = ["split", "guidance", "attribute", "k", "n_judged", "fd"]
    assert rows[rows["seed"] == 0][columns].reset_index(drop=True).equals(filed[columns].reset_index(drop=True))
    assert tw.prompt_grid_file(tw.text_seed_folder(tmp_path / "user"), profile, 0).read_bytes() == \
        tw.prompt_grid_file(committed, profile, 0).read_bytes()
    assert {path: path.read_bytes() for path in committed.rglob("*") if path.is_file()} == before


def test_a_text_seeds_code_key_is_the_code_loaded_even_when_the_file_is_edited(tmp_path, monkeypatch):
    """A kernel training a seed for hours while its user edits vitdiff/text_alignment.py: the key stays the key of
    the code that runs. (Read from the edited file at the old line numbers, the source was a stray indented line.)"""
    import inspect

    config = tw.make_text_config(tw.text_profile("smoke"), 0, tmp_path)
    before = tw.text_code_key(config)
    real_getsource = inspect.getsource

    def edited_file(code):
        if getattr(code, "__module__", None) == text_alignment.__name__:
            return "    hook = classifier.trunk.register_forward_hook(lambda m, i, o: None)\n"
        return real_getsource(code)

    monkeypatch.setattr(inspect, "getsource", edited_file)
    assert tw.text_code_key(config) == before


def test_training_seconds_are_read_from_the_runs_log_windows():
    import pandas as pd

    # Batch 4: 10 steps at 20 images a second (2 s), then 20 steps at 40 (2 s), then a last window of 5 at 10 (2 s).
    log = pd.DataFrame({"step": [10, 30, 35], "img_per_s": [20.0, 40.0, 10.0]})
    assert tw.logged_training_seconds(log, 4) == pytest.approx(6.0)


def test_filed_keys_stay_text_and_a_stopped_run_crosses_processes(tmp_path):
    import pickle

    (tmp_path / "filed.csv").write_text("seed,config_key,code_key\n0,123456789012,12e456789012\n")
    filed = tw.seeds._read_filed(tmp_path / "filed.csv")
    assert (filed["config_key"].iloc[0], filed["code_key"].iloc[0]) == ("123456789012", "12e456789012")
    stopped = pickle.loads(pickle.dumps(tw.TrainingStopped(Path("run"), 5, 10)))
    assert (stopped.out_dir, stopped.step, stopped.steps) == (Path("run"), 5, 10) and "step 5 of 10" in str(stopped)


def test_the_recipe_search_counts_the_time_of_a_run_stopped_and_resumed(tmp_path):
    import importlib.util
    import json
    import time
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("text_recipe_search", ROOT / "experiments" / "text_recipe_search.py")
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)

    def busy(seconds: float) -> None:  # CPU time, not sleep: both clocks must count it
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    def stopped_after_a_while():
        busy(0.2)
        raise tw.TrainingStopped(tmp_path, 5, 10)

    with pytest.raises(tw.TrainingStopped):
        search.timed_training(stopped_after_a_while, 10)
    first = {name: json.loads((tmp_path / name).read_text())["5"] for name in ("train_time.json",
                                                                              "train_cpu_time.json")}
    assert min(first.values()) >= 0.2

    def resumed():
        busy(0.1)
        return SimpleNamespace(out_dir=str(tmp_path))

    _, train_s, cpu_s = search.timed_training(resumed, 10)
    assert train_s >= first["train_time.json"] + 0.1 and cpu_s >= first["train_cpu_time.json"] + 0.1


def test_colour_word_dropout_drops_colour_words_alone_at_its_rate_and_redraws_each_epoch():
    from vitdiff.shapes import COLOURS
    from vitdiff.text_workbook.word_dropout import ColourWordDropout

    shapes = ShapesDataset("train", image_size=16, num_samples=600, return_attributes=False)
    full = [ColourWordDropout(shapes, 0.0).caption(i, c) for i, c in enumerate(shapes.captions)]
    none = [ColourWordDropout(shapes, 1.0).caption(i, c) for i, c in enumerate(shapes.captions)]
    assert full == shapes.captions
    assert none == [" ".join(w for w in c.split() if w not in COLOURS) for c in shapes.captions]
    dropped = ColourWordDropout(shapes, 0.3)
    colour_words = sum(w in COLOURS for c in shapes.captions for w in c.split())
    kept = [dropped.caption(i, c) for i, c in enumerate(shapes.captions)]
    share = 1 - sum(w in COLOURS for c in kept for w in c.split()) / colour_words
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / colour_words) ** 0.5, share  # ~900 words: within 4 s.e.
    assert kept == [dropped.caption(i, c) for i, c in enumerate(shapes.captions)]  # fixed within an epoch
    dropped.set_epoch(1)
    assert shapes.epoch == 1 and kept != [dropped.caption(i, c) for i, c in enumerate(shapes.captions)]
    image, caption = dropped[3]
    assert torch.equal(image, shapes[3][0]) and caption == dropped.caption(3, shapes.captions[3])
    assert dropped.captions is shapes.captions  # the tokenizer is built from the full captions
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ColourWordDropout(shapes, 1.5)
    with pytest.raises(TypeError, match="data.dataset=shapes"):
        ColourWordDropout(torch.utils.data.TensorDataset(torch.zeros(2)), 0.3)


def test_a_colour_word_dropout_run_lives_apart_and_shares_the_vocabulary(tmp_path):
    from vitdiff.text_workbook.word_dropout import ColourWordDropout

    profile = tw.text_profile("smoke", steps=2)
    plain = tw.train_text_model(profile, 0, tmp_path, progress=False)
    dropped = tw.train_text_model(profile, 0, tmp_path, progress=False, colour_dropout=0.5)
    assert dropped.out_dir.parent == tmp_path / "colour-word-dropout-0.5" and plain.out_dir.parent == tmp_path
    assert isinstance(dropped.dataset, ColourWordDropout) and dropped.step == 2
    assert dropped.model.tokenizer.vocab == plain.model.tokenizer.vocab
    # Same seed, same images and noise: only the captions differ, so the models part.
    differ = [name for name, value in dropped.model.state_dict().items()
              if not torch.equal(value, plain.model.state_dict()[name])]
    assert differ and all(name.startswith(("backbone.", "text_encoder.")) for name in differ), differ


def test_held_out_shapes_sees_the_samples_the_notebook_judged(tmp_path):
    """experiments/held_out_shapes.py draws the test captions as alignment_rows does (its captions' seed, batch size,
    clamp), so its held-out counts are the filed rows' `held_out_shape` k: this guards the repetition."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("held_out_shapes", ROOT / "experiments" / "held_out_shapes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trainer = tw.train_text_model(tw.text_profile("smoke", steps=2), 1, tmp_path, progress=False)
    rows = text_alignment.alignment_rows(trainer.ema.module, trainer.process, trainer.config, split="test",
                                         guidances=(3.0,), n=70, seed=1)
    held_out = next(row for row in rows if row["attribute"] == HELD_OUT_SHAPE)
    samples = script.held_out_samples(trainer.out_dir, seed=1, n=70, guidance=3.0)
    drawn = script.asked_shape_drawn(samples)
    assert (int(drawn.sum()), len(drawn)) == (held_out["k"], held_out["n_judged"])
