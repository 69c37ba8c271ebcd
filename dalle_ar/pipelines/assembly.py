"""`assemble`: a pipeline folder written from trained component folders, each checked against
the others first (`dalle_ar.pipelines.compat`): what the main job's pipeline stage writes and
`Pipeline.from_pretrained` reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dalle_ar.checkpoint import file_sha256, read_component_config
from dalle_ar.models.clip import CLIP, check_clip_folder
from dalle_ar.models.prior import DiffusionPrior
from dalle_ar.models.transformer import Transformer, TransformerConfig
from dalle_ar.models.upsampler import Upsampler
from dalle_ar.models.upsampler import read_config as read_upsampler_config
from dalle_ar.models.vq import VQConfig
from dalle_ar.pipelines.ar import ARPipeline
from dalle_ar.pipelines.compat import (
    check_compatible,
    check_cond_transformer,
    check_masked,
    check_prior,
    check_trained_on,
    check_upsampler,
    image_size,
)
from dalle_ar.pipelines.folder import AR_COMPONENTS, write_folder
from dalle_ar.text import TextTokenizer


def assemble(
    folder: str | Path,
    tokenizer: str | Path,
    vq: str | Path,
    transformer: str | Path,
    *,
    defaults: dict[str, Any] | None = None,
    link: bool = False,
    clip: str | Path | None = None,
    prior: str | Path | None = None,
    masked: str | Path | None = None,
    upsampler: str | Path | None = None,
    cond_transformer: str | Path | None = None,
    allow_mismatch: bool = False,
) -> Path:
    """Write an autoregressive pipeline folder from trained component folders, atomically:
    copies (or, with `link`, absolute symlinks) plus pipeline.json. The components are checked
    against each other first (vocabulary, codebook and patch sizes), and `defaults` (flat
    `ARSampling` fields, or sections {"ar": ..., "rerank": ...}) against the settings. `clip`: a
    CLIP folder (ours or a user's Hugging Face one, `dalle_ar.models.clip.CLIP`) for the CLIP
    reranker, checked for its parts. `prior`: a diffusion prior folder (`dalle-ar train prior`)
    for the prior mode, checked against the CLIP (`check_prior`); `masked`: a masked generator
    folder (`dalle-ar train masked`) for the masked mode (`check_masked`); `upsampler`: an
    upsampler folder (`dalle-ar train upsampler`) for the cascade (`check_upsampler`);
    `cond_transformer`: a transformer folder trained on CLIP image embeddings (model.cond_dim;
    `init_from` the transformer) that the prior mode draws with, so that text mode keeps the
    text-only transformer (`check_cond_transformer`, and `check_prior` against the CLIP).

    Each transformer (and the masked generator) is checked against the tokenizer and VQ it was
    trained on, and each embedding reader against its CLIP, by the content hashes it records
    (`compat.check_trained_on`; a folder written before those records is not checked):
    ValueError naming the part, unless `allow_mismatch=True`, which logs a warning instead.
    ValueError, before anything is written, for components that do not fit; FileNotFoundError
    for a missing folder."""
    srcs = {"text_tokenizer": Path(tokenizer), "vq": Path(vq), "transformer": Path(transformer)}
    for name, src in srcs.items():
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{name} folder {src} is missing or has no config.json")
    if clip is not None:
        check_clip_folder(clip)
        srcs["clip"] = Path(clip)
    tok = TextTokenizer.from_pretrained(srcs["text_tokenizer"])
    vq_cfg = read_component_config(srcs["vq"], "vq", VQConfig)
    tf_cfg = read_component_config(srcs["transformer"], "transformer", TransformerConfig)
    check_compatible(tok.vocab_size, vq_cfg, tf_cfg)
    vq_sha = file_sha256(srcs["vq"] / "model.safetensors")  # once, for every transformer
    check_trained_on("the transformer", tf_cfg, tok.sha256, vq_sha, allow_mismatch)
    cond_cfg = tf_cfg  # the transformer the prior mode draws with
    if cond_transformer is not None:
        srcs["cond_transformer"] = Path(cond_transformer)
        cond_cfg = read_component_config(cond_transformer, "transformer", TransformerConfig)
        check_trained_on("the cond_transformer", cond_cfg, tok.sha256, vq_sha, allow_mismatch)
        check_cond_transformer(tok.vocab_size, vq_cfg, tf_cfg, cond_cfg)
    if prior is not None:
        if clip is None:
            raise ValueError("a prior needs the CLIP it was trained with: pass clip=FOLDER too")
        srcs["prior"] = Path(prior)
    up_cfg = None if upsampler is None else read_upsampler_config(upsampler)
    # the CLIP is loaded (once) only where a component reads its embeddings
    reads_clip = prior is not None or cond_cfg.takes_cond or (up_cfg and up_cfg.caption_dim)
    loaded_clip = CLIP.from_pretrained(clip) if clip is not None and reads_clip else None
    if clip is not None and (prior is not None or cond_cfg.takes_cond):
        loaded = None if prior is None else DiffusionPrior.from_pretrained(prior)
        check_prior(cond_cfg, loaded_clip, loaded, allow_mismatch)
    if masked is not None:
        srcs["masked"] = Path(masked)
        m_cfg = read_component_config(srcs["masked"], "transformer", TransformerConfig)
        check_trained_on("the masked generator", m_cfg, tok.sha256, vq_sha, allow_mismatch)
        check_masked(tok.vocab_size, vq_cfg, tf_cfg, m_cfg)
    if upsampler is not None:
        srcs["upsampler"] = Path(upsampler)
        check_upsampler(image_size(vq_cfg, tf_cfg), up_cfg, loaded_clip, allow_mismatch)
    settings = ARPipeline._defaults(defaults)
    classes = {**AR_COMPONENTS, "clip": CLIP.__name__, "prior": DiffusionPrior.__name__,
               "masked": Transformer.__name__, "upsampler": Upsampler.__name__,
               "cond_transformer": Transformer.__name__}  # fmt: skip
    sources = {k: (("dalle_ar", classes[k]), src) for k, src in srcs.items()}
    as_json = {k: dataclasses.asdict(v) for k, v in settings.items()}
    return write_folder(folder, ARPipeline.__name__, sources, ARPipeline.optional, as_json, link)
