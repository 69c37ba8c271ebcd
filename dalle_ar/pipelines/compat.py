"""Whether trained components can work together in one pipeline: vocabulary, codebook and
patch sizes, grids and text lengths, the tokenizer and VQ each transformer was trained on, and
the CLIP each embedding-reading component was trained on. Each check raises ValueError naming
both sides; `assemble` runs them before it writes a folder, and the pipeline classes when they
are built. `allow_mismatch=True` turns a refused identity (another tokenizer, VQ or CLIP than
the recorded one) into a logged warning, for a user who knows the two are interchangeable;
sizes that do not fit are refused always."""

from __future__ import annotations

from dalle_ar.identity import check_clip_identity, check_recorded
from dalle_ar.models.clip import CLIP
from dalle_ar.models.prior import DiffusionPrior, check_clip
from dalle_ar.models.transformer import TransformerConfig
from dalle_ar.models.upsampler import UpsamplerConfig
from dalle_ar.models.vq import VQConfig


def check_trained_on(
    what: str,
    cfg: TransformerConfig,
    tokenizer_sha256: str | None,
    vq_sha256: str | None,
    allow_mismatch: bool = False,
) -> None:
    """Refuse a tokenizer or VQ other than the ones the transformer `what` was trained on, by
    their content hashes (`TransformerConfig.text_tokenizer_sha256`, `vq_sha256`;
    `check_recorded`): ValueError naming the part and both hashes. A transformer folder written
    before these were recorded is accepted unchecked."""
    check_recorded(what, "tokenizer", cfg.text_tokenizer_sha256, tokenizer_sha256, allow_mismatch)
    check_recorded(what, "VQ", cfg.vq_sha256, vq_sha256, allow_mismatch)


def check_compatible(text_vocab_size: int, vq_cfg: VQConfig, tf_cfg: TransformerConfig) -> None:
    """Refuse components that cannot work together, naming both sizes (ValueError)."""
    if vq_cfg.codebook_size != tf_cfg.image_vocab:
        raise ValueError(
            f"the VQ codebook has {vq_cfg.codebook_size} codes but the transformer's image_vocab "
            f"is {tf_cfg.image_vocab}: expected equal (were they trained together?)"
        )
    if tf_cfg.has_text and text_vocab_size > tf_cfg.text_vocab:
        raise ValueError(
            f"the tokenizer has {text_vocab_size} ids but the transformer's text_vocab is "
            f"{tf_cfg.text_vocab}: expected text_vocab >= the tokenizer's vocabulary"
        )
    patch = 3 * vq_cfg.downsample**2
    if tf_cfg.code_features and tf_cfg.code_features != patch:
        raise ValueError(
            f"the transformer describes codes with {tf_cfg.code_features} features but this VQ "
            f"draws {patch} ({vq_cfg.downsample}x{vq_cfg.downsample} RGB patches): expected the "
            "VQ it was trained with"
        )


def check_prior(
    tf_cfg: TransformerConfig,
    clip: CLIP | None,
    prior: DiffusionPrior | None,
    allow_mismatch: bool = False,
) -> None:
    """Refuse a prior without the CLIP it was trained on (ValueError naming both CLIPs, or the
    missing one), or whose embeddings the transformer does not take (naming both sizes); and a
    CLIP other than the one whose embeddings the transformer was trained on (`cond_clip`,
    `check_recorded`). `allow_mismatch`: another CLIP is only warned about."""
    if clip is not None and tf_cfg.takes_cond:
        check_recorded("the transformer", "CLIP", tf_cfg.cond_clip,
                       str(clip.identity()["weights_sha256"]), allow_mismatch)  # fmt: skip
    if prior is None:
        return
    if clip is None:
        raise ValueError("the prior needs the clip component it was trained with, which is missing")
    check_clip(prior, clip.identity(), allow_mismatch)
    if tf_cfg.cond_dim != prior.cfg.embed_dim:
        raise ValueError(
            f"the prior draws {prior.cfg.embed_dim}-dim CLIP image embeddings but the transformer "
            f"takes cond_dim={tf_cfg.cond_dim}: expected one trained on that CLIP's embeddings"
        )


def check_masked(
    text_vocab_size: int, vq_cfg: VQConfig, tf_cfg: TransformerConfig, m_cfg: TransformerConfig
) -> None:
    """Refuse a masked generator that is not one, or that does not fit the VQ and tokenizer, or
    reads another text length than the transformer (they share the encoded prompts): ValueError
    naming both sides."""
    if not m_cfg.masked:
        raise ValueError("the masked component must be a masked generator (objective='masked'), "
                         f"got objective={m_cfg.objective!r}")  # fmt: skip
    check_same_stream("the masked generator", text_vocab_size, vq_cfg, tf_cfg, m_cfg)


def check_cond_transformer(
    text_vocab_size: int, vq_cfg: VQConfig, tf_cfg: TransformerConfig, c_cfg: TransformerConfig
) -> None:
    """Refuse a cond_transformer that is not an autoregressive transformer reading a CLIP image
    embedding, or that does not fit the VQ and tokenizer, or reads another text length than the
    transformer: ValueError naming both sides."""
    if c_cfg.masked or not c_cfg.takes_cond:
        raise ValueError(
            "the cond_transformer component must be an autoregressive transformer conditioned on "
            f"a CLIP image embedding, got objective={c_cfg.objective!r}, cond_dim={c_cfg.cond_dim}"
        )
    check_same_stream("the cond_transformer", text_vocab_size, vq_cfg, tf_cfg, c_cfg)


def check_same_stream(
    name: str, text_vocab_size: int, vq_cfg: VQConfig, tf_cfg: TransformerConfig,
    other: TransformerConfig,
) -> None:  # fmt: skip
    """A second transformer of the pipeline fits the VQ and tokenizer, and draws the same grid
    and reads the same text length as the transformer (they share the encoded prompts)."""
    check_compatible(text_vocab_size, vq_cfg, other)
    if (other.grid_h, other.grid_w) != (tf_cfg.grid_h, tf_cfg.grid_w):
        raise ValueError(
            f"{name} draws {other.grid_h}x{other.grid_w} codes, the transformer "
            f"{tf_cfg.grid_h}x{tf_cfg.grid_w}: expected the same VQ"
        )
    if other.text_len != tf_cfg.text_len:
        raise ValueError(f"{name} reads {other.text_len} text positions, the transformer "
                         f"{tf_cfg.text_len}: expected equal")  # fmt: skip


def image_size(vq_cfg: VQConfig, tf_cfg: TransformerConfig) -> tuple[int, int]:
    """(H, W) in pixels of the pictures the VQ draws for the transformer's grid."""
    f = vq_cfg.downsample
    return tf_cfg.grid_h * f, tf_cfg.grid_w * f


def check_upsampler(
    size: tuple[int, int], up_cfg: UpsamplerConfig, clip: CLIP | None, allow_mismatch: bool = False
) -> None:
    """Refuse an upsampler whose small size is not the (H, W) `size` the VQ draws, or that reads
    captions with the embeddings of another CLIP than `clip` (or without one): ValueError naming
    both sides (another CLIP only warned about with `allow_mismatch`)."""
    low = up_cfg.low_size
    if size != (low, low):
        raise ValueError(f"the upsampler takes {low}x{low} pictures, the VQ draws {size[1]}x"
                         f"{size[0]}: expected an upsampler trained for that size")  # fmt: skip
    if up_cfg.caption_dim:
        if clip is None:
            raise ValueError("the upsampler reads captions through the CLIP it was trained "
                             "with: assemble it with clip=FOLDER too")  # fmt: skip
        check_clip_identity("the upsampler", up_cfg.clip, up_cfg.caption_dim, clip.identity(),
                            allow_mismatch)  # fmt: skip
