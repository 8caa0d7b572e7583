"""The status page in a real headless browser (Debian's chromium, driven by selenium)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.status_page import run_page

pytest.importorskip("selenium")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("chromium and chromedriver are not installed (apt install chromium "
                "chromium-driver)", allow_module_level=True)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium, closed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A run folder and the status page serving it, stopped afterwards."""
    out = tmp_path / "run"
    out.mkdir()
    server = run_page(out)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _append(path: Path, *entries: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(e) + "\n" for e in entries))


def test_the_page_shows_the_sites_follows_the_run_and_keeps_a_screenshot(
        browser: Any, served: tuple[Path, str], tmp_path: Path) -> None:
    """Loaded: the sites; a round later: the new round, without a reload; then a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out, url = served
    _append(out / "events.jsonl", {"event": "phase", "phase": "train"},
            {"event": "sites-named", "names": {"7": "north", "8": "south"}},
            {"event": "round", "round": 1, "rounds": 3, "loss": 0.69})
    _append(out / "replies.jsonl", {"node": 7, "type": "train", "round": 1, "bytes": 900},
            {"node": 8, "type": "train", "round": 1, "bytes": 910})
    browser.get(url)
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sites tr.site")) == 2)
    names = [r.find_element(By.TAG_NAME, "td").text
             for r in browser.find_elements(By.CSS_SELECTOR, "#sites tr.site")]
    assert names == ["north", "south"]
    assert "round 1 of 3" in browser.find_element(By.ID, "where").text
    _append(out / "events.jsonl", {"event": "round", "round": 2, "rounds": 3, "loss": 0.55})
    wait.until(lambda d: "round 2 of 3" in d.find_element(By.ID, "where").text)
    assert browser.find_elements(By.CSS_SELECTOR, "#loss polyline")  # two losses: a curve
    _append(out / "events.jsonl", {"event": "stopped", "error": "the run was stopped"})
    wait.until(lambda d: d.find_element(By.ID, "state").text == "stopped")
    shot = tmp_path / "status-page.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")
