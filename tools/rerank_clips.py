"""Best of K by several CLIPs from one draw of the candidates: which reranker picks a right image
most often, each scoring the very same candidates (the shapes checker reads every pick).

    python tools/rerank_clips.py --model runs/main/pipeline --clips A/clip B/clip \
        --num 400 --candidates 16 --guidance 1.5 --temperature 0.7 --out F.json

The candidates are those of `dalle-ar eval fidelity --model M --num N --guidance G --candidates
K` with the same sampling options (same prompts, same seeds: "a right image among the K", the
single draws and the pipeline's own CLIP's pick are that command's figures); drawing them is
most of the cost, so comparing n CLIPs this way costs one draw instead of n. Each CLIP scores
every candidate the way the pipeline does (`Pipeline.clip_scores`: the decoded codes on 8-bit
levels against the scene caption's embedding); its pick is the highest score, ties to the
earlier candidate (`eval.fidelity.best_by`). Every CLIP folder is loaded, and must encode every
prompt, before any drawing. Prints and writes one JSON object: per CLIP folder, the checker's
figures (all, seen, held-out) of its picks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dalle_ar.cli import add_pipeline_arguments, load_pipeline, print_report
from dalle_ar.data.evaluate import score
from dalle_ar.data.shapes import prompts_for_eval
from dalle_ar.eval.fidelity import (
    GUIDED_SCALE,
    best_by,
    candidates_by_prompt,
    first_candidates,
    split_mean,
    split_scores,
)
from dalle_ar.models.clip import CLIP, check_clip_folder
from dalle_ar.sampling.settings import ARSampling, add_arguments, from_args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_pipeline_arguments(ap, "pipeline folder that draws the candidates")
    ap.add_argument("--clips", nargs="+", required=True, help="CLIP folders to rerank with")
    ap.add_argument("--num", type=int, default=200, help="evaluation prompts (default 200)")
    ap.add_argument("--candidates", type=int, default=16, help="candidates per prompt (K)")
    ap.add_argument("--guidance", type=float, default=GUIDED_SCALE,
                    help=f"guidance scale (default {GUIDED_SCALE})")  # fmt: skip
    add_arguments(ap, ARSampling, skip=("guidance_scale",))  # not given: the folder's defaults
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.num < 1 or args.candidates < 2:
        ap.error(f"--num must be >= 1 and --candidates >= 2, got {args.num}, {args.candidates}")
    pipe = load_pipeline(args)
    pairs = prompts_for_eval(args.num, seed=0)
    prompts, specs = [p for p, _ in pairs], [s for _, s in pairs]
    clips = {}
    for folder in args.clips:  # every CLIP loaded and able to read every prompt before drawing
        clips[folder] = CLIP.from_pretrained(check_clip_folder(folder), device=pipe.device)
        clips[folder].encode_text(prompts)
    t0 = time.perf_counter()
    own = "clip" if "clip" in pipe.components else "pmi"  # scores the draw needs; not used here
    settings = from_args(args, ARSampling, skip=("guidance_scale",))
    out = pipe(prompts, seed=args.seed, progress=True, candidates=args.candidates,
               keep=args.candidates, reranker=own, guidance_scale=args.guidance,
               **settings)  # fmt: skip
    draw_seconds = time.perf_counter() - t0
    held = [bool(s["held_out"]) for s in specs]
    right = [bool(score(out.images[i], specs[m["prompt_index"]])["exact"])
             for i, m in enumerate(out.samples)]  # fmt: skip
    any_k = [any(right[i] for i in idx) for idx in candidates_by_prompt(out.samples)]
    singles = [out.images[i] for i in first_candidates(out.samples)]
    report = {"model": args.model, "num_prompts": args.num, "candidates": args.candidates,
              "seed": args.seed, "settings": out.settings, "draw_seconds": draw_seconds,
              "any_of_k": split_mean(any_k, held),
              "single_draws": split_scores(singles, specs),
              "by_clip": {}}  # fmt: skip
    text_by_prompt = [m["prompt_index"] for m in out.samples]
    for folder, clip in clips.items():
        pipe.components["clip"] = clip  # the pipeline's own scoring path: decoded 8-bit pixels
        with torch.inference_mode():
            text = pipe.scene_embeds(prompts)[text_by_prompt]
            scores = pipe.clip_scores(out.codes, text)
        picks = best_by([dict(m, clip_score=float(s)) for m, s in zip(out.samples, scores)],
                        "clip")  # fmt: skip
        report["by_clip"][folder] = split_scores([out.images[i] for i in picks], specs)
    return print_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
