"""The codes a pipeline folder draws for the main job's grid prompts and one composed prompt, as
JSON, single draws and best of 16: run it with two versions of the code on one folder and compare
the files to check that a change leaves sampling bit for bit as it was.

    python tools/sample_codes.py runs/main/pipeline codes.json

It imports `dalle_ar.pipeline.DalleAR` and the grid prompts, which every version of the code has.
"""

import argparse
import json

import torch

from dalle_ar.pipeline import DalleAR

try:  # the main job's grid prompts; before dalle_ar.jobs they were dalle_ar.main_job's
    from dalle_ar.jobs.shapes import PROMPTS as GRID
except ImportError:
    from dalle_ar.main_job import DEFAULT_PROMPTS as GRID
PROMPTS = [*GRID, "a red circle AND a red circle::0.5 AND a blue square::-1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="pipeline folder")
    ap.add_argument("out", help="JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = DalleAR.from_pretrained(args.model)
    kw = dict(num_samples=4, seed=0, temperature=0.7, guidance_scale=1.5)
    plain = pipe(PROMPTS, **kw)
    best = pipe(PROMPTS, candidates=16, **kw)
    doc = {
        "plain": plain.codes.tolist(),
        "reranked": best.codes.tolist(),
        "scores": [s["rerank_score"] for s in best.samples],
    }
    with open(args.out, "w") as f:
        json.dump(doc, f)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
