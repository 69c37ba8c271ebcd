"""Decoder-only transformer over one stream: [cond prefix ‖ text ids ‖ image codes] -> logits.

The stream (DALL-E, Ramesh et al. 2021, section 2.2): C optional conditioning positions (a
fixed-size embedding projected to `cond_tokens` vectors), then T text positions (ids padded to a
fixed length), then h*w image positions in raster order. Text and image tokens have their own
embedding tables; text positions get 1-D position embeddings, image positions 2-D ones
(row + column). Each block attends under its own layout (kernels/layouts.py); the default
schedule follows the paper's appendix B.1: row attention, column attention in every fourth layer
starting at the second, convolutional attention in the last.

One forward path serves training, prefill and decoding (gpt-fast style):

    model(tokens, input_pos=None, *, text_lens=None, cond=None) -> Logits(text, image)

- `tokens` (B, L) are token positions of [text ‖ image]; the cond prefix is not in `tokens`, it
  comes from `cond` (B, cond_dim). Token position i is stream position C + i.
- `input_pos=None`: the tokens are positions 0..L-1 and no cache is touched (training).
- `input_pos` given (after `setup_cache`): k, v are written into the static cache at those token
  positions. With L > 1 the call is a prefill and `input_pos` must be 0..L-1; with L == 1 it is one
  decode step at an image position (the step attends to the cache through `backend.decode`).
- `text_lens` (B,): valid text tokens per sample (BOS..EOS); keys past it are masked. Pass it on
  every call, decode steps included. `cond` is needed whenever position 0 is in the call.
- The logits at a position predict the next token: `Logits.text` (B, n, text_vocab) for the
  positions whose next token is text, `Logits.image` (B, m, image_vocab) for those whose next token
  is an image code (the last text position predicts the first code). A decode step returns only
  image logits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle_ar.attention import IMPLS, get_backend
from dalle_ar.blocks import (
    Block,
    KVCache,
    block_flops,
    check_range,
    check_text_lens,
    dalle_kinds,
    init_weights,
)
from dalle_ar.checkpoint import load_pretrained, read_component_config, save_pretrained
from dalle_ar.config import require
from dalle_ar.kernels.layouts import LAYOUT_KINDS, Layout
from dalle_ar.vq import drawn_masks

COMPONENT = "transformer"
CODE_INPUTS = ("code", "mask")  # TransformerConfig.code_input


@dataclasses.dataclass
class TransformerConfig:
    text_vocab: int = 1000  # text vocabulary size (BPE ids, specials included)
    text_len: int = 32  # T: text positions (captions padded/truncated to this)
    image_vocab: int = 512  # image codebook size (VQ)
    grid_h: int = 16  # image code rows h
    grid_w: int = 16  # image code columns w
    dim: int = 256  # model width d
    depth: int = 4  # number of blocks
    heads: int = 4  # attention heads
    head_dim: int = 64  # width of one head (heads * head_dim need not equal dim)
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio * dim
    dropout: float = 0.0  # dropout on the embeddings and residual branches
    layouts: str | list[str] = "dalle"  # "dalle" schedule | one kind for all layers | one per layer
    conv_kernel: int = 3  # k of the k x k conv layout (odd)
    attn_impl: str = "auto"  # auto | triton | torch (see dalle_ar.attention)
    cond_dim: int = 0  # size of an optional conditioning embedding (e.g. 512 for CLIP); 0 = none
    cond_tokens: int = 0  # prefix positions that embedding is projected to
    cond_mode: str = "prepend"  # prepend: [cond ‖ text ‖ image]; replace: [cond ‖ image]
    # Code features: each image code is also described by a fixed vector (what the VQ draws for
    # it, `VQTokenizer.code_pixels`), projected into the code's input embedding and its output
    # weight. Codes that share colours or strokes then share parameters, which helps the model
    # draw colour-shape pairs it never saw (docs/results.md#vq-encoder-and-code-features).
    # 0 = off; -1 = the VQ's patch width 3*f*f, resolved by the recipe from its `vq` folder.
    code_features: int = 0
    # What an image position already drawn feeds the model. "code": the code's own embedding
    # (plus its code features). "mask": only which pixels of its patch are drawn, as the VQ says
    # (`VQTokenizer.code_masks`, given with the code features): never which code, nor its
    # colour. The model then cannot learn from the drawing so far that, say, blue objects are
    # never circles; colour and shape come from the caption. Needs code features.
    code_input: str = "code"

    def validate(self) -> None:
        for key in ("text_vocab", "text_len", "image_vocab", "grid_h", "grid_w", "dim", "depth"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.text_len >= 2, "text_len", f"needs room for BOS and EOS, got {self.text_len}")
        require(self.heads >= 1 and self.head_dim >= 1, "heads/head_dim", "must be >= 1")
        require(self.mlp_ratio > 0, "mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(
            self.conv_kernel >= 1 and self.conv_kernel % 2 == 1,
            "conv_kernel",
            f"must be odd and >= 1, got {self.conv_kernel}",
        )
        require(self.attn_impl in IMPLS, "attn_impl", f"must be one of {IMPLS}")
        require(
            self.cond_dim >= 0 and self.cond_tokens >= 0, "cond_dim/cond_tokens", "must be >= 0"
        )
        require(
            (self.cond_dim > 0) == (self.cond_tokens > 0),
            "cond_tokens",
            f"cond_dim and cond_tokens are both 0 or both > 0, got {self.cond_dim}, "
            f"{self.cond_tokens}",
        )
        require(self.cond_mode in ("prepend", "replace"), "cond_mode", "must be prepend|replace")
        require(self.code_features >= -1, "code_features", "must be >= 0, or -1 (from the VQ)")
        require(self.code_input in CODE_INPUTS, "code_input", f"must be one of {CODE_INPUTS}")
        if self.code_input == "mask":
            n = self.code_features
            rgb = n == -1 or (n > 0 and n % 3 == 0)
            require(rgb, "code_input", f"mask reads RGB code features (-1 or 3*f*f), got {n}")
        if isinstance(self.layouts, list):
            require(
                len(self.layouts) == self.depth,
                "layouts",
                f"a list needs one kind per layer ({self.depth}), got {len(self.layouts)}",
            )
            bad = [k for k in self.layouts if k not in LAYOUT_KINDS]
            require(not bad, "layouts", f"unknown kinds {bad}; known: {LAYOUT_KINDS}")
        else:
            ok = self.layouts == "dalle" or self.layouts in LAYOUT_KINDS
            require(ok, "layouts", f"must be 'dalle', one of {LAYOUT_KINDS} or a list")

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def cond_len(self) -> int:
        """C: stream positions of the conditioning prefix."""
        return self.cond_tokens if self.cond_dim > 0 else 0

    @property
    def has_text(self) -> bool:
        return not (self.cond_len > 0 and self.cond_mode == "replace")

    @property
    def text_positions(self) -> int:
        """Text token positions in the stream (0 when the embedding replaces the text)."""
        return self.text_len if self.has_text else 0

    @property
    def prefix_len(self) -> int:
        """P: stream positions before the first image position (the layouts' 'text')."""
        return self.cond_len + self.text_positions

    @property
    def image_len(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.image_len

    def layout_kinds(self) -> list[str]:
        """The attention layout of each layer."""
        if isinstance(self.layouts, list):
            return list(self.layouts)
        return dalle_kinds(self.depth) if self.layouts == "dalle" else [self.layouts] * self.depth


class Logits(NamedTuple):
    text: torch.Tensor  # (B, n, text_vocab): positions whose next token is text
    image: torch.Tensor  # (B, m, image_vocab): positions whose next token is an image code


class Transformer(nn.Module):
    """The text-to-image GPT. See the module docstring for the forward contract."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backend = get_backend(cfg.attn_impl, None)
        d = cfg.dim
        if cfg.has_text:
            self.text_emb = nn.Embedding(cfg.text_vocab, d)
            self.text_pos_emb = nn.Embedding(cfg.text_len, d)
            self.text_head = nn.Linear(d, cfg.text_vocab, bias=False)
        if cfg.cond_len:
            self.cond_proj = nn.Linear(cfg.cond_dim, cfg.cond_len * d)
            self.cond_pos_emb = nn.Embedding(cfg.cond_len, d)
        if cfg.code_input == "code":
            self.image_emb = nn.Embedding(cfg.image_vocab, d)
        self.row_emb = nn.Embedding(cfg.grid_h, d)
        self.col_emb = nn.Embedding(cfg.grid_w, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.layouts = [
            Layout(kind, cfg.prefix_len, cfg.grid_h, cfg.grid_w, cfg.conv_kernel)
            for kind in cfg.layout_kinds()
        ]
        self.blocks = nn.ModuleList(Block(cfg, lay, self.backend) for lay in self.layouts)
        self.ln_f = nn.LayerNorm(d)
        self.image_head = nn.Linear(d, cfg.image_vocab, bias=False)
        if cfg.code_features:
            if cfg.code_features < 0:
                raise ValueError("code_features=-1 must be resolved from a VQ before building")
            # Saved with the weights: the model folder stays self-contained.
            self.register_buffer("code_feats", torch.zeros(cfg.image_vocab, cfg.code_features))
            if cfg.code_input == "code":
                self.code_in = nn.Linear(cfg.code_features, d, bias=False)
            else:  # one input per pixel of the patch: drawn or not, saved like the features
                self.register_buffer(
                    "code_mask", torch.zeros(cfg.image_vocab, cfg.code_features // 3)
                )
                self.mask_in = nn.Linear(cfg.code_features // 3, d, bias=False)
            self.code_out = nn.Linear(cfg.code_features, d, bias=False)
        self.grad_checkpointing = False  # set by a recipe: recompute each block in backward
        init_weights(self, self.blocks)

    def set_code_features(self, feats: torch.Tensor, masks: torch.Tensor | None = None) -> None:
        """Fill the fixed per-code description: feats (image_vocab, code_features), e.g.
        `VQTokenizer.code_pixels()`, and for code_input="mask" the drawn masks (image_vocab,
        code_features // 3) of 0.0 / 1.0, `VQTokenizer.code_masks()` (not read otherwise).
        Raises ValueError for other shapes, or when the mask input gets no masks."""
        want = (self.cfg.image_vocab, self.cfg.code_features)
        if not self.cfg.code_features or tuple(feats.shape) != want:
            raise ValueError(f"code features must have shape {want}, got {tuple(feats.shape)}")
        if self.cfg.code_input == "mask":
            want = (self.cfg.image_vocab, self.cfg.code_features // 3)
            if masks is None or tuple(masks.shape) != want:
                got = None if masks is None else tuple(masks.shape)
                raise ValueError(f"code_input=mask needs masks of shape {want}, got {got}")
            self.code_mask.copy_(masks.to(self.code_mask))
        self.code_feats.copy_(feats.to(self.code_feats))

    def _image_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.image_head(x)
        if self.cfg.code_features:
            # x @ code_out(feats).T, associated so that no (image_vocab, d) matrix is built:
            # cheaper at every batch size, and a decode step's cost stays per token
            logits = logits + (x @ self.code_out.weight) @ self.code_feats.t()
        return logits

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Transformer:
        """Load a component folder; a checkpoint of another shape is refused by name.

        A code_input="mask" folder saved before the drawn masks were kept with the weights (no
        `code_mask`, as in version-1 pipelines) gets them from its code features under the
        rule it was made with, the VQ's default (`dalle_ar.vq.drawn_masks`)."""
        if not _lacks_code_mask(Path(path)):
            return load_pretrained(cls, TransformerConfig, path, COMPONENT)
        model = load_pretrained(_without_code_mask, TransformerConfig, path, COMPONENT)
        model.register_buffer("code_mask", drawn_masks(model.code_feats))
        return model

    def save_pretrained(self, path: str | Path) -> None:
        save_pretrained(self, self.cfg, path, COMPONENT)

    # -- KV cache --------------------------------------------------------------------------
    def setup_cache(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate a static KV cache per layer for the full stream (replaces an older one)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        p = self.image_head.weight
        dtype, device = dtype or p.dtype, device or p.device
        for block in self.blocks:
            a = block.attn
            a.cache = KVCache(batch_size, a.heads, self.cfg.seq_len, a.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.cache = None

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        text_lens: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> Logits:
        """tokens (B, L) at token positions 0..L-1 (input_pos None: training, no cache), a
        prefill from 0 (input_pos = arange(L)) or one decode step (L == 1, input_pos (1,) an
        image position) -> Logits(text, image); see the module docstring."""
        cfg = self.cfg
        C, T, P = cfg.cond_len, cfg.text_positions, cfg.prefix_len
        if tokens.ndim != 2 or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be a (B, L) long tensor, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        B, L = tokens.shape
        decode = input_pos is not None and L == 1
        if input_pos is not None:
            if input_pos.ndim != 1 or input_pos.shape[0] != L:
                raise ValueError(f"input_pos must have shape ({L},), got {tuple(input_pos.shape)}")
            cache = self.blocks[0].attn.cache
            if cache is not None and cache.k.shape[0] != B:
                raise ValueError(f"KV cache holds batch {cache.k.shape[0]}, got batch {B}")
        if L + C > cfg.seq_len or (L == 0 and C == 0):
            raise ValueError(f"tokens cover 1..{cfg.seq_len - C} positions, got {L}")
        text_lens = check_text_lens(text_lens, B, cfg.has_text, tokens.device)

        if decode:
            pos = input_pos + C  # (1,) stream position
            x = self._embed_image(tokens, input_pos - T)
        else:
            pos = None if input_pos is None else torch.arange(C + L, device=tokens.device)
            x = self._embed_prefix_and_image(tokens, cond)
        x = self.drop(x)  # (B, C + L or 1, d)

        stream_lens = None if text_lens is None else text_lens + C
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, pos, stream_lens, use_reentrant=False)
            else:
                x = block(x, pos, stream_lens)
        x = self.ln_f(x)

        if decode:
            return Logits(
                x.new_zeros(B, 0, cfg.text_vocab if cfg.has_text else 0), self._image_logits(x)
            )
        n = x.shape[1]  # stream positions in this call: 0..n-1
        text = self.text_head(x[:, C : min(n, P - 1)]) if cfg.has_text else x.new_zeros(B, 0, 0)
        image = self._image_logits(x[:, P - 1 : n])
        return Logits(text, image)

    def _embed_image(self, codes: torch.Tensor, img_pos: torch.Tensor) -> torch.Tensor:
        w = self.cfg.grid_w
        pos = self.row_emb(img_pos // w) + self.col_emb(img_pos % w)
        if self.cfg.code_input == "mask":
            return self.mask_in(self.code_mask[codes]) + pos
        x = self.image_emb(codes) + pos
        if self.cfg.code_features:
            x = x + self.code_in(self.code_feats[codes])
        return x

    def _embed_prefix_and_image(self, tokens: torch.Tensor, cond: torch.Tensor | None):
        cfg = self.cfg
        C, T = cfg.cond_len, cfg.text_positions
        B, L = tokens.shape
        parts = []
        if C:
            if cond is None or cond.shape != (B, cfg.cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must have shape ({B}, {cfg.cond_dim}), got {got}")
            c = self.cond_proj(cond.to(self.cond_proj.weight.dtype)).view(B, C, cfg.dim)
            parts.append(c + self.cond_pos_emb.weight)
        elif cond is not None:
            raise ValueError("cond was given but this model has cond_dim=0")
        text, image = tokens[:, :T], tokens[:, T:]
        if text.shape[1]:
            check_range(text, cfg.text_vocab, "text ids")
            parts.append(self.text_emb(text) + self.text_pos_emb.weight[: text.shape[1]])
        if image.shape[1]:
            check_range(image, cfg.image_vocab, "image codes")
            img_pos = torch.arange(image.shape[1], device=tokens.device)
            parts.append(self._embed_image(image, img_pos))
        return torch.cat(parts, dim=1)

    # -- accounting ------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; `non_embedding` leaves out the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n

    def flops_per_token(self, backward: bool = True) -> float:
        """Matmul FLOPs per stream position for one training step (forward + backward = 3x the
        forward) or the forward alone. Attention counts only the key positions each layer's
        layout lets a query see (averaged over the stream), as a sparse kernel does."""
        cfg = self.cfg
        text_out = (cfg.text_positions - 1) * cfg.text_vocab * cfg.has_text
        head = 2 * cfg.dim * (text_out + cfg.image_len * cfg.image_vocab) / cfg.seq_len
        fwd = block_flops(cfg, self.layouts) + head
        return 3 * fwd if backward else fwd


def _lacks_code_mask(path: Path) -> bool:
    """Whether the folder is a code_input="mask" one saved without its drawn masks."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        return False  # load_pretrained says what is missing
    cfg = read_component_config(path, COMPONENT, TransformerConfig)
    with safe_open(str(weights), "pt") as f:
        return cfg.code_input == "mask" and "code_mask" not in f.keys()


def _without_code_mask(cfg: TransformerConfig) -> Transformer:
    model = Transformer(cfg)
    del model.code_mask  # not in the folder: derived once the features are loaded
    return model
