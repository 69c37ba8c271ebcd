"""Turn image shards into token shards, so transformer training never reruns the image encoder.

    python tools/pretokenize.py --vq runs/vq_shapes/vq --shards 'data/shapes/train-*.tar' \\
        --out data/shapes_tokens --prefix train

Each output record is `KEY.codes.npy` ((h, w) int16, or int32 above 32768 codes), `KEY.txt` and
`KEY.json`, with the keys, captions and meta of the input. Records are read in shard order in
one deterministic pass; bad records are skipped, counted and reported once at the end (the image
loader's rules). `OUT/PREFIX-tokens.json` records the VQ folder, the grid, the codebook size, the
record count and the skipped records; the shards load with `dalle_ar.data.tokens`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dalle_ar.data.shards import make_loader, write_samples
from dalle_ar.data.tokens import CODES_EXT, codes_dtype, encode_codes
from dalle_ar.train.common import pick_device
from dalle_ar.vq import VQTokenizer

log = logging.getLogger("pretokenize")


def token_records(vq: VQTokenizer, batches: Any, device: torch.device) -> Iterator[dict[str, Any]]:
    """Webdataset records {"__key__", "codes.npy", "txt", "json"} for each image of `batches`."""
    for batch in batches:
        codes = vq.encode(batch["image"].to(device)).cpu().numpy()  # (B, h, w)
        for key, caption, meta, c in zip(batch["key"], batch["caption"], batch["meta"], codes):
            yield {
                "__key__": key,
                CODES_EXT: encode_codes(c, vq.codebook_size),
                "txt": caption,
                "json": meta,
            }


def pretokenize(
    vq_dir: str | Path,
    shards: str,
    out: str | Path,
    prefix: str = "train",
    image_size: int | None = None,
    batch_size: int = 64,
    shard_size: int = 5000,
    device: str = "auto",
    num_workers: int = 0,
) -> dict[str, Any]:
    """Encode every image of `shards` with the VQ folder `vq_dir`; returns the summary written
    to `out/PREFIX-tokens.json`."""
    dev = pick_device(device)
    vq = VQTokenizer.from_pretrained(vq_dir, device=dev)
    size = image_size or vq.config.image_size
    grid = vq.grid_size(size)
    loader = make_loader(shards, size, batch_size, train=False, num_workers=num_workers)
    start = time.time()
    bar = tqdm(desc=f"pretokenize {prefix}", unit="batch", disable=None)
    count = write_samples(token_records(vq, _counted(loader, bar), dev), out, prefix, shard_size)
    bar.close()
    summary = {
        "vq": str(Path(vq_dir).resolve()),
        "shards": shards,
        "prefix": prefix,
        "image_size": size,
        "grid": [grid, grid],
        "codebook_size": vq.codebook_size,
        "dtype": codes_dtype(vq.codebook_size).name,
        "records": count,
        "skipped": loader.report.to_dict(),
        "seconds": round(time.time() - start, 2),
    }
    path = Path(out) / f"{prefix}-tokens.json"
    path.write_text(json.dumps(summary, indent=2))
    return summary


def _counted(batches: Any, bar: tqdm) -> Iterator[dict[str, Any]]:
    for batch in batches:
        bar.update(1)
        yield batch


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
