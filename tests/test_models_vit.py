"""Tests for the token families: U-ViT / IU-ViT / ViT (vit.py), ASCEND (ascend.py), the U-ViT converter."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from vitdiff.models import create_model
from vitdiff.models.ascend import ASCEND, HierarchicalASCEND, WindowBlock, skip_wiring_indices
from vitdiff.models.convert import convert_uvit_state_dict, load_uvit_pretrained
from vitdiff.models.vit import UViT

TINY = ["U-ViT-tiny", "IU-ViT-tiny", "ViT-tiny", "ASCEND-tiny", "ASCEND-H-tiny"]
CONDITIONS = {
    "uncond": {},
    "class": dict(num_classes=10),
    "text_tokens": dict(context_dim=16, context_len=5),
    "text_cross_attn": dict(context_dim=16, text_mode="cross_attn"),
}


def make_cond(kind: str, batch: int, length: int = 5):
    if kind == "class":
        return torch.tensor([0, 3, 9, 10][:batch])  # 10 = the null label
    if kind.startswith("text"):
        return torch.randn(batch, length, 16)
    return None


def run(model, batch: int = 4, cond=None):
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size)
    t = torch.rand(batch) * 999
    return model(x, t, cond)


@pytest.mark.parametrize("kind", CONDITIONS)
@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_output_shape(name, kind):
    model = create_model(name, **CONDITIONS[kind])
    out = run(model, cond=make_cond(kind, 4))
    assert out.shape == (4, 3, 32, 32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_learn_sigma_doubles_channels_and_single_channel_override(name):
    model = create_model(name, learn_sigma=True, in_channels=1)
    assert run(model, batch=2).shape == (2, 2, 32, 32)


def test_cross_attn_accepts_any_text_length():
    model = create_model("U-ViT-tiny", **CONDITIONS["text_cross_attn"])
    assert run(model, batch=2, cond=torch.randn(2, 9, 16)).shape == (2, 3, 32, 32)


PUBLISHED_MILLIONS = {  # Bao et al. (U-ViT), shared README section 2
    "U-ViT-S/2": 44.26, "U-ViT-S/4": 44.29, "U-ViT-S/2-deep": 58.0, "U-ViT-M/4": 130.9, "U-ViT-L/4": 286.8,
    "U-ViT-H/2": 500.8,
}


@pytest.mark.parametrize("name", PUBLISHED_MILLIONS)
def test_uvit_param_counts_match_published(name):
    with torch.device("meta"):
        model = create_model(name)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.01)


def test_uvit_s2_compute_matches_published():
    # on the meta device FlopCounterMode also counts SDPA (the CPU flash kernel is not registered with it)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model("U-ViT-S/2")
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 32, 32), torch.rand(1))
    assert counter.get_total_flops() / 2e9 == pytest.approx(12.2, rel=0.02)  # ~12.2 GMACs (Bao et al.)


def test_same_seed_same_model_and_output():
    outputs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = create_model("IU-ViT-tiny", num_classes=10)
        torch.manual_seed(7)
        outputs.append(run(model, cond=make_cond("class", 4)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip(name):
    model = create_model(name, num_classes=10).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch.manual_seed(99)  # a fresh model with different weights
    fresh = create_model(name, num_classes=10).eval()
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2) * 999, torch.tensor([1, 10])
    torch.testing.assert_close(fresh(x, t, y), model(x, t, y), rtol=0, atol=0)


# -- U-ViT fidelity: an independent functional forward in the official key layout ------------------------
def reference_uvit(sd, x, t, y=None, context=None, *, patch: int, heads: int):
    """U-ViT's forward (libs/uvit.py, libs/uvit_t2i.py) written from its description, with plain math attention."""
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    dim = tokens.shape[-1]
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2))
    time = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)[:, None]
    if context is not None:  # official text models: [time][text][patches]
        extras = [time, F.linear(context, sd["context_embed.weight"], sd["context_embed.bias"])]
    elif y is not None:  # official class models: [label][time][patches]
        extras = [sd["label_emb.weight"][y][:, None], time]
    else:
        extras = [time]
    h = torch.cat([*extras, tokens], dim=1) + sd["pos_embed"]

    def linear(v, name):
        return F.linear(v, sd[name + ".weight"], sd.get(name + ".bias"))

    def norm(v, name):
        return F.layer_norm(v, (dim,), sd[name + ".weight"], sd[name + ".bias"])

    def block(prefix, v, skip=None):
        if skip is not None:
            v = linear(torch.cat([v, skip], -1), prefix + "skip_linear")
        b, n, _ = v.shape
        q, k, w = linear(norm(v, prefix + "norm1"), prefix + "attn.qkv").reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        v = v + linear((attn @ w).transpose(1, 2).reshape(b, n, dim), prefix + "attn.proj")
        return v + linear(F.gelu(linear(norm(v, prefix + "norm2"), prefix + "mlp.fc1")), prefix + "mlp.fc2")

    depth = len({k.split(".")[1] for k in sd if k.startswith("in_blocks.")})
    skips = []
    for i in range(depth):
        h = block(f"in_blocks.{i}.", h)
        skips.append(h)
    h = block("mid_block.", h)
    for i in range(depth):
        h = block(f"out_blocks.{i}.", h, skips.pop())
    h = linear(norm(h, "norm"), "decoder_pred")[:, sum(e.shape[1] for e in extras):]
    side = x.shape[-1] // patch
    h = h.reshape(x.shape[0], side, side, patch, patch, -1).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)
    return F.conv2d(h, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)


def to_official_layout(model: UViT) -> dict[str, torch.Tensor]:
    """Our state dict as baofff/U-ViT would store it: no null row/token, text models' time token first."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if model.num_classes and model.num_classes == 10:
        sd["label_emb.weight"] = sd["label_emb.weight"][:-1]  # an ImageNet-64-style table without a null label
    if model.context_dim:
        del sd["null_context_token"]
        pos, n = sd["pos_embed"], model.context_len
        sd["pos_embed"] = torch.cat([pos[:, n:n + 1], pos[:, :n], pos[:, n + 1:]], dim=1)
    return sd


@pytest.mark.parametrize("kind", ["uncond", "class", "text_tokens"])
def test_converter_and_model_match_reference_uvit(kind):
    model = create_model("U-ViT-tiny", **CONDITIONS[kind]).eval()
    official = to_official_layout(model)
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2) * 999
    y = torch.tensor([2, 7]) if kind == "class" else None
    context = torch.randn(2, 5, 16) if kind == "text_tokens" else None
    expected = reference_uvit(official, x, t, y, context, patch=4, heads=4)

    torch.manual_seed(5)
    fresh = create_model("U-ViT-tiny", **CONDITIONS[kind]).eval()
    missing, unexpected = fresh.load_state_dict(
        convert_uvit_state_dict(official, num_classes=fresh.num_classes or None, context_len=5), strict=False)
    assert unexpected == [] and missing == (["null_context_token"] if kind == "text_tokens" else [])
    cond = y if y is not None else context
    torch.testing.assert_close(fresh(x, t, cond), expected, rtol=1e-4, atol=1e-5)
    if kind == "class":  # the appended null row is what guidance reads for label num_classes
        assert fresh.label_emb.weight[-1].abs().sum() == 0


def test_load_uvit_pretrained_from_file(tmp_path):
    model = create_model("U-ViT-tiny", num_classes=10).eval()
    torch.save(to_official_layout(model), tmp_path / "nnet_ema.pth")
    loaded = load_uvit_pretrained(str(tmp_path / "nnet_ema.pth"), "U-ViT-tiny", num_classes=10).eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2) * 999, torch.tensor([0, 9])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y))
    with pytest.raises(ValueError, match="does not fit preset"):
        load_uvit_pretrained(str(tmp_path / "nnet_ema.pth"), "U-ViT-tiny")  # built without labels


def test_converter_rejects_foreign_keys():
    with pytest.raises(KeyError, match="not a U-ViT state dict"):
        convert_uvit_state_dict({"blocks.0.attn.qkv.weight": torch.zeros(3, 1)})


# -- errors ------------------------------------------------------------------------------------------------
def test_error_messages():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        UViT(image_size=30, patch_size=4, dim=32, depth=2, num_heads=2)
    model = create_model("U-ViT-tiny")
    with pytest.raises(ValueError, match="in_channels=1"):
        model(torch.randn(1, 1, 32, 32), torch.rand(1))
    with pytest.raises(ValueError, match="unconditional but got cond"):
        model(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([1]))
    with pytest.raises(ValueError, match="needs cond"):
        create_model("U-ViT-tiny", num_classes=10)(torch.randn(1, 3, 32, 32), torch.rand(1))
    with pytest.raises(ValueError, match="context_len=9"):
        create_model("U-ViT-tiny", context_dim=16, context_len=5)(torch.randn(1, 3, 32, 32), torch.rand(1),
                                                                  torch.randn(1, 9, 16))
    with pytest.raises(KeyError, match="Did you mean.*U-ViT-S/2"):
        create_model("UViT-S/2")
    with pytest.raises(ValueError, match="skip='concat'.*'concat_linear'"):
        create_model("U-ViT-tiny", skip="concat")
    with pytest.raises(ValueError, match="depth=5 must be even"):
        create_model("U-ViT-tiny", depth=5)
    with pytest.raises(ValueError, match="power of two"):
        create_model("ASCEND-H-tiny", patch_size=4, image_size=24)
    with pytest.raises(ValueError, match="not divisible by window=8"):
        create_model("ASCEND-H-tiny", image_size=48, window=8)


# -- memory ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["U-ViT-tiny", "ASCEND-tiny", "ASCEND-H-tiny"])
def test_gradient_checkpointing_gives_same_gradients(name):
    model = create_model(name, num_classes=10)
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2) * 999, torch.tensor([1, 4])
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        model(x, t, y).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


# -- IU-ViT switches -----------------------------------------------------------------------------------------
SWITCHES = [("conditioning", "adaln"), ("conditioning", "adaln_zero"), ("skip", "none"), ("skip", "add"),
            ("skip", "lerp"), ("pos_embed", "sincos"), ("head", "linear"), ("norm", "rmsnorm"), ("qk_norm", False),
            ("patch_size", 2), ("conv_stem", False), ("time_mlp", True)]


@pytest.mark.parametrize("switch,value", SWITCHES)
def test_iuvit_switch_builds_runs_and_trains_every_parameter(switch, value):
    model = create_model("IU-ViT-tiny", num_classes=10, **{switch: value})
    out = run(model, cond=make_cond("class", 4))
    assert out.shape == (4, 3, 32, 32)
    out.square().mean().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # an unused parameter would break DDP and signal a dead switch


def test_adaln_zero_blocks_start_as_identity():
    model = create_model("IU-ViT-tiny", num_classes=10, conditioning="adaln_zero")
    tokens = torch.randn(2, 64, 96)
    c = torch.randn(2, 96)
    torch.testing.assert_close(model.in_blocks[0](tokens, None, c), tokens)


def test_sincos_positions_are_fixed_and_excluded_from_parameters():
    learned, fixed = create_model("U-ViT-tiny"), create_model("U-ViT-tiny", pos_embed="sincos")
    assert learned.no_weight_decay() == {"pos_embed"} and "pos_embed" in dict(learned.named_parameters())
    assert fixed.no_weight_decay() == set() and "pos_embed" not in fixed.state_dict()


def test_text_null_context_is_learned_token():
    model = create_model("U-ViT-tiny", context_dim=16, context_len=5)
    text = torch.randn(3, 5, 16)
    dropped = model.drop_cond(text, torch.tensor([True, False, True]))
    torch.testing.assert_close(dropped[1], text[1])
    torch.testing.assert_close(dropped[0], model.null_context_token[0].expand(5, 16))
    assert "null_context_token" in dict(model.named_parameters())


# -- ASCEND ------------------------------------------------------------------------------------------------
def test_skip_wiring_indices():
    assert skip_wiring_indices("last", 8, 4) == ([4, 5, 6, 7], [0, 1, 2, 3])
    assert skip_wiring_indices("every_k", 8, 4) == ([1, 3, 5, 7], [0, 1, 2, 3])
    assert skip_wiring_indices("every_k", 4, 8) == ([0, 1, 2, 3], [0, 2, 4, 6])
    assert skip_wiring_indices("last", 4, 8) == ([0, 1, 2, 3], [0, 1, 2, 3])
    assert skip_wiring_indices("none", 8, 4) == ([], [])
    # A cap on the number of skips: the symmetric split compared with asymmetric ones at one skip each.
    assert skip_wiring_indices("last", 3, 3, max_skips=1) == ([2], [0])
    assert skip_wiring_indices("every_k", 8, 4, max_skips=2) == ([3, 7], [0, 2])
    with pytest.raises(ValueError, match="max_skips must be >= 0"):
        skip_wiring_indices("last", 3, 3, max_skips=-1)
    for wiring in ("last", "every_k"):
        assert skip_wiring_indices(wiring, 6, 6) == (list(range(6)), list(range(6)))


@pytest.mark.parametrize("wiring", ["last", "every_k", "none"])
@pytest.mark.parametrize("depths", [(4, 2), (2, 4)])
def test_ascend_skip_wirings_run(wiring, depths):
    model = create_model("ASCEND-tiny", skip_wiring=wiring, encoder_depth=depths[0], decoder_depth=depths[1])
    expected_skips = 0 if wiring == "none" else min(depths)
    assert sum(hasattr(b, "skip_linear") for b in model.out_blocks) == expected_skips
    out = run(model, batch=2)
    out.mean().backward()
    assert out.shape == (2, 3, 32, 32)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_symmetric_ascend_is_uvit():
    uvit = create_model("U-ViT-tiny").eval()
    ascend = ASCEND(image_size=32, patch_size=4, encoder_depth=2, decoder_depth=2, encoder_dim=96, decoder_dim=96,
                    encoder_heads=4, decoder_heads=4, skip_wiring="last").eval()
    ascend.load_state_dict(uvit.state_dict())  # strict: identical keys and shapes
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2) * 999
    torch.testing.assert_close(ascend(x, t), uvit(x, t))


def test_ascend_s2_is_comparable_to_uvit_s2():
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in create_model(n).parameters()) for n in ("ASCEND-S/2", "U-ViT-S/2")]
    assert sizes[0] == pytest.approx(sizes[1], rel=0.05)


def test_unshifted_window_attention_is_local_and_shifted_crosses_windows():
    for shift, crosses in ((False, False), (True, True)):
        block = WindowBlock(channels=8, cond_dim=4, window=4, shift=shift)
        x = torch.randn(1, 8, 8, 8, requires_grad=True)
        block(x, torch.randn(1, 4))[0, :, 0, 0].sum().backward()
        outside_first_window = x.grad[0].abs().sum(0).clone()
        outside_first_window[:4, :4] = 0
        assert bool(outside_first_window.sum() > 0) == crosses


@pytest.mark.parametrize("decoder_block", ["window", "conv"])
def test_hierarchical_decoder_blocks(decoder_block):
    model = create_model("ASCEND-H-tiny", decoder_block=decoder_block, context_dim=16, context_len=5)
    assert isinstance(model, HierarchicalASCEND)
    assert run(model, batch=2, cond=torch.randn(2, 5, 16)).shape == (2, 3, 32, 32)
    model = create_model("ASCEND-H-tiny", decoder_block=decoder_block, num_classes=10, conditioning="adaln_zero")
    run(model, cond=make_cond("class", 4)).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.slow
def test_hierarchical_256_forward_backward_batch_one():
    model = create_model("ASCEND-H-S/16-256")
    out = run(model, batch=1)
    out.square().mean().backward()
    assert out.shape == (1, 3, 256, 256)
    assert model.patch_embed.proj.weight.grad is not None and model.out[-1].weight.grad is not None


def test_hierarchical_without_its_pixel_path():
    """hires_channels=0 removes the high-resolution skip, decoder_blocks=0 the refining blocks: what notebook 03
    switches off to separate the pixel path from the asymmetry."""
    torch.manual_seed(0)
    full = create_model("ASCEND-H-tiny", in_channels=1, image_size=16, patch_size=4, decoder_channels=(64, 32))
    bare = create_model("ASCEND-H-tiny", in_channels=1, image_size=16, patch_size=4, decoder_channels=(64, 32),
                        hires_channels=0, decoder_blocks=0)
    assert not hasattr(bare, "hires_stem") and all(len(stage.blocks) == 0 for stage in bare.decoder_stages)
    assert sum(p.numel() for p in bare.parameters()) < sum(p.numel() for p in full.parameters())
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert bare(x, t).shape == full(x, t).shape == x.shape
    with pytest.raises(ValueError, match="hires_channels must be >= 0"):
        create_model("ASCEND-H-tiny", hires_channels=-1)
