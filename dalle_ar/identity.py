"""Which trained components a component was trained on, and the one check of it.

A trained component records the content hash of each component it was trained on (the
transformer: its tokenizer's and VQ's; the prior, the upsampler and an embedding-conditioned
transformer: their CLIP's). `check_recorded` is the rule every pairing goes through: another
component than the recorded one is refused by name, or with `allow_mismatch` only warned about,
for a user who knows the two are interchangeable."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger(__name__)


def check_recorded(
    what: str, part: str, recorded: str, actual: str | None, allow_mismatch: bool = False
) -> None:
    """`what` was trained on the `part` whose content hash it recorded (`recorded`), and meets
    one whose hash is `actual`. ValueError naming both hashes when they differ (a warning with
    `allow_mismatch`). Nothing is checked when `what` records none (a folder written before it
    was recorded, or a component built outside its recipe) or `actual` is unknown (a part built
    in memory, not loaded from a folder)."""
    if not recorded or not actual:
        log.info("%s: the %s is not checked (%s)", what, part,
                 "no record of the one it was trained on" if not recorded
                 else "this one was not loaded from a folder")  # fmt: skip
        return
    if recorded == actual:
        return
    msg = (f"{what} was trained on another {part} (content hash {recorded[:12]}) than this one "
           f"({actual[:12]})")  # fmt: skip
    if not allow_mismatch:
        raise ValueError(f"{msg}: pair it with the {part} it was trained with, or pass "
                         "allow_mismatch=True if you know they are interchangeable")  # fmt: skip
    log.warning("%s; accepted (allow_mismatch)", msg)


@dataclasses.dataclass
class CLIPIdentity:
    """Which CLIP a component was trained on (`dalle_ar.models.clip.CLIP.identity()`); empty =
    unknown."""

    config_sha256: str = ""  # the CLIP model config's hash
    weights_sha256: str = ""  # the CLIP weights' hash
    embed_dim: int = 0  # its projection dim (0 = unknown)

    @classmethod
    def from_identity(cls, identity: dict[str, Any]) -> CLIPIdentity:
        """From the dict `CLIP.identity()` returns; ValueError when a key is missing."""
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in identity]
        if missing:
            raise ValueError(f"a CLIP identity needs {missing}, got keys {sorted(identity)}")
        return cls(**{f.name: identity[f.name] for f in dataclasses.fields(cls)})


def check_clip_identity(
    what: str,
    own: CLIPIdentity,
    embed_dim: int,
    clip_identity: dict[str, Any],
    allow_mismatch: bool = False,
) -> None:
    """`what` reads `embed_dim`-dim CLIP embeddings and was trained on the CLIP `own`; it meets
    the CLIP `clip_identity` (`CLIP.identity()`) describes. ValueError naming both sizes when the
    embedding sizes differ (always); naming both hashes when the weights differ, or else the
    config (`check_recorded`: only warned about with `allow_mismatch`). A component that records
    no CLIP is checked by its embedding size alone."""
    other = CLIPIdentity.from_identity(clip_identity)
    if other.embed_dim != embed_dim:
        raise ValueError(f"{what} takes {embed_dim}-dim CLIP embeddings, the CLIP gives "
                         f"{other.embed_dim}-dim ones")  # fmt: skip
    if not own.weights_sha256 or own.weights_sha256 != other.weights_sha256:
        check_recorded(what, "CLIP", own.weights_sha256, other.weights_sha256, allow_mismatch)
    else:  # the same weights read under another config
        check_recorded(what, "CLIP config", own.config_sha256, other.config_sha256, allow_mismatch)
