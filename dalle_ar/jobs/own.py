"""Pictures of your own, as the main job uses them (`data=shards` or `data=folder`, with
`data_src`): shards in img2dataset layout (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`) or a
folder of pictures with same-stem .txt captions, written again with their shorter side cut to
the VQ config's image size where longer (64 in configs/emoji/) and split by a hash of each
record's name, `eval_fraction` of them to the evaluation (`dalle-ar data shards|folder`; the
split does not follow the job's seed, so runs with other seeds are scored on the same
pictures). Trained with the component configs of the emoji (`configs/emoji/`: 64-px pictures,
short captions; `config_dir` for others), scored by the data-independent evaluation
(`dalle_ar.jobs.dataset.quality_evaluate`), the grid drawn from evaluation captions.
The source is compared as written, not by its contents: shards added under the same `data_src`
are read once the data stage runs again (remove the job's `data/` to write them anew).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from dalle_ar.config import ConfigError, require
from dalle_ar.data.build import MIN_EVAL
from dalle_ar.jobs.config import STAGE_SETTINGS, MainJobConfig
from dalle_ar.jobs.dataset import (
    COMPONENT_CONFIGS,
    DataSet,
    quality_check,
    quality_evaluate,
    quality_summary,
)

GRID_PROMPTS = 8  # evaluation captions the sample grid draws
SPLIT_SEED = 0  # the split's hash seed: the same evaluation pictures for every job seed


def _build(kind: str):
    def build(cfg: MainJobConfig, out: Path, size: int) -> None:
        """`dalle-ar data KIND data_src --out out --size SIZE --eval-fraction F --seed 0`;
        ConfigError naming `data_src` for a source the build cannot read, or `eval_fraction`
        for an evaluation split under `MIN_EVAL` records (the shards' info.json removed, so
        that a rerun builds them again)."""
        from dalle_ar.data import build as data

        args = data.options(kind, src=_source(cfg), out=out, size=size, seed=SPLIT_SEED,
                            eval_fraction=cfg.eval_fraction)  # fmt: skip
        with _naming_data_src():
            info = data.build(kind, out, args)
        if info["counts"]["eval"] < MIN_EVAL:
            (out / "info.json").unlink()
            total = sum(info["counts"].values())
            raise ConfigError(f"config key 'eval_fraction': {cfg.eval_fraction} of {cfg.data_src} "
                              f"gave {info['counts']['eval']} evaluation records (of {total}); "
                              f"the evaluation needs >= {MIN_EVAL}: try eval_fraction="
                              f"{min(0.5, round(2 * MIN_EVAL / max(total, 1), 2))}")  # fmt: skip

    return build


def check(cfg: MainJobConfig) -> None:
    """ConfigError naming the key, before any stage runs: a source given that is there (shards
    that exist, or a folder), and what the quality evaluation needs (`quality_check`). The
    source is not looked at again where the job folder's shards were written from it as asked now
    (the same kind, source and eval_fraction: the data stage will not run again): it may have
    moved since, and the job no longer reads it."""
    require(bool(cfg.data_src), "data_src", f"must name your pictures for data={cfg.data}: "
            "shards in img2dataset layout (data=shards) or a folder of pictures with .txt "
            "captions (data=folder)")  # fmt: skip
    if not _built_as_asked(cfg):
        from dalle_ar.data.build import check_source

        with _naming_data_src():
            check_source(cfg.data, _source(cfg))
    quality_check(cfg)


def _source(cfg: MainJobConfig) -> Path | str:
    """`data_src` as `dalle-ar data KIND` takes it (a Path for a folder); as a str, as the
    shards' info.json records it."""
    return Path(cfg.data_src) if cfg.data == "folder" else cfg.data_src


@contextlib.contextmanager
def _naming_data_src() -> Iterator[None]:
    """A ValueError from reading the source raised as the ConfigError naming `data_src`, or
    `eval_fraction` where the split left nothing to train on (`SplitError`)."""
    from dalle_ar.data.build import SplitError

    try:
        yield
    except ValueError as e:
        key = "eval_fraction" if isinstance(e, SplitError) else "data_src"
        raise ConfigError(f"config key '{key}': {e}") from e


def _built_as_asked(cfg: MainJobConfig) -> bool:
    """Whether the job folder holds shards (their info.json) that its data stage wrote with the
    data, data_src (as written) and eval_fraction asked now (`STAGE_SETTINGS`, what the job
    compares to run the stage again)."""
    out = Path(cfg.out_dir)
    try:
        ran_with = json.loads((out / STAGE_SETTINGS).read_text())["data"]
        built = (out / "data" / "info.json").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    asked = {"data": cfg.data, "data_src": cfg.data_src, "eval_fraction": cfg.eval_fraction}
    return built and isinstance(ran_with, dict) and all(ran_with.get(k) == v
                                                        for k, v in asked.items())  # fmt: skip


def grid_captions(shards: Path) -> list[str]:
    """`GRID_PROMPTS` captions of the evaluation split in `shards`, spread evenly over it (the
    shards keep their source's order, which often groups alike pictures)."""
    from dalle_ar.data.shards import iter_captions

    captions = list(iter_captions(f"{shards}/eval-*.tar"))
    n = min(GRID_PROMPTS, len(captions))
    return [captions[i * len(captions) // n] for i in range(n)]


def _data_set(kind: str) -> DataSet:
    return DataSet(name=kind, configs=COMPONENT_CONFIGS, prompts=[], build=_build(kind),
                   evaluate=quality_evaluate, summarize=quality_summary, check=check,
                   config_folder="emoji", made_from=("data_src", "eval_fraction"),
                   read_prompts=grid_captions)  # fmt: skip
    # build_large None: no cascade (pictures of your own come in no larger version)


SHARDS, FOLDER = _data_set("shards"), _data_set("folder")
