"""`dalle-ar serve`: a local web page to try a pipeline folder (gradio: `pip install
'dalle-ar[demo]'`).

    dalle-ar serve --model runs/main/pipeline                  # http://127.0.0.1:7860
    dalle-ar serve --model runs/main/pipeline --port 8000 --threads 2

The page takes a prompt, a mode (those the pipeline draws in), a seed and every sampling setting
of that mode, each field of its settings dataclass (`dalle_ar.sampling.settings`) with the
pipeline folder's default; reranking (candidates, keep, reranker) in every mode; and, where the
pipeline has the masked mode, a picture to repaint with the region painted over it
(inpainting). It draws with `dalle-ar sample`'s own code (`dalle_ar.cli.sample.draw`) and shows
the kept images with their scores, and that command's samples.json to download (every setting
and seed: `dalle-ar sample --from-json` draws any image again).

Requests queue and run one at a time; a long one shows its progress bars (the pipeline's tqdm).
An impossible setting is an error on the page naming it, and the server goes on. The page binds
127.0.0.1 (this machine only) unless --host says otherwise. The same endpoint answers over HTTP
(`gradio_client.Client(url).predict(prompt=..., candidates=16, keep=4, api_name="/generate")`;
the page's "Use via API" lists every parameter).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import tempfile
from pathlib import Path
from typing import Any, get_type_hints

from dalle_ar.cli import USER_ERRORS, add_pipeline_arguments, load_pipeline, one_line
from dalle_ar.cli import sample as sample_cli
from dalle_ar.grid import score_label
from dalle_ar.pipelines.ar import MODE_SECTIONS

INSTALL = "pip install 'dalle-ar[demo]'"
SECTIONS = ("ar", "prior", "masked", "rerank")  # in the order the page shows them
# the page's fixed inputs, before the settings (the endpoint's first parameters)
FIXED = ("prompt", "mode", "seed", "inpaint")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dalle-ar serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_pipeline_arguments(ap)  # --model, --device, --threads, --allow-mismatch
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1: this machine only)")  # fmt: skip
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import gradio  # noqa: F401  (checked before the pipeline is loaded)
    except ImportError:
        print(f"dalle-ar serve: the web page needs gradio: {INSTALL}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args)
    app = build_app(pipe, args.model)
    # share=False whatever the environment says (GRADIO_SHARE): no public tunnel
    app.launch(server_name=args.host, server_port=args.port, ssr_mode=False, share=False)
    return 0


@dataclasses.dataclass(frozen=True)
class _Setting:
    """One settings field on the page: its section, field and the endpoint's parameter name."""

    section: str
    field: dataclasses.Field
    key: str  # the field's name; "<section>_<name>" where an earlier section has that name


def page_settings(pipe: Any) -> list[_Setting]:
    """The settings fields the page offers for `pipe`, in page order: those of each section its
    modes draw with (`MODE_SECTIONS`), then reranking."""
    used = {s for m in pipe.modes for s in MODE_SECTIONS[m]} | {"rerank"}
    out, taken = [], set(FIXED)
    for section in (s for s in SECTIONS if s in used):
        for f in dataclasses.fields(pipe.settings[section]):
            key = f.name if f.name not in taken else f"{section}_{f.name}"
            taken.add(key)
            out.append(_Setting(section, f, key))
    return out


def build_app(pipe: Any, model: str | Path, out_dir: str | Path | None = None) -> Any:
    """The page (a queued `gradio.Blocks`, not launched) for the loaded pipeline `pipe`
    (`ARPipeline`), read from the folder `model` (recorded in samples.json). Each request's PNGs
    and samples.json go to a new folder under `out_dir` (default: a temporary folder removed
    when the app is garbage-collected). The endpoint "/generate" takes `FIXED` then the
    settings (`page_settings`; None = the folder's default; seed None = random seeds, recorded)
    and returns the gallery (kept images, captioned with their scores and seeds) and the path of
    samples.json. ImportError without gradio (`INSTALL`)."""
    import gradio as gr

    # held by `generate`, so the request folders live as long as the app
    tmp = tempfile.TemporaryDirectory(prefix="dalle-ar-serve-") if out_dir is None else None
    settings = page_settings(pipe)
    keys = [*FIXED, *(s.key for s in settings)]  # the endpoint's parameters, in order
    choices = {"reranker": pipe.rerankers}

    def generate(*values: Any) -> tuple[list[tuple[Any, str]], str]:
        page = dict(zip(keys, values))
        root = Path(out_dir if tmp is None else tmp.name)
        try:
            return _generate(pipe, model, root, settings, page)
        except USER_ERRORS as e:
            raise gr.Error(one_line(e), print_exception=False) from None

    # named parameters for the HTTP API, each optional (gradio reads them from the signature:
    # one left out takes its input's value on the page, the folder's default); the progress
    # tracker follows the pipeline's tqdm bars
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(k, kind, default=None) for k in keys]
    params.append(inspect.Parameter("progress", kind, default=gr.Progress(track_tqdm=True)))
    generate.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]

    title = f"dalle-ar · {Path(model).name}"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## {title}\nModes: {', '.join(pipe.modes)}. Empty settings take the "
                    "pipeline folder's defaults.")  # fmt: skip
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="prompt", placeholder="a small red circle at the top",
                                    elem_id="prompt")  # fmt: skip
                with gr.Row():
                    mode = gr.Radio(list(pipe.modes), value="ar", label="mode")
                    seed = gr.Number(0, precision=0, label="seed",
                                     info="sample i gets seed + i; empty = random")  # fmt: skip
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                inpaint = gr.ImageEditor(
                    type="pil", label="inpainting (masked mode): a picture, painted over where "
                    "it is repainted", visible="masked" in pipe.modes, sources=["upload"],
                    elem_id="inpaint",
                )  # fmt: skip
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="kept images", format="png", columns=4,
                                     object_fit="contain", elem_id="gallery")  # fmt: skip
                record = gr.File(label="samples.json")
        groups, controls = {}, []
        for section in dict.fromkeys(s.section for s in settings):
            shown = section == "rerank" or section in MODE_SECTIONS["ar"]
            with gr.Group(visible=shown) as groups[section]:
                gr.Markdown(f"**{section}** ({pipe.settings[section].__name__})")
                with gr.Row():
                    for s in (s for s in settings if s.section == section):
                        default = getattr(pipe.defaults[section], s.field.name)
                        controls.append(_control(gr, pipe.settings[section], s, default, choices))

        def show(m: str) -> list[Any]:
            return [gr.Group(visible=k == "rerank" or k in MODE_SECTIONS[m]) for k in groups]

        mode.change(show, mode, list(groups.values()), api_name=False)
        button.click(generate, [prompt, mode, seed, inpaint, *controls], [gallery, record],
                     api_name="generate")  # fmt: skip
    app.queue(default_concurrency_limit=1)
    return app


def _control(gr: Any, cls: type, s: _Setting, default: Any, choices: dict[str, tuple]) -> Any:
    """The input of one settings field: a number (int fields round to integers) or, for a field
    with `choices` (the pipeline's) or choices of its own (its metadata's), a dropdown; labelled
    with its name, its command-line help below."""
    label, info = s.key.replace("_", " "), s.field.metadata["help"]
    options = list(choices.get(s.field.name, s.field.metadata.get("choices", ())))
    if options:
        value = default if default in options else options[0]
        return gr.Dropdown(options, value=value, label=label, info=info)
    precision = 0 if get_type_hints(cls)[s.field.name] is int else None
    return gr.Number(default, precision=precision, label=label, info=info)


def _generate(
    pipe: Any, model: str | Path, root: Path, settings: list[_Setting], page: dict[str, Any]
) -> tuple[list[tuple[Any, str]], str]:
    """One request: the mode's settings as `dalle-ar sample` options, drawn into a new folder
    under `root`. ValueError for an impossible setting, or a picture to repaint without the masked
    mode or without a painted region."""
    mode = page["mode"]  # one of pipe.modes: the page's choices, checked by gradio
    sections = (*MODE_SECTIONS[mode], "rerank")
    options = {s.field.name: page[s.key] for s in settings if s.section in sections}
    folder = Path(tempfile.mkdtemp(dir=root, prefix="request-"))
    init = _inpainting(page.get("inpaint"), mode, folder)
    prompts = [page["prompt"] or ""]
    seed = page["seed"]
    args = sample_cli.command_args(model, folder, prompts, mode=mode, **init, **options,
                                   seed=None if seed is None else int(seed))  # fmt: skip
    out = sample_cli.draw(args, pipe, prompts)
    gallery = []
    for img, meta in zip(out.images, out.samples):
        label = score_label(meta)
        gallery.append((img, f"{label}, seed {meta['seed']}" if label else f"seed {meta['seed']}"))
    return gallery, str(folder / sample_cli.JSON_NAME)


def _inpainting(editor: dict[str, Any] | None, mode: str, folder: Path) -> dict[str, str]:
    """The image editor's value -> `dalle-ar sample`'s --init and --mask files in `folder` (the
    picture; white where any layer is painted): {} when it holds no picture."""
    if not editor or editor.get("background") is None:
        return {}
    from PIL import Image

    if mode != "masked":
        raise ValueError(f"inpainting draws in the masked mode, not {mode!r}: choose masked, or "
                         "clear the picture")  # fmt: skip
    picture = editor["background"]
    mask = Image.new("L", picture.size, 0)
    for layer in editor.get("layers") or []:
        painted = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a else 0)
        mask.paste(255, (0, 0), painted.resize(picture.size, Image.NEAREST))
    if mask.getbbox() is None:
        raise ValueError("inpainting: paint over the region of the picture to repaint")
    picture.save(folder / "init.png")
    mask.save(folder / "mask.png")
    return {"init": str(folder / "init.png"), "mask": str(folder / "mask.png")}
