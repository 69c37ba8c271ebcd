"""Prompt fidelity on the shapes data: one sample per evaluation-split shapes prompt for each
guidance scale (same prompts, same seeds), the attributes read back from the pixels with the
shape checker (`dalle_ar.data.evaluate`). `dalle-ar eval fidelity` is its command line.

It drives any pipeline that takes `pipe(prompts, seed=, batch_size=, progress=, **settings)` and
returns images with per-sample metadata (`dalle_ar.pipelines`); it imports none.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

# The guided run's scale: guidance 1.5 at temperature 0.7 drew the shapes best
# (docs/results.md#sampling-settings).
GUIDED_SCALE = 1.5


def evaluate_fidelity(
    pipe: Any,
    num_prompts: int = 200,
    seed: int = 0,
    guidance_scales: Sequence[float] = (1.0, GUIDED_SCALE),
    prompt_seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    composed: bool = False,
    candidates: int = 1,
    rerankers: Sequence[str] = ("pmi",),
    **settings: Any,
) -> dict[str, Any]:
    """One sample per evaluation-split shapes prompt for each guidance scale (same prompts, same
    seeds), scored by the shape checker: exact match and per attribute, over all prompts and
    split into seen and held-out colour-shape combinations. composed=True scores each scale
    once more with every caption as a composed prompt (`shapes.composed_prompt`: an expert for
    the colour and one for the shape of each object). candidates=K > 1 scores the last scale once
    more, each prompt's image now the best of K candidates, the first of them that scale's own
    single draw (still one image per prompt, picked by a model, never by the checker): once per
    reranker of `rerankers` ("pmi", "clip", "clip+pmi"), all from one draw of the candidates,
    side by side, with "any of K": how often the checker finds a right image among the K (what
    a perfect reranker would reach). `settings`: the pipeline's sampling settings for every run
    (temperature=0.7; None keeps the pipeline's default); with upsample=True (the cascade) each
    single-draw run's images are scored twice, small (under its usual name) and upsampled
    ("... upsampled"): the same pictures before and after the upsampler. JSON-able."""
    from dalle_ar.data.shapes import composed_prompt, prompts_for_eval

    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    pairs = prompts_for_eval(num_prompts, seed=prompt_seed)
    rerankers = tuple(rerankers)
    if candidates > 1:  # before any drawing: names, components, prompts the CLIP can encode
        if not rerankers:
            raise ValueError("candidates > 1 needs at least one reranker, got none")
        for r in rerankers:
            pipe.check_rerank([p for p, _ in pairs], candidates=candidates, reranker=r)
    specs = [s for _, s in pairs]
    held = [bool(s["held_out"]) for s in specs]
    report: dict[str, Any] = {"num_prompts": num_prompts, "n_held_out": sum(held),
                              "prompt_seed": prompt_seed, "seed": seed, "settings": {},
                              "summary": {}}  # fmt: skip
    if not num_prompts:
        return report
    runs = [(scale, False) for scale in guidance_scales]
    runs += [(scale, True) for scale in guidance_scales if composed]
    for scale, compose in runs:
        t0 = time.perf_counter()
        params = {**settings, "guidance_scale": scale, "candidates": 1, "keep": 1}
        prompts = [composed_prompt(p) if compose else p for p, _ in pairs]
        out = pipe(prompts, seed=seed, batch_size=batch_size, progress=progress, **params)
        res: dict[str, Any] = dict(out.settings)
        res.update(composed=compose, candidates=1, seconds=time.perf_counter() - t0)
        name = f"{scale:g}" + (" composed" if compose else "")
        if out.small_images:  # the cascade: the same pictures before and after the upsampler
            _add(report, name, {**res, "upsample": False}, out.small_images, specs)
            name += " upsampled"
        _add(report, name, res, out.images, specs)
    if candidates > 1 and guidance_scales:
        _reranked(pipe, report, pairs, candidates, rerankers, guidance_scales[-1], seed,
                  batch_size, progress, settings)  # fmt: skip
    return report


def _reranked(pipe, report, pairs, k, rerankers, scale, seed, batch_size, progress, settings):
    """Best of k by each reranker from one draw: every candidate is kept (keep=k) with every
    score, and each reranker's pick read off them."""
    from dalle_ar.data.evaluate import score

    both = len(rerankers) > 1 or "+" in rerankers[0]
    t0 = time.perf_counter()
    # scored small (the cascade's upsampling is for the kept images, not every candidate)
    settings = {k: v for k, v in settings.items() if k not in _upsampling(pipe)}
    params = {**settings, "guidance_scale": scale, "candidates": k, "keep": k,
              "reranker": "clip+pmi" if both else rerankers[0]}  # fmt: skip
    out = pipe([p for p, _ in pairs], seed=seed, batch_size=batch_size, progress=progress,
               **params)  # fmt: skip
    seconds = time.perf_counter() - t0
    specs = [s for _, s in pairs]
    by_prompt = candidates_by_prompt(out.samples)
    right = [bool(score(out.images[i], specs[m["prompt_index"]])["exact"])
             for i, m in enumerate(out.samples)]  # fmt: skip
    any_k = [any(right[i] for i in by_prompt[p]) for p in range(len(pairs))]
    held = [bool(s["held_out"]) for s in specs]
    for r in rerankers:
        pick = best_by(out.samples, r)
        res: dict[str, Any] = dict(out.settings)
        res.update(composed=False, candidates=k, keep=1, reranker=r, seconds=seconds,
                   any_of_k=split_mean(any_k, held))  # fmt: skip
        _add(report, f"{scale:g} best of {k} by {r}", res, [out.images[i] for i in pick], specs)


def candidates_by_prompt(samples: list[dict[str, Any]]) -> list[list[int]]:
    """The indices into `samples` (the metadata of a call that kept every candidate, keep = K)
    of each prompt's candidates, prompt by prompt."""
    by: dict[int, list[int]] = {}
    for i, m in enumerate(samples):
        by.setdefault(m["prompt_index"], []).append(i)
    return [by[p] for p in sorted(by)]


def best_by(samples: list[dict[str, Any]], reranker: str) -> list[int]:
    """Each prompt's best candidate by `reranker` (an index into `samples`, the metadata of a
    call that kept every candidate with every score): by the reranker's own score
    ("<name>_score"), or, for a combined one ("clip+pmi") the call's own combined score; ties go
    to the earlier candidate."""
    key = f"{reranker}_score" if f"{reranker}_score" in samples[0] else "rerank_score"
    return [max(idx, key=lambda i: (samples[i][key], -samples[i]["candidate_index"]))
            for idx in candidates_by_prompt(samples)]  # fmt: skip


def first_candidates(samples: list[dict[str, Any]]) -> list[int]:
    """Each prompt's first candidate (candidate_index 0: the single draw of the same seed), an
    index into `samples`."""
    return [next(i for i in idx if samples[i]["candidate_index"] == 0)
            for idx in candidates_by_prompt(samples)]  # fmt: skip


def _upsampling(pipe: Any) -> set[str]:
    """The names of a pipeline's upsampling keywords: `upsample` and its "upsample" settings
    section's fields (none for a pipeline without one)."""
    section = getattr(pipe, "defaults", {}).get("upsample")
    return {"upsample", *(dataclasses.asdict(section) if section is not None else ())}


def split_mean(flags: list[bool], held: list[bool]) -> dict[str, float | None]:
    """Fraction true over all, seen and held-out prompts (None for an empty split)."""

    def mean(xs: list[bool]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {"all": mean(flags), "seen": mean([f for f, h in zip(flags, held) if not h]),
            "held_out": mean([f for f, h in zip(flags, held) if h])}  # fmt: skip


def split_scores(images: list, specs: list) -> dict[str, Any]:
    """The shape checker's figures (`data.evaluate.score_batch`) of `images` against `specs`, over
    all of them ("all") and split into "seen" and "held_out" colour-shape pairs (None for an
    empty split)."""
    from dalle_ar.data.evaluate import score_batch

    held = [bool(s["held_out"]) for s in specs]
    res = {"all": score_batch(images, specs)}
    for split, flag in (("seen", False), ("held_out", True)):
        idx = [i for i, h in enumerate(held) if h == flag]
        res[split] = score_batch([images[i] for i in idx], [specs[i] for i in idx]) if idx else None
    return res


def _add(report: dict[str, Any], name: str, res: dict[str, Any], images: list, specs: list):
    """Score `images` against `specs` (all, seen, held-out; `split_scores`) into
    report["settings"][name] and its exact-match line into report["summary"]["guidance " + name]."""
    res.update(split_scores(images, specs))
    report["settings"][name] = res
    a = res["all"]
    report["summary"][f"guidance {name}"] = {k: a[k] for k in ("exact", "exact_seen",
                                                               "exact_held_out")}  # fmt: skip
