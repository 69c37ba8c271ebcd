"""`dalle-ar serve` on a tiny pipeline (with the masked mode): the page's HTTP endpoint draws the
images `pipe(...)` draws and the samples.json `dalle-ar sample` writes; a bad setting is an error
naming it and the server answers the next request; inpainting; a headless Chromium presses
Generate and gets an image; settings with a fixed set of values are dropdowns; without gradio
the command says what to install."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from io import BytesIO

import numpy as np
import pytest
import torch
from _pipeline_fixtures import GRID, build_tiny_pipeline
from _spawn import free_port
from PIL import Image

from dalle_ar.cli import main as cli
from dalle_ar.pipelines import Pipeline

SIZE = GRID * 4  # the tiny pipeline's pictures are 16 x 16
PROMPT = "a small red circle at the top"
# a headless Chromium on a machine without network: without the background-networking flags it
# waits on connections a closed network refuses; /dev/shm may be small in a container
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("serve"), masked=True)


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return Pipeline.from_pretrained(pipe_dir)


@pytest.fixture(scope="module")
def url(pipe, pipe_dir, tmp_path_factory):
    """The page, launched in this process on a free port of 127.0.0.1."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'dalle-ar[demo]')")
    from dalle_ar.cli.serve import build_app

    app = build_app(pipe, pipe_dir, tmp_path_factory.mktemp("requests"))
    _, local, _ = app.launch(server_name="127.0.0.1", server_port=free_port(),
                             prevent_thread_lock=True, quiet=True, ssr_mode=False)  # fmt: skip
    yield local
    app.close()


@pytest.fixture(scope="module")
def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def _generate(client, **page):
    return client.predict(prompt=PROMPT, **page, api_name="/generate")


def test_the_endpoint_draws_what_the_pipeline_draws_and_records_it(client, pipe, tmp_path):
    gallery, record = _generate(client, seed=3, candidates=3, keep=2, reranker="pmi")
    assert len(gallery) == 2
    want = pipe([PROMPT], seed=3, candidates=3, keep=2, reranker="pmi")
    for item, img, meta in zip(gallery, want.images, want.samples):
        got = Image.open(item["image"])
        assert got.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(img))
        assert item["caption"] == f"pmi {meta['rerank_score']:.3g}, seed {meta['seed']}"
    doc = json.loads(open(record).read())
    assert doc["command"][:2] == ["dalle-ar", "sample"] and len(doc["candidates"]) == 3
    assert [s["seed"] for s in doc["samples"]] == [m["seed"] for m in want.samples]
    assert all(s["mode"] == "ar" and s["keep"] == 2 for s in doc["samples"])
    # the record is dalle-ar sample's: it draws the same image again
    assert cli(["sample", "--from-json", record, "--index", "1", "--out", str(tmp_path)]) == 0
    again = Image.open(tmp_path / doc["samples"][1]["file"])
    assert np.array_equal(np.asarray(again), np.asarray(want.images[1]))


def test_settings_with_a_fixed_set_of_values_are_dropdowns_of_those(
    pipe, pipe_dir, client, tmp_path
):
    from dalle_ar.cli.serve import build_app

    app = build_app(pipe, pipe_dir, tmp_path)
    offered = {c["props"]["label"]: [v for v, _ in c["props"]["choices"]]
               for c in app.get_config_file()["components"]
               if c["type"] == "dropdown" and "choices" in c.get("props", {})}  # fmt: skip
    assert offered["precision"] == ["auto", "fp32", "bf16"]
    assert offered["guidance schedule"] == ["constant", "linear"]
    assert offered["reranker"] == list(pipe.rerankers)  # the pipeline's own, not every reranker
    _, record = _generate(client, mode="masked", seed=1, precision="fp32")
    assert json.loads(open(record).read())["samples"][0]["precision"] == "fp32"


@pytest.mark.parametrize(
    ("page", "named"),
    [({"candidates": 0}, "'candidates'"), ({"candidates": 2, "keep": 5}, "'keep'"),
     ({"temperature": 0.0}, "'temperature'"), ({"mode": "masked", "steps": 0}, "'steps'")],
)  # fmt: skip
def test_a_bad_setting_is_an_error_naming_it_and_the_server_goes_on(client, page, named):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=named):
        _generate(client, **page)
    gallery, _ = _generate(client, seed=0)
    assert len(gallery) == 1


def test_inpainting_in_the_masked_mode_keeps_the_unpainted_codes(client, pipe, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    scene = Image.new("RGB", (SIZE, SIZE), (90, 90, 90))
    scene.paste((220, 30, 30), (0, 0, 8, 8))
    scene.save(tmp_path / "scene.png")
    stroke = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    stroke.paste((0, 0, 0, 255), (8, 8, 16, 16))  # the bottom-right quarter: 2x2 of 4x4 codes
    stroke.save(tmp_path / "stroke.png")
    editor = {"background": handle_file(str(tmp_path / "scene.png")), "composite": None,
              "layers": [handle_file(str(tmp_path / "stroke.png"))]}  # fmt: skip
    gallery, record = _generate(client, mode="masked", steps=2, seed=1, inpaint=editor)
    sample = json.loads(open(record).read())["samples"][0]
    init = torch.tensor(sample["init_codes"])
    region = init == pipe.components["masked"].cfg.mask_id
    assert sample["mode"] == "masked" and int(region.sum()) == 4
    want = pipe.inpaint([scene], [stroke.getchannel("A")], PROMPT, seed=1, steps=2)
    assert torch.equal(want.codes[0][~region], init[~region])
    assert np.array_equal(np.asarray(Image.open(gallery[0]["image"])), np.asarray(want.images[0]))
    blank = {**editor, "layers": []}
    with pytest.raises(AppError, match="paint over the region"):
        _generate(client, mode="masked", inpaint=blank)
    with pytest.raises(AppError, match="masked mode"):
        _generate(client, mode="ar", inpaint=editor)


def test_the_page_offers_only_the_pipelines_modes(pipe):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'dalle-ar[demo]')")
    from dalle_ar.cli.serve import page_settings

    keys = [s.key for s in page_settings(pipe)]
    assert pipe.modes == ("ar", "masked")
    assert "steps" in keys and "masked_temperature" in keys and "candidates" in keys
    assert "prior_steps" not in keys


def test_a_browser_gets_an_image_from_the_page(url, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        box.send_keys(PROMPT)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gallery img"))
        src = img.get_attribute("src")
    finally:
        driver.quit()
    assert src
    with urllib.request.urlopen(src, timeout=30) as r:
        assert Image.open(BytesIO(r.read())).size == (SIZE, SIZE)


def test_without_gradio_the_command_says_what_to_install(monkeypatch, capsys, pipe_dir):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets uninstalled
    assert cli(["serve", "--model", str(pipe_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dalle-ar serve: the web page needs gradio: pip install 'dalle-ar[demo]'"]
