"""Pipelines: trained components joined for inference, one class per generation mode.

    from dalle_ar.pipelines import Pipeline
    pipe = Pipeline.from_pretrained("runs/main/pipeline")   # the class pipeline.json names
    out = pipe(["a small red circle at the top left"], num_samples=4, seed=0)

Modes: `ARPipeline` (text -> codes one by one, DALL-E; also known as `DalleAR`). The folder
format is `dalle_ar.pipelines.folder`.
"""

from dalle_ar.pipelines.ar import ARPipeline, DalleAR
from dalle_ar.pipelines.assembly import assemble
from dalle_ar.pipelines.base import Pipeline, PipelineOutput
from dalle_ar.pipelines.compat import check_compatible
from dalle_ar.pipelines.folder import FolderSpec, read_folder

__all__ = [
    "ARPipeline",
    "DalleAR",
    "FolderSpec",
    "Pipeline",
    "PipelineOutput",
    "assemble",
    "check_compatible",
    "read_folder",
]
