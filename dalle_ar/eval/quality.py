"""Image quality of a pipeline on any data set, in every generation mode (`dalle-ar eval`).

On the first N (image, caption) pairs of evaluation shards (img2dataset layout):

- bits per image token: the transformer's cross-entropy of the VQ codes of each real image given
  its caption (the image term of the training loss, `sampling.image_log_likelihood`), in bits;
  no guidance, no dropout; a transformer that reads a CLIP image embedding reads its null one.
- the VQ's reconstructions: PSNR and SSIM against the images (`metrics.image_metrics`).
- per set of N images (each mode's single draws, and its best of K by CLIP, and by PMI in the
  autoregressive mode, reranked by the pipeline itself; the real images and the VQ's
  reconstructions as references): CLIP score, CLIP R-precision, the Frechet distance on the
  CLIP image tower's embeddings to the real evaluation images ("CLIP-feature FD, not Inception
  FID"), and the cosine to the nearest training image with the share of near-copies.
- on shapes shards (their info.json says kind "shapes"), the shape checker's prompt fidelity in
  every mode, as the main job scores it (`shapes_fidelity`, which `jobs.shapes.evaluate` calls).

Every figure uses the pipeline's own CLIP: it compares pipelines that share one CLIP, never
figures measured with another. It sits with the commands, above the pipelines: it reads a
pipeline's components and modes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dalle_ar.data.loader import checked_urls, make_loader
from dalle_ar.data.shards import iter_captions
from dalle_ar.eval.fidelity import best_by, evaluate_fidelity, first_candidates
from dalle_ar.eval.metrics import (
    distractor_pools,
    frechet_distances,
    image_metrics,
    nearest_cosine,
    r_precision,
)
from dalle_ar.grid import to_uint8
from dalle_ar.models.clip import CLIPImageFeatures, clip_score
from dalle_ar.pipelines.ar import MODE_SECTIONS, MODES, ARPipeline
from dalle_ar.pipelines.compat import image_size
from dalle_ar.sampling.ar import image_log_likelihood
from dalle_ar.sampling.settings import (
    names,
    resolve,
)

R_PRECISION_POOL = 100  # captions per R-precision query: its own and 99 others (Park et al. 2021)
NEAR_COPY_QUANTILE = 0.99  # near-copy threshold: this quantile of real images' nearest cosines
FD_KEY = "clip_feature_fd_not_inception_fid"
# What each mode reranks by: CLIP in every mode, the transformer's PMI in the autoregressive one.
MODE_RERANKERS = {"ar": ("clip", "pmi"), "prior": ("clip",), "masked": ("clip",)}
# the settings sections the evaluation resolves: every mode's and the cascade's
SECTION_CLASSES = {k: ARPipeline.settings[k] for k in (*MODES, "upsample")}


def mode_settings(pipe: Any, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each mode's full sampling keywords, {"ar": {...}, "prior": {...}, "masked": {...},
    "upsample": {...}}, from the pipeline folder's defaults and `settings`: a field of any
    settings class (`temperature=0.7`, `prior_steps=25`, `steps=12`, `rerank_weight=0.4`; None
    keeps the default) applies to every mode that takes it (the masked mode takes the shared
    temperature, top_k and guidance_scale), and a mode's name with a dict (`masked={"temperature":
    1.0}`) sets that mode's own, over the shared ones. ValueError for an unknown name or an
    impossible value."""
    given = {k: v for k, v in settings.items() if k not in MODES and v is not None}
    own = {m: dict(settings.get(m) or {}) for m in MODES}
    rerank_weight = ("rerank_weight",)
    known = {n for c in SECTION_CLASSES.values() for n in names(c)} | set(rerank_weight)
    for where, keys in [("settings", given), *((f"{m} settings", own[m]) for m in MODES)]:
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"unknown sampling {where} {unknown}; known: {sorted(known)}")

    def section(name: str, mode: str | None) -> dict[str, Any]:
        cls = SECTION_CLASSES[name]
        over = {**given, **(own[mode] if mode else {})}
        picked = {k: v for k, v in over.items() if k in names(cls) and v is not None}
        return dataclasses.asdict(resolve(pipe.defaults[name], **picked))

    out: dict[str, dict[str, Any]] = {}
    for mode, sections in MODE_SECTIONS.items():
        out[mode] = {k: v for s in sections for k, v in section(s, mode).items()}
        if mode != "masked":  # PMI reranking's weight; the masked mode's job sets none
            weight = {**given, **own[mode]}.get("rerank_weight")
            out[mode]["rerank_weight"] = resolve(pipe.defaults["rerank"],
                                                 rerank_weight=weight).rerank_weight  # fmt: skip
    out["upsample"] = section("upsample", None)
    return out


def pipeline_modes(pipe: Any, modes: Sequence[str] | None = None) -> list[str]:
    """`modes` checked against the pipeline (default: every mode it has: "ar", and "prior" and
    "masked" where it holds their components). ValueError naming an unknown mode or one whose
    component the pipeline lacks."""
    has = list(pipe.modes)
    if modes is None:
        return has
    modes = list(dict.fromkeys(modes))
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
        if m not in has:
            raise ValueError(f"mode {m!r} needs the {m} component, which this pipeline lacks "
                             f"(its modes: {', '.join(has)})")  # fmt: skip
    if not modes:
        raise ValueError("expected at least one mode, got none")
    return modes


def shapes_fidelity(
    pipe: Any,
    num_prompts: int,
    seed: int = 0,
    *,
    settings: dict[str, dict[str, Any]],
    candidates: int = 1,
    modes: Sequence[str] | None = None,
    composed: bool = False,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """The main job's prompt fidelity on the shapes (`evaluate_fidelity`, one sample per
    evaluation prompt, the same prompts and seeds in every run): in the ar mode, single draws
    without and with guidance, then the best of `candidates` by PMI, and by CLIP and by both
    when the pipeline holds one; in the prior mode at its guidance, single and best of the
    candidates by CLIP ("prior_mode"); in the masked mode the same by CLIP, or PMI without one
    ("masked_mode"); with an upsampler, the guided single draws again, upsampled ("upsampled").
    Each part's exact-match summary is also in report["summary"]. `settings`: `mode_settings`."""
    modes = pipeline_modes(pipe, modes)
    clip = "clip" in pipe.components
    run = dict(num_prompts=num_prompts, seed=seed, batch_size=batch_size, progress=progress)
    ar = dict(settings["ar"])
    guidance = ar.pop("guidance_scale")
    report: dict[str, Any] = {"summary": {}}
    if "ar" in modes:
        report = evaluate_fidelity(pipe, guidance_scales=(1.0, guidance), composed=composed,
                                   candidates=candidates, rerankers=pipe.rerankers,
                                   **run, **ar)  # fmt: skip
    for mode in ("prior", "masked"):
        if mode not in modes:
            continue
        own = dict(settings[mode])
        scale = own.pop("guidance_scale")
        part = evaluate_fidelity(pipe, guidance_scales=(scale,), candidates=candidates,
                                 rerankers=("clip",) if clip else ("pmi",), mode=mode, **run,
                                 **own)  # fmt: skip
        report[f"{mode}_mode"] = part
        report["summary"].update({f"{mode} mode {k}": v for k, v in part["summary"].items()})
    if "upsampler" in pipe.components and "ar" in modes:  # the guided single draws, upsampled
        up = evaluate_fidelity(pipe, guidance_scales=(guidance,), upsample=True, **run, **ar,
                               **settings["upsample"])  # fmt: skip
        report["upsampled"] = up
        name = f"guidance {guidance:g} upsampled"
        report["summary"][name] = up["summary"][name]
    return report


def check_quality_args(
    eval_shards: str,
    train_shards: str | None,
    num_prompts: int,
    candidates: int,
    inception_weights: str | None = None,
) -> None:
    """What `evaluate_quality` can check before a pipeline is loaded: ValueError for shards that
    are missing, num_prompts or candidates < 1, and Inception weights that are not a file, hold
    more than tensors (they are first read here with `torch.load(weights_only=True)`: whatever
    torch-fidelity's own loading does, no pickle's code runs), or
    come without torch-fidelity installed."""
    if num_prompts < 1:
        raise ValueError(f"the number of evaluation images must be >= 1, got {num_prompts}")
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    for what, urls in (("evaluation", eval_shards), ("training", train_shards)):
        if urls is not None:
            try:
                checked_urls(urls, 1, 1, 0, 0, None)
            except ValueError as e:
                raise ValueError(f"{what} shards: {e}") from None
    if inception_weights is not None:
        if not Path(inception_weights).is_file():
            raise ValueError(f"Inception weights: no file {inception_weights}")
        try:
            torch.load(inception_weights, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch raise many types
            raise ValueError(f"Inception weights {inception_weights}: not a plain state dict of "
                             f"tensors ({type(e).__name__})") from None  # fmt: skip
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ValueError("Inception FID needs torch-fidelity (pip install torch-fidelity), "
                             "whose Inception v3 reads the weights")  # fmt: skip


def data_kind(urls: str) -> str | None:
    """The data set kind (`dalle-ar data KIND`: "shapes", "emoji", "folder") that the info.json
    beside the shards records, or None where there is none."""
    first = next(iter(checked_urls(urls, 1, 1, 0, 0, None)), "")
    info = Path(first).parent / "info.json"
    try:
        return json.loads(info.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


@torch.inference_mode()
def bits_per_image_token(
    pipe: Any, images: torch.Tensor, captions: Sequence[str], batch_size: int = 32
) -> float:
    """The transformer's cross-entropy of the VQ codes of images (N, 3, H, W) in [0, 1] given
    their captions, in bits per image token: minus the teacher-forced log-likelihood the PMI
    reranker reads (`sampling.image_log_likelihood`, the image term of the training loss),
    without caption dropout or guidance, averaged over every code. ValueError for no images or
    as many captions as images."""
    if len(images) != len(captions) or not len(captions):
        raise ValueError(f"expected as many captions as images (at least one), got "
                         f"{len(captions)} and {len(images)}")  # fmt: skip
    model, vq, tok = pipe.transformer, pipe.vq, pipe.tokenizer
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for s in range(0, len(captions), batch_size):
        codes = vq.encode(images[s : s + batch_size].to(pipe.device))  # (B, h, w)
        text = tok.encode(list(captions[s : s + batch_size]))
        ids, lens = text.ids.to(codes.device), text.mask.sum(1).to(codes.device)
        # an embedding-conditioned transformer reads its null embedding: text mode
        cond = model.null_cond(len(codes)) if model.cfg.takes_cond else None
        if not model.cfg.has_text:
            ids, lens = ids[:, :0], None
        nats -= float(image_log_likelihood(model, ids, codes, text_lens=lens, cond=cond).sum())
        count += codes.numel()
    model.train(was_training)
    return nats / count / math.log(2)


def _read_eval(urls: str, size: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n records' images (n, 3, size, size) in [0, 1] and captions, in shard order."""
    images, captions = [], []
    for batch in make_loader(urls, size, min(n, 256), train=False):
        images.append(batch["image"])
        captions += batch["caption"]
        if len(captions) >= n:
            break
    if len(captions) < 2:
        raise ValueError(f"{urls}: the figures need at least 2 evaluation records, found "
                         f"{len(captions)}")  # fmt: skip
    return torch.cat(images)[:n], captions[:n]


@torch.inference_mode()
def _embed(feature: CLIPImageFeatures, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unit CLIP image embeddings (N, D) on the CPU of images (N, 3, H, W) in [0, 1]."""
    return torch.cat([feature(images[s : s + batch]).cpu() for s in range(0, len(images), batch)])


def _read_train(
    urls: str, size: int, n: int, seed: int, feature: CLIPImageFeatures, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training image's CLIP embedding (M, D), and n of the images (n, 3, size, size) drawn
    uniformly, seeded (reservoir sampling, Algorithm R), for the Frechet distance's real-vs-real
    reference."""
    rng = random.Random(f"train-sample-{seed}")
    keep: list[torch.Tensor] = []
    embeds, seen = [], 0
    bar = tqdm(desc="training images", unit="img", disable=not progress)
    for batch in make_loader(urls, size, 256, train=False, captions=False):
        embeds.append(_embed(feature, batch["image"]))
        for x in batch["image"]:
            if len(keep) < n:
                keep.append(x.clone())  # not a view that holds its whole batch
            elif (j := rng.randrange(seen + 1)) < n:
                keep[j] = x.clone()
            seen += 1
        bar.update(len(batch["image"]))
    bar.close()
    if seen == 0:
        raise ValueError(f"{urls}: no training record could be read")
    return torch.cat(embeds), torch.stack(keep)


def evaluate_quality(
    pipe: Any,
    eval_shards: str,
    train_shards: str | None = None,
    modes: Sequence[str] | None = None,
    num_prompts: int = 100,
    candidates: int = 4,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    inception_weights: str | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Quality figures (see the module docstring) of `pipe` on the first `num_prompts` records of
    `eval_shards`; `train_shards` adds the nearest-training-image figures and the Frechet
    distance's unpaired real-vs-real reference (real evaluation against as many real training
    images, a seeded draw: the spread between two unrelated sets of real pictures at this N, not
    a floor; the VQ reconstructions are the paired floor).
    Each mode of `modes` (default: all the pipeline has) draws one image per evaluation caption
    (seed + i for caption i); with `candidates` K > 1 it draws K candidates per caption once,
    every one kept with every score (the pipeline's own reranking, keep = K): its single draws
    are each caption's first candidate (the same seed, the same image), and its best of K by
    each of its rerankers (`MODE_RERANKERS`) are picked among the same candidates. `settings`: the
    sampling settings (`mode_settings`; the folder's defaults for the rest). inception_weights:
    a file of FID's Inception v3 weights (torch-fidelity's); then "inception_fid" too.

    Definitions: CLIP score 100 x max(cos, 0) of image and caption (`clip.clip_score`);
    R-precision: whether the image's own caption beats R - 1 = 99 other distinct evaluation
    captions (`metrics.r_precision`, chance 1/R; fewer where the shards hold fewer); the
    nearest-training cosine of the unit CLIP image embeddings; near-copies: the share of images
    whose nearest-training cosine exceeds the 99th percentile of the real evaluation images' own
    (so about 1% of held-out real images count as near-copies by construction: a set above that
    copies training images more closely than unseen real ones resemble them; on data whose
    evaluation images have exact training twins, as the shapes, the threshold is about 1 and
    little counts). With few images the Frechet distance is biased upwards: compare rows of one
    report (same N). JSON-able; ValueError before any drawing for bad input (`check_quality_args`,
    `pipeline_modes`, `mode_settings`, a pipeline without a clip component, captions the CLIP
    cannot encode for reranking)."""
    t_start = time.perf_counter()
    check_quality_args(eval_shards, train_shards, num_prompts, candidates, inception_weights)
    clip = pipe.components.get("clip")
    if clip is None:
        raise ValueError("the quality figures need the pipeline's clip component, which it lacks "
                         "(assemble it with clip=FOLDER)")  # fmt: skip
    modes = pipeline_modes(pipe, modes)
    per_mode = mode_settings(pipe, settings)
    h, w = image_size(pipe.vq.config, pipe.transformer.cfg)
    if h != w:
        raise ValueError(f"the shards' loader reads square images; this pipeline draws {w}x{h}")
    real, captions = _read_eval(eval_shards, h, num_prompts)
    if candidates > 1:  # names, components, encodable captions: before drawing
        for r in {_call_reranker(m) for m in modes}:
            pipe.check_rerank(captions, candidates=candidates, reranker=r)
    n = len(captions)
    feature = CLIPImageFeatures(clip)
    pool = sorted(set(iter_captions(eval_shards)) | set(captions))
    pools = distractor_pools(captions, pool, R_PRECISION_POOL, seed)
    with torch.inference_mode():
        text = torch.cat([clip.text_embeds(*clip.encode_text(pool[s : s + 256], truncate=True))
                          .cpu() for s in range(0, len(pool), 256)])  # fmt: skip
    report: dict[str, Any] = {
        "eval_data": eval_shards, "train_data": train_shards, "num_images": n,
        "candidates": candidates, "seed": seed, "modes": modes, "settings": per_mode,
        "r_precision_pool": int(pools.shape[1]),
    }  # fmt: skip
    with torch.inference_mode():
        recon = pipe.vq.round_trip(real.to(pipe.device)).cpu()
    vq = image_metrics(recon, real)
    report["bits_per_image_token"] = bits_per_image_token(pipe, real, captions, batch_size)
    report["vq_psnr_db"] = float(vq["psnr"].mean())
    report["vq_ssim"] = float(vq["ssim"].mean())
    sets: dict[str, torch.Tensor] = {"VQ reconstructions": recon}
    rows = [{"name": "real evaluation images", "kind": "reference", "draw_seconds": None},
            {"name": "VQ reconstructions", "kind": "reference", "draw_seconds": None}]  # fmt: skip
    for m in modes:  # one draw of K candidates per mode: its single draws and each best of K
        t0 = time.perf_counter()
        out = pipe(captions, seed=seed, batch_size=batch_size, progress=progress, mode=m,
                   candidates=candidates, keep=candidates,
                   reranker=_call_reranker(m) if candidates > 1 else None,
                   **per_mode[m])  # fmt: skip
        seconds = time.perf_counter() - t0
        if candidates == 1:
            picks = {None: list(range(len(out.images)))}
        else:
            picks = {None: first_candidates(out.samples),
                     **{r: best_by(out.samples, r) for r in MODE_RERANKERS[m]}}  # fmt: skip
        for r, idx in picks.items():
            name = f"{m}, single" if r is None else f"{m}, best of {candidates} by {r}"
            images = to_uint8([out.images[i] for i in idx])
            sets[name] = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            rows.append({"name": name, "kind": "generated", "mode": m, "reranker": r,
                         "candidates": candidates if r else 1,
                         "draw_seconds": seconds})  # fmt: skip
    train_embeds = None
    fd_refs: dict[str, torch.Tensor] = dict(sets)
    if train_shards is not None:
        train_embeds, train_sample = _read_train(train_shards, h, n, seed, feature, progress)
        fd_refs["real evaluation images"] = train_sample  # unpaired real against real
        report["num_train_images"] = len(train_embeds)
    fds = frechet_distances(real, fd_refs, feature, batch_size=256)
    fids = (frechet_distances(real, fd_refs, 2048, 64, inception_weights)
            if inception_weights else {})  # fmt: skip
    real_embeds = _embed(feature, real)
    threshold = None
    if train_embeds is not None:
        real_nearest = nearest_cosine(real_embeds, train_embeds)
        threshold = float(torch.quantile(real_nearest.double(), NEAR_COPY_QUANTILE))
    report["near_copy_threshold_cosine"] = threshold
    own = text[pools[:, 0]]
    for row in rows:
        real_row = row["name"] == "real evaluation images"
        emb = real_embeds if real_row else _embed(feature, sets[row["name"]])
        row["clip_score"] = float(clip_score(emb, own).mean())
        row["r_precision"] = float(r_precision(emb, text, pools).float().mean())
        row[FD_KEY] = fds.get(row["name"])
        if inception_weights:
            row["inception_fid"] = fids.get(row["name"])
        near = None if train_embeds is None else nearest_cosine(emb, train_embeds)
        row["nearest_train_cosine"] = None if near is None else float(near.mean())
        row["near_copies"] = None if near is None else int((near > threshold).sum()) / len(near)
    report["rows"] = rows
    if data_kind(eval_shards) == "shapes":
        report["fidelity"] = shapes_fidelity(pipe, n, seed, settings=per_mode,
                                             candidates=candidates, modes=modes,
                                             batch_size=batch_size, progress=progress)  # fmt: skip
    report["seconds"] = time.perf_counter() - t_start
    return report


def _call_reranker(mode: str) -> str:
    """The reranker a mode's draw of K candidates is called with, so that every candidate carries
    the score of each of the mode's rerankers (`MODE_RERANKERS`): "clip+pmi" for both."""
    return "+".join(MODE_RERANKERS[mode])


def _cell(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _cosine(c: float) -> str:
    """A cosine with 4 decimals, or 7 where 4 would round it to 1 (a set of repeated pictures)."""
    return f"{c:.4f}" if c < 0.99995 else f"{c:.7f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report of `evaluate_quality` as Markdown: the scalar figures, one table row per set of
    images (each mode single and best of K, then the references) and, on shapes, the fidelity
    summary (exact match over all, seen and held-out prompts)."""
    r = report
    lines = [
        f"{r['num_images']} evaluation images ({r['eval_data']}), seed {r['seed']}.",
        "",
        f"- bits per image token (autoregressive transformer, real evaluation pairs): "
        f"{r['bits_per_image_token']:.4f}",
        f"- VQ reconstructions: PSNR {r['vq_psnr_db']:.2f} dB, SSIM {r['vq_ssim']:.4f}",
        f"- R-precision: top 1 of {r['r_precision_pool']} captions, the image's own and "
        f"{r['r_precision_pool'] - 1} other captions of the evaluation shards (chance "
        f"{1 / r['r_precision_pool']:.1%})",
        f"- near-copy: nearest-training cosine above "
        f"{_cosine(r['near_copy_threshold_cosine'])} (the {NEAR_COPY_QUANTILE:.0%} quantile of the "
        "real evaluation images')" if r["near_copy_threshold_cosine"] is not None else
        "- nearest-training figures and the real images' FD: none (they need --train-data)",
        "- sampling: " + "; ".join(f"{m}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float)
                                                        else f"{k} {v}"
                                                        for k, v in r["settings"][m].items())
                                   for m in r["modes"]),
        "",
    ]  # fmt: skip
    fid = any("inception_fid" in row for row in r["rows"])
    head = ["images", "CLIP score", "R-precision", "CLIP-feature FD, not Inception FID",
            *(["Inception FID"] * fid), "nearest training cosine", "near-copies"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in r["rows"]:
        name = row["name"] + (" (reference)" if row["kind"] == "reference" else "")
        if row["name"] == "real evaluation images":
            name += "; FD: against training images"
        cells = [name, _cell(row["clip_score"], ".2f"), _cell(row["r_precision"], ".1%"),
                 _cell(row[FD_KEY], ".4f"), *([_cell(row.get("inception_fid"), ".2f")] * fid),
                 _cell(row["nearest_train_cosine"], ".4f"),
                 _cell(row["near_copies"], ".1%")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if "fidelity" in r:
        n = r["fidelity"]
        lines += ["", "Shape-checker fidelity (exact match) on "
                  f"{n.get('num_prompts', r['num_images'])} evaluation prompts, all / seen / "
                  f"held-out pairs ({n.get('n_held_out', '?')} with a held-out pair):", "",
                  "| setting | all | seen | held-out |", "|---|---|---|---|"]  # fmt: skip
        for name, s in r["fidelity"]["summary"].items():
            cells = [_cell(s[k], ".1%") for k in ("exact", "exact_seen", "exact_held_out")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
