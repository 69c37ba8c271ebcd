"""The main job's stages (`dalle-ar pipeline`): where each writes below `out_dir` (`Paths`),
what runs it (each calls the functions behind its own command: `dalle-ar data ...`, `dalle-ar
train ...`, `dalle-ar tokens`) and the checks that its output is complete. The order they run
in and what each needs: `dalle_ar.jobs.plan`."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal

from dalle_ar.checkpoint import file_sha256
from dalle_ar.config import ConfigError, load_config
from dalle_ar.jobs.config import MainJobConfig
from dalle_ar.jobs.dataset import DataSet

log = logging.getLogger(__name__)


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
    started from the job's transformer, `masked_adapts`) or the transformer conditioned on the
    CLIP image embedding ("cond": the transformer fine-tuned on `clip_tokens/`' embeddings)."""
    from dalle_ar.models.vq import VQTokenizer
    from dalle_ar.text import TextTokenizer
    from dalle_ar.train import transformer
    from dalle_ar.train.common import has_checkpoint
    from dalle_ar.train.masked import TrainMaskedConfig

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
    held = json.loads((p.data / "info.json").read_text())["counts"]["eval"]
    if held < rcfg.retrieval_batch:  # a small evaluation split: one batch of all it holds
        log.warning("the CLIP's held-out retrieval in batches of %d, the evaluation pictures "
                    "there are (its config asks for %d)", held, rcfg.retrieval_batch)  # fmt: skip
        rcfg = load_config(clip.CLIPRecipeConfig, yaml, [*overrides, f"retrieval_batch={held}"])
    clip.train(rcfg, resume=has_checkpoint(p.clip_run))


def _recipe(cls: type, yaml: Path) -> Any:
    """A stage's recipe config read from its YAML for what it says of the stage, before the job
    hands it its paths (placeholders here)."""
    return load_config(cls, yaml, ["data.train=shards.tar", "text_tokenizer=tokenizer", "vq=job"])


def masked_adapts(yaml: Path) -> bool:
    """Whether the masked generator's config starts it from an autoregressive transformer
    (`init_from`): then the job starts it from its own, after the transformer stage."""
    from dalle_ar.train.masked import TrainMaskedConfig

    return bool(_recipe(TrainMaskedConfig, yaml).init_from)


def clip_round_trips(yaml: Path) -> bool:
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


def tokens_done(folder: Path, clip: Path | None = None) -> bool:
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


def assembled(p: Paths) -> bool:
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
    prompts = cfg.prompts or data.grid_prompts(p.data)
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
    report["grid_prompts"] = prompts
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


SHARDS_PLACEHOLDER = ["data.train=shards.tar"]  # the stages give theirs; a size check reads none


def vq_size(yaml: Path) -> int:
    """The pictures' side in pixels the VQ config `yaml` reads and draws (model.image_size):
    what the generators draw, and the size the data stage writes the pictures at."""
    from dalle_ar.train.vq import VQRecipeConfig

    return load_config(VQRecipeConfig, yaml, SHARDS_PLACEHOLDER).model.image_size


def large_size(yaml: dict[str, Path]) -> int:
    """The upsampler's large size (its config's low_size * scale), after checking that its small
    size is the VQ's image size (what the generators draw): ConfigError naming both files."""
    from dalle_ar.train.upsampler import UpsamplerRecipeConfig

    up = load_config(UpsamplerRecipeConfig, yaml["upsampler"], SHARDS_PLACEHOLDER).model
    small = vq_size(yaml["vq"])
    if up.low_size != small:
        raise ConfigError(f"config key 'model.low_size': {yaml['upsampler']} upsamples "
                          f"{up.low_size}-px pictures, {yaml['vq']} draws {small}-px "
                          "ones: expected equal")  # fmt: skip
    return up.high_size


def check_count_foils(yaml: Path) -> None:
    """ConfigError naming the job's own key, before any work, for a CLIP config whose scenes are
    too small for the count foils the masked mode trains it with."""
    from dalle_ar.train.clip import FOIL_MIN_SIZE, CLIPRecipeConfig

    size = _recipe(CLIPRecipeConfig, yaml).data.image_size
    if size < FOIL_MIN_SIZE:
        raise ConfigError(f"config key 'masked': trains the CLIP with count foils, which render "
                          f"scenes of >= {FOIL_MIN_SIZE} pixels; {yaml} has data.image_size "
                          f"{size} (masked=false; clip=false with rerank.reranker=pmi; or a "
                          "CLIP config of larger scenes)")  # fmt: skip


def complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def trained(run_dir: Path, component: Path) -> bool:
    """A training stage is done once its component is written from its planned steps (not an
    under-trained one a safety cap stopped: that one resumes)."""
    return complete(component) and training_state(run_dir).get("finished", False)


def training_state(run_dir: Path) -> dict:
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
