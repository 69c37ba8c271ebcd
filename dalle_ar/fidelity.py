"""Results of a pipeline: a prompt grid of samples, and prompt fidelity on the shapes data.

`evaluate_fidelity` generates one sample per evaluation-split shapes prompt for each guidance
scale (same prompts, same seeds) and reads the attributes back from the pixels with the shape
checker (`dalle_ar.data.evaluate`); tools/eval_fidelity.py is its command line. Both names are
importable from `dalle_ar.pipeline` too.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from dalle_ar.grid import captioned_grid, stack_vertical

if TYPE_CHECKING:  # dalle_ar.pipeline imports this module
    from dalle_ar.pipeline import DalleAR, PipelineOutput


def save_prompt_grid(result: PipelineOutput, path: str | Path) -> Path:
    """One PNG: per prompt, a row of its samples under the prompt as caption."""
    groups: dict[tuple[int, str], list[Image.Image]] = {}
    for img, meta in zip(result.images, result.samples):
        groups.setdefault((meta["prompt_index"], meta["prompt"]), []).append(img)
    rows = [captioned_grid(imgs, p or "(empty prompt)") for (_, p), imgs in sorted(groups.items())]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stack_vertical(rows).save(path)
    return path


def evaluate_fidelity(
    pipe: DalleAR,
    num_prompts: int = 200,
    seed: int = 0,
    guidance_scales: Sequence[float] = (1.0, 1.5),
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    prompt_seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    composed: bool = False,
    part_scale: float | None = None,
    candidates: int = 1,
    rerank_weight: float | None = None,
) -> dict[str, Any]:
    """One sample per evaluation-split shapes prompt for each guidance scale (same prompts, same
    seeds), scored by the shape checker: exact match and per attribute, over all prompts and
    split into seen and held-out colour-shape combinations. composed=True scores each scale
    once more with every caption as a composed prompt (`shapes.composed_prompt`: an expert for
    the colour and one for the shape of each object). candidates=K > 1 scores the last scale once
    more, each prompt's image now the best of K candidates, the first of them that scale's own
    single draw (`dalle_ar.rerank`; still one image per prompt, picked by the model, never by
    the checker). JSON-able."""
    from dalle_ar.data.evaluate import score_batch
    from dalle_ar.data.shapes import composed_prompt, prompts_for_eval
    from dalle_ar.pipeline import SAMPLING_KEYS

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
        params = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=scale,
                      part_scale=part_scale)  # fmt: skip
        if k > 1:
            params["candidates"] = k
            if rerank_weight is not None:
                params["rerank_weight"] = rerank_weight
        prompts = [composed_prompt(p) if compose else p for p, _ in pairs]
        out = pipe(prompts, seed=seed, batch_size=batch_size, progress=progress, **params)
        res: dict[str, Any] = {k: out.samples[0][k] for k in SAMPLING_KEYS}
        res["composed"] = compose
        res["candidates"] = k
        if k > 1:
            res["rerank_weight"] = out.samples[0]["rerank_weight"]
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
