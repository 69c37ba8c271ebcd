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


@dataclasses.dataclass(frozen=True)
class DataSet:
    name: str  # the main job's `data` value
    configs: dict[str, str]  # stage -> component YAML under the config folder
    prompts: list[str]  # the sample grid's default prompts
    build: Callable[[Any, Path], None]  # (main job config, out folder) -> shards + info.json
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
