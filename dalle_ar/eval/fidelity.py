"""Prompt fidelity on the shapes data: one sample per evaluation-split shapes prompt for each
guidance scale (same prompts, same seeds), the attributes read back from the pixels with the
shape checker (`dalle_ar.data.evaluate`). `dalle-ar eval fidelity` is its command line.

It drives any pipeline that takes `pipe(prompts, seed=, batch_size=, progress=, **settings)` and
returns images with per-sample metadata (`dalle_ar.pipelines`); it imports none.
"""

from __future__ import annotations

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
    **settings: Any,
) -> dict[str, Any]:
    """One sample per evaluation-split shapes prompt for each guidance scale (same prompts, same
    seeds), scored by the shape checker: exact match and per attribute, over all prompts and
    split into seen and held-out colour-shape combinations. composed=True scores each scale
    once more with every caption as a composed prompt (`shapes.composed_prompt`: an expert for
    the colour and one for the shape of each object). candidates=K > 1 scores the last scale once
    more, each prompt's image now the best of K candidates, the first of them that scale's own
    single draw (`dalle_ar.rerank`; still one image per prompt, picked by the model, never by
    the checker). `settings`: the pipeline's sampling settings for every run (temperature=0.7;
    None keeps the pipeline's default). JSON-able."""
    from dalle_ar.data.evaluate import score_batch
    from dalle_ar.data.shapes import composed_prompt, prompts_for_eval

    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    pairs = prompts_for_eval(num_prompts, seed=prompt_seed)
    specs = [s for _, s in pairs]
    held = [bool(s["held_out"]) for s in specs]
    report: dict[str, Any] = {"num_prompts": num_prompts, "n_held_out": sum(held),
                              "prompt_seed": prompt_seed, "seed": seed, "settings": {},
                              "summary": {}}  # fmt: skip
    if not num_prompts:
        return report
    runs = [(scale, False, 1) for scale in guidance_scales]
    runs += [(scale, True, 1) for scale in guidance_scales if composed]
    if candidates > 1 and guidance_scales:
        runs.append((guidance_scales[-1], False, candidates))
    for scale, compose, k in runs:
        t0 = time.perf_counter()
        params = {**settings, "guidance_scale": scale, "candidates": k}
        prompts = [composed_prompt(p) if compose else p for p, _ in pairs]
        out = pipe(prompts, seed=seed, batch_size=batch_size, progress=progress, **params)
        res: dict[str, Any] = dict(out.settings)
        res["composed"] = compose
        res["candidates"] = k
        res["seconds"] = time.perf_counter() - t0
        res["all"] = score_batch(out.images, specs)
        for split, flag in (("seen", False), ("held_out", True)):
            idx = [i for i, h in enumerate(held) if h == flag]
            imgs = [out.images[i] for i in idx]
            res[split] = score_batch(imgs, [specs[i] for i in idx]) if idx else None
        name = f"{scale:g}" + (" composed" if compose else "") + (f" best of {k}" if k > 1 else "")
        report["settings"][name] = res
        a = res["all"]
        report["summary"][f"guidance {name}"] = {
            k: a[k] for k in ("exact", "exact_seen", "exact_held_out")
        }
    return report
