"""What every generation mode's pipeline shares: its components, the device, decoding codes to
pixels, the reranking stage (best of K candidates), sampling defaults, and the folder format
(`from_pretrained` / `save_pretrained`, `dalle_ar.pipelines.folder`).

A mode is a subclass that declares its `mode` name, the components it `required` and the
`optional` ones, and its settings sections (`settings`: section name -> settings dataclass, the
folder's "defaults"), and implements `__call__`, `_draw` and `rerank_scores`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from tqdm import tqdm

from dalle_ar.checkpoint import atomic_dir
from dalle_ar.grid import to_uint8
from dalle_ar.models.clip import CLIP, clip_score
from dalle_ar.pipelines.folder import library_of, load_component, read_folder, write_json
from dalle_ar.prompts import split_prompt
from dalle_ar.rerank import keep_best
from dalle_ar.runtime import pick_device, sample_seeds
from dalle_ar.sampling.diffusion import check_upsample_settings, upsample_images
from dalle_ar.sampling.settings import (
    RerankSettings,
    UpsampleSampling,
    from_dict,
    names,
    reranker_parts,
    resolve,
)


@dataclasses.dataclass
class PipelineOutput:
    images: list[Image.Image]  # one RGB image per sample, prompt-major
    codes: torch.Tensor  # (n, h, w) image codes
    samples: list[dict[str, Any]]  # per sample: prompt, indices, seed and every sampling setting
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # those of the whole call
    # reranked calls: every candidate drawn, sample-major: prompt, prompt_index, sample,
    # candidate_index, seed, score (and each reranker's own: clip_score, pmi_score), kept
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # upsampled calls (the cascade): the small images `images` were drawn from, one per sample
    small_images: list[Image.Image] = dataclasses.field(default_factory=list)


# A generation call's `on_batch(part)`: called with each run of finished samples, in output order,
# as soon as they are done (pixels decoded, reranked and upsampled where asked), as a
# `PipelineOutput` holding only them (and the candidates scored for them; no `settings`). The
# parts hold the very objects the call returns, in order: joined, they are its output. An
# exception it raises stops the call, after the parts already handed over.
OnBatch = Callable[[PipelineOutput], None]
UPSAMPLE_BATCH = 16  # the cascade's batches: pictures upsampled together


class Finisher:
    """Finished samples -> their output: decoded to pixels, upsampled for the cascade, and handed
    to `on_batch` in output order as soon as every sample before them is done too. Pixels never
    depend on the runs they come in: decoding is per image, and the cascade upsamples in the same
    batches of `UPSAMPLE_BATCH` (in output order) as one call over them all, with the caption
    embeddings of all outputs computed together up front.

    prompts: each output's prompt (for an upsampler that reads captions); upsample: the cascade's
    settings, or None for none."""

    def __init__(
        self,
        pipe: Pipeline,
        prompts: Sequence[str],
        upsample: UpsampleSampling | None = None,
        on_batch: OnBatch | None = None,
        progress: bool = False,
    ) -> None:
        self.pipe, self.us, self.on_batch, self.n = pipe, upsample, on_batch, len(prompts)
        self.done: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}  # position -> (codes, meta)
        self.next = 0  # the first position not handed on
        self.waiting: list[tuple[int, torch.Tensor, dict[str, Any]]] = []  # for the upsampler
        self.candidates: list[dict[str, Any]] = []  # scored, not handed on yet
        self.parts: list[PipelineOutput] = []
        self.text = None
        up = pipe.components.get("upsampler")
        if upsample is not None and up.cfg.caption_dim:
            self.text = pipe.scene_embeds(prompts, truncate=True)
        # no bar at all where nothing is upsampled: a progress tracker that follows every tqdm
        # (gradio's) would show a disabled one too
        self.bar = tqdm(total=self.n, desc="upsample", unit="img",
                        disable=not progress) if upsample is not None else None  # fmt: skip

    def add(
        self,
        positions: Sequence[int],
        codes: torch.Tensor,
        metas: Sequence[dict[str, Any]],
        candidates: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Samples done: their output positions, codes (k, h, w) and metadata; `candidates`:
        the candidate records scored for them."""
        for pos, c, m in zip(positions, codes, metas):
            self.done[pos] = (c, m)
        self.candidates += candidates
        run = []
        while self.next in self.done:
            run.append((self.next, *self.done.pop(self.next)))
            self.next += 1
        if not run:
            return
        if self.us is None:
            codes = torch.stack([c for _, c, _ in run])
            self._hand_on(self.pipe.decode(codes), codes, [m for _, _, m in run], [])
            return
        self.waiting += run
        while len(self.waiting) >= UPSAMPLE_BATCH:
            self._upsample(self.waiting[:UPSAMPLE_BATCH])
            del self.waiting[:UPSAMPLE_BATCH]

    def finish(self, settings: dict[str, Any]) -> PipelineOutput:
        """The whole output, once every position is added, with the call's `settings`."""
        if self.waiting:
            self._upsample(self.waiting)
            self.waiting = []
        if self.bar is not None:
            self.bar.close()
        if self.next != self.n or self.done:  # a bug, not a user's error
            raise RuntimeError(f"{self.next} of {self.n} samples finished")
        parts = self.parts
        out = PipelineOutput(
            [im for p in parts for im in p.images], torch.cat([p.codes for p in parts]),
            [m for p in parts for m in p.samples], dict(settings),
            [c for p in parts for c in p.candidates],
            [im for p in parts for im in p.small_images],
        )  # fmt: skip
        if self.us is not None:
            out.settings.update(self._record())
        return out

    def _record(self) -> dict[str, Any]:
        return {"upsample": True, **dataclasses.asdict(self.us)}

    def _upsample(self, run: list[tuple[int, torch.Tensor, dict[str, Any]]]) -> None:
        """One batch of the cascade: each small image upsampled with its own sample's seed; each
        record notes the settings."""
        codes = torch.stack([c for _, c, _ in run])
        metas = [m for _, _, m in run]
        small = self.pipe.decode(codes)
        text = None if self.text is None else self.text[[pos for pos, _, _ in run]]
        big = self.pipe._upsample_pixels(small, [m["seed"] for m in metas], text, self.us,
                                         len(run))  # fmt: skip
        for m in metas:
            m.update(self._record())
        if self.bar is not None:
            self.bar.update(len(run))
        self._hand_on(big, codes, metas, small)

    def _hand_on(self, images: list, codes: torch.Tensor, metas: list, small: list) -> None:
        part = PipelineOutput(images, codes, metas, candidates=self.candidates,
                              small_images=small)  # fmt: skip
        self.candidates = []
        self.parts.append(part)
        if self.on_batch is not None:
            self.on_batch(part)


class Pipeline:
    """Components joined for inference. Subclasses: one per generation mode."""

    mode: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    settings: ClassVar[dict[str, type]] = {"rerank": RerankSettings}
    registry: ClassVar[dict[str, type[Pipeline]]] = {}  # pipeline.json "class" -> class

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        Pipeline.registry[cls.__name__] = cls

    def __init__(self, components: dict[str, Any], defaults: dict[str, Any] | None = None):
        missing = [n for n in self.required if components.get(n) is None]
        if missing:
            raise ValueError(f"the {self.mode} pipeline needs the components {missing}")
        unknown = set(components) - set(self.required) - set(self.optional)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} holds no component {sorted(unknown)}; it takes "
                f"{list(self.required + self.optional)}"
            )
        self.components = {k: v for k, v in components.items() if v is not None}
        self.defaults = self._defaults(defaults)

    # -- folders ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", allow_mismatch: bool = False
    ) -> Any:
        """Load a pipeline folder. Called on `Pipeline`, it builds the class pipeline.json names;
        called on a mode's class, it builds that mode from the folder's components (shared
        between modes). A component the mode needs but the folder lacks is refused, naming both;
        so are components that do not fit each other, or a component paired with another
        tokenizer, VQ or CLIP than the one it was trained on (`allow_mismatch=True`: a warning
        instead). ValueError for a device this machine lacks (`runtime.pick_device`: "auto",
        "cpu", "cuda", "cuda:N")."""
        device = pick_device(device)
        spec = read_folder(folder)
        target = cls
        if cls is Pipeline:
            if spec.pipeline_class not in Pipeline.registry:
                raise ValueError(
                    f"{spec.folder}: unknown pipeline class {spec.pipeline_class!r}; known: "
                    f"{sorted(Pipeline.registry)}"
                )
            target = Pipeline.registry[spec.pipeline_class]
        lacking = [n for n in target.required if n not in spec.components]
        if lacking:
            raise ValueError(
                f"the {target.mode} mode ({target.__name__}) needs the "
                f"{' and '.join(lacking)} component, which pipeline folder {spec.folder} lacks "
                f"(it holds {sorted(spec.components)})"
            )
        defaults = target._defaults(spec.defaults, f"{spec.folder / 'pipeline.json'} defaults")
        keep = target.required + target.optional
        parts = {
            name: load_component(lib, cls_name, spec.paths[name], device)
            for name, (lib, cls_name) in spec.components.items()
            if name in keep
        }
        return target.from_components(parts, defaults, allow_mismatch)

    @classmethod
    def from_components(
        cls, components: dict[str, Any], defaults: dict[str, Any], allow_mismatch: bool = False
    ) -> Any:
        """Build from loaded components (a mode whose constructor takes them by name);
        `allow_mismatch` is for modes that check what their components were trained on."""
        return cls(components, defaults)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write every component this pipeline holds, and pipeline.json, atomically."""
        with atomic_dir(folder) as tmp:
            pairs = {}
            for name, obj in self.components.items():
                pairs[name] = library_of(obj)
                obj.save_pretrained(tmp / name)
            write_json(tmp, type(self).__name__, pairs, self.optional, self.defaults_json())

    # -- settings --------------------------------------------------------------------------
    @classmethod
    def _defaults(cls, given: dict[str, Any] | None, where: str = "defaults") -> dict[str, Any]:
        """Settings per section ({"ar": {...}, "rerank": {...}}) from a folder's or a caller's
        defaults; the flat fields of the first section stand for that section (the form of
        version 1 and of old callers). Sections of other modes are left to them. ValueError names
        `where` and an unknown key."""
        given = dict(given or {})
        first = next(iter(cls.settings))
        flat = names(cls.settings[first])
        if given and set(given) <= set(flat):
            given = {first: given}
        unknown = sorted(k for k, v in given.items() if k not in cls.settings and
                         not isinstance(v, dict))  # fmt: skip
        if unknown:
            raise ValueError(
                f"{where}: unknown sampling defaults {unknown}; known: {list(flat)} (or sections "
                f"{list(cls.settings)})"
            )
        out = {}
        for k, c in cls.settings.items():
            v = given.get(k)
            out[k] = v if isinstance(v, c) else from_dict(c, v, f"{where}.{k}")
        return out

    def defaults_json(self) -> dict[str, Any]:
        return {k: dataclasses.asdict(v) for k, v in self.defaults.items()}

    # -- device and pixels -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        module = next(c for c in self.components.values() if isinstance(c, torch.nn.Module))
        return next(module.parameters()).device

    def to(self, device: str | torch.device) -> Pipeline:
        for c in self.components.values():
            if isinstance(c, (torch.nn.Module, CLIP)):
                c.to(device)
        return self

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> list[Image.Image]:
        """Codes (n, h, w) -> PIL images. One image per VQ call, so the pixels of a sample never
        depend on the batch it was decoded in."""
        vq = self.components["vq"]
        out = []
        for c in codes:
            x = vq.decode(c[None].to(self.device))
            out.append(Image.fromarray(to_uint8(x)[0]))
        return out

    # -- the cascade -----------------------------------------------------------------------
    def check_upsample(
        self,
        upsample: bool,
        prompts: Sequence[str] | None = None,
        settings: UpsampleSampling | None = None,
    ) -> None:
        """Before any drawing: ValueError when `upsample` is asked of a pipeline without the
        upsampler component, of a caption-reading upsampler without prompts or a CLIP, or with
        settings the upsampler's schedule cannot take (`check_upsample_settings`)."""
        if not upsample:
            return
        up = self.components.get("upsampler")
        if up is None:
            raise ValueError(f"upsampling needs the upsampler component, which this {self.mode} "
                             "pipeline lacks (assemble it with upsampler=FOLDER)")  # fmt: skip
        if up.cfg.caption_dim and (prompts is None or "clip" not in self.components):
            raise ValueError("this upsampler reads the caption: it needs the prompts and the "
                             "pipeline's clip component")  # fmt: skip
        check_upsample_settings(up.cfg, settings)

    @torch.inference_mode()
    def upsample(
        self,
        images: Any,
        seeds: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        settings: UpsampleSampling | None = None,
        batch_size: int = UPSAMPLE_BATCH,
        progress: bool = False,
        **overrides: Any,
    ) -> list[Image.Image]:
        """The cascade's last stage: small pictures -> large ones by the upsampler component
        (`dalle_ar.models.upsampler`, SR3 / Imagen), each drawn with its own seed (default: random
        ones). images: PIL images, uint8 (H, W, 3) arrays or an (N, 3, H, W) tensor in [0, 1],
        of the upsampler's small size (any picture of that size: generated or a user's own);
        prompts: one per picture, for an upsampler that reads captions. settings:
        `UpsampleSampling`, default the folder's; keyword overrides of its fields
        (`upsample_steps=25`, `noise_level=0`). Returns PIL images of side low_size * scale.
        ValueError for pictures of another size, counts that differ, or what `check_upsample`
        refuses."""
        s = resolve(settings or self.defaults.get("upsample") or UpsampleSampling(), **overrides)
        self.check_upsample(True, prompts, s)
        up = self.components["upsampler"]
        arr = to_uint8(images)  # (N, h, w, 3); refuses pictures of mixed sizes
        n, h, w, _ = arr.shape
        size = up.cfg.low_size
        if (h, w) != (size, size):
            raise ValueError(f"the upsampler takes {size}x{size} pictures, got {w}x{h} (resize "
                             "them first, or use an upsampler trained for that size)")  # fmt: skip
        seeds = sample_seeds(n) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"expected one seed per picture ({n}), got {len(seeds)}")
        text = None
        if up.cfg.caption_dim:
            if len(prompts) != n:
                raise ValueError(f"one prompt per picture: {n} pictures, {len(prompts)} prompts")
            text = self.scene_embeds(prompts, truncate=True)
        return self._upsample_pixels(arr, seeds, text, s, batch_size, progress)

    def _upsample_pixels(
        self,
        images: Any,
        seeds: Sequence[int],
        text: torch.Tensor | None,
        settings: UpsampleSampling,
        batch_size: int,
        progress: bool = False,
    ) -> list[Image.Image]:
        """`upsample` of checked pictures (of the small size, one seed each), with the unit
        caption embeddings `text` (N, D) for an upsampler that reads them."""
        arr = to_uint8(images)
        low = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)
        big = upsample_images(self.components["upsampler"], low, settings, seeds, text,
                              batch_size, progress)  # fmt: skip
        return [Image.fromarray(a) for a in to_uint8(big.add(1).div(2))]

    # -- reranking -------------------------------------------------------------------------
    def rerank_scores(
        self, samples: list[dict[str, Any]], codes: torch.Tensor, rerank: RerankSettings, **kw: Any
    ) -> torch.Tensor:
        """The mode's own PMI score (n,) of each candidate (higher is better)."""
        raise NotImplementedError(f"the {self.mode} mode has no PMI reranker")

    def check_rerank(self, prompts: Sequence[str], **rerank: Any) -> torch.Tensor | None:
        """`check_reranker` for the folder's rerank settings with `rerank` (RerankSettings
        fields) put in: ValueError for impossible settings too. For callers that import no
        settings class (the fidelity evaluation)."""
        return self.check_reranker(resolve(self.defaults["rerank"], **rerank), prompts)

    def check_reranker(self, rerank: RerankSettings, prompts: Sequence[str]) -> torch.Tensor | None:
        """Before any drawing: ValueError when `rerank.reranker` needs a component this pipeline
        lacks, or when the CLIP's tokenizer cannot encode a prompt's scene caption. Returns the
        unit CLIP text embeddings (len(prompts), D) when the reranker uses CLIP, else None."""
        if rerank.candidates == 1:
            return None
        if "clip" in reranker_parts(rerank.reranker):
            clip = self.components.get("clip")
            if clip is None:
                raise ValueError(
                    f"reranker {rerank.reranker!r} needs a clip component, which this "
                    f"{self.mode} pipeline lacks (assemble it with clip=FOLDER, or use "
                    "reranker='pmi')"
                )
            return self.scene_embeds(prompts)
        return None

    def scene_embeds(self, prompts: Sequence[str], truncate: bool = False) -> torch.Tensor:
        """Unit CLIP text embeddings (N, D), float32, of each prompt's scene caption (a composed
        prompt's first part, `split_prompt`), by the clip component; `truncate`: cut captions
        longer than the CLIP reads instead of refusing them (ValueError)."""
        clip = self.components["clip"]
        scenes = [split_prompt(p)[0] for p in prompts]
        return clip.text_embeds(*clip.encode_text(scenes, truncate=truncate))

    def clip_scores(self, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """CLIPScore (n,) of codes (n, h, w) decoded by the VQ, each image against its unit text
        embedding text (n, D): 100 x cosine, floored at 0 (`dalle_ar.models.clip.CLIP.score`), on
        the pixels its PNG would hold (rounded to 8 bits)."""
        clip = self.components["clip"]
        x = self.components["vq"].decode_8bit(codes.to(self.device))
        return clip_score(clip.image_embeds(clip.pixels_from_tensor(x)), text).cpu()

    def _rerank(
        self,
        n: int,
        rerank: RerankSettings,
        seed: int | None,
        seeds: Sequence[int] | None,
        draw: Callable[[list[int], list[int]], tuple[torch.Tensor, list[dict[str, Any]]]],
        clip_text: torch.Tensor | None,
        batch_size: int,
        finisher: Finisher,
        progress: bool = False,
    ) -> None:
        """`n` samples, each the best `rerank.keep` of `rerank.candidates` (N): candidate c of
        sample j is number j*N + c; `draw(numbers, seeds)` draws those candidates, with each
        metadata's "prompt_index" and "sample_index" those of its sample. Candidates are drawn
        `batch_size` at a time across samples, scored as they come, and only each sample's kept
        ones are held once its N are scored, so n*N never has to fit in memory. A sample is done
        when its N are scored: its kept ones go to `finisher` then (output positions j*keep ..,
        with the records of its candidates), which makes the call's output of them.

        Candidate c of sample j gets seed `seed + j + c*n`, so candidate 0 is the sample drawn
        without reranking; `seeds` holds N per sample (sample-major). Each kept sample records
        its own seed, candidate index, rank and scores; `candidates` records every candidate's."""
        N = rerank.candidates
        if seeds is not None and len(seeds) != n * N:
            raise ValueError(
                f"with candidates={N}, seeds holds {N} per sample ({n * N} for {n} samples), "
                f"got {len(seeds)}"
            )
        if seeds is None:
            seeds = sample_seeds(n * N) if seed is None else [
                seed + j + c * n for j in range(n) for c in range(N)]  # fmt: skip
        parts = reranker_parts(rerank.reranker)
        pending: dict[int, list[tuple[int, dict[str, float], torch.Tensor, dict]]] = {}
        keep = rerank.keep
        bar = tqdm(total=n * N, desc=f"candidates ({rerank.reranker})", unit="img",
                   disable=not progress)  # fmt: skip
        for start in range(0, n * N, batch_size):
            numbers = list(range(start, min(start + batch_size, n * N)))
            codes, metas = draw(numbers, [seeds[f] for f in numbers])
            scores = {}
            if "clip" in parts:
                rows = torch.tensor([m["prompt_index"] for m in metas])
                scores["clip"] = self.clip_scores(codes, clip_text[rows])
            if "pmi" in parts:
                scores["pmi"] = self.rerank_scores(metas, codes, rerank, batch_size=batch_size)
            for row, f in enumerate(numbers):
                j, c = divmod(f, N)
                one = {k: float(v[row]) for k, v in scores.items()}
                pending.setdefault(j, []).append((c, one, codes[row].clone(), metas[row]))
                if len(pending[j]) == N:
                    records: list[dict[str, Any]] = []
                    codes_j, metas_j = self._keep(pending.pop(j), rerank, parts, records)
                    finisher.add(range(j * keep, j * keep + len(codes_j)),
                                 torch.stack(codes_j), metas_j, records)  # fmt: skip
            bar.update(len(numbers))
        bar.close()

    @staticmethod
    def _keep(
        cands: list[tuple[int, dict[str, float], torch.Tensor, dict]],
        rerank: RerankSettings,
        parts: tuple[str, ...],
        records: list[dict[str, Any]],
    ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """One sample's N scored candidates -> the codes and metadata of its best `keep`; every
        candidate's record is appended to `records`."""
        raw = {k: torch.tensor([one[k] for _, one, _, _ in cands]) for k in parts}
        score = raw[parts[0]] if len(parts) == 1 else sum(_zscore(v) for v in raw.values()) / 2
        top = keep_best(score[None], rerank.keep)[0].tolist()
        for i, (c, one, _, meta) in enumerate(cands):
            records.append({"prompt": meta["prompt"], "prompt_index": meta["prompt_index"],
                            "sample": meta["sample_index"], "candidate_index": c,
                            "seed": meta["seed"], "score": float(score[i]),
                            **{f"{k}_score": v for k, v in one.items()},
                            "kept": i in top})  # fmt: skip
        codes, metas = [], []
        for rank, i in enumerate(top):
            c, one, code, meta = cands[i]
            meta = dict(meta)
            meta.update(sample_index=meta["sample_index"] * rerank.keep + rank,
                        candidate_index=c, candidates=rerank.candidates, keep=rerank.keep,
                        rank=rank, reranker=rerank.reranker, rerank_weight=rerank.rerank_weight,
                        rerank_score=float(score[i]),
                        **{f"{k}_score": v for k, v in one.items()})  # fmt: skip
            codes.append(code)
            metas.append(meta)
        return codes, metas


def _zscore(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std among one sample's candidates (0 where they are all equal)."""
    std = x.std(unbiased=False)
    return (x - x.mean()) / std if float(std) > 0 else torch.zeros_like(x)
