"""A tiny random-weight pipeline folder for tests: a BPE tokenizer trained on a few shapes
captions, a VQ whose codebook is k-means initialised on a few shapes scenes, and a small
transformer. Reuse it with

    from _pipeline_fixtures import build_tiny_pipeline

    @pytest.fixture(scope="session")
    def tiny_pipe(tmp_path_factory):
        return build_tiny_pipeline(tmp_path_factory.mktemp("pipe"))

Tests of single models build theirs with `tiny_transformer_config(...)` and `peaked(...)`;
`build_all_modes` adds a tiny CLIP (`TINY_CLIP`), diffusion prior (`tiny_prior`) and masked
generator, for a pipeline with every mode.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle_ar.data.shapes import generate
from dalle_ar.identity import CLIPIdentity
from dalle_ar.models.clip import CLIP, CLIPSizes
from dalle_ar.models.prior import DiffusionPrior, PriorConfig
from dalle_ar.models.transformer import Transformer, TransformerConfig
from dalle_ar.models.vq import VQConfig, VQTokenizer
from dalle_ar.pipeline import assemble
from dalle_ar.text import TextTokenizer, TokenizerConfig, train_tokenizer

V1_PIPELINE = Path(__file__).resolve().parent / "fixtures" / "pipeline_v1"  # version 1, committed
V1_CODES = V1_PIPELINE.parent / "pipeline_v1_codes.json"  # the codes it gave before the change
TEXT_LEN = 12  # short, so an ordinary caption can overflow it in tests
GRID = 4  # 4 x 4 codes; with downsample 4 the images are 16 x 16
CODEBOOK = 32
EMBED_DIM = 16  # the tiny CLIP's embeddings
TINY_CLIP = CLIPSizes(image_size=16, patch_size=4, vision_width=32, vision_layers=1,
                      vision_heads=2, text_width=32, text_layers=1, text_heads=2,
                      embed_dim=EMBED_DIM, text_len=32)  # fmt: skip


def tiny_transformer_config(**overrides: Any) -> TransformerConfig:
    """The tiny transformer of the tests (width 32, PyTorch attention path) for this pipeline's
    tokenizer and VQ; keyword arguments replace fields (another test's text length, grid,
    vocabularies, depth or conditioning)."""
    base = dict(
        text_vocab=300,
        text_len=TEXT_LEN,
        image_vocab=CODEBOOK,
        grid_h=GRID,
        grid_w=GRID,
        dim=32,
        depth=2,
        heads=2,
        head_dim=16,
        attn_impl="torch",
    )
    return TransformerConfig(**{**base, **overrides})


def peaked(model: Transformer) -> Transformer:
    """Larger-than-default init of every matrix, so the random model's distributions are far
    from uniform and temperature, top-k and guidance visibly change the samples."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def build_components(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the three component folders under `root`; returns their paths by component name."""
    torch.manual_seed(seed)
    scenes = list(generate(64, seed=seed, split="train", size=GRID * 4))
    tok = train_tokenizer(
        (c for _, c, _ in scenes), TokenizerConfig(vocab_size=300, text_len=TEXT_LEN)
    )
    tok.save_pretrained(root / "text_tokenizer")

    vq = VQTokenizer(
        VQConfig(
            image_size=GRID * 4,
            width=8,
            num_res_blocks=1,
            latent_dim=8,
            codebook_size=CODEBOOK,
            kmeans_iters=2,
        )
    )
    images = torch.from_numpy(np.stack([im for im, _, _ in scenes])).permute(0, 3, 1, 2)
    vq.train()
    with torch.no_grad():
        vq(images.float() / 255)  # the first training pass k-means-initialises the codebook
    vq.eval().save_pretrained(root / "vq")

    model = peaked(Transformer(tiny_transformer_config(text_vocab=300)).eval())
    model.save_pretrained(root / "transformer")
    return {
        "text_tokenizer": root / "text_tokenizer",
        "vq": root / "vq",
        "transformer": root / "transformer",
    }


def build_tiny_pipeline(root: Path, seed: int = 0, masked: bool = False) -> Path:
    """Components under root/parts, assembled into the pipeline folder root/pipe; `masked`: with
    a tiny masked generator too (the masked mode, inpainting)."""
    parts = build_components(root / "parts", seed)
    if masked:
        torch.manual_seed(seed + 1)
        model = Transformer(tiny_transformer_config(layouts="bidir", objective="masked"))
        peaked(model).save_pretrained(root / "parts" / "masked")
        parts["masked"] = root / "parts" / "masked"
    return assemble(root / "pipe", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                    masked=parts.get("masked"))  # fmt: skip


def tiny_prior(clip: CLIP, seed: int = 0) -> DiffusionPrior:
    """A tiny diffusion prior for `clip`, its matrices drawn wide so that its output depends
    visibly on its input."""
    torch.manual_seed(seed)
    cfg = PriorConfig(embed_dim=EMBED_DIM, width=32, heads=2, layers=1, num_train_timesteps=100,
                      clip=CLIPIdentity.from_identity(clip.identity()))  # fmt: skip
    prior = DiffusionPrior(cfg).eval()
    with torch.no_grad():
        for p in prior.parameters():
            if p.ndim == 2 and p.requires_grad:
                p.normal_(0, 0.3)
    return prior


def build_all_modes(root: Path, seed: int = 0) -> Path:
    """A pipeline folder root/pipe with every mode: the components of `build_components`, its
    transformer reading a CLIP image embedding too (the ar and prior modes), a tiny CLIP, a
    prior for it and a masked generator."""
    parts = build_components(root / "parts", seed)
    torch.manual_seed(seed)
    peaked(Transformer(tiny_transformer_config(cond_dim=EMBED_DIM, cond_tokens=1))).save_pretrained(
        parts["transformer"]
    )
    sizes = dataclasses.replace(TINY_CLIP, text_len=64)  # room for any shapes caption
    clip = CLIP.build(sizes, TextTokenizer.from_pretrained(parts["text_tokenizer"]), seed)
    clip.save_pretrained(root / "clip")
    tiny_prior(clip, seed).save_pretrained(root / "prior")
    masked = peaked(Transformer(tiny_transformer_config(layouts="bidir", objective="masked")))
    masked.save_pretrained(root / "masked")
    return assemble(root / "pipe", parts["text_tokenizer"], parts["vq"], parts["transformer"],
                    clip=root / "clip", prior=root / "prior", masked=root / "masked")  # fmt: skip
