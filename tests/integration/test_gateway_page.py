"""The job page in a real headless browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest
from conftest import GATEWAY_KEYS

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make install installs it)")


def test_the_page_follows_a_grounding_job_and_shows_its_overlay_and_objects(gateway: str, http_files) -> None:
    key = GATEWAY_KEYS[0]
    job = {"image_uri": http_files.base + "/cat.png", "task": "grounding", "max_new_tokens": 1024}
    submitted = httpx.post(f"{gateway}/v1/jobs", json=job, headers={"Authorization": f"Bearer {key}"})
    job_id = submitted.json()["job_id"]

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{gateway}/ui/jobs/{job_id}?key={key}")  # opened while the job is queued or running
            assert "key=" not in page.url and "token=" in page.url  # the key left the address bar

            sync_api.expect(page.locator("#state")).to_have_text("succeeded", timeout=90_000)  # via the events stream
            rows = page.locator("#items tbody tr")
            sync_api.expect(rows).to_have_count(5, timeout=30_000)  # one row per box: cats 2, blanket 1, remotes 2
            assert rows.nth(0).locator("td").all_inner_texts() == ["1", "two cats", "9, 51, 326, 478"]
            assert rows.nth(2).locator("td").all_inner_texts() == ["3", "a pink blanket", "2, 111, 639, 480"]

            overlay = page.locator("#overlay")
            # Polled from here: page.wait_for_function's in-page polling evals its predicate, which the
            # page's CSP (no 'unsafe-eval') refuses whenever the image is not complete at the first look.
            deadline = time.monotonic() + 30
            while not overlay.evaluate("img => img.complete && img.naturalWidth > 0"):
                assert time.monotonic() < deadline, "the overlay image never loaded"
                time.sleep(0.1)
            assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [640, 480]
            assert errors == []
        finally:
            browser.close()
