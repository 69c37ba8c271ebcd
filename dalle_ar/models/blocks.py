"""Building blocks of the transformer (dalle_ar/models/transformer.py): the static KV cache,
attention under one layout, the pre-norm residual block, and the layout arithmetic the model's
FLOP count uses.

A block maps the stream x (B, L, d) to (B, L, d). `pos` None: positions 0..L-1, no cache
(training); `pos` (L,) stream positions: k, v are written into the layer's static cache there,
a prefill (L > 1, positions 0..L-1), one decode step (L == 1) that attends to the cache through
`backend.decode`, or with `start` > 0 a chunk of positions start..start+L-1 that attends to the
cache's prefix 0..start-1 and to itself. `text_lens` (B,) masks keys past each sample's valid
prefix.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from dalle_ar.kernels.layouts import Layout
from dalle_ar.models.attention import AttentionBackend
from dalle_ar.models.transformer_config import TransformerConfig


class KVCache(nn.Module):
    """Static per-layer cache, allocated once for the full stream and written in place."""

    def __init__(
        self, batch_size: int, heads: int, max_len: int, head_dim: int, dtype, device
    ) -> None:
        super().__init__()
        shape = (batch_size, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.filled = 0  # positions 0..filled-1 written by the last prefill

    def update(
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, D) at stream positions `pos` (L,); return the whole cache."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v

    def write(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, D) at positions start..start+L-1, known on the host (a slice
        copy, no index tensor); return the cache's first start + L positions."""
        n = start + k.shape[2]
        self.k[:, :, start:n].copy_(k)
        self.v[:, :, start:n].copy_(v)
        return self.k[:, :, :n], self.v[:, :, :n]


class Attention(nn.Module):
    """Multi-head self-attention under one layout: x (B, L, d) -> (B, L, d), heads of width
    `head_dim` (heads * head_dim need not equal d). `cache` is set by the model's setup_cache."""

    def __init__(self, cfg: TransformerConfig, layout: Layout, backend: AttentionBackend) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        inner = cfg.heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, cfg.dim, bias=False)
        self.layout = layout
        self.backend = backend
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None,
        text_lens: torch.Tensor | None,
        start: int = 0,
    ) -> torch.Tensor:
        B, L, _ = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, L, D)
        if pos is None:
            if start:
                raise ValueError("a chunk (start > 0) reads the KV cache: pass its positions")
            y = self.backend(q, k, v, self.layout, text_lens)
        else:
            if self.cache is None:
                raise ValueError("input_pos was given but no KV cache is set up (setup_cache)")
            if start:  # a chunk at start..start+L-1 after a cached prefix: keys 0..start+L-1
                kc, vc = self.cache.write(start, k, v)
                kc, vc = kc.to(q.dtype), vc.to(q.dtype)
                y = self.backend(q, kc, vc, self.layout, text_lens, q_start=start)
            elif L > 1:  # prefill: positions 0..L-1, the fresh k, v equal the cache's head
                self.cache.write(0, k, v)
                self.cache.filled = L
                y = self.backend(q, k, v, self.layout, text_lens)
            else:
                kc, vc = self.cache.update(pos, k, v)
                lengths = (pos + 1).expand(B)  # (B,) filled entries, the new one included
                y = self.backend.decode(q.to(kc.dtype), kc, vc, lengths, self.layout, text_lens)
                y = y.to(x.dtype)
        y = y.transpose(1, 2).reshape(B, L, self.heads * self.head_dim)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm residual block (GPT-2): x + attn(ln(x)), then + MLP(ln(x)) with a GELU hidden
    layer of mlp_ratio * d; (B, L, d) -> (B, L, d)."""

    def __init__(self, cfg: TransformerConfig, layout: Layout, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg, layout, backend)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.fc = nn.Linear(cfg.dim, hidden)
        self.out = nn.Linear(hidden, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None,
        text_lens: torch.Tensor | None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), pos, text_lens, start))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


def init_weights(model: nn.Module, blocks: nn.ModuleList) -> None:
    """GPT-2 initialisation of `model`: N(0, 0.02) weights of linear and embedding layers, zero
    biases; then the residual output projections of its `blocks` drawn with std
    0.02 / sqrt(2 * depth), which keeps the stream's variance independent of depth at init."""
    model.apply(_init_module)
    for block in blocks:
        for lin in (block.attn.proj, block.out):
            nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * len(blocks)))


def _init_module(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def block_flops(cfg: TransformerConfig, layouts: list[Layout]) -> float:
    """Forward matmul FLOPs per stream position of one block per layout: the q, k, v and output
    projections and the MLP, plus attention over only the keys each layout lets a query see
    (averaged over the stream), as a sparse kernel computes it."""
    inner = cfg.heads * cfg.head_dim
    hidden = int(cfg.mlp_ratio * cfg.dim)
    per_layer = 2 * (cfg.dim * 3 * inner + inner * cfg.dim + 2 * cfg.dim * hidden)
    attn = 0.0
    for lay in layouts:
        visible = _visible_pairs(lay) / lay.seq_len  # mean keys per query
        attn += 2 * 2 * visible * inner  # q @ k^T and p @ v
    return len(layouts) * per_layer + attn


@functools.lru_cache(maxsize=64)
def _visible_pairs(layout: Layout, chunk: int = 256) -> int:
    """Query-key pairs `layout` allows over its whole stream."""
    # Row chunks keep the boolean mask small even at the paper's 1280 positions.
    n, total = layout.seq_len, 0
    keys = torch.arange(n)
    for start in range(0, n, chunk):
        q = torch.arange(start, min(n, start + chunk))
        total += int(layout.allowed(q[:, None], keys[None, :]).sum())
    return total


def check_range(ids: torch.Tensor, size: int, what: str) -> None:
    """Raise ValueError unless every id of the integer tensor `ids` is in [0, size). Skipped
    inside torch.compile (reading the values back would split the compiled graph): a compiled
    training step (run.compile) does not check its ids; the data loaders check theirs."""
    if torch.compiler.is_compiling():
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{what} must be in [0, {size}), got values in [{lo}, {hi}]")


def check_text_lens(
    text_lens: torch.Tensor | None, B: int, has_text: bool, device: torch.device
) -> torch.Tensor | None:
    """text_lens (B,) as long on `device` (None stays None). Raises ValueError for another
    shape, or when the model has no text (`has_text` False: cond_mode=replace)."""
    if text_lens is None:
        return None
    if not has_text:
        raise ValueError("text_lens was given but this model has no text (cond_mode=replace)")
    if text_lens.shape != (B,):
        raise ValueError(f"text_lens must have shape ({B},), got {tuple(text_lens.shape)}")
    return text_lens.to(device=device, dtype=torch.long)
