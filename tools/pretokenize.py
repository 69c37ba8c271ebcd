"""Turn image shards into token shards, so transformer training never reruns the image encoder.

    python tools/pretokenize.py --vq runs/vq_shapes/vq --shards 'data/shapes/train-*.tar' \\
        --out data/shapes_tokens --prefix train

Each output record is `KEY.codes.npy` ((h, w) int16, or int32 above 32768 codes), `KEY.txt` and
`KEY.json`, with the keys, captions and meta of the input. Records are read in shard order in
one deterministic pass; bad records are skipped, counted and reported once at the end (the image
loader's rules). `OUT/PREFIX-tokens.json` records the VQ folder, the grid, the codebook size, the
record count and the skipped records; the shards load with
`dalle_ar.data.tokens.make_token_loader`. The work is `dalle_ar.data.tokens.pretokenize`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dalle_ar.data.tokens import pretokenize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Image shards -> VQ token shards.")
    p.add_argument("--vq", required=True, help="VQ component folder (e.g. runs/vq_shapes/vq)")
    p.add_argument("--shards", required=True, help="image shards: path, glob, brace range, dir")
    p.add_argument("--out", required=True, help="output folder for the token shards")
    p.add_argument("--prefix", default="train", help="shard name prefix (train, eval, ...)")
    p.add_argument("--image-size", type=int, default=None, help="default: the VQ's image_size")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    p.add_argument("--shard-size", type=int, default=5000, help="records per output shard")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--num-workers", type=int, default=0, help="image decoding workers")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        s = pretokenize(
            args.vq,
            args.shards,
            args.out,
            prefix=args.prefix,
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            device=args.device,
            num_workers=args.num_workers,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"pretokenize: {e}", file=sys.stderr)
        return 2
    skipped = sum(s["skipped"]["counts"].values())
    print(
        f"pretokenize: {s['records']} records -> {args.out}/{args.prefix}-*.tar "
        f"(grid {s['grid'][0]}x{s['grid'][1]}, {s['dtype']}, {skipped} skipped, "
        f"{s['seconds']} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
