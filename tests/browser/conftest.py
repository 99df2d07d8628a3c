"""Headless Chromium driven by selenium, against live servers behind an API key: one with the
model alone, one that also serves LoRA adapters (tests/lora_helpers' tiny peft adapters).

Skipped, with the reason, where selenium, Chromium or chromedriver is missing (`make test`
installs them where it can: see the Makefile's `browser` target).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from app.config import Settings
from tests.integration.conftest import LiveServer, start_server, stop_server
from tests.lora_helpers import make_adapters

API_KEY = "browser-test-key"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1400, 900)


def find_browser() -> tuple[str | None, str | None]:
    """(Chromium binary, chromedriver), from KOGPT_CHROMIUM / KOGPT_CHROMEDRIVER or PATH."""
    browser = os.environ.get("KOGPT_CHROMIUM") or next(
        (found for name in BROWSER_NAMES if (found := shutil.which(name))), None
    )
    driver = os.environ.get("KOGPT_CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver


@pytest.fixture(scope="module")
def keyed_live() -> Iterator[LiveServer]:
    live = start_server(Settings(api_key=SecretStr(API_KEY), num_kv_blocks=256, max_num_seqs=16))
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("playground-lora"))


@pytest.fixture(scope="module")
def lora_live(adapter_dirs: dict[str, Path]) -> Iterator[LiveServer]:
    """The same key, and the adapters served under their names (--lora-modules)."""
    modules = " ".join(f"{name}={path}" for name, path in adapter_dirs.items())
    live = start_server(
        Settings(
            api_key=SecretStr(API_KEY), num_kv_blocks=256, max_num_seqs=16, lora_modules=modules
        )
    )
    try:
        yield live
    finally:
        stop_server(live)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    binary, driver_path = find_browser()
    if binary is None:
        pytest.skip("Chromium is not installed (make browser, or apt-get install chromium)")
    if driver_path is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--lang=ko-KR",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
