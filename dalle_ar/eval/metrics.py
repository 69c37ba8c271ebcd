"""Image-quality metrics. Against a reference image: PSNR and SSIM (torchmetrics), and an
edge-sharpness ratio (an upsampler against plain resizing; a VQ's reconstructions). Over sets of
embeddings and images (`dalle_ar.eval.quality`): CLIP R-precision, the Frechet distance on any
feature extractor's features (torchmetrics), the cosine to the nearest reference image.

    m = image_metrics(pred, truth)   # {"psnr": (N,), "ssim": (N,), "sharpness": (N,)}
    hits = r_precision(image_embeds, text_embeds, pools)    # (N,) bool
    fd = frechet_distances(real, {"generated": fake}, feature)  # {"generated": float}
"""

from __future__ import annotations

import random
from collections.abc import Sequence

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


def distractor_pools(
    captions: Sequence[str], pool: Sequence[str], size: int, seed: int = 0
) -> torch.Tensor:
    """Indices (N, R) into `sorted(set(pool))` (the distinct captions, sorted: embed the captions in
    that order) for CLIP R-precision: row i holds captions[i]'s own index first, then R - 1 other
    distinct captions of `pool`, drawn without replacement from those that differ from it (Park et
    al. 2021, "Benchmark for Compositional Text-to-Image Synthesis": R = 100, one true caption and
    99 others). R = min(size, distinct captions in pool); row i depends only on `seed`, i and the
    pool. ValueError for a caption not in `pool`, size < 2 or fewer than 2 distinct captions."""
    if size < 2:
        raise ValueError(f"R-precision pools need at least 2 captions (own + 1), got {size}")
    distinct = sorted(set(pool))
    if len(distinct) < 2:
        raise ValueError(f"R-precision needs at least 2 distinct captions, got {len(distinct)}")
    index = {c: i for i, c in enumerate(distinct)}
    missing = [c for c in captions if c not in index]
    if missing:
        raise ValueError(f"caption {missing[0]!r} is not in the R-precision pool")
    r = min(size, len(distinct))
    rows = []
    for i, c in enumerate(captions):
        others = random.Random(f"r-precision-{seed}-{i}").sample(range(len(distinct) - 1), r - 1)
        own = index[c]
        rows.append([own] + [j + (j >= own) for j in others])  # skip the own caption's index
    return torch.tensor(rows, dtype=torch.long)


def r_precision(image: torch.Tensor, text: torch.Tensor, pools: torch.Tensor) -> torch.Tensor:
    """CLIP R-precision at top 1 (Xu et al. 2018, AttnGAN; Park et al. 2021, with CLIP): whether
    each image (N, D) unit embedding is closer, by cosine, to its own caption than to every other
    caption of its pool. text: unit caption embeddings (M, D); pools: (N, R) indices into text, the
    own caption first (`distractor_pools`). A tie with a distractor counts as a miss. Returns (N,)
    bool; chance is 1 / R."""
    if image.ndim != 2 or pools.shape[0] != image.shape[0] or pools.shape[1] < 2:
        raise ValueError(f"expected image embeddings (N, D) and pools (N, R >= 2), got "
                         f"{tuple(image.shape)} and {tuple(pools.shape)}")  # fmt: skip
    cos = torch.einsum("nd,nrd->nr", image.float(), text.float()[pools])  # (N, R)
    return cos[:, 0] > cos[:, 1:].max(1).values


def nearest_cosine(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The cosine of each unit embedding queries (N, D) to its nearest of refs (M, D), unit too:
    (N,) float32. Computed `chunk` references at a time."""
    if refs.shape[0] == 0:
        raise ValueError("nearest_cosine needs at least one reference embedding")
    best = torch.full((queries.shape[0],), -1.0)
    for s in range(0, refs.shape[0], chunk):
        sims = queries.float() @ refs[s : s + chunk].float().T  # (N, chunk)
        best = torch.maximum(best, sims.max(1).values.cpu())
    return best


def frechet_distances(
    real: torch.Tensor,
    others: dict[str, torch.Tensor],
    feature: torch.nn.Module | int,
    batch_size: int = 64,
    weights_path: str | None = None,
) -> dict[str, float]:
    """Frechet distance (Heusel et al. 2017) between the features of `real` and those of each
    set of `others`, by torchmetrics' `FrechetInceptionDistance` (the real statistics computed
    once). Images are (N, 3, H, W) float in [0, 1], at least 2 per set. `feature`: an nn.Module
    that maps such a batch to (N, d) features (then this is the distance on its features, not
    FID), or torchmetrics' Inception v3 layer (2048: FID itself; needs torch-fidelity and
    `weights_path`, the FID Inception weights on disk). Returns {name: distance}."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    sets = {"real": real, **others}
    small = [k for k, v in sets.items() if v.ndim != 4 or v.shape[0] < 2 or v.shape[1] != 3]
    if small:
        raise ValueError(f"the Frechet distance needs at least 2 images (N, 3, H, W) per set; "
                         f"{small[0]!r} has shape {tuple(sets[small[0]].shape)}")  # fmt: skip
    # normalize=True: float images in [0, 1] (a custom module gets them as they are; the Inception
    # path turns them into the 8-bit pixels it was defined on)
    kw = {} if weights_path is None else {"feature_extractor_weights_path": weights_path}
    metric = FrechetInceptionDistance(feature=feature, normalize=True,
                                      reset_real_features=False, **kw)  # fmt: skip
    with torch.no_grad():
        for s in range(0, real.shape[0], batch_size):
            metric.update(real[s : s + batch_size].float(), real=True)
        out = {}
        for name, images in others.items():
            metric.reset()  # the fake statistics only
            for s in range(0, images.shape[0], batch_size):
                metric.update(images[s : s + batch_size].float(), real=False)
            out[name] = float(metric.compute())
    return out
