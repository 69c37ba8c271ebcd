"""The emoji data set, as the main job uses it: Twemoji art with Unicode CLDR names as captions
(`dalle_ar.data.emoji`), every variant of a base emoji (its skin tones) on one side of the
split, so the evaluation names are emoji the models never saw. Scored by the data-independent
evaluation (`dalle_ar.eval.quality`): held-out bits per image token, CLIP score, CLIP
R-precision, CLIP-feature Fréchet distance and near-copies of training pictures.
"""

from __future__ import annotations

from pathlib import Path

from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import (
    COMPONENT_CONFIGS,
    DataSet,
    quality_check,
    quality_evaluate,
    quality_summary,
)

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


def build(cfg: MainJobConfig, out: Path, size: int) -> None:
    """Training and evaluation shards with info.json, the Twemoji art (72 px) downscaled to
    `size` (64 in configs/emoji/; `dalle-ar data emoji --size 64`). The set is fixed (3,553
    training and 400 evaluation pictures): `num_train`, `num_eval` and the seed do not apply."""
    from dalle_ar.data import build as data

    data.build("emoji", out, data.options("emoji", out=out, size=size))


EMOJI = DataSet(
    name="emoji",
    configs=COMPONENT_CONFIGS,
    prompts=PROMPTS,
    build=build,
    evaluate=quality_evaluate,
    summarize=quality_summary,
    check=quality_check,
    # build_large None, no cascade: the art is 72 px, no larger pictures to train an upsampler on
)
