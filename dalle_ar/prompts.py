"""Prompts: the composed-prompt grammar and the warnings a prompt earns before sampling.

A composed prompt "scene AND part AND part::w" names the scene and, after each " AND ", a caption
of part of it with an optional weight after "::" (default 1; a negative weight divides the expert
out): a product of experts, as in composable diffusion (Liu et al. 2022). `split_prompt` parses
it; the sampler follows `uncond + g * (scene - uncond) + s * sum_k w_k * (part_k - uncond)`.

Warnings (`encode_prompts`): an empty prompt (or one of only spaces) is the unconditional sample,
the input the model saw when its caption was dropped in training: allowed, with a warning. A
prompt longer than the model's text length is truncated, with a warning. Characters the tokenizer
never saw in training (not in its recorded alphabet) are encoded as raw bytes the model has hardly
seen: warned. So are words no training caption held (a typo, a word of another domain: the tokenizer
records its training captions' words), encoded silently from pieces of other words; a tokenizer
folder saved without that record has no word check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from dalle_ar.text import SPECIALS, TextBatch, TextTokenizer

log = logging.getLogger(__name__)

PART_SEPARATOR = " AND "  # "scene AND part AND part::-2": a composed prompt (split_prompt)
WEIGHT_MARK = "::"


def split_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A composed prompt "scene AND part AND part::w ..." -> ("scene", [("part", 1.0),
    ("part", w), ...]). Each part is a caption naming part of the scene; sampling adds
    part_scale * w * (part - uncond) per part to the guided logits
    (`dalle_ar.sampling.generate_image_tokens`), a product of experts; a negative weight
    divides an expert out. " AND " and a trailing "::number" are reserved; a prompt without
    " AND " has no parts. Spaces around the scene and each part are dropped. ValueError for an
    empty part or a weight that is not a finite number."""
    scene, *raw = prompt.split(PART_SEPARATOR)
    parts = []
    for k, part in enumerate(raw):
        text, weight = part, 1.0
        if WEIGHT_MARK in part:
            text, _, tail = part.rpartition(WEIGHT_MARK)
            try:
                weight = float(tail)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise ValueError(
                    f"part {k + 1} of the composed prompt {prompt!r} ends in "
                    f"{WEIGHT_MARK}{tail!r}: expected a finite number after {WEIGHT_MARK}"
                )
        if not text.strip():
            raise ValueError(f"part {k + 1} of the composed prompt {prompt!r} is empty")
        parts.append((text.strip(), weight))
    return (scene.strip() if parts else scene), parts


def encode_prompts(
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    known_chars: set[str],
    max_each: int = 3,
    said: set[str] | None = None,
) -> TextBatch:
    """Encode the prompts (a `TextBatch`), warning about empty, over-long, never-seen-character and
    unseen-word prompts (module docstring); past `max_each` warnings of a kind, one line counts
    the rest. `known_chars`: the characters seen in training (`known_chars(tokenizer)`, computed
    once). `said`: prompts checked before (by a pipeline, over its calls), not warned about
    again; this call's are added."""
    prompts = list(prompts)
    fresh = [i for i, p in enumerate(prompts) if said is None or p not in said]
    if said is not None:
        said.update(prompts)
    text = tokenizer.encode(prompts, warn=False)  # the over-long ones are said below, each
    room = tokenizer.text_len - 2
    notes: dict[str, list[str]] = {"empty": [], "long": [], "odd": [], "unseen": []}
    lengths = tokenizer.tokenize_lengths([prompts[i] for i in fresh])
    for i, n in zip(fresh, lengths):
        p = prompts[i]
        if not p.strip():
            notes["empty"].append(f"prompt {i} is empty: this is an unconditional sample")
        if n > room:
            kept, _ = tokenizer.read_back(p)  # whole characters
            notes["long"].append(
                f"prompt {i} is {n} tokens, the model reads {room}: truncated to {kept!r}"
            )
        odd = sorted({c for c in tokenizer.normalize(p) if c not in known_chars})
        if odd:
            notes["odd"].append(
                f"prompt {i} has characters the tokenizer never saw in training: "
                f"{' '.join(repr(c) for c in odd)}; they are encoded as raw bytes the model "
                "has hardly seen"
            )
        unseen = tokenizer.unseen_words(p)
        if unseen:
            notes["unseen"].append(
                f"prompt {i} has words no training caption held: "
                f"{', '.join(repr(w) for w in unseen)}; the model has not learned them (they "
                "are encoded from pieces of other words)"
            )
    for kind, lines in notes.items():
        for line in lines[:max_each]:
            log.warning(line)
        if len(lines) > max_each:
            log.warning("... and %d more prompts like that (%s)", len(lines) - max_each, kind)
    return text


def unseen_words(tokenizer: TextTokenizer, prompt: str) -> list[str] | None:
    """The words of a prompt, composed or not (its scene and parts, without the " AND " and
    "::w" marks), that no training caption of the tokenizer held (`TextTokenizer.unseen_words`);
    None for a tokenizer folder without the record of its captions' words."""
    if tokenizer.words is None:
        return None
    try:
        scene, parts = split_prompt(prompt)
    except ValueError:  # refused where it is drawn; here, the words it holds
        scene, parts = prompt, []
    words = [w for text in (scene, *(q for q, _ in parts)) for w in tokenizer.unseen_words(text)]
    return list(dict.fromkeys(words))


def known_chars(tok: TextTokenizer) -> set[str]:
    """Characters seen in training: the tokenizer's recorded alphabet, or (for a folder saved
    without one) the characters that occur in some learned merge."""
    if tok.alphabet is not None:
        return set(tok.alphabet)
    dec = tok.backend.decoder
    chars: set[str] = set()
    for token in tok.backend.get_vocab():
        if len(token) < 2 or token in SPECIALS:
            continue  # the 256 single-byte tokens exist whether or not training saw them
        chars.update(c for c in dec.decode([token]) if c != "\ufffd")
    return chars
