"""The workbook's one figure style: print sizes, fonts, file formats, and one colour and marker per arm.

Figures are drawn at their print size (:data:`ONE_COLUMN` or :data:`TWO_COLUMN` wide), so a font size here is the
size on paper; none is below :data:`MIN_FONT_PT`. PDFs embed TrueType fonts (``pdf.fonttype`` 42, which journals
accept where Type 3 fonts are refused) and carry no creation date, so regenerating a figure from the same results
gives the same bytes; PNGs are 300 dpi.

An arm keeps its colour and marker in every notebook: :data:`ARMS` is keyed by the arm's name, and an arm that is
the same model under another name in another notebook (:data:`SAME_AS`, e.g. 02's ``p4`` is 05's ``IU-ViT``)
borrows that name's style.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ONE_COLUMN = 3.5   # inches: one column of a two-column paper
TWO_COLUMN = 7.0   # inches: the full text width
MIN_FONT_PT = 7
PNG_DPI = 300

RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.title_fontsize": 7, "figure.titlesize": 8,
    "axes.linewidth": 0.6, "lines.linewidth": 1.2, "lines.markersize": 4, "grid.linewidth": 0.4,
    "axes.grid": True, "grid.color": "#dddddd", "axes.spines.top": False, "axes.spines.right": False,
    "legend.frameon": False, "figure.dpi": 110, "savefig.dpi": PNG_DPI, "savefig.bbox": None,
    "figure.constrained_layout.use": True, "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
    "image.interpolation": "nearest",
}


@dataclass(frozen=True)
class ArmStyle:
    colour: str
    marker: str


# Okabe-Ito's colour-blind-safe eight first (the model families of 05), then Paul Tol's muted set for the arms of
# a single ablation; no two arms of one notebook share a colour, no two arms anywhere share colour and marker.
ARMS: dict[str, ArmStyle] = {
    # model families (05) and the samplers' reference points
    "IU-ViT": ArmStyle("#0072B2", "o"),                   # blue
    "U-ViT": ArmStyle("#56B4E9", "s"),                    # sky blue
    "ViT": ArmStyle("#000000", "v"),                      # black
    "ASCEND": ArmStyle("#009E73", "D"),                   # bluish green
    "ASCEND-H": ArmStyle("#CC79A7", "P"),                 # reddish purple
    "DiT (matched params)": ArmStyle("#882255", "^"),     # wine
    "U-Net (matched params)": ArmStyle("#D55E00", "X"),   # vermilion (not a second pink next to ASCEND-H)
    "U-Net (matched FLOPs)": ArmStyle("#E69F00", "*"),    # orange
    # 02: patch size
    "p2": ArmStyle("#332288", "^"),                       # indigo
    "p8": ArmStyle("#117733", "s"),                       # green
    "p2 matched FLOPs": ArmStyle("#AA4499", "v"),         # purple
    "p8 matched FLOPs": ArmStyle("#999933", "D"),         # olive
    # 03: ASCEND's encoder/decoder split
    "enc 4 / dec 3": ArmStyle("#44AA99", "o"),            # teal
    "enc 6 / dec 1": ArmStyle("#332288", ">"),            # indigo
    "enc 2 / dec 5": ArmStyle("#DDCC77", "<"),            # sand
    "enc 4 / dec 3, 1 skip": ArmStyle("#882255", "s"),    # wine
    "H: conv blocks, no hi-res skip": ArmStyle("#117733", "h"),  # green, far from ASCEND-H's pink
    "H: neither": ArmStyle("#888888", "X"),               # grey
    # 04: U-ViT's design choices, each against IU-ViT's
    "skip: none": ArmStyle("#888888", "v"),
    "skip: add": ArmStyle("#CC6677", "^"),                # rose
    "skip: lerp": ArmStyle("#DDCC77", "D"),
    "cond: adaln_zero": ArmStyle("#117733", "P"),
    "head: linear (no conv)": ArmStyle("#AA4499", "s"),
    "pos: sincos": ArmStyle("#E69F00", "h"),
    # 06: samplers (ddim and euler draw the same samples: different markers so both stay visible)
    "ddpm": ArmStyle("#E69F00", "v"),
    "ddim": ArmStyle("#0072B2", "s"),
    "euler": ArmStyle("#56B4E9", "o"),
    "euler_maruyama": ArmStyle("#CC79A7", "^"),
    "heun": ArmStyle("#009E73", "h"),
    "dpmpp_2m": ArmStyle("#D55E00", "P"),
}
# Notebook 07's attributes of a caption (Okabe-Ito), the same in every figure; also their order in a legend. The
# last, shape on the held-out objects alone (test split only), is the composition row.
ATTRIBUTE_LOOKS = {"all_correct": ArmStyle("#000000", "o"), "shape": ArmStyle("#D55E00", "s"),
                   "colour": ArmStyle("#0072B2", "^"), "size": ArmStyle("#009E73", "D"),
                   "position": ArmStyle("#CC79A7", "v"), "count": ArmStyle("#E69F00", "P"),
                   "held_out_shape": ArmStyle("#56B4E9", "X")}
# The same model (same config, same numbers) under another notebook's name.
SAME_AS = {"p4": "IU-ViT", "skip: concat_linear": "IU-ViT", "H: conv blocks + hi-res skip": "ASCEND-H"}
UNKNOWN = ArmStyle("#666666", ".")


def arm_style(name: str) -> ArmStyle:
    """The colour and marker of an arm, by name (a name not in :data:`ARMS` is grey dots: add it there)."""
    return ARMS.get(SAME_AS.get(name, name), UNKNOWN)


def apply() -> None:
    """Set the workbook's style (matplotlib rcParams) for the figures drawn after it."""
    import matplotlib as mpl

    mpl.rcParams.update(RC)


def figure(width: float = ONE_COLUMN, height: float = 2.4, **subplots):
    """A figure at print size (``width`` is :data:`ONE_COLUMN` or :data:`TWO_COLUMN`) with ``plt.subplots``."""
    import matplotlib.pyplot as plt

    if width not in (ONE_COLUMN, TWO_COLUMN):
        raise ValueError(f"a figure is {ONE_COLUMN} or {TWO_COLUMN} in wide, not {width}")
    apply()
    return plt.subplots(figsize=(width, height), **subplots)


def save(fig, out_dir: Path, name: str) -> list[Path]:
    """Write ``name.pdf`` (vector, TrueType fonts, no creation date) and ``name.png`` (300 dpi) at print size."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.pdf", out_dir / f"{name}.png"]
    fig.savefig(paths[0], metadata={"CreationDate": None, "Creator": None, "Producer": None})
    fig.savefig(paths[1], dpi=PNG_DPI, metadata={"Software": None})
    return paths
