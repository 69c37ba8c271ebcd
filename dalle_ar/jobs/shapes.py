"""The shapes data set, as the main job uses it: procedural 32x32 scenes of coloured shapes with
their captions, some colour-shape pairs held out of training (`dalle_ar.data.shapes`), and prompt
fidelity read back from the pixels by the shape checker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import COMPONENT_CONFIGS, DataSet

# A handful of prompts for the grid: seen and held-out colour-shape combinations
# (dalle_ar.data.shapes.HELD_OUT_COMBOS), one- and two-object scenes, in the captions' own words
# (shapes.caption: the cell above the centre is "top middle" or "top").
PROMPTS = [
    "a small red circle at the top left",
    "a big blue square in the centre",
    "a large green triangle at the bottom right",
    "a small yellow diamond at the top middle",
    "a red square to the left of a blue circle",
    "a big purple circle above a small orange square",
]


def build(cfg: MainJobConfig, out: Path, size: int) -> None:
    """Training and evaluation shards with info.json, scenes rendered at `size` pixels (32 in
    configs/shapes/; `dalle-ar data shapes`)."""
    _render(cfg, out, cfg.num_train, size)


def build_large(cfg: MainJobConfig, out: Path, size: int) -> None:
    """The upsampler's shards: `cfg.upsampler_images` scenes rendered at `size` pixels (the
    upsampler's large size), and as many evaluation scenes as the small data set has (the same
    seed: the same first scenes)."""
    _render(cfg, out, cfg.upsampler_images, size)


def _render(cfg: MainJobConfig, out: Path, num_train: int, size: int) -> None:
    """`num_train` training and `cfg.num_eval` evaluation scenes at `size` pixels, seeded with
    `cfg.seed` (`dalle-ar data shapes`)."""
    from dalle_ar.data import build as data

    opts = dict(num_train=num_train, num_eval=cfg.num_eval, seed=cfg.seed, size=size)
    data.build("shapes", out, data.options("shapes", out=out, **opts))


def evaluate(pipe: Any, cfg: MainJobConfig, shards: Path | None = None) -> dict[str, Any]:
    """Prompt fidelity on `cfg.fidelity_prompts` evaluation prompts (drawn by the shapes
    generator with the evaluation split's rules, not read from `shards`) in every mode the pipeline
    has (`dalle_ar.eval.quality.shapes_fidelity`): single draws without and with guidance, then
    reranked (best of `cfg.rerank.candidates`) by PMI, and by CLIP and by both when the pipeline
    holds one; with a prior, the prior mode at the guided scale, single and best of the
    candidates by CLIP, under "prior_mode" (summary keys "prior mode ..."); the masked mode
    likewise ("masked_mode", with `cfg.masked_sampling`); with an upsampler, the guided single
    draws again, upsampled."""
    from dalle_ar.eval.quality import mode_settings, shapes_fidelity

    settings = mode_settings(pipe, cfg.sampling_settings())
    return shapes_fidelity(pipe, cfg.fidelity_prompts, cfg.seed, settings=settings,
                           candidates=cfg.rerank.candidates,
                           composed=cfg.fidelity_composed, progress=True)  # fmt: skip


def summarize(report: dict[str, Any]) -> str:
    """The fidelity report's exact-match shares per setting (all, seen and held-out
    colour-shape pairs), as a Markdown table for the terminal and out_dir/evaluation.md."""
    n, held_out = report.get("num_prompts"), report.get("n_held_out")
    title = "prompt fidelity (shape checker, exact match)"
    if isinstance(n, int) and isinstance(held_out, int):
        title += f", {n} evaluation prompts: {n - held_out} seen, {held_out} held-out pairs"
    rows = [title, "", "| setting | all | seen | held-out |", "|---|---|---|---|"]
    for name, shares in report["summary"].items():
        cells = [shares.get(k) for k in ("exact", "exact_seen", "exact_held_out")]
        shown = " | ".join("" if c is None else f"{100 * c:.1f}%" for c in cells)
        rows.append(f"| {name} | {shown} |")
    return "\n".join(rows)


SHAPES = DataSet(
    name="shapes",
    configs=COMPONENT_CONFIGS,
    prompts=PROMPTS,
    build=build,
    evaluate=evaluate,
    summarize=summarize,
    build_large=build_large,
    made_from=("num_train", "num_eval", "seed"),
)
