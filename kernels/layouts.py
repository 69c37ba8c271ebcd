"""Attention layouts over one stream of T text positions followed by h*w image positions.

Each layout is one rule, `Layout.allowed(i, j)`: may query position i see key position j. Every
other form of the layout (the dense boolean mask of the reference path, the block lists the Triton
kernels iterate, the mask row of the one-token decode step) is derived from that rule here, so the
three cannot drift apart.

Shared by every layout (DALL-E, Ramesh et al. 2021, appendix B.1): a text query sees earlier text
(causal); an image query sees all text. They differ in the earlier image keys an image query sees:
- full: every earlier image position (plain causal).
- row:  the image positions of its own row so far.
- col:  the image positions of its own column so far.
- conv: a k x k causal neighbourhood: rows r-k//2 .. r, columns c-k//2 .. c+k//2, earlier only.
- bidir: every image position, earlier or later (the masked generator: MaskGIT, Chang et al.
  2022, predicts masked codes from all the others). Text stays causal: no text position is
  predicted there, so seeing later text would change nothing the model is trained on, and the
  one rule for text keeps the text prefix's activations those of the other layouts.
Key padding (per-sample valid text length) is applied on top, by the caller's `text_lens`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

LayoutKind = Literal["full", "row", "col", "conv", "bidir"]
LAYOUT_KINDS: tuple[str, ...] = ("full", "row", "col", "conv", "bidir")
CAUSAL_KINDS: tuple[str, ...] = ("full", "row", "col", "conv")  # an image query sees no later one


@dataclasses.dataclass(frozen=True)
class Layout:
    kind: str  # full | row | col | conv | bidir
    text_len: int  # T text positions (padded length)
    grid_h: int  # image rows h
    grid_w: int  # image columns w
    conv_kernel: int = 3  # k for the conv layout (odd)

    def __post_init__(self) -> None:
        if self.kind not in LAYOUT_KINDS:
            raise ValueError(f"layout kind must be one of {LAYOUT_KINDS}, got {self.kind!r}")
        if self.text_len < 1 or self.grid_h < 1 or self.grid_w < 1:
            raise ValueError(
                f"layout needs text_len, grid_h, grid_w >= 1, got "
                f"{self.text_len}, {self.grid_h}, {self.grid_w}"
            )
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd and >= 1, got {self.conv_kernel}")

    @property
    def seq_len(self) -> int:
        return self.text_len + self.grid_h * self.grid_w

    def allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """The rule: may query i see key j? Broadcasts over integer tensors of positions."""
        T, w = self.text_len, self.grid_w
        causal = j <= i
        key_text = j < T
        query_img = i >= T
        ri, ci = (i - T).div(w, rounding_mode="floor"), (i - T).remainder(w)
        rj, cj = (j - T).div(w, rounding_mode="floor"), (j - T).remainder(w)
        if self.kind == "bidir":  # image queries see every image key; text stays causal
            both_img = query_img & ~key_text
            return (causal & key_text) | both_img
        if self.kind == "full":
            img = torch.ones_like(causal)
        elif self.kind == "row":
            img = ri == rj
        elif self.kind == "col":
            img = ci == cj
        else:  # conv
            half = self.conv_kernel // 2
            img = ((ci - cj).abs() <= half) & (ri - rj <= half)
        both_img = query_img & ~key_text
        return causal & (key_text | (both_img & img))

    def dense_mask(self, n: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean (n, n) mask for the first n positions (n defaults to the full length)."""
        n = self.seq_len if n is None else n
        pos = torch.arange(n, device=device)
        return self.allowed(pos[:, None], pos[None, :])

    def mask_row(self, q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
        """Mask rows (len(q_pos), n_keys) for queries at `q_pos` (decode step)."""
        keys = torch.arange(n_keys, device=q_pos.device)
        return self.allowed(q_pos[:, None], keys[None, :])


def check_chunk(q_start: int, n_q: int, n_k: int) -> None:
    """A chunk of n_q queries at positions q_start..q_start+n_q-1 against keys 0..n_k-1 (the
    chunk's own keys last), q_start != 0: ValueError unless 0 < q_start and q_start + n_q ==
    n_k. (q_start 0 is a whole sequence, whose shapes the callers check themselves.)"""
    if q_start and (q_start < 0 or q_start + n_q != n_k):
        raise ValueError(f"a chunk from q_start={q_start} against {n_k} keys needs "
                         f"{n_k - q_start} queries, got {n_q}")  # fmt: skip


def key_padding(text_lens: torch.Tensor | None, text_len: int, n_keys: int) -> torch.Tensor | None:
    """(B, n_keys) True where a key is usable: text keys past the sample's valid length are not."""
    if text_lens is None:
        return None
    keys = torch.arange(n_keys, device=text_lens.device)
    return (keys[None, :] >= text_len) | (keys[None, :] < text_lens[:, None])
