"""The studies of notebooks 02-05: each one's arms, sized from the profile, and its pre-registered comparisons.

The arms live here, not in the notebooks, so that the campaign command (:mod:`vitdiff.workbook.campaign`) trains
exactly what a notebook renders, and so that every arm builds at every profile's size: widths, depths, heads and the
FLOP-matching searches derive from the profile's :class:`Scale`. At ``tiny`` the scale gives the arms that the
committed cpu runs trained (same config keys).

Each comparison names its test (:mod:`vitdiff.findings`): "X beats Y" is a one-sided superiority test, "X is on par
with Y" an equivalence test against a margin stated here, before the runs; a comparison that differs in more than its
question's factor names that ``confound`` and is descriptive only.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError
from ..findings import Comparison
from .profiles import Profile
from .runs import Variant, match_flops, model_cost_of


@dataclass(frozen=True)
class Scale:
    """Sizes an ablation's arms derive from (one per preset size)."""
    dim: int                # Transformer width of the reference arms
    heads: int              # attention heads at that width
    blocks: int             # total Transformer blocks of notebook 03's depth-split arms (encoder + mid + decoder)
    patch: int              # the reference patch size at the profile's resolution
    hier_patch: int         # ASCEND-H's coarse patch
    hier_channels: tuple    # ASCEND-H's pixel-path channels, one per x2 stage
    hires_channels: int     # ASCEND-H's high-resolution skip width
    dit_depth: int          # depth of the DiT arm at the scale's width (about U-ViT's parameter count)


SCALES = {
    "tiny": Scale(dim=96, heads=4, blocks=7, patch=4, hier_patch=4, hier_channels=(64, 32), hires_channels=16,
                  dit_depth=4),
    "S/2": Scale(dim=512, heads=8, blocks=13, patch=2, hier_patch=4, hier_channels=(256, 128), hires_channels=64,
                 dit_depth=9),
}


def scale_of(profile: Profile) -> Scale:
    if profile.size not in SCALES:
        raise ConfigError(f"no study scale for profile size {profile.size!r}: add one to SCALES ({list(SCALES)})")
    return SCALES[profile.size]


def _widths(scale: Scale, step: int) -> range:
    """Candidate widths for a FLOP-matching search: multiples of ``step`` from one step to 8x the scale's width."""
    return range(step, 8 * scale.dim + 1, step)


@dataclass(frozen=True)
class Study:
    """One notebook's question: its arms at a profile, its comparisons, its reference arm, and the two arms (the
    reference and the most different one) whose learning curves choose the long budget."""
    notebook: str
    reference: str
    budget_arms: tuple[str, str]
    variants: tuple[Variant, ...]
    comparisons: tuple[Comparison, ...]

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"{self.notebook} has no arm {name!r} (arms: {[v.name for v in self.variants]})")


# -- 02 patch size --------------------------------------------------------------------------------------------
UVIT_PATCH = "U-ViT: patch 2 is best at 32x32 (Bao et al. 2023)"


def patch_size_study(profile: Profile) -> Study:
    scale = scale_of(profile)
    small, ref, large = max(1, scale.patch // 2), scale.patch, scale.patch * 2
    fixed = [Variant(f"p{p}", "IU-ViT", {"patch_size": p}) for p in (small, ref, large)]
    target = model_cost_of(fixed[1], profile)[1]
    matched = [match_flops(Variant(f"p{p} matched FLOPs", "IU-ViT", {"patch_size": p}), profile, target,
                           _widths(scale, scale.heads)) for p in (small, large)]
    question = "smaller patch at matched FLOPs (is it only the extra compute?)"
    comparisons = [
        Comparison("smaller patch, same width", UVIT_PATCH, f"p{small}", f"p{ref}", "loss", secondary="fd"),
        Comparison("smaller patch, same width", UVIT_PATCH, f"p{ref}", f"p{large}", "loss", secondary="fd"),
        Comparison(question, "", f"p{small} matched FLOPs", f"p{ref}", "loss", secondary="fd"),
        Comparison(question, "", f"p{ref}", f"p{large} matched FLOPs", "loss", secondary="fd"),
        Comparison(question, "", f"p{small} matched FLOPs", f"p{large} matched FLOPs", "loss", secondary="fd"),
    ]
    return Study("02_patch_size_ablation", f"p{ref}", (f"p{ref}", f"p{large}"), (*fixed, *matched),
                 tuple(comparisons))


# -- 03 ASCEND ------------------------------------------------------------------------------------------------
ASCEND_CLAIM = "ASCEND: a stronger encoder improves generation (Cao et al. 2022)"


def ascend_study(profile: Profile) -> Study:
    scale = scale_of(profile)
    total, middle = scale.blocks, (scale.blocks + 1) // 2  # middle: the symmetric split (encoder counts the mid)

    def split(encoder: int, max_skips: int | None = None) -> Variant:
        name = f"enc {encoder} / dec {total - encoder}" + (f", {max_skips} skip" if max_skips is not None else "")
        return Variant(name, "ASCEND", dict(
            encoder_depth=encoder - 1, decoder_depth=total - encoder, encoder_dim=scale.dim, decoder_dim=scale.dim,
            encoder_heads=scale.heads, decoder_heads=scale.heads, skip_wiring="last", max_skips=max_skips))

    def hierarchical(name: str, **switches) -> Variant:
        return Variant(name, "ASCEND-H", {"patch_size": scale.hier_patch, "decoder_channels": scale.hier_channels,
                                          "decoder_block": "conv", "decoder_blocks": 1,
                                          "hires_channels": scale.hires_channels, **switches})

    deep, shallow = total - 1, total - 2 * (total - middle) + 1  # 6/1 and 2/5 at 7 blocks
    symmetric, matched = split(middle), split(middle, max_skips=1)
    strong, weak = split(deep), split(shallow)
    hier = [hierarchical("H: conv blocks + hi-res skip"),
            hierarchical("H: conv blocks, no hi-res skip", hires_channels=0),
            hierarchical("H: neither", decoder_blocks=0, hires_channels=0)]
    skips = f"1 vs {total - middle} long skips"
    comparisons = [
        Comparison("stronger encoder, same depth and skips", ASCEND_CLAIM, strong.name, matched.name, "loss",
                   secondary="fd"),
        Comparison("weaker encoder, same depth and skips", ASCEND_CLAIM, weak.name, matched.name, "loss", "higher",
                   secondary="fd"),
        Comparison("stronger encoder, same total depth", ASCEND_CLAIM, strong.name, symmetric.name, "loss",
                   secondary="fd", confound=skips),
        Comparison("weaker encoder, same total depth", ASCEND_CLAIM, weak.name, symmetric.name, "loss", "higher",
                   secondary="fd", confound=skips),
        Comparison("fewer long skips, symmetric split", "", matched.name, symmetric.name, "loss", secondary="fd"),
        Comparison("hierarchical: does the hi-res skip help?", "", hier[0].name, hier[1].name, "loss",
                   secondary="fd"),
        Comparison("hierarchical: do the conv blocks help (no skip)?", "", hier[1].name, hier[2].name, "loss",
                   secondary="fd"),
        Comparison("hierarchical: the whole pixel path", "", hier[0].name, hier[2].name, "loss", secondary="fd"),
        Comparison("hierarchical without its pixel path vs the symmetric split", ASCEND_CLAIM, hier[2].name,
                   symmetric.name, "loss", secondary="fd",
                   confound="different patching, decoder and FLOPs, not only the encoder/decoder split"),
    ]
    return Study("03_ascend_ablation", symmetric.name, (symmetric.name, hier[2].name),
                 (symmetric, weak, strong, matched, *hier), tuple(comparisons))


# -- 04 skips and U-ViT's other choices -----------------------------------------------------------------------
def skip_study(profile: Profile) -> Study:
    scale_of(profile)  # the arms are switches of the profile's IU-ViT preset: any known size builds them
    variants = [Variant(f"skip: {mode}", "IU-ViT", {"skip": mode}) for mode in ("concat_linear", "none", "add", "lerp")]
    variants += [Variant("cond: adaln_zero", "IU-ViT", {"conditioning": "adaln_zero"}),
                 Variant("head: linear (no conv)", "IU-ViT", {"head": "linear"}),
                 Variant("pos: sincos", "IU-ViT", {"pos_embed": "sincos"})]
    ref = "skip: concat_linear"

    def worse(question: str, claim: str, arm: str) -> Comparison:
        return Comparison(question, claim, arm, ref, "loss", "higher", secondary="fd")

    comparisons = [
        worse("are long skips needed?", "U-ViT: no skip is much worse", "skip: none"),
        worse("how to fuse a skip", "U-ViT: concat+linear beats add", "skip: add"),
        worse("how to fuse a skip", "U-ViT: concat+linear is the best fusion", "skip: lerp"),
        worse("time as a token or adaLN", "U-ViT: the time token slightly beats adaLN", "cond: adaln_zero"),
        worse("the 3x3 conv after the head", "U-ViT: the extra conv helps", "head: linear (no conv)"),
        worse("position embedding", "U-ViT: learned 1-D is best", "pos: sincos"),
    ]
    return Study("04_skip_connections", ref, (ref, "skip: none"), tuple(variants), tuple(comparisons))


# -- 05 ViT vs U-Net ------------------------------------------------------------------------------------------
IUVIT_CLAIM = "IU-ViT is on par with U-Nets (Cao et al. 2022)"


def unet_study(profile: Profile) -> Study:
    scale = scale_of(profile)
    families = [Variant(family, family) for family in ("ViT", "U-ViT", "IU-ViT", "ASCEND")]
    iuvit_gflops = model_cost_of(families[2], profile)[1]
    dit = Variant("DiT (matched params)", "DiT", {"dim": scale.dim, "depth": scale.dit_depth, "num_heads": scale.heads})
    variants = families + [
        Variant("ASCEND-H", "ASCEND-H", {"patch_size": scale.hier_patch, "decoder_channels": scale.hier_channels,
                                         "decoder_block": "conv", "decoder_blocks": 1,
                                         "hires_channels": scale.hires_channels}),
        dit,
        Variant("U-Net (matched params)", "UNet"),
        match_flops(Variant("U-Net (matched FLOPs)", "UNet", {"num_groups": 2}), profile, iuvit_gflops,
                    _widths(scale, 2)),
    ]
    parity = "IU-ViT vs U-Net: on par?"
    comparisons = [
        Comparison(f"{parity} (matched parameters)", IUVIT_CLAIM, "IU-ViT", "U-Net (matched params)", "loss",
                   test="equivalence", secondary="fd"),
        Comparison(f"{parity} (matched FLOPs)", IUVIT_CLAIM, "IU-ViT", "U-Net (matched FLOPs)", "loss",
                   test="equivalence", secondary="fd"),
        Comparison("do the improvements improve the ViT?", "IU-ViT improves a vanilla ViT (Cao et al. 2022)",
                   "IU-ViT", "ViT", "loss", secondary="fd"),
        Comparison("IU-ViT vs U-ViT", "", "IU-ViT", "U-ViT", "loss", secondary="fd"),
        Comparison("ASCEND vs U-ViT", ASCEND_CLAIM, "ASCEND", "U-ViT", "loss", secondary="fd",
                   confound="the ASCEND preset also differs in decoder width and number of skips"),
        Comparison("hierarchical ASCEND vs U-Net: on par? (matched parameters)", "", "ASCEND-H",
                   "U-Net (matched params)", "loss", test="equivalence", secondary="fd"),
        Comparison("DiT (adaLN-Zero) vs U-ViT at the same size", "", "DiT (matched params)", "U-ViT", "loss",
                   secondary="fd"),
    ]
    return Study("05_vit_vs_unet", "IU-ViT", ("IU-ViT", "U-Net (matched params)"), tuple(variants),
                 tuple(comparisons))


STUDIES = {"02": patch_size_study, "03": ascend_study, "04": skip_study, "05": unet_study}


def study(notebook: str, profile: Profile) -> Study:
    """The study of a notebook, by number ("03") or file stem ("03_ascend_ablation"), at a profile."""
    key = notebook[:2]
    if key not in STUDIES:
        raise ConfigError(f"no study for notebook {notebook!r}: use one of {list(STUDIES)}")
    return STUDIES[key](profile)
