r"""`dalle-ar sample`: generate images from prompts with a pipeline folder.

    dalle-ar sample --model runs/pipe "a small red circle at the top left" --num 4 --out out/
    dalle-ar sample --model runs/pipe "a red circle" --mode prior --prior-steps 25 --out out/
    dalle-ar sample --model runs/pipe --variations a.png b.png --num 4 --out out/
    dalle-ar sample --model runs/pipe "a blue square" --mode masked --steps 12 --out out/
    dalle-ar sample --model runs/pipe "a red circle at the top left" --mode masked \
        --init scene.png --mask region.png --out out/        # inpainting: repaint the region
    dalle-ar sample --model runs/pipe --prompts-file prompts.txt --guidance 3 --top-k 64 --out out/
    dalle-ar sample --model runs/pipe "a pink diamond at the top" --candidates 16 --out out/
    dalle-ar sample --model runs/pipe --prompts-file p.txt --candidates 16 --keep 4 \
        --reranker clip --out out/                 # reranked batch generation (CLIP)
    dalle-ar sample --model runs/pipe "a red circle" --upsample --out out/     # the cascade
    dalle-ar sample --model runs/pipe --upsample-images small.png --out out/  # your own pictures
    dalle-ar sample --from-json out/samples.json --index 2 --out again/     # regenerate one image
    dalle-ar sample --from-json out/samples.json --candidate 37 --out again/  # any candidate
    dalle-ar sample --model runs/pipe --out out/ \
        "a pink diamond, top left AND a diamond, top left AND a pink, top left"  # composed prompt

Writes one PNG per sample (PPP_SS.png: prompt PPP, sample SS), a captioned grid per prompt
(grid_PPP.png) and samples.json holding the model folder, every parameter and each sample's seed
(and primed codes), so any image can be regenerated exactly with --from-json. Each image is
written as soon as it is drawn, and samples.json rewritten (atomically) to name it, so a run
that stops keeps every image it drew, with their records; the grids come at the end.

--candidates N draws N images per sample and keeps the best --keep K of them (each prompt then
gets --num x K images), scored by --reranker: pmi (the transformer's caption-image mutual
information, `dalle_ar.rerank`), clip (CLIPScore with the pipeline's CLIP) or clip+pmi. Candidates
are drawn in batches across prompts and scored as they come; the grids label each kept image with
its score, and samples.json records every candidate's seed and scores ("candidates"), so any of
them can be regenerated alone (--candidate I).

--mode prior (DALL-E 2; a pipeline with a clip and a prior component): the diffusion prior draws a
CLIP image embedding from each prompt's CLIP text embedding (--prior-steps, --prior-guidance,
--embed-candidates), and the transformer draws the codes from it and the prompt. --variations
IMG ... draws --num new pictures of each given picture from its CLIP image embedding (no
prompts).

--mode masked (a pipeline with a masked component): the masked generator unmasks all codes in
--steps parallel passes (--temperature, --top-k and --guidance apply to it, and
--confidence-temperature); with --init IMG --mask MASK it repaints the mask's region (white) of
the picture and keeps the codes of the rest exactly.

--upsample (a pipeline with an upsampler component; any mode): each kept image is then drawn
again at the upsampler's larger size (--upsample-steps, --noise-level), from its own seed;
reranking scores the small candidates, so only kept images are upsampled. --upsample-images
IMG ... upsamples the given pictures (of the upsampler's small size) instead, seeds from --seed.

A composed prompt "scene AND part AND ..." also follows each part, a caption naming part of the
scene, weighed by --part-scale (`dalle_ar.prompts.split_prompt`).

An empty prompt is the unconditional sample (allowed, with a warning); over-long prompts are
truncated (warning); --num < 1, an unreadable pipeline folder or components that do not fit
each other stop with a message and exit status 2, and so does what would be ignored, before any
drawing: a setting of another mode than --mode's (--steps with --mode ar), --reranker or
--rerank-weight without --candidates N > 1, options beside --from-json that would change what it
draws (prompts, --num, --seed, --mode, sampling flags), and --variations in a --mode other than
ar.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dalle_ar.checkpoint import inside, write_json_atomic
from dalle_ar.cli import add_pipeline_arguments, load_pipeline
from dalle_ar.grid import prompt_grids
from dalle_ar.pipelines.ar import (
    MAX_BATCH,
    MEMORY_MB,
    MODES,
    check_mode_settings,
    mode_setting_names,
)
from dalle_ar.sampling.settings import (
    MASKED_SHARED,
    ARSampling,
    MaskedSampling,
    PriorSampling,
    RerankSettings,
    UpsampleSampling,
    add_arguments,
    apply,
    flags,
    from_args,
    names,
    upsample_from_args,
)

log = logging.getLogger(__name__)
JSON_NAME = "samples.json"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dalle-ar sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("prompts", nargs="*", help="prompts (each one quoted)")
    # --model, --device, --threads, --allow-mismatch (--model: or the one --from-json records)
    add_pipeline_arguments(ap, required=False)
    ap.add_argument("--prompts-file", help="a text file with one prompt per line")
    ap.add_argument("--num", type=int, default=1, help="samples per prompt (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="first seed; sample i gets seed + i")
    add_arguments(ap, ARSampling)  # every sampling setting, from its one definition
    add_arguments(ap, RerankSettings)
    add_arguments(ap, PriorSampling)
    # the masked mode's temperature, top-k and guidance are the options above
    add_arguments(ap, MaskedSampling, skip=MASKED_SHARED)
    add_arguments(ap, UpsampleSampling)
    ap.add_argument("--upsample", action="store_true",
                    help="upsample each kept image with the pipeline's upsampler")  # fmt: skip
    ap.add_argument("--upsample-images", nargs="+", metavar="IMG",
                    help="upsample these pictures (of the upsampler's small size)")  # fmt: skip
    ap.add_argument("--mode", default="ar", choices=MODES,
                    help="ar: the prompt alone; prior: the prior's CLIP image embedding too; "
                         "masked: the masked generator, in parallel passes")  # fmt: skip
    ap.add_argument("--init", help="--mode masked: the picture to repaint (with --mask)")
    ap.add_argument("--mask", help="--mode masked: white where --init is repainted")
    ap.add_argument(
        "--variations",
        nargs="+",
        metavar="IMG",
        help="pictures to draw --num variations of (from their CLIP embeddings)",
    )
    ap.add_argument("--prime-image", help="complete this image: keep its top --prime-rows rows")
    ap.add_argument("--prime-rows", type=int, default=0, help="code rows kept from --prime-image")
    ap.add_argument("--batch-size", type=int, help="samples generated together (default: as many "
                    f"as --memory-mb holds, at most {MAX_BATCH})")  # fmt: skip
    ap.add_argument(
        "--memory-mb",
        type=float,
        default=MEMORY_MB,
        help=f"memory the drawing batches may hold (default {MEMORY_MB:g} MiB)",
    )
    ap.add_argument("--from-json", help="regenerate a sample recorded in a samples.json")
    ap.add_argument("--index", type=int, help="with --from-json: which sample (default: all)")
    ap.add_argument("--candidate", type=int, help="with --from-json: which candidate")
    ap.add_argument("--out", required=True, help="output folder")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # threads: set by load_pipeline
    try:
        if args.from_json:
            _check_regeneration_options(argv)
            return _regenerate(args)
        return _sample(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dalle-ar sample: {e}", file=sys.stderr)
        return 2


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("expected at least one prompt (arguments or --prompts-file), got none")
    return prompts


def check_out(out: str | Path, flag: str = "--out") -> Path:
    """Before any drawing: ValueError when the output folder cannot be made or written (a file of
    that name, a file among its parents, a folder without write permission), naming it. Nothing
    is created here: the first image written makes the folder."""
    folder = Path(out)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == folder else f"cannot be made: {probe} is a file"
        raise ValueError(f"{flag} {folder} {where}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == folder else f" (in {probe})"
        raise ValueError(f"{flag} {folder} cannot be written{where}: permission denied")
    return folder


def _sample(args: argparse.Namespace) -> int:
    if not args.model:
        raise ValueError("--model FOLDER is required (or --from-json FILE)")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    check_out(args.out)
    if args.variations:
        return _variations(args)
    if args.upsample_images:
        return _upsample_images(args)
    prompts = _read_prompts(args)
    check_mode_settings(args.mode, mode_settings_given(args), flags=True)  # before loading
    pipe = load_pipeline(args)
    check_rerank_flags(args, pipe)  # the command line's (the web page sends every setting)
    draw(args, pipe, prompts)
    return 0


def command_args(model: str | Path, out: str | Path, prompts: list[str], **options: Any) -> Any:
    """The parsed command line `dalle-ar sample --model MODEL --out OUT PROMPTS ...` with
    `options` set as if given: option names as the parser stores them (a settings field's name,
    `mode`, `seed`, `init`, `mask`; None = not given, the folder's default). ValueError naming
    an option the command does not have."""
    args = _parser().parse_args(["--model", str(model), "--out", str(out), "--", *prompts])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise ValueError(f"dalle-ar sample has no options {unknown}")
    vars(args).update(options)
    return args


def draw(args: argparse.Namespace, pipe: Any, prompts: list[str]) -> Any:
    """The images of `dalle-ar sample` (plain, reranked, in any mode, inpainting) drawn by the
    loaded pipeline `pipe`, written to args.out as they come (PNGs, samples.json, then the
    grids); returns the pipeline's output (`dalle_ar.pipelines.PipelineOutput`). ValueError for
    settings or options that do not go together, before any drawing."""
    if (args.init is None) != (args.mask is None):
        raise ValueError("--init and --mask go together (the picture and the region to repaint)")
    if args.init and args.mode != "masked":
        raise ValueError("--init/--mask repaint in --mode masked")
    # else they'd be ignored (the command checked before loading; the web page draws here too)
    check_mode_settings(args.mode, mode_settings_given(args), flags=True)
    if args.mode == "masked":
        return _masked(args, pipe, prompts)
    prime = None
    if args.prime_image:
        prime = pipe.encode_prime(_picture(args.prime_image), args.prime_rows)
    elif args.prime_rows:
        raise ValueError("--prime-rows needs --prime-image")
    writer = _Writer(args)
    out = pipe(
        prompts,
        num_samples=args.num,
        seed=args.seed,
        prime_codes=prime,
        batch_size=args.batch_size,
        memory_mb=args.memory_mb,
        progress=True,
        on_batch=writer,
        mode=args.mode,
        **from_args(args, ARSampling),
        **from_args(args, RerankSettings),
        **from_args(args, PriorSampling),
        **upsample_from_args(args),
    )
    writer.finish(out, len(prompts))
    return out


def check_rerank_flags(args: argparse.Namespace, pipe: Any) -> None:
    """ValueError when --reranker or --rerank-weight is given but each sample is one candidate
    (--candidates, else the folder's default, is 1): nothing is reranked, so they would be
    ignored."""
    given, flag = from_args(args, RerankSettings), flags(RerankSettings)
    candidates = given.get("candidates", pipe.defaults["rerank"].candidates)
    ranking = [flag[k] for k in ("reranker", "rerank_weight") if k in given]
    if candidates == 1 and ranking:
        raise ValueError(f"{apply(ranking)} only with --candidates N > 1 (each "
                         "sample is one candidate now: nothing is ranked)")  # fmt: skip


def mode_settings_given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of the modes' own classes (autoregressive, prior, masked) given on a command
    line of `add_arguments` options, for `check_mode_settings`."""
    return {**from_args(args, ARSampling), **from_args(args, PriorSampling),
            **from_args(args, MaskedSampling, skip=MASKED_SHARED)}  # fmt: skip


def _masked(args: argparse.Namespace, pipe: Any, prompts: list[str]) -> Any:
    """The masked mode: plain or inpainting (--init, --mask)."""
    from PIL import Image

    ar = from_args(args, ARSampling)  # the shared ones only: `draw` checked the rest
    kw = {**ar, **from_args(args, MaskedSampling, skip=MASKED_SHARED),
          **from_args(args, RerankSettings), **upsample_from_args(args)}  # fmt: skip
    writer = _Writer(args)
    common = dict(num_samples=args.num, seed=args.seed, batch_size=args.batch_size,
                  memory_mb=args.memory_mb, progress=True, on_batch=writer, **kw)  # fmt: skip
    if args.init:
        for f in (args.init, args.mask):
            if not Path(f).is_file():
                raise FileNotFoundError(f"no such picture {f}")
        init, mask = _picture(args.init), Image.open(args.mask)
        out = pipe.inpaint([init] * len(prompts), [mask] * len(prompts), prompts, **common)
    else:
        out = pipe(prompts, mode="masked", **common)
    writer.finish(out, len(prompts))
    return out


def _picture(path: str | Path) -> Any:
    """The picture at `path` as a viewer shows it (8-bit RGB PIL image, upright, transparency on
    the data's grey: `dalle_ar.data.shards.decode_image`, as in training); ValueError naming the
    file and the reason when it cannot be shown."""
    from dalle_ar.data.shards import decode_image

    img, reason = decode_image(Path(path).read_bytes())
    if reason:
        raise ValueError(f"cannot read the picture {path}: {reason}")
    return img


def _variations(args: argparse.Namespace) -> int:
    if args.prompts or args.prompts_file or args.prime_image:
        raise ValueError("--variations takes pictures, not prompts or --prime-image")
    missing = [f for f in args.variations if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"--variations: no such picture {missing}")
    # the pictures' CLIP embeddings drive the transformer, as the prior's do in the prior mode
    if args.mode != "ar":
        raise ValueError(f"--variations draws from the pictures' CLIP embeddings, not in "
                         f"--mode {args.mode}")  # fmt: skip
    check_mode_settings("ar", mode_settings_given(args), flags=True, call="--variations")
    pics = [_picture(f) for f in args.variations]
    pipe = load_pipeline(args)
    check_rerank_flags(args, pipe)
    settings = {**from_args(args, ARSampling), **from_args(args, RerankSettings),
                **upsample_from_args(args)}  # fmt: skip

    def relabel(m: dict[str, Any]) -> None:
        m["prompt"] = f"variation of {Path(args.variations[m['prompt_index']]).name}"

    writer = _Writer(args, relabel)
    out = pipe.variations(pics, num_samples=args.num, seed=args.seed,
                          batch_size=args.batch_size, memory_mb=args.memory_mb, progress=True,
                          on_batch=writer, **settings)  # fmt: skip
    writer.finish(out, len(pics))  # the records relabelled are the output's own
    return 0


def _upsample_images(args: argparse.Namespace) -> int:
    """--upsample-images: the given pictures upsampled (picture i with seed --seed + i; prompts,
    one per picture, for an upsampler that reads captions), saved as III_STEM.png with
    upsampled.json recording each one's source, seed and settings."""
    if args.variations or args.upsample:
        raise ValueError("--upsample-images takes pictures (and, for an upsampler that reads "
                         "captions, one prompt each), not --variations or --upsample")  # fmt: skip
    missing = [f for f in args.upsample_images if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"--upsample-images: no such picture {missing}")
    prompts = _read_prompts(args) if (args.prompts or args.prompts_file) else None
    pics = [_picture(f) for f in args.upsample_images]
    pipe = load_pipeline(args)
    seeds = [args.seed + i for i in range(len(pics))]
    settings = from_args(args, UpsampleSampling)
    up = pipe.components.get("upsampler")
    if prompts is not None and up is not None and not up.cfg.caption_dim:
        log.warning("this upsampler reads no captions: the prompts are not used")
        prompts = None
    big = pipe.upsample(pics, seeds, prompts, progress=True, **settings)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (f, im) in enumerate(zip(args.upsample_images, big)):
        name = f"{i:03d}_{Path(f).stem}.png"
        im.save(folder / name)
        records.append({"file": name, "source": str(Path(f).resolve()), "seed": seeds[i],
                        "prompt": None if prompts is None else prompts[i]})  # fmt: skip
    settings = {**dataclasses.asdict(pipe.defaults["upsample"]), **settings}
    doc = {"model": str(Path(args.model).resolve()), "settings": settings, "pictures": records}
    write_json_atomic(folder / "upsampled.json", doc)
    print(f"wrote {len(big)} upsampled pictures and upsampled.json to {folder}")
    return 0


class _Writer:
    """The output of one call, written as it is drawn (the pipeline's `on_batch`): each finished
    batch's PNGs at once, then samples.json rewritten whole and atomically
    (`write_json_atomic`), so it is valid JSON at every moment and names exactly the images
    written so far; a run that dies keeps what it drew. The grids come at the end (`finish`).
    `relabel(meta)`: changes a sample's record before it is written (its prompt)."""

    def __init__(self, args: argparse.Namespace, relabel: Any = None) -> None:
        self.folder = Path(args.out)
        self.relabel = relabel
        self.records: list[dict[str, Any]] = []
        self.doc = {
            "model": str(Path(args.model).resolve()),
            "command": ["dalle-ar", "sample", *(_argv_of(_parser(), args))],
            "samples": self.records,
            "candidates": [],  # reranked: every candidate's seed and scores
        }

    def __call__(self, part: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if part.small_images:  # the cascade: the small pictures too
            (self.folder / "small").mkdir(exist_ok=True)
        for k, (img, meta) in enumerate(zip(part.images, part.samples)):
            if self.relabel is not None:
                self.relabel(meta)
            name = f"{meta['prompt_index']:03d}_{meta['sample_index']:02d}.png"
            img.save(self.folder / name)
            if part.small_images:
                part.small_images[k].save(self.folder / "small" / name)
            self.records.append({"index": len(self.records), "file": name, **meta})
        self.doc["candidates"] += part.candidates
        write_json_atomic(self.folder / JSON_NAME, self.doc)

    def finish(self, out: Any, n_prompts: int) -> None:
        """The grid per prompt, once the call is done."""
        for p, grid in enumerate(prompt_grids(out)):
            grid.save(self.folder / f"grid_{p:03d}.png")
        print(f"wrote {len(self.records)} images, {n_prompts} grids and {JSON_NAME} to "
              f"{self.folder}")  # fmt: skip


def _argv_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The options of this run as the parser spells them, for the record (it runs again)."""
    skip = {"prompts", "from_json", "index", "candidate", "threads", "help", "variations",
            "upsample_images"}  # fmt: skip
    flag = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    out = []
    for k, v in vars(args).items():
        if k in skip or v is None or v is False:
            continue
        out += [flag[k]] if v is True else [flag[k], str(v)]
    return out + list(args.prompts)


RECORD_KEYS = ("index", "file", "prompt", "prompt_index", "sample_index", "seed")


# what --from-json takes besides: where and how it draws, not what (the drawing is batch-invariant)
REGENERATION_OPTIONS = ("from_json", "index", "candidate", "out", "model", "device", "threads",
                        "allow_mismatch", "batch_size", "memory_mb")  # fmt: skip


def _check_regeneration_options(argv: list[str] | None) -> None:
    """ValueError naming every option given beside --from-json that would change what is drawn
    (prompts, --num, --seed, --mode, sampling settings, priming, inpainting, upsampling): the
    regeneration draws each sample as its record says, so it would ignore them."""
    ap = _parser()
    for action in ap._actions:  # only what the command line names is parsed into the namespace
        action.default = argparse.SUPPRESS
    given = vars(ap.parse_args(argv))
    names = {a.dest: (a.option_strings or [a.dest])[0] for a in ap._actions}
    ignored = [names[d] for d in given if d not in REGENERATION_OPTIONS]
    if ignored:
        raise ValueError(f"--from-json draws each sample again as its record says: it takes no "
                         f"{', '.join(ignored)} (draw anew without --from-json)")  # fmt: skip


def _regenerate(args: argparse.Namespace) -> int:
    path = Path(args.from_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    samples = doc.get("samples") if isinstance(doc, dict) else None
    if not isinstance(samples, list) or not samples:
        raise ValueError(f"{path} holds no samples (expected a {JSON_NAME} from dalle-ar sample)")
    for i, rec in enumerate(samples):
        lacking = [k for k in RECORD_KEYS if k not in rec] if isinstance(rec, dict) else RECORD_KEYS
        if lacking:
            raise ValueError(f"{path}: samples[{i}] is not a sample record (it lacks "
                             f"{', '.join(lacking)})")  # fmt: skip
        # the record names the file it is written to: a name inside --out, never a path out of it
        inside(args.out, rec["file"], f"{path}: samples[{i}].file")
    if args.index is not None and not 0 <= args.index < len(samples):
        raise ValueError(f"--index must be in [0, {len(samples)}), got {args.index}")
    chosen = samples if args.index is None else [samples[args.index]]
    if args.candidate is not None:
        if args.index is not None:
            raise ValueError("give --index (a sample) or --candidate (a candidate), not both")
        cands = doc.get("candidates") or []
        if not 0 <= args.candidate < len(cands):
            raise ValueError(f"--candidate must be in [0, {len(cands)}) for {path}, got "
                             f"{args.candidate}")  # fmt: skip
        c = cands[args.candidate]
        # drawn with the settings and primed codes of its sample, which kept `keep` of them
        kept = next(s for s in samples if s["prompt_index"] == c["prompt_index"]
                    and s["sample_index"] // s.get("keep", 1) == c["sample"])  # fmt: skip
        # as it was scored: small (the cascade upsamples only the kept ones)
        chosen = [{**kept, "seed": c["seed"], "upsample": False,
                   "file": f"candidate_{args.candidate:04d}.png"}]  # fmt: skip
    check_out(args.out)
    pipe = load_pipeline(args, args.model or doc["model"])
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    for rec in chosen:
        img = _one(pipe, rec)
        what = (f"candidate {args.candidate} (of sample {rec['index']})"
                if args.candidate is not None else f"sample {rec['index']}")  # fmt: skip
        target = inside(folder, rec["file"], f"{path}: the file of {what}")
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target)
        print(f"regenerated {what} ({rec['prompt']!r}) -> {target}")
    return 0


def _one(pipe: Any, rec: dict[str, Any]):
    import torch

    prime = rec.get("prime_codes")
    if rec.get("mode", "ar") not in MODES:
        raise ValueError(f"sample {rec['index']} was drawn from given pictures ({rec['mode']}): "
                         "regenerate it with --variations and its seed")  # fmt: skip
    mode = rec.get("mode", "ar")
    settings = {k: rec[k] for k in mode_setting_names(mode) if rec.get(k) is not None}
    if mode == "masked":  # a record from before `MaskedSampling.precision` was drawn in fp32
        settings.setdefault("precision", "fp32")
    if rec.get("upsample"):
        settings.update(upsample=True, **{k: rec[k] for k in names(UpsampleSampling)})
    init = rec.get("init_codes")
    if init is not None:
        settings["init_codes"] = torch.tensor([init], dtype=torch.long)
    out = pipe(
        [rec["prompt"]],
        mode=rec.get("mode", "ar"),
        seeds=[rec["seed"]],
        candidates=1,  # the record holds the kept candidate's own seed
        keep=1,
        prime_codes=None if prime is None else torch.tensor([prime], dtype=torch.long),
        **settings,
    )
    return out.images[0]
