"""Sampling settings, defined once: one dataclass per kind of generation.

Each dataclass is the single definition of its knobs: their defaults, their checks, the command-line
option of each (`add_arguments`), the JSON record of a sample and a pipeline folder's defaults
(`from_dict`). The token API, the pipelines, `dalle-ar sample`, `dalle-ar eval` and the main job
all read it, so a new knob is one new field here (and its use in the loop).

    s = ARSampling(guidance_scale=1.5, temperature=0.7)
    s = resolve(s, top_k=64, top_p=None)        # None keeps the value; unknown names are refused
    generate_image_tokens(model, ids, s, text_lens=lens)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, TypeVar, get_type_hints

from dalle_ar.config import PRECISIONS, require, require_precision

S = TypeVar("S")
KIND = "sampling setting"  # how errors name a field: "sampling setting 'top_k': ..."


def _option(flag: str, help: str, choices: tuple[str, ...] = ()) -> dict[str, Any]:
    """Field metadata: the command-line flag, its help line and, for a field with a fixed set
    of values, those (the command line's and the web page's choices)."""
    return {"flag": flag, "help": help, **({"choices": choices} if choices else {})}


# The lowest softmax temperature: at 1e-3 a logit gap of 0.1 is a probability ratio of e^100,
# greedy in effect (top_k=1 is the greedy draw), and lower ones only bring the logits divided by
# it nearer to float32's overflow (1e-45 divides any logit to inf, and every probability to NaN).
MIN_TEMPERATURE = 1e-3


def _finite_at_least(value: Any, low: float) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value) and value >= low


def _check_temperature(t: Any) -> None:
    require(_finite_at_least(t, MIN_TEMPERATURE), "temperature",
            f"must be a finite number >= {MIN_TEMPERATURE:g} (top_k=1 is greedy), got {t!r}",
            KIND)  # fmt: skip


@dataclasses.dataclass
class ARSampling:
    """How the autoregressive transformer draws each image code (`sampling.generate_image_tokens`).

    Classifier-free guidance: Ho & Salimans 2022; top-p (nucleus): Holtzman et al. 2020; composed
    prompts (a product of experts): Liu et al. 2022, "Compositional Visual Generation"."""

    temperature: float = dataclasses.field(
        default=1.0,
        metadata=_option("--temperature", f"softmax temperature (>= {MIN_TEMPERATURE:g})"),
    )
    top_k: int = dataclasses.field(
        default=0, metadata=_option("--top-k", "keep the k most likely codes (0 = off)")
    )
    top_p: float = dataclasses.field(
        default=1.0, metadata=_option("--top-p", "nucleus: the smallest set reaching p (1 = off)")
    )
    guidance_scale: float = dataclasses.field(
        default=1.0, metadata=_option("--guidance", "classifier-free guidance scale (1 = off)")
    )
    part_scale: float = dataclasses.field(
        default=1.0, metadata=_option("--part-scale", "weight of each part of a composed prompt")
    )

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the first impossible field."""
        k, p = self.top_k, self.top_p
        _check_temperature(self.temperature)
        ok_k = isinstance(k, int) and not isinstance(k, bool) and k >= 0
        require(ok_k, "top_k", f"must be an int >= 0 (0 = off), got {k!r}", KIND)
        require(_finite_at_least(p, 0) and 0 < p <= 1, "top_p",
                f"must be in (0, 1] (1 = off), got {p!r}", KIND)  # fmt: skip
        g = self.guidance_scale
        require(_finite_at_least(g, 0), "guidance_scale",
                f"must be a finite number >= 0 (1 = no guidance), got {g!r}", KIND)  # fmt: skip
        s = self.part_scale
        require(_finite_at_least(s, 0), "part_scale",
                f"must be a finite number >= 0, got {s!r}", KIND)  # fmt: skip


# Weight of log p(codes | empty caption), chosen on a prompt set of its own:
# docs/experiments/reranking.md.
RERANK_WEIGHT = 0.4


# The rerankers a pipeline may hold a component for: "pmi" (the generator's own caption-image
# mutual information, `dalle_ar.rerank`), "clip" (CLIPScore with the pipeline's CLIP,
# `dalle_ar.models.clip`) and "clip+pmi" (the mean of the two scores' z-scores among a sample's
# candidates).
RERANKERS = ("pmi", "clip", "clip+pmi")


def reranker_parts(reranker: str) -> tuple[str, ...]:
    """The scores a reranker combines: "clip+pmi" -> ("clip", "pmi"), "clip" -> ("clip",)."""
    return tuple(reranker.split("+"))


@dataclasses.dataclass
class RerankSettings:
    """Reranked generation: per sample, `candidates` are drawn, scored against the prompt by
    `reranker` and the best `keep` kept (DALL-E's CLIP reranking, Ramesh et al. 2021, sec. 2.5).
    `rerank_weight`: the weight of the empty caption's log-likelihood in the PMI score."""

    candidates: int = dataclasses.field(
        default=1,
        metadata=_option("--candidates", "draw this many per sample and keep the best (1 = off)"),
    )
    keep: int = dataclasses.field(
        default=1, metadata=_option("--keep", "how many of each sample's candidates are kept")
    )
    reranker: str = dataclasses.field(
        default="pmi",
        metadata=_option("--reranker", "what scores candidates", RERANKERS),
    )
    rerank_weight: float = dataclasses.field(
        default=RERANK_WEIGHT,
        metadata=_option("--rerank-weight", "weight of the empty caption in the PMI score"),
    )

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the first impossible field."""
        c, k, w = self.candidates, self.keep, self.rerank_weight
        ok_c = isinstance(c, int) and not isinstance(c, bool) and c >= 1
        require(ok_c, "candidates", f"must be an int >= 1, got {c!r}", KIND)
        ok_k = isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= c
        require(ok_k, "keep", f"must be an int in [1, candidates={c}], got {k!r}", KIND)
        require(self.reranker in RERANKERS, "reranker",
                f"must be one of {RERANKERS}, got {self.reranker!r}", KIND)  # fmt: skip
        require(_finite_at_least(w, 0), "rerank_weight",
                f"must be a finite number >= 0, got {w!r}", KIND)  # fmt: skip


@dataclasses.dataclass
class PriorSampling:
    """How the diffusion prior draws a CLIP image embedding for a caption
    (`sampling.diffusion.sample_prior`): DDIM steps (Song et al. 2021), classifier-free guidance
    (Ho & Salimans 2022), and of `embed_candidates` drawn embeddings the one closest to the
    caption's text embedding kept (DALL-E 2, Ramesh et al. 2022, section 2.1). 10 steps drew
    the shapes as 25 did (prior mode fidelity over four seeds, and the prior's cosine to the true
    embedding) at 1.4-1.6x the prior mode's speed (docs/results.md#the-priors-sampling-steps)."""

    prior_steps: int = dataclasses.field(
        default=10, metadata=_option("--prior-steps", "DDIM steps of the diffusion prior")
    )
    prior_guidance: float = dataclasses.field(
        default=2.0,
        metadata=_option("--prior-guidance", "classifier-free guidance of the prior (1 = off)"),
    )
    embed_candidates: int = dataclasses.field(
        default=2,
        metadata=_option(
            "--embed-candidates",
            "draw this many image embeddings per caption, keep the closest to it (1 = off)",
        ),
    )

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the first impossible field."""
        n, g, k = self.prior_steps, self.prior_guidance, self.embed_candidates
        ok_n = isinstance(n, int) and not isinstance(n, bool) and n >= 1
        require(ok_n, "prior_steps", f"must be an int >= 1, got {n!r}", KIND)
        require(_finite_at_least(g, 0), "prior_guidance",
                f"must be a finite number >= 0 (1 = no guidance), got {g!r}", KIND)  # fmt: skip
        ok_k = isinstance(k, int) and not isinstance(k, bool) and k >= 1
        require(ok_k, "embed_candidates", f"must be an int >= 1 (1 = off), got {k!r}", KIND)


# How the masked mode's guidance scale runs over the passes (`MaskedSampling.guidance_at`).
GUIDANCE_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass
class MaskedSampling:
    """How the masked generator unmasks the image (`sampling.masked.generate_masked`): `steps`
    parallel passes on a cosine schedule; at each, every masked code is drawn (temperature,
    top-k, classifier-free guidance) and the least confident stay masked, confidence being
    log p plus Gumbel noise scaled by `confidence_temperature` x (1 - t/T) (MaskGIT, Chang et
    al. 2022, section 3.2 and its code's choice_temperature 4.5). `corrector_steps` K > 0 adds
    K passes after the last: the drawn codes are split into K random groups, and each pass masks
    one group again and redraws it given all the rest, at the last pass's guidance (a blocked
    Gibbs sweep, the corrector of Lezama et al. 2023, "Discrete Predictor-Corrector Diffusion
    Models"): a code drawn in parallel with a conflicting one is drawn again seeing it."""

    steps: int = dataclasses.field(
        default=12, metadata=_option("--steps", "parallel unmasking passes of the masked mode")
    )
    temperature: float = dataclasses.field(
        default=1.0,
        metadata=_option("--temperature", f"softmax temperature (>= {MIN_TEMPERATURE:g})"),
    )
    top_k: int = dataclasses.field(
        default=0, metadata=_option("--top-k", "keep the k most likely codes (0 = off)")
    )
    guidance_scale: float = dataclasses.field(
        default=1.0,
        metadata=_option("--guidance", "classifier-free guidance scale (1 = off)"),
    )
    confidence_temperature: float = dataclasses.field(
        default=4.5,
        metadata=_option("--confidence-temperature", "Gumbel noise on the confidence, annealed"),
    )
    guidance_schedule: str = dataclasses.field(
        default="constant",
        metadata=_option("--guidance-schedule", "constant: --guidance at every pass; linear: "
                         "rising from 1 at the first pass to --guidance at the last",
                         GUIDANCE_SCHEDULES),
    )  # fmt: skip
    corrector_steps: int = dataclasses.field(
        default=0,
        metadata=_option("--corrector-steps", "passes after the last, each redrawing 1/K of the "
                         "drawn codes given the rest (0 = off; 4 measured)"),
    )  # fmt: skip
    # Every pass runs all image positions through the network (the caption's keys and values
    # computed once, from the KV cache): matrix-matrix work
    # that bf16 speeds up on a CPU with bf16 instructions (`masked.masked_precision`): 2.3x the
    # images/s of fp32 at the main job's evaluation batch, 1.35-2.2x at batch 1 and 8
    # (docs/results.md#masked-mode), the same fidelity over four seeds
    # (#passes-and-the-corrector-on-the-jobs-own-models); the autoregressive loop's decode steps
    # ran at 0.4-0.95x in bf16 and stay in fp32. On a GPU auto is bf16 where it has bf16, as in
    # training (not measured there).
    precision: str = dataclasses.field(
        default="auto",
        metadata=_option("--precision", "the network's passes: auto (bf16 autocast where the "
                         "device has bf16, a CPU's bf16 instructions included; else fp32), fp32 "
                         "or bf16", PRECISIONS),
    )  # fmt: skip

    def guidance_at(self, t: int) -> float:
        """The guidance scale of pass t (0-based) of `steps`: `guidance_scale` at every pass
        ("constant"), or rising linearly from 1 at the first to `guidance_scale` at the last
        ("linear": guidance late, when most codes are drawn; strong guidance while the image is
        still mostly masked harms masked diffusion, Rojas et al. 2025, arXiv:2507.08965)."""
        if self.guidance_schedule == "constant" or self.steps == 1:
            return self.guidance_scale
        return 1 + (self.guidance_scale - 1) * t / (self.steps - 1)

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the first impossible field."""
        n, k, g = self.steps, self.top_k, self.guidance_scale
        ok_n = isinstance(n, int) and not isinstance(n, bool) and n >= 1
        require(ok_n, "steps", f"must be an int >= 1, got {n!r}", KIND)
        _check_temperature(self.temperature)
        ok_k = isinstance(k, int) and not isinstance(k, bool) and k >= 0
        require(ok_k, "top_k", f"must be an int >= 0 (0 = off), got {k!r}", KIND)
        require(_finite_at_least(g, 0), "guidance_scale",
                f"must be a finite number >= 0 (1 = no guidance), got {g!r}", KIND)  # fmt: skip
        c = self.confidence_temperature
        require(_finite_at_least(c, 0), "confidence_temperature",
                f"must be a finite number >= 0, got {c!r}", KIND)  # fmt: skip
        k = self.corrector_steps
        ok_k = isinstance(k, int) and not isinstance(k, bool) and k >= 0
        require(ok_k, "corrector_steps", f"must be an int >= 0 (0 = off), got {k!r}", KIND)
        require(self.guidance_schedule in GUIDANCE_SCHEDULES, "guidance_schedule",
                f"must be one of {GUIDANCE_SCHEDULES}, got {self.guidance_schedule!r}",
                KIND)  # fmt: skip
        require_precision(self.precision, "precision", KIND)


@dataclasses.dataclass
class UpsampleSampling:
    """How the cascade's upsampler draws a large image from a small one
    (`sampling.diffusion.upsample_images`): DDIM steps (Song et al. 2021, eta = 0) and the
    noise-conditioning augmentation level of the small image, a timestep of the upsampler's
    training schedule (Imagen, Saharia et al. 2022, section 2.5: the level an upsampler trained
    with augmentation is told its small image carries). 0 measured best on the shapes, for true
    small images and for generated ones; 5 steps drew as well as 10 to 50 there at half the cost
    of 10 (docs/results.md#the-cascade)."""

    upsample_steps: int = dataclasses.field(
        default=5, metadata=_option("--upsample-steps", "DDIM steps of the upsampler")
    )
    noise_level: int = dataclasses.field(
        default=0,
        metadata=_option(
            "--noise-level", "augmentation noise on the small image, a training timestep (>= 0)"
        ),
    )

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the first impossible field."""
        n, a = self.upsample_steps, self.noise_level
        ok_n = isinstance(n, int) and not isinstance(n, bool) and n >= 1
        require(ok_n, "upsample_steps", f"must be an int >= 1, got {n!r}", KIND)
        ok_a = isinstance(a, int) and not isinstance(a, bool) and a >= 0
        require(ok_a, "noise_level", f"must be an int >= 0, got {a!r}", KIND)


# MaskedSampling's fields that share ARSampling's names and command-line flags: a command that
# offers both takes them once, for the mode it runs.
MASKED_SHARED = ("temperature", "top_k", "guidance_scale")


def names(cls: type) -> tuple[str, ...]:
    """The field names of a settings dataclass."""
    return tuple(f.name for f in dataclasses.fields(cls))


def resolve(base: S, **overrides: Any) -> S:
    """`base` with the overrides that are not None put in, checked. ValueError for a name that is
    not a field of `base`'s class, or an impossible value."""
    unknown = sorted(set(overrides) - set(names(type(base))))
    if unknown:
        raise ValueError(
            f"unknown {type(base).__name__} settings {unknown}; known: {list(names(type(base)))}"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    out = dataclasses.replace(base, **given) if given else base
    out.validate()
    return out


def split_overrides(overrides: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """Split keyword arguments among settings classes by field name; ValueError naming any that
    belongs to none."""
    out: list[dict[str, Any]] = [{} for _ in classes]
    for key, value in overrides.items():
        owner = next((i for i, c in enumerate(classes) if key in names(c)), None)
        if owner is None:
            known = [n for c in classes for n in names(c)]
            raise ValueError(f"unknown sampling setting {key!r}; known: {known}")
        out[owner][key] = value
    return out


def from_dict(cls: type[S], values: dict[str, Any] | None, where: str) -> S:
    """Settings from a JSON mapping (a samples.json record, a pipeline folder's defaults); missing
    fields take the class defaults. ValueError naming `where` and the key for an unknown one."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(names(cls)))
    if unknown:
        raise ValueError(
            f"{where}: unknown {cls.__name__} settings {unknown}; known: {list(names(cls))}"
        )
    out = cls(**values)
    out.validate()
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field but those in `skip` (its metadata's flag and help), default None:
    "not given", so the pipeline folder's defaults apply."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if hints[f.name] is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = hints[f.name]
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        parser.add_argument(f.metadata["flag"], **kw)


def flags(*classes: type) -> dict[str, str]:
    """Each field of `classes` -> its command-line flag (`add_arguments`)."""
    return {f.name: f.metadata["flag"] for cls in classes for f in dataclasses.fields(cls)}


def from_args(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` but those in `skip` given on the command line (`add_arguments`)."""
    given = (n for n in names(cls) if n not in skip)
    return {n: getattr(args, n) for n in given if getattr(args, n, None) is not None}


def apply(options: list[str]) -> str:
    """Options that take no effect, as the start of their refusal: "--a applies", "--a and --b
    apply", "--a, --b and --c apply"."""
    if len(options) == 1:
        return f"{options[0]} applies"
    return f"{', '.join(options[:-1])} and {options[-1]} apply"


def upsample_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The cascade's keyword arguments of a generation call from a command line with
    `--upsample` and `UpsampleSampling`'s options: {} without --upsample; ValueError naming the
    options given without it."""
    given = from_args(args, UpsampleSampling)
    if given and not args.upsample:
        flag = flags(UpsampleSampling)
        raise ValueError(f"{apply([flag[k] for k in sorted(given)])} only with --upsample (or "
                         "--upsample-images)")  # fmt: skip
    return {"upsample": True, **given} if args.upsample else {}


__all__ = [
    "ARSampling",
    "GUIDANCE_SCHEDULES",
    "MASKED_SHARED",
    "MIN_TEMPERATURE",
    "MaskedSampling",
    "PriorSampling",
    "RERANKERS",
    "RERANK_WEIGHT",
    "RerankSettings",
    "UpsampleSampling",
    "add_arguments",
    "reranker_parts",
    "flags",
    "from_args",
    "from_dict",
    "names",
    "resolve",
    "split_overrides",
    "upsample_from_args",
]
