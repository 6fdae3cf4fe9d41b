"""Interactive explorers for JupyterLab (a plain figure first, so headless runs and viewers show it too)."""
from __future__ import annotations

from ..config import Config
from .figures import show_grid


def explorer(draw, controls: dict):
    """``draw(**values)`` once with the controls' values as a plain figure, then a panel that redraws on "draw".

    The plain figure is what every viewer shows (GitHub, nbconvert, a headless papermill run: none of them
    runs widgets); in JupyterLab, set the controls and press "draw" for a new grid below them."""
    import ipywidgets as widgets

    draw(**{name: control.value for name, control in controls.items()})
    return widgets.interactive(draw, {"manual": True, "manual_name": "draw"}, **controls)


def sample_explorer(model, process, config: Config, *, n: int = 20, max_steps: int = 100, guidance: float = 1.0):
    """Sample grids by sampler, steps, guidance and seed (:func:`explorer`); for a class-conditional model the
    labels cycle 0, 1, 2, ..., one column per class."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from ..sampling import SAMPLERS
    from ..generate import generate

    num_classes = getattr(model, "num_classes", 0)

    def draw(sampler: str, steps: int, guidance: float, seed: int):
        images = generate(model, process, config, n=n, seed=seed, device=next(model.parameters()).device,
                          sampler=sampler, steps=steps, guidance=guidance if num_classes else 1.0)
        conditioning = f", guidance {guidance:g}" if num_classes else ""
        title = f"{sampler}, {steps} steps{conditioning}, seed {seed}"
        show_grid(images, nrow=num_classes or int(n ** 0.5), title=title)
        plt.show()

    return explorer(draw, {
        "sampler": widgets.Dropdown(options=list(SAMPLERS), value=config.sample.sampler, description="sampler"),
        "steps": widgets.IntSlider(value=config.sample.steps, min=1, max=max_steps, description="steps"),
        "guidance": widgets.FloatSlider(value=guidance, min=1.0, max=8.0, step=0.25, description="guidance",
                                        disabled=not num_classes),
        "seed": widgets.IntText(value=0, description="seed"),
    })
