"""DiT and DDPM U-Net backbones, the DiT converter and the `vitdiff models` catalog.

References: published sizes (DiT paper Table 4, DDPM), an independent functional
DiT forward written from the official key layout, and diffusers' UNet2DModel.
"""
from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitdiff.models import create_model
from vitdiff.models.catalog import main as catalog_main
from vitdiff.models.convert import convert_dit_state_dict
from vitdiff.models.dit import DiT
from vitdiff.models.unet import UNet

TINY = ["DiT-tiny", "UNet-tiny"]


def randomize(model: nn.Module, std: float = 0.1) -> nn.Module:
    """Zero-initialised branches would hide wiring bugs: give every weight a random value."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model.eval()


def inputs(model, batch: int = 2):
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size)
    t = torch.rand(batch) * 999
    return x, t


# -- shapes and conditioning ---------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("overrides", [{}, {"num_classes": 10}, {"learn_sigma": True}])
def test_output_shape(name, overrides):
    model = create_model(name, **overrides)
    x, t = inputs(model)
    cond = torch.tensor([3, 10]) if overrides.get("num_classes") else None  # 10 = null label
    out = model(x, t, cond)
    channels = 2 * x.shape[1] if overrides.get("learn_sigma") else x.shape[1]
    assert out.shape == (2, channels, *x.shape[2:])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_zero_init_output_and_gradients_reach_all_parameters(name):
    model = create_model(name, num_classes=10)
    x, t = inputs(model)
    out = model(x, t, torch.tensor([1, 2]))
    assert out.abs().max() == 0  # adaLN-Zero / zeroed output conv: the model starts by predicting 0
    randomize(model, 0.05).train()
    model(x, t, torch.tensor([1, 2])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    # Only the row of the unused labels gets no gradient.
    assert missing == [n for n in missing if "embed" in n], missing


@pytest.mark.parametrize("name", TINY)
def test_label_changes_output_and_null_label_is_drop_cond(name):
    model = randomize(create_model(name, num_classes=10))
    x, t = inputs(model)
    labels = torch.tensor([1, 2])
    assert not torch.allclose(model(x, t, labels), model(x, t, torch.tensor([5, 6])))
    assert torch.equal(model.null_cond(labels), torch.tensor([10, 10]))


def test_dit_text_condition_pools_context_and_learns_null_token():
    model = randomize(create_model("DiT-tiny", context_dim=16))
    x, t = inputs(model)
    context = torch.randn(2, 7, 16)
    out = model(x, t, context)
    assert out.shape == x.shape
    null = model.null_cond(context)
    assert null.shape == context.shape and torch.equal(null[0, 0], model.context_embedder.null_token)
    assert not torch.allclose(out, model(x, t, null))
    # Mean pooling: token order does not matter.
    torch.testing.assert_close(out, model(x, t, context.flip(1)))


# -- published sizes ---------------------------------------------------------------------

def meta_params(name: str) -> int:
    with torch.device("meta"):
        model = create_model(name)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size,published", [("S", 33e6), ("B", 130e6), ("L", 458e6), ("XL", 675e6)])
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_dit_param_counts_match_paper(size, published, patch):
    assert meta_params(f"DiT-{size}/{patch}") == pytest.approx(published, rel=0.01)


def test_dit_xl2_matches_released_parameter_count_exactly():
    # The released DiT-XL/2 has 675,129,632 parameters, 294,912 of them the frozen
    # pos_embed, which vitdiff keeps as a buffer.
    assert meta_params("DiT-XL/2") == 675_129_632 - 256 * 1152


def test_ddpm_unet_param_count_matches_paper_and_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours = meta_params("DDPM-UNet")
    assert ours == pytest.approx(35.7e6, rel=0.01)
    with torch.device("meta"):
        peer = diffusers.UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2, norm_eps=1e-6, downsample_padding=0)
    assert ours == sum(p.numel() for p in peer.parameters())


# -- catalog ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def catalog_rows():
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert catalog_main(["--json"]) == 0
    return {row["name"]: row for row in json.loads(buffer.getvalue())}


def test_catalog_json_lists_every_preset_with_sizes(catalog_rows):
    from vitdiff.models import PRESETS

    assert set(catalog_rows) == set(PRESETS)
    for row in catalog_rows.values():
        assert set(row) == {"name", "family", "image_size", "in_channels", "patch_size", "params", "gflops"}
        assert row["params"] > 0 and row["gflops"] > 0
    assert catalog_rows["DiT-XL/2"]["family"] == "DiT" and catalog_rows["DDPM-UNet"]["family"] == "U-Net"
    assert catalog_rows["DiT-S/2"]["params"] == meta_params("DiT-S/2")
    assert (catalog_rows["DiT-B/4"]["image_size"], catalog_rows["DiT-B/4"]["in_channels"],
            catalog_rows["DiT-B/4"]["patch_size"]) == (32, 4, 4)
    assert catalog_rows["DDPM-UNet"]["params"] == meta_params("DDPM-UNet")


@pytest.mark.parametrize("name,published", [("DiT-XL/2", 118.64), ("DiT-S/2", 6.06), ("DiT-B/4", 5.56),
                                            ("DiT-L/8", 5.01)])
def test_catalog_gflops_match_dit_paper(catalog_rows, name, published):
    assert catalog_rows[name]["gflops"] == pytest.approx(published, rel=0.01)


def test_catalog_family_filter(capsys):
    assert catalog_main(["--family", "u-net"]) == 0
    table = capsys.readouterr().out
    assert "DDPM-UNet" in table and "DiT" not in table
    with pytest.raises(SystemExit):
        catalog_main(["--family", "no-such-family"])
    assert "families:" in capsys.readouterr().err


# -- determinism and state dicts ------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_same_seed_same_model_and_deterministic_eval(name):
    torch.manual_seed(1)
    first = create_model(name)
    torch.manual_seed(1)
    second = create_model(name)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    randomize(first)
    x, t = inputs(first)
    assert torch.equal(first(x, t), first(x, t))


@pytest.mark.parametrize("name", TINY)
def test_state_dict_round_trip(name, tmp_path):
    model = randomize(create_model(name, num_classes=10, learn_sigma=True))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    clone = create_model(name, num_classes=10, learn_sigma=True).eval()
    clone.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    x, t = inputs(model)
    labels = torch.tensor([0, 9])
    assert torch.equal(model(x, t, labels), clone(x, t, labels))


def test_dit_state_dict_has_no_fixed_pos_embed():
    assert "pos_embed" not in create_model("DiT-tiny").state_dict()


@pytest.mark.parametrize("name", TINY)
def test_gradient_checkpointing_gives_same_gradients(name):
    model = randomize(create_model(name, dropout=0.0) if name == "UNet-tiny" else create_model(name)).train()
    x, t = inputs(model)
    model(x, t).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_gradient_checkpointing(True)(x, t).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], msg=n)


# -- DiT against the official layout ---------------------------------------------------------

def mae_pos_embed(dim: int, grid_size: int) -> np.ndarray:
    """MAE/DiT's table, written from its definition: np.meshgrid(w, h), half the channels each, [sin | cos]."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    coords = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(coords, coords), axis=0)
    return np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)


def official_dit_forward(sd, x, t, y, patch: int, heads: int) -> torch.Tensor:
    """DiT's forward as a function of an official-layout state dict (timm Attention/Mlp semantics)."""
    def linear(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def modulate(h, shift, scale):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    b, n, d = tokens.shape
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    sinusoid = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    c = linear(F.silu(linear(sinusoid, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(c), p + "adaLN_modulation.1").chunk(6, dim=1)
        q, k, v = linear(modulate(tokens, shift1, scale1), p + "attn.qkv").reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(b, n, d)
        tokens = tokens + gate1[:, None] * linear(attended, p + "attn.proj")
        hidden = F.gelu(linear(modulate(tokens, shift2, scale2), p + "mlp.fc1"), approximate="tanh")
        tokens = tokens + gate2[:, None] * linear(hidden, p + "mlp.fc2")
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = linear(modulate(tokens, shift, scale), "final_layer.linear")
    side, channels = int(n ** 0.5), out.shape[-1] // patch ** 2
    out = out.reshape(b, side, side, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, channels, side * patch, side * patch)


def official_layout(model: DiT) -> dict[str, torch.Tensor]:
    """Our weights under the official names, plus the frozen pos_embed the official checkpoints carry."""
    sd = dict(model.state_dict())
    grid = model.image_size // model.patch_size
    sd["pos_embed"] = torch.from_numpy(mae_pos_embed(model.dim, grid)).float()[None]
    return sd


def test_dit_matches_official_forward_and_converter_round_trips():
    model = randomize(create_model("DiT-tiny", num_classes=10, learn_sigma=True))
    x, t = inputs(model)
    labels = torch.tensor([4, 10])
    official = official_layout(model)
    expected = official_dit_forward(official, x, t, labels, patch=4, heads=2)
    torch.testing.assert_close(model(x, t, labels), expected, rtol=1e-4, atol=1e-5)

    converted = create_model("DiT-tiny", num_classes=10, learn_sigma=True).eval()
    converted.load_state_dict(convert_dit_state_dict(official))  # strict: every key accounted for
    torch.testing.assert_close(converted(x, t, labels), expected, rtol=1e-4, atol=1e-5)


def test_dit_converter_checks_what_it_drops_and_adds_null_row():
    model = create_model("DiT-tiny", num_classes=10)
    official = official_layout(model)
    with pytest.raises(ValueError, match="pos_embed"):
        convert_dit_state_dict({**official, "pos_embed": official["pos_embed"] + 0.1})
    with pytest.raises(KeyError, match="unexpected keys"):
        convert_dit_state_dict({**official, "head.weight": torch.zeros(1)})
    no_dropout = {**official, "y_embedder.embedding_table.weight": official["y_embedder.embedding_table.weight"][:10]}
    converted = convert_dit_state_dict({"ema": no_dropout}, num_classes=10)
    assert converted["y_embedder.embedding_table.weight"].shape == (11, model.dim)
    model.load_state_dict(converted)


# -- U-Net against diffusers ---------------------------------------------------------------

def to_diffusers_key(key: str) -> list[str]:
    """Our U-Net parameter name -> diffusers UNet2DModel name(s) (qkv splits into three)."""
    rules = [
        (r"^time_mlp\.0\.", "time_embedding.linear_1."), (r"^time_mlp\.2\.", "time_embedding.linear_2."),
        (r"^label_embedding\.", "class_embedding."), (r"^norm_out\.", "conv_norm_out."),
        (r"^(down|up)\.(\d+)\.res_blocks\.", r"\1_blocks.\2.resnets."),
        (r"^(down|up)\.(\d+)\.attn_blocks\.", r"\1_blocks.\2.attentions."),
        (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
        (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
        (r"^mid_block1\.", "mid_block.resnets.0."), (r"^mid_block2\.", "mid_block.resnets.1."),
        (r"^mid_attn\.", "mid_block.attentions.0."),
        (r"\.emb_proj\.", ".time_emb_proj."), (r"\.shortcut\.", ".conv_shortcut."),
        (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"\.attn\.proj\.", ".to_out.0."),
    ]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    if ".attn.qkv." in key:
        return [key.replace(".attn.qkv.", f".to_{part}.") for part in "qkv"]
    return [key]


def test_unet_matches_diffusers_unet2dmodel_with_ported_weights():
    diffusers = pytest.importorskip("diffusers")
    ours = randomize(create_model("UNet-tiny", num_classes=10, dropout=0.0), std=0.05)
    # Same architecture in diffusers' vocabulary; [cos | sin] sinusoid over `half` as vitdiff's.
    peer = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=True, freq_shift=0,
        num_class_embeds=11).eval()
    ported = {}
    for key, value in ours.state_dict().items():
        names = to_diffusers_key(key)
        for name, part in zip(names, value.chunk(len(names))):
            ported[name] = part
    peer.load_state_dict(ported)  # strict: the two layouts correspond one to one
    x, t = inputs(ours)
    labels = torch.tensor([2, 10])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, labels), peer(x, t, class_labels=labels).sample, rtol=1e-4, atol=1e-4)


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TINY)
def test_clear_errors(name):
    model = create_model(name)
    x, t = inputs(model)
    with pytest.raises(ValueError, match="in_channels=1"):
        model(x[:, :1], t)
    with pytest.raises(ValueError, match="unconditional but got cond"):
        model(x, t, torch.tensor([1, 2]))
    labelled = create_model(name, num_classes=10)
    with pytest.raises(ValueError, match="needs cond"):
        labelled(x, t)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        labelled(x, t, torch.tensor([1, 11]))


def test_constructor_errors_name_the_fix():
    with pytest.raises(ValueError, match="transformer"):
        UNet(context_dim=16)
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(image_size=20, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="patch size"):
        DiT(image_size=30, patch_size=4, dim=64, depth=1, num_heads=2)
