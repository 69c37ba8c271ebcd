"""Pictures of your own, as the main job uses them (`data=shards` or `data=folder`, with
`data_src`): shards in img2dataset layout (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`) or a
folder of pictures with same-stem .txt captions, written again at 64 px (the shorter side) and
split by a hash of each record's name (`eval_fraction` to the evaluation; `dalle-ar data
shards|folder`). Trained with the component configs of the emoji (`configs/emoji/`: 64-px
pictures, short captions; `config_dir` for others), scored by the data-independent evaluation
(`dalle_ar.jobs.dataset.quality_evaluate`), the grid drawn from the first evaluation captions.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from dalle_ar.config import require
from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import (
    COMPONENT_CONFIGS,
    DataSet,
    quality_check,
    quality_evaluate,
    quality_summary,
)

SIZE = 64  # pixels a side (the shorter one) the pictures are written at, as configs/emoji/ read
GRID_PROMPTS = 8  # evaluation captions the sample grid draws


def _build(kind: str):
    def build(cfg: MainJobConfig, out: Path) -> None:
        """`dalle-ar data KIND data_src --out out --size 64 --eval-fraction F --seed S`."""
        from dalle_ar.data import build as data

        src = Path(cfg.data_src) if kind == "folder" else cfg.data_src
        args = data.options(kind, src=src, out=out, size=SIZE,
                            eval_fraction=cfg.eval_fraction, seed=cfg.seed)  # fmt: skip
        data.build(kind, out, args)

    return build


def check(cfg: MainJobConfig) -> None:
    """ConfigError naming the key, before any stage runs: a source given (and, for a folder, one
    that is there), and what the quality evaluation needs (`quality_check`)."""
    require(bool(cfg.data_src), "data_src", f"must name your pictures for data={cfg.data}: "
            "shards in img2dataset layout (data=shards) or a folder of pictures with .txt "
            "captions (data=folder)")  # fmt: skip
    if cfg.data == "folder":
        require(Path(cfg.data_src).is_dir(), "data_src", f"{cfg.data_src} is not a folder")
    quality_check(cfg)


def first_captions(shards: Path) -> list[str]:
    """The first `GRID_PROMPTS` captions of the evaluation split in `shards`."""
    from dalle_ar.data.shards import iter_captions

    return list(islice(iter_captions(f"{shards}/eval-*.tar"), GRID_PROMPTS))


def _data_set(kind: str) -> DataSet:
    return DataSet(name=kind, configs=COMPONENT_CONFIGS, prompts=[], build=_build(kind),
                   evaluate=quality_evaluate, summarize=quality_summary, check=check,
                   config_folder="emoji", read_prompts=first_captions)  # fmt: skip
    # build_large None: no cascade (pictures of your own come in no larger version)


SHARDS, FOLDER = _data_set("shards"), _data_set("folder")
