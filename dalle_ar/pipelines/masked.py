"""The masked mode's part of the autoregressive pipeline: inpainting and outpainting with the
masked generator (MaskGIT, Chang et al. 2022), which redraws any region of a picture's codes from
everything around it. `ARPipeline` takes these methods from `MaskedMode`; the drawing itself is
`dalle_ar.sampling.masked.generate_masked`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from dalle_ar.pipelines.base import PipelineOutput


class MaskedMode:
    """The masked mode's methods of `ARPipeline` (a mixin: `components`, `vq`, `_image_size`,
    `_encode_image` and `__call__` are the pipeline's)."""

    def inpaint_codes(self, images: Sequence[Any], masks: Sequence[Any]) -> torch.Tensor:
        """Start codes (n, h, w) for `inpaint`: each picture's codes, the masked generator's mask
        id where its mask covers any pixel of the code's patch. A mask is a PIL image (any mode:
        non-zero = repaint) or an (H, W) array (true or non-zero = repaint), resized to the
        picture's size (nearest). ValueError for counts that differ or a mask that repaints
        nothing."""
        if len(images) != len(masks):
            raise ValueError(f"one mask per picture: {len(images)} pictures, {len(masks)} masks")
        h, w = self._image_size()
        mask_id = self.components["masked"].cfg.mask_id if "masked" in self.components else None
        if mask_id is None:
            raise ValueError("inpainting needs the masked component (assemble with "
                             "masked=FOLDER, or run the main job with masked=true)")  # fmt: skip
        out = []
        for i, (image, mask) in enumerate(zip(images, masks)):
            m = mask if isinstance(mask, Image.Image) else Image.fromarray(
                (np.asarray(mask) != 0).astype(np.uint8) * 255)  # fmt: skip
            m = np.asarray(m.convert("L").resize((w, h), Image.NEAREST)) > 0  # (H, W)
            f = self.vq.config.downsample
            grid = torch.from_numpy(m.reshape(h // f, f, w // f, f).any(axis=(1, 3)))
            if not grid.any():
                raise ValueError(f"mask {i} repaints nothing")
            out.append(torch.where(grid, mask_id, self._encode_image(image)[0]))
        return torch.stack(out)

    @torch.inference_mode()
    def inpaint(
        self,
        images: Sequence[Any],
        masks: Sequence[Any],
        prompts: str | Sequence[str],
        num_samples: int = 1,
        seed: int | None = None,
        **kw: Any,
    ) -> PipelineOutput:
        """Repaint the masked region of each picture to its prompt, in the masked mode: the codes
        under the rest of the picture are kept exactly and the masked generator draws the others
        from everything around them (outpainting: mask the border). images: PIL images or
        (3, H, W) tensors in [0, 1], resized to the VQ's size; masks: `inpaint_codes`; prompts:
        one per picture (or one for all). Keyword arguments as for `__call__` in the masked mode
        (steps, temperature, guidance_scale, candidates, ...)."""
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"one prompt per picture: {len(images)} pictures, {len(prompts)} "
                             "prompts")  # fmt: skip
        init = self.inpaint_codes(images, masks)
        return self(prompts, num_samples, seed, mode="masked", init_codes=init, **kw)

    # -- generation ------------------------------------------------------------------------
