"""Recipe: train the byte-level BPE text tokenizer on the captions of a shard set.

    dalle-ar train tokenizer --config configs/shapes/tokenizer.yaml [key=value ...]

Writes into `run.out_dir`: `config.yaml` (the resolved config), `tokenizer/` (the tokenizer
folder, written atomically) and `metrics.json` (captions, vocab size, ids per caption, truncated).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from dalle_ar.config import DataConfig, RunConfig, load_config, require, to_dict
from dalle_ar.text import TextTokenizer, TokenizerConfig, train_tokenizer
from dalle_ar.train.common import Run

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # subfolder of run.out_dir that holds the trained tokenizer


@dataclasses.dataclass
class TokenizerRecipeConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # only `train` is read
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)  # out_dir, wandb
    max_captions: int = 0  # read at most this many captions (0 = all of them)

    def validate(self) -> None:
        require(bool(self.data.train), "data.train", "must name the training shards, got ''")
        require(self.max_captions >= 0, "max_captions", f"must be >= 0, got {self.max_captions}")


def caption_stats(tok: TextTokenizer, captions: list[str]) -> dict[str, float | int]:
    """Ids per caption (content tokens, before truncation) and how many exceed text_len."""
    lengths = tok.tokenize_lengths(captions)
    room = tok.text_len - 2
    return {
        "captions": len(captions),
        "vocab_size": tok.vocab_size,
        "text_len": tok.text_len,
        "mean_ids_per_caption": statistics.fmean(lengths) if lengths else 0.0,
        "max_ids_per_caption": max(lengths, default=0),
        "truncated": sum(n > room for n in lengths),
    }


def read_captions(urls: str, limit: int = 0, text_len: int | None = None) -> list[str]:
    """All captions of the shard set (`limit` > 0 keeps the first `limit`), each cut to
    `caption_chars(text_len)` characters when `text_len` is given."""
    from dalle_ar.data.shards import caption_chars, iter_captions  # imported when it runs

    it = iter_captions(urls, max_chars=None if text_len is None else caption_chars(text_len))
    if limit:
        it = islice(it, limit)
    return list(tqdm(it, desc="captions", unit="cap", disable=None))


def train(cfg: TokenizerRecipeConfig) -> dict[str, float | int]:
    """Run the recipe with a validated config; returns the metrics written to metrics.json."""
    run = Run(cfg, cfg.run)
    run.begin()
    run.init_wandb("tokenizer")
    try:
        captions = read_captions(cfg.data.train, cfg.max_captions, cfg.tokenizer.text_len)
        if not captions:
            raise ValueError(f"no captions found in data.train={cfg.data.train!r}")
        log.info("read %d captions from %s", len(captions), cfg.data.train)
        tok = train_tokenizer(captions, cfg.tokenizer)
        folder = Path(cfg.run.out_dir) / TOKENIZER_DIR
        tok.save_pretrained(folder)
        metrics = caption_stats(tok, captions)
        run.write_json("metrics.json", metrics)
        run.log({f"tokenizer/{k}": v for k, v in metrics.items()}, step=0)
        log.info("tokenizer saved to %s", folder)
    finally:
        run.finish()
    return metrics


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dalle-ar train tokenizer", description="Train the BPE text tokenizer."
    )
    parser.add_argument("--config", help="YAML config file (e.g. configs/shapes/tokenizer.yaml)")
    parser.add_argument(
        "--resume", action="store_true", help="accepted for symmetry; training restarts"
    )
    parser.add_argument("overrides", nargs="*", help="overrides: tokenizer.vocab_size=500")
    args = parser.parse_args(argv)
    cfg = load_config(TokenizerRecipeConfig, args.config, args.overrides)
    if args.resume:
        log.info("tokenizer training has no partial state to resume; it runs from the start")
    log.debug("config: %s", to_dict(cfg))
    m = train(cfg)
    print(
        f"tokenizer: {m['captions']} captions, vocab size {m['vocab_size']}, "
        f"ids per caption mean {m['mean_ids_per_caption']:.2f} max {m['max_ids_per_caption']}, "
        f"truncated {m['truncated']} at text_len={m['text_len']} -> "
        f"{Path(cfg.run.out_dir) / TOKENIZER_DIR}"
    )
    return 0
