"""The transformer's config: the stream's sizes, the layout of each layer, the attention path and
how image codes are read and scored. `dalle_ar.models.transformer` builds the model from it."""

from __future__ import annotations

import dataclasses

from dalle_ar.config import require, require_fits_memory
from dalle_ar.kernels.layouts import LAYOUT_KINDS
from dalle_ar.models.attention import IMPLS

CODE_INPUTS = ("code", "mask")  # TransformerConfig.code_input
OBJECTIVES = ("ar", "masked")  # TransformerConfig.objective
COND_MODES = ("prepend", "replace", "add")  # TransformerConfig.cond_mode
# what a model records of the components it was trained on (not what the model is)
# the fields a model's size grows with (`require_fits_memory` names the one furthest out)
SIZE_FIELDS = ("depth", "dim", "heads", "head_dim", "mlp_ratio", "text_vocab", "image_vocab",
               "text_len", "grid_h", "grid_w", "cond_dim", "cond_tokens")  # fmt: skip
TRAINED_ON = ("cond_clip", "text_tokenizer_sha256", "vq_sha256")


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
    attn_impl: str = "auto"  # auto | triton | torch (see dalle_ar.models.attention)
    cond_dim: int = 0  # size of an optional conditioning embedding (e.g. 512 for CLIP); 0 = none
    cond_tokens: int = 0  # prefix positions that embedding is projected to (0 with cond_mode=add)
    # prepend: [cond ‖ text ‖ image]; replace: [cond ‖ image]; add: [text ‖ image] with the
    # embedding's projection added to every caption position's input, the projection starting
    # at zero, so that a model fine-tuned from a text-only one starts as that model (ControlNet's
    # zero-initialised layers, Zhang et al. 2023); sampling then needs it only in the prefill
    cond_mode: str = "prepend"
    # the weights hash of the CLIP whose image embeddings it was trained on (`CLIP.identity()`),
    # filled by the recipe from the token shards; "" = not a CLIP embedding, or not known
    cond_clip: str = ""
    # the content hashes of the tokenizer (its tokenizer.json) and of the VQ (its
    # model.safetensors) it was trained on (`dalle_ar.checkpoint.file_sha256`), filled by the
    # recipe; a pipeline refuses others (`dalle_ar.pipelines.compat.check_trained_on`).
    # "" = not known (a folder written before they were recorded): not checked
    text_tokenizer_sha256: str = ""
    vq_sha256: str = ""
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
    # What the model predicts. "ar": the next token (DALL-E). "masked": the codes at [MASK]ed
    # image positions from every other position (absorbing-state discrete diffusion, MaskGIT,
    # Chang et al. 2022): the input holds the codes and a [MASK] id (`mask_id` = image_vocab),
    # the image logits are those of the image positions themselves (no shift), and every layer
    # is bidirectional over the image ("bidir").
    objective: str = "ar"

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
        require(self.cond_mode in COND_MODES, "cond_mode", f"must be one of {COND_MODES}")
        if self.cond_mode == "add":
            add_needs = "add adds a conditioning embedding to the caption: set cond_dim > 0"
            require(self.cond_dim > 0, "cond_mode", add_needs)
            require(self.cond_tokens == 0, "cond_tokens",
                    "cond_mode=add puts the embedding on the caption's positions: no prefix "
                    f"positions (cond_tokens=0), got {self.cond_tokens}")  # fmt: skip
        else:
            require(
                (self.cond_dim > 0) == (self.cond_tokens > 0),
                "cond_tokens",
                f"cond_dim and cond_tokens are both 0 or both > 0, got {self.cond_dim}, "
                f"{self.cond_tokens}",
            )
        require(self.code_features >= -1, "code_features", "must be >= 0, or -1 (from the VQ)")
        require(self.code_input in CODE_INPUTS, "code_input", f"must be one of {CODE_INPUTS}")
        require(self.objective in OBJECTIVES, "objective", f"must be one of {OBJECTIVES}")
        if self.objective == "masked":
            require(
                self.layouts == "bidir" or self.layouts == ["bidir"] * self.depth,
                "layouts",
                f"a masked generator attends both ways: 'bidir', got {self.layouts!r}",
            )
            require(self.code_input == "code", "code_input",
                    "a masked generator reads codes (and [MASK]), not drawn masks")  # fmt: skip
            require(not self.takes_cond, "cond_dim", "the masked generator takes no embedding")
        else:
            kinds = self.layouts if isinstance(self.layouts, list) else [self.layouts]
            require("bidir" not in kinds, "layouts",
                    "'bidir' sees later image codes: it is for objective=masked")  # fmt: skip
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

    def check_fits_memory(self, prefix: str = "") -> None:
        """ConfigError naming the likely field when the model this config builds could not be
        held in this machine's memory (`config.require_fits_memory`); called where a model is
        built here (a recipe's start, a folder's load), not by `validate`: a config may describe
        a model for a larger machine (configs/transformer_paper_12b.yaml)."""
        require_fits_memory(self, self.num_params(), "a transformer", SIZE_FIELDS, prefix)

    def num_params(self) -> int:
        """The parameters of the model this config builds (`Transformer.num_params`), counted
        without building it, so that an absurd size is refused before it is allocated."""
        d, inner, hidden = self.dim, self.heads * self.head_dim, int(self.mlp_ratio * self.dim)
        block = 4 * d + d * 3 * inner + inner * d + d * hidden + hidden + hidden * d + d
        n = self.depth * block + (self.grid_h + self.grid_w) * d + 2 * d + d * self.image_vocab
        if self.has_text:
            n += 2 * self.text_vocab * d + self.text_len * d
        if self.takes_cond:  # projection, its bias, prefix positions, the null embedding
            out = self.cond_vectors * d
            n += self.cond_dim * out + out + self.cond_len * d + self.cond_dim
        if self.code_input == "code":
            n += (self.image_vocab + self.masked) * d
        f = max(0, self.code_features)  # -1: resolved from the VQ later, a small width
        if f:
            n += (f if self.code_input == "code" else f // 3) * d + f * d
        return n

    # -- derived sizes ---------------------------------------------------------------------
    @property
    def takes_cond(self) -> bool:
        """Whether the model reads a conditioning embedding (`cond`, (B, cond_dim))."""
        return self.cond_dim > 0

    @property
    def adds_cond(self) -> bool:
        """Whether the embedding is added to the caption's positions (cond_mode=add), not made
        into positions of its own."""
        return self.takes_cond and self.cond_mode == "add"

    @property
    def cond_len(self) -> int:
        """C: stream positions of the conditioning prefix (0 with cond_mode=add)."""
        return self.cond_tokens if self.takes_cond and not self.adds_cond else 0

    @property
    def cond_vectors(self) -> int:
        """The d-wide vectors the embedding is projected to: one per prefix position, or the
        one added to every caption position."""
        return 1 if self.adds_cond else self.cond_len

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
    def masked(self) -> bool:
        return self.objective == "masked"

    @property
    def mask_id(self) -> int:
        """The [MASK] code of a masked generator: one past the codebook."""
        return self.image_vocab

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


def dalle_kinds(depth: int) -> list[str]:
    """The layout kind of each of `depth` layers in the paper's schedule (appendix B.1): row
    attention unless (i - 2) mod 4 == 0 (layers counted from 1), then column attention; the last
    layer is convolutional."""
    kinds = ["col" if (i - 2) % 4 == 0 else "row" for i in range(1, depth + 1)]
    kinds[-1] = "conv"
    return kinds
