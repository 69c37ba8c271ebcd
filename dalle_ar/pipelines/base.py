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

from dalle_ar.checkpoint import atomic_dir
from dalle_ar.grid import to_uint8
from dalle_ar.pipelines.folder import library_of, load_component, read_folder, write_json
from dalle_ar.rerank import keep_best
from dalle_ar.runtime import sample_seeds
from dalle_ar.sampling.settings import RerankSettings, from_dict, names


@dataclasses.dataclass
class PipelineOutput:
    images: list[Image.Image]  # one RGB image per sample, prompt-major
    codes: torch.Tensor  # (n, h, w) image codes
    samples: list[dict[str, Any]]  # per sample: prompt, indices, seed and every sampling setting
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # those of the whole call


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
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> Any:
        """Load a pipeline folder. Called on `Pipeline`, it builds the class pipeline.json names;
        called on a mode's class, it builds that mode from the folder's components (shared
        between modes). A component the mode needs but the folder lacks is refused, naming both;
        so are components that do not fit each other."""
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
        return target.from_components(parts, defaults)

    @classmethod
    def from_components(cls, components: dict[str, Any], defaults: dict[str, Any]) -> Any:
        """Build from loaded components (a mode whose constructor takes them by name)."""
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
            if isinstance(c, torch.nn.Module):
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

    # -- reranking -------------------------------------------------------------------------
    def rerank_scores(
        self, samples: list[dict[str, Any]], codes: torch.Tensor, rerank: RerankSettings, **kw: Any
    ) -> torch.Tensor:
        """Score (n,) of each candidate (higher is better). Each mode says how."""
        raise NotImplementedError

    def _best_of(
        self,
        n: int,
        rerank: RerankSettings,
        seed: int | None,
        seeds: Sequence[int] | None,
        draw: Callable[[list[int]], tuple[torch.Tensor, list[dict[str, Any]]]],
        **score_kw: Any,
    ) -> PipelineOutput:
        """`n` samples, each the best of `rerank.candidates`: `draw(seeds)` gives n*K candidates
        sample-major (candidate c of sample j at j*K + c). Candidate c of sample j gets seed
        `seed + j + c*n`, so candidate 0 is the sample drawn without reranking; `seeds` holds K
        per sample (sample-major). Each kept sample records its own seed, its candidate index and
        its score."""
        K = rerank.candidates
        if seeds is not None and len(seeds) != n * K:
            raise ValueError(
                f"with candidates={K}, seeds holds {K} per sample ({n * K} for {n} samples), "
                f"got {len(seeds)}"
            )
        if seeds is None:
            if seed is None:
                seeds = sample_seeds(n * K)
            else:
                seeds = [seed + j + c * n for j in range(n) for c in range(K)]
        codes, metas = draw(list(seeds))
        scores = self.rerank_scores(metas, codes, rerank, **score_kw)
        best = keep_best(scores.view(n, K), 1)[:, 0]
        pick = (best + torch.arange(n) * K).tolist()
        samples = []
        for j, i in enumerate(pick):
            meta = dict(metas[i])
            meta.update(candidate_index=int(best[j]), candidates=K,
                        rerank_weight=rerank.rerank_weight,
                        rerank_score=float(scores[i]))  # fmt: skip
            samples.append(meta)
        return PipelineOutput(self.decode(codes[pick]), codes[pick], samples)
