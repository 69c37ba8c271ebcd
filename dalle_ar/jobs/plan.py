"""The main job's plan: its stages in order, what each needs, what each is made from
(`MADE_FROM`) and what it ran with before (`stage_settings.json`), so that a rerun runs again
only what changed. Running the plan: `dalle_ar.jobs.run`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from yaml import YAMLError, safe_load

from dalle_ar.config import ConfigError, to_dict
from dalle_ar.jobs.config import STAGE_SETTINGS, MainJobConfig
from dalle_ar.jobs.dataset import DataSet
from dalle_ar.jobs.emoji import EMOJI
from dalle_ar.jobs.own import FOLDER, SHARDS
from dalle_ar.jobs.shapes import SHAPES
from dalle_ar.jobs.stages import (
    Paths,
    assembled,
    check_count_foils,
    clip_round_trips,
    complete,
    large_size,
    masked_adapts,
    stage_clip,
    stage_pipeline,
    stage_prior,
    stage_samples,
    stage_tokenizer,
    stage_tokens,
    stage_transformer,
    stage_upsampler,
    stage_vq,
    tokens_done,
    trained,
    vq_size,
)

DATA_SETS: dict[str, DataSet] = {d.name: d for d in (SHAPES, EMOJI, SHARDS, FOLDER)}


# The main-job settings each stage's output is made from (beside the stages it needs, which
# run it again when they run). Not here, as they change how a stage runs and not what it makes:
# out_dir, config_dir (the component YAMLs' contents are not compared), the *_max_minutes caps,
# precision, device, lanes, wandb. `count_foils` (derived: a CLIP beside the masked mode).
MADE_FROM: dict[str, tuple[str, ...]] = {
    # the data stage: `data`, and of these the ones its data set's build reads (DataSet.made_from)
    "data": ("data", "data_src", "eval_fraction", "num_train", "num_eval", "seed"),
    "vq": ("vq_steps",),
    "transformer": ("transformer_steps",),
    "clip": ("clip_steps", "count_foils"),
    "prior": ("prior_train_steps",),
    "cond_transformer": ("embed_tokens", "cond_transformer_steps", "cond_transformer_lr",
                         "cond_transformer_embed_drop"),
    "masked": ("masked_steps",),
    "data_large": ("upsampler_images", "seed"),
    "upsampler": ("upsampler_steps",),
    "pipeline": ("clip", "prior", "masked", "upsampler", "sampling", "rerank", "prior_sampling",
                 "masked_sampling", "upsample_sampling"),
    "samples": ("prompts", "samples_per_prompt", "fidelity_prompts", "fidelity_composed"),
}  # fmt: skip
# A budget of 0 steps is its component config's run.steps: compared as that number
BUDGET_OF = {"vq_steps": "vq", "transformer_steps": "transformer", "clip_steps": "clip",
             "prior_train_steps": "prior", "masked_steps": "masked",
             "upsampler_steps": "upsampler"}  # fmt: skip


class Stage(NamedTuple):
    """One stage of the job: the stages it needs (by name), whether its output is complete, what
    runs it, what it writes (removed when a stage it needs runs again) and the values of the
    settings it is made from (`MADE_FROM`)."""

    name: str
    needs: set[str]
    done: Callable[[], bool]
    run: Callable[[], None]
    outputs: list[Path]
    after: frozenset[str] = frozenset()  # stages it reads but is not made again for
    made_from: dict[str, Any] | None = None  # set by `plan`

    def waits_for(self) -> set[str]:
        return self.needs | self.after


class Plan(NamedTuple):
    paths: Paths
    data: DataSet
    yaml: dict[str, Path]  # stage -> its component config
    cascade: bool
    stages: list[Stage]
    config_steps: dict[str, int]  # a budget key of BUDGET_OF -> its component config's run.steps


def plan(cfg: MainJobConfig) -> Plan:
    """The job's stages, numbered in this order and, where several could start, started in it:
    the chain to the transformer first (the longest stage), then what needs none of it, to run
    beside it. ConfigError for component configs that are missing or do not fit, before any
    work. Built again in each process that runs a stage (`dalle_ar.jobs.run`)."""
    p = Paths(Path(cfg.out_dir))
    data = DATA_SETS[cfg.data]
    data.check(cfg)
    configs = (
        Path(cfg.config_dir)
        if cfg.config_dir
        else _repo_configs() / (data.config_folder or data.name)
    )
    yaml = {stage: configs / name for stage, name in data.configs.items()}
    if not cfg.clip:
        yaml.pop("clip", None)
    if not cfg.prior:
        yaml.pop("prior", None)
    if not cfg.masked:
        yaml.pop("masked", None)
    cascade = cfg.upsampler and data.build_large is not None  # the one place that decides
    if not cascade:
        yaml.pop("upsampler", None)
    missing = [str(f) for f in yaml.values() if not f.is_file()]
    if missing:
        raise ConfigError(f"config key 'config_dir': no component configs {missing}")
    large = large_size(yaml) if cascade else 0  # checked before any work
    size = vq_size(yaml["vq"])  # the pictures' side, as the VQ reads them
    if cfg.count_foils:
        check_count_foils(yaml["clip"])
    # Once a stage runs, every stage that needs it was made
    # from what it replaced, so its outputs are removed and made again (an under-trained VQ
    # resumed by a rerun gets new token shards in both folders, a transformer, a masked generator
    # and an embedding-conditioned transformer trained on them, and a new CLIP when that one
    # learns from the VQ's round trips; a CLIP resumed
    # by a rerun leaves the VQ and the transformer alone, and gets new token shards with its
    # embeddings, a new prior and a new embedding-conditioned transformer)
    cond_stage = Stage("cond_transformer", {"tokenizer", "vq", "clip_tokens", "transformer"},
                  lambda: trained(p.cond_run, p.cond_transformer),
                  lambda: stage_transformer(cfg, p, yaml["transformer"], "cond"),
                  [p.cond_run])  # fmt: skip
    clip_needs = {"data", "tokenizer", *(["vq"] if cfg.clip and clip_round_trips(yaml["clip"])
                                          else [])}  # fmt: skip
    clip_stage = Stage("clip", clip_needs, lambda: trained(p.clip_run, p.clip),
                  lambda: stage_clip(cfg, p, yaml["clip"]), [p.clip_run])  # fmt: skip
    clip_tokens_stage = Stage("clip_tokens", {"data", "vq", "clip"},
                         lambda: tokens_done(p.clip_tokens, p.clip),
                         lambda: stage_tokens(cfg, p, with_clip=True), [p.clip_tokens])  # fmt: skip
    # the prior reads the CLIP embeddings of the token shards, not their codes: a new VQ leaves
    # it alone
    prior_stage = Stage("prior", {"data", "clip"}, lambda: trained(p.prior_run, p.prior),
                   lambda: stage_prior(cfg, p, yaml["prior"]), [p.prior_run],
                   after=frozenset({"clip_tokens"}))  # fmt: skip
    adapts = cfg.masked and masked_adapts(yaml["masked"])  # started from the transformer
    masked_needs = {"tokenizer", "vq", "tokens", *(["transformer"] if adapts else [])}
    masked_stage = Stage("masked", masked_needs,
                    lambda: trained(p.masked_run, p.masked),
                    lambda: stage_transformer(cfg, p, yaml["masked"], "masked", adapts),
                    [p.masked_run])  # fmt: skip
    cascade_stages = [
        Stage("data_large", set(), lambda: (p.data_large / "info.json").is_file(),
         lambda: data.build_large(cfg, p.data_large, large), [p.data_large]),
        Stage("upsampler", {"data_large"}, lambda: trained(p.upsampler_run, p.upsampler),
         lambda: stage_upsampler(cfg, p, yaml["upsampler"]), [p.upsampler_run]),
    ]  # fmt: skip
    stages = [
        Stage("data", set(), lambda: (p.data / "info.json").is_file(),
         lambda: data.build(cfg, p.data, size), [p.data]),
        Stage("tokenizer", {"data"}, lambda: complete(p.tokenizer),
         lambda: stage_tokenizer(cfg, p, yaml["tokenizer"]), [p.tokenizer_run]),
        Stage("vq", {"data"}, lambda: trained(p.vq_run, p.vq),
         lambda: stage_vq(cfg, p, yaml["vq"]), [p.vq_run]),
        Stage("tokens", {"data", "vq"}, lambda: tokens_done(p.tokens),
         lambda: stage_tokens(cfg, p), [p.tokens]),
        Stage("transformer", {"tokenizer", "vq", "tokens"},
         lambda: trained(p.transformer_run, p.transformer),
         lambda: stage_transformer(cfg, p, yaml["transformer"], "transformer"),
         [p.transformer_run]),
        *([clip_stage] if cfg.clip else []),  # beside the transformer
        *([clip_tokens_stage, prior_stage] if cfg.prior else []),
        *([masked_stage] if cfg.masked else []),  # the longer of the two after the transformer
        *([cond_stage] if cfg.prior else []),
        *(cascade_stages if cascade else []),
        Stage("pipeline", {"tokenizer", "vq", "transformer", "clip", "prior", "cond_transformer",
                      "masked", "upsampler"},
         lambda: assembled(p), lambda: stage_pipeline(cfg, p, cascade),
         [p.pipeline]),
        Stage("samples", {"pipeline"}, lambda: p.fidelity.is_file(),
         lambda: stage_samples(cfg, p, data), [p.samples, p.fidelity, p.evaluation]),
    ]  # fmt: skip
    config_steps = _config_steps(yaml)
    values = _budgets({**to_dict(cfg), "count_foils": cfg.count_foils}, config_steps)
    keys = {**MADE_FROM, "data": ("data", *data.made_from)}
    stages = [s._replace(made_from={k: values[k] for k in keys.get(s.name, ())})
              for s in stages]  # fmt: skip
    names, before = {s.name for s in stages}, set()
    for s in stages:  # the one order both runners keep: each stage after what it waits for
        if not s.waits_for() & names <= before:
            raise RuntimeError(f"the {s.name} stage is planned before "
                               f"{sorted(s.waits_for() & names - before)}")  # fmt: skip
        before.add(s.name)
    return Plan(p, data, yaml, cascade, stages, config_steps)


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


def _config_steps(yaml: dict[str, Path]) -> dict[str, int]:
    """Each budget key of `BUDGET_OF` whose stage the job has -> the run.steps its component
    config sets (read once, by `plan`); a config that sets none is left out."""
    steps = {}
    for key, stage in BUDGET_OF.items():
        if stage in yaml:
            run = read_mapping(yaml[stage], safe_load).get("run")
            if isinstance(run, dict) and "steps" in run:
                steps[key] = run["steps"]
    return steps


def _budgets(values: dict, config_steps: dict[str, int]) -> dict:
    """`values` with each budget of 0 steps read as its component config's run.steps
    (`config_steps`), where the config says: the same budget either way compares equal."""
    return {k: config_steps.get(k, 0) if k in BUDGET_OF and v == 0 else v
            for k, v in values.items()}  # fmt: skip


def changed_settings(stage: Stage, before: dict | None) -> list[str]:
    """The settings `stage` is made from whose values differ from `before` (what it ran with),
    as "key: old -> new", a settings section by its keys ("sampling.temperature: 0.5 -> 0.9");
    [] where nothing is known of its run."""
    if not isinstance(before, dict):
        return []
    out = []
    for k, v in (stage.made_from or {}).items():
        old = before.get(k)
        if k not in before or old == v:
            continue
        if isinstance(v, dict) and isinstance(old, dict):
            out += [f"{k}.{s}: {json.dumps(old.get(s))} -> {json.dumps(v.get(s))}"
                    for s in sorted(v.keys() | old.keys()) if old.get(s) != v.get(s)]  # fmt: skip
        else:
            out.append(f"{k}: {json.dumps(old)} -> {json.dumps(v)}")
    return out


def settings_ran_with(p: Paths, previous: dict, config_steps: dict[str, int]) -> dict[str, dict]:
    """What each stage of the folder ran with: `stage_settings.json`, and for a stage it does not
    hold (a folder from before it was written), the job config the folder held before this run
    (`previous`, its main_job.yaml) read through MADE_FROM and `_budgets`."""
    recorded = read_mapping(p.out / STAGE_SETTINGS, json.loads)
    previous = _budgets(previous, config_steps)
    return {name: recorded.get(name, {k: previous[k] for k in keys if k in previous})
            for name, keys in MADE_FROM.items()}  # fmt: skip


def read_mapping(path: Path, parse: Callable[[str], Any]) -> dict:
    """The mapping a file of the job folder holds, parsed by `parse` (json.loads, safe_load),
    or {}: no such file yet, one that does not parse, or not a mapping (nothing to carry over)."""
    try:
        found = parse(path.read_text())
    except (OSError, ValueError, YAMLError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}
