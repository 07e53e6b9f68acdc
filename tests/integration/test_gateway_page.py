"""The job page in a real headless browser: Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

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


def launch(playwright, env: dict[str, str] | None = None):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], env=env)


def submit(gateway: str, job: dict) -> str:
    response = httpx.post(f"{gateway}/v1/jobs", json=job, headers={"Authorization": f"Bearer {GATEWAY_KEYS[0]}"})
    return response.json()["job_id"]


def test_a_failed_jobs_page_shows_its_facts_and_no_broken_image(gateway: str, http_files) -> None:
    job_id = submit(gateway, {"image_uri": http_files.base + "/not-an-image.txt", "task": "caption"})
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            page.goto(f"{gateway}/ui/jobs/{job_id}?key={GATEWAY_KEYS[0]}")
            sync_api.expect(page.locator("#state")).to_have_text("failed", timeout=90_000)
            # `hidden` holds against the stylesheet's img{display:block}: no broken-image box.
            sync_api.expect(page.locator("#overlay")).to_be_hidden()
            sync_api.expect(page.locator("#items")).to_be_hidden()
            sync_api.expect(page.locator("#task")).to_have_text("caption")
            for stamp in ("created_at", "finished_at"):
                assert page.locator(f"#{stamp} time").get_attribute("datetime"), stamp
            sync_api.expect(page.locator("#result-json")).to_be_hidden()  # no result to show
            raw = httpx.get(page.locator("#status-json").evaluate("a => a.href"))  # the link as resolved
            assert raw.status_code == 200 and raw.json()["job_id"] == job_id and raw.json()["state"] == "failed"
        finally:
            browser.close()


def only_fonts_without_hangul(tmp_path: Path) -> dict[str, str]:
    """A fontconfig that sees DejaVu alone: the browser runs as on a machine with no Korean font."""
    dejavu = Path("/usr/share/fonts/truetype/dejavu")
    if not dejavu.is_dir():
        pytest.skip("DejaVu fonts are not installed (Debian: fonts-dejavu-core)")
    conf = tmp_path / "fonts.conf"
    conf.write_text(
        f'<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig><dir>{dejavu}</dir>'
        f"<cachedir>{tmp_path / 'fontconfig-cache'}</cachedir></fontconfig>"
    )
    env = {**os.environ, "FONTCONFIG_FILE": str(conf)}
    if shutil.which("fc-list"):  # the premise: no font this browser can find has Hangul
        assert subprocess.run(["fc-list", ":lang=ko"], env=env, capture_output=True, text=True).stdout == ""
    return env


def rendering_fonts(page, element) -> dict[tuple[str, bool], int]:
    """(family, is a webfont) -> glyphs it drew in `element`, as Chromium's DevTools protocol reports it."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    element.evaluate("e => { e.id = 'probe'; }")
    root = cdp.send("DOM.getDocument")["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "#probe"})["nodeId"]
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    return {(f["familyName"], f["isCustomFont"]): f["glyphCount"] for f in fonts}


def test_hangul_in_the_table_renders_as_glyphs_without_a_korean_system_font(
    gateway: str, http_files, tmp_path: Path
) -> None:
    job_id = submit(gateway, {"image_uri": http_files.base + "/cat.png", "task": "ocr", "max_new_tokens": 1024})
    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright, only_fonts_without_hangul(tmp_path))
        try:
            page = browser.new_page()
            page.goto(f"{gateway}/ui/jobs/{job_id}?key={GATEWAY_KEYS[0]}")
            sync_api.expect(page.locator("#state")).to_have_text("succeeded", timeout=90_000)
            cell = page.locator("#items tbody tr").nth(0).locator("td").nth(1)
            sync_api.expect(cell).to_have_text("백범로", timeout=30_000)
            sync_api.expect(page.locator("#prompt")).to_have_text("<ocr>")
            sync_api.expect(page.locator("#result-json")).to_be_visible()
            # Let a webfont the page asks for arrive (the page's own font-display: swap draws tofu until then).
            page.evaluate(
                "() => document.fonts.load('15px \"Noto Sans KR\"', '백범로').then(() => document.fonts.ready)"
            )
            # Tofu is one box for every missing character (whichever font's box it is), so other Hangul of
            # the same length drawn in the same cell looks the same; real glyphs differ.
            as_shown = cell.screenshot()
            cell.evaluate("td => { td.textContent = '시청역'; }")
            tofu = cell.screenshot() == as_shown
            assert not tofu, "the table's Hangul renders as tofu"
            # And the browser says which font drew the cell: the served one, for all three syllables.
            assert rendering_fonts(page, cell) == {("Noto Sans KR", True): 3}
        finally:
            browser.close()


def test_the_page_font_is_served_and_cached(gateway: str) -> None:
    font = httpx.get(f"{gateway}/ui/fonts/NotoSansKR-Regular.otf")
    assert font.status_code == 200 and font.headers["content-type"] == "font/otf"
    assert font.content[:4] == b"OTTO" and "immutable" in font.headers["cache-control"]
