"""The `dalle-ar` command.

Each subcommand lives in its own module as `main(argv: list[str]) -> int | None` (or another
function of that form, named "module:function"), imported only when it runs (so `dalle-ar --help`
is instant and one stage's imports never slow another).

    dalle-ar data shapes|emoji|folder|shards --out DIR ...
    dalle-ar train tokenizer|vq|transformer|clip|prior|masked|upsampler --config FILE [k=v ...]
    dalle-ar tokens --vq DIR --shards URLS --out DIR --prefix train
    dalle-ar sample --model FOLDER "a prompt" ... --out DIR
    dalle-ar serve --model FOLDER    # a web page on http://127.0.0.1:7860 (the demo extra)
    dalle-ar eval --model FOLDER --data SHARDS [--train-data SHARDS] --out DIR
    dalle-ar eval fidelity --model FOLDER --num 400 --out F.json
    dalle-ar pipeline    # the main job: data -> ... -> samples; finished stages are skipped
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# subcommand -> ("module" or "module:function", help). `train` and `data` take a second word;
# `eval` takes one or none.
COMMANDS: dict[str, tuple[str, str]] = {
    "data shapes": ("dalle_ar.data.build", "write procedural shapes shards"),
    "data emoji": ("dalle_ar.data.build", "write emoji shards (Twemoji pictures, CLDR names)"),
    "data folder": ("dalle_ar.data.build", "write shards from a folder of images + .txt captions"),
    "data shards": ("dalle_ar.data.build", "write your img2dataset shards again, split in two"),
    "train tokenizer": ("dalle_ar.train.tokenizer", "train the BPE text tokenizer"),
    "train vq": ("dalle_ar.train.vq", "train the VQ-VAE image tokenizer"),
    "train transformer": ("dalle_ar.train.transformer", "train the text-to-image transformer"),
    "train clip": ("dalle_ar.train.clip", "train CLIP (transformers' CLIPModel) for reranking"),
    "train masked": ("dalle_ar.train.masked", "train the masked (MaskGIT-style) generator"),
    "train prior": ("dalle_ar.train.prior", "train the diffusion prior (CLIP text -> image emb)"),
    "train upsampler": ("dalle_ar.train.upsampler", "train the cascade's diffusion upsampler"),
    "tokens": ("dalle_ar.cli.tokens", "turn image shards into VQ token shards"),
    "sample": ("dalle_ar.cli.sample", "generate images from prompts with a pipeline folder"),
    "serve": ("dalle_ar.cli.serve", "a local web page to try a pipeline folder (gradio)"),
    "eval": ("dalle_ar.cli.eval:quality", "image quality of a pipeline on any shards, every mode"),
    "eval fidelity": ("dalle_ar.cli.eval", "score a pipeline's prompt fidelity on the shapes"),
    "pipeline": ("dalle_ar.jobs.main", "run the whole pipeline end to end (the main job)"),
}
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # every command's log lines
TWO_WORDS = ("data", "train", "eval")  # commands that take a second word (`eval`: or none)
KEEP_WORD = ("data",)  # whose module reads the second word itself


def _usage(group: str = "") -> str:
    """The commands (those of `group`, a first word such as "train", where given), one a line."""
    width = max(len(k) for k in COMMANDS)
    rows = [f"  dalle-ar {k.ljust(width)}  {h}" for k, (_, h) in COMMANDS.items()
            if not group or k.split()[0] == group]  # fmt: skip
    return "usage:\n" + "\n".join(rows) + "\n\nRun a subcommand with --help for its options."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from dalle_ar import __version__

        print(f"dalle-ar {__version__}")
        return 0
    key = argv[0]
    rest = argv[1:]
    two = f"{key} {rest[0]}" if rest else ""
    # the second word names the command, unless the first alone is one (plain `dalle-ar eval`)
    if key in TWO_WORDS and (two in COMMANDS or key not in COMMANDS):
        if not rest or rest[0].startswith("-"):
            asked = bool(rest) and rest[0] in ("-h", "--help")
            print(("" if asked else f"dalle-ar {key}: expected one of {_choices(key)}\n\n")
                  + _usage(key))  # fmt: skip
            return 0 if asked else 2
        word, rest = rest[0], rest[1:]
        if key in KEEP_WORD:
            rest = [word, *rest]
        key = f"{key} {word}"
    if key not in COMMANDS:
        print(f"dalle-ar: unknown command {key!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    name, _, function = COMMANDS[key][0].partition(":")
    module = importlib.import_module(name)
    try:
        code = getattr(module, function or "main")(rest)
    except USER_ERRORS as e:
        # What a user can cause (a bad value, a missing or unwritable file, a device this
        # machine lacks) is one line naming it; its traceback goes to the DEBUG log.
        log.debug("dalle-ar %s failed", key, exc_info=True)
        print(f"dalle-ar {key}: {one_line(e)}", file=sys.stderr)
        return 2
    return int(code or 0)


def add_pipeline_arguments(ap: Any, model_help: str = "pipeline folder (pipeline.json + "
                           "component folders)", required: bool = True) -> None:  # fmt: skip
    """The options of every command that loads a pipeline folder: --model, --device, --threads
    and --allow-mismatch (`load_pipeline` reads them)."""
    ap.add_argument("--model", required=required, help=model_help)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: a decode step's matrices are small, and on a "
                    "busy machine more threads spend their time waiting for each other; 0 = "
                    "torch's default)")  # fmt: skip
    ap.add_argument("--allow-mismatch", action="store_true",
                    help="accept components trained with another tokenizer, VQ or CLIP than "
                    "the ones in the folder (a warning, not an error): only when you know they "
                    "are interchangeable")  # fmt: skip


def load_pipeline(args: Any, model: str | None = None) -> Any:
    """The pipeline folder `model` (default `args.model`) on `args.device`, with `args.threads`
    CPU threads and `args.allow_mismatch` (`add_pipeline_arguments`). ValueError / OSError for a
    folder that is missing, incomplete or of mismatched parts (`Pipeline.from_pretrained`)."""
    from dalle_ar.pipelines import Pipeline
    from dalle_ar.runtime import set_threads

    set_threads(args.threads)
    return Pipeline.from_pretrained(model or args.model, device=args.device,
                                    allow_mismatch=args.allow_mismatch)  # fmt: skip


def print_report(report: dict, out: str | Path | None = None) -> int:
    """Print a measurement's report as JSON and, with `out`, write the same there too (its
    folder made, the file written atomically: `checkpoint.write_json_atomic`); returns 0, the
    exit code of the command's or script's `main`."""
    from dalle_ar.checkpoint import write_json_atomic

    print(json.dumps(report, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, report)
    return 0


# Errors of the user's making, from any subcommand: ValueError (ConfigError among them) for a value
# that is impossible, OSError for a file or folder that is missing, unreadable or unwritable.
USER_ERRORS = (ValueError, OSError)


def one_line(e: BaseException) -> str:
    """The error's message on one line (an OSError's names the path it failed on)."""
    return " ".join(str(e).split()) or type(e).__name__


def _choices(word: str) -> str:
    return " | ".join(k.split()[1] for k in COMMANDS if k.startswith(word + " "))


if __name__ == "__main__":
    sys.exit(main())
