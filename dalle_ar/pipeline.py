"""The names this module had before pipelines were split by mode; they live on in
`dalle_ar.pipelines` (folders, modes), `dalle_ar.prompts` (the composed-prompt grammar),
`dalle_ar.eval.fidelity` and `dalle_ar.grid`. Import from there in new code."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dalle_ar.eval.fidelity import evaluate_fidelity
from dalle_ar.grid import save_prompt_grid
from dalle_ar.pipelines import ARPipeline, DalleAR, PipelineOutput, assemble, check_compatible
from dalle_ar.pipelines.folder import FORMAT, PIPELINE_FILE, read_folder
from dalle_ar.prompts import PART_SEPARATOR, WEIGHT_MARK, split_prompt
from dalle_ar.sampling.settings import ARSampling, names

SAMPLING_KEYS = names(ARSampling)
BUILTIN_DEFAULTS = dataclasses.asdict(ARSampling())
REQUIRED = ARPipeline.required
OPTIONAL = ("clip", "prior")  # names a version-1 folder could hold (never loaded)


def read_pipeline_json(folder: str | Path) -> dict[str, Any]:
    """`folder/pipeline.json` as written, after the folder checks of `read_folder`."""
    read_folder(folder)
    return json.loads((Path(folder) / PIPELINE_FILE).read_text())


__all__ = [
    "ARPipeline",
    "BUILTIN_DEFAULTS",
    "FORMAT",
    "OPTIONAL",
    "PART_SEPARATOR",
    "PIPELINE_FILE",
    "REQUIRED",
    "SAMPLING_KEYS",
    "WEIGHT_MARK",
    "DalleAR",
    "PipelineOutput",
    "assemble",
    "check_compatible",
    "evaluate_fidelity",
    "read_pipeline_json",
    "save_prompt_grid",
    "split_prompt",
]
