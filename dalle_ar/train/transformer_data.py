"""Where the transformer recipe's batches come from (`dalle_ar.train.transformer`).

A source yields dicts {"text" (B, T) long, "text_lens" (B,) long, "image" (B, h*w) long, optional
"cond" (B, cond_dim)} and knows the empty caption (classifier-free guidance drops captions to
it). `ShardBatches` reads token shards, or image shards it encodes with the VQ on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from dalle_ar.config import require
from dalle_ar.train import dist
from dalle_ar.train.loop import Source


class BatchSource(Source, Protocol):
    """Where a rank's batches come from (`loop.Source`): dicts {"text" (B,T) long, "text_lens"
    (B,) long, "image" (B, h*w) long, optional "cond" (B, cond_dim)}."""

    empty_ids: torch.Tensor  # (T,) ids of the empty caption
    empty_len: int  # its valid ids ([BOS, EOS] = 2)


class ShardBatches:
    """Batches from token shards (dalle_ar.data.tokens) or image shards encoded by the VQ on the
    fly; captions become fixed-length ids with the text tokenizer; for an embedding-conditioned
    model, "cond" is each record's CLIP image embedding (token shards written with a CLIP).
    Shards are split across ranks by the loaders. Resuming skips the batches already consumed
    (exact: the loaders' order follows their seed, with or without workers). A token record
    with a code >= model.image_vocab is skipped and counted like other bad records; a training
    pass that yields no record is a ValueError (`common.training_batches`)."""

    def __init__(self, cfg: Any, info: dist.DistInfo) -> None:
        # cfg: the recipe's TrainTransformerConfig (dalle_ar.train.transformer, which imports
        # this module): model, data, text_tokenizer, vq, data_format and run.seed are read.
        from dalle_ar.text import TextTokenizer

        m = cfg.model
        require(bool(cfg.text_tokenizer), "text_tokenizer", "needs the tokenizer folder")
        require(bool(cfg.data.train), "data.train", "needs training shards")
        require(
            not m.takes_cond or cfg.data_format == "tokens",
            "model.cond_dim",
            "the conditioning embedding is read from token shards written with a CLIP "
            "(dalle-ar tokens --clip), not from image shards",
        )
        require(cfg.data_format == "tokens" or bool(cfg.vq), "vq", "data_format=images needs it")
        self.cfg, self.device = cfg, info.device
        self.tok = TextTokenizer.from_pretrained(cfg.text_tokenizer, text_len=m.text_len)
        if self.tok.vocab_size > m.text_vocab:
            raise ValueError(
                f"tokenizer has {self.tok.vocab_size} ids, model.text_vocab is "
                f"{m.text_vocab}: expected text_vocab >= the tokenizer's vocab"
            )
        empty = self.tok.encode([""])
        self.empty_ids, self.empty_len = empty.ids[0], int(empty.mask[0].sum())
        self.vq = None
        if cfg.vq:
            from dalle_ar.models.vq import VQTokenizer

            self.vq = VQTokenizer.from_pretrained(cfg.vq, device=info.device)
            if self.vq.codebook_size != m.image_vocab:
                raise ValueError(
                    f"VQ codebook has {self.vq.codebook_size} codes, "
                    f"model.image_vocab is {m.image_vocab}: expected equal"
                )

    def _loader(self, urls: str, train: bool):
        d, seed = self.cfg.data, self.cfg.run.seed
        kw = dict(
            train=train, shuffle_buffer=d.shuffle_buffer, num_workers=d.num_workers, seed=seed,
            text_len=self.cfg.model.text_len,
        )  # fmt: skip
        if self.cfg.data_format == "tokens":
            from dalle_ar.data.tokens import make_token_loader

            # a record with a code the model has no row for is skipped and counted
            return make_token_loader(urls, d.batch_size, codebook_size=self.cfg.model.image_vocab,
                                     **kw)  # fmt: skip
        from dalle_ar.data.loader import make_loader

        return make_loader(
            urls, d.image_size, d.batch_size, random_crop=d.random_crop and train, **kw
        )

    @torch.no_grad()
    def _convert(self, raw: dict) -> dict[str, torch.Tensor]:
        m = self.cfg.model
        codes = raw["codes"] if "codes" in raw else self.vq.encode(raw["image"].to(self.device))
        if tuple(codes.shape[1:]) != (m.grid_h, m.grid_w):
            raise ValueError(
                f"data codes are {tuple(codes.shape[1:])} grids, the model expects "
                f"({m.grid_h}, {m.grid_w}): check the VQ and data.image_size"
            )
        t = self.tok.encode(list(raw["caption"]))
        out = {"text": t.ids, "text_lens": t.mask.sum(1), "image": codes.flatten(1).long()}
        if m.takes_cond:  # the CLIP image embedding of each record (DALL-E 2's decoder input)
            from dalle_ar.data.tokens import clip_embeddings

            out["cond"] = clip_embeddings(raw, "clip_img", m.cond_dim, self.cfg.data.train)
        return out

    def _recorded(self, read: Callable[[dict], str], what: str, advice: str) -> tuple[str, str]:
        """(hash, summary file name) of what the token shards' summaries (`*-tokens.json`)
        record: `read(summary)` gives a hash or "" per summary. ("", "") when none records one;
        ValueError naming the files when they record two."""
        import json

        from dalle_ar.data.tokens import token_summaries

        found: dict[str, str] = {}
        for f in token_summaries(self.cfg.data.train, self.cfg.data.eval):
            sha = read(json.loads(f.read_text()))
            if sha:
                found.setdefault(sha, f.name)
        if len(found) > 1:
            raise ValueError(f"the token shards' summaries name {len(found)} different {what} "
                             f"({', '.join(sorted(found.values()))}): {advice}")  # fmt: skip
        return next(iter(found.items()), ("", ""))

    def cond_clip(self) -> str:
        """The weights hash of the CLIP the token shards' embeddings come from (their
        `*-tokens.json`), or "" when no summary names one. ValueError when they name two."""

        def clip_of(summary: dict) -> str:
            clip = summary.get("clip")
            return clip["weights_sha256"] if isinstance(clip, dict) else ""

        return self._recorded(clip_of, "CLIPs", "train on the embeddings of one")[0]

    def trained_on(self) -> tuple[str, str]:
        """The content hashes (tokenizer, VQ) of what this model is trained on, which it records
        (`TransformerConfig.text_tokenizer_sha256`, `vq_sha256`): the tokenizer folder's; the VQ
        that wrote the token shards (their `*-tokens.json`), else the `vq` folder's; "" where
        unknown. ValueError when the shards' summaries name two VQs, or one other than the `vq`
        folder (the codes would not be the ones that VQ decodes)."""
        own = "" if self.vq is None else self.vq.weights_sha256 or ""
        if self.cfg.data_format != "tokens":
            return self.tok.sha256 or "", own
        shards, name = self._recorded(lambda summary: summary.get("vq_sha256") or "", "VQs",
                                      "train on the codes of one")  # fmt: skip
        if shards and own and shards != own:
            raise ValueError(
                f"the token shards were written by another VQ (content hash {shards[:12]}, "
                f"{name}) than the vq folder {self.cfg.vq} ({own[:12]}): expected the "
                "VQ whose codes they hold"
            )
        return self.tok.sha256 or "", shards or own

    def train(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        from dalle_ar.train.common import training_batches

        urls = self.cfg.data.train
        for i, raw in enumerate(training_batches(self._loader(urls, train=True), urls)):
            if i >= skip:
                yield self._convert(raw)

    def eval(self) -> Iterator[dict[str, torch.Tensor]] | None:
        if not self.cfg.data.eval:
            return None
        return (self._convert(raw) for raw in self._loader(self.cfg.data.eval, train=False))
