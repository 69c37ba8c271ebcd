"""The emoji data set, as the main job uses it: Twemoji art with Unicode CLDR names as captions
(`dalle_ar.data.emoji`), every variant of a base emoji (its skin tones) on one side of the
split, so the evaluation names are emoji the models never saw. Scored by the data-independent
evaluation (`dalle_ar.eval.quality`): held-out bits per image token, CLIP score, CLIP
R-precision, CLIP-feature Fréchet distance and near-copies of training pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import DataSet

# The grid's prompts: six held-out names (no variant of these emoji is in training; the
# training set has "old man", "crying cat", "eight o'clock", "man astronaut", "heart suit"-like
# card suits and other vegetables) and two free wordings of training emoji ("red apple",
# "cat face").
PROMPTS = [
    "old woman",
    "weary cat",
    "seven o’clock",
    "woman astronaut",
    "carrot",
    "flag: Switzerland",
    "a red apple",
    "a green cat face",
]
SIZE = 64  # pixels a side: the Twemoji art (72 px) downscaled, as the VQ and CLIP read it


def build(cfg: MainJobConfig, out: Path) -> None:
    """Training and evaluation shards with info.json (`dalle-ar data emoji --size 64`). The set
    is fixed (3,553 training and 400 evaluation pictures): `num_train` and `num_eval` do not
    apply."""
    from dalle_ar.data import build as data

    data.build("emoji", out, data.options("emoji", out=out, size=SIZE, seed=cfg.seed))


def evaluate(pipe: Any, cfg: MainJobConfig, shards: Path) -> dict[str, Any]:
    """`dalle_ar.eval.quality.evaluate_quality` on the evaluation split in `shards` (the
    training split as its reference), `cfg.fidelity_prompts` evaluation captions, every mode the
    pipeline has, single draws and the best of `cfg.rerank.candidates`, with the pipeline
    folder's sampling settings (the job's own: `stage_pipeline` writes them)."""
    from dalle_ar.eval.quality import evaluate_quality

    return evaluate_quality(
        pipe,
        f"{shards}/eval-*.tar",
        train_shards=f"{shards}/train-*.tar",
        num_prompts=cfg.fidelity_prompts,
        candidates=cfg.rerank.candidates,
        seed=cfg.seed,
        progress=True,
    )


def summarize(report: dict[str, Any]) -> str:
    """The quality report as its Markdown table (`dalle_ar.eval.quality.markdown_table`)."""
    from dalle_ar.eval.quality import markdown_table

    return markdown_table(report)


EMOJI = DataSet(
    name="emoji",
    configs={
        "tokenizer": "tokenizer.yaml",
        "vq": "vq.yaml",
        "transformer": "transformer.yaml",
        "clip": "clip.yaml",
        "prior": "prior.yaml",
        "masked": "masked.yaml",
    },
    prompts=PROMPTS,
    build=build,
    evaluate=evaluate,
    summarize=summarize,
)
