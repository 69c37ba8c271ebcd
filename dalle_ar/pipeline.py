"""Prompt -> images: the text tokenizer, the transformer and the VQ decoder composed.

A pipeline folder holds one subfolder per component and `pipeline.json` naming them:

    pipe_dir/
      pipeline.json   {"format": "dalle_ar.pipeline", "version": 1,
                       "components": {"text_tokenizer": "text_tokenizer", "vq": "vq",
                                      "transformer": "transformer"},
                       "defaults": {"guidance_scale": 3.0}}          # optional sampling defaults
      text_tokenizer/  vq/  transformer/                            # component folders

    assemble("runs/pipe", "runs/tok/tokenizer", "runs/vq/vq", "runs/tf/transformer")
    pipe = DalleAR.from_pretrained("runs/pipe")
    out = pipe(["a small red circle at the top left"], num_samples=4, seed=0, top_k=64)
    out.images[0].save("0.png"); out.codes  # (4, h, w); out.samples[0] = {"prompt", "seed", ..}

Every sample is reproducible alone from its metadata: `pipe([prompt], seeds=[seed], ...)` gives
the same codes and pixels whatever batch it first came from (see dalle_ar.sampling).

Prompts: an empty prompt (or one of only spaces) is the unconditional sample, the input the
model saw when its caption was dropped in training; it is allowed, with a warning. A prompt longer
than the model's text length is truncated, with a warning. Characters the tokenizer never saw in
training (not in its recorded alphabet) are encoded as raw bytes the model has hardly seen: warned.

Optional components: `pipeline.json` may also name `clip` and `prior` folders. They are loaded
through `dalle_ar.<name>.load_component(path)` once those modules provide it; until then the path
is kept in `DalleAR.extra` and a warning says the component is not used.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from dalle_ar.checkpoint import atomic_dir, read_component_config
from dalle_ar.fidelity import evaluate_fidelity, save_prompt_grid  # re-exported (__all__)
from dalle_ar.grid import to_uint8
from dalle_ar.rerank import RERANK_WEIGHT, check_weight, keep_best, pmi_scores
from dalle_ar.runtime import sample_seeds
from dalle_ar.sampling import generate_image_tokens
from dalle_ar.text import SPECIALS, TextTokenizer
from dalle_ar.transformer import Transformer, TransformerConfig
from dalle_ar.vq import VQConfig, VQTokenizer

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
FORMAT = "dalle_ar.pipeline"
REQUIRED = ("text_tokenizer", "vq", "transformer")
OPTIONAL = ("clip", "prior")
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "guidance_scale", "part_scale")
BUILTIN_DEFAULTS: dict[str, Any] = dict(
    temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0, part_scale=1.0
)
PART_SEPARATOR = " AND "  # "scene AND part AND part::-2": a composed prompt (split_prompt)
WEIGHT_MARK = "::"


def split_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """A composed prompt "scene AND part AND part::w ..." -> ("scene", [("part", 1.0),
    ("part", w), ...]). Each part is a caption naming part of the scene; sampling adds
    part_scale * w * (part - uncond) per part to the guided logits
    (`dalle_ar.sampling.generate_image_tokens`), a product of experts; a negative weight
    divides an expert out. " AND " and a trailing "::number" are reserved; a prompt without
    " AND " has no parts. Spaces around the scene and each part are dropped."""
    scene, *raw = prompt.split(PART_SEPARATOR)
    parts = []
    for k, part in enumerate(raw):
        text, weight = part, 1.0
        if WEIGHT_MARK in part:
            text, _, tail = part.rpartition(WEIGHT_MARK)
            try:
                weight = float(tail)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight):
                raise ValueError(
                    f"part {k + 1} of the composed prompt {prompt!r} ends in "
                    f"{WEIGHT_MARK}{tail!r}: expected a finite number after {WEIGHT_MARK}"
                )
        if not text.strip():
            raise ValueError(f"part {k + 1} of the composed prompt {prompt!r} is empty")
        parts.append((text.strip(), weight))
    return (scene.strip() if parts else scene), parts


@dataclasses.dataclass
class PipelineOutput:
    images: list[Image.Image]  # one RGB image per sample, prompt-major
    codes: torch.Tensor  # (n, h, w) image codes
    samples: list[dict[str, Any]]  # per sample: prompt, indices, seed and every sampling parameter


class DalleAR:
    """Text tokenizer + transformer + VQ decoder (+ hooks for CLIP and the prior)."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        vq: VQTokenizer,
        transformer: Transformer,
        defaults: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        check_compatible(tokenizer.vocab_size, vq.config, transformer.cfg)
        self.transformer = transformer.eval()
        self.vq = vq.eval()
        t = transformer.cfg
        if tokenizer.text_len != t.text_len:  # the model's text length decides
            tokenizer = TextTokenizer(
                tokenizer.hf, dataclasses.replace(tokenizer.cfg, text_len=t.text_len)
            )
        self.tokenizer = tokenizer
        self.defaults = _with_defaults(defaults)
        self.extra: dict[str, Any] = dict(extra or {})  # optional components (clip, prior)
        self._known_chars = _known_chars(tokenizer)

    # -- folders ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> DalleAR:
        """Load every component named in `folder/pipeline.json`."""
        folder = Path(folder)
        names = read_pipeline_json(folder)
        paths = {name: folder / sub for name, sub in names["components"].items()}
        tok = TextTokenizer.from_pretrained(paths["text_tokenizer"])
        vq = VQTokenizer.from_pretrained(paths["vq"], device=device)
        tf = Transformer.from_pretrained(paths["transformer"]).to(device)
        extra = {name: _load_optional(name, paths[name]) for name in OPTIONAL if name in paths}
        return cls(tok, vq, tf, names.get("defaults"), extra)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a pipeline folder (every component + pipeline.json) atomically."""
        with atomic_dir(folder) as tmp:
            self.tokenizer.save_pretrained(tmp / "text_tokenizer")
            self.vq.save_pretrained(tmp / "vq")
            self.transformer.save_pretrained(tmp / "transformer")
            _write_json(tmp, {name: name for name in REQUIRED}, self.defaults)

    @property
    def device(self) -> torch.device:
        return self.transformer.image_head.weight.device

    def to(self, device: str | torch.device) -> DalleAR:
        self.transformer.to(device)
        self.vq.to(device)
        return self

    # -- prompts ---------------------------------------------------------------------------
    def check_prompts(self, prompts: Sequence[str], max_each: int = 3) -> Any:
        """Encode the prompts (a `TextBatch`), warning about empty, over-long and
        never-seen-character prompts (see the module docstring); past `max_each` warnings of a
        kind, one line counts the rest."""
        prompts = list(prompts)
        text = self.tokenizer.encode(prompts)
        room = self.tokenizer.text_len - 2
        notes: dict[str, list[str]] = {"empty": [], "long": [], "odd": []}
        for i, (p, n) in enumerate(zip(prompts, self.tokenizer.tokenize_lengths(prompts))):
            if not p.strip():
                notes["empty"].append(f"prompt {i} is empty: this is an unconditional sample")
            if n > room:
                kept = self.tokenizer.decode(text.ids[i])[0]
                notes["long"].append(
                    f"prompt {i} is {n} tokens, the model reads {room}: truncated to {kept!r}"
                )
            odd = sorted({c for c in self.tokenizer.normalize(p) if c not in self._known_chars})
            if odd:
                notes["odd"].append(
                    f"prompt {i} has characters the tokenizer never saw in training: "
                    f"{' '.join(repr(c) for c in odd)}; they are encoded as raw bytes the model "
                    "has hardly seen"
                )
        for kind, lines in notes.items():
            for line in lines[:max_each]:
                log.warning(line)
            if len(lines) > max_each:
                log.warning("... and %d more prompts like that (%s)", len(lines) - max_each, kind)
        return text

    # -- generation ------------------------------------------------------------------------
    def encode_prime(self, image: Any, rows: int) -> torch.Tensor:
        """The first `rows` rows of an image's codes (1, rows, w), for completing it (priming).
        `image`: a PIL image, a uint8 (H, W, 3) array or a (3, H, W) tensor in [0, 1]; it is
        resized to the model's image size."""
        cfg = self.transformer.cfg
        if not 0 <= rows <= cfg.grid_h:
            raise ValueError(f"prime rows must be in [0, {cfg.grid_h}], got {rows}")
        size = cfg.grid_h * self.vq.config.downsample, cfg.grid_w * self.vq.config.downsample
        pil = Image.fromarray(to_uint8([image])[0]).resize(size[::-1], Image.BICUBIC)
        x = torch.from_numpy(to_uint8([pil])).permute(0, 3, 1, 2).float().div(255)
        return self.vq.encode(x.to(self.device))[:, :rows].cpu()

    @torch.inference_mode()
    def __call__(
        self,
        prompts: str | Sequence[str],
        num_samples: int = 1,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float | None = None,
        prime_codes: torch.Tensor | None = None,
        batch_size: int = 16,
        progress: bool = False,
        part_scale: float | None = None,
        candidates: int = 1,
        rerank_weight: float = RERANK_WEIGHT,
    ) -> PipelineOutput:
        """Generate `num_samples` images per prompt. Seeds: `seeds` (one per sample), else
        seed, seed+1, ... (prompt-major), else random ones (recorded in the metadata).
        Sampling parameters left as None take the pipeline's defaults. prime_codes
        (1 | n_prompts | n_samples, r, w) fixes the first r rows of codes. `batch_size` samples
        are generated together (the output does not depend on it). A prompt may be composed,
        "scene AND part AND ...": see `split_prompt`; part_scale weighs its parts.

        candidates=K > 1 draws K candidates per sample and keeps the best-scoring one
        (`dalle_ar.rerank`: the transformer's caption-image mutual information, rerank_weight
        the weight of the empty caption; a composed prompt is scored by its scene caption).
        Candidate c of sample j gets seed + j + c * n_samples, so candidate 0 is the sample
        drawn without reranking; `seeds` then holds K per sample (sample-major). Each kept
        sample records its own seed: generated alone with it and its recorded parameters (and
        prime codes), it comes out the same."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"expected a prompt or a non-empty list of prompts, got {prompts!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                  guidance_scale=guidance_scale, batch_size=batch_size, progress=progress,
                  part_scale=part_scale)  # fmt: skip
        if candidates > 1:
            return self._reranked(
                prompts, num_samples, candidates, rerank_weight, seed, seeds, prime_codes, **kw
            )
        codes, samples = self._draw(prompts, num_samples, seed, seeds, prime_codes, **kw)
        return PipelineOutput(self.decode(codes), codes, samples)

    def _draw(
        self,
        prompts: list[str],
        num_samples: int,
        seed: int | None,
        seeds: Sequence[int] | None,
        prime_codes: torch.Tensor | None,
        temperature: float | None,
        top_k: int | None,
        top_p: float | None,
        guidance_scale: float | None,
        batch_size: int,
        progress: bool,
        part_scale: float | None,
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """The codes (n, h, w) and per-sample metadata of __call__ without reranking (prompts and
        num_samples already checked)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        cfg = self.transformer.cfg
        if cfg.cond_len:
            raise ValueError(
                f"this transformer is conditioned on an embedding (cond_dim={cfg.cond_dim}) and "
                "needs the prior to make one from the prompt; the prior is not wired in yet"
            )
        given = dict(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            guidance_scale=guidance_scale,
            part_scale=part_scale,
        )
        params = {k: self.defaults[k] if v is None else v for k, v in given.items()}
        n = len(prompts) * num_samples
        per_seed = sample_seeds(n, seed if seeds is None else seeds)
        split = [split_prompt(p) for p in prompts]
        text = self.check_prompts([scene for scene, _ in split])
        # each distinct part is encoded (and warned about) once
        part_texts = sorted({q for _, parts in split for q, _ in parts})
        part_row = {q: i for i, q in enumerate(part_texts)}
        part_text = self.check_prompts(part_texts) if part_texts else None
        prime = _expand_prime(prime_codes, len(prompts), num_samples)
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
        codes = torch.zeros(n, cfg.grid_h, cfg.grid_w, dtype=torch.long)
        text_lens = text.mask.sum(1)
        bar = tqdm(total=n * cfg.image_len, desc="tokens", unit="tok", disable=not progress)
        for K, idx in tqdm(chunks, desc="batches", disable=not progress or len(chunks) == 1):
            rows = [i // num_samples for i in idx]
            part_kw = {}
            if K:
                sel = [part_row[q] for r in rows for q, _ in split[r][1]]
                part_kw = dict(
                    parts=part_text.ids[sel].view(len(idx), K, -1),
                    part_lens=part_text.mask[sel].sum(1).view(len(idx), K),
                    part_weights=torch.tensor([[w for _, w in split[r][1]] for r in rows]),
                )
            codes[idx] = generate_image_tokens(
                self.transformer,
                text.ids[rows],
                text_lens=text_lens[rows],
                empty_ids=empty.ids[0],
                empty_len=int(empty.mask[0].sum()),
                prime_codes=None if prime is None else prime[idx],
                seeds=[per_seed[i] for i in idx],
                callback=lambda *_, k=len(idx): bar.update(k),  # noqa: B008
                **part_kw,
                **params,
            ).cpu()
        bar.close()
        rows = 0 if prime is None else prime.shape[1]
        samples = [
            {
                "prompt": prompts[i // num_samples],
                "prompt_index": i // num_samples,
                "sample_index": i % num_samples,
                "seed": per_seed[i],
                **params,
                "prime_rows": rows,
                "prime_codes": None if prime is None else prime[i].tolist(),
            }
            for i in range(n)
        ]
        return codes, samples

    def _reranked(
        self,
        prompts: list[str],
        num_samples: int,
        candidates: int,
        weight: float,
        seed: int | None,
        seeds: Sequence[int] | None,
        prime_codes: torch.Tensor | None,
        **kw: Any,
    ) -> PipelineOutput:
        """`num_samples` per prompt, each the best of `candidates` (see __call__)."""
        check_weight(weight)  # before any drawing
        n, K = len(prompts) * num_samples, candidates
        if seeds is not None and len(seeds) != n * K:
            raise ValueError(
                f"with candidates={K}, seeds holds {K} per sample ({n * K} for {n} samples), "
                f"got {len(seeds)}"
            )
        if seeds is None:
            # candidate c of sample j: seed + j + c*n, so candidate 0 is the plain sample
            if seed is None:
                seeds = sample_seeds(n * K)
            else:
                seeds = [seed + j + c * n for j in range(n) for c in range(K)]
        if prime_codes is not None and prime_codes.ndim == 3 and len(prime_codes) == n > 1:
            prime_codes = prime_codes.repeat_interleave(K, 0)  # one grid per sample
        elif prime_codes is not None and len(prime_codes) not in (1, len(prompts)):
            raise ValueError(
                f"prime_codes must hold 1, {len(prompts)} (per prompt) or {n} (per sample) "
                f"grids, got {len(prime_codes)}"
            )
        codes, metas = self._draw(prompts, num_samples * K, None, seeds, prime_codes, **kw)
        scene_of = [split_prompt(p)[0] for p in prompts]
        scenes = [scene_of[m["prompt_index"]] for m in metas]
        rows, bs = metas[0]["prime_rows"], kw["batch_size"]
        scores = pmi_scores(
            self.transformer,
            self.tokenizer,
            scenes,
            codes,
            weight=weight,
            start_row=rows,
            batch_size=bs,
        )
        # sample j of the output is the best of candidates j*K .. j*K + K-1 (prompt-major)
        best = keep_best(scores.view(n, K), 1)[:, 0]
        pick = (best + torch.arange(n) * K).tolist()
        samples = []
        for j, i in enumerate(pick):
            meta = dict(metas[i])
            meta.update(sample_index=j % num_samples, candidate_index=int(best[j]),
                        candidates=K, rerank_weight=weight,
                        rerank_score=float(scores[i]))  # fmt: skip
            samples.append(meta)
        return PipelineOutput(self.decode(codes[pick]), codes[pick], samples)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> list[Image.Image]:
        """Codes (n, h, w) -> PIL images. One image per VQ call, so the pixels of a sample never
        depend on the batch it was decoded in."""
        out = []
        for c in codes:
            x = self.vq.decode(c[None].to(self.device))
            out.append(Image.fromarray(to_uint8(x)[0]))
        return out


# ----------------------------------------------------------------------------------------------
# Folders.


def check_compatible(text_vocab_size: int, vq_cfg: VQConfig, tf_cfg: TransformerConfig) -> None:
    """Refuse components that cannot work together, naming both sizes."""
    if vq_cfg.codebook_size != tf_cfg.image_vocab:
        raise ValueError(
            f"the VQ codebook has {vq_cfg.codebook_size} codes but the transformer's image_vocab "
            f"is {tf_cfg.image_vocab}: expected equal (were they trained together?)"
        )
    if tf_cfg.has_text and text_vocab_size > tf_cfg.text_vocab:
        raise ValueError(
            f"the tokenizer has {text_vocab_size} ids but the transformer's text_vocab is "
            f"{tf_cfg.text_vocab}: expected text_vocab >= the tokenizer's vocabulary"
        )
    patch = 3 * vq_cfg.downsample**2
    if tf_cfg.code_features and tf_cfg.code_features != patch:
        raise ValueError(
            f"the transformer describes codes with {tf_cfg.code_features} features but this VQ "
            f"draws {patch} ({vq_cfg.downsample}x{vq_cfg.downsample} RGB patches): expected the "
            "VQ it was trained with"
        )


def read_pipeline_json(folder: str | Path) -> dict[str, Any]:
    """Read and check `folder/pipeline.json`: every required component named and present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder {folder} does not exist")
    f = folder / PIPELINE_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{folder} is not a pipeline folder: {PIPELINE_FILE} is missing "
            "(write one with dalle_ar.pipeline.assemble)"
        )
    meta = json.loads(f.read_text())
    comps = meta.get("components")
    if meta.get("format") != FORMAT or not isinstance(comps, dict):
        raise ValueError(f"{f}: expected format {FORMAT!r} with a 'components' mapping")
    missing = [name for name in REQUIRED if name not in comps]
    if missing:
        raise ValueError(f"{f} names no {', '.join(missing)} component (needs {REQUIRED})")
    for name, sub in comps.items():
        if name not in REQUIRED + OPTIONAL:
            raise ValueError(f"{f}: unknown component {name!r}; known: {REQUIRED + OPTIONAL}")
        if not (folder / sub / "config.json").is_file():
            raise FileNotFoundError(
                f"pipeline folder {folder}: the {name} component ({sub}/) is missing or has no "
                "config.json"
            )
    return meta


def assemble(
    folder: str | Path,
    tokenizer: str | Path,
    vq: str | Path,
    transformer: str | Path,
    *,
    clip: str | Path | None = None,
    prior: str | Path | None = None,
    defaults: dict[str, Any] | None = None,
    link: bool = False,
) -> Path:
    """Write a pipeline folder from trained component folders (tokenizer, vq, transformer and
    optionally clip, prior), atomically: copies (or, with `link`, absolute symlinks) plus
    pipeline.json. The components are checked against each other first (vocabulary and codebook
    sizes)."""
    srcs = {"text_tokenizer": tokenizer, "vq": vq, "transformer": transformer}
    srcs.update({k: v for k, v in (("clip", clip), ("prior", prior)) if v is not None})
    srcs = {k: Path(v) for k, v in srcs.items()}
    for name, src in srcs.items():
        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{name} folder {src} is missing or has no config.json")
    tok = TextTokenizer.from_pretrained(srcs["text_tokenizer"])
    vq_cfg = read_component_config(srcs["vq"], "vq", VQConfig)
    tf_cfg = read_component_config(srcs["transformer"], "transformer", TransformerConfig)
    check_compatible(tok.vocab_size, vq_cfg, tf_cfg)
    defaults = _with_defaults(defaults)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for name, src in srcs.items():
            if link:
                os.symlink(src.resolve(), tmp / name, target_is_directory=True)
            else:
                shutil.copytree(src, tmp / name)
        _write_json(tmp, {name: name for name in srcs}, defaults)
    log.info("assembled pipeline %s from %s", folder, {k: str(v) for k, v in srcs.items()})
    return folder


def _write_json(folder: Path, components: dict[str, str], defaults: dict[str, Any]) -> None:
    meta = {"format": FORMAT, "version": 1, "components": components, "defaults": defaults}
    (folder / PIPELINE_FILE).write_text(json.dumps(meta, indent=2))


def _load_optional(name: str, path: Path) -> Any:
    """The hook for CLIP and the prior: `dalle_ar.<name>.load_component(path)`."""
    try:
        module = importlib.import_module(f"dalle_ar.{name}")
    except ImportError:
        module = None
    loader = getattr(module, "load_component", None)
    if loader is None:
        log.warning(
            "%s component at %s is not used: dalle_ar.%s has no loader yet", name, path, name
        )
        return path
    return loader(path)


# ----------------------------------------------------------------------------------------------
# Helpers.


def _with_defaults(defaults: dict[str, Any] | None) -> dict[str, Any]:
    unknown = set(defaults or {}) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling defaults {sorted(unknown)}; known: {SAMPLING_KEYS}")
    return {**BUILTIN_DEFAULTS, **(defaults or {})}


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


def _known_chars(tok: TextTokenizer) -> set[str]:
    """Characters seen in training: the tokenizer's recorded alphabet, or (for a folder saved
    without one) the characters that occur in some learned merge."""
    if tok.alphabet is not None:
        return set(tok.alphabet)
    dec = tok.backend.decoder
    chars: set[str] = set()
    for token in tok.backend.get_vocab():
        if len(token) < 2 or token in SPECIALS:
            continue  # the 256 single-byte tokens exist whether or not training saw them
        chars.update(c for c in dec.decode([token]) if c != "\ufffd")
    return chars


__all__ = [
    "DalleAR",
    "PipelineOutput",
    "assemble",
    "check_compatible",
    "evaluate_fidelity",
    "read_pipeline_json",
    "save_prompt_grid",
]
