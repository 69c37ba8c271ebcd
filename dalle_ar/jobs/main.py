"""`dalle-ar pipeline [--config FILE] [key=value ...]`: the main job, text to image end to end.

    shards -> BPE tokenizer -> VQ-VAE -> token shards -> transformer
           -> CLIP (with `vq_round_trip`, some scenes as the VQ gives them back), beside the
              transformer -> token shards with the CLIP's image embeddings
           -> diffusion prior, and the transformer fine-tuned to read the CLIP image embedding
              too (DALL-E 2's decoder), which then draws both modes
           -> upsampler (on the scenes at twice the size) -> pipeline folder
           -> samples for a handful of prompts (some held-out combinations), each the best of
              `rerank.candidates` by `rerank.reranker` (CLIP) -> captioned grids with the scores,
              in text mode and in prior mode, and upsampled beside the small ones
           -> the data set's evaluation: single draws, and best of the candidates by the
              transformer's own score (PMI), by CLIP and by both (terminal + JSON); the prior
              mode's single draws and best of the candidates by CLIP beside them; the guided
              single draws upsampled

Each stage writes into `out_dir` and is skipped on a rerun once its output is complete and the
job settings it is made from (`MADE_FROM`) are those it ran with (`stage_settings.json`); a
changed setting runs it again, and every stage that needs it. A training stage that was killed
resumes from its last checkpoint. On a CPU, stages that need nothing of each
other run side by side (`lanes`, `_side_by_side`), each in a process of its own. Training stages
are sized in steps (the component configs' run.steps, or `vq_steps` / `transformer_steps`); their
minutes are safety caps:
a stage a cap stops is reported under-trained and continues to its planned steps on the next run.
Each stage calls the same functions as its own command (`dalle-ar data ...`, `dalle-ar train ...`,
`dalle-ar tokens`), with the component configs of the data set (`data`, `dalle_ar.jobs.shapes`)
under configs/<data>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

from yaml import YAMLError, safe_load

from dalle_ar.checkpoint import file_sha256, write_json_atomic
from dalle_ar.config import ConfigError, load_config, save_config, settings_help, to_dict
from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import DataSet
from dalle_ar.jobs.emoji import EMOJI
from dalle_ar.jobs.shapes import SHAPES
from dalle_ar.runtime import describe_machine
from dalle_ar.train.common import NonFiniteLoss

log = logging.getLogger(__name__)

DATA_SETS: dict[str, DataSet] = {d.name: d for d in (SHAPES, EMOJI)}


# The keys the main job took before its sampling settings were grouped: `guidance_scale=2` still
# means `sampling.guidance_scale=2`.
LEGACY_KEYS = {
    "guidance_scale": "sampling.guidance_scale",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k",
    "part_scale": "sampling.part_scale",
    "candidates": "rerank.candidates",
    "vq_minutes": "vq_max_minutes",  # budgets became step counts; the minutes are caps now
    "transformer_minutes": "transformer_max_minutes",
}


class Paths:
    """Where each stage writes, below `out_dir`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data = out / "data"
        self.tokenizer_run = out / "tokenizer_run"
        self.tokenizer = self.tokenizer_run / "tokenizer"
        self.vq_run = out / "vq_run"
        self.vq = self.vq_run / "vq"
        self.tokens = out / "tokens"
        self.clip_tokens = out / "clip_tokens"  # the same, with the CLIP's image embeddings
        self.transformer_run = out / "transformer_run"
        self.transformer = self.transformer_run / "transformer"
        self.cond_run = out / "cond_transformer_run"
        self.cond_transformer = self.cond_run / "transformer"
        self.clip_run = out / "clip_run"
        self.clip = self.clip_run / "clip"
        self.prior_run = out / "prior_run"
        self.prior = self.prior_run / "prior"
        self.masked_run = out / "masked_run"
        self.masked = self.masked_run / "masked"
        self.data_large = out / "data_large"
        self.upsampler_run = out / "upsampler_run"
        self.upsampler = self.upsampler_run / "upsampler"
        self.pipeline = out / "pipeline"
        self.samples = out / "samples"
        self.fidelity = out / "fidelity.json"  # the data set's evaluation
        self.evaluation = out / "evaluation.md"  # the same, as the data set summarizes it


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


# ----------------------------------------------------------------------------------------------
# Stages: each calls the functions behind its command.


def stage_tokenizer(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.train import tokenizer

    overrides = [f"data.train={p.data}/train-*.tar", f"run.out_dir={p.tokenizer_run}",
                 f"run.wandb={cfg.wandb}"]  # fmt: skip
    tokenizer.train(load_config(tokenizer.TokenizerRecipeConfig, yaml, overrides))


def _budget(run_dir: Path, steps: int, max_minutes: float) -> list[str]:
    """A training stage's step budget and safety cap. The cap counts this job's minutes: a stage
    resumed by a rerun gets it again on top of the minutes its checkpoint has spent."""
    from dalle_ar.train.common import spent_minutes

    cap = spent_minutes(run_dir) + max_minutes if max_minutes else 0
    return [*([f"run.steps={steps}"] if steps else []), f"run.max_minutes={cap}"]


def _run(cfg: MainJobConfig, run_dir: Path, steps: int, max_minutes: float) -> list[str]:
    """A training stage's run overrides: its folder, budget and cap, and the job's seed, device,
    precision and wandb mode."""
    return [f"run.out_dir={run_dir}", *_budget(run_dir, steps, max_minutes),
            f"run.seed={cfg.seed}", f"run.device={cfg.device}",
            f"run.precision={cfg.precision}", f"run.wandb={cfg.wandb}"]  # fmt: skip


def stage_vq(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.train import vq
    from dalle_ar.train.common import has_checkpoint

    overrides = [
        f"data.train={p.data}/train-*.tar",
        f"data.eval={p.data}/eval-*.tar",
        *_run(cfg, p.vq_run, cfg.vq_steps, cfg.vq_max_minutes),
    ]
    vq.train(load_config(vq.VQRecipeConfig, yaml, overrides), resume=has_checkpoint(p.vq_run))


def stage_tokens(cfg: MainJobConfig, p: Paths, with_clip: bool = False) -> None:
    """The VQ codes of every scene (`tokens/`, for the transformers), or the same with the job's
    CLIP image embedding of each (`with_clip`: `clip_tokens/`, for the prior and the
    embedding-conditioned transformer): two stages, so that the transformer need not wait for
    the CLIP."""
    from dalle_ar.cli.tokens import tokenize_shards

    out, clip = (p.clip_tokens, p.clip) if with_clip else (p.tokens, None)
    for split in ("train", "eval"):  # the summary of the last split marks the stage complete
        tokenize_shards(p.vq, f"{p.data}/{split}-*.tar", out, split, device=cfg.device,
                        clip_dir=clip)  # fmt: skip


def stage_transformer(
    cfg: MainJobConfig,
    p: Paths,
    yaml: Path,
    kind: Literal["transformer", "masked", "cond"],
    adapt: bool = False,
) -> None:
    """The transformer, the masked generator (`kind` "masked": the same recipe and data; `adapt`:
    started from the job's transformer, `_masked_adapts`) or the transformer conditioned on the
    CLIP image embedding ("cond": the transformer fine-tuned on `clip_tokens/`' embeddings)."""
    from dalle_ar.text import TextTokenizer
    from dalle_ar.train import transformer
    from dalle_ar.train.common import has_checkpoint
    from dalle_ar.train.masked import TrainMaskedConfig
    from dalle_ar.vq import VQTokenizer

    tok = TextTokenizer.from_pretrained(p.tokenizer)
    vq = VQTokenizer.from_pretrained(p.vq)
    h, w = vq.grid_size(vq.config.image_size)
    shards = p.clip_tokens if kind == "cond" else p.tokens
    overrides = [
        f"data.train={shards}/train-*.tar",
        f"data.eval={shards}/eval-*.tar",
        f"text_tokenizer={p.tokenizer}",
        f"vq={p.vq}",
        f"model.text_vocab={tok.vocab_size}",
        f"model.image_vocab={vq.codebook_size}",
        f"model.grid_h={h}",
        f"model.grid_w={w}",
    ]
    if kind == "masked":
        overrides += _run(cfg, p.masked_run, cfg.masked_steps, cfg.masked_max_minutes)
        if adapt:
            overrides.append(f"init_from={p.transformer}")
        rcfg = load_config(TrainMaskedConfig, yaml, overrides)
        transformer.train(rcfg, resume=has_checkpoint(p.masked_run))
        return
    run_dir = p.cond_run if kind == "cond" else p.transformer_run
    if kind == "cond":  # conditioned on each record's CLIP image embedding (`clip_tokens/`)
        dim = _clip_of_tokens(p)["embed_dim"]
        overrides += [
            *_run(cfg, run_dir, cfg.cond_transformer_steps, cfg.cond_transformer_max_minutes),
            f"init_from={p.transformer}", f"model.cond_dim={dim}",
            f"model.cond_tokens={cfg.embed_tokens}", f"optim.lr={cfg.cond_transformer_lr}",
            f"embed_drop={cfg.cond_transformer_embed_drop}",
        ]  # fmt: skip
    else:
        overrides += _run(cfg, run_dir, cfg.transformer_steps, cfg.transformer_max_minutes)
    rcfg = load_config(transformer.TrainTransformerConfig, yaml, overrides)
    transformer.train(rcfg, resume=has_checkpoint(run_dir))


def stage_clip(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.train import clip
    from dalle_ar.train.common import has_checkpoint

    overrides = [
        f"data.train={p.data}/train-*.tar",
        f"data.eval={p.data}/eval-*.tar",
        f"text_tokenizer={p.tokenizer}",
        *_run(cfg, p.clip_run, cfg.clip_steps, cfg.clip_max_minutes),
        f"vq={p.vq}",  # the job's own, trained in the stage before; read only for round trips
        # count foils (shapes scenes) fix the masked mode's picks and not text mode's, at a fifth
        # more CLIP work (docs/results.md#reranked-batch-generation): on with the masked mode; a
        # config's own `count_foils: true` holds either way
        *(["count_foils=true"] if cfg.count_foils else []),
    ]
    rcfg = load_config(clip.CLIPRecipeConfig, yaml, overrides)
    clip.train(rcfg, resume=has_checkpoint(p.clip_run))


def _recipe(cls: type, yaml: Path) -> Any:
    """A stage's recipe config read from its YAML for what it says of the stage, before the job
    hands it its paths (placeholders here)."""
    return load_config(cls, yaml, ["data.train=shards.tar", "text_tokenizer=tokenizer", "vq=job"])


def _masked_adapts(yaml: Path) -> bool:
    """Whether the masked generator's config starts it from an autoregressive transformer
    (`init_from`): then the job starts it from its own, after the transformer stage."""
    from dalle_ar.train.masked import TrainMaskedConfig

    return bool(_recipe(TrainMaskedConfig, yaml).init_from)


def _clip_round_trips(yaml: Path) -> bool:
    """Whether the CLIP config trains on scenes through the VQ round trip (`vq_round_trip`):
    then the CLIP stage needs the VQ stage (the job hands it its own VQ)."""
    from dalle_ar.train.clip import CLIPRecipeConfig

    return _recipe(CLIPRecipeConfig, yaml).vq_round_trip > 0


def _clip_of_tokens(p: Paths) -> dict:
    """The CLIP identity the summary of the token shards with embeddings records; ValueError
    when they hold none (remove `clip_tokens/` to have them written again)."""
    f = p.clip_tokens / "train-tokens.json"
    clip = json.loads(f.read_text()).get("clip") if f.is_file() else None
    if not isinstance(clip, dict):
        raise ValueError(f"the token shards in {p.clip_tokens} hold no CLIP embeddings: remove "
                         "the folder so that the job writes them again with the CLIP")  # fmt: skip
    return clip


def _tokens_done(folder: Path, clip: Path | None = None) -> bool:
    """Token shards are done once both splits are written, and, for `clip`, with the embeddings
    of the weights that CLIP folder holds: the content hash of its model.safetensors against the
    one they record (`CLIP.file_sha256`), so that a job folder moved or copied elsewhere keeps
    its shards and what was trained on them; shards written before that hash was recorded
    compare the folder's path."""
    f = folder / "eval-tokens.json"
    if not f.is_file():
        return False
    if clip is None:
        return True
    written = json.loads(f.read_text()).get("clip")
    if not isinstance(written, dict):
        return False
    if written.get("file_sha256"):
        weights = clip / "model.safetensors"
        return weights.is_file() and written["file_sha256"] == file_sha256(weights)
    return written.get("folder") == str(clip.resolve())


def stage_prior(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.train import prior
    from dalle_ar.train.common import has_checkpoint

    overrides = [
        f"data.train={p.clip_tokens}/train-*.tar",
        f"data.eval={p.clip_tokens}/eval-*.tar",
        f"clip={p.clip}",
        f"model.embed_dim={_clip_of_tokens(p)['embed_dim']}",
        *_run(cfg, p.prior_run, cfg.prior_train_steps, cfg.prior_max_minutes),
    ]
    rcfg = load_config(prior.PriorRecipeConfig, yaml, overrides)
    prior.train(rcfg, resume=has_checkpoint(p.prior_run))


def stage_upsampler(cfg: MainJobConfig, p: Paths, yaml: Path) -> None:
    from dalle_ar.train import upsampler
    from dalle_ar.train.common import has_checkpoint

    overrides = [
        f"data.train={p.data_large}/train-*.tar",
        f"data.eval={p.data_large}/eval-*.tar",
        *_run(cfg, p.upsampler_run, cfg.upsampler_steps, cfg.upsampler_max_minutes),
    ]
    rcfg = load_config(upsampler.UpsamplerRecipeConfig, yaml, overrides)
    upsampler.train(rcfg, resume=has_checkpoint(p.upsampler_run))


def stage_pipeline(cfg: MainJobConfig, p: Paths, cascade: bool) -> None:
    from dalle_ar.pipelines import assemble

    # with the prior mode, its fine-tuned transformer serves text mode too (MainJobConfig.prior)
    assemble(p.pipeline, p.tokenizer, p.vq, p.cond_transformer if cfg.prior else p.transformer,
             defaults=cfg.pipeline_defaults(), clip=p.clip if cfg.clip else None,
             prior=p.prior if cfg.prior else None,
             masked=p.masked if cfg.masked else None,
             upsampler=p.upsampler if cascade else None)  # fmt: skip


def _assembled(p: Paths) -> bool:
    """The pipeline stage's done check: its folder is written, and not with the two transformers
    a prior-mode job assembled before one served both modes (such a folder is made again)."""
    return (p.pipeline / "pipeline.json").is_file() and not (
        p.pipeline / "cond_transformer"
    ).exists()


def stage_samples(cfg: MainJobConfig, p: Paths, data: DataSet) -> None:
    from dalle_ar.grid import save_prompt_grid
    from dalle_ar.pipelines import Pipeline
    from dalle_ar.runtime import pick_device

    pipe = Pipeline.from_pretrained(p.pipeline, device=pick_device(cfg.device))
    prompts = cfg.prompts or data.prompts
    up = "upsampler" in pipe.components  # the kept images upsampled too
    result = pipe(prompts, cfg.samples_per_prompt, cfg.seed, settings=cfg.sampling,
                  rerank=cfg.rerank, upsample=up,
                  upsample_settings=cfg.upsample_sampling if up else None,
                  progress=True)  # fmt: skip
    small = dataclasses.replace(result, images=result.small_images) if up else result
    grid = save_prompt_grid(small, p.samples / "grid.png")
    report = data.evaluate(pipe, cfg, p.data)

    def where(path: Path) -> str:  # in the job folder, which may be moved
        return str(path.relative_to(p.out))

    report["grid"] = where(grid)
    if up:
        report["grid_upsampled"] = where(save_prompt_grid(result, p.samples / "grid_upsampled.png"))
    if cfg.prior:  # the same prompts and seeds in prior mode
        result = pipe(prompts, cfg.samples_per_prompt, cfg.seed, mode="prior",
                      settings=cfg.sampling, prior_settings=cfg.prior_sampling,
                      rerank=cfg.rerank, progress=True)  # fmt: skip
        report["grid_prior"] = where(save_prompt_grid(result, p.samples / "grid_prior.png"))
    if cfg.masked:  # the same prompts and seeds in the masked mode
        result = pipe(prompts, cfg.samples_per_prompt, cfg.seed, mode="masked",
                      masked_settings=cfg.masked_sampling, rerank=cfg.rerank,
                      progress=True)  # fmt: skip
        report["grid_masked"] = where(save_prompt_grid(result, p.samples / "grid_masked.png"))
    p.fidelity.write_text(json.dumps(report, indent=2))
    p.evaluation.write_text(data.summarize(report) + "\n")


def _large_size(yaml: dict[str, Path]) -> int:
    """The upsampler's large size (its config's low_size * scale), after checking that its small
    size is the VQ's image size (what the generators draw): ConfigError naming both files."""
    from dalle_ar.train.upsampler import UpsamplerRecipeConfig
    from dalle_ar.train.vq import VQRecipeConfig

    shards = ["data.train=shards.tar"]  # the stages give theirs; only the sizes are read here
    up = load_config(UpsamplerRecipeConfig, yaml["upsampler"], shards).model
    vq = load_config(VQRecipeConfig, yaml["vq"], shards).model
    if up.low_size != vq.image_size:
        raise ConfigError(f"config key 'model.low_size': {yaml['upsampler']} upsamples "
                          f"{up.low_size}-px pictures, {yaml['vq']} draws {vq.image_size}-px "
                          "ones: expected equal")  # fmt: skip
    return up.high_size


def _check_count_foils(yaml: Path) -> None:
    """ConfigError naming the job's own key, before any work, for a CLIP config whose scenes are
    too small for the count foils the masked mode trains it with."""
    from dalle_ar.train.clip import FOIL_MIN_SIZE, CLIPRecipeConfig

    size = _recipe(CLIPRecipeConfig, yaml).data.image_size
    if size < FOIL_MIN_SIZE:
        raise ConfigError(f"config key 'masked': trains the CLIP with count foils, which render "
                          f"scenes of >= {FOIL_MIN_SIZE} pixels; {yaml} has data.image_size "
                          f"{size} (masked=false; clip=false with rerank.reranker=pmi; or a "
                          "CLIP config of larger scenes)")  # fmt: skip


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _trained(run_dir: Path, component: Path) -> bool:
    """A training stage is done once its component is written from its planned steps (not an
    under-trained one a safety cap stopped: that one resumes)."""
    return _complete(component) and _training(run_dir).get("finished", False)


def _training(run_dir: Path) -> dict:
    """What a training stage's metrics.json says of its budget (empty before it has one)."""
    f = run_dir / "metrics.json"
    if not f.is_file():
        return {}
    m = json.loads(f.read_text())
    keys = ("step", "planned_steps", "finished", "under_trained", "minutes")
    timing = m.get("timing", {})
    return {k: m[k] for k in keys if k in m} | {
        k: timing[k] for k in ("steps_per_s", "threads", "threads_used", "precision") if k in timing
    }


class StageStopped(NonFiniteLoss):
    """A training stage stopped by non-finite numbers (`NonFiniteLoss`), naming the stage, what
    it kept and its config; the job's later stages did not run."""


# The main-job settings each stage's output is made from (beside the stages it needs, which
# run it again when they run). Not here, as they change how a stage runs and not what it makes:
# out_dir, config_dir (the component YAMLs' contents are not compared), the *_max_minutes caps,
# precision, device, lanes, wandb. `count_foils` (derived: a CLIP beside the masked mode).
MADE_FROM: dict[str, tuple[str, ...]] = {
    "data": ("data", "num_train", "num_eval", "seed"),
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
STAGE_SETTINGS = "stage_settings.json"  # in out_dir: each finished stage's MADE_FROM values
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
    work. Built again in each process that runs a stage (`_stage_process`)."""
    p = Paths(Path(cfg.out_dir))
    data = DATA_SETS[cfg.data]
    data.check(cfg)
    configs = Path(cfg.config_dir) if cfg.config_dir else _repo_configs() / data.name
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
    large = _large_size(yaml) if cascade else 0  # checked before any work
    if cfg.count_foils:
        _check_count_foils(yaml["clip"])
    # Once a stage runs, every stage that needs it was made
    # from what it replaced, so its outputs are removed and made again (an under-trained VQ
    # resumed by a rerun gets new token shards in both folders, a transformer, a masked generator
    # and an embedding-conditioned transformer trained on them, and a new CLIP when that one
    # learns from the VQ's round trips; a CLIP resumed
    # by a rerun leaves the VQ and the transformer alone, and gets new token shards with its
    # embeddings, a new prior and a new embedding-conditioned transformer)
    cond_stage = Stage("cond_transformer", {"tokenizer", "vq", "clip_tokens", "transformer"},
                  lambda: _trained(p.cond_run, p.cond_transformer),
                  lambda: stage_transformer(cfg, p, yaml["transformer"], "cond"),
                  [p.cond_run])  # fmt: skip
    clip_needs = {"data", "tokenizer", *(["vq"] if cfg.clip and _clip_round_trips(yaml["clip"])
                                          else [])}  # fmt: skip
    clip_stage = Stage("clip", clip_needs, lambda: _trained(p.clip_run, p.clip),
                  lambda: stage_clip(cfg, p, yaml["clip"]), [p.clip_run])  # fmt: skip
    clip_tokens_stage = Stage("clip_tokens", {"data", "vq", "clip"},
                         lambda: _tokens_done(p.clip_tokens, p.clip),
                         lambda: stage_tokens(cfg, p, with_clip=True), [p.clip_tokens])  # fmt: skip
    # the prior reads the CLIP embeddings of the token shards, not their codes: a new VQ leaves
    # it alone
    prior_stage = Stage("prior", {"data", "clip"}, lambda: _trained(p.prior_run, p.prior),
                   lambda: stage_prior(cfg, p, yaml["prior"]), [p.prior_run],
                   after=frozenset({"clip_tokens"}))  # fmt: skip
    adapts = cfg.masked and _masked_adapts(yaml["masked"])  # started from the transformer
    masked_needs = {"tokenizer", "vq", "tokens", *(["transformer"] if adapts else [])}
    masked_stage = Stage("masked", masked_needs,
                    lambda: _trained(p.masked_run, p.masked),
                    lambda: stage_transformer(cfg, p, yaml["masked"], "masked", adapts),
                    [p.masked_run])  # fmt: skip
    cascade_stages = [
        Stage("data_large", set(), lambda: (p.data_large / "info.json").is_file(),
         lambda: data.build_large(cfg, p.data_large, large), [p.data_large]),
        Stage("upsampler", {"data_large"}, lambda: _trained(p.upsampler_run, p.upsampler),
         lambda: stage_upsampler(cfg, p, yaml["upsampler"]), [p.upsampler_run]),
    ]  # fmt: skip
    stages = [
        Stage("data", set(), lambda: (p.data / "info.json").is_file(),
         lambda: data.build(cfg, p.data), [p.data]),
        Stage("tokenizer", {"data"}, lambda: _complete(p.tokenizer),
         lambda: stage_tokenizer(cfg, p, yaml["tokenizer"]), [p.tokenizer_run]),
        Stage("vq", {"data"}, lambda: _trained(p.vq_run, p.vq),
         lambda: stage_vq(cfg, p, yaml["vq"]), [p.vq_run]),
        Stage("tokens", {"data", "vq"}, lambda: _tokens_done(p.tokens),
         lambda: stage_tokens(cfg, p), [p.tokens]),
        Stage("transformer", {"tokenizer", "vq", "tokens"},
         lambda: _trained(p.transformer_run, p.transformer),
         lambda: stage_transformer(cfg, p, yaml["transformer"], "transformer"),
         [p.transformer_run]),
        *([clip_stage] if cfg.clip else []),  # beside the transformer
        *([clip_tokens_stage, prior_stage] if cfg.prior else []),
        *([masked_stage] if cfg.masked else []),  # the longer of the two after the transformer
        *([cond_stage] if cfg.prior else []),
        *(cascade_stages if cascade else []),
        Stage("pipeline", {"tokenizer", "vq", "transformer", "clip", "prior", "cond_transformer",
                      "masked", "upsampler"},
         lambda: _assembled(p), lambda: stage_pipeline(cfg, p, cascade),
         [p.pipeline]),
        Stage("samples", {"pipeline"}, lambda: p.fidelity.is_file(),
         lambda: stage_samples(cfg, p, data), [p.samples, p.fidelity, p.evaluation]),
    ]  # fmt: skip
    config_steps = _config_steps(yaml)
    values = _budgets({**to_dict(cfg), "count_foils": cfg.count_foils}, config_steps)
    stages = [s._replace(made_from={k: values[k] for k in MADE_FROM.get(s.name, ())})
              for s in stages]  # fmt: skip
    names, before = {s.name for s in stages}, set()
    for s in stages:  # the one order both runners keep: each stage after what it waits for
        if not s.waits_for() & names <= before:
            raise RuntimeError(f"the {s.name} stage is planned before "
                               f"{sorted(s.waits_for() & names - before)}")  # fmt: skip
        before.add(s.name)
    return Plan(p, data, yaml, cascade, stages, config_steps)


SIDE_BY_SIDE_IDLE = 1.5  # CPUs idle as the job starts for lanes=0 to run 2 stages at once


def job_lanes(cfg: MainJobConfig) -> int:
    """How many stages run at once: `cfg.lanes`, or (0) 2 on a CPU where at least
    `SIDE_BY_SIDE_IDLE` CPUs sat idle just now (`runtime.free_cpus`), else 1 (said so). On a
    GPU, stages run one after another."""
    from dalle_ar.runtime import free_cpus

    if _on_gpu(cfg):
        return 1
    if cfg.lanes:
        return cfg.lanes
    if free_cpus() >= SIDE_BY_SIDE_IDLE:
        return 2
    say(f"stages one after another: fewer than {SIDE_BY_SIDE_IDLE} CPUs idle now (lanes=2 runs "
        "them side by side anyway)")  # fmt: skip
    return 1


def _on_gpu(cfg: MainJobConfig) -> bool:
    import torch

    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


class StageFailed(RuntimeError):
    """A stage that failed in a process of its own (`lanes` > 1), naming the stage, what went
    wrong and where its output went; the stages beside it were stopped."""


def say(line: str, bar_open: bool = False) -> None:
    """One line of the job's progress on stdout. On a terminal it first clears the line a stage
    running beside it may have left a progress bar on (that bar redraws below); elsewhere (a
    log file), with `bar_open` (a stage that writes to the terminal is running), it starts a
    line of its own, so that it does not end that stage's progress-bar line."""
    lead = "\r\033[K" if sys.stdout.isatty() else ("\n" if bar_open else "")
    print(lead + line, flush=True)


def _begin(
    i: int, n: int, stage: Stage, upstream: list[str], ran_with: dict, bar_open: bool = False
) -> str | None:
    """Before a stage: None (said so) when its output is complete, it ran with the settings it
    is made from now (`ran_with`, by stage: `_ran_with`) and nothing it needs ran in this job;
    else what to say after "running", its stale outputs removed first."""
    done = stage.done()  # may hash a CLIP's weights file (`_tokens_done`): asked once
    changed = _changed(stage, ran_with.get(stage.name)) if done else []
    if not upstream and not changed and done:
        say(f"[{i}/{n}] {stage.name}: done already, skipped", bar_open)
        return None
    stale = [o for o in stage.outputs if o.exists()] if upstream or changed else []
    for o in stale:
        shutil.rmtree(o) if o.is_dir() else o.unlink()
    why = [f"{', '.join(upstream)} ran"] if upstream else []
    why += [f"settings changed: {'; '.join(changed)}"] if changed else []
    return f" again ({'; '.join(why)})" if stale else ""


def _config_steps(yaml: dict[str, Path]) -> dict[str, int]:
    """Each budget key of `BUDGET_OF` whose stage the job has -> the run.steps its component
    config sets (read once, by `plan`); a config that sets none is left out."""
    steps = {}
    for key, stage in BUDGET_OF.items():
        if stage in yaml:
            run = _mapping(yaml[stage], safe_load).get("run")
            if isinstance(run, dict) and "steps" in run:
                steps[key] = run["steps"]
    return steps


def _budgets(values: dict, config_steps: dict[str, int]) -> dict:
    """`values` with each budget of 0 steps read as its component config's run.steps
    (`config_steps`), where the config says: the same budget either way compares equal."""
    return {k: config_steps.get(k, 0) if k in BUDGET_OF and v == 0 else v
            for k, v in values.items()}  # fmt: skip


def _changed(stage: Stage, before: dict | None) -> list[str]:
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


def _ran_with(p: Paths, previous: dict, config_steps: dict[str, int]) -> dict[str, dict]:
    """What each stage of the folder ran with: `stage_settings.json`, and for a stage it does not
    hold (a folder from before it was written), the job config the folder held before this run
    (`previous`, its main_job.yaml) read through MADE_FROM and `_budgets`."""
    recorded = _mapping(p.out / STAGE_SETTINGS, json.loads)
    previous = _budgets(previous, config_steps)
    return {name: recorded.get(name, {k: previous[k] for k in keys if k in previous})
            for name, keys in MADE_FROM.items()}  # fmt: skip


def _record(job: Plan, name: str, ran_with: dict) -> None:
    """A stage finished: what it ran with into `ran_with` and `stage_settings.json`."""
    stage = next(s for s in job.stages if s.name == name)
    ran_with[name] = stage.made_from or {}
    write_json_atomic(job.paths.out / STAGE_SETTINGS, ran_with)


def _finished(
    i: int, n: int, name: str, t0: float, timings: dict[str, float | str], bar_open: bool = False
) -> None:
    timings[name] = round(time.perf_counter() - t0, 1)
    say(f"[{i}/{n}] {name}: finished in {timings[name]} s", bar_open)


def _stopped(job: Plan, name: str, message: str) -> StageStopped:
    config = job.yaml.get("transformer" if name == "cond_transformer" else name)
    return StageStopped(f"the {name} stage stopped ({config}): {message} A rerun of the job "
                        "resumes the stage from its last good checkpoint, or starts it over "
                        "without one.")  # fmt: skip


def _one_after_another(job: Plan, timings: dict[str, float | str], ran_with: dict) -> None:
    """Each stage in turn, in this process (the plan's order has every stage after the ones it
    waits for: `plan`)."""
    ran: set[str] = set()
    n = len(job.stages)
    for i, stage in enumerate(job.stages, 1):
        again = _begin(i, n, stage, sorted(stage.needs & ran), ran_with)
        if again is None:
            timings[stage.name] = "skipped"
            continue
        say(f"[{i}/{n}] {stage.name}: running{again}")
        t0 = time.perf_counter()
        try:
            stage.run()
        except NonFiniteLoss as e:
            raise _stopped(job, stage.name, str(e)) from e
        ran.add(stage.name)
        _finished(i, n, stage.name, t0, timings)
        _record(job, stage.name, ran_with)


# What the processes of stages run side by side import once, in the server they are forked from
PRELOAD = [__name__, "dalle_ar.train.transformer", "dalle_ar.train.clip", "dalle_ar.train.vq",
           "dalle_ar.train.upsampler", "dalle_ar.pipelines"]  # fmt: skip


class Running(NamedTuple):
    number: int  # the stage's [i/n]
    name: str
    process: Any  # multiprocessing.Process
    started: float  # time.perf_counter()
    log: Path | None  # where its output goes; None: the terminal


class _Lanes:
    """The stages running side by side (`_side_by_side`): their processes and result pipes."""

    def __init__(self, cfg: MainJobConfig, job: Plan) -> None:
        import multiprocessing

        methods = multiprocessing.get_all_start_methods()
        self.ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:  # children forked from a server that never ran torch ops
            self.ctx.set_forkserver_preload(PRELOAD)  # (a fork after OpenMP ran can hang)
        self.cfg, self.job = cfg, job
        self.running: dict[Any, Running] = {}  # result pipe -> its stage
        self.terminal: str | None = None  # the running stage that writes to the terminal

    def start(self, i: int, stage: Stage, again: str) -> None:
        log = self.job.paths.out / "logs" / f"{stage.name}.log"
        if self.terminal is None:  # this one writes to the terminal: no log of an earlier run
            log.unlink(missing_ok=True)
            log, self.terminal = None, stage.name
        beside = [r.name for r in self.running.values()]
        where = f" beside {', '.join(beside)}" if beside else ""
        where += f", output in {log}" if log else ""
        say(f"[{i}/{len(self.job.stages)}] {stage.name}: running{again}{where}", log is not None)
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_stage_process, name=f"dalle-ar {stage.name}",
                                args=(self.cfg, stage.name, writer, log))  # fmt: skip
        self.running[reader] = Running(i, stage.name, proc, time.perf_counter(), log)
        proc.start()
        writer.close()

    def finished(self) -> tuple[list[Running], Exception | None]:
        """Wait for one or more running stages to end: those that finished, and the error of
        the first that failed (StageStopped, ConfigError or StageFailed), if one did."""
        from multiprocessing.connection import wait

        done, error = [], None
        for reader in wait(list(self.running)):
            r = self.running.pop(reader)
            try:
                status, text = reader.recv()
            except EOFError:  # killed before it could say
                status, text = "error", ""
            reader.close()
            r.process.join()
            if r.name == self.terminal:
                self.terminal = None
            if status == "ok":
                done.append(r)
            elif error is None:
                error = self._error(r, status, text)
        return done, error

    def _error(self, r: Running, status: str, text: str) -> Exception:
        if status == "stopped":
            return _stopped(self.job, r.name, text)
        if status == "config":
            return ConfigError(text)
        text = text or f"its process ended with exit code {r.process.exitcode}"
        return StageFailed(f"the {r.name} stage failed: {text}"
                           + (f" (its output: {r.log})" if r.log else ""))  # fmt: skip

    def stop(self) -> None:
        """End what still runs (after a failure or an interrupt), saying which."""
        n = len(self.job.stages)
        for r in self.running.values():
            if r.process.is_alive():
                r.process.terminate()
                r.process.join(10)
                if r.process.is_alive():
                    r.process.kill()
                    r.process.join()
                say(
                    f"[{r.number}/{n}] {r.name}: stopped; a rerun of the job runs it again (a "
                    "training stage from its last checkpoint, if it wrote one)"
                )
        self.running.clear()


def _side_by_side(cfg: MainJobConfig, job: Plan, lanes: int, timings: dict, ran_with: dict) -> None:
    """Up to `lanes` stages at once, each in a process of its own, a stage starting once every
    stage it waits for has finished (in the plan's order where several could). Each process
    takes the threads of the CPUs free when it starts, and a training stage follows them while
    it runs (`runtime.CPUShare`): when the stage beside it ends, it takes that core too. One
    stage at a time writes to the terminal; a stage started beside it writes to
    out_dir/logs/NAME.log. A stage that fails, an interrupt or SIGTERM stop the others (a
    training stage resumes from its last checkpoint on a rerun)."""
    import signal
    import threading

    names, n = {s.name for s in job.stages}, len(job.stages)
    waiting = list(enumerate(job.stages, 1))
    settled: set[str] = set()  # finished in this job, or skipped
    ran: set[str] = set()
    pool = _Lanes(cfg, job)

    def terminated(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    on_main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    before = signal.signal(signal.SIGTERM, terminated) if on_main else None
    try:
        while waiting or pool.running:
            ready = next(((i, s) for i, s in waiting if s.waits_for() & names <= settled), None)
            if ready and len(pool.running) < lanes:
                waiting.remove(ready)
                i, stage = ready
                again = _begin(i, n, stage, sorted(stage.needs & ran), ran_with,
                               pool.terminal is not None)  # fmt: skip
                if again is None:
                    timings[stage.name] = "skipped"
                    settled.add(stage.name)
                else:
                    pool.start(i, stage, again)
                continue
            if not pool.running:  # cannot happen with the plan's order (`plan`); never spin
                raise RuntimeError(f"no stage can start: {[s.name for _, s in waiting]}")
            done, error = pool.finished()
            for r in done:
                ran.add(r.name)
                settled.add(r.name)
                _finished(r.number, n, r.name, r.started, timings, pool.terminal is not None)
                _record(job, r.name, ran_with)
            if error is not None:
                raise error
    finally:
        pool.stop()
        if on_main:
            signal.signal(signal.SIGTERM, before)


def _stage_process(cfg: MainJobConfig, name: str, conn: Any, log: Path | None) -> None:
    """One stage in a process of its own (`_side_by_side`): the plan built again, the stage run
    with the threads of the CPUs free now, what came of it sent back through `conn`. It ends
    when the job's process does, however that one ends."""
    import multiprocessing
    import os
    import threading
    import traceback
    from multiprocessing.connection import wait

    from dalle_ar.cli import LOG_FORMAT
    from dalle_ar.runtime import pick_threads, set_threads

    parent = multiprocessing.parent_process()
    if parent is not None:  # the job killed (SIGKILL, out of memory): stop, do not train on
        threading.Thread(target=lambda: (wait([parent.sentinel]), os._exit(1)),
                         daemon=True).start()  # fmt: skip
    if log is not None:  # beside another stage: its progress and messages go to its log
        log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)  # the job's own level
    set_threads(pick_threads(0))
    try:
        stage = next(s for s in plan(cfg).stages if s.name == name)
        stage.run()
        conn.send(("ok", ""))
    except NonFiniteLoss as e:
        conn.send(("stopped", str(e)))
    except ConfigError as e:
        conn.send(("config", str(e)))
    except KeyboardInterrupt:  # the terminal's Ctrl-C reached every stage: the job says it
        conn.send(("error", "interrupted"))
    except BaseException as e:
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_stages(cfg: MainJobConfig) -> dict:
    """Run every stage not done yet, one after another or (`lanes`) side by side; returns the
    summary (also out_dir/summary.json). StageStopped for a training stage stopped by
    non-finite numbers; ConfigError for configs that do not fit; StageFailed for a stage that
    failed in a process of its own (naming the stage and where its output went)."""
    job = plan(cfg)
    p = job.paths
    p.out.mkdir(parents=True, exist_ok=True)
    # before main_job.yaml holds this run's
    ran_with = _ran_with(p, _mapping(p.out / "main_job.yaml", safe_load), job.config_steps)
    save_config(cfg, p.out / "main_job.yaml")
    if cfg.prior and not _tokens_done(p.clip_tokens, p.clip) and _tokens_done(p.tokens, p.clip):
        # a folder of the layout before clip_tokens/, whose token shards hold this CLIP's
        # embeddings: they are those shards, and the stages trained on them stay done
        shutil.copytree(p.tokens, p.clip_tokens, dirs_exist_ok=True)
    lanes = job_lanes(cfg)
    if lanes > 1:
        say(f"stages side by side where one needs nothing of the other: up to {lanes} at once")
    timings: dict[str, float | str] = {}
    start = time.perf_counter()
    if lanes == 1:
        _one_after_another(job, timings, ran_with)
    else:
        _side_by_side(cfg, job, lanes, timings, ran_with)
    total = round(time.perf_counter() - start, 1)
    timings = {s.name: timings[s.name] for s in job.stages if s.name in timings}  # plan order
    training = {"vq": _training(p.vq_run),
                **({"clip": _training(p.clip_run)} if cfg.clip else {}),
                "transformer": _training(p.transformer_run)}  # fmt: skip
    if cfg.prior:
        training["prior"] = _training(p.prior_run)
        training["cond_transformer"] = _training(p.cond_run)
    if cfg.masked:
        training["masked"] = _training(p.masked_run)
    if job.cascade:
        training["upsampler"] = _training(p.upsampler_run)
    before = _mapping(p.out / "summary.json", json.loads)
    # total_seconds: this run's wall time; total_seconds_when_run: the wall time of the last run
    # that did work (this one, unless it found every stage done; after a partial rerun, this
    # run's, while stage_seconds_when_run keeps each stage's own)
    ran = any(not isinstance(v, str) for v in timings.values())
    when = total if ran else _seconds(before).get("total")
    summary = {"config": to_dict(cfg), "machine": describe_machine(), "lanes": lanes,
               "stage_seconds": timings, "stage_seconds_when_run": _when_run(before, timings),
               "training": training, "total_seconds": total,
               "total_seconds_when_run": when}  # fmt: skip
    if p.fidelity.is_file():
        summary["fidelity"] = json.loads(p.fidelity.read_text())
    (p.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mapping(path: Path, parse: Callable[[str], Any]) -> dict:
    """The mapping a file of the job folder holds, parsed by `parse` (json.loads, safe_load),
    or {}: no such file yet, one that does not parse, or not a mapping (nothing to carry over)."""
    try:
        found = parse(path.read_text())
    except (OSError, ValueError, YAMLError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}


def _seconds(old: dict) -> dict[str, float]:
    """What a previous summary timed when it ran: each stage's seconds and "total" (older
    summaries: their stage_seconds, and their total_seconds where a stage ran); entries that
    are not numbers dropped."""

    def numbers(d: object) -> dict[str, float]:
        return {k: v for k, v in (d.items() if isinstance(d, dict) else ())
                if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip

    stages = numbers(old.get("stage_seconds_when_run", old.get("stage_seconds")))
    if "total_seconds_when_run" in old:
        total = old["total_seconds_when_run"]
    else:  # written before the field: its total is the job's where some stage ran in it
        total = old.get("total_seconds") if numbers(old.get("stage_seconds")) else None
    return {**stages, **numbers({"total": total})}


def _when_run(old: dict, timings: dict[str, float | str]) -> dict[str, float]:
    """Each stage's seconds when it last ran: this job's where it ran, else what the folder's
    previous summary.json recorded (a rerun that skips a stage keeps its measured time; a job
    that failed wrote no summary, so its times are not carried); a stage no summary timed is
    left out."""
    before = _seconds(old)
    return {name: secs if isinstance(secs, (int, float)) else before[name]
            for name, secs in timings.items()
            if isinstance(secs, (int, float)) or name in before}  # fmt: skip


def table(summary: dict) -> str:
    """The stages as a terminal table: time, and for training stages the steps against the plan,
    the precision and threads; an under-trained stage is named again below it."""
    rows, loud = [("stage", "time", "training")], []
    for name, secs in summary["stage_seconds"].items():
        t = summary.get("training", {}).get(name)
        what = ""
        if t:
            what = f"{t.get('step', 0):,} of {t.get('planned_steps', 0):,} steps"
            used = t.get("threads_used") or [t.get("threads", "?")]  # a run follows the CPUs
            threads = "-".join(str(n) for n in (used if len(used) == 1 else (used[0], used[-1])))
            what += f", {t.get('precision', '?')}, {threads} thread(s)"
            if t.get("under_trained"):
                what += ", UNDER-TRAINED"
                loud.append(f"{name}: {t['under_trained']}; run the job again to continue")
        if secs == "skipped":
            before = summary.get("stage_seconds_when_run", {}).get(name)
            shown = "skipped" + (f" (ran in {before} s)" if before is not None else "")
        else:
            shown = f"{secs} s"
        rows.append((name, shown, what))
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([*lines, *(f"WARNING {m}" for m in loud)])


def _upgrade(overrides: list[str]) -> list[str]:
    """`guidance_scale=2` -> `sampling.guidance_scale=2` (LEGACY_KEYS)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and key.endswith("_minutes") and key in LEGACY_KEYS:  # its meaning changed
            budget = key.replace("_minutes", "_steps")
            print(f"dalle-ar pipeline: {key} is now {LEGACY_KEYS[key]}, a safety cap; the "
                  f"budget is {budget} (the component config's run.steps by default)",
                  file=sys.stderr)  # fmt: skip
        out.append(f"{LEGACY_KEYS[key]}={value}" if eq and key in LEGACY_KEYS else o)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="dalle-ar pipeline",
        description=__doc__.split("\n")[0],
        epilog="settings (key=value; a --config YAML sets the same keys), with their "
        "defaults:\n" + settings_help(MainJobConfig) + "\nwhat each means: README.md (the main "
        "job) and the comments of MainJobConfig (dalle_ar/jobs/config.py); a budget of 0 steps "
        "is the component config's run.steps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="a main-job YAML (fields: MainJobConfig)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides (e.g. out_dir=runs/x)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(MainJobConfig, args.config, _upgrade(args.overrides))
    except ConfigError as e:
        print(f"dalle-ar pipeline: {e}")
        return 2
    logging.getLogger().setLevel(logging.WARNING)
    try:
        summary = run_stages(cfg)
    except ConfigError as e:  # a component config that does not fit: before its stage's work
        print(f"dalle-ar pipeline: {e}")
        return 2
    except (StageStopped, StageFailed) as e:  # StageStopped: as `dalle-ar train` exits for it
        print(f"dalle-ar pipeline: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndalle-ar pipeline: interrupted; a rerun of the job goes on from the stages it "
              "finished", file=sys.stderr)  # fmt: skip
        return 130
    if summary.get("fidelity"):
        print(DATA_SETS[cfg.data].summarize(summary["fidelity"]))
    print(table(summary))
    print(f"pipeline folder: {Path(cfg.out_dir) / 'pipeline'}")
    grids = sorted((Path(cfg.out_dir) / "samples").glob("grid*.png"))  # one per mode, upsampled
    print(f"sample grids:    {', '.join(str(g) for g in grids)}")
    took, when = f"{summary['total_seconds']} s", summary["total_seconds_when_run"]
    if when is not None and set(summary["stage_seconds"].values()) == {"skipped"}:
        took += f"; the last run that did work took {when} s"
    print(f"summary:         {Path(cfg.out_dir) / 'summary.json'}  ({took})")
    return 0
