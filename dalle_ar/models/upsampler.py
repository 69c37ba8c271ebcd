"""The cascade's upsampler: a diffusion model that draws a large image given a small one (SR3,
Saharia et al. 2021; Imagen, Saharia et al. 2022, section 2.5).

The network is diffusers' `UNet2DConditionModel`, built from `UpsamplerConfig`. The small image
is upsampled to the large size (bicubic) and concatenated to the noisy large image on the
channel axis (6 input channels), as SR3 and Imagen do. Noise-conditioning augmentation (Imagen,
section 2.5): the upsampled small image is itself noised to a level `noise_level` (a timestep of
the training schedule, 0 = almost clean) and that level is given to the network as a second
timestep (`class_embed_type="timestep"`), so it learns to ignore what a generator's small image
gets wrong at fine scale. Optional caption conditioning (`caption_dim` > 0): the pooled CLIP
text embedding of the caption, read through the UNet's "text" added embedding.

Images are (B, 3, H, W) floats in [-1, 1]. The network predicts the clean image x0 by default
(`prediction_type="sample"`): an upsampler's answer is nearly fixed by its small image, and on the
shapes (32 -> 64 px, batch 16, the same budget) x0-prediction reached 32.7 dB PSNR at 350 steps
where v-prediction (Salimans & Ho 2022) was at 29.9 dB after 689, its pictures still grainy
(docs/results.md#the-cascade). "v_prediction" and "epsilon" remain settings.

    up = Upsampler(UpsamplerConfig(low_size=32, scale=2))
    cond = up.condition(low, noise_level, aug_noise)  # (B, 3, 64, 64): upsampled, augmented
    x0 = up(x_t, t, cond, noise_level)                 # (B, 3, 64, 64): the clean image
    upsample_images(...)                               # dalle_ar.sampling.diffusion: the loop
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn

from dalle_ar import schedulers
from dalle_ar.checkpoint import load_pretrained, read_component_config, save_pretrained
from dalle_ar.config import require, require_fits_memory
from dalle_ar.identity import CLIPIdentity
from dalle_ar.models.prior import BETA_SCHEDULES
from dalle_ar.runtime import values_by_depth

COMPONENT = "upsampler"
PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")


@dataclasses.dataclass
class UpsamplerConfig:
    """The upsampler's sizes and noise schedule (`configs/<data>/upsampler.yaml`, key `model`)."""

    low_size: int = 32  # side of the small input image, pixels
    scale: int = 2  # the large image's side is low_size * scale
    channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128])  # per level
    layers_per_block: int = 1  # ResNet blocks per level
    norm_groups: int = 8  # GroupNorm groups (must divide every channel count)
    # self-attention in the lowest resolution's down and up blocks (diffusers' AttnDownBlock2D /
    # AttnUpBlock2D), and a middle ResNet block there
    mid_attention: bool = True
    num_train_timesteps: int = 1000  # diffusion steps of the training schedule
    beta_schedule: str = "squaredcos_cap_v2"  # Nichol & Dhariwal 2021's cosine
    prediction_type: str = "sample"  # x0-prediction; or "v_prediction", "epsilon"
    max_noise_level: int = 350  # training draws the augmentation level in [0, max_noise_level]
    caption_dim: int = 0  # the CLIP text-embedding dim it reads (0 = no caption conditioning)
    # the CLIP whose text embeddings it reads (caption_dim > 0); filled by the recipe
    clip: CLIPIdentity = dataclasses.field(default_factory=CLIPIdentity)

    @property
    def high_size(self) -> int:
        return self.low_size * self.scale

    def validate(self) -> None:
        require(self.low_size >= 8, "low_size", f"must be >= 8, got {self.low_size}")
        require(self.scale >= 2, "scale", f"must be >= 2, got {self.scale}")
        levels = len(self.channels)
        require(levels >= 1 and all(c >= 1 for c in self.channels), "channels",
                f"must be a non-empty list of positive ints, got {self.channels}")  # fmt: skip
        require(self.high_size % 2 ** (levels - 1) == 0, "channels",
                f"{levels} levels halve the side {levels - 1} times: {self.high_size} must divide "
                f"by {2 ** (levels - 1)}")  # fmt: skip
        g = self.norm_groups
        require(g >= 1 and all(c % g == 0 for c in self.channels), "norm_groups",
                f"must divide every channel count {self.channels}, got {g}")  # fmt: skip
        require(self.layers_per_block >= 1, "layers_per_block", "must be >= 1")
        require(self.num_train_timesteps >= 2, "num_train_timesteps", "must be >= 2")
        require(self.beta_schedule in BETA_SCHEDULES, "beta_schedule",
                f"must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")  # fmt: skip
        require(self.prediction_type in PREDICTION_TYPES, "prediction_type",
                f"must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")  # fmt: skip
        T, a = self.num_train_timesteps, self.max_noise_level
        require(0 <= a < T, "max_noise_level", f"must be in [0, {T}), got {a}")
        require(self.caption_dim >= 0, "caption_dim", f"must be >= 0, got {self.caption_dim}")
        d = self.clip.embed_dim
        require(d in (0, self.caption_dim), "clip.embed_dim",
                f"must equal caption_dim={self.caption_dim} (or 0 = unknown), got {d}")  # fmt: skip

    def check_fits_memory(self, prefix: str = "") -> None:
        """ConfigError naming the likely field when the upsampler this config builds could not
        be held in this machine's memory (`config.require_fits_memory`, counted on the meta
        device: `runtime.values_by_depth`); called where one is built here (the recipe's start,
        a folder's load), not by `validate`."""
        values = values_by_depth(
            lambda n: Upsampler(dataclasses.replace(self, layers_per_block=n)),
            n=self.layers_per_block,
        )
        sizes = ("channels", "layers_per_block", "caption_dim")
        require_fits_memory(self, values, "an upsampler", sizes, prefix)


class Upsampler(nn.Module):
    """x_t (B, 3, H, W) noisy large images, t (B,) long timesteps, cond (B, 3, H, W) the
    conditioning image (`condition`), noise_level (B,) long its augmentation level, text (B, D)
    unit CLIP text embeddings when `caption_dim` > 0 -> the network's prediction (B, 3, H, W)
    (x0, v or epsilon by `prediction_type`)."""

    def __init__(self, cfg: UpsamplerConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        levels = len(cfg.channels)
        caption = cfg.caption_dim > 0

        def low_block(kind: str) -> str:  # the lowest level's block, with attention or not
            return f"Attn{kind}Block2D" if cfg.mid_attention else f"{kind}Block2D"

        self.net = UNet2DConditionModel(
            sample_size=cfg.high_size,
            in_channels=6,  # the noisy image and the upsampled small one
            out_channels=3,
            down_block_types=("DownBlock2D",) * (levels - 1) + (low_block("Down"),),
            up_block_types=(low_block("Up"),) + ("UpBlock2D",) * (levels - 1),
            mid_block_type="UNetMidBlock2D" if cfg.mid_attention else None,
            block_out_channels=tuple(cfg.channels),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_groups,
            class_embed_type="timestep",  # the augmentation level, embedded as a timestep
            addition_embed_type="text" if caption else None,  # the pooled caption embedding
            cross_attention_dim=cfg.caption_dim if caption else cfg.channels[-1],
            addition_embed_type_num_heads=1,
            attention_head_dim=cfg.channels[-1],  # one head in the lowest level's attention
        )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        noise_level: torch.Tensor,
        text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        s, b = self.cfg.high_size, len(x_t)
        if x_t.shape[1:] != (3, s, s) or cond.shape != x_t.shape:
            raise ValueError(f"expected x_t and cond of shape (B, 3, {s}, {s}), got "
                             f"{tuple(x_t.shape)} and {tuple(cond.shape)}")  # fmt: skip
        if t.shape != (b,) or noise_level.shape != (b,):
            raise ValueError(f"expected t and noise_level of shape ({b},), got "
                             f"{tuple(t.shape)} and {tuple(noise_level.shape)}")  # fmt: skip
        d = self.cfg.caption_dim
        if d and (text is None or text.shape != (b, d)):
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"this upsampler reads the caption: expected text of shape ({b}, "
                             f"{d}), got {got}")  # fmt: skip
        if not d and text is not None:
            raise ValueError("this upsampler takes no caption (caption_dim = 0), got text")
        enc = None if text is None else text[:, None].to(x_t.dtype)  # (B, 1, D)
        out = self.net(torch.cat([x_t, cond], 1), t, encoder_hidden_states=enc,
                       class_labels=noise_level, return_dict=False)  # fmt: skip
        return out[0]

    def condition(
        self, low: torch.Tensor, noise_level: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """The network's conditioning image (B, 3, H, W): the small images low (B, 3, h, w) in
        [-1, 1] upsampled (bicubic, clamped to [-1, 1]) and noised to `noise_level` (B,) of the
        training schedule with `noise` (B, 3, H, W). ValueError for a small image of another
        size."""
        check_small(self.cfg, tuple(low.shape))
        up = F.interpolate(low, scale_factor=self.cfg.scale, mode="bicubic", align_corners=False)
        return train_scheduler(self.cfg).add_noise(up.clamp(-1, 1), noise, noise_level)

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Upsampler:
        """Load a component folder; a checkpoint of another shape is refused by name."""
        return load_pretrained(cls, UpsamplerConfig, path, COMPONENT)

    def save_pretrained(self, path: str | Path) -> None:
        save_pretrained(self, self.cfg, path, COMPONENT)


def check_small(cfg: UpsamplerConfig, shape: tuple[int, ...]) -> None:
    """ValueError unless `shape` is a batch of the upsampler's small RGB pictures
    (B, 3, low_size, low_size)."""
    h = cfg.low_size
    if len(shape) != 4 or tuple(shape[1:]) != (3, h, h):
        raise ValueError(f"the upsampler takes {h}x{h} RGB images (B, 3, {h}, {h}), got a batch "
                         f"of shape {tuple(shape)}")  # fmt: skip


def downscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """The small version (N, 3, size, size) of images (N, 3, H, W) in [0, 1] that an upsampler
    learns to undo: a box filter (each small pixel the mean of the large ones it covers), rounded
    to 8 bits as a picture file holds it."""
    small = F.interpolate(images.float(), size=(size, size), mode="area")
    return small.mul(255).round().div(255)


def read_config(path: str | Path) -> UpsamplerConfig:
    """The config of an upsampler folder, without loading its weights."""
    return read_component_config(path, COMPONENT, UpsamplerConfig)


def train_scheduler(cfg: UpsamplerConfig) -> DDPMScheduler:
    """The training schedule (`add_noise`), images clipped to [-1, 1]. Also the schedule of the
    noise-conditioning augmentation, so that a level is a timestep of it (as diffusers' x4
    upscaler pipeline does)."""
    return schedulers.train_scheduler(
        cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type, True
    )


def sample_scheduler(cfg: UpsamplerConfig) -> DDIMScheduler:
    """The sampling schedule (DDIM, `dalle_ar.schedulers.sample_scheduler`)."""
    return schedulers.sample_scheduler(
        cfg.num_train_timesteps, cfg.beta_schedule, cfg.prediction_type, True
    )
