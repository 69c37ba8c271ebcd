"""The autoregressive pipeline: prompt -> BPE ids -> the transformer draws the image codes one by
one -> the VQ decoder draws the pixels; the prior mode's and the masked mode's parts are in
`dalle_ar.pipelines.prior` and `dalle_ar.pipelines.masked`, the compatibility checks in
`dalle_ar.pipelines.compat`, and writing a folder from trained components in
`dalle_ar.pipelines.assembly` (`assemble`).

- mode="ar" (DALL-E): the caption alone (an embedding-conditioned transformer gets its learned
  null embedding).
- mode="prior" (DALL-E 2): caption -> CLIP text embedding -> diffusion prior -> CLIP image
  embedding -> a transformer draws the codes from that embedding and the caption. Needs the
  clip and prior components and a transformer trained with the embedding (model.cond_dim): the
  cond_transformer component (DALL-E 2's decoder, beside the text-only transformer), or the
  transformer itself when one model serves both modes.
  `variations(images)` draws from given pictures' CLIP image embeddings; `interpolate(a, b)`
  from the slerp between two prompts' or pictures' embeddings.

    pipe = ARPipeline.from_pretrained("runs/main/pipeline")
    out = pipe(["a small red circle at the top left"], num_samples=4, seed=0, top_k=64)
    out.images[0].save("0.png"); out.codes  # (4, h, w); out.samples[0] = {"prompt", "seed", ..}
    out = pipe(["a small red circle at the top left"], mode="prior", prior_steps=25)

Every sample is reproducible alone from its metadata: `pipe([prompt], seeds=[seed], ...)` gives
the same codes and pixels whatever batch it first came from (`dalle_ar.sampling`). Prompts may be
composed ("scene AND part AND part::w", `dalle_ar.prompts`); empty, over-long and odd-character
prompts are warned about.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from tqdm import tqdm

from dalle_ar.config import require_fits
from dalle_ar.grid import to_uint8
from dalle_ar.models.clip import CLIP
from dalle_ar.models.prior import DiffusionPrior
from dalle_ar.models.transformer import Transformer
from dalle_ar.models.upsampler import Upsampler
from dalle_ar.models.vq import VQTokenizer
from dalle_ar.pipelines.base import Finisher, OnBatch, Pipeline, PipelineOutput
from dalle_ar.pipelines.compat import (
    check_compatible,
    check_cond_transformer,
    check_masked,
    check_prior,
    check_trained_on,
    check_upsampler,
    image_size,
)
from dalle_ar.pipelines.folder import AR_COMPONENTS
from dalle_ar.pipelines.masked import MaskedMode
from dalle_ar.pipelines.prior import PriorMode
from dalle_ar.prompts import encode_prompts, known_chars, split_prompt, unseen_words
from dalle_ar.rerank import pmi_scores
from dalle_ar.runtime import sample_seeds
from dalle_ar.sampling import ARSampling, RerankSettings, generate_image_tokens
from dalle_ar.sampling.masked import generate_masked, masked_precision
from dalle_ar.sampling.settings import (
    RERANKERS,
    MaskedSampling,
    PriorSampling,
    UpsampleSampling,
    names,
    reranker_parts,
    resolve,
    split_overrides,
)
from dalle_ar.text import TextBatch, TextTokenizer

log = logging.getLogger(__name__)
# about what one sample's record (its seed, settings and scores) holds in Python, for the memory
# check of a call's output (`ARPipeline.check_output_fits`)
RECORD_BYTES = 2048
MEMORY_MB = 512.0  # what a generation call's batches may hold, by default (`candidate_batch`)
MAX_BATCH = 64  # samples drawn at once, at most: past it a CPU decode step gains little
# what draws a sample: the transformer from the caption alone, or from the prior's embedding
# too, or the masked generator (parallel unmasking)
MODES = ("ar", "prior", "masked")
# the settings sections (of `ARPipeline.settings`) each mode draws with; reranking ("rerank")
# and the cascade ("upsample") apply in every mode
MODE_SECTIONS = {"ar": ("ar",), "prior": ("ar", "prior"), "masked": ("masked",)}


def mode_classes(mode: str) -> list[type]:
    """The settings classes `mode` draws with (`MODE_SECTIONS`, `ARPipeline.settings`), without
    the reranking and cascade settings every mode takes. KeyError for an unknown mode."""
    return [ARPipeline.settings[section] for section in MODE_SECTIONS[mode]]


def mode_setting_names(mode: str) -> tuple[str, ...]:
    """The names of the sampling settings `mode` draws with (`mode_classes`)."""
    return tuple(n for cls in mode_classes(mode) for n in names(cls))


def check_mode_settings(
    mode: str, given: Collection[str], flags: bool = False, call: str = ""
) -> None:
    """ValueError, before any drawing, naming the settings among `given` (setting names) that
    `mode` does not draw with but another mode does (`MODE_SECTIONS`), which the call would
    otherwise ignore: by field name, or (`flags`) by command-line flag, each with the modes it
    belongs to; `call` names the call in the message (default: the mode). An unknown mode, and
    names no mode has, are left to the caller's own checks."""
    if mode not in MODE_SECTIONS:
        return
    own = set(mode_setting_names(mode))
    owners: dict[str, list[str]] = {}
    label: dict[str, str] = {}
    for other in MODE_SECTIONS:
        for cls in mode_classes(other):
            for f in dataclasses.fields(cls):
                if f.name in given and f.name not in own:
                    owners.setdefault(f.name, []).append(other)
                    label.setdefault(f.name, f.metadata["flag"] if flags else repr(f.name))
    if owners:
        where = call or (f"--mode {mode}" if flags else f"mode={mode!r}")
        what = ", ".join(f"{label[n]} ({' and '.join(owners[n])} mode"
                         f"{'s' if len(owners[n]) > 1 else ''})"
                         for n in sorted(owners))  # fmt: skip
        raise ValueError(f"{where} would ignore settings of other modes: {what}")


class ARPipeline(PriorMode, MaskedMode, Pipeline):
    """Text tokenizer + transformer + VQ decoder: the autoregressive modes, "ar" (the caption
    alone) and, with the clip and prior components, "prior" (the prior's CLIP image embedding and
    the caption)."""

    mode: ClassVar[str] = "ar"
    required: ClassVar[tuple[str, ...]] = tuple(AR_COMPONENTS)
    # the CLIP reranker; the prior mode (and its embedding-conditioned transformer); the masked
    # mode; the cascade's upsampler
    optional: ClassVar[tuple[str, ...]] = (
        "clip", "prior", "cond_transformer", "masked", "upsampler"
    )  # fmt: skip
    settings: ClassVar[dict[str, type]] = {
        "ar": ARSampling, "prior": PriorSampling, "masked": MaskedSampling,
        "rerank": RerankSettings, "upsample": UpsampleSampling,
    }  # fmt: skip

    def __init__(
        self,
        tokenizer: TextTokenizer,
        vq: VQTokenizer,
        transformer: Transformer,
        defaults: dict[str, Any] | None = None,
        clip: CLIP | None = None,
        prior: DiffusionPrior | None = None,
        masked: Transformer | None = None,
        upsampler: Upsampler | None = None,
        cond_transformer: Transformer | None = None,
        allow_mismatch: bool = False,
    ) -> None:
        """The components are checked against each other (`dalle_ar.pipelines.compat`):
        ValueError for sizes that do not fit, and for a tokenizer, VQ or CLIP other than the one
        a component was trained on (by the content hash it records; a folder written before
        those records is not checked), which `allow_mismatch=True` turns into a warning."""
        check_compatible(tokenizer.vocab_size, vq.config, transformer.cfg)
        trained = {"the transformer": transformer, "the cond_transformer": cond_transformer,
                   "the masked generator": masked}  # fmt: skip
        for what, model in trained.items():
            if model is not None:
                check_trained_on(what, model.cfg, tokenizer.sha256, vq.weights_sha256,
                                 allow_mismatch)  # fmt: skip
        if cond_transformer is not None:
            check_cond_transformer(tokenizer.vocab_size, vq.config, transformer.cfg,
                                   cond_transformer.cfg)  # fmt: skip
        check_prior((cond_transformer or transformer).cfg, clip, prior, allow_mismatch)
        if masked is not None:
            check_masked(tokenizer.vocab_size, vq.config, transformer.cfg, masked.cfg)
        t = transformer.cfg
        if tokenizer.text_len != t.text_len:  # the model's text length decides
            tokenizer = tokenizer.with_text_len(t.text_len)
        parts = dict(text_tokenizer=tokenizer, vq=vq.eval(), transformer=transformer.eval(),
                     clip=clip, prior=None if prior is None else prior.eval(),
                     masked=None if masked is None else masked.eval(),
                     cond_transformer=None if cond_transformer is None
                     else cond_transformer.eval(),
                     upsampler=None if upsampler is None else upsampler.eval())  # fmt: skip
        super().__init__(parts, defaults)
        if upsampler is not None:
            check_upsampler(self._image_size(), upsampler.cfg, clip, allow_mismatch)
        self._known_chars = known_chars(tokenizer)
        self._said: set[str] = set()  # prompts checked once (`check_prompts`), not warned again

    @classmethod
    def from_components(
        cls, components: dict[str, Any], defaults: dict[str, Any], allow_mismatch: bool = False
    ) -> ARPipeline:
        c = components
        return cls(c["text_tokenizer"], c["vq"], c["transformer"], defaults, c.get("clip"),
                   c.get("prior"), c.get("masked"), c.get("upsampler"),
                   c.get("cond_transformer"), allow_mismatch)  # fmt: skip

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.components["text_tokenizer"]

    @property
    def vq(self) -> VQTokenizer:
        return self.components["vq"]

    @property
    def transformer(self) -> Transformer:
        return self.components["transformer"]

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this pipeline draws in (of `MODES`): "ar" always, "prior" and "masked" where
        it holds their component (the prior, the masked generator)."""
        return tuple(m for m in MODES if m == "ar" or m in self.components)

    @property
    def rerankers(self) -> tuple[str, ...]:
        """The rerankers this pipeline scores with (of `RERANKERS`): the transformer's PMI always,
        those with CLIP where it holds the clip component (`check_reranker`)."""
        return RERANKERS if "clip" in self.components else ("pmi",)

    # -- prompts ---------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[str], max_each: int = 3) -> TextBatch:
        """Encode the prompts, warning about the odd ones (`dalle_ar.prompts.encode_prompts`)."""
        return encode_prompts(self.tokenizer, prompts, self._known_chars, max_each, self._said)

    def encode_prime(self, image: Any, rows: int) -> torch.Tensor:
        """The first `rows` rows of an image's codes (1, rows, w), for completing it (priming).
        `image`: a PIL image, a uint8 (H, W, 3) array or a (3, H, W) tensor in [0, 1]; it is
        resized to the model's image size. ValueError for rows outside [0, h]."""
        cfg = self.transformer.cfg
        if not 0 <= rows <= cfg.grid_h:
            raise ValueError(f"prime rows must be in [0, {cfg.grid_h}], got {rows}")
        return self._encode_image(image)[:, :rows]

    def _image_size(self) -> tuple[int, int]:
        return image_size(self.vq.config, self.transformer.cfg)

    def _encode_image(self, image: Any) -> torch.Tensor:
        """Codes (1, h, w) of a picture resized (bicubic) to the VQ's size."""
        h, w = self._image_size()
        pil = Image.fromarray(to_uint8([image])[0]).resize((w, h), Image.BICUBIC)
        x = torch.from_numpy(to_uint8([pil])).permute(0, 3, 1, 2).float().div(255)
        return self.vq.encode(x.to(self.device)).cpu()

    @torch.inference_mode()
    def __call__(
        self,
        prompts: str | Sequence[str],
        num_samples: int = 1,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        *,
        mode: str = "ar",
        settings: ARSampling | None = None,
        prior_settings: PriorSampling | None = None,
        masked_settings: MaskedSampling | None = None,
        rerank: RerankSettings | None = None,
        prime_codes: torch.Tensor | None = None,
        init_codes: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        upsample: bool = False,
        upsample_settings: UpsampleSampling | None = None,
        batch_size: int | None = None,
        memory_mb: float = MEMORY_MB,
        progress: bool = False,
        on_batch: OnBatch | None = None,
        **overrides: Any,
    ) -> PipelineOutput:
        """Generate `num_samples` images per prompt. Seeds: `seeds` (one per sample), else
        seed, seed+1, ... (prompt-major), else random ones (recorded in the metadata).

        mode: "ar" (the caption alone) or "prior" (the diffusion prior draws a CLIP image
        embedding from the caption's CLIP text embedding, with each sample's seed, and the
        transformer draws the codes from it and the caption; `PriorSampling`). `embeds` (one per
        prompt, (n_prompts, D) unit CLIP image embeddings) conditions the transformer on given
        embeddings instead (`variations`, `interpolate`). "masked": the masked generator unmasks
        the codes in `MaskedSampling.steps` parallel passes (its settings take the keyword
        overrides then: `steps=8`, `temperature=0.7`, `guidance_scale=1.5`); `init_codes`
        (1 | n_prompts | n_samples, h, w) keeps every code that is not the generator's mask id
        (inpainting, `inpaint`).

        settings / prior_settings / rerank: `ARSampling` / `PriorSampling` / `RerankSettings`,
        default the folder's; keyword overrides of their fields (`guidance_scale=1.5`,
        `top_k=64`, `prior_steps=25`, `candidates=16`, `keep=4`, `reranker="clip"`; None keeps
        the default) replace them for this call. prime_codes
        (1 | n_prompts | n_samples, r, w) fixes the first r rows of codes. `batch_size` samples
        (or candidates) are drawn together, by default as many as `memory_mb` MiB hold (an
        estimate, `candidate_batch`); the output does not depend on it.

        candidates N > 1: each sample is the best `keep` of N candidates, so each prompt gets
        num_samples * keep images; scored by `reranker`: "pmi" (the transformer's caption-image
        mutual information, `dalle_ar.rerank`), "clip" (CLIPScore, needs the clip component) or
        "clip+pmi"; a composed prompt is scored by its scene caption. `out.candidates` records
        every candidate's seed and scores; see `Pipeline._rerank` for the seeds. ValueError
        before any drawing for keep > candidates, an unknown reranker, a reranker without its
        component, a prompt the CLIP's tokenizer cannot encode, or a settings keyword
        (`check_mode_settings`) or object of another mode than `mode`, which the call would
        ignore.

        upsample: the cascade (Imagen): every kept image is then upsampled by the upsampler
        component (`Pipeline.upsample`, with `UpsampleSampling` / `upsample_settings` and the
        overrides `upsample_steps`, `noise_level`), each with its own sample's seed; reranking
        scores the small candidates, so only kept images are upsampled. `out.images` are the
        large ones, `out.small_images` the small ones.

        on_batch(part): called with each run of finished images, in output order, as soon as
        they are done (`dalle_ar.pipelines.base.OnBatch`): a sample drawn, a reranked sample
        once all its candidates are scored, an upsampled one once its upsampling batch is
        done; the images are those the call returns. What it raises stops the call and comes
        out of it."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"expected a prompt or a non-empty list of prompts, got {prompts!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # another mode's setting would be ignored (None keeps the default: nothing to ignore);
        # given embeddings draw in mode "ar" (another mode with them is refused further on)
        if embeds is None or mode == "ar":
            call = "given embeddings" if embeds is not None else f"mode={mode!r}"
            check_mode_settings(mode, [k for k, v in overrides.items() if v is not None],
                                call=call)  # fmt: skip
            objects = {"settings": ("ar", settings), "prior_settings": ("prior", prior_settings),
                       "masked_settings": ("masked", masked_settings)}  # fmt: skip
            used = MODE_SECTIONS.get(mode)  # None: an unknown mode, refused further on
            unused = [f"{name}= ({type(obj).__name__})" for name, (section, obj) in objects.items()
                      if obj is not None and used is not None and section not in used]  # fmt: skip
            if unused:
                raise ValueError(f"{call} would ignore settings of other modes: "
                                 f"{', '.join(unused)}")  # fmt: skip
        # the masked mode's settings take the shared names (temperature, top_k, guidance_scale)
        first = MaskedSampling if mode == "masked" else ARSampling
        one_kw, pr_kw, rr_kw, up_kw = split_overrides(overrides, first, PriorSampling,
                                                      RerankSettings, UpsampleSampling)  # fmt: skip
        if (up_kw or upsample_settings is not None) and not upsample:  # would be ignored
            what = sorted(up_kw) if up_kw else "upsample_settings="
            raise ValueError(f"upsampling settings {what} apply only with upsample=True")
        us = resolve(upsample_settings or self.defaults["upsample"], **up_kw)
        self.check_upsample(upsample, prompts, us)
        s = resolve(settings or self.defaults["ar"], **({} if mode == "masked" else one_kw))
        ms = resolve(masked_settings or self.defaults["masked"],
                     **(one_kw if mode == "masked" else {}))  # fmt: skip
        # recorded as run: "auto" becomes the precision this device runs it in
        ms = resolve(ms, precision=masked_precision(self.device, ms.precision))
        ps = resolve(prior_settings or self.defaults["prior"], **pr_kw)
        rr = resolve(rerank or self.defaults["rerank"], **rr_kw)
        scale = self.components["upsampler"].cfg.scale if upsample else 0  # checked above
        self.check_output_fits(len(prompts), num_samples, rr, scale)
        cond = self._prompt_embeds(mode, prompts, embeds)  # (n_prompts, D) or None
        if mode == "masked" and prime_codes is not None:
            raise ValueError("the masked mode keeps codes with init_codes (any region), not "
                             "prime_codes")  # fmt: skip
        if mode != "masked" and init_codes is not None:
            raise ValueError(f"init_codes are for mode='masked', got mode={mode!r} (the "
                             "autoregressive modes complete top rows: prime_codes)")  # fmt: skip
        clip_text = self.check_reranker(rr, prompts)
        kind = "embeds" if embeds is not None else mode
        own = {"prior": ps, "masked": ms}.get(kind)  # the mode's own settings, recorded
        extra = {"mode": kind, **(dataclasses.asdict(own) if own else {})}
        drawer = self._drawer(kind == "masked", kind in ("prior", "embeds"))
        batch_size = batch_size or self.candidate_batch(s, rr, memory_mb, drawer)
        n = len(prompts) * num_samples
        prior = ps if kind == "prior" else None
        kw = dict(settings=s, batch_size=batch_size, prior=prior,
                  masked=ms if kind == "masked" else None)  # fmt: skip
        grids = init_codes if mode == "masked" else prime_codes
        prime = _expand_prime(grids, len(prompts), num_samples)  # one grid per sample
        drawn_with = dataclasses.asdict(s) if kind != "masked" else {}  # the recorded settings
        each = [p for p in prompts for _ in range(num_samples * rr.keep)]  # per output image
        finisher = Finisher(self, each, us if upsample else None, on_batch, progress)
        if rr.candidates == 1:

            def drawn(numbers: list[int], codes: torch.Tensor, metas: list[dict]) -> None:
                for m in metas:
                    m.update(extra)
                finisher.add(numbers, codes, metas)

            self._draw(prompts, num_samples, seed, seeds, prime, cond, progress=progress,
                       on_chunk=drawn, **kw)  # fmt: skip
            return finisher.finish({**drawn_with, **extra})
        split = [split_prompt(p) for p in prompts]  # warned once here, not once per batch
        self.check_prompts([scene for scene, _ in split])
        parts = sorted({q for _, ps in split for q, _ in ps})
        if parts:
            self.check_prompts(parts)
        N = rr.candidates

        def draw(numbers: list[int], cand_seeds: list[int]) -> tuple[torch.Tensor, list[dict]]:
            samples = [f // N for f in numbers]
            chunk = None if prime is None else prime[samples]
            rows = [j // num_samples for j in samples]
            codes, metas = self._draw([prompts[r] for r in rows], 1, None, cand_seeds, chunk,
                                      None if cond is None else cond[rows], progress=False,
                                      warn=False, **kw)  # fmt: skip
            for j, meta in zip(samples, metas):
                meta.update(prompt_index=j // num_samples, sample_index=j % num_samples, **extra)
            return codes, metas

        self._rerank(n, rr, seed, seeds, draw, clip_text, batch_size, finisher, progress)
        return finisher.finish({**drawn_with, **dataclasses.asdict(rr), **extra})

    def _prompt_embeds(
        self, mode: str, prompts: list[str], embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Per prompt: the conditioning the mode starts from (`PriorMode._cond_embeds`), or None.
        ValueError, before any drawing, for an unknown mode or one this pipeline lacks a part
        for."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "masked":
            if self.components.get("masked") is None:
                raise ValueError("the masked mode needs the masked component, which this "
                                 "pipeline lacks (assemble it with masked=FOLDER, or run the main "
                                 "job with masked=true)")  # fmt: skip
            if embeds is not None:
                raise ValueError("the masked generator takes no embeddings")
            return None
        return self._cond_embeds(mode, prompts, embeds)

    def check_output_fits(
        self, n_prompts: int, num_samples: int, rr: RerankSettings, scale: int = 0
    ) -> None:
        """ConfigError before any drawing, naming num_samples or candidates (the larger share),
        when what a call holds until it returns would not fit this machine's memory
        (`config.require_fits`): each kept image (and its upsampled copy, `scale` times larger)
        with its codes and record, and each candidate's record (`RECORD_BYTES`, about)."""
        h, w = self._image_size()
        cfg = self.transformer.cfg
        image = 3 * h * w * (1 + scale * scale) + 8 * cfg.grid_h * cfg.grid_w + RECORD_BYTES
        candidates = (rr.candidates * RECORD_BYTES if rr.candidates > 1 else 0) // rr.keep
        key = "candidates" if candidates > image else "num_samples"
        held = f"image(s) of {n_prompts} prompt(s) x num_samples={num_samples} x keep={rr.keep}"
        if rr.candidates > 1:
            held += f", each the best of candidates={rr.candidates}"
        require_fits(n_prompts * num_samples * rr.keep, image + candidates, key,
                     f"{held}, held until the call returns", kind="setting")  # fmt: skip

    def candidate_batch(
        self,
        s: ARSampling,
        rr: RerankSettings,
        memory_mb: float,
        model: Transformer | None = None,
    ) -> int:
        """How many samples (or candidates) to draw at once within `memory_mb` MiB, at most
        `MAX_BATCH`: an estimate from the key-value cache of `model`, the transformer that draws
        (default the transformer; one cache per guidance branch), its logits and, for CLIP
        scoring, the decoded images and the CLIP's activations."""
        if not (isinstance(memory_mb, (int, float)) and math.isfinite(memory_mb) and memory_mb > 0):
            raise ValueError(f"memory_mb must be a finite number > 0, got {memory_mb!r}")
        c = (model or self.transformer).cfg
        branches = 2 if s.guidance_scale != 1 else 1
        seq = c.seq_len
        each = 2 * c.depth * c.heads * c.head_dim * seq * 4 * branches + c.image_vocab * 4 * 2
        clip = self.components.get("clip")
        if rr.candidates > 1 and clip is not None and "clip" in reranker_parts(rr.reranker):
            v = clip.model.config.vision_config
            tokens = (v.image_size // v.patch_size) ** 2 + 1
            each += 3 * v.image_size**2 * 4 * 2 + 8 * tokens * v.hidden_size * 4
        return max(1, min(MAX_BATCH, int(memory_mb * 2**20 // each)))

    def rerank_scores(
        self,
        samples: list[dict[str, Any]],
        codes: torch.Tensor,
        rerank: RerankSettings,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """PMI of each candidate with its prompt's scene caption, over the rows it drew."""
        scenes = [split_prompt(m["prompt"])[0] for m in samples]
        return pmi_scores(
            self.transformer, self.tokenizer, scenes, codes, weight=rerank.rerank_weight,
            start_row=samples[0]["prime_rows"], batch_size=batch_size,
        )  # fmt: skip

    def _drawer(self, masked: bool, embedded: bool) -> Transformer:
        """The model that draws the codes: the masked generator, the transformer that reads the
        CLIP image embedding (`cond_transformer`, for the prior mode and given embeddings) or the
        transformer."""
        if masked:
            return self.components["masked"]
        return self.cond_transformer if embedded else self.transformer

    def _draw(
        self,
        prompts: list[str],
        num_samples: int,
        seed: int | None,
        seeds: Sequence[int] | None,
        prime: torch.Tensor | None,
        embeds: torch.Tensor | None,
        settings: ARSampling,
        batch_size: int,
        progress: bool,
        warn: bool = True,
        prior: PriorSampling | None = None,
        masked: MaskedSampling | None = None,
        on_chunk: Callable[[list[int], torch.Tensor, list[dict[str, Any]]], None] | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The codes (n, h, w) and per-sample metadata, without reranking; `prime` holds one
        grid per sample or is None; `warn`: warn about odd prompts (`check_prompts`);
        `on_chunk(numbers, codes, metas)`: called as each batch of samples is drawn (batches
        group the prompts with as many parts, so they may come out of order). `embeds`
        (n_prompts, D): with `prior` settings the CLIP text embeddings the prior starts from
        (each sample draws its image embedding with its own seed), else the image embeddings
        themselves; None: the transformer's null embedding, if it takes one. `masked` settings:
        the masked generator draws instead, `prime` then holding its init codes."""
        cfg = self.transformer.cfg
        model = self._drawer(masked is not None, embeds is not None)
        n = len(prompts) * num_samples
        per_seed = sample_seeds(n, seed if seeds is None else seeds)
        split = [split_prompt(p) for p in prompts]
        encode = self.check_prompts if warn else self.tokenizer.encode
        text = encode([scene for scene, _ in split])
        # each distinct part is encoded (and warned about) once
        part_texts = sorted({q for _, parts in split for q, _ in parts})
        part_row = {q: i for i, q in enumerate(part_texts)}
        part_text = encode(part_texts) if part_texts else None
        empty = self.tokenizer.encode([""])
        # Samples whose prompts have the same number of parts run together, in prompt order.
        groups: dict[int, list[int]] = {}
        for i in range(n):
            groups.setdefault(len(split[i // num_samples][1]), []).append(i)
        chunks = [
            (K, idx[s : s + batch_size])
            for K, idx in sorted(groups.items())
            for s in range(0, len(idx), batch_size)
        ]
        prime_rows = 0 if prime is None or masked is not None else prime.shape[1]
        record = dataclasses.asdict(settings if masked is None else masked)
        unseen = {p: unseen_words(self.tokenizer, p) for p in prompts}
        # what the model read of an over-long prompt's scene (captions show it), else None
        cut = {p: self.tokenizer.read_back(scene) for p, (scene, _) in zip(prompts, split)}
        samples = [
            {
                "prompt": prompts[i // num_samples],
                "prompt_index": i // num_samples,
                "sample_index": i % num_samples,
                # words of the prompt no training caption held (None: the tokenizer has no record)
                "unseen_words": unseen[prompts[i // num_samples]],
                "truncated_to": cut[prompts[i // num_samples]][0]
                if cut[prompts[i // num_samples]][1]
                else None,
                "seed": per_seed[i],
                **record,
                "prime_rows": prime_rows,
                "init_codes" if masked else "prime_codes": None
                if prime is None
                else prime[i].tolist(),
            }
            for i in range(n)
        ]
        codes = torch.zeros(n, cfg.grid_h, cfg.grid_w, dtype=torch.long)
        text_lens = text.mask.sum(1)
        # the codes drawn, not those kept: primed rows, or an inpainting's kept region
        if masked is not None and prime is not None:
            to_draw = int((prime == cfg.mask_id).sum())
        else:
            to_draw = n * (cfg.image_len - prime_rows * cfg.grid_w)
        bar = tqdm(total=to_draw, desc="tokens", unit="tok", disable=not progress)
        # a bar over the batches only where there are several (a progress tracker that follows
        # every tqdm, gradio's, would show a disabled one too)
        several = progress and len(chunks) > 1
        for K, idx in tqdm(chunks, desc="batches") if several else chunks:
            rows = [i // num_samples for i in idx]
            part_kw = {}
            if K:
                sel = [part_row[q] for r in rows for q, _ in split[r][1]]
                part_kw = dict(
                    parts=part_text.ids[sel].view(len(idx), K, -1),
                    part_lens=part_text.mask[sel].sum(1).view(len(idx), K),
                    part_weights=torch.tensor([[w for _, w in split[r][1]] for r in rows]),
                )
            if masked is not None:
                if K:
                    raise ValueError("composed prompts (AND) are for the autoregressive modes")
                start = len(idx) * cfg.image_len if prime is None else int(
                    (prime[idx] == cfg.mask_id).sum())  # fmt: skip
                counter = _unmasked_counter(bar, cfg.mask_id, start) if progress else None
                codes[idx] = generate_masked(
                    model, text.ids[rows], masked,
                    text_lens=text_lens[rows], empty_ids=empty.ids[0],
                    empty_len=int(empty.mask[0].sum()), seeds=[per_seed[i] for i in idx],
                    init_codes=None if prime is None else prime[idx], callback=counter,
                ).cpu()  # fmt: skip
            else:
                codes[idx] = generate_image_tokens(
                    model,
                    text.ids[rows],
                    settings,
                    cond=self._sample_cond(model, embeds, rows, [per_seed[i] for i in idx], prior),
                    text_lens=text_lens[rows],
                    empty_ids=empty.ids[0],
                    empty_len=int(empty.mask[0].sum()),
                    prime_codes=None if prime is None else prime[idx],
                    seeds=[per_seed[i] for i in idx],
                    callback=(lambda *_, k=len(idx): bar.update(k)) if progress else None,  # noqa: B008
                    **part_kw,
                ).cpu()
            if on_chunk is not None:
                on_chunk(idx, codes[idx], [samples[i] for i in idx])
        bar.close()
        return codes, samples


DalleAR = ARPipeline  # the name this class had before there were other modes


def _unmasked_counter(bar: Any, mask_id: int, start: int) -> Callable[..., None]:
    """A `generate_masked` callback that moves `bar` by the codes each pass unmasked, of the
    `start` codes masked at first."""
    left = [start]

    def count(t: int, steps: int, codes: torch.Tensor) -> None:
        still = int((codes == mask_id).sum())
        bar.update(left[0] - still)
        left[0] = still

    return count


def _expand_prime(prime: torch.Tensor | None, n_prompts: int, num: int) -> torch.Tensor | None:
    """Prime codes (1 | n_prompts | n_prompts*num, r, w) -> one grid per sample."""
    if prime is None:
        return None
    if prime.ndim != 3:
        raise ValueError(f"prime_codes must be (n, r, w), got shape {tuple(prime.shape)}")
    k = prime.shape[0]
    if k == 1:
        return prime.expand(n_prompts * num, -1, -1).long()
    if k == n_prompts:
        return prime.repeat_interleave(num, 0).long()
    if k == n_prompts * num:
        return prime.long()
    raise ValueError(
        f"prime_codes must hold 1, {n_prompts} (per prompt) or {n_prompts * num} (per sample) "
        f"grids, got {k}"
    )
