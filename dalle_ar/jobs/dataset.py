"""What a data set brings to the main job: how to write its shards, which component configs train
on it, the grid's prompts and how to score the pipeline. The stages themselves
(`dalle_ar.jobs.stages`) know none of this."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

# stage -> its component YAML under configs/<data>/ (a data set without a stage leaves it out)
COMPONENT_CONFIGS = {stage: f"{stage}.yaml" for stage in (
    "tokenizer", "vq", "transformer", "clip", "prior", "masked", "upsampler")}  # fmt: skip


def no_check(cfg: Any) -> None:
    """A data set that takes every main-job config its validation passes."""


# The data-independent evaluation (`dalle_ar.eval.quality`), for a data set without a checker of
# its own (the emoji, pictures of your own): held-out bits per image token, CLIP score, CLIP
# R-precision, CLIP-feature Frechet distance and near-copies of training pictures.


def quality_evaluate(pipe: Any, cfg: Any, shards: Path) -> dict[str, Any]:
    """`dalle_ar.eval.quality.evaluate_quality` on the evaluation split in `shards` (the
    training split as its reference), `cfg.fidelity_prompts` evaluation captions, every mode the
    pipeline has, single draws and the best of `cfg.rerank.candidates`, with the job's sampling
    settings."""
    from dalle_ar.eval.quality import evaluate_quality

    return evaluate_quality(
        pipe,
        f"{shards}/eval-*.tar",
        train_shards=f"{shards}/train-*.tar",
        num_prompts=cfg.fidelity_prompts,
        candidates=cfg.rerank.candidates,
        seed=cfg.seed,
        progress=True,
        **cfg.sampling_settings(),
    )


def quality_check(cfg: Any) -> None:
    """What the quality evaluation needs, checked before any stage runs: the CLIP stage (every
    figure is measured with the job's CLIP) and at least 2 evaluation captions (R-precision
    needs a distractor). ConfigError naming the key."""
    from dalle_ar.config import require

    require(cfg.clip, "clip", f"must be true: the {cfg.data} evaluation measures with the job's "
            "CLIP")  # fmt: skip
    require(cfg.fidelity_prompts >= 2, "fidelity_prompts",
            f"must be >= 2 for the {cfg.data} evaluation, got {cfg.fidelity_prompts}")  # fmt: skip


def quality_summary(report: dict[str, Any]) -> str:
    """The quality report as its Markdown table (`dalle_ar.eval.quality.markdown_table`)."""
    from dalle_ar.eval.quality import markdown_table

    return markdown_table(report)


@dataclasses.dataclass(frozen=True)
class DataSet:
    name: str  # the main job's `data` value
    configs: dict[str, str]  # stage -> component YAML under the config folder
    prompts: list[str]  # the sample grid's default prompts
    # (main job config, out folder, the pictures' side in pixels as the job's VQ config reads
    # them) -> shards + info.json
    build: Callable[[Any, Path, int], None]
    # (pipeline, main job config, the folder of its shards) -> JSON report
    evaluate: Callable[[Any, Any, Path], dict[str, Any]]
    # the evaluation report as text for the terminal and out_dir/evaluation.md
    summarize: Callable[[dict[str, Any]], str]
    # (main job config, out folder, side in pixels) -> shards of the same kind of pictures at the
    # upsampler's large size (+ info.json); None: the data set has no cascade stage
    build_large: Callable[[Any, Path, int], None] | None = None
    # (main job config) -> None, or ConfigError for a setting the data set's stages cannot
    # finish with, before any stage runs
    check: Callable[[Any], None] = no_check
    config_folder: str = ""  # configs/<this>/ holds its component YAMLs; "" = configs/<name>/
    # the main-job settings `build` reads (a changed one writes the shards again, and every stage
    # after them runs again); each must be one of plan.MADE_FROM["data"]
    made_from: tuple[str, ...] = ()
    # (the folder of its shards) -> the grid's prompts, for a data set without fixed ones
    read_prompts: Callable[[Path], list[str]] | None = None

    def grid_prompts(self, shards: Path) -> list[str]:
        """The sample grid's default prompts: the fixed ones, or those read from the shards."""
        return self.read_prompts(shards) if self.read_prompts else self.prompts
