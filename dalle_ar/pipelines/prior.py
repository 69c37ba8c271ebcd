"""The prior mode's part of the autoregressive pipeline (DALL-E 2, Ramesh et al. 2022): caption
-> CLIP text embedding -> diffusion prior -> CLIP image embedding -> a transformer conditioned on
it draws the codes. Also variations (a picture's own CLIP image embedding) and interpolation
(slerp between two embeddings). `ARPipeline` takes these methods from `PriorMode`; they read
its components (clip, prior, cond_transformer or transformer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from dalle_ar.grid import to_uint8
from dalle_ar.models.transformer import Transformer
from dalle_ar.pipelines.base import PipelineOutput
from dalle_ar.prompts import split_prompt
from dalle_ar.sampling.diffusion import check_unit, sample_prior, slerp
from dalle_ar.sampling.settings import PriorSampling, names, resolve


class PriorMode:
    """The prior mode's methods of `ARPipeline` (a mixin: `components`, `defaults`, `device`,
    `transformer`, `scene_embeds` and `__call__` are the pipeline's)."""

    @property
    def cond_transformer(self) -> Transformer:
        """The transformer the prior mode, variations and interpolation draw with: the
        cond_transformer component (DALL-E 2's decoder: conditioned on the CLIP image embedding,
        kept apart so that text mode keeps the text-only transformer) when the pipeline has one,
        else the transformer (one model for both modes)."""
        own = self.components.get("cond_transformer")
        return self.transformer if own is None else own

    def _cond_embeds(
        self, mode: str, prompts: list[str], embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Per prompt for the autoregressive modes: the given image embeddings, the CLIP text
        embedding the prior starts from (mode "prior"; zeros for an empty prompt, the prior's
        "no caption"), or None (the transformer's null embedding, if it takes one). ValueError,
        before any drawing, for a part this pipeline lacks or embeddings of the wrong shape."""
        cfg = self.cond_transformer.cfg
        missing = [k for k in ("clip", "prior") if self.components.get(k) is None]
        if mode == "prior" and missing:  # said first: what the folder lacks
            raise ValueError(
                f"the prior mode needs the {' and '.join(missing)} component(s), which this "
                f"pipeline lacks (its modes: {', '.join(self.modes)}; assemble it with "
                "clip=FOLDER, prior=FOLDER, or run the main job with prior=true)"
            )
        if (mode == "prior" or embeds is not None) and not cfg.takes_cond:
            raise ValueError(
                "this transformer takes no CLIP image embedding (model.cond_dim=0): the prior "
                "mode and variations need one trained with it (`dalle-ar tokens --clip`, then "
                "model.cond_dim = the CLIP's embed_dim)"
            )
        if embeds is not None:
            if mode == "prior":
                raise ValueError("give mode='prior' (the prior draws the embeddings) or embeds, "
                                 "not both")  # fmt: skip
            if embeds.ndim != 2 or embeds.shape != (len(prompts), cfg.cond_dim):
                raise ValueError(f"embeds must have shape ({len(prompts)}, {cfg.cond_dim}), got "
                                 f"{tuple(embeds.shape)}")  # fmt: skip
            check_unit(embeds, "embeds must be unit CLIP image embeddings")
            return embeds.float().cpu()
        if mode != "prior":
            return None
        text = self.scene_embeds(prompts).cpu()
        empty = torch.tensor([not split_prompt(p)[0].strip() for p in prompts])
        return torch.where(empty[:, None], torch.zeros_like(text), text)  # the prior's "none"

    @torch.inference_mode()
    def variations(
        self, images: Sequence[Any], num_samples: int = 4, seed: int | None = None, **kw: Any
    ) -> PipelineOutput:
        """DALL-E 2's variations: `num_samples` new pictures per given picture (PIL images, or
        (3, H, W) tensors in [0, 1]), drawn by the transformer from the picture's CLIP image
        embedding with the empty caption. Keyword arguments as for `__call__` (guidance_scale,
        temperature, candidates, ...; the autoregressive mode's: a prior or masked setting is
        refused). ValueError without a clip component or a transformer trained with the
        embedding."""
        return self(["" for _ in images], num_samples, seed, embeds=self.image_embeds(images),
                    **kw)  # fmt: skip

    @torch.inference_mode()
    def interpolate(
        self, a: Any, b: Any, steps: int = 5, seed: int = 0, **kw: Any
    ) -> PipelineOutput:
        """Pictures along the slerp between the CLIP image embeddings of `a` and `b` (each a
        prompt, whose embedding the prior draws with `seed`, or a picture), at `steps` evenly
        spaced points from a to b, each drawn with the same `seed` and the empty caption
        (DALL-E 2, section 3.2). ValueError for steps < 2."""
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        ps = resolve(kw.pop("prior_settings", None) or self.defaults["prior"],
                     **{k: kw.pop(k) for k in list(kw) if k in names(PriorSampling)})  # fmt: skip
        ends = [self.image_embeds([x]) if not isinstance(x, str) else self._prior_embed(x, seed, ps)
                for x in (a, b)]  # fmt: skip
        t = torch.linspace(0, 1, steps)
        path = slerp(ends[0].expand(steps, -1), ends[1].expand(steps, -1), t)
        return self([""] * steps, 1, seeds=[seed] * steps, embeds=path, **kw)

    def _prior_embed(self, prompt: str, seed: int, ps: PriorSampling) -> torch.Tensor:
        """The prior's image embedding (1, D) for one prompt and seed."""
        text = self._prompt_embeds("prior", [prompt], None)
        return sample_prior(self.components["prior"], text.to(self.device), ps, [seed]).cpu()

    def image_embeds(self, images: Sequence[Any]) -> torch.Tensor:
        """Unit CLIP image embeddings (n, D) of pictures (PIL images, or (3, H, W) tensors in
        [0, 1]). ValueError without a clip component."""
        clip = self.components.get("clip")
        if clip is None:
            raise ValueError("image embeddings need a clip component (assemble with clip=FOLDER)")
        pils = [x if isinstance(x, Image.Image) else Image.fromarray(to_uint8([x])[0])
                for x in images]  # fmt: skip
        return clip.image_embeds(clip.pixels(pils)).cpu()

    def _sample_cond(
        self,
        model: Transformer,
        embeds: torch.Tensor | None,
        rows: list[int],
        seeds: list[int],
        prior: PriorSampling | None,
    ) -> torch.Tensor | None:
        """`model`'s conditioning embedding (len(rows), D) for samples of prompts `rows` (see
        `_draw`), or None for a model without one."""
        if not model.cfg.takes_cond:
            return None
        if embeds is None:
            return model.null_cond(len(rows))
        e = embeds[rows].to(self.device)
        if prior is None:
            return e
        return sample_prior(self.components["prior"], e, prior, seeds)
