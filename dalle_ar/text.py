"""Captions -> fixed-length BPE ids: train, save, load and encode.

The tokenizer is byte-level BPE (`tokenizers`), so every string encodes without an unknown token
and emoji, CJK or control characters come back exactly. It is stored as a transformers
`PreTrainedTokenizerFast` folder (`tokenizer.json`, `tokenizer_config.json`) plus the project's
`config.json` holding the `TokenizerConfig`, so a component folder reads like every other one.

Layout of one encoded caption (text_len positions): [BOS] caption tokens [EOS] PAD ... PAD.
Over-long captions keep BOS, lose the tail of their content and still end with EOS.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from dalle_ar.checkpoint import atomic_dir, file_sha256, read_component_config
from dalle_ar.config import require, to_dict
from dalle_ar.data.shards import caption_chars

log = logging.getLogger(__name__)

COMPONENT = "text_tokenizer"
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)  # trained first, so their ids are 0, 1, 2
TOKENIZER_FILE = "tokenizer.json"  # the BPE itself: its hash is the tokenizer's identity
ALPHABET_FILE = "alphabet.json"  # characters of the training captions, for prompt warnings
WORDS_FILE = "words.json"  # words of the training captions, for prompt warnings
WORD = re.compile(r"\w+")  # a word: a run of letters, digits or "_" (Unicode aware)
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte value


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int = 1000  # target vocabulary (specials + 256 bytes + merges); may stop short
    min_frequency: int = 2  # a pair must occur this often in the captions to become a merge
    text_len: int = 32  # positions per caption, BOS and EOS included
    lowercase: bool = True  # lower-case captions before BPE (training and encoding alike)
    normalization: Literal["none", "nfc", "nfkc"] = "nfkc"  # unicode normal form applied first

    def validate(self) -> None:
        low = BYTE_ALPHABET + len(SPECIALS)
        require(self.vocab_size >= low, "vocab_size", f"must be >= {low}, got {self.vocab_size}")
        require(self.min_frequency >= 1, "min_frequency", f"must be >= 1, got {self.min_frequency}")
        require(self.text_len >= 2, "text_len", f"must be >= 2 (BOS + EOS), got {self.text_len}")


@dataclasses.dataclass
class TextBatch:
    ids: torch.Tensor  # (B, text_len) int64
    mask: torch.Tensor  # (B, text_len) bool, True on BOS, caption tokens and EOS


def _normalizer(cfg: TokenizerConfig) -> normalizers.Normalizer | None:
    steps = {"none": [], "nfc": [normalizers.NFC()], "nfkc": [normalizers.NFKC()]}
    parts = list(steps[cfg.normalization])
    if cfg.lowercase:
        parts.append(normalizers.Lowercase())
    return normalizers.Sequence(parts) if parts else None


def train_tokenizer(captions: Iterable[str], cfg: TokenizerConfig) -> TextTokenizer:
    """Train byte-level BPE on `captions` (any iterable, read once) with `cfg`."""
    cfg.validate()
    tok = Tokenizer(models.BPE())
    normalizer = _normalizer(cfg)
    if normalizer is not None:  # tokenizers < 0.20 refuses None
        tok.normalizer = normalizer
    # No prefix space: a caption's first word keeps its own tokens, and decode gives back the
    # normalized caption exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The characters of the (normalized) training captions are kept with the tokenizer, so a
    # prompt's never-seen characters can be named later (byte-level BPE encodes them silently).
    # (A normalizer of its own: calling into `tok` while it trains would deadlock.)
    # So are their words: a prompt's unseen words ("crimson", a typo) are encoded from pieces of
    # other words, silently, and the model has not learned what they mean.
    alphabet: set[str] = set()
    words: set[str] = set()
    norm = _normalizer(cfg)

    def tap(texts: Iterable[str]) -> Iterable[str]:
        for text in texts:
            seen = norm.normalize_str(text) if norm is not None else text
            alphabet.update(seen)
            words.update(WORD.findall(seen))
            yield text

    tok.train_from_iterator(tap(captions), trainer)
    # The post-processor lets the bare transformers tokenizer add BOS/EOS the same way.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=cfg.text_len,
        clean_up_tokenization_spaces=False,
    )
    out = TextTokenizer(hf, cfg, alphabet=alphabet, words=words)
    log.info("trained BPE tokenizer: vocab size %d (target %d)", out.vocab_size, cfg.vocab_size)
    return out


class TextTokenizer:
    """Fixed-length caption encoder around a transformers fast tokenizer."""

    def __init__(
        self,
        hf: PreTrainedTokenizerFast,
        cfg: TokenizerConfig,
        alphabet: set[str] | None = None,
        words: set[str] | None = None,
        sha256: str | None = None,
    ) -> None:
        cfg.validate()
        self.hf = hf
        self.cfg = cfg
        # characters seen in the training captions (None for a folder saved without them)
        self.alphabet: frozenset[str] | None = None if alphabet is None else frozenset(alphabet)
        # words (`WORD`) of the normalized training captions (None for a folder saved without)
        self.words: frozenset[str] | None = None if words is None else frozenset(words)
        # the content hash of the tokenizer.json it was loaded from or saved to (`file_sha256`),
        # which a model trained on it records; None for one only held in memory
        self.sha256 = sha256
        self.backend: Tokenizer = hf.backend_tokenizer
        # A caption that contains the text "<eos>" is plain text, never the control token.
        self.backend.encode_special_tokens = True
        ids = {name: self.backend.token_to_id(name) for name in SPECIALS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; expected {SPECIALS}")
        self.pad_id: int = ids[PAD]
        self.bos_id: int = ids[BOS]
        self.eos_id: int = ids[EOS]
        self.num_truncated = 0  # captions cut to fit text_len, over the tokenizer's lifetime
        self._warned_at = 0  # num_truncated when it was last said: said again once it doubles

    @property
    def text_len(self) -> int:
        return self.cfg.text_len

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- save / load -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer folder atomically (transformers files + config.json)."""
        with atomic_dir(path) as tmp:
            self.hf.save_pretrained(str(tmp))
            meta = {"component": COMPONENT, "config": to_dict(self.cfg)}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            if self.alphabet is not None:
                (tmp / ALPHABET_FILE).write_text(json.dumps(sorted(self.alphabet)))
            if self.words is not None:
                (tmp / WORDS_FILE).write_text(json.dumps(sorted(self.words)))
            self.sha256 = file_sha256(tmp / TOKENIZER_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path, text_len: int | None = None) -> TextTokenizer:
        """Load a folder written by `save_pretrained`; `text_len` overrides the stored one."""
        path = Path(path)
        cfg = read_component_config(path, COMPONENT, TokenizerConfig)
        if not (path / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{path}: {TOKENIZER_FILE} is missing")
        if text_len is not None:
            if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 2:
                raise ValueError(f"text_len must be an int >= 2 (BOS + EOS), got {text_len!r}")
            cfg = dataclasses.replace(cfg, text_len=text_len)
        hf = PreTrainedTokenizerFast.from_pretrained(str(path))
        hf.model_max_length = cfg.text_len
        return cls(hf, cfg, alphabet=_read_set(path / ALPHABET_FILE),
                   words=_read_set(path / WORDS_FILE),
                   sha256=file_sha256(path / TOKENIZER_FILE))  # fmt: skip

    def with_text_len(self, text_len: int) -> TextTokenizer:
        """The same tokenizer (and record of its training captions) at another text length."""
        cfg = dataclasses.replace(self.cfg, text_len=text_len)
        return TextTokenizer(self.hf, cfg, alphabet=self.alphabet, words=self.words,
                             sha256=self.sha256)  # fmt: skip

    def read_back(self, text: str) -> tuple[str, bool]:
        """(what the model reads of `text`, whether it was truncated): the normalized caption, or
        the head of it that fits text_len, in whole characters (a cut inside a character's bytes
        drops that character rather than showing half of it as U+FFFD)."""
        whole = self.normalize(text)
        body = self._encode_raw([text])[0].ids  # as `encode` cuts it, without its warning
        if len(body) <= self.text_len - 2:
            return whole, False
        head = self.decode(body[: self.text_len - 2])[0]
        while head and not whole.startswith(head) and head.endswith("\ufffd"):
            head = head[:-1]
        return head, True

    def unseen_words(self, text: str) -> list[str] | None:
        """The words (`WORD`) of `text`, normalized as the tokenizer reads it, that no training
        caption held, in order of first appearance: those the model reads (`read_back`), a word
        that text_len cuts in two whole, none after the cut; None for a folder saved without the
        record of its captions' words."""
        if self.words is None:
            return None
        read, _ = self.read_back(text)
        words = (m.group() for m in WORD.finditer(self.normalize(text)) if m.start() < len(read))
        return list(dict.fromkeys(w for w in words if w not in self.words))

    # -- encode / decode ---------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The caption as the tokenizer sees it (unicode form, case); decode gives this back."""
        norm = self.backend.normalizer
        return norm.normalize_str(text) if norm is not None else text

    def tokenize_lengths(self, captions: Sequence[str]) -> list[int]:
        """Content tokens per caption before truncation to text_len (no BOS/EOS), of its first
        `caption_chars(text_len)` characters."""
        return [len(e.ids) for e in self._encode_raw(_as_list(captions))]

    def _encode_raw(self, captions: list[str]) -> list:
        # cut by characters first: a megabyte caption would cost a megabyte of tokens
        limit = caption_chars(self.text_len)
        return self.backend.encode_batch([c[:limit] for c in captions], add_special_tokens=False)

    def encode(self, captions: list[str] | str, warn: bool = True) -> TextBatch:
        """Captions -> `TextBatch` of (B, text_len) ids and mask; over-long ones are truncated
        (and counted in a warning, said again each time the count doubles, unless the caller
        says so itself: `warn=False`)."""
        captions = _as_list(captions)
        T = self.text_len
        room = T - 2  # content positions between BOS and EOS
        ids = torch.full((len(captions), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), T), dtype=torch.bool)
        cut = 0
        for row, enc in enumerate(self._encode_raw(captions)):
            body = enc.ids
            if len(body) > room:
                body = body[:room]
                cut += 1
            seq = [self.bos_id, *body, self.eos_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        if cut:
            self.num_truncated += cut
        if cut and warn and self.num_truncated >= 2 * self._warned_at:  # a training run's
            # batches would say it at every step
            self._warned_at = self.num_truncated
            log.warning(
                "truncated %d of %d captions to text_len=%d (%d tokens between BOS and EOS; %d "
                "so far; said again when that count doubles)",
                cut,
                len(captions),
                T,
                room,
                self.num_truncated,
            )
        return TextBatch(ids=ids, mask=mask)

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]] | Sequence[int]) -> list[str]:
        """Ids (B, T) or (T,) -> captions, skipping PAD, BOS and EOS."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() not in (1, 2):
                raise ValueError(f"ids must be (B, T) or (T,), got shape {tuple(ids.shape)}")
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
            rows = ids.reshape(-1, ids.shape[-1]).tolist() if ids.dim() == 2 else [ids.tolist()]
        else:
            rows = list(ids)
            if not rows or not hasattr(rows[0], "__len__"):  # one flat row of ints
                rows = [rows]
            rows = [list(r) for r in rows]
        n = self.vocab_size
        for r in rows:
            bad = [i for i in r if not 0 <= int(i) < n]
            if bad:
                raise ValueError(f"ids must be in [0, {n}), got {bad[:4]}")
        specials = {self.pad_id, self.bos_id, self.eos_id}
        rows = [[int(i) for i in r if int(i) not in specials] for r in rows]
        return self.backend.decode_batch(rows, skip_special_tokens=True)


def _read_set(path: Path) -> set[str] | None:
    """A JSON list of strings written by `save_pretrained`, or None where the folder lacks it (a
    folder written before it was recorded); ValueError naming the file when it is not one."""
    if not path.is_file():
        return None
    try:
        items = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return set(items)


def _as_list(captions: list[str] | str) -> list[str]:
    if isinstance(captions, str):
        return [captions]
    if not isinstance(captions, (list, tuple)):
        raise ValueError(f"captions must be a str or a list of str, got {type(captions).__name__}")
    bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
    if bad:
        raise ValueError(f"captions must all be str, got {bad[0]} among them")
    return list(captions)


__all__ = ["TextBatch", "TextTokenizer", "TokenizerConfig", "train_tokenizer"]
