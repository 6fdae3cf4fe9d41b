"""Every backbone family runs under bf16 autocast and is captured whole by torch.compile.

Compilation to machine code (inductor) costs a minute per model on this CPU, so the test
compiles with the ``eager`` backend and ``fullgraph=True``: that checks what breaks in
practice (graph breaks, untraceable Python) in seconds; the benchmark script covers inductor.
"""
import pytest
import torch

from vitdiff.models import PRESETS, create_model

TINY = sorted(name for name in PRESETS if name.endswith("-tiny"))


def _inputs(model, batch=2):
    x = torch.randn(batch, model.in_channels, model.image_size, model.image_size)
    t = torch.rand(batch) * 999
    return x, t


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_bf16_autocast_forward_backward(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    x, t = _inputs(model)
    cond = torch.tensor([3, num_classes]) if num_classes else None  # one real label, one null label
    reference = model(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    out.float().square().mean().backward()
    assert out.shape == reference.shape
    assert torch.isfinite(out.float()).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the output's scale.
    scale = reference.abs().mean().item() + 1e-3
    assert (out.float() - reference).abs().mean().item() < 0.05 * scale + 1e-2


@pytest.mark.parametrize("name", TINY)
def test_torch_compile_captures_one_graph(name):
    torch._dynamo.reset()
    model = create_model(name, num_classes=10).eval()
    x, t = _inputs(model)
    cond = torch.tensor([1, 2])
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, cond), model(x, t, cond))
