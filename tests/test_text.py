"""Text conditioning (tokenizer, encoders, TextToImage) and the shapes data set and judge."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from vitdiff.data import make_dataset
from vitdiff.diffusion import DiffusionLoss, make_process
from vitdiff.models import create_model
from vitdiff.sampling import sample
from vitdiff.shapes import (ABSENT, COLOURS, HELD_OUT_PAIRS, HELD_OUT_SHAPE, SHAPES, ShapesDataset, held_out_objects,
                            parse_caption, predict_attributes, sample_scenes, score_counts, score_predictions, shape_shuffled_baseline, shapes_tokenizer,
                            shuffled_caption_baseline, text_alignment_accuracy, train_attribute_classifier)
from vitdiff.text import (FrozenCLIPEncoder, PrecomputedTextEmbeddings, TextEncoder, TextToImage, WordTokenizer)

CONTEXT_DIM = 32


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return shapes_tokenizer()


def tiny_text_model(tokenizer, backbone: str = "U-ViT-tiny", **overrides) -> TextToImage:
    if not backbone.startswith("DiT"):  # DiT pools the text into its adaLN vector: any length
        overrides.setdefault("context_len", tokenizer.max_length)
    net = create_model(backbone, context_dim=CONTEXT_DIM, **overrides)
    return TextToImage(net, TextEncoder.for_tokenizer(tokenizer, context_dim=CONTEXT_DIM, depth=1), tokenizer)


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_every_caption_and_pads(tokenizer):
    captions = ShapesDataset("all", num_samples=300).captions
    ids = tokenizer(captions)
    assert ids.shape == (300, tokenizer.max_length) and ids.dtype == torch.long
    assert [tokenizer.decode(row) for row in ids] == captions
    assert (ids == tokenizer.unk_id).sum() == 0
    short = tokenizer(["a red circle"])[0]
    assert short[3:].eq(tokenizer.pad_id).all() and short[:3].ne(tokenizer.pad_id).all()
    assert tokenizer([""]).eq(tokenizer.pad_id).all()  # the empty caption is all padding


def test_tokenizer_from_corpus_unknown_truncation_and_json(tmp_path):
    tok = WordTokenizer.from_corpus(["A red bird.", "a blue bird"])
    assert tok.vocab[:2] == ["<pad>", "<unk>"] and tok.max_length == 4  # "a red bird ." is 4 tokens
    assert tok.decode(tok(["a green bird"])[0]) == "a <unk> bird"
    assert tok(["a red bird a red bird"]).shape == (1, 4)
    tok.save(tmp_path / "tok.json")
    loaded = WordTokenizer.load(tmp_path / "tok.json")
    assert loaded.vocab == tok.vocab and loaded.max_length == tok.max_length
    assert torch.equal(loaded(["a blue bird ."]), tok(["a blue bird ."]))
    with pytest.raises(TypeError, match="list of captions"):
        tok("a red bird")
    with pytest.raises(ValueError, match="must start with"):
        WordTokenizer(["a", "b"], 4)


# --------------------------------------------------------------------------- encoders and wrapper
def test_text_encoder_shapes_and_errors(tokenizer):
    encoder = TextEncoder.for_tokenizer(tokenizer, context_dim=CONTEXT_DIM, depth=2)
    ids = tokenizer(["a small red circle on the left", "a large blue square above a small white triangle"])
    out = encoder(ids)
    assert out.shape == (2, tokenizer.max_length, CONTEXT_DIM) and out.isfinite().all()
    with pytest.raises(ValueError, match="long token ids"):
        encoder(ids[:, :3])
    with pytest.raises(ValueError, match="disagree"):
        encoder(torch.full_like(ids, tokenizer.vocab_size))


def test_wrapper_attributes_drop_and_null_cond(tokenizer):
    model = tiny_text_model(tokenizer)
    assert model.is_conditional and model.num_classes == 0 and model.context_dim == CONTEXT_DIM
    assert (model.image_size, model.in_channels, model.out_channels, model.learn_sigma) == (32, 3, 3, False)
    ids = model.encode_prompts(["a small red circle on the left", "a large green square at the top"])
    dropped = model.drop_cond(ids, torch.tensor([True, False]))
    assert dropped[0].eq(tokenizer.pad_id).all() and torch.equal(dropped[1], ids[1])
    assert torch.equal(model.null_cond(ids), model.encode_prompts(["", ""]))
    assert model.no_weight_decay() == {"backbone.pos_embed", "text_encoder.pos_embed"}  # U-ViT's rule, both parts
    model.eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 500.0])
    out = model(x, t, ids)
    assert out.shape == x.shape
    assert not torch.allclose(out, model(x, t, model.null_cond(ids)))  # the caption changes the prediction
    with pytest.raises(ValueError, match="long token ids"):
        model(x, t, ids.float())
    with pytest.raises(ValueError, match="needs cond"):
        model(x, t, None)


def test_wrapper_rejects_mismatched_parts(tokenizer):
    with pytest.raises(ValueError, match="context_dim"):
        TextToImage(create_model("U-ViT-tiny"), TextEncoder.for_tokenizer(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="same width"):
        TextToImage(create_model("U-ViT-tiny", context_dim=16, context_len=tokenizer.max_length),
                    TextEncoder.for_tokenizer(tokenizer, context_dim=CONTEXT_DIM), tokenizer)
    with pytest.raises(ValueError, match="both"):
        TextToImage(create_model("U-ViT-tiny", context_dim=16), TextEncoder.for_tokenizer(tokenizer), None)


@pytest.mark.parametrize("backbone,overrides", [
    ("U-ViT-tiny", {}), ("U-ViT-tiny", {"text_mode": "cross_attn"}), ("DiT-tiny", {}),
    ("U-ViT-tiny", {"pooled_text": True}), ("ASCEND-H-tiny", {"pooled_text": True, "decoder_block": "conv"})])
def test_diffusion_loss_trains_encoder_jointly(tokenizer, backbone, overrides):
    model = tiny_text_model(tokenizer, backbone, **overrides)
    data = ShapesDataset("train", image_size=32, num_samples=4)
    ids, images = model.encode_prompts(data.captions), data.images()
    loss_fn = DiffusionLoss(make_process("ddpm-linear"), cond_drop_prob=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Three steps: DiT's zero-initialised final layer, then adaLN, must move before the condition gets a gradient.
    for _ in range(3):
        optimizer.zero_grad()
        loss = loss_fn(model, images, ids)
        assert loss.shape == (4,) and loss.isfinite().all()
        loss.mean().backward()
        optimizer.step()
    assert model.text_encoder.token_embed.weight.grad.abs().sum() > 0
    if overrides.get("pooled_text"):
        assert model.backbone.pooled_text_embed.weight.grad.abs().sum() > 0


def test_pooled_text_reaches_the_hierarchical_decoder(tokenizer):
    """ASCEND-H adds the pooled caption to its decoder's condition, through the same projection as the encoder's."""
    backbone = tiny_text_model(tokenizer, "ASCEND-H-tiny", pooled_text=True, decoder_block="conv").backbone
    context = torch.randn(2, tokenizer.max_length, CONTEXT_DIM)
    c0, c1 = backbone.decoder_condition(torch.ones(2), context).unbind()
    assert not torch.allclose(c0, c1)
    with torch.no_grad():
        backbone.pooled_text_embed.weight.zero_()
        backbone.pooled_text_embed.bias.zero_()
    c0, c1 = backbone.decoder_condition(torch.ones(2), context).unbind()
    torch.testing.assert_close(c0, c1)


def test_decoder_film_starts_as_identity_and_learns(tokenizer):
    """decoder_film adds a zero-initialised FiLM per decoder stage: off, the model has no such weights; on, it draws
    what the same weights without it draw, and the FiLM weights get gradients (the caption reaches the pixels)."""
    options = dict(pooled_text=True, decoder_block="conv", decoder_blocks=0)
    plain = tiny_text_model(tokenizer, "ASCEND-H-tiny", **options).backbone
    film = tiny_text_model(tokenizer, "ASCEND-H-tiny", decoder_film=True, **options).backbone
    assert not any("film" in key for key in plain.state_dict())
    missing, unexpected = film.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".film." in key for key in missing)
    for stage in film.decoder_stages:  # loading left the zero initialisation in place
        assert not stage.film[-1].weight.any() and not stage.film[-1].bias.any()
    x, t, context = torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, tokenizer.max_length, CONTEXT_DIM)
    torch.testing.assert_close(film(x, t, context), plain(x, t, context), rtol=0, atol=0)
    film(x, t, context).square().mean().backward()
    assert all(stage.film[-1].weight.grad.abs().sum() > 0 for stage in film.decoder_stages)


def test_pooled_text_needs_a_text_model():
    with pytest.raises(ValueError, match="context_dim"):
        create_model("U-ViT-tiny", pooled_text=True)


def test_classifier_free_guidance_sampling(tokenizer):
    model = tiny_text_model(tokenizer).eval()
    ids = model.encode_prompts(["a small red circle on the left", "a large blue square left of a small red circle"])
    process = make_process("ddpm-linear")

    def draw(guidance: float) -> torch.Tensor:
        return sample(model, process, (2, 3, 32, 32), sampler="ddim", steps=3, cond=ids, guidance=guidance,
                      generator=torch.Generator().manual_seed(0), progress=False)

    plain, guided = draw(1.0), draw(4.0)
    assert guided.shape == (2, 3, 32, 32) and guided.isfinite().all()
    assert not torch.allclose(plain, guided)  # the guided path runs the empty caption too


def test_precomputed_embeddings_and_their_null(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    for name in ("0_0", "0_1", "1_0"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal((5, CONTEXT_DIM)).astype(np.float32))
    np.save(tmp_path / "empty_context.npy", np.zeros((5, CONTEXT_DIM), np.float32))
    embeddings = PrecomputedTextEmbeddings(tmp_path)
    assert len(embeddings) == 3 and embeddings.context_dim == CONTEXT_DIM
    assert torch.equal(embeddings["0_1"], embeddings[1]) and embeddings.empty.abs().sum() == 0
    model = TextToImage(create_model("U-ViT-tiny", context_dim=CONTEXT_DIM, context_len=5),
                        null_context=embeddings.empty)
    context = torch.stack([embeddings[0], embeddings[2]])
    dropped = model.drop_cond(context, torch.tensor([False, True]))
    assert torch.equal(dropped[0], context[0]) and dropped[1].abs().sum() == 0
    assert model(torch.randn(2, 3, 32, 32), torch.tensor([1.0, 2.0]), context).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="float embeddings"):
        model.encode_text(torch.zeros(2, 5, dtype=torch.long))
    np.save(tmp_path / "bad.npy", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="one \\(L, D\\)"):
        PrecomputedTextEmbeddings(tmp_path)["bad"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PrecomputedTextEmbeddings(tmp_path / "missing")


def test_clip_adapter_errors_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="LOCAL folder"):
        FrozenCLIPEncoder(tmp_path / "no-such-clip")
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="pip install transformers"):
            FrozenCLIPEncoder(tmp_path)
    else:  # an empty folder holds no weights
        with pytest.raises(FileNotFoundError, match="could not load CLIP"):
            FrozenCLIPEncoder(tmp_path)


# --------------------------------------------------------------------------- shapes data
def test_shapes_is_deterministic_at_every_size():
    a, b = ShapesDataset("train", num_samples=20, seed=3), ShapesDataset("train", num_samples=20, seed=3)
    assert a.captions == b.captions and torch.equal(a.attributes, b.attributes)
    assert torch.equal(a.images(range(5)), b.images(range(5)))
    assert ShapesDataset("train", num_samples=20, seed=4).captions != a.captions
    for size in (32, 64, 256):
        image, caption, attributes = ShapesDataset("val", image_size=size, num_samples=2)[0]
        assert image.shape == (3, size, size) and image.min() >= -1 and image.max() <= 1
        assert isinstance(caption, str) and attributes.shape == (2, 4)


def test_held_out_pairs_never_reach_training():
    held = {(COLOURS.index(c), SHAPES.index(s)) for c, s in HELD_OUT_PAIRS}

    def pairs(split: str) -> list[set]:
        attributes = sample_scenes(3000, split=split)["attributes"]
        return [{(int(c), int(s)) for s, c, _, _ in scene if s != ABSENT} for scene in attributes]

    for split in ("train", "val"):
        assert all(not (scene & held) for scene in pairs(split))
    assert all(scene & held for scene in pairs("test"))
    seen = set().union(*pairs("train"))
    assert {c for c, _ in seen} == set(range(len(COLOURS))) and {s for _, s in seen} == set(range(len(SHAPES)))


def test_captions_state_the_attributes():
    data = ShapesDataset("all", num_samples=200)
    for caption, attributes in zip(data.captions, data.attributes):
        assert torch.equal(parse_caption(caption), attributes)
    assert {c.split()[4] for c in data.captions if len(c.split()) > 7} == {"left", "above"}  # both relations
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a dog on a skateboard")


def test_shapes_in_the_data_registry(tokenizer):
    image, caption = make_dataset("shapes", train=False, max_items=3)[2]
    assert image.shape == (3, 64, 64) and parse_caption(caption)[:, 0].ne(ABSENT).any()
    _, ids = make_dataset("shapes", image_size=32, split="val", num_samples=2, tokenizer=tokenizer)[1]
    assert ids.shape == (tokenizer.max_length,) and ids.dtype == torch.long
    with pytest.raises(ValueError, match="flip"):
        make_dataset("shapes", flip=True)


# --------------------------------------------------------------------------- judge
@pytest.fixture(scope="module")
def quick_judge():
    # A short run (the cached judge trains 3x longer on 4x the images); enough to show the metric works.
    return train_attribute_classifier(num_images=2000, steps=100, batch_size=64)


def test_judge_reads_real_test_images(quick_judge):
    data = ShapesDataset("test", num_samples=300)
    scores = text_alignment_accuracy(data.images(), data.attributes, quick_judge)
    assert min(scores["count"], scores["colour"], scores["size"], scores["position"]) > 0.9
    assert scores["shape"] > 0.6 and scores["all_correct"] > 0.4
    # Captions that do not match the images score far lower: the metric can fail.
    shuffled = shuffled_caption_baseline(predict_attributes(data.images(), quick_judge), data.attributes)
    assert shuffled["all_correct"] < 0.1 and shuffled["colour"] < 0.5
    assert scores["all_correct"] > 5 * shuffled["all_correct"]


def test_shuffled_caption_baseline_is_the_score_against_other_captions():
    two_objects = torch.tensor([[[0, 0, 0, 0], [1, 1, 1, 1]]])   # left of
    one_object = torch.tensor([[[2, 2, 1, 2], [ABSENT] * 4]])     # at the top
    # Identical captions: another caption is the same caption, so the baseline equals the accuracy.
    same = two_objects.repeat(5, 1, 1)
    assert shuffled_caption_baseline(same, same) == score_predictions(same, same)
    # Two different captions: every derangement swaps them, so the baseline is the score of the swapped pair.
    pair = torch.cat([two_objects, one_object])
    assert shuffled_caption_baseline(pair, pair, draws=3) == score_predictions(pair, pair.flip(0))
    assert score_predictions(pair, pair)["all_correct"] == 1.0
    assert shuffled_caption_baseline(pair, pair)["all_correct"] == 0.0
    # A perfect model's scenes against other captions of the real layout: position is not uniform guessing (1/4).
    # A one-object caption's object matches another caption's first object 1/4 of the time; an object of a
    # two-object caption matches 1/2 against a two-object caption (same relation) and 1/8 on average against a
    # one-object one, so 5/16. Half the captions name two objects: per named object (1/4 + 2 * 5/16) / 3 = 7/24.
    scenes = ShapesDataset("val", num_samples=1000).attributes
    assert shuffled_caption_baseline(scenes, scenes)["position"] == pytest.approx(7 / 24, abs=0.015)


def test_counts_and_the_shape_shuffled_baseline():
    # Three one-object captions with three shapes, drawn perfectly: every object is judged once.
    one = torch.tensor([[[shape, 1, 0, 2], [ABSENT] * 4] for shape in range(3)])
    two = torch.tensor([[[0, 0, 0, 0], [1, 1, 1, 1]]])
    captions = torch.cat([one, two])
    counts = score_counts(captions, captions)
    assert counts["shape"] == (5, 5) and counts["count"] == (4, 4) and counts["all_correct"] == (4, 4)
    assert score_predictions(captions, captions) == {name: k / n for name, (k, n) in counts.items()}
    # Shuffling only the shape word keeps every other word: colour, size, position and count stay right.
    shape_only = shape_shuffled_baseline(captions, captions, draws=8)
    assert all(shape_only[name] == 1.0 for name in ("colour", "size", "position", "count"))
    # Shapes 0, 1, 2, 0, 1 over five objects: a derangement keeps an object's shape only by moving an equal shape
    # onto it, so shape is right on some draws, never on all.
    assert 0.0 < shape_only["shape"] < 1.0 and shape_only["all_correct"] < 1.0
    # With distinct shapes (the three one-object captions), every derangement changes every shape.
    assert shape_shuffled_baseline(one, one)["shape"] == 0.0 == shape_shuffled_baseline(one, one)["all_correct"]
    # The whole-caption shuffle also scores shape against slots the other caption names: it sits lower here.
    assert shuffled_caption_baseline(captions, captions)["count"] < 1.0


def test_composition_is_judged_on_the_held_out_objects_alone():
    # Every test caption names a held-out pair; half of them name a seen pair too.
    captions = torch.as_tensor(sample_scenes(400, seed=3, split="test")["attributes"])
    held = held_out_objects(captions)
    assert held.any(1).all() and held.sum() < (captions[:, :, 0] != ABSENT).sum()
    # A model that draws every seen pair right and a held-out pair's shape at random does not compose, yet over
    # every object the captions name its shape beats the shape-shuffled baseline, on the seen pairs alone.
    drawn = captions.clone()
    drawn[:, :, 0][held] = torch.randint(len(SHAPES), (int(held.sum()),), generator=torch.Generator().manual_seed(0))
    rates, null = score_predictions(drawn, captions), shape_shuffled_baseline(drawn, captions)
    assert rates["shape"] - null["shape"] > 0.15
    assert abs(rates[HELD_OUT_SHAPE] - null[HELD_OUT_SHAPE]) < 0.06
    assert score_counts(drawn, captions)[HELD_OUT_SHAPE][1] == int(held.sum())
    # Drawing each held-out pair as the colour's next shape (always a pair seen in training) scores 0, below the null.
    seen = captions.clone()
    seen[:, :, 0][held] = (captions[:, :, 0][held] + 1) % len(SHAPES)
    assert not held_out_objects(seen).any()
    assert score_predictions(seen, captions)[HELD_OUT_SHAPE] == 0.0 < shape_shuffled_baseline(seen, captions)[
        HELD_OUT_SHAPE]
    # The baselines judge the true captions' held-out objects, whatever shape a shuffled caption gives them.
    assert shuffled_caption_baseline(captions, captions)[HELD_OUT_SHAPE] < 1.0
    # Captions of seen pairs only (val) have no such row.
    val = torch.as_tensor(sample_scenes(50, split="val")["attributes"])
    assert HELD_OUT_SHAPE not in score_counts(val, val) and HELD_OUT_SHAPE not in shape_shuffled_baseline(val, val)


def test_a_perfect_generator_of_the_captions_redraws_their_scenes_with_new_jitter():
    from vitdiff.text_alignment import fd_shapes

    captions = ShapesDataset("val", image_size=32, num_samples=64, seed=5)
    real, redrawn = captions.images(), captions.redrawn_images(seed=1)
    assert torch.equal(redrawn, captions.redrawn_images(seed=1)) and not torch.equal(redrawn, real)
    # Only positions move, a little: the judge reads the same attributes off the redrawn scenes as off the real ones.
    assert torch.equal(predict_attributes(redrawn), predict_attributes(real))
    # Matched to its captions, the redraw sits far below the FD of other real scenes of the split.
    other = ShapesDataset("val", image_size=32, num_samples=64, seed=6).images()
    assert fd_shapes(redrawn, real) < 0.5 * fd_shapes(other, real)


# --------------------------------------------------------------------------- resolution
def test_text_to_image_256_trains_on_cpu_at_batch_1(tokenizer):
    # The 256x256 hierarchical ASCEND preset, trunk cut to 2 blocks so the test stays quick.
    net = create_model("ASCEND-H-S/16-256", context_dim=64, context_len=tokenizer.max_length, depth=2)
    model = TextToImage(net, TextEncoder.for_tokenizer(tokenizer, context_dim=64, depth=1), tokenizer)
    model.set_gradient_checkpointing(True)
    data = ShapesDataset("train", image_size=256, num_samples=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # no decay: only gradients move them
    loss_fn = DiffusionLoss(make_process("ddpm-linear"), cond_drop_prob=0.1)
    for index in range(2):
        image, caption, _ = data[index]
        loss = loss_fn(model, image[None], model.encode_prompts([caption])).mean()
        assert loss.isfinite()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}
    assert "text_encoder.token_embed.weight" in changed and "backbone.context_embed.weight" in changed
    assert len(changed) > 0.8 * len(before)


def test_held_out_shapes_drawn_tabulates_each_held_out_pair_by_the_shape_drawn():
    """Each held-out object counted once, under its pair, by what was drawn; the shares agree with the count test's
    held-out row on the same predictions."""
    import pandas as pd

    from vitdiff.text_alignment import held_out_shapes_drawn

    captions = torch.as_tensor(sample_scenes(300, seed=4, split="test")["attributes"])
    held = held_out_objects(captions)
    drawn = captions.clone()
    # Every held-out object drawn as the colour's next shape (a pair seen in training), but the first one right and
    # the second one missing (a sample with fewer objects than its caption).
    drawn[:, :, 0][held] = (captions[:, :, 0][held] + 1) % len(SHAPES)
    first, second = held.nonzero()[:2]
    drawn[first[0], first[1], 0] = captions[first[0], first[1], 0]
    drawn[second[0], second[1]] = ABSENT
    table = held_out_shapes_drawn(drawn, captions).set_index("pair")
    assert list(table.index) == [f"{colour} {shape}" for colour, shape in HELD_OUT_PAIRS]
    assert table["n"].sum() == int(held.sum()) == table[[*SHAPES, "absent"]].to_numpy().sum()
    assert table["absent"].sum() == 1
    assert (table["asked"] * table["n"]).round().sum() == 1 == score_counts(drawn, captions)[HELD_OUT_SHAPE][0]
    pd.testing.assert_series_equal(table["asked"] + table["seen_with_colour"] + table["absent"] / table["n"],
                                   pd.Series(1.0, index=table.index), check_names=False)
    with pytest.raises(ValueError, match="must both be"):
        held_out_shapes_drawn(drawn[:, :1], captions)


def test_held_out_shapes_compares_two_models_item_by_item_on_the_held_out_objects(tmp_path):
    """The experiment's paired row: the same captions' held-out objects, McNemar on those one model alone draws
    right; a model sampled on other captions is refused, and a redone row replaces its earlier self."""
    import pandas as pd

    spec = importlib.util.spec_from_file_location("held_out_shapes",
                                                  Path(__file__).resolve().parents[1] / "experiments" /
                                                  "held_out_shapes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    captions = torch.as_tensor(sample_scenes(200, seed=5, split="test")["attributes"])
    held = held_out_objects(captions)
    wrong = captions.clone()
    wrong[:, :, 0][held] = (captions[:, :, 0][held] + 1) % len(SHAPES)
    better = wrong.clone()
    first_ten = held.nonzero()[:10]
    better[first_ten[:, 0], first_ten[:, 1], 0] = captions[first_ten[:, 0], first_ten[:, 1], 0]
    arm, reference = (script.HeldOutSamples(drawn, captions, 100, 64) for drawn in (better, wrong))
    assert script.asked_shape_drawn(arm).sum() == 10 and len(script.asked_shape_drawn(arm)) == int(held.sum())
    row = script.paired_row(arm, reference, names=("dropout", "control"), seed=2, n=200, guidance=3.0)
    assert (row["arm_only"], row["ref_only"], row["n"]) == (10, 0, int(held.sum()))
    assert row["p_support"] == pytest.approx(0.5 ** 10) and row["verdict"] == "supported"
    assert script.paired_row(reference, arm, names=("control", "dropout"), seed=2, n=200,
                             guidance=3.0)["verdict"] == "contradicted"
    other = script.HeldOutSamples(wrong, torch.as_tensor(sample_scenes(200, seed=6, split="test")["attributes"]),
                                  100, 64)
    with pytest.raises(ValueError, match="same seed and -n"):
        script.paired_row(arm, other, names=("a", "b"), seed=2, n=200, guidance=3.0)
    table = tmp_path / "paired.csv"
    for k in (1, 2):
        script.replace_rows(table, pd.DataFrame([{**row, "k_arm": k}]), ["arm", "reference", "captions"])
    script.replace_rows(table, pd.DataFrame([{**row, "captions": 96}]), ["arm", "reference", "captions"])
    filed = pd.read_csv(table)
    assert sorted(zip(filed["captions"], filed["k_arm"])) == [(96, 10), (200, 2)]
