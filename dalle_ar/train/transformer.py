"""`dalle-ar train transformer --config FILE [--resume] [key=value ...]`

parse config -> data (token shards, or image shards + VQ) -> model -> loop -> save. Runs as one
process or under `torchrun --nproc_per_node=N` (DDP, or FSDP for models that do not fit one GPU).
The loop (`dalle_ar.train.loop`) owns the budget, schedule, checkpoints and logging; only rank 0
logs and writes. The final model is the component folder out_dir/transformer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from dalle_ar.checkpoint import init_from_folder, read_component_config, save_pretrained
from dalle_ar.config import ConfigError, DataConfig, require
from dalle_ar.models.transformer import COMPONENT, Transformer, TransformerConfig
from dalle_ar.models.transformer_config import TRAINED_ON
from dalle_ar.runtime import autocast_context, precision_name
from dalle_ar.train import dist
from dalle_ar.train.common import build_optimizer, run_recipe
from dalle_ar.train.loop import LoopConfig, Task, fit, setup, to_device
from dalle_ar.train.objectives import drop_conditioning, lm_loss, mask_codes, masked_loss
from dalle_ar.train.transformer_data import BatchSource, ShardBatches

log = logging.getLogger(__name__)

PROMPTS = [
    "a small red circle at the top left",
    "a big blue square in the centre",
    "a green triangle to the left of a yellow circle",
    "a big purple diamond at the bottom right",
]


@dataclasses.dataclass
class TrainTransformerConfig(LoopConfig):  # optim, run, lr_follows_time, max_bad_steps, halt_after
    model: TransformerConfig = dataclasses.field(default_factory=TransformerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    text_tokenizer: str = ""  # tokenizer folder (dalle-ar train tokenizer)
    vq: str = ""  # VQ folder: encodes image shards (data_format=images), decodes sample grids
    data_format: Literal["tokens", "images"] = "tokens"  # pretokenized shards or image shards
    text_loss_weight: float = 0.125  # paper: 1/8 of the loss on text positions
    image_loss_weight: float = 0.875  # ... and 7/8 on image positions
    cond_drop: float = 0.1  # probability a caption is replaced by the empty one (guidance)
    # an embedding-conditioned model (model.cond_dim > 0, fed the CLIP image embedding of token
    # shards written with a CLIP): probability, drawn apart from the caption's, that the
    # embedding is replaced by the learned null one. About half, so that one model serves both
    # the prior mode (embedding and caption) and the text mode (the null embedding).
    embed_drop: float = 0.5
    # a transformer folder whose weights start this model (fine-tuning): its config must be this
    # model's but for the conditioning embedding (cond_*), and the tensors it lacks (the
    # embedding's) start fresh; a resumed run reads its checkpoint instead. So DALL-E 2's decoder,
    # the transformer conditioned on the CLIP image embedding (model.cond_dim), starts from the
    # text-only transformer and learns only to read the embedding (docs/results.md#prior-mode);
    # the folder's own embedding is left out where this model has none or another shape. A
    # masked model may start from an autoregressive one: its body, text and positions carry
    # over, the code embedding ([MASK] is one more row) starts fresh (ADAPT_FIELDS;
    # docs/results.md#masked-mode)
    init_from: str = ""
    # train only the conditioning embedding's tensors (cond_*: its projection and null
    # embedding) and keep every other tensor init_from's: the body stays the text-only model's
    # (with model.cond_mode=add the model starts as that one; its text mode then moves only by
    # what the null embedding and the projection's bias learn). It learned next to nothing of
    # the embedding (docs/results.md#one-transformer-for-both-modes)
    freeze_body: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # data-parallel mode under torchrun
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory)
    eval_batches: int = 20  # held-out batches per evaluation (per rank)
    sample_prompts: list[str] = dataclasses.field(default_factory=lambda: list(PROMPTS))
    sample_temperature: float = 1.0  # sample grids: softmax temperature

    def validate(self) -> None:
        super().validate()
        w_ok = self.text_loss_weight >= 0 and self.image_loss_weight > 0
        require(w_ok, "image_loss_weight", "loss weights must be >= 0 (image > 0)")
        require(0 <= self.cond_drop <= 1, "cond_drop", f"must be in [0, 1], got {self.cond_drop}")
        e = self.embed_drop
        require(0 <= e <= 1, "embed_drop", f"must be in [0, 1], got {e}")
        require(self.eval_batches >= 1, "eval_batches", "must be >= 1")
        if self.freeze_body:
            require(bool(self.init_from) and self.model.takes_cond, "freeze_body",
                    "trains only the conditioning embedding (model.cond_dim > 0) on a body "
                    "from init_from: set both")  # fmt: skip
        require(self.sample_temperature > 0, "sample_temperature", "must be > 0")


def sample_grid(model: Transformer, source: ShardBatches, cfg, path: Path, seed: int) -> None:
    """One row of decoded samples for the fixed prompts (no guidance; an embedding-conditioned
    model in text mode; a masked generator at its default steps), written as a PNG."""
    from dalle_ar.grid import image_grid
    from dalle_ar.sampling import generate_image_tokens

    t = source.tok.encode(cfg.sample_prompts)
    n = len(cfg.sample_prompts)
    if model.cfg.masked:
        from dalle_ar.sampling.masked import generate_masked

        codes = generate_masked(model, t.ids, text_lens=t.mask.sum(1), seeds=seed,
                                temperature=cfg.sample_temperature)  # fmt: skip
    else:
        cond = model.null_cond(n) if model.cfg.takes_cond else None  # text mode
        codes = generate_image_tokens(
            model,
            t.ids,
            text_lens=t.mask.sum(1),
            temperature=cfg.sample_temperature,
            seeds=seed,
            cond=cond,
        )  # (n, h, w)
    with torch.no_grad():
        images = source.vq.decode(codes)  # (n, 3, S, S) in [0, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(path)


def _drop_mask(cfg: TrainTransformerConfig, micro: int, B: int, info: dist.DistInfo):
    # One draw for the global batch, sliced by rank: N processes drop exactly the captions one
    # process with the whole batch would drop.
    # Returns (caption dropped, embedding dropped), each (B,) bool, drawn independently.
    g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + micro)
    u = torch.rand(2, B * info.world, generator=g)[:, info.rank * B : (info.rank + 1) * B]
    return u[0] < cfg.cond_drop, u[1] < cfg.embed_drop


def _loss(model, batch, cfg, info, drop=None, text_count=None, null_rows=None, masks=None):
    """drop: captions replaced by the empty one; null_rows: embeddings replaced by the null
    one ((B,) bool each, or None); masks: a masked generator's (input codes, masked) of
    `mask_codes`."""
    text, lens, image, cond = batch["text"], batch["text_lens"], batch["image"], batch.get("cond")
    if drop is not None:
        text, lens = drop_conditioning(text, lens, batch["empty_ids"], batch["empty_len"], drop)
    prefix = text if cfg.model.has_text else text[:, :0]
    if cfg.model.masked:
        codes, masked = masks
        with autocast_context(info.device, cfg.run.precision, cpu_auto=True):
            out = model(torch.cat([prefix, codes], 1), text_lens=lens)
        return masked_loss(out.image, image, masked)
    tokens = torch.cat([prefix, image[:, :-1]], 1)
    kw = {"text_lens": lens} if cfg.model.has_text else {}
    if cfg.model.takes_cond and null_rows is not None:
        kw["null_rows"] = null_rows.to(image.device)
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


@torch.no_grad()
def evaluate(model, source: BatchSource, cfg: TrainTransformerConfig, info) -> dict[str, float]:
    """Held-out losses, summed over every rank's batches. An embedding-conditioned model is
    also scored in text mode (the null embedding): `eval/image_loss_text_mode`."""
    batches = source.eval()
    if batches is None:
        return {}
    model.eval()
    # image, text, batches, image in text mode
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)
    for i, batch in enumerate(batches):
        if i >= cfg.eval_batches:
            break
        batch = to_device(batch, info.device)
        masks = None
        if cfg.model.masked:  # the same masks at every evaluation
            g = torch.Generator().manual_seed(i)
            masks = mask_codes(batch["image"], cfg.model.mask_id, g)
        _, parts = _loss(model, batch, cfg, info, masks=masks)
        text_mode = sums[0] * 0
        if cfg.model.takes_cond:
            rows = torch.ones(len(batch["image"]), dtype=torch.bool)
            text_mode = _loss(model, batch, cfg, info, null_rows=rows)[1]["image_loss"].double()
        one = torch.ones((), dtype=torch.float64, device=info.device)
        sums += torch.stack([parts["image_loss"].double(), parts.get("text_loss", 0 * sums[0]),
                             one, text_mode])  # fmt: skip
    model.train()
    sums = dist.all_reduce_sum(sums)
    n = max(1.0, sums[2].item())
    out = {"eval/image_loss": sums[0].item() / n, "eval/text_loss": sums[1].item() / n}
    if cfg.model.takes_cond:
        out["eval/image_loss_text_mode"] = sums[3].item() / n
    return out


# An autoregressive model adapted into a masked one (Gong et al. 2024, "Scaling diffusion language
# models via adaptation from autoregressive models", arXiv:2410.17891): the body, text and
# positions carry over; the code embedding (the masked model's has a [MASK] row) and a drawn-mask
# input (code_input="mask", which the masked model has no use for) are left out, and a code
# embedding the folder lacks starts fresh. These fields may differ then.
ADAPT_FIELDS = ("objective", "layouts", "code_input")
ADAPT_LEAVE_OUT = ("image_emb.", "mask_in.", "code_mask")
# The folder's conditioning embedding, left out where the model has none or another shape
COND_TENSORS = ("cond_",)


def _init_from(model: Transformer, cfg: TrainTransformerConfig) -> None:
    """Copy `cfg.init_from`'s weights into `model` (`checkpoint.init_from_folder`), after checking
    that its config is `cfg.model` but for the conditioning embedding's fields, or, for a masked
    model started from an autoregressive one, but for `ADAPT_FIELDS` too: ConfigError naming the
    fields that differ, or what the folder lacks. The folder's tensors under `COND_TENSORS` (and
    `ADAPT_LEAVE_OUT` when adapting) that the model lacks or holds in another shape are left out;
    both lists are logged."""
    key = "config key 'init_from'"
    try:
        src = read_component_config(cfg.init_from, COMPONENT, TransformerConfig)
    except (FileNotFoundError, ValueError) as e:
        missing = not Path(cfg.init_from).exists()
        hint = " (no such folder: train it first, or init_from='' to start anew)" if missing else ""
        raise ConfigError(f"{key}: {e}{hint}") from None
    adapt = cfg.model.masked and not src.masked
    free = ("dropout", "attn_impl") + (ADAPT_FIELDS if adapt else ())
    # the conditioning embedding, and how the run trains and computes (not what the model is);
    # the tokenizer and VQ it was trained on must be this run's, where both sides record them
    ours, theirs = dataclasses.asdict(cfg.model), dataclasses.asdict(src)
    differ = [f"{k}: {theirs[k]!r} there, {ours[k]!r} here" for k in ours
              if theirs[k] != ours[k] and not k.startswith("cond") and k not in free
              and not (k in TRAINED_ON and not (theirs[k] and ours[k]))]  # fmt: skip
    if differ:
        also = f", an autoregressive model's {', '.join(ADAPT_FIELDS)}" if adapt else ""
        raise ConfigError(f"{key}: {cfg.init_from} holds another model ({'; '.join(differ)}); "
                          f"only the conditioning embedding (cond_*), dropout and attn_impl{also} "
                          "may differ")  # fmt: skip
    leave_out = COND_TENSORS + (ADAPT_LEAVE_OUT if adapt else ())
    try:
        fresh, dropped = init_from_folder(model, cfg.init_from, COMPONENT, leave_out)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    log.info("transformer: started from %s; fresh: %s; left out: %s", cfg.init_from,
             ", ".join(fresh) or "none", ", ".join(dropped) or "none")  # fmt: skip


def _resolve_code_features(cfg: TrainTransformerConfig) -> tuple[torch.Tensor, ...] | None:
    """model.code_features: the VQ's per-code pixels, its width filled in for -1, and for
    model.code_input=mask the VQ's drawn masks: the arguments of `set_code_features`."""
    if not cfg.model.code_features:
        return None
    if not cfg.vq:
        raise ConfigError("config key 'model.code_features': needs the `vq` folder")
    from dalle_ar.models.vq import VQTokenizer

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
    """Run the recipe on `source` (default: the config's shards); returns the final metrics,
    the same on every rank. Raises ConfigError / FileNotFoundError for missing folders and what
    `loop.fit` raises."""
    task, info = build(cfg, source, init=not resume)
    return fit(cfg, task, info, resume)


def build(
    cfg: TrainTransformerConfig, source: BatchSource | None = None, init: bool = True
) -> tuple[Task, dist.DistInfo]:
    """The recipe's `Task` (model, optimizer, loss, batches, evaluation, pictures) and process
    info, seeded, ready for `loop.fit`. `init`: start from `init_from`'s weights (a resume
    loads its checkpoint instead); ConfigError for a folder of another model."""
    info = setup(cfg)  # the same initial weights on every rank
    # After seeding, as before the shared loop (reading the VQ draws from the global generator),
    # and before the loop saves the config: the width is known by then.
    feats = _resolve_code_features(cfg)
    if source is None:
        source = ShardBatches(cfg, info)
        if cfg.model.takes_cond and not cfg.model.cond_clip:  # saved with the model
            cfg.model.cond_clip = source.cond_clip()
        # what it is trained on, saved with the model: a pipeline refuses other ones
        tok_sha, vq_sha = source.trained_on()
        cfg.model.text_tokenizer_sha256 = cfg.model.text_tokenizer_sha256 or tok_sha
        cfg.model.vq_sha256 = cfg.model.vq_sha256 or vq_sha
    model = Transformer(cfg.model).to(info.device)
    if cfg.init_from and init:  # before wrapping: every rank starts from the same weights
        _init_from(model, cfg)
    if feats is not None:  # after: this run's VQ describes the codes
        model.set_code_features(*feats)
    model.grad_checkpointing = cfg.activation_checkpointing
    if cfg.freeze_body:  # before wrapping: DDP and the optimizer see only what is trained
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(t) for t in COND_TENSORS))
    wrapped = dist.wrap_model(model, info, cfg.parallel, blocks=model.blocks)
    # fused AdamW: one kernel for all tensors (sharded FSDP parameters take the plain loop)
    opt = build_optimizer(wrapped, cfg.optim, fused=not dist.is_fsdp(wrapped))
    if info.is_main:
        log.info(
            "transformer: %.2fM parameters, layouts %s, attention %s, %d process(es)",
            model.num_params() / 1e6,
            cfg.model.layout_kinds(),
            model.backend.name,
            info.world,
        )
    B = cfg.data.batch_size
    # torch.compile (inductor) fuses the elementwise work around the matrix products; the
    # parameters stay the module's, so checkpoints and the saved folder are unchanged
    forward = torch.compile(wrapped) if cfg.run.compile else wrapped

    def loss(batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = {**batch, "empty_ids": source.empty_ids, "empty_len": source.empty_len}
        drop, null_rows = _drop_mask(cfg, micro, B, info)
        count = None
        if info.distributed and cfg.model.has_text:  # text positions of the global batch
            idx = torch.arange(1, batch["text"].shape[1], device=info.device)
            lens = torch.where(drop.to(info.device), source.empty_len, batch["text_lens"])
            count = dist.all_reduce_sum((idx[None] < lens[:, None]).sum()) / info.world
        masks = None
        if cfg.model.masked:  # one draw for the global batch, sliced by rank
            g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + micro + 2**40)
            masks = mask_codes(batch["image"], cfg.model.mask_id, g, info.rank, info.world)
        return _loss(forward, batch, cfg, info, drop, count, null_rows, masks)

    def pictures(step: int) -> tuple[Path, str]:
        path = Path(cfg.run.out_dir) / "samples" / f"step_{step:07d}.png"
        sample_grid(model, source, cfg, path, seed=cfg.run.seed)
        return path, " | ".join(cfg.sample_prompts)

    # FSDP: rank 0 alone cannot run a sharded model; sample from the saved folder instead
    can_draw = bool(cfg.vq and cfg.text_tokenizer and cfg.sample_prompts)
    # A masked generator is a transformer folder too, written to out_dir/masked.
    name = "masked" if cfg.model.masked else COMPONENT
    task = Task(
        name, wrapped, cfg.model, opt, loss, source.train,
        evaluate=lambda final: evaluate(wrapped, source, cfg, info),
        pictures=pictures if can_draw and not dist.is_fsdp(wrapped) else None,
        save=lambda full, folder: save_pretrained(full, cfg.model, folder, COMPONENT),
        precision=precision_name(info.device, cfg.run.precision, cpu_auto=True),
    )  # fmt: skip
    return task, info


def _report(metrics: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        TrainTransformerConfig, train, argv, "dalle-ar train transformer", __doc__,
        "configs/<data>/transformer.yaml", _report,
    )  # fmt: skip
