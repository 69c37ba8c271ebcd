"""How long the web page (`dalle-ar serve`) takes to answer one reranked request: builds the
page for the pipeline folder (`dalle_ar.cli.serve.build_app`), launches it on 127.0.0.1, sends the
request through its HTTP API (`gradio_client`) and times it from the request to its answer. The
endpoint answers with every kept image at once, so the first image arrives with the answer.
Prints one JSON object.

    OMP_NUM_THREADS=2 python tools/serve_timing.py --model runs/main/pipeline
    python tools/serve_timing.py --model runs/main/pipeline --candidates 4 --keep 1 --requests 2

Needs the demo extra (`pip install 'dalle-ar[demo]'`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from PIL import Image

from dalle_ar.runtime import describe_machine, set_threads

PROMPT = "a small red circle at the top left"


def _time_requests(args: argparse.Namespace) -> tuple[list[float], tuple, float]:
    """Seconds each request took, the last answer (gallery, samples.json path), and seconds to
    load the pipeline and launch the page."""
    from gradio_client import Client

    from dalle_ar.cli.serve import build_app
    from dalle_ar.pipelines import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model)
    app = build_app(pipe, args.model)
    _, url, _ = app.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                           ssr_mode=False)  # fmt: skip
    started = time.perf_counter() - t0
    try:
        client = Client(url, verbose=False)
        seconds, answer = [], None
        for _ in range(args.requests):
            t0 = time.perf_counter()
            answer = client.predict(prompt=args.prompt, mode=args.mode, seed=args.seed,
                                    candidates=args.candidates, keep=args.keep,
                                    api_name="/generate")  # fmt: skip
            seconds.append(time.perf_counter() - t0)
    finally:
        app.close()
    return seconds, answer, started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", required=True, help="pipeline folder")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--mode", default="ar")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--keep", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--requests", type=int, default=1, help="the same request this many times")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (default 0: torch's, as OMP_NUM_THREADS says)")  # fmt: skip
    args = ap.parse_args(argv)
    set_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON alone
        seconds, answer, started = _time_requests(args)
    gallery, record = answer
    doc = json.loads(Path(record).read_text())
    first = doc["samples"][0]
    report = {
        "seconds_to_first_image": round(seconds[0], 2),
        "seconds_each_request": [round(s, 2) for s in seconds],
        "seconds_to_load_and_launch": round(started, 2),
        "streamed": False,  # the endpoint answers with every kept image at once
        "candidates": args.candidates,
        "keep": args.keep,
        "images": len(gallery),
        "image_size": list(Image.open(gallery[0]["image"]).size),
        "mode": first["mode"],
        "reranker": first.get("reranker"),
        "prompt": args.prompt,
        "model": str(Path(args.model).resolve()),
        "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": describe_machine(),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
