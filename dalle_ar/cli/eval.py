r"""`dalle-ar eval` (image quality on any shards, every mode: `quality`) and `dalle-ar eval
fidelity` (prompt fidelity on the shapes data: `main`).

    dalle-ar eval --model runs/pipe --data "DIR/eval-*.tar" --train-data "DIR/train-*.tar" \
        --num 100 --candidates 4 --out runs/eval      # DIR/eval.json and DIR/eval.md

`dalle-ar eval fidelity`:

    dalle-ar eval fidelity --model runs/pipe --num 400 --guidance 1.5 --out fidelity.json
    dalle-ar eval fidelity --model runs/pipe --composed       # + composed prompts
    dalle-ar eval fidelity --model runs/pipe --candidates 16  # + best of 16 (reranked)
    dalle-ar eval fidelity --model runs/pipe --candidates 16 --rerankers pmi,clip,clip+pmi
    dalle-ar eval fidelity --model runs/pipe --mode prior --candidates 16 --rerankers clip
    dalle-ar eval fidelity --model runs/pipe --mode masked --steps 8  # the masked generator
    dalle-ar eval fidelity --model runs/pipe --upsample     # + the same pictures upsampled

One sample per evaluation-split prompt, the attributes read back from the pixels with the shape
checker: exact-match and per-attribute accuracy, without and with classifier-free guidance, split
into scenes whose colour-shape pairs were seen in training and scenes holding a held-out pair.
Every setting uses the same prompts and the same seed per prompt, so the difference is guidance
(and, with --composed, the experts for each object's colour and shape; with --candidates K, the
guided run once more with each prompt's image the best of K, once per reranker of --rerankers, all
from one draw of the candidates, and how often a right image is among the K). Sampling
settings left out take the pipeline folder's defaults. The work is
`dalle_ar.eval.fidelity.evaluate_fidelity`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dalle_ar.cli import add_pipeline_arguments, load_pipeline, print_report
from dalle_ar.cli.sample import check_out, mode_settings_given
from dalle_ar.eval.fidelity import GUIDED_SCALE, evaluate_fidelity
from dalle_ar.pipelines.ar import MODES, check_mode_settings
from dalle_ar.sampling.settings import (
    MASKED_SHARED,
    ARSampling,
    MaskedSampling,
    PriorSampling,
    RerankSettings,
    UpsampleSampling,
    add_arguments,
    from_args,
    upsample_from_args,
)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dalle-ar eval fidelity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pipeline_arguments(ap)  # --model, --device, --threads, --allow-mismatch
    ap.add_argument("--num", type=int, default=200, help="evaluation prompts (default 200)")
    ap.add_argument(
        "--composed", action="store_true", help="score composed prompts too (colour and shape)"
    )
    ap.add_argument("--guidance", type=float, default=GUIDED_SCALE,
                    help=f"guidance scale of the guided run (default {GUIDED_SCALE})")  # fmt: skip
    ap.add_argument(
        "--candidates", type=int, default=1, help="also score the best of K per prompt (K > 1)"
    )
    add_arguments(ap, ARSampling, skip=("guidance_scale",))  # the other settings: as sampled
    ap.add_argument(
        "--rerankers", default="pmi", help="comma-separated, for --candidates: pmi, clip, clip+pmi"
    )
    add_arguments(ap, RerankSettings, skip=("candidates", "keep", "reranker"))
    ap.add_argument(
        "--mode",
        default="ar",
        choices=MODES,
        help="ar: the prompt alone; prior: the diffusion prior's embedding too; masked: the "
        "masked generator",
    )
    add_arguments(ap, PriorSampling)  # the prior mode's settings
    # the masked mode's own settings; its temperature and top-k are the options above
    add_arguments(ap, MaskedSampling, skip=MASKED_SHARED)
    ap.add_argument("--upsample", action="store_true",
                    help="score each single draw again, upsampled")  # fmt: skip
    add_arguments(ap, UpsampleSampling)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of prompt 0 (then +1 ...)")
    ap.add_argument("--prompt-seed", type=int, default=0, help="which evaluation prompts")
    ap.add_argument("--batch-size", type=int, default=32, help="samples generated together")
    ap.add_argument("--out", help="write the JSON report here (it is printed too)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = {
        **from_args(args, ARSampling, skip=("guidance_scale",)),
        **from_args(args, RerankSettings, skip=("candidates", "keep", "reranker")),
        # another mode's are refused below (`check_mode_settings`)
        **from_args(args, PriorSampling),
        **from_args(args, MaskedSampling, skip=MASKED_SHARED),
        "mode": args.mode,
    }
    try:
        # another mode's flag would be ignored
        check_mode_settings(args.mode, mode_settings_given(args), flags=True)
        settings.update(upsample_from_args(args))
        if args.num < 1:
            raise ValueError(f"--num must be >= 1, got {args.num}")
        RerankSettings(candidates=args.candidates).validate()
        pipe = load_pipeline(args)
        report = evaluate_fidelity(
            pipe,
            args.num,
            seed=args.seed,
            guidance_scales=(1.0, args.guidance),
            prompt_seed=args.prompt_seed,
            batch_size=args.batch_size,
            progress=True,
            composed=args.composed,
            candidates=args.candidates,
            rerankers=tuple(r.strip() for r in args.rerankers.split(",") if r.strip()),
            **settings,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"dalle-ar eval: {e}", file=sys.stderr)
        return 2
    report = {"model": str(Path(args.model).resolve()), **report}
    return print_report(report, args.out)


def _quality_parser() -> argparse.ArgumentParser:
    from dalle_ar.eval import quality

    ap = argparse.ArgumentParser(prog="dalle-ar eval", description=quality.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_pipeline_arguments(ap)  # --model, --device, --threads, --allow-mismatch
    ap.add_argument("--data", required=True, help="evaluation shards (path, folder, glob)")
    ap.add_argument("--train-data",
                    help="training shards: nearest-training figures, real-vs-real FD")  # fmt: skip
    ap.add_argument("--modes", help="comma-separated: ar, prior, masked (default: all it has)")
    ap.add_argument("--num", type=int, default=100, help="evaluation images (default 100)")
    ap.add_argument("--candidates", type=int, default=4,
                    help="K: the best of K per image too, by each reranker (1: none)")  # fmt: skip
    ap.add_argument("--inception-weights", help="FID Inception v3 weights file: Inception FID too")
    add_arguments(ap, ARSampling)
    add_arguments(ap, RerankSettings, skip=("candidates", "keep", "reranker"))
    add_arguments(ap, PriorSampling)
    add_arguments(ap, MaskedSampling, skip=MASKED_SHARED)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of image 0 (then +1 ...)")
    ap.add_argument("--batch-size", type=int, default=32, help="samples generated together")
    ap.add_argument("--out", required=True, help="folder for eval.json and eval.md")
    return ap


def quality(argv: list[str] | None = None) -> int:
    """`dalle-ar eval`: `evaluate_quality` of a pipeline folder, written as DIR/eval.json and
    DIR/eval.md (the table, printed too). ValueError / OSError (one line from `dalle-ar`) for
    bad input, before the pipeline is loaded where it can be told without it."""
    from dalle_ar.eval.quality import check_quality_args, evaluate_quality, markdown_table

    args = _quality_parser().parse_args(argv)
    modes = None if args.modes is None else [m.strip() for m in args.modes.split(",") if m.strip()]
    check_quality_args(args.data, args.train_data, args.num, args.candidates,
                       args.inception_weights)  # fmt: skip
    out = check_out(args.out)  # writable, made only once there is a report to write
    pipe = load_pipeline(args)
    settings = {
        **from_args(args, ARSampling),
        **from_args(args, RerankSettings, skip=("candidates", "keep", "reranker")),
        **from_args(args, PriorSampling),
        **from_args(args, MaskedSampling, skip=MASKED_SHARED),
    }
    report = evaluate_quality(pipe, args.data, args.train_data, modes=modes, num_prompts=args.num,
                              candidates=args.candidates, seed=args.seed,
                              batch_size=args.batch_size, progress=True,
                              inception_weights=args.inception_weights, **settings)  # fmt: skip
    report = {"model": str(Path(args.model).resolve()), **report}
    table = markdown_table(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval.md").write_text(table)
    print(table)
    return 0
