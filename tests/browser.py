"""Open an HTML report in a real headless Chromium (Debian's, never downloaded) and report what a person would see."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                   reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them)")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,1600")


def open_report(path: Path) -> dict:
    """Images loaded, console errors, and how many distinct colours the screenshot has (blank page: 1)."""
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="tunegap-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(Path(path).resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        colours = len(set(shot.resize((200, 260)).getdata()))
        title = driver.title
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return {"images": images, "errors": errors, "colours": colours, "title": title}
