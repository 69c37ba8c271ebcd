"""The DALL-E 2 diffusion prior: a CLIP text embedding -> a CLIP image embedding (Ramesh et al.
2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents", section 2.1).

The network is diffusers' `PriorTransformer` over four tokens: [the text embedding, the timestep,
the noisy image embedding, a learned "prd" token whose output is the prediction]. It is
conditioned on the pooled CLIP text embedding alone (no per-token text encodings), and it
predicts the clean embedding x0 directly, as the paper does ("we found it better to predict the
unnoised z_i directly"). The "no caption" condition of classifier-free guidance is a zero text
embedding.

CLIP embeddings are unit vectors (entries ~ +-1/sqrt(D)), badly scaled for Gaussian noise of
variance 1, so the model works in per-dimension normalised space x = (e - mean) / std. The
mean and std live in the PriorTransformer's own `clip_mean` / `clip_std` (set by the recipe from
training data, `set_stats`) and are saved with the weights.

    prior = DiffusionPrior(PriorConfig(embed_dim=128))
    x0 = prior(x_t, t, text)                 # (B, D) normalised, x0-prediction
    e = prior.denormalise(x0)                # CLIP image-embedding space
    sample_prior(...)                        # dalle_ar.sampling.diffusion: the DDIM loop

The noise schedules are apart from the network (`train_scheduler`, `sample_scheduler`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer
from torch import nn

from dalle_ar import schedulers
from dalle_ar.checkpoint import load_pretrained, read_component_config, save_pretrained
from dalle_ar.config import require, require_fits_memory
from dalle_ar.identity import CLIPIdentity, check_clip_identity
from dalle_ar.runtime import values_by_depth

COMPONENT = "prior"
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


@dataclasses.dataclass
class PriorConfig:
    """The prior's sizes and noise schedule (`configs/<data>/prior.yaml`, key `model`)."""

    embed_dim: int = 128  # D: the CLIP projection dim, of the text and image embeddings alike
    width: int = 256  # transformer width (= heads * head_dim)
    heads: int = 4  # attention heads
    layers: int = 4  # transformer blocks
    dropout: float = 0.0  # in the transformer blocks
    num_train_timesteps: int = 1000  # diffusion steps of the training schedule
    beta_schedule: str = "squaredcos_cap_v2"  # Nichol & Dhariwal 2021's cosine, as the paper
    # the CLIP whose embeddings it was trained on; filled by the recipe, never by hand
    clip: CLIPIdentity = dataclasses.field(default_factory=CLIPIdentity)

    def validate(self) -> None:
        require(self.embed_dim >= 1, "embed_dim", f"must be >= 1, got {self.embed_dim}")
        require(self.heads >= 1 and self.width % self.heads == 0, "heads",
                f"must divide width={self.width}, got {self.heads}")  # fmt: skip
        require(self.layers >= 1, "layers", f"must be >= 1, got {self.layers}")
        require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(self.num_train_timesteps >= 2, "num_train_timesteps",
                f"must be >= 2, got {self.num_train_timesteps}")  # fmt: skip
        require(self.beta_schedule in BETA_SCHEDULES, "beta_schedule",
                f"must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")  # fmt: skip
        d = self.clip.embed_dim
        require(d in (0, self.embed_dim), "clip.embed_dim",
                f"must equal embed_dim={self.embed_dim} (or 0 = unknown), got {d}")  # fmt: skip

    def check_fits_memory(self, prefix: str = "") -> None:
        """ConfigError naming the likely field when the prior this config builds could not be
        held in this machine's memory (`config.require_fits_memory`, counted on the meta device:
        `runtime.values_by_depth`); called where a prior is built here (the recipe's start, a
        folder's load), not by `validate`."""
        values = values_by_depth(
            lambda n: DiffusionPrior(dataclasses.replace(self, layers=n)), n=self.layers
        )
        sizes = ("embed_dim", "width", "layers")
        require_fits_memory(self, values, "a prior", sizes, prefix)


class DiffusionPrior(nn.Module):
    """x_t (B, D) normalised noisy image embeddings, t (B,) long timesteps, text (B, D) unit text
    embeddings (zeros: no caption) -> the predicted clean x0 (B, D), normalised."""

    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.net = PriorTransformer(
            num_attention_heads=cfg.heads,
            attention_head_dim=cfg.width // cfg.heads,
            num_layers=cfg.layers,
            embedding_dim=cfg.embed_dim,
            num_embeddings=0,  # no per-token text encodings: the pooled embedding alone
            additional_embeddings=4,  # [text embedding, time, noisy image embedding, prd]
            dropout=cfg.dropout,
            norm_in_type="layer",
            embedding_proj_norm_type="layer",
            encoder_hid_proj_type=None,
            added_emb_type="prd",
            clip_embed_dim=cfg.embed_dim,
        )
        # Data statistics, not trained: set by `set_stats`; identity until then.
        self.net.clip_mean.requires_grad_(False)
        self.net.clip_std.requires_grad_(False)
        with torch.no_grad():
            self.net.clip_std.fill_(1.0)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        d = self.cfg.embed_dim
        if x_t.ndim != 2 or x_t.shape[1] != d or text.shape != x_t.shape:
            raise ValueError(f"expected x_t and text of shape (B, {d}), got "
                             f"{tuple(x_t.shape)} and {tuple(text.shape)}")  # fmt: skip
        if t.shape != (len(x_t),):
            raise ValueError(f"expected t of shape ({len(x_t)},), got {tuple(t.shape)}")
        out = self.net(x_t, t, proj_embedding=text, encoder_hidden_states=None,
                       attention_mask=None, return_dict=False)  # fmt: skip
        return out[0]  # (B, D)

    # -- normalisation ---------------------------------------------------------------------
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-dimension mean and std (D,) of the training image embeddings; std must be > 0."""
        d = self.cfg.embed_dim
        if mean.shape != (d,) or std.shape != (d,):
            raise ValueError(f"expected mean and std of shape ({d},), got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")  # fmt: skip
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("std must be > 0 and mean finite in every dimension")
        with torch.no_grad():
            self.net.clip_mean.copy_(mean[None])
            self.net.clip_std.copy_(std[None])

    def normalise(self, e: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B, D) -> the model's space."""
        return (e - self.net.clip_mean) / self.net.clip_std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """The model's space (B, D) -> CLIP image-embedding space (not re-normalised to unit)."""
        return self.net.post_process_latents(x)

    # -- persistence -----------------------------------------------------------------------
    def init_non_persistent_buffers(self) -> None:
        """Rebuild the causal mask diffusers keeps as an unsaved buffer (`load_pretrained` calls
        this after loading on the meta device). It is unused here (no attention mask is given:
        the prd token reads all four tokens), but it must not stay on meta."""
        n = self.net.causal_attention_mask.shape[-1]
        mask = torch.full((n, n), -10000.0, device=self.net.clip_mean.device).triu_(1)
        self.net.register_buffer("causal_attention_mask", mask[None], persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DiffusionPrior:
        """Load a component folder; a checkpoint of another shape is refused by name."""
        return load_pretrained(cls, PriorConfig, path, COMPONENT)

    def save_pretrained(self, path: str | Path) -> None:
        save_pretrained(self, self.cfg, path, COMPONENT)


def read_config(path: str | Path) -> PriorConfig:
    """The config of a prior folder, without loading its weights."""
    return read_component_config(path, COMPONENT, PriorConfig)


def train_scheduler(cfg: PriorConfig) -> DDPMScheduler:
    """The training schedule (`add_noise`): x0-prediction, unclipped (embeddings are not in
    [-1, 1])."""
    return schedulers.train_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, "sample", False)


def sample_scheduler(cfg: PriorConfig) -> DDIMScheduler:
    """The sampling schedule (DDIM, `dalle_ar.schedulers.sample_scheduler`), x0-prediction."""
    return schedulers.sample_scheduler(cfg.num_train_timesteps, cfg.beta_schedule, "sample", False)


def check_clip(
    prior: DiffusionPrior, clip_identity: dict[str, Any], allow_mismatch: bool = False
) -> None:
    """ValueError naming both when `prior` was trained on another CLIP than the one
    `clip_identity` (`CLIP.identity()`) describes (`identity.check_clip_identity`)."""
    check_clip_identity("the prior", prior.cfg.clip, prior.cfg.embed_dim, clip_identity,
                        allow_mismatch)  # fmt: skip
