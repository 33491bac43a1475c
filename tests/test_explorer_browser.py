"""End to end in a real browser: Voila serves the explorer notebook on 127.0.0.1, headless
Chromium (driven by Playwright) moves the image control, and the heatmap in the page changes.

Skipped, with the reason, where Chromium or Playwright is missing; CI installs Chromium.
"""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"

pytestmark = [
    pytest.mark.notebook,
    pytest.mark.skipif(not os.path.exists(CHROMIUM),
                       reason="Debian's chromium is not installed (apt-get install chromium); "
                              ".ci/run installs it"),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _voila(notebook, tmp_path):
    """Voila serving ``notebook`` on 127.0.0.1 (cwd: the notebook's folder); yields its URL."""
    port = _free_port()
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", str(notebook),
         "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
         "--VoilaConfiguration.preheat_kernel=False"],
        cwd=notebook.parent, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, VOILA_APP_IP="127.0.0.1", CNN_COURSE_OFFLINE="1"),
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url + "api", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail("voila exited: " + (tmp_path / "voila.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture()
def voila_url(tmp_path):
    with _voila(ROOT / "notebooks" / "12_live_explorer.ipynb", tmp_path) as url:
        yield url


@pytest.fixture()
def photo_voila_url(tmp_path):
    """The explorer on VGG16 (random weights, offline) and two 64-px sample photos."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import numpy as np, torch, cnn_utils\n"
        "model = cnn_utils.load_vgg16(pretrained=False, device='cpu')\n"
        "photos = cnn_utils.sample_photos(['chelsea', 'coffee'], size=64)\n"
        "app = cnn_utils.explorer(model, np.stack(list(photos.values())), samples=2)\n"
        "app")]
    path = tmp_path / "photo_explorer.ipynb"
    nbformat.write(nb, str(path))
    with _voila(path, tmp_path) as url:
        yield url


@contextlib.contextmanager
def _page(url):
    """A page of headless Chromium (Playwright) opened on ``url``."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url, timeout=120_000)
            yield page
        finally:
            browser.close()


def _first_heatmap(page):
    heat = page.locator("img.explorer-heatmap")
    heat.wait_for(state="visible", timeout=180_000)
    page.wait_for_function(
        "() => { const i = document.querySelector('img.explorer-heatmap');"
        " return i && i.naturalWidth > 0; }", timeout=60_000)
    return heat


def _slide_to_next_image(page, src_before, caption):
    """Move the image slider one step with the keyboard, as a presenter would; wait for the
    new heatmap and ``caption`` in the explorer's text."""
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(
        "(old) => { const i = document.querySelector('img.explorer-heatmap');"
        " return i && i.src !== old && i.naturalWidth > 0; }", arg=src_before, timeout=120_000)
    page.wait_for_function(
        f"() => document.querySelector('.cnn-explorer').innerText.includes({caption!r})", timeout=60_000)


def test_moving_the_image_control_changes_the_heatmap(voila_url):
    with _page(voila_url) as page:
        heat = _first_heatmap(page)
        src_before = heat.get_attribute("src")
        assert "test image #0" in page.locator(".cnn-explorer").inner_text()
        page.screenshot(path=str(ARTIFACTS / "explorer_before.png"), full_page=True)
        _slide_to_next_image(page, src_before, "test image #1")
        page.screenshot(path=str(ARTIFACTS / "explorer_after.png"), full_page=True)
        assert heat.get_attribute("src") != src_before
        assert "Grad-CAM in" in page.locator(".cnn-explorer").inner_text()


def test_the_photo_explorer_on_vgg16_answers_in_the_browser(photo_voila_url):
    with _page(photo_voila_url) as page:
        heat = _first_heatmap(page)
        src_before = heat.get_attribute("src")
        text = page.locator(".cnn-explorer").inner_text()
        assert "image #0" in text and "RANDOM weights" in text and "top 10 of 1000" in text
        _slide_to_next_image(page, src_before, "image #1")
        page.screenshot(path=str(ARTIFACTS / "photo_explorer_after.png"), full_page=True)
        assert heat.get_attribute("src") != src_before
        assert "Grad-CAM for class" in page.locator(".cnn-explorer").inner_text()
