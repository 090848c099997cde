"""Headless Chromium for page checks: open a local HTML file, report its images and console errors,
save a full-page screenshot.

Uses Debian's ``chromium`` and ``chromium-driver`` (installed by ``.ci/install test``) through
selenium with an explicit driver path, so selenium never tries to download a browser or driver.
:func:`unavailable` says why a check cannot run here (tests skip with that reason).
"""

from __future__ import annotations

import base64
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def _binary() -> str | None:
    return next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)


def unavailable() -> str | None:
    """None when a check can run, else the reason it cannot."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[test]')"
    if _binary() is None:
        return "no chromium binary (apt-get install chromium chromium-driver, or bash .ci/install test)"
    if shutil.which(DRIVER) is None:
        return "no chromedriver (apt-get install chromium-driver)"
    return None


@dataclass
class PageCheck:
    title: str
    images: list[dict]  # {src (first 60 chars), naturalWidth, naturalHeight, complete}
    console: list[dict]  # browser log entries (level, message)
    text: str  # document.body.innerText
    graphics: int  # <svg> and <canvas> elements (charts drawn by script)

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not i["complete"] or i["naturalWidth"] == 0]

    @property
    def errors(self) -> list[dict]:
        return [e for e in self.console if e["level"] == "SEVERE"]


def check_page(path: Path, screenshot: Path | None = None, width: int = 1400) -> PageCheck:
    """Load ``path`` (file://), wait for it to settle, collect images and console messages."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _binary()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},1000", "--hide-scrollbars", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(Path(path).resolve().as_uri())
        deadline = time.time() + 20
        while time.time() < deadline and not driver.execute_script(
                "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"):
            time.sleep(0.2)
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({src: i.src.slice(0, 60), naturalWidth: i.naturalWidth,"
            " naturalHeight: i.naturalHeight, complete: i.complete}))")
        console = [{"level": e["level"], "message": e["message"]} for e in driver.get_log("browser")]
        text = driver.execute_script("return document.body.innerText")
        graphics = driver.execute_script("return document.querySelectorAll('svg, canvas').length")
        if screenshot is not None:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 16000), "scale": 1}})
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return PageCheck(driver.title, images, console, text, graphics)
    finally:
        driver.quit()
