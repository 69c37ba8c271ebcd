"""Decoder-only transformer over one stream: [cond prefix ‖ text ids ‖ image codes] -> logits.

The stream (DALL-E, Ramesh et al. 2021, section 2.2): C optional conditioning positions (a
fixed-size embedding projected to `cond_tokens` vectors), then T text positions (ids padded to a
fixed length), then h*w image positions in raster order. Text and image tokens have their own
embedding tables; text positions get 1-D position embeddings, image positions 2-D ones
(row + column). Each block attends under its own layout (kernels/layouts.py); the default
schedule follows the paper's appendix B.1: row attention, column attention in every fourth layer
starting at the second, convolutional attention in the last.

One forward path serves training, prefill and decoding (gpt-fast style):

    model(tokens, input_pos=None, *, text_lens=None, cond=None, null_rows=None) -> Logits

- `tokens` (B, L) are token positions of [text ‖ image]; the cond prefix is not in `tokens`, it
  comes from `cond` (B, cond_dim). Token position i is stream position C + i. With
  `cond_mode="add"` there is no prefix (C = 0): the embedding's projection is added to every
  text position's input instead.
- `input_pos=None`: the tokens are positions 0..L-1 and no cache is touched (training).
- `input_pos` given (after `setup_cache`): k, v are written into the static cache at those token
  positions. With L > 1 the call is a prefill and `input_pos` must be 0..L-1; with L == 1 it is one
  decode step at an image position (the step attends to the cache through `backend.decode`).
- `text_lens` (B,): valid text tokens per sample (BOS..EOS); keys past it are masked. Pass it on
  every call, decode steps included. `cond` is needed whenever position 0 is in the call;
  `null_rows` (B,) bool marks the rows whose embedding is the learned null embedding instead (no
  embedding: classifier-free guidance's unconditional input, and text mode of a model trained
  with its embedding dropped, as DALL-E 2's decoder is; `null_cond` gives it for sampling).
- The logits at a position predict the next token: `Logits.text` (B, n, text_vocab) for the
  positions whose next token is text, `Logits.image` (B, m, image_vocab) for those whose next token
  is an image code (the last text position predicts the first code). A decode step returns only
  image logits.
- A masked generator (`objective="masked"`, bidirectional layouts) takes [text ‖ all h*w codes,
  some of them `mask_id`] and `Logits.image` (B, h*w, image_vocab) holds each image position's
  own code: no shift. Sampling prefills the caption once and runs each pass over the image
  positions only (`forward_image`), since no text position sees an image one.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle_ar.checkpoint import load_pretrained, read_component_config, save_pretrained
from dalle_ar.kernels.layouts import Layout
from dalle_ar.models.attention import get_backend
from dalle_ar.models.blocks import (
    Block,
    KVCache,
    block_flops,
    check_range,
    check_text_lens,
    init_weights,
)
from dalle_ar.models.transformer_config import TransformerConfig
from dalle_ar.models.vq import drawn_masks

COMPONENT = "transformer"


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
        if cfg.takes_cond:
            self.cond_proj = nn.Linear(cfg.cond_dim, cfg.cond_vectors * d)
            if cfg.cond_len:
                self.cond_pos_emb = nn.Embedding(cfg.cond_len, d)
            self.cond_null = nn.Parameter(torch.zeros(cfg.cond_dim))  # "no embedding", learned
        if cfg.code_input == "code":  # a masked generator's [MASK] is one more input id
            self.image_emb = nn.Embedding(cfg.image_vocab + cfg.masked, d)
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
        if cfg.adds_cond:  # starts as a text-only model (TransformerConfig.cond_mode)
            nn.init.zeros_(self.cond_proj.weight)

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
        rule it was made with, the VQ's default (`dalle_ar.models.vq.drawn_masks`)."""
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

    def null_cond(self, n: int) -> torch.Tensor:
        """The learned null embedding for `n` rows, (n, cond_dim): the input that stands for
        no embedding. ValueError for a model without a conditioning embedding."""
        if not self.cfg.takes_cond:
            raise ValueError("this model has no conditioning embedding (cond_dim=0)")
        return self.cond_null.detach()[None].expand(n, -1)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        *,
        text_lens: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        null_rows: torch.Tensor | None = None,
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
            self._check_cache(B)
        if L + C > cfg.seq_len or (L == 0 and C == 0):
            raise ValueError(f"tokens cover 1..{cfg.seq_len - C} positions, got {L}")
        text_lens = check_text_lens(text_lens, B, cfg.has_text, tokens.device)

        if decode:
            pos = input_pos + C  # (1,) stream position
            x = self._embed_image(tokens, input_pos - T)
        else:
            pos = None if input_pos is None else torch.arange(C + L, device=tokens.device)
            x = self._embed_prefix_and_image(tokens, cond, null_rows)
        x = self._blocks(self.drop(x), pos, text_lens)  # (B, C + L or 1, d)

        if decode:
            return Logits(
                x.new_zeros(B, 0, cfg.text_vocab if cfg.has_text else 0), self._image_logits(x)
            )
        n = x.shape[1]  # stream positions in this call: 0..n-1
        text = self.text_head(x[:, C : min(n, P - 1)]) if cfg.has_text else x.new_zeros(B, 0, 0)
        # masked: each image position's own code; ar: the next position's
        image = self._image_logits(x[:, P if cfg.masked else P - 1 : n])
        return Logits(text, image)

    def forward_image(
        self, codes: torch.Tensor, *, text_lens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A masked generator's pass over every image position with the caption's read from the KV
        cache: codes (B, h*w) long, `mask_id` included -> image logits (B, h*w, image_vocab),
        each position's own code, as `forward(tokens).image` gives for the same [text ‖ codes].

        The caption's T positions are computed once per sampling call by a prefill,
        `forward(text, input_pos=arange(T))` after `setup_cache(B)`; each pass then computes only
        the image positions and overwrites their cached keys and values (the cache spans the
        whole stream, as for autoregressive sampling). Valid because no text position sees an
        image one in any layout (text is causal, `kernels/layouts.py`). For sampling only: under
        `torch.no_grad` or `torch.inference_mode` (the cache keeps no gradient history), and not
        through `nn.Module.__call__` (the model's own forward hooks do not run). ValueError for a
        model that is not a masked generator, gradients on, codes of the wrong shape or range,
        or no prefill of this batch in the cache."""
        cfg = self.cfg
        if not cfg.masked:
            raise ValueError("forward_image is a masked generator's pass (objective='masked')")
        if torch.is_grad_enabled():
            raise ValueError(
                "forward_image is for sampling: call it under torch.no_grad() or "
                "torch.inference_mode() (the KV cache keeps no gradients)"
            )
        if codes.ndim != 2 or codes.shape[1] != cfg.image_len:
            raise ValueError(f"codes must be (B, {cfg.image_len}), got {tuple(codes.shape)}")
        B, P = codes.shape[0], cfg.prefix_len
        self._check_cache(B)
        if self.blocks[-1].attn.cache.filled < P:  # the last layer is written last
            raise ValueError(f"forward_image reads the caption's {P} positions from the KV cache: "
                             "prefill them first (setup_cache, then forward(text, input_pos="
                             "arange(T)))")  # fmt: skip
        check_range(codes, cfg.image_vocab + cfg.masked, "image codes")
        text_lens = check_text_lens(text_lens, B, cfg.has_text, codes.device)
        img_pos = torch.arange(cfg.image_len, device=codes.device)
        x = self.drop(self._embed_image(codes, img_pos))
        x = self._blocks(x, img_pos + P, text_lens, start=P)
        return self._image_logits(x)

    def _check_cache(self, batch: int) -> None:
        cache = self.blocks[0].attn.cache
        if cache is None:
            raise ValueError("no KV cache is set up (setup_cache)")
        if cache.k.shape[0] != batch:
            raise ValueError(f"KV cache holds batch {cache.k.shape[0]}, got batch {batch}")

    def _blocks(
        self, x: torch.Tensor, pos: torch.Tensor | None, text_lens: torch.Tensor | None,
        start: int = 0,
    ) -> torch.Tensor:  # fmt: skip
        """The blocks and the final norm over the stream x (B, L, d); `text_lens` per sample."""
        stream_lens = None if text_lens is None else text_lens + self.cfg.cond_len
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, pos, stream_lens, start, use_reentrant=False)
            else:
                x = block(x, pos, stream_lens, start)
        return self.ln_f(x)

    def _embed_image(self, codes: torch.Tensor, img_pos: torch.Tensor) -> torch.Tensor:
        w = self.cfg.grid_w
        pos = self.row_emb(img_pos // w) + self.col_emb(img_pos % w)
        if self.cfg.code_input == "mask":
            return self.mask_in(self.code_mask[codes]) + pos
        x = self.image_emb(codes) + pos
        if self.cfg.code_features:
            feats = self.code_feats
            if self.cfg.masked:  # [MASK] draws nothing: no features
                feats = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
            x = x + self.code_in(feats[codes])
        return x

    def _embed_prefix_and_image(
        self, tokens: torch.Tensor, cond: torch.Tensor | None, null_rows: torch.Tensor | None
    ) -> torch.Tensor:
        cfg = self.cfg
        C, T = cfg.cond_len, cfg.text_positions
        B, L = tokens.shape
        parts = []
        if cfg.takes_cond:
            if cond is None or cond.shape != (B, cfg.cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must have shape ({B}, {cfg.cond_dim}), got {got}")
            cond = cond.to(self.cond_proj.weight.dtype)
            if null_rows is not None:
                if null_rows.shape != (B,) or null_rows.dtype != torch.bool:
                    raise ValueError(f"null_rows must be a ({B},) bool tensor, got "
                                     f"{null_rows.dtype} {tuple(null_rows.shape)}")  # fmt: skip
                null = self.cond_null.to(cond.dtype)[None]
                cond = torch.where(null_rows.to(cond.device)[:, None], null, cond)
            c = self.cond_proj(cond).view(B, cfg.cond_vectors, cfg.dim)
            if C:
                parts.append(c + self.cond_pos_emb.weight)
        elif cond is not None:
            raise ValueError("cond was given but this model has cond_dim=0")
        text, image = tokens[:, :T], tokens[:, T:]
        if text.shape[1]:
            check_range(text, cfg.text_vocab, "text ids")
            x = self.text_emb(text) + self.text_pos_emb.weight[: text.shape[1]]
            parts.append(x + c if cfg.adds_cond else x)
        if image.shape[1]:
            check_range(image, cfg.image_vocab + cfg.masked, "image codes")
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
