"""End to end in a real browser: Voila serves the explorer notebook on 127.0.0.1, headless
Chromium (driven by Playwright) moves the image control, and the heatmap in the page changes.

Skipped, with the reason, where Chromium or Playwright is missing; CI installs Chromium.
"""
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


@pytest.fixture()
def voila_url(tmp_path):
    port = _free_port()
    log = open(tmp_path / "voila.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "voila", str(ROOT / "notebooks" / "10_live_explorer.ipynb"),
         "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
         "--VoilaConfiguration.preheat_kernel=False"],
        cwd=ROOT / "notebooks", stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, VOILA_APP_IP="127.0.0.1"),
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


def test_moving_the_image_control_changes_the_heatmap(voila_url):
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
            page.goto(voila_url, timeout=120_000)
            heat = page.locator("img.explorer-heatmap")
            heat.wait_for(state="visible", timeout=180_000)
            page.wait_for_function(
                "() => { const i = document.querySelector('img.explorer-heatmap');"
                " return i && i.naturalWidth > 0; }", timeout=60_000)
            src_before = heat.get_attribute("src")
            caption_before = page.locator(".cnn-explorer").inner_text()
            assert "test image #0" in caption_before
            page.screenshot(path=str(ARTIFACTS / "explorer_before.png"), full_page=True)

            # Move the image slider one step with the keyboard, as a presenter would.
            handle = page.locator(".widget-slider .noUi-handle").first
            handle.focus()
            handle.press("ArrowRight")
            page.wait_for_function(
                "(old) => { const i = document.querySelector('img.explorer-heatmap');"
                " return i && i.src !== old && i.naturalWidth > 0; }", arg=src_before, timeout=60_000)
            page.wait_for_function(
                "() => document.querySelector('.cnn-explorer').innerText.includes('test image #1')",
                timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "explorer_after.png"), full_page=True)
            assert heat.get_attribute("src") != src_before
            assert "Grad-CAM in" in page.locator(".cnn-explorer").inner_text()
        finally:
            browser.close()
