"""`dalle-ar train transformer --config FILE [--resume] [key=value ...]`

parse config -> data (token shards, or image shards + VQ) -> model -> loop -> save. Runs as one
process or under `torchrun --nproc_per_node=N` (DDP, or FSDP for models that do not fit one GPU).
Only rank 0 logs and writes. The final model is the component folder out_dir/transformer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch

from dalle_ar.config import ConfigError, DataConfig, OptimConfig, RunConfig, require
from dalle_ar.runtime import autocast_context, seed_everything
from dalle_ar.train import dist
from dalle_ar.train.common import (
    BudgetBar,
    Run,
    build_optimizer,
    lr_at,
    recipe_config,
    schedule_step,
    set_lr,
)
from dalle_ar.train.objectives import drop_conditioning, lm_loss
from dalle_ar.train.transformer_data import BatchSource, ShardBatches
from dalle_ar.transformer import COMPONENT, Transformer, TransformerConfig

log = logging.getLogger(__name__)

PROMPTS = [
    "a small red circle at the top left",
    "a big blue square in the centre",
    "a green triangle to the left of a yellow circle",
    "a big purple diamond at the bottom right",
]


@dataclasses.dataclass
class TrainTransformerConfig:
    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    text_tokenizer: str = ""  # tokenizer folder (dalle-ar train tokenizer)
    vq: str = ""  # VQ folder: encodes image shards (data_format=images), decodes sample grids
    data_format: Literal["tokens", "images"] = "tokens"  # pretokenized shards or image shards
    text_loss_weight: float = 0.125  # paper: 1/8 of the loss on text positions
    image_loss_weight: float = 0.875  # ... and 7/8 on image positions
    cond_drop: float = 0.1  # probability a caption is replaced by the empty one (guidance)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # data-parallel mode under torchrun
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory)
    max_bad_steps: int = 20  # non-finite losses in a row that stop the run
    eval_batches: int = 20  # held-out batches per evaluation (per rank)
    sample_prompts: list[str] = dataclasses.field(default_factory=lambda: list(PROMPTS))
    sample_temperature: float = 1.0  # sample grids: softmax temperature
    halt_after: int = 0  # stop (with a checkpoint) after this step; 0 = run.steps (staged runs)
    lr_follows_time: bool = False  # with run.max_minutes: the cosine ends when time runs out

    def validate(self) -> None:
        w_ok = self.text_loss_weight >= 0 and self.image_loss_weight > 0
        require(w_ok, "image_loss_weight", "loss weights must be >= 0 (image > 0)")
        require(0 <= self.cond_drop <= 1, "cond_drop", f"must be in [0, 1], got {self.cond_drop}")
        require(self.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
        require(self.eval_batches >= 1, "eval_batches", "must be >= 1")
        require(self.halt_after >= 0, "halt_after", "must be >= 0")
        require(self.sample_temperature > 0, "sample_temperature", "must be > 0")


def sample_grid(model: Transformer, source: ShardBatches, cfg, path: Path, seed: int) -> None:
    """One row of decoded samples for the fixed prompts (no guidance), written as a PNG."""
    from dalle_ar.grid import image_grid
    from dalle_ar.sampling import generate_image_tokens

    t = source.tok.encode(cfg.sample_prompts)
    codes = generate_image_tokens(
        model, t.ids, text_lens=t.mask.sum(1), temperature=cfg.sample_temperature, seeds=seed
    )  # (n, h, w)
    with torch.no_grad():
        images = source.vq.decode(codes)  # (n, 3, S, S) in [0, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)


class NonFiniteLoss(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is kept."""


def _drop_mask(cfg: TrainTransformerConfig, micro: int, B: int, info: dist.DistInfo):
    # One draw for the global batch, sliced by rank: N processes drop exactly the captions one
    # process with the whole batch would drop.
    g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + micro)
    draw = torch.rand(B * info.world, generator=g) < cfg.cond_drop
    return draw[info.rank * B : (info.rank + 1) * B]


def _loss(model, batch, cfg, info, drop=None, text_count=None):
    text, lens, image, cond = batch["text"], batch["text_lens"], batch["image"], batch.get("cond")
    if drop is not None:
        text, lens, cond = drop_conditioning(
            text, lens, batch["empty_ids"], batch["empty_len"], drop, cond
        )
    prefix = text if cfg.model.has_text else text[:, :0]
    tokens = torch.cat([prefix, image[:, :-1]], 1)
    kw = {"text_lens": lens} if cfg.model.has_text else {}
    with autocast_context(info.device, cfg.run.precision, cpu_auto=True):
        out = model(tokens, cond=cond, **kw)
    return lm_loss(
        out,
        prefix if cfg.model.has_text else None,
        image,
        lens,
        cfg.text_loss_weight,
        cfg.image_loss_weight,
        text_count,
    )


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, source: BatchSource, cfg: TrainTransformerConfig, info) -> dict[str, float]:
    """Held-out losses, summed over every rank's batches."""
    batches = source.eval()
    if batches is None:
        return {}
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # image, text, batches
    for i, batch in enumerate(batches):
        if i >= cfg.eval_batches:
            break
        _, parts = _loss(model, _to(batch, info.device), cfg, info)
        sums += torch.stack(
            [
                parts["image_loss"].double(),
                parts.get("text_loss", 0 * sums[0]),
                torch.ones((), dtype=torch.float64, device=info.device),
            ]
        )
    model.train()
    sums = dist.all_reduce_sum(sums)
    n = max(1.0, sums[2].item())
    return {"eval/image_loss": sums[0].item() / n, "eval/text_loss": sums[1].item() / n}


def _resolve_code_features(cfg: TrainTransformerConfig) -> tuple[torch.Tensor, ...] | None:
    """model.code_features: the VQ's per-code pixels, its width filled in for -1, and for
    model.code_input=mask the VQ's drawn masks: the arguments of `set_code_features`."""
    if not cfg.model.code_features:
        return None
    if not cfg.vq:
        raise ConfigError("config key 'model.code_features': needs the `vq` folder")
    from dalle_ar.vq import VQTokenizer

    vq = VQTokenizer.from_pretrained(cfg.vq)
    feats = vq.code_pixels()
    if cfg.model.code_features == -1:
        cfg.model.code_features = feats.shape[1]
    if tuple(feats.shape) != (cfg.model.image_vocab, cfg.model.code_features):
        raise ConfigError(
            f"config key 'model.code_features': the VQ in {cfg.vq} gives features of shape "
            f"{tuple(feats.shape)}, the model wants ({cfg.model.image_vocab}, "
            f"{cfg.model.code_features})"
        )
    return (feats, vq.code_masks()) if cfg.model.code_input == "mask" else (feats,)


def train(
    cfg: TrainTransformerConfig, source: BatchSource | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the recipe; returns the final metrics (rank 0's view)."""
    info = dist.init_distributed(cfg.run.device)
    seed_everything(cfg.run.seed)  # the same initial weights on every rank
    feats = _resolve_code_features(cfg)  # before Run saves the config: the width is known
    run = Run(cfg, cfg.run, rank=info.rank)
    if source is None:
        source = ShardBatches(cfg, info)
    model = Transformer(cfg.model).to(info.device)
    if feats is not None:
        model.set_code_features(*feats)
    model.grad_checkpointing = cfg.activation_checkpointing
    wrapped = dist.wrap_model(model, info, cfg.parallel, blocks=model.blocks)
    # fused AdamW: one kernel for all tensors (sharded FSDP parameters take the plain loop)
    opt = build_optimizer(wrapped, cfg.optim, fused=not dist.is_fsdp(wrapped))
    step, micro, skipped = 0, 0, 0
    if resume:
        step, micro, skipped = _resume(run, wrapped, opt)
    if info.is_main:
        log.info(
            "transformer: %.2fM parameters, layouts %s, attention %s, %d process(es)",
            model.num_params() / 1e6,
            cfg.model.layout_kinds(),
            model.backend.name,
            info.world,
        )
    run.init_wandb("transformer")
    metrics: dict[str, Any] = {}
    try:
        metrics = _loop(cfg, info, run, model, wrapped, opt, source, step, micro, skipped)
    finally:
        run.finish()
    return metrics


def _loop(cfg, info, run, model, wrapped, opt, source, step, micro, skipped) -> dict[str, Any]:
    total, accum = cfg.run.steps, cfg.optim.grad_accum
    stop_at = min(total, cfg.halt_after) if cfg.halt_after else total
    B = cfg.data.batch_size
    batches = source.train(skip=micro)
    bad_in_row, t_log, step_log, last, out_of_time = 0, time.time(), step, {}, False
    log_path = run.dir / "train_log.jsonl"
    if info.is_main:
        _truncate_log(log_path, step)  # rows past the checkpoint come again after a resume
    bar = BudgetBar(cfg.run, step, "transformer", disable=not info.is_main)
    postfix: dict[str, str] = {}
    wrapped.train()
    while step < stop_at:
        minutes = dist.all_reduce_max(run_minutes(run))  # one clock for every rank
        set_lr(opt, lr_at(schedule_step(cfg, step, minutes), cfg.optim, total))
        loss_sum = torch.zeros((), device=info.device)
        parts_sum: dict[str, torch.Tensor] = {}
        for k in range(accum):
            batch = _to(next(batches), info.device)
            batch["empty_ids"], batch["empty_len"] = source.empty_ids, source.empty_len
            drop = _drop_mask(cfg, micro, B, info)
            micro += 1
            count = None
            if info.distributed and cfg.model.has_text:
                idx = torch.arange(1, batch["text"].shape[1], device=info.device)
                lens = torch.where(drop.to(info.device), source.empty_len, batch["text_lens"])
                count = dist.all_reduce_sum((idx[None] < lens[:, None]).sum()) / info.world
            with dist.no_sync(wrapped, k < accum - 1):
                loss, parts = _loss(wrapped, batch, cfg, info, drop, count)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
            for name, v in parts.items():
                parts_sum[name] = parts_sum.get(name, 0) + v / accum
        norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.optim.grad_clip or math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP: the norm is a DTensor over the shards
            norm = norm.full_tensor()
        check = dist.all_reduce_sum(torch.stack([loss_sum, norm.float().to(loss_sum.device)]))
        if not bool(torch.isfinite(check).all()):
            opt.zero_grad(set_to_none=True)
            bad_in_row, skipped = bad_in_row + 1, skipped + 1
            log.warning(
                "non-finite loss at step %d: step skipped (%d in a row, %d in all)",
                step,
                bad_in_row,
                skipped,
            )
            if bad_in_row >= cfg.max_bad_steps:
                raise NonFiniteLoss(
                    f"{bad_in_row} non-finite losses in a row (run.max_bad_steps="
                    f"{cfg.max_bad_steps}) at step {step}: stopping; the last good checkpoint "
                    f"in {run.ckpt_dir} is intact. Lower optim.lr or check the data."
                )
            continue
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, bad_in_row = step + 1, 0
        bar.update(step, minutes, **postfix)
        # every rank stops at the same step: the clocks of the processes may disagree
        out_of_time = cfg.run.max_minutes > 0 and minutes > cfg.run.max_minutes
        if step % cfg.run.log_every == 0 or step == stop_at or out_of_time:
            vals = dist.all_reduce_sum(torch.stack([loss_sum, *parts_sum.values()])) / info.world
            dt = time.time() - t_log
            last = {
                "step": step,
                "loss": vals[0].item(),
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": check[1].item() / info.world,
                "skipped_steps": skipped,
                "samples_per_s": (step - step_log) * accum * B * info.world / max(dt, 1e-9),
            }
            last.update({f"train/{n}": v.item() for n, v in zip(parts_sum, vals[1:])})
            t_log, step_log = time.time(), step
            _log_row(run, info, log_path, last, step)
            postfix["loss"] = f"{last['loss']:.4f}"
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < stop_at:
            row = {"step": step, "minutes": run_minutes(run)}
            _log_row(run, info, log_path, {**row, **evaluate(wrapped, source, cfg, info)}, step)
        if cfg.run.sample_every and step % cfg.run.sample_every == 0 and step < stop_at:
            _samples(cfg, info, run, model, wrapped, source, step)
        if step % cfg.run.save_every == 0 or step == stop_at or out_of_time:
            _save(run, cfg, wrapped, opt, step, micro, skipped)
        if out_of_time:
            log.info("run.max_minutes reached at step %d", step)
            break
    bar.close()
    final = {**last, "step": step, "skipped_steps": skipped, "minutes": run_minutes(run)}
    final.update(evaluate(wrapped, source, cfg, info))
    _samples(cfg, info, run, model, wrapped, source, step)
    full_model, _ = dist.full_state(wrapped, opt)
    if info.is_main:
        if step >= total or out_of_time:
            _save_final(model, full_model, cfg, run.dir / COMPONENT)
        run.log(final, step)
        run.write_json("metrics.json", final)
        log.info("transformer: step %d, %s", step, json.dumps(final))
    dist.barrier()
    return final


def _log_row(run: Run, info, path: Path, row: dict[str, Any], step: int) -> None:
    if info.is_main:
        run.log(row, step)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def run_minutes(run: Run) -> float:
    return (time.time() - run.start_time) / 60


def _save(run, cfg, wrapped, opt, step, micro, skipped) -> None:
    m, o = dist.full_state(wrapped, opt)  # collective under FSDP: every rank calls it
    run.save(m, cfg.model, COMPONENT, step, o, {"micro_batches": micro, "skipped": skipped})
    dist.barrier()


def _save_final(model, full_model, cfg, path: Path) -> None:
    from dalle_ar.checkpoint import save_pretrained

    save_pretrained(full_model if dist.is_fsdp(model) else model, cfg.model, path, COMPONENT)


def _resume(run: Run, wrapped, opt) -> tuple[int, int, int]:
    if dist.is_fsdp(wrapped):
        from safetensors.torch import load_file

        from dalle_ar.checkpoint import load_train_state, set_rng_state

        state = load_train_state(run.ckpt_dir)
        weights = load_file(str(run.ckpt_dir / "model.safetensors"))
        dist.load_full_state(wrapped, opt, weights, state["optimizer"])
        set_rng_state(state["rng"])
    else:
        state = run.resume(dist.unwrap(wrapped), opt)
    extra = state["extra"]
    return int(state["step"]), int(extra["micro_batches"]), int(extra.get("skipped", 0))


def _samples(cfg, info, run, model, wrapped, source, step) -> None:
    if not (cfg.vq and cfg.text_tokenizer and cfg.sample_prompts) or dist.is_fsdp(wrapped):
        return  # (FSDP: rank 0 alone cannot run a sharded model; sample from the saved folder)
    if info.is_main:
        path = run.dir / "samples" / f"step_{step:07d}.png"
        sample_grid(model, source, cfg, path, seed=cfg.run.seed)
        run.log_image("samples", path, step, caption=" | ".join(cfg.sample_prompts))
    dist.barrier()


def main(argv: list[str] | None = None) -> int:
    prog = "dalle-ar train transformer"
    parsed = recipe_config(
        TrainTransformerConfig, argv, prog, __doc__, "configs/transformer_*.yaml"
    )
    if parsed is None:
        return 2
    cfg, resume = parsed
    try:
        metrics = train(cfg, resume=resume)
    except (ConfigError, FileNotFoundError) as e:  # e.g. a missing tokenizer or VQ folder
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    finally:
        dist.cleanup()
    if metrics and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}))
    return 0
