"""`dalle-ar tokens`: image shards -> token shards, so transformer training never reruns the image
encoder.

    dalle-ar tokens --vq runs/vq_shapes/vq --shards 'data/shapes/train-*.tar' \\
        --out data/shapes_tokens --prefix train

Each output record is `KEY.codes.npy` ((h, w) int16, or int32 above 32768 codes), `KEY.txt` and
`KEY.json`, with the keys, captions and meta of the input (with `--clip FOLDER`, also
`KEY.clip_img.npy` and `KEY.clip_txt.npy`, that CLIP's embeddings). Records are read in shard
order in one deterministic pass; bad records are skipped, counted and reported once at the end
(the image loader's rules). `OUT/PREFIX-tokens.json` records the VQ folder, the grid, the
codebook size, the record count, the skipped records and the CLIP; the shards load with
`dalle_ar.data.tokens.make_token_loader`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dalle_ar.data.tokens import pretokenize
from dalle_ar.models.vq import VQTokenizer
from dalle_ar.runtime import pick_device


def tokenize_shards(
    vq_dir: str | Path,
    shards: str,
    out: str | Path,
    prefix: str = "train",
    device: str = "auto",
    clip_dir: str | Path | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Load the VQ folder `vq_dir` (and the CLIP folder `clip_dir`, if given) on `device` and
    write the token shards of `shards` to `out` (`dalle_ar.data.tokens.pretokenize`: image_size,
    batch_size, shard_size, num_workers)."""
    dev = pick_device(device)
    vq = VQTokenizer.from_pretrained(vq_dir, device=dev)
    clip, clip_source = None, ""
    if clip_dir:
        from dalle_ar.models.clip import CLIP

        clip = CLIP.from_pretrained(clip_dir, device=dev)
        clip_source = str(Path(clip_dir).resolve())
    source = str(Path(vq_dir).resolve())
    return pretokenize(vq, shards, out, prefix, source=source, clip=clip, clip_source=clip_source,
                       **kw)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dalle-ar tokens",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--vq", required=True, help="VQ component folder (e.g. runs/vq_shapes/vq)")
    p.add_argument("--shards", required=True, help="image shards: path, glob, brace range, dir")
    p.add_argument("--out", required=True, help="output folder for the token shards")
    p.add_argument("--prefix", default="train", help="shard name prefix (train, eval, ...)")
    p.add_argument("--image-size", type=int, default=None, help="default: the VQ's image_size")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument("--shard-size", type=int, default=5000, help="records per output shard")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    p.add_argument("--clip", default=None,
                   help="a CLIP folder: also store its image and caption embeddings per record "
                        "(for the prior and the embedding-conditioned transformer)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        s = tokenize_shards(
            args.vq,
            args.shards,
            args.out,
            prefix=args.prefix,
            device=args.device,
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            clip_dir=args.clip,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"dalle-ar tokens: {e}", file=sys.stderr)
        return 2
    skipped = sum(s["skipped"]["counts"].values())
    print(
        f"dalle-ar tokens: {s['records']} records -> {args.out}/{args.prefix}-*.tar "
        f"(grid {s['grid'][0]}x{s['grid'][1]}, {s['dtype']}, {skipped} skipped, "
        f"{s['seconds']} s)"
    )
    return 0
