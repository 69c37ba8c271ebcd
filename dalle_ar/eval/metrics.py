"""Image-quality metrics against a reference image: PSNR and SSIM (torchmetrics), and an
edge-sharpness ratio. Used to compare an upsampler with plain resizing.

    m = image_metrics(pred, truth)   # {"psnr": (N,), "ssim": (N,), "sharpness": (N,)}
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import (
    image_gradients,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

FLAT = 1e-3  # the least mean gradient magnitude a truth counts as (a flat picture has 0)
PSNR_CAP = 100.0  # dB: a mean squared error of 1e-10 of the peak; exact copies count as this


def image_metrics(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image figures (N,) of pred against truth, both (N, 3, H, W) in [0, 1]:
    "psnr" in dB (Peak Signal-to-Noise Ratio, peak 1; at most PSNR_CAP, so that a mean over
    images stays finite where one is copied exactly), "ssim" (Wang et al. 2004, Gaussian window
    11, sigma 1.5) and "sharpness", the mean gradient magnitude of pred over that of truth (1 =
    as sharp as the truth; < 1 blurrier, > 1 harsher; a flat truth counts as FLAT). ValueError
    for shapes that differ."""
    if pred.shape != truth.shape or pred.ndim != 4:
        raise ValueError(f"expected two (N, 3, H, W) batches of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(truth.shape)}")  # fmt: skip
    pred, truth = pred.double().clamp(0, 1), truth.double().clamp(0, 1)
    psnr = peak_signal_noise_ratio(pred, truth, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.clamp(max=PSNR_CAP)  # an exact copy is infinitely good: counted as PSNR_CAP
    ssim = structural_similarity_index_measure(pred, truth, data_range=1.0, reduction="none")
    sharp = gradient_magnitude(pred) / gradient_magnitude(truth).clamp_min(FLAT)
    return {"psnr": psnr.float(), "ssim": ssim.float(), "sharpness": sharp.float()}


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Mean gradient magnitude (N,) of images (N, C, H, W): sqrt(dx^2 + dy^2) of neighbouring
    pixel differences (torchmetrics' `image_gradients`), averaged over pixels and channels."""
    dy, dx = image_gradients(images)
    return (dx.pow(2) + dy.pow(2)).sqrt().flatten(1).mean(1)


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
              "nearest": Image.Resampling.NEAREST}  # fmt: skip


def pil_resize(images: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """Plain resizing, the baseline an upsampler must beat: images (N, 3, h, w) in [0, 1] ->
    (N, 3, size, size) in [0, 1], each resized by PIL with `method` ("bicubic", "lanczos",
    "nearest") from its 8-bit pixels, as an image viewer or editor would."""
    if method not in RESAMPLING:
        raise ValueError(f"method must be one of {sorted(RESAMPLING)}, got {method!r}")
    arr = images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    out = [np.asarray(Image.fromarray(a).resize((size, size), RESAMPLING[method])) for a in arr]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255)
