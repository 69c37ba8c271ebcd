"""The emoji data set, as the main job uses it: Twemoji art with Unicode CLDR names as captions
(`dalle_ar.data.emoji`), every variant of a base emoji (its skin tones) on one side of the
split, so the evaluation names are emoji the models never saw. Scored by the data-independent
evaluation (`dalle_ar.eval.quality`): held-out bits per image token, CLIP score, CLIP
R-precision, CLIP-feature Fréchet distance and near-copies of training pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_ar.config import require
from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import COMPONENT_CONFIGS, DataSet

# The grid's prompts: six held-out names (no variant of these emoji is in training; the
# training set has "old man", "crying cat", "six o'clock", "man astronaut", other flags and
# other vegetables) and two free wordings of training emoji ("red apple", "cat face").
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


def check(cfg: MainJobConfig) -> None:
    """What the emoji evaluation needs, checked before any stage runs: the CLIP stage (every
    figure is measured with the job's CLIP) and at least 2 evaluation captions (R-precision
    needs a distractor). ConfigError naming the key."""
    require(cfg.clip, "clip", "must be true: the emoji evaluation measures with the job's CLIP")
    require(cfg.fidelity_prompts >= 2, "fidelity_prompts",
            f"must be >= 2 for the emoji evaluation, got {cfg.fidelity_prompts}")  # fmt: skip


def summarize(report: dict[str, Any]) -> str:
    """The quality report as its Markdown table (`dalle_ar.eval.quality.markdown_table`)."""
    from dalle_ar.eval.quality import markdown_table

    return markdown_table(report)


EMOJI = DataSet(
    name="emoji",
    configs=COMPONENT_CONFIGS,
    prompts=PROMPTS,
    build=build,
    evaluate=evaluate,
    summarize=summarize,
    check=check,
    # build_large None, no cascade: the art is 72 px, no larger pictures to train an upsampler on
)
