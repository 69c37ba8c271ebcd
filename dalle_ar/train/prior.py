"""Recipe: train the DALL-E 2 diffusion prior (`dalle_ar.models.prior`) on CLIP embedding pairs.

    dalle-ar train prior --config configs/shapes/prior.yaml [--resume] [key=value ...]
    torchrun --nproc_per_node=N -m dalle_ar.cli train prior --config ...   (DDP)

Data: token shards whose records carry the CLIP image and text embeddings of each pair
(`KEY.clip_img.npy`, `KEY.clip_txt.npy`: `dalle_ar.data.tokens.pretokenize(..., clip=CLIP)`).
The CLIP folder `clip` is the one those embeddings came from: its identity is recorded in the
prior's config and checked against the shards' `*-tokens.json` "clip" entry where there is one.

At the start the first `stats_samples` training records give the per-dimension mean and std of
the image embeddings, stored in the model (it works in that normalised space). Loss (Ramesh et
al. 2022, section 2.1): the mean squared error between the predicted and the true normalised
image embedding x0, at uniform timesteps, the noise added by the DDPM schedule; with probability
`cond_drop` the text embedding is replaced by zeros (classifier-free guidance). The loop
(`dalle_ar.train.loop`) does the rest and writes into `run.out_dir`: `config.yaml`, `ckpt/last`,
`train_log.jsonl`, `metrics.json` (held-out, over at most `eval_records` records: `prior_cosine`,
the mean cosine between the embedding sampled at the default `PriorSampling` and the record's
true image embedding; the baselines `text_cosine`, the caption's text embedding taken as the
image embedding, and `random_cosine`, a random training image embedding; `prior_cosine_margin`
= prior_cosine - text_cosine) and `prior/`, the component folder
(`dalle_ar.models.prior.DiffusionPrior.from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dalle_ar.config import DataConfig, require
from dalle_ar.data.tokens import clip_embeddings, make_token_loader, token_summaries
from dalle_ar.identity import CLIPIdentity
from dalle_ar.models.prior import DiffusionPrior, PriorConfig, read_config, train_scheduler
from dalle_ar.runtime import autocast_context, precision_name
from dalle_ar.sampling.diffusion import sample_prior
from dalle_ar.sampling.settings import PriorSampling
from dalle_ar.train import dist
from dalle_ar.train.common import (
    build_optimizer,
    last_checkpoint,
    run_recipe,
    training_batches,
)
from dalle_ar.train.loop import LoopConfig, Task, fit, setup

log = logging.getLogger(__name__)
COMPONENT = "prior"
STD_FLOOR = 1e-3  # a dimension the data never moves is not blown up by the normalisation


@dataclasses.dataclass
class PriorRecipeConfig(LoopConfig):  # optim, run, lr_follows_time, max_bad_steps, halt_after
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # token shards
    model: PriorConfig = dataclasses.field(default_factory=PriorConfig)
    clip: str = ""  # the CLIP folder whose embeddings the shards carry (`dalle-ar train clip`)
    cond_drop: float = 0.1  # fraction of text embeddings replaced by zeros (guidance)
    stats_samples: int = 10000  # training records read once for the embeddings' mean and std
    eval_records: int = 1000  # held-out records per evaluation (0 = all)

    def validate(self) -> None:
        super().validate()
        require(not self.run.compile, "run.compile", "is for the transformer recipe, got true")
        require(bool(self.data.train), "data.train", "must name the training shards, got ''")
        require(bool(self.clip), "clip", "must name the CLIP folder the embeddings came from")
        require(0 <= self.cond_drop < 1, "cond_drop", f"must be in [0, 1), got {self.cond_drop}")
        require(self.stats_samples >= 2, "stats_samples", "must be >= 2")
        require(self.eval_records >= 0, "eval_records", "must be >= 0")


class EmbeddingPairs:
    """A `loop.Source` of {"img": (B, D), "txt": (B, D)} float32 unit CLIP embeddings from the
    recipe's token shards; under DDP each rank reads its part of the shards."""

    def __init__(self, cfg: PriorRecipeConfig) -> None:
        self.data, self.seed, self.dim = cfg.data, cfg.run.seed, cfg.model.embed_dim

    def _batches(self, urls: str, train: bool) -> Iterator[dict[str, torch.Tensor]]:
        d = self.data
        loader = make_token_loader(urls, d.batch_size, train=train, shuffle_buffer=d.shuffle_buffer,
                                   num_workers=d.num_workers, seed=self.seed)  # fmt: skip
        for raw in training_batches(loader, urls) if train else loader:
            yield {k: clip_embeddings(raw, f"clip_{k}", self.dim, urls) for k in ("img", "txt")}

    def train(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        return itertools.islice(self._batches(self.data.train, True), skip, None)

    def eval(self) -> Iterable[dict[str, torch.Tensor]] | None:
        return self._batches(self.data.eval, False) if self.data.eval else None

    def first(self, n: int) -> torch.Tensor:
        """This rank's first n training image embeddings (n, D) in the shards' order. ValueError
        on every rank when any rank's shards hold no record (`dist.raise_together`)."""
        out, have, error = [], 0, None
        try:
            for batch in self._batches(self.data.train, False):
                out.append(batch["img"][: n - have])
                have += len(out[-1])
                if have >= n:
                    break
            if not out:
                raise ValueError(f"the training shards {self.data.train} hold no record")
        except (ValueError, OSError) as e:
            error = e
        dist.raise_together(error)
        return torch.cat(out)


def embedding_stats(
    embeds: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std (D,) of (n, D) embeddings over every rank's rows (summed on
    `device`, the process group's), on the CPU; the std floored at STD_FLOOR."""
    e = embeds.double()
    sums = torch.cat([e.sum(0), (e * e).sum(0), torch.tensor([float(len(e))], dtype=e.dtype)])
    sums = dist.all_reduce_sum(sums.to(device)).cpu()
    d = e.shape[1]
    n = sums[-1]
    mean = sums[:d] / n
    var = (sums[d : 2 * d] / n - mean * mean).clamp(min=0) * n / (n - 1).clamp(min=1)
    return mean.float(), var.sqrt().clamp(min=STD_FLOOR).float()


def clip_identity(cfg: PriorRecipeConfig, resume: bool = True) -> dict[str, Any]:
    """The identity of the CLIP folder `cfg.clip` (`CLIP.identity()`), checked against the model
    size, a CLIP already named in `cfg.model.clip`, the shards' `*-tokens.json` and, when
    resuming, the checkpoint. ValueError naming both sides for any mismatch."""
    from dalle_ar.models.clip import CLIP

    ident = CLIP.from_pretrained(cfg.clip).identity()
    mine = CLIPIdentity.from_identity(ident)
    if mine.embed_dim != cfg.model.embed_dim:
        raise ValueError(f"the CLIP {cfg.clip} has embed_dim {mine.embed_dim}, model.embed_dim "
                         f"is {cfg.model.embed_dim}: expected equal")  # fmt: skip
    named = [("model.clip of the config", cfg.model.clip)]
    for summary in token_summaries(cfg.data.train, cfg.data.eval):
        found = json.loads(summary.read_text()).get("clip")
        if isinstance(found, dict):
            named.append((str(summary), CLIPIdentity.from_identity(found)))
    ckpt = last_checkpoint(cfg.run.out_dir) if resume else None
    if ckpt is not None:
        named.append((f"the checkpoint {ckpt}", read_config(ckpt).clip))
    for where, other in named:
        if other.config_sha256 and _key(other) != _key(mine):
            raise ValueError(
                f"{where} names another CLIP (config {other.config_sha256[:12]}, weights "
                f"{other.weights_sha256[:12]}) than {cfg.clip} (config "
                f"{mine.config_sha256[:12]}, weights {mine.weights_sha256[:12]})"
            )
    return ident


def _key(c: CLIPIdentity) -> tuple[str, str]:
    return c.config_sha256, c.weights_sha256


def diffusion_loss(
    model: torch.nn.Module,
    prior: DiffusionPrior,
    ddpm: DDPMScheduler,
    img: torch.Tensor,
    txt: torch.Tensor,
    cond_drop: float,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """The prior's loss on unit image and text embeddings (B, D): MSE between the predicted and
    the true normalised x0 at uniform timesteps, the noise added by `ddpm`; each text embedding
    replaced by zeros with probability `cond_drop`. `model`: `prior` as trained (maybe DDP-
    wrapped). The timesteps, noise and drops are drawn on the CPU from `generator` (default
    torch's global one) for the global batch (`world` ranks of B rows) and this `rank`'s rows
    taken (`dist.rank_rows`), so N processes draw what one process with the whole batch would."""
    x0 = prior.normalise(img)  # (B, D)
    b, dev = len(x0), x0.device
    n, rows = dist.rank_rows(b, rank, world)
    t = torch.randint(0, ddpm.config.num_train_timesteps, (n,), generator=generator)[rows]
    noise = torch.randn(n, x0.shape[1], generator=generator)[rows]
    keep = (torch.rand(n, generator=generator) >= cond_drop)[rows]
    t, noise, keep = t.to(dev), noise.to(dev, x0.dtype), keep.to(dev)
    x_t = ddpm.add_noise(x0, noise, t)
    text = txt * keep[:, None]  # dropped captions: zeros
    return F.mse_loss(model(x_t, t, text).float(), x0)


@torch.no_grad()
def evaluate(
    prior: DiffusionPrior,
    batches: Iterable[dict[str, torch.Tensor]],
    pool: torch.Tensor,
    max_records: int = 0,
    settings: PriorSampling | None = None,
) -> dict[str, float]:
    """Held-out cosines over the first `max_records` records of each rank (0 = all), summed over
    ranks: `prior_cosine` (sampled vs true image embedding; record i seeded with i), the
    baselines `text_cosine` (the text embedding as the image embedding) and `random_cosine` (a
    training image embedding of `pool` (M, D), drawn with a fixed seed), and
    `prior_cosine_margin`. ValueError when no rank held a record."""
    device = prior.net.clip_mean.device
    pick = torch.Generator().manual_seed(0)
    sums = torch.zeros(4, dtype=torch.float64)  # prior, text, random, count
    n = 0
    for batch in batches:
        img, txt = batch["img"], batch["txt"]
        if max_records:
            img, txt = img[: max_records - n], txt[: max_records - n]
        if not len(img):
            break
        seeds = list(range(n, n + len(img)))
        got = sample_prior(prior, txt.to(device), settings, seeds).cpu()
        rand = pool[torch.randint(len(pool), (len(img),), generator=pick)]
        for j, other in enumerate((got, txt, rand)):
            sums[j] += F.cosine_similarity(other.float(), img.float(), dim=-1).double().sum()
        sums[3] += len(img)
        n += len(img)
        if max_records and n >= max_records:
            break
    total = dist.all_reduce_sum(sums.to(device)).cpu()
    if total[3] == 0:
        raise ValueError("the held-out split held no record")
    out = {k: float(total[j] / total[3]) for j, k in
           enumerate(("prior_cosine", "text_cosine", "random_cosine"))}  # fmt: skip
    out["prior_cosine_margin"] = out["prior_cosine"] - out["text_cosine"]
    return out


def train(
    cfg: PriorRecipeConfig, source: EmbeddingPairs | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the recipe with a validated config on `source` (default: the config's shards);
    returns the final metrics (also metrics.json). Raises what `loop.fit` raises, and
    ValueError for a CLIP that is not the one of the shards or the checkpoint."""
    source = source or EmbeddingPairs(cfg)
    # the CLIP's identity is saved with the weights and in config.yaml
    clip = CLIPIdentity.from_identity(clip_identity(cfg, resume))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, clip=clip))
    info = setup(cfg)
    prior = DiffusionPrior(cfg.model)
    pool = source.first(cfg.stats_samples)
    prior.set_stats(
        *embedding_stats(pool, info.device)
    )  # a resumed run loads the same from its checkpoint
    prior.to(info.device).train()
    wrapped = dist.wrap_model(prior, info, "ddp")
    ddpm = train_scheduler(cfg.model)
    if info.is_main:
        log.info("prior: %d parameters, %s", sum(p.numel() for p in prior.parameters()),
                 info.device)  # fmt: skip

    def loss(batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + micro)
        with autocast_context(info.device, cfg.run.precision):
            value = diffusion_loss(wrapped, prior, ddpm, batch["img"], batch["txt"],
                                   cfg.cond_drop, g, info.rank, info.world)  # fmt: skip
        return value, {"mse": value.detach()}

    def evaluate_split(final: bool) -> dict[str, float]:
        batches = source.eval()
        if batches is None:
            return {}
        return evaluate(prior, batches, pool, cfg.eval_records)

    opt = build_optimizer(prior, cfg.optim, fused=not info.distributed)
    precision = precision_name(info.device, cfg.run.precision)
    task = Task(COMPONENT, wrapped, cfg.model, opt, loss, source.train, evaluate_split,
                precision=precision)  # fmt: skip
    return fit(cfg, task, info, resume)


def _report(m: dict[str, Any]) -> str:
    t = m["timing"]
    line = f"prior: {t['steps']} steps ({t['steps_per_s']:.2f} steps/s)"
    if "prior_cosine" in m:
        line += (f", held-out cosine to the true image embedding {m['prior_cosine']:.3f} (text "
                 f"embedding {m['text_cosine']:.3f}, random {m['random_cosine']:.3f})")  # fmt: skip
    return f"{line} -> {m.get('component', 'no component yet (halt_after)')}"


def main(argv: list[str]) -> int:
    return run_recipe(
        PriorRecipeConfig, train, argv, "dalle-ar train prior",
        "Train the DALL-E 2 diffusion prior (CLIP text -> image embedding).",
        "configs/shapes/prior.yaml", _report,
    )  # fmt: skip
