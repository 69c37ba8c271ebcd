"""A CLIP's held-out retrieval and attribute binding on the shapes evaluation scenes as rendered
and as the VQ gives them back (`VQTokenizer.round_trip`): how much of what CLIP reads survives
the decoder's blur, the pictures a reranker actually scores.

    python tools/clip_binding.py --clip runs/clip_shapes/clip --vq runs/vq_shapes/vq \
        --data "data/shapes/eval-*.tar" --out F.json

The figures are the CLIP recipe's own (`train.clip.evaluate` in batches of 100,
`train.clip.attribute_binding` and `picture_binding` on every scene; the foil pictures of the
round-tripped set go through the round trip too); prints and writes one JSON object with both
sets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dalle_ar.cli import print_report
from dalle_ar.config import DataConfig
from dalle_ar.data.loader import loader_from_config
from dalle_ar.models.clip import CLIP
from dalle_ar.models.vq import VQTokenizer
from dalle_ar.runtime import set_threads
from dalle_ar.train.clip import attribute_binding, evaluate, picture_binding


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", required=True, help="CLIP folder")
    ap.add_argument("--vq", required=True, help="VQ folder whose round trips are scored")
    ap.add_argument("--data", required=True, help="shapes evaluation shards")
    ap.add_argument("--image-size", type=int, help="pictures are read at this size (default: "
                    "the VQ's training size)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    clip, vq = CLIP.from_pretrained(args.clip), VQTokenizer.from_pretrained(args.vq)
    size = args.image_size or vq.config.image_size
    data = DataConfig(eval=args.data, image_size=size, batch_size=100)
    rendered = list(loader_from_config(data, "eval", seed=0, captions=True))
    with torch.inference_mode():
        decoded = [dict(b, image=vq.round_trip(b["image"])) for b in rendered]
    report = {"clip": args.clip, "vq": args.vq, "data": args.data}
    for name, batches, redraw in (("rendered", rendered, None),
                                  ("vq_round_trip", decoded, vq.round_trip)):  # fmt: skip
        report[name] = evaluate(clip, batches, 100) | attribute_binding(clip, batches)
        with torch.inference_mode():
            report[name] |= picture_binding(clip, batches, transform=redraw)
    return print_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
