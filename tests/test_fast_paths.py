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


def _worst_bf16_conv_kernel_error(model) -> float:
    """The largest relative error of torch's own bf16 Conv2d over the model's conv shapes, against an fp32 conv of
    the same bf16-rounded inputs (what a correct bf16 kernel computes up to fp32 accumulation). On some CPUs (seen:
    torch 2.14.1 on an AMX Xeon, Conv2d(16, 96, 4, stride 4): 121%) the kernel itself is wrong."""
    worst = 0.0
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        x = torch.randn(2, conv.in_channels, 16, 16).bfloat16()
        weight, bias = conv.weight.detach().bfloat16(), None if conv.bias is None else conv.bias.detach().bfloat16()
        args = dict(stride=conv.stride, padding=conv.padding, groups=conv.groups)
        exact = torch.nn.functional.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), **args)
        kernel = torch.nn.functional.conv2d(x, weight, bias, **args).float()
        worst = max(worst, ((kernel - exact).abs().mean() / (exact.abs().mean() + 1e-6)).item())
    return worst


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("num_classes", [0, 10])
def test_bf16_autocast_forward_backward(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    kernel_error = _worst_bf16_conv_kernel_error(model)
    if kernel_error > 0.05:  # a torch kernel defect on this CPU, not the model's: the agreement below cannot hold
        pytest.xfail(f"torch {torch.__version__}'s bf16 Conv2d is wrong by {kernel_error:.0%} on this CPU")
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
