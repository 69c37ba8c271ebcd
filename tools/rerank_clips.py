"""Best of K by several CLIPs from one draw of the candidates: which reranker picks a right image
most often, each scoring the very same candidates (the shapes checker reads every pick).

    python tools/rerank_clips.py --model runs/main/pipeline --clips A/clip B/clip --out F.json

The candidates are those of `dalle-ar eval fidelity --model M --num N --guidance G --temperature
T --candidates K` (same prompts, same seeds, so "a right image among the K" and the pipeline's
own CLIP's pick are that command's figures); drawing them is most of the cost, so comparing n
CLIPs this way costs one draw instead of n. Each CLIP scores every candidate against its prompt
(`CLIP.score`, CLIPScore on the saved 8-bit pixels); its pick is the highest score, ties to the
earlier candidate, as `eval.fidelity.best_by` does. Prints and writes one JSON object: per CLIP
folder, the checker's summary (all, seen, held-out) of its picks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dalle_ar.clip import CLIP
from dalle_ar.data.evaluate import score, score_batch
from dalle_ar.data.shapes import prompts_for_eval
from dalle_ar.eval.fidelity import best_by, candidates_by_prompt
from dalle_ar.pipelines import Pipeline
from dalle_ar.runtime import set_threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="pipeline folder that draws the candidates")
    ap.add_argument("--clips", nargs="+", required=True, help="CLIP folders to rerank with")
    ap.add_argument("--num", type=int, default=400, help="evaluation prompts")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.candidates < 2:
        ap.error(f"--candidates must be >= 2, got {args.candidates}")
    for folder in args.clips:  # before any drawing
        if not (Path(folder) / "config.json").is_file():
            ap.error(f"--clips: {folder} is not a CLIP folder (no config.json)")
    if args.threads:
        set_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    pairs = prompts_for_eval(args.num, seed=0)
    prompts, specs = [p for p, _ in pairs], [s for _, s in pairs]
    held = [bool(s["held_out"]) for s in specs]
    t0 = time.perf_counter()
    own = "clip" if "clip" in pipe.components else "pmi"  # scores the draw needs; not used here
    out = pipe(prompts, seed=args.seed, progress=True, candidates=args.candidates,
               keep=args.candidates, reranker=own, guidance_scale=args.guidance,
               temperature=args.temperature)  # fmt: skip
    draw_seconds = time.perf_counter() - t0
    right = [bool(score(out.images[i], specs[m["prompt_index"]])["exact"])
             for i, m in enumerate(out.samples)]  # fmt: skip
    any_k = [any(right[i] for i in idx) for idx in candidates_by_prompt(out.samples)]

    def split(flags: list[bool]) -> dict[str, float]:
        seen = [f for f, h in zip(flags, held) if not h]
        held_out = [f for f, h in zip(flags, held) if h]
        return {"seen": sum(seen) / len(seen), "held_out": sum(held_out) / len(held_out)}

    report = {"model": args.model, "num_prompts": args.num, "candidates": args.candidates,
              "guidance_scale": args.guidance, "temperature": args.temperature,
              "seed": args.seed, "draw_seconds": draw_seconds, "any_of_k": split(any_k),
              "single_draws": split([right[i] for i in range(len(right))
                                     if out.samples[i]["candidate_index"] == 0]),
              "by_clip": {}}  # fmt: skip
    for folder in args.clips:
        clip = CLIP.from_pretrained(folder, device=pipe.device)
        scores = clip.score(out.images, [prompts[m["prompt_index"]] for m in out.samples])
        picks = best_by([dict(m, clip_score=float(s)) for m, s in zip(out.samples, scores)],
                        "clip")  # fmt: skip
        images = [out.images[i] for i in picks]
        report["by_clip"][folder] = {
            "all": score_batch(images, specs),
            **{name: score_batch([images[i] for i in range(len(specs)) if held[i] == flag],
                                 [s for s, h in zip(specs, held) if h == flag])
               for name, flag in (("seen", False), ("held_out", True))},
        }  # fmt: skip
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
