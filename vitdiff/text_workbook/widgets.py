"""Notebook 07's widget: a prompt box over a trained model, scored by the shapes judge."""
from __future__ import annotations

from ..config import Config
from ..workbook import explorer
from .figures import prompt_grid, show_captioned


def prompt_explorer(model, process, config: Config, *, prompt: str = "a large red circle left of a small blue square",
                    n: int = 4, guidance: float = 3.0):
    """Type a prompt, set guidance and seed, see n samples and what the shapes judge reads (:func:`explorer`)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from ..shapes import parse_caption, text_alignment_accuracy

    def draw(prompt: str, guidance: float, seed: int):
        images = prompt_grid(model, process, config, [prompt], per_prompt=n, guidance=guidance, seed=seed)
        try:
            asked = parse_caption(prompt).expand(n, -1, -1)
            scores = text_alignment_accuracy(images.clamp(-1, 1), asked)
            verdict = f"judge: {scores['all_correct']:.0%} all-correct"
        except ValueError:
            verdict = "not a shapes caption: the judge cannot score it (unknown words become <unk>)"
        show_captioned(images, [f"{prompt!r}, guidance {guidance:g}, seed {seed}; {verdict}"], per_row=n,
                       title="")
        plt.show()

    return explorer(draw, {
        "prompt": widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="60%")),
        "guidance": widgets.FloatSlider(value=guidance, min=1.0, max=8.0, step=0.5, description="guidance"),
        "seed": widgets.IntText(value=0, description="seed"),
    })
