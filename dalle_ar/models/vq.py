"""Images <-> discrete codes: a convolutional VQ-VAE with a vector-quantize-pytorch quantizer.

The encoder turns an image (B, 3, H, W) in [0, 1] into a grid of latents (B, D, H/f, W/f) with
f = `downsample` (4 or 8); the quantizer replaces each latent by its nearest codebook entry
(`VectorQuantize`: EMA codebook, k-means initialisation, dead-code replacement) or rounds it onto
a fixed grid (`FSQ`); the decoder maps the quantized grid back to pixels. The code grid
(B, H/f, W/f) is what the transformer models, in raster order.

    vq = VQTokenizer(VQConfig())          # or VQTokenizer.from_pretrained("runs/vq/vq")
    codes = vq.encode(images)             # (B, h, w) int64 in [0, codebook_size)
    images = vq.decode(codes)             # (B, 3, H, W) in [0, 1]
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from vector_quantize_pytorch import FSQ, VectorQuantize

from dalle_ar.checkpoint import file_sha256, load_pretrained, save_pretrained
from dalle_ar.config import require, require_fits_memory

log = logging.getLogger(__name__)

COMPONENT = "vq"
# Pixel values may leave [0, 1] by this much (resampling filters overshoot slightly).
RANGE_TOLERANCE = 1e-3
DRAWN_BELOW = 0.85  # VQConfig.drawn_below's default; folders saved without the field get it


@dataclasses.dataclass
class VQConfig:
    image_size: int = 32  # size it is trained at; any multiple of `downsample` encodes
    downsample: int = 4  # image side / code grid side: 2, 4, 8 or 16 (32x32 -> 16x16 ... 2x2)
    width: int = 64  # channels at full resolution
    channel_mult: list[int] = dataclasses.field(default_factory=list)  # per level; [] = 1,2,2,..
    num_res_blocks: int = 2  # residual blocks per resolution level (encoder and decoder)
    norm: Literal["group", "none"] = "group"  # GroupNorm in every block, or none (2x faster on CPU)
    # conv: a conv stack whose codes see neighbouring patches (and, through GroupNorm, the whole
    # image); patch: each code is a function of its own f x f patch only (a patchify conv, then
    # per-patch residual MLPs), so equal patches always get equal codes. See PatchEncoder.
    encoder: Literal["conv", "patch"] = "conv"
    latent_dim: int = 64  # channels the encoder hands to the quantizer
    quantizer: Literal["vq", "fsq"] = "vq"  # VectorQuantize (EMA codebook) or FSQ
    codebook_size: int = 512  # number of codes; for fsq it must equal prod(fsq_levels)
    codebook_dim: int = 0  # low-dimensional codebook: look up in this many dims; 0 = latent_dim
    use_cosine_sim: bool = False  # l2-normalised inputs and codes (cosine-similarity lookup)
    ema_decay: float = 0.8  # EMA decay of the codebook statistics
    kmeans_init: bool = True  # initialise the codebook by k-means on the first batch
    kmeans_iters: int = 10  # k-means iterations for that initialisation
    threshold_ema_dead_code: float = 2.0  # replace codes whose EMA usage falls below (0 = off)
    rotation_trick: bool = True  # gradients through the lookup by rotation, else straight-through
    fsq_levels: list[int] = dataclasses.field(default_factory=lambda: [8, 8, 8])  # levels per dim
    # A decoded pixel counts as drawn where its darkest channel is below this fraction of white
    # (`drawn_masks`). Right for images on a white background, as the shapes and emoji data are;
    # set it from the data's background. Read only by a transformer with code_input="mask".
    drawn_below: float = DRAWN_BELOW

    def validate(self) -> None:
        require(
            self.downsample in (2, 4, 8, 16),
            "downsample",
            f"must be 2, 4, 8 or 16, got {self.downsample}",
        )
        require(
            self.image_size >= self.downsample and self.image_size % self.downsample == 0,
            "image_size",
            f"must be a multiple of downsample={self.downsample}, got {self.image_size}",
        )
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        levels = self.num_levels
        require(
            not self.channel_mult or len(self.channel_mult) == levels,
            "channel_mult",
            f"needs log2(downsample)+1 = {levels} entries (or none), got {self.channel_mult}",
        )
        require(all(m >= 1 for m in self.channel_mult), "channel_mult", "entries must be >= 1")
        require(self.num_res_blocks >= 0, "num_res_blocks", "must be >= 0")
        require(self.encoder in ("conv", "patch"), "encoder", f"conv|patch, got {self.encoder!r}")
        require(self.latent_dim >= 1, "latent_dim", f"must be >= 1, got {self.latent_dim}")
        require(self.codebook_size >= 2, "codebook_size", f"must be >= 2, got {self.codebook_size}")
        require(self.codebook_dim >= 0, "codebook_dim", "must be >= 0 (0 = latent_dim)")
        require(0.0 < self.ema_decay < 1.0, "ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        require(self.kmeans_iters >= 1, "kmeans_iters", "must be >= 1")
        require(self.threshold_ema_dead_code >= 0, "threshold_ema_dead_code", "must be >= 0")
        below = self.drawn_below
        require(0 < below <= 1, "drawn_below", f"must be in (0, 1] (of white), got {below}")
        if self.quantizer == "fsq":
            require(len(self.fsq_levels) >= 1, "fsq_levels", "needs at least one level")
            # 2 levels need FSQ's symmetry-preserving variant, which this model does not use.
            require(all(v >= 3 for v in self.fsq_levels), "fsq_levels", "entries must be >= 3")
            size = math.prod(self.fsq_levels)
            require(
                self.codebook_size == size,
                "codebook_size",
                f"must equal prod(fsq_levels) = {size} for fsq, got {self.codebook_size}",
            )

    def check_fits_memory(self, prefix: str = "") -> None:
        """ConfigError naming the likely field when the VQ this config builds could not be held
        in this machine's memory (`config.require_fits_memory`); called where a model is built
        here (a recipe's start, a folder's load), not by `validate`."""
        sizes = ("codebook_size", "codebook_dim", "latent_dim", "width", "num_res_blocks")
        require_fits_memory(self, self.num_values(), "a VQ", sizes, prefix)

    def num_values(self) -> int:
        """The numbers the VQ this config builds holds (its state: parameters and the codebook's
        buffers), counted without building it, so that an absurd size is refused before the
        quantizer, which is always built for real, is allocated."""
        group = self.norm == "group"

        def conv(c_in: int, c_out: int, k: int) -> int:
            return c_in * c_out * k * k + c_out

        def res(ch: int) -> int:
            return 2 * conv(ch, ch, 3) + 4 * ch * group

        chs, r, z = self.channels(), self.num_res_blocks, self.latent_dim
        if self.encoder == "patch":
            ch = chs[-1]
            n = conv(3, ch, self.downsample) + max(1, r) * (conv(ch, 2 * ch, 1) +
                                                           conv(2 * ch, ch, 1))  # fmt: skip
        else:
            n = conv(3, chs[0], 3) + r * res(chs[-1]) + 2 * chs[-1] * group
            n += sum(r * res(chs[i]) + conv(chs[i], chs[i + 1], 4) for i in range(len(chs) - 1))
        n += conv(chs[-1], z, 1)  # the encoder's output
        n += conv(z, chs[-1], 3) + r * res(chs[-1]) + 2 * chs[0] * group + conv(chs[0], 3, 3)
        n += sum(conv(chs[i + 1], chs[i], 3) + r * res(chs[i]) for i in range(len(chs) - 1))
        d = len(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_dim or z
        n += 2 * z * d + d + z if d != z else 0  # projections into and out of the codebook
        if self.quantizer == "vq":  # the EMA codebook: embed, embed_avg, cluster_size, initted
            n += 2 * self.codebook_size * d + self.codebook_size + 1
        return n

    @property
    def num_levels(self) -> int:
        """Resolution levels: the input resolution plus one per 2x downsampling."""
        return int(math.log2(self.downsample)) + 1

    def channels(self) -> list[int]:
        mult = self.channel_mult or [1] + [2] * (self.num_levels - 1)
        return [self.width * m for m in mult]


# ----------------------------------------------------------------------------------------------
# Network.


def _norm(ch: int, kind: str) -> nn.Module:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6) if kind == "group" else nn.Identity()


class ResBlock(nn.Module):
    def __init__(self, ch: int, norm: str) -> None:
        super().__init__()
        self.norm1 = _norm(ch, norm)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = _norm(ch, norm)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chs = cfg.channels()
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(len(chs) - 1):
            layers += [ResBlock(chs[i], cfg.norm) for _ in range(cfg.num_res_blocks)]
            layers.append(nn.Conv2d(chs[i], chs[i + 1], 4, stride=2, padding=1))  # halves H, W
        layers += [ResBlock(chs[-1], cfg.norm) for _ in range(cfg.num_res_blocks)]
        self.blocks = nn.Sequential(*layers)
        self.norm_out = _norm(chs[-1], cfg.norm)
        self.conv_out = nn.Conv2d(chs[-1], cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, D, H/f, W/f)


class PatchEncoder(nn.Module):
    """Codes that depend on their own f x f patch and nothing else.

    A conv encoder's codes also describe the neighbourhood (its receptive field spans several
    patches, and GroupNorm pools over the whole image), so one plain white patch can take any of
    hundreds of codes depending on what lies nearby. The transformer then has to predict that
    context-dependent choice as well as the content. Here a patchify conv (kernel = stride = f)
    and residual MLPs applied per patch (1x1 convs, no norm that pools over positions) make the
    code a function of the patch's pixels: equal patches get equal codes. The decoder keeps its
    receptive field and reads the neighbouring codes to draw edges. Cheaper than the conv stack,
    and suited to flat synthetic images (the shapes data); photographs want `conv`.
    """

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch = cfg.channels()[-1]
        f = cfg.downsample
        self.conv_in = nn.Conv2d(3, ch, f, stride=f)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(ch, 2 * ch, 1), nn.SiLU(), nn.Conv2d(2 * ch, ch, 1))
            for _ in range(max(1, cfg.num_res_blocks))
        )
        self.conv_out = nn.Conv2d(ch, cfg.latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = h + block(h)
        return self.conv_out(F.silu(h))  # (B, D, H/f, W/f)


class Upsample(nn.Module):
    def __init__(self, ch_in: int, ch_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nearest-neighbour + conv instead of a transposed conv: no checkerboard artefacts.
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        chs = cfg.channels()
        self.conv_in = nn.Conv2d(cfg.latent_dim, chs[-1], 3, padding=1)
        layers: list[nn.Module] = [ResBlock(chs[-1], cfg.norm) for _ in range(cfg.num_res_blocks)]
        for i in reversed(range(len(chs) - 1)):
            layers.append(Upsample(chs[i + 1], chs[i]))
            layers += [ResBlock(chs[i], cfg.norm) for _ in range(cfg.num_res_blocks)]
        self.blocks = nn.Sequential(*layers)
        self.norm_out = _norm(chs[0], cfg.norm)
        self.conv_out = nn.Conv2d(chs[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W), pixels scaled to [-1, 1]


def _build_quantizer(cfg: VQConfig) -> nn.Module:
    if cfg.quantizer == "fsq":
        return FSQ(levels=list(cfg.fsq_levels), dim=cfg.latent_dim)
    return VectorQuantize(
        dim=cfg.latent_dim,
        codebook_size=cfg.codebook_size,
        codebook_dim=cfg.codebook_dim or None,
        decay=cfg.ema_decay,
        kmeans_init=cfg.kmeans_init,
        kmeans_iters=cfg.kmeans_iters,
        threshold_ema_dead_code=cfg.threshold_ema_dead_code,
        use_cosine_sim=cfg.use_cosine_sim,
        rotation_trick=cfg.rotation_trick,
        straight_through=False,
        # The recipe weights the commitment term itself; the quantizer reports it unweighted.
        commitment_weight=1.0,
        sync_codebook=None,  # built under torch.distributed (DDP): statistics of every rank
    )


def drawn_masks(pixels: torch.Tensor, drawn_below: float = DRAWN_BELOW) -> torch.Tensor:
    """Which pixels of each code's patch are drawn: the one place this rule is written.

    pixels (n, 3*k) floating point in [-1, 1], channel-major (`VQTokenizer.code_pixels`) ->
    (n, k) in the same dtype, 1.0 where a pixel's darkest channel is below `drawn_below` of
    white, else 0.0. The default is also the rule of transformer folders saved without masks.
    Raises ValueError for another rank, a width not a multiple of 3, or integer pixels."""
    if pixels.ndim != 2 or pixels.shape[1] % 3 or not pixels.is_floating_point():
        got = f"{tuple(pixels.shape)} {pixels.dtype}"
        raise ValueError(f"pixels must be a floating-point (n, 3*k) tensor, got {got}")
    rgb = pixels.reshape(pixels.shape[0], 3, -1)  # (n, 3, k)
    # The threshold moved to [-1, 1] in Python floats (0.85 -> 0.7 exactly) and compared in the
    # pixels' dtype: the masks of older folders come out bit for bit.
    return (rgb.amin(-2) < 2 * drawn_below - 1).to(pixels.dtype)


class VQTokenizer(nn.Module):
    """Encoder + quantizer + decoder. `encode`/`decode` are the inference API; `forward` trains."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.encoder = PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)
        self.decoder = Decoder(cfg)
        # The quantizer is always built for real, even under a meta-device build (loading): FSQ
        # reads its levels with .item() in its constructor and both quantizers hold constants in
        # non-persistent buffers that a checkpoint never restores. It is small.
        with torch.device("cpu"):
            self.quantizer = _build_quantizer(cfg)
        # the content hash of the model.safetensors it was loaded from (`file_sha256`), which a
        # model trained on its codes records; None for one built here
        self.weights_sha256: str | None = None

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def grid_size(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Code grid (h, w) for images of side `image_size` (or of (height, width))."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.config.downsample
        if len(hw) != 2 or any(s < f or s % f for s in hw):
            raise ValueError(f"image size must be a positive multiple of {f}, got {image_size}")
        return hw[0] // f, hw[1] // f

    # -- checks ----------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"expected images as a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(
                f"expected images of rank 4 (B, 3, H, W), got shape {tuple(images.shape)}"
            )
        if images.shape[1] != 3:
            raise ValueError(f"expected 3 channels (B, 3, H, W), got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected floating-point images in [0, 1], got {images.dtype}")
        f = self.config.downsample
        h, w = images.shape[-2:]
        if h % f or w % f or h < f or w < f:
            raise ValueError(f"expected height and width multiples of {f}, got {h}x{w}")
        lo, hi = images.min().item(), images.max().item()
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(f"expected pixel values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"expected codes as a torch.Tensor, got {type(codes).__name__}")
        if codes.ndim != 3:
            raise ValueError(f"expected codes of rank 3 (B, h, w), got shape {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"expected integer codes, got {codes.dtype}")
        if codes.numel():
            lo, hi = codes.min().item(), codes.max().item()
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"expected codes in [0, {self.codebook_size}), got range [{lo}, {hi}]"
                )

    # -- quantizer ---------------------------------------------------------------------------
    def _quantize(
        self, z: torch.Tensor, update: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, h, w) latents -> quantized latents, codes (B, h, w), commitment loss."""
        b, d, h, w = z.shape
        x = z.permute(0, 2, 3, 1).reshape(b, h * w, d).float()  # (B, N, D)
        # Distances, EMA statistics and k-means run in fp32 even inside a bf16 autocast region.
        with torch.autocast(device_type=z.device.type, enabled=False):
            if isinstance(self.quantizer, FSQ):
                q, idx = self.quantizer(x)
                commit = x.new_zeros(())
            else:
                q, idx, commit = self.quantizer(x, freeze_codebook=not update)
        q = q.reshape(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
        return q, idx.reshape(b, h, w).long(), commit

    def _lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> quantized latents (B, D, h, w), exactly as the quantizer outputs."""
        b, h, w = codes.shape
        idx = codes.reshape(b, h * w)
        if isinstance(self.quantizer, FSQ):
            q = self.quantizer.indices_to_codes(idx)
        else:
            q = self.quantizer.get_output_from_indices(idx)
        return q.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    # -- API -------------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Training pass: (reconstruction in [0, 1] scale, unclamped; {"commit": ...}; codes).

        In training mode the codebook statistics update (EMA, dead codes, k-means on the first
        batch); in eval mode nothing changes.
        """
        self._check_images(images)
        z = self.encoder(images * 2 - 1)
        q, codes, commit = self._quantize(z, update=self.training)
        recon = self.decoder(q.to(z.dtype)) * 0.5 + 0.5
        return recon, {"commit": commit}, codes

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> codes (B, H/f, W/f) int64.

        Never updates a trained codebook. One exception, inside the quantizer library: a k-means
        codebook that never saw a batch (an untrained model) is initialised by its first one."""
        self._check_images(images)
        z = self.encoder(images * 2 - 1)
        return self._quantize(z, update=False)[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h*f, w*f) in [0, 1]."""
        self._check_codes(codes)
        q = self._lookup(codes.long())
        dtype = next(self.decoder.parameters()).dtype
        return (self.decoder(q.to(dtype)) * 0.5 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def decode_8bit(self, codes: torch.Tensor) -> torch.Tensor:
        """`decode`, rounded to the 8-bit levels a saved PNG holds: what a generated image is
        when CLIP or a metric reads it. Codes (B, h, w) -> (B, 3, h*f, w*f) in [0, 1]."""
        return self.decode(codes).mul(255).round().div(255)

    @torch.no_grad()
    def round_trip(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> their reconstructions through the codes, as
        `decode_8bit` gives them: the VQ's version of a picture, as the generator's outputs look.
        """
        return self.decode_8bit(self.encode(images))

    @torch.no_grad()
    def code_pixels(self) -> torch.Tensor:
        """(codebook_size, 3*f*f): what each code draws, as the centre patch of a 3x3 grid of
        that code alone, pixels in [-1, 1]. A fixed description of the codes for the transformer
        (`TransformerConfig.code_features`)."""
        f, n = self.config.downsample, self.codebook_size
        codes = torch.arange(n, device=next(self.parameters()).device)
        grids = codes[:, None, None].expand(n, 3, 3)
        patches = self.decode(grids)[:, :, f : 2 * f, f : 2 * f]  # (n, 3, f, f)
        return (patches * 2 - 1).reshape(n, -1).float().cpu()

    def code_masks(self) -> torch.Tensor:
        """(codebook_size, f*f) float32 on the CPU: 1.0 where a code's `code_pixels()` patch is
        drawn under `config.drawn_below` (`drawn_masks`), what code_input="mask" feeds."""
        return drawn_masks(self.code_pixels(), self.config.drawn_below)

    # -- folders ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write the component folder (config.json + model.safetensors), atomically."""
        save_pretrained(self, self.config, path, COMPONENT)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> VQTokenizer:
        """Load a folder written by `save_pretrained` (strict; eval mode); `weights_sha256` is
        its model.safetensors' hash."""
        model = load_pretrained(cls, VQConfig, path, COMPONENT)
        model.weights_sha256 = file_sha256(Path(path) / "model.safetensors")
        book = getattr(model.quantizer, "_codebook", None)
        if book is not None and not bool(book.initted):
            log.warning("%s: codebook saved before its k-means initialisation (untrained)", path)
        return model.to(device).eval()
