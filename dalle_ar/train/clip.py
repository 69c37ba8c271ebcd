"""Recipe: train CLIP (`dalle_ar.models.clip`: transformers' CLIPModel) on image-caption shards.

    dalle-ar train clip --config configs/shapes/clip.yaml [--resume] [key=value ...]
    torchrun --nproc_per_node=N -m dalle_ar.cli train clip --config ...   (DDP)

Loss: CLIP's symmetric InfoNCE over the global batch (`contrastive_loss`; under DDP every rank's
embeddings are gathered). The learned temperature starts at ln(1/0.07) and is clamped at ln(100).
The loop (`dalle_ar.train.loop`) does the rest and writes into `run.out_dir`: `config.yaml`,
`ckpt/last`, `train_log.jsonl`, `metrics.json` (held-out retrieval: text->image and image->text
top-1 / top-5 in batches of `retrieval_batch`; on shapes data, attribute binding both ways,
`attribute_binding` and `picture_binding`) and `clip/`, an ordinary Hugging Face CLIP folder
(`dalle_ar.models.clip.CLIP.from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from dalle_ar.checkpoint import atomic_dir
from dalle_ar.config import DataConfig, require
from dalle_ar.data.shapes import is_scene, rendered
from dalle_ar.models.clip import CLIP, LOGIT_SCALE_MAX, CLIPPair, CLIPSizes
from dalle_ar.models.vq import VQTokenizer
from dalle_ar.runtime import autocast_context, precision_name
from dalle_ar.text import TextTokenizer
from dalle_ar.train import dist
from dalle_ar.train.common import ShardImages, build_optimizer, run_recipe
from dalle_ar.train.loop import LoopConfig, Source, Task, fit, setup

log = logging.getLogger(__name__)
COMPONENT = "clip"


# The smallest scenes foil scenes are rendered at (`foil_scenes`, `count_foils`): below it two
# shapes can draw the same pixels, and a foil the same picture as its scene.
FOIL_MIN_SIZE = 21


@dataclasses.dataclass
class CLIPRecipeConfig(LoopConfig):  # optim, run, lr_follows_time, max_bad_steps, halt_after
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: CLIPSizes = dataclasses.field(default_factory=CLIPSizes)
    text_tokenizer: str = ""  # the project's tokenizer folder (`dalle-ar train tokenizer`)
    retrieval_batch: int = 100  # held-out retrieval is scored within batches of this many pairs
    eval_pairs: int = 1000  # held-out pairs per periodic evaluation (0 = all); the final reads all
    binding_images: int = 0  # shapes scenes for the final attribute-binding probe (0 = all)
    # hard-negative captions per shapes image (`shapes.hard_negative`, NegCLIP); 0 = none.
    # Without them CLIP learns a bag of words and scores a swapped relation as the true one.
    hard_negatives: int = 0
    # a VQ folder (`dalle-ar train vq`) and the share of training scenes CLIP sees through its
    # encode/decode round trip (`VQTokenizer.round_trip`) instead of as rendered: the reranker
    # scores decoded images, whose blur and code artefacts a CLIP of clean pictures never saw.
    # Which scenes is fixed by each one's key (a resumed run sees the same); 0 = none (and `vq`
    # is not read). The main job hands its own VQ to a config whose share is above 0.
    vq: str = ""
    vq_round_trip: float = 0.0
    # join each shapes scene of a batch by a foil scene (`shapes.foil_scene`: one attribute a
    # picture shows changed, seen colour-shape pairs only), rendered at data.image_size (>= 21) and
    # captioned, so a batch of B scenes trains on 2B pairs: the two pictures of each pair of
    # scenes are each other's hard negative, the contrast a reranker draws between candidates
    # that differ in one shape or colour (caption-side hard negatives alone train the other way)
    foil_scenes: bool = False
    # score each caption of a batch against a picture of its scene with one object drawn twice
    # (`shapes.count_foils`, rendered at data.image_size, round-tripped like the scenes) besides
    # the batch's pictures: the text->image contrast a reranker needs against a generator's
    # commonest seen-pair error, an extra object; a negative only (text->image), left out where
    # a caption of the rank's batch describes it
    count_foils: bool = False

    def validate(self) -> None:
        super().validate()
        require(not self.run.compile, "run.compile", "is for the transformer recipe, got true")
        require(bool(self.data.train), "data.train", "must name the training shards, got ''")
        require(bool(self.text_tokenizer), "text_tokenizer", "must name a tokenizer folder")
        require(self.retrieval_batch >= 5, "retrieval_batch", "must be >= 5 (top-5)")
        require(self.eval_pairs >= 0, "eval_pairs", "must be >= 0")
        require(self.binding_images >= 0, "binding_images", "must be >= 0")
        require(self.hard_negatives >= 0, "hard_negatives", "must be >= 0")
        require(0 <= self.vq_round_trip <= 1, "vq_round_trip", "must be in [0, 1]")
        size = self.data.image_size
        for key in ("foil_scenes", "count_foils"):
            require(not getattr(self, key) or size >= FOIL_MIN_SIZE, key,
                    f"renders scenes of >= {FOIL_MIN_SIZE} pixels, data.image_size is {size} "
                    f"(raise it, or {key}=false)")  # fmt: skip
        share = self.vq_round_trip
        require(bool(self.vq) or not share, "vq",
                f"must name a VQ folder for vq_round_trip={share}, got ''")  # fmt: skip


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    hard_embeds: torch.Tensor | None = None,
    hard_valid: torch.Tensor | None = None,
    foil_embeds: torch.Tensor | None = None,
    foil_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3) over the global batch, this rank's
    share of it (open_clip's `local_loss`).

    image_embeds, text_embeds: this rank's unit embeddings (B, D), row i of each a pair;
    logit_scale: the learned log inverse temperature (scalar), clamped here at ln(100). Every
    rank's embeddings are gathered with autograd (`dist.gather_with_grad`); this rank's images
    are scored against every caption and its captions against every image. The mean of the
    ranks' losses is one process's loss on the global batch, and DDP's mean of the ranks'
    gradients its gradient. Returns a float32 scalar: the mean of the image->text and
    text->image cross-entropies of this rank's rows.

    hard_embeds (M, D), hard_valid (M,) bool: hard-negative captions (NegCLIP, Yuksekgonul et
    al. 2023; M the same on every rank), gathered like the rest; every image is also scored
    against every valid one, as captions no image matches (image->text only).
    foil_embeds (K, D), foil_valid (K,) bool: pictures no caption describes (`count_foils`; K
    the same on every rank), gathered likewise; every caption is also scored against every
    valid one (text->image only). Each rank's `valid` flags, like the hard negatives', are
    checked against its own batch only.
    """
    img, txt = image_embeds.float(), text_embeds.float()
    all_img, all_txt = dist.gather_with_grad(img), dist.gather_with_grad(txt)
    scale = logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
    start = (tdist.get_rank() if tdist.is_initialized() else 0) * len(img)  # this rank's rows
    target = torch.arange(start, start + len(img), device=img.device)
    i2t, t2i = scale * img @ all_txt.T, scale * txt @ all_img.T  # (B, world * B) each

    def with_negatives(logits, rows, extra, valid):  # every rank's valid extra columns, gathered
        cols = dist.gather_with_grad(extra.float())
        keep = dist.gather_with_grad(valid.float()) > 0
        return torch.cat([logits, (scale * rows @ cols.T).masked_fill(~keep, float("-inf"))], 1)

    if hard_embeds is not None:
        i2t = with_negatives(i2t, img, hard_embeds, hard_valid)  # (B, world * (B + M))
    if foil_embeds is not None:
        t2i = with_negatives(t2i, txt, foil_embeds, foil_valid)  # (B, world * (B + K))
    return (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2


def retrieval(image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """Correct retrievals (summed, float64 scalars) within one batch of N pairs of unit
    embeddings (N, D): text->image and image->text, top-1 and top-5 (top-min(5, N))."""
    sim = text @ image.T  # (N texts, N images)
    k = min(5, len(sim))
    right = torch.arange(len(sim), device=sim.device)[:, None]
    out = {}
    for name, s in (("t2i", sim), ("i2t", sim.T)):
        top = s.topk(k, dim=1).indices
        out[f"{name}_top1"] = (top[:, :1] == right).any(1).double().sum()
        out[f"{name}_top5"] = (top == right).any(1).double().sum()
    return out


def round_trip_rows(keys: Iterable[str], share: float) -> list[int]:
    """The rows of a batch (by sample key) whose scene CLIP sees through the VQ round trip: each
    key's own draw, so a share of the training set always, the same on a resumed run."""
    return [i for i, k in enumerate(keys) if random.Random(f"vq-{k}").random() < share]


def with_foil_scenes(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """The batch {"image" (B, 3, S, S) in [0, 1], "caption", "meta", "key"} followed by one foil
    scene per sample (`shapes.foil_scene`, rendered at `size`, captioned like a training scene,
    key "KEY-foil"): 2B rows, row B + i the foil of row i. Each sample's draws come from a
    generator seeded by its key (a resumed run sees the same foils). ValueError naming the first
    sample that is not a shapes scene or has no foil."""
    from dalle_ar.data.shapes import caption, foil_scene

    captions, metas, keys = [], [], []
    for meta, key in zip(batch["meta"], batch["key"]):
        rng = random.Random(f"foil-{key}")
        foil = foil_scene(meta, rng) if is_scene(meta) else None
        if foil is None:
            raise ValueError(f"foil_scenes needs a shapes scene with a foil; sample {key!r} has "
                             f"none (metadata {str(meta)[:80]})")  # fmt: skip
        captions.append(caption(foil, rng))
        metas.append(foil)
        keys.append(f"{key}-foil")
    foils = rendered(metas, size).to(batch["image"])
    return {"image": torch.cat([batch["image"], foils]),
            "caption": [*batch["caption"], *captions], "meta": [*batch["meta"], *metas],
            "key": [*batch["key"], *keys]}  # fmt: skip


def _scenes_by_looks(metas: Iterable[Any]) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """spec -> the scenes among `metas` with its `shapes.object_attributes`: the only ones whose
    caption can be true of its picture or its caption of theirs (`shapes.describes`)."""
    from dalle_ar.data.shapes import object_attributes

    by: dict[tuple, list[dict[str, Any]]] = {}
    for m in filter(is_scene, metas):
        by.setdefault(object_attributes(m), []).append(m)
    return lambda spec: by.get(object_attributes(spec), [])


def count_foil_pictures(batch: dict[str, Any], size: int) -> tuple[torch.Tensor, list[bool]]:
    """One picture per sample of the batch {"image", "caption", "meta", "key"}: its scene with one
    object drawn twice (`shapes.count_foils`, one drawn by a generator seeded by the sample's
    key, so a resumed run sees the same), rendered at `size` as (B, 3, size, size) in [0, 1],
    and whether each is a negative: False for a sample without a shapes spec (its row is white)
    and for a picture a caption of the batch describes (`shapes.describes`: a one-object scene
    drawn twice is the picture of a two-object caption of two like objects)."""
    from dalle_ar.data.shapes import count_foils, describes

    metas = batch["meta"]
    by_looks = _scenes_by_looks(metas)
    foils = [random.Random(f"count-{k}").choice(count_foils(m)) if is_scene(m) else None
             for m, k in zip(metas, batch["key"])]  # fmt: skip
    valid = [f is not None and not any(describes(m, f) for m in by_looks(f)) for f in foils]
    blank = {"objects": []}
    return rendered([f or blank for f in foils], size).to(batch["image"]), valid


def hard_negatives(batch: dict[str, Any], per_sample: int = 1) -> list[str | None]:
    """`per_sample` hard-negative captions for each sample whose metadata is a shapes spec (None
    for the rest), (per_sample * B,) draw-major: draw d of sample i at d * B + i. Drawn from a
    generator seeded by the sample's key: a resumed run sees the same ones. A draw whose caption
    is true of a picture in the batch (`shapes.describes`: with foil scenes, a scene's hard
    negative is often its foil's own caption) is None too, as every picture is scored against
    every hard negative."""
    from dalle_ar.data.shapes import describes, hard_negative

    by_looks = _scenes_by_looks(batch["meta"])

    def true_of_one(foil: dict[str, Any]) -> bool:
        return any(describes(foil, m) for m in by_looks(foil))

    rngs = [random.Random(f"hard-{k}") for k in batch["key"]]
    out = []
    for _ in range(per_sample):
        out += [hard_negative(m, rng, true_of_one) if is_scene(m) else None
                for m, rng in zip(batch["meta"], rngs)]  # fmt: skip
    return out


@torch.no_grad()
def evaluate(
    clip: CLIP, batches: Iterable[dict[str, Any]], size: int, max_pairs: int = 0
) -> dict[str, float]:
    """Held-out retrieval in batches of `size` pairs (a last, smaller batch is left out), over
    the first `max_pairs` pairs of each rank (0 = all), summed over ranks: fractions right.
    ValueError when no rank held a whole batch."""
    was_training = clip.model.training
    clip.model.eval()
    sums: dict[str, torch.Tensor] = {}
    n, images, captions = 0, [], []
    for batch in batches:
        images.append(batch["image"])
        captions += batch["caption"]
        while len(captions) >= size and (max_pairs == 0 or n < max_pairs):
            x = torch.cat(images)
            img = clip.image_embeds(clip.pixels_from_tensor(x[:size].to(clip.device)))
            txt = clip.text_embeds(*clip.encode_text(captions[:size]))
            for k, v in retrieval(img, txt).items():
                sums[k] = sums.get(k, 0) + v.cpu()
            images, captions, n = [x[size:]], captions[size:], n + size
        if max_pairs and n >= max_pairs:
            break
    clip.model.train(was_training)
    names = ["t2i_top1", "t2i_top5", "i2t_top1", "i2t_top5"]
    counts = [float(sums.get(k, 0)) for k in names] + [n]
    total = dist.all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=clip.device))
    if total[-1] == 0:
        raise ValueError(f"the held-out split held no batch of {size} pairs")
    return {f"retrieval_{k}": float(total[i] / total[-1]) for i, k in enumerate(names)}


def _tally(
    verdicts: Iterable[tuple[bool, dict[str, bool]]],
    kinds: tuple[str, ...],
    prefix: str,
    device: torch.device,
    overall: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Fractions right from each scene's (held_out, {kind: right}), summed over ranks (counted
    on `device` for the reduction): `{prefix}_{split}` (every kind of `overall` at once, default
    every kind) and `{prefix}_{kind}_{split}` for split "seen" / "held_out"; a kind no scene had
    is left out."""
    keys = [f"{k}_{s}" for s in ("seen", "held_out") for k in ("all", *kinds)]
    right = torch.zeros(len(keys), dtype=torch.float64)
    total = torch.zeros(len(keys), dtype=torch.float64)
    for held_out, by_kind in verdicts:
        split = "held_out" if held_out else "seen"
        every = all(ok for k, ok in by_kind.items() if overall is None or k in overall)
        for kind, ok in (*by_kind.items(), ("all", every)):
            j = keys.index(f"{kind}_{split}")
            right[j] += ok
            total[j] += 1
    both = dist.all_reduce_sum(torch.cat([right, total]).to(device)).cpu()
    right, total = both[: len(keys)], both[len(keys) :]
    return {f"{prefix}_" + key.removeprefix("all_"): float(right[j] / total[j])
            for j, key in enumerate(keys) if total[j]}  # fmt: skip


def _scenes(batches: Iterable[dict[str, Any]], max_images: int) -> Iterator[tuple[dict, list[int]]]:
    """(batch, rows holding a shapes spec) over the first `max_images` such rows (0 = all)."""
    n = 0
    for batch in batches:
        if max_images and n >= max_images:
            return
        use = [i for i, m in enumerate(batch["meta"]) if is_scene(m)]
        use = use[: max_images - n] if max_images else use
        n += len(use)
        if use:
            yield batch, use


@torch.no_grad()
def attribute_binding(
    clip: CLIP, batches: Iterable[dict[str, Any]], max_images: int = 0
) -> dict[str, float]:
    """Attribute binding on shapes scenes (`dalle_ar.data.shapes.foils`): for each image whose
    metadata is a shapes spec, does its caption (`plain_caption`) score above every caption that
    differs from it in one attribute? Over the first `max_images` such images of each rank (0 =
    all), summed over ranks. Returns fractions right, JSON-able: `binding_{split}` (every kind
    at once) and `binding_{kind}_{split}` for split "seen" / "held_out" (scenes without / with a
    held-out colour-shape pair); {} when no image had a spec."""
    from dalle_ar.data.shapes import FOIL_KINDS, foils, plain_caption

    was_training = clip.model.training
    clip.model.eval()
    verdicts = []
    for batch, use in _scenes(batches, max_images):
        img = clip.image_embeds(clip.pixels_from_tensor(batch["image"][use].to(clip.device)))
        cases = [(batch["meta"][i], foils(batch["meta"][i])) for i in use]
        texts = [plain_caption(spec) for spec, _ in cases]
        texts += [plain_caption(f) for _, by_kind in cases for k in FOIL_KINDS for f in by_kind[k]]
        txt = clip.text_embeds(*clip.encode_text(texts, longest=True))
        at = len(cases)
        for row, (spec, by_kind) in enumerate(cases):
            true, ok = img[row] @ txt[row], {}
            for kind in FOIL_KINDS:
                if by_kind[kind]:
                    ok[kind] = bool(true > (txt[at : at + len(by_kind[kind])] @ img[row]).max())
                    at += len(by_kind[kind])
            verdicts.append((bool(spec["held_out"]), ok))
    clip.model.train(was_training)
    return _tally(verdicts, FOIL_KINDS, "binding", clip.device)


@torch.no_grad()
def picture_binding(
    clip: CLIP,
    batches: Iterable[dict[str, Any]],
    max_images: int = 0,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Attribute binding the other way, the choice a reranker makes: for each shapes scene, does
    its caption (`plain_caption`) score its own picture above every picture of a scene that
    differs from it in one attribute a picture shows (`shapes.foils` of `IMAGE_FOIL_KINDS`) or
    draws one of its objects twice (kind "count", `shapes.count_foils`), rendered at the batch's
    image size (the count kind reported on its own, `picture_binding_count_{split}`, and not
    in `picture_binding_{split}`)? `transform` maps chunks of foil pictures (N, 3, S, S) in
    [0, 1] as the batches' own pictures were (a VQ round trip, say). Over the first `max_images`
    scenes of each rank (0 = all), summed over ranks: `picture_binding_{split}` and
    `picture_binding_{kind}_{split}`, as `attribute_binding`."""
    from dalle_ar.data.shapes import (
        IMAGE_FOIL_KINDS,
        PICTURE_FOIL_KINDS,
        count_foils,
        foils,
        plain_caption,
    )

    was_training = clip.model.training
    clip.model.eval()
    verdicts = []
    for batch, use in _scenes(batches, max_images):
        size = batch["image"].shape[-1]
        specs = [batch["meta"][i] for i in use]
        by_scene = [{k: v for k, v in foils(spec).items() if k in IMAGE_FOIL_KINDS and v}
                    | {"count": count_foils(spec)} for spec in specs]  # fmt: skip
        pictures = rendered([f for by_kind in by_scene for v in by_kind.values() for f in v], size)
        if transform is not None:
            pictures = torch.cat([transform(p) for p in pictures.split(256)])
        pictures = torch.cat([batch["image"][use], pictures])
        img = torch.cat([clip.image_embeds(clip.pixels_from_tensor(p.to(clip.device)))
                         for p in pictures.split(256)])  # fmt: skip
        txt = clip.text_embeds(*clip.encode_text([plain_caption(s) for s in specs], longest=True))
        at = len(specs)
        for row, (spec, by_kind) in enumerate(zip(specs, by_scene)):
            true, ok = img[row] @ txt[row], {}
            for kind, v in by_kind.items():
                ok[kind] = bool(true > (img[at : at + len(v)] @ txt[row]).max())
                at += len(v)
            verdicts.append((bool(spec["held_out"]), ok))
    clip.model.train(was_training)
    return _tally(verdicts, PICTURE_FOIL_KINDS, "picture_binding", clip.device, IMAGE_FOIL_KINDS)


def train(
    cfg: CLIPRecipeConfig, source: Source | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the recipe with a validated config on `source` (default: the config's shards);
    returns the final metrics (also metrics.json). Raises what `loop.fit` raises."""
    source = source or ShardImages(cfg)
    info = setup(cfg)
    tok = TextTokenizer.from_pretrained(cfg.text_tokenizer)
    clip = CLIP.build(cfg.model, tok, seed=cfg.run.seed)
    clip.model.to(info.device).train()
    pair = CLIPPair(clip.model, clip.eos_id)
    vq = None
    if cfg.vq_round_trip:
        vq = VQTokenizer.from_pretrained(cfg.vq, info.device)
        f = vq.config.downsample
        require(cfg.data.image_size % f == 0, "vq", f"codes {f}-pixel blocks, and "
                f"data.image_size {cfg.data.image_size} is not a multiple of {f}")  # fmt: skip
    wrapped = dist.wrap_model(pair, info, "ddp")
    if info.is_main:
        log.info("clip: %d parameters, %s", sum(p.numel() for p in pair.parameters()), info.device)

    def loss(batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if cfg.foil_scenes:
            batch = with_foil_scenes(batch, cfg.data.image_size)
        captions, n = list(batch["caption"]), len(batch["caption"])
        if cfg.hard_negatives:
            hard = hard_negatives(batch, cfg.hard_negatives)
            captions += [h or "" for h in hard]  # a row without one: masked out of the loss
        ids, mask = clip.encode_text(captions, truncate=True, longest=True)
        cut = torch.tensor(float(clip.too_long), device=info.device)
        images, keys = batch["image"].to(info.device), list(batch["key"])
        if cfg.count_foils:
            foils, foil_valid = count_foil_pictures(batch, cfg.data.image_size)
            images, keys = (
                torch.cat([images, foils.to(info.device)]),
                keys + [f"{k}-count" for k in keys],
            )
        if vq is not None and (rows := round_trip_rows(keys, cfg.vq_round_trip)):
            images = images.clone()  # the batch's own tensor stays as the loader gave it
            images[rows] = vq.round_trip(images[rows])
        pixels = clip.pixels_from_tensor(images)
        with autocast_context(info.device, cfg.run.precision):
            img, txt, scale = wrapped(ids.to(info.device), mask.to(info.device), pixels)
        extra: dict[str, torch.Tensor] = {}
        if cfg.hard_negatives:
            valid = torch.tensor([h is not None for h in hard], device=img.device)
            extra |= {"hard_embeds": txt[n:], "hard_valid": valid}
        if cfg.count_foils:
            valid = torch.tensor(foil_valid, device=img.device)
            extra |= {"foil_embeds": img[n:], "foil_valid": valid}
        value = contrastive_loss(img[:n], txt[:n], scale, **extra)
        inverse_t = scale.detach().clamp(max=LOGIT_SCALE_MAX).exp()
        # captions_cut: over-long captions cut to the CLIP's text_len
        return value, {"contrastive": value.detach(), "inverse_temperature": inverse_t,
                       "captions_cut": cut}  # fmt: skip

    def evaluate_split(final: bool) -> dict[str, float]:
        batches = source.eval()
        if batches is None:
            return {}
        out = evaluate(clip, batches, cfg.retrieval_batch, 0 if final else cfg.eval_pairs)
        if final:
            out |= attribute_binding(clip, source.eval(), cfg.binding_images)
            out |= picture_binding(clip, source.eval(), cfg.binding_images)
        return out

    def save(full: CLIPPair, folder: Path) -> None:
        with atomic_dir(folder) as tmp:
            CLIP(full.clip, tok.hf, clip.processor).save_pretrained(tmp)

    opt = build_optimizer(pair, cfg.optim)
    precision = precision_name(info.device, cfg.run.precision)
    task = Task(COMPONENT, wrapped, cfg.model, opt, loss, source.train, evaluate_split,
                save=save, precision=precision)  # fmt: skip
    return fit(cfg, task, info, resume)


def _report(m: dict[str, Any]) -> str:
    t = m["timing"]
    line = f"clip: {t['steps']} steps ({t['steps_per_s']:.2f} steps/s)"
    if "retrieval_t2i_top1" in m:
        line += (f", held-out text->image top-1 {m['retrieval_t2i_top1']:.1%}, "
                 f"image->text top-1 {m['retrieval_i2t_top1']:.1%}")  # fmt: skip
    if "binding_held_out" in m:
        line += (f", attribute binding {m.get('binding_seen', 0):.1%} seen / "
                 f"{m['binding_held_out']:.1%} held-out")  # fmt: skip
    return f"{line} -> {m.get('component', 'no component yet (halt_after)')}"


def main(argv: list[str]) -> int:
    return run_recipe(
        CLIPRecipeConfig, train, argv, "dalle-ar train clip", "Train CLIP (CLIPModel).",
        "configs/shapes/clip.yaml", _report,
    )  # fmt: skip
