"""Prompt fidelity on the shapes data: generate one sample per evaluation-split prompt, read the
attributes back from the pixels with the shape checker and report exact-match and per-attribute
accuracy, without and with classifier-free guidance, split into scenes whose colour-shape pairs
were seen in training and scenes holding a held-out pair.

    python tools/eval_fidelity.py --model runs/pipe --num 200 --guidance 1.5 --out fidelity.json
    python tools/eval_fidelity.py --model runs/pipe --composed       # + composed prompts
    python tools/eval_fidelity.py --model runs/pipe --candidates 16  # + best of 16 (reranked)

Every setting uses the same prompts and the same seed per prompt, so the difference is guidance
(and, with --composed, the experts for each object's colour and shape; with --candidates K, the
guided run once more with each prompt's image the best of K by the model's own score).
The work is `dalle_ar.fidelity.evaluate_fidelity`; this is its command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dalle_ar.pipeline import DalleAR, evaluate_fidelity
from dalle_ar.runtime import set_threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", required=True, help="pipeline folder")
    ap.add_argument("--num", type=int, default=200, help="evaluation prompts (default 200)")
    ap.add_argument("--guidance", type=float, default=1.5, help="guidance scale of the guided run")
    ap.add_argument(
        "--composed", action="store_true", help="score composed prompts too (colour and shape)"
    )
    ap.add_argument(
        "--candidates", type=int, default=1, help="also score the best of K per prompt (K > 1)"
    )
    ap.add_argument("--rerank-weight", type=float, help="weight of the empty caption (rerank)")
    ap.add_argument("--part-scale", type=float, help="weight of each part (default: pipeline's)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of prompt 0 (then +1 ...)")
    ap.add_argument("--prompt-seed", type=int, default=0, help="which evaluation prompts")
    ap.add_argument("--temperature", type=float, help="default: the pipeline's")
    ap.add_argument("--top-k", type=int, help="default: the pipeline's")
    ap.add_argument("--top-p", type=float, help="default: the pipeline's")
    ap.add_argument("--batch-size", type=int, default=32, help="samples generated together")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    ap.add_argument("--out", help="write the JSON report here (it is printed too)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(args.threads)
    try:
        pipe = DalleAR.from_pretrained(args.model, device=args.device)
        if args.num < 1:
            raise ValueError(f"--num must be >= 1, got {args.num}")
        if args.candidates < 1:
            raise ValueError(f"--candidates must be >= 1, got {args.candidates}")
        report = evaluate_fidelity(
            pipe,
            args.num,
            seed=args.seed,
            guidance_scales=(1.0, args.guidance),
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            prompt_seed=args.prompt_seed,
            batch_size=args.batch_size,
            progress=True,
            composed=args.composed,
            part_scale=args.part_scale,
            candidates=args.candidates,
            rerank_weight=args.rerank_weight,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"eval_fidelity: {e}", file=sys.stderr)
        return 2
    report = {"model": str(Path(args.model).resolve()), **report}
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
