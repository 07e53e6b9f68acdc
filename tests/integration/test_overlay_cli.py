"""`varco overlay JOB_ID -o out.png` against the running test worker: the kept image, its boxes drawn on it."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from conftest import CAT, SIGN
from helpers import VARCO_CLI
from PIL import Image

from varco.gateway.overlay import OverlayNotReady, OverlayUnavailable, colour_for, overlay_png
from varco.producer import Client
from varco.tasks.schemas import ImageInfo, JobResult, JobState, ParsedOutput
from varco.tasks.tags import to_pixels


def overlay(env: dict[str, str], job_id: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VARCO_CLI, "overlay", job_id, "-o", str(out)],
        env={**os.environ, **env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_overlay_of_grounding_ocr_and_referring_jobs(
    worker_env: dict[str, str], client: Client, http_files, file_root: Path, tmp_path: Path
) -> None:
    cat, sign = http_files.base + "/cat.png", (file_root / "sign.png").as_uri()
    jobs = {
        "grounding": client.submit(cat, "grounding", max_new_tokens=1024),
        "ocr": client.submit(sign, "ocr", max_new_tokens=1024),
        "referring": client.submit(cat, "referring", region=[0.6, 0.5, 0.9, 0.9], label="이 물건", max_new_tokens=1024),
    }  # fmt: skip
    assert {s.state.value for s in client.wait(jobs.values(), timeout=120)} == {"succeeded"}
    originals = {"grounding": CAT, "ocr": SIGN, "referring": CAT}
    for task, job_id in jobs.items():
        out = tmp_path / f"{task}.png"
        run = overlay(worker_env, job_id, out)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == str(out)
        drawn = Image.open(out)
        original = Image.open(io.BytesIO(originals[task]))
        assert drawn.format == "PNG" and drawn.size == original.size, task  # the image's own size
        result = client.result(job_id)
        if task == "referring":
            boxes = [((0.6, 0.5, 0.9, 0.9), 0)]
        elif task == "ocr":
            boxes = [(item.box, i) for i, item in enumerate(result.output.ocr)]
            assert len(boxes) == 16
        else:
            boxes = [(box, i) for i, obj in enumerate(result.output.objects) for box in obj.boxes]
            assert len(boxes) == 5
        rgb = drawn.convert("RGB")
        # Each box's outline is in its object's colour somewhere along its edges (later boxes and labels
        # may cover part of an earlier one, never all of it).
        w, h = drawn.size
        for box, index in boxes:
            x1, y1, x2, y2 = to_pixels(box, drawn.size)
            x2, y2 = min(x2, w - 1), min(y2, h - 1)
            outline = [(x, y) for x in range(x1, x2 + 1) for y in (y1, y2)]
            outline += [(x, y) for y in range(y1, y2 + 1) for x in (x1, x2)]
            assert colour_for(index) in {rgb.getpixel(p) for p in outline}, (task, box)
        assert rgb.getpixel((drawn.size[0] - 1, 0)) == original.convert("RGB").getpixel((0, 0))  # a clear corner
        assert overlay_png(client, job_id) == out.read_bytes()  # what the gateway serves, byte for byte


def test_overlay_errors_are_one_line_with_exit_codes(
    worker_env: dict[str, str], client: Client, http_files, tmp_path: Path
) -> None:
    out = tmp_path / "x.png"
    unknown = overlay(worker_env, "no-such-job", out)
    assert unknown.returncode == 2 and unknown.stderr.strip() == "no such job: no-such-job"
    bad = client.submit(http_files.base + "/not-an-image.txt", "caption")
    assert next(client.wait(bad, timeout=60)).state.value == "failed"
    failed = overlay(worker_env, bad, out)
    assert failed.returncode == 1 and "ImageDecodeError" in failed.stderr and "no result to draw" in failed.stderr
    assert "Traceback" not in unknown.stderr + failed.stderr and not out.exists()


def test_a_job_with_no_kept_image_or_no_result_yet_has_no_overlay(client: Client) -> None:
    # A result as a worker with VARCO_KEEP_IMAGES=false writes it, and a job still queued.
    job_id = "overlay-no-kept-image"
    result = JobResult(
        job_id=job_id, task="caption", state=JobState.SUCCEEDED, model="m", prompt="p",
        image=ImageInfo(uri="https://x/a.png", width=4, height=4, sha256="0"), output=ParsedOutput(raw="", text=""),
    )  # fmt: skip
    uri = client.store.write(job_id, result.model_dump_json().encode())
    client.statuses.create(job_id, "caption")
    client.statuses.transition(job_id, JobState.SUCCEEDED, result_uri=uri)
    with pytest.raises(OverlayUnavailable, match="VARCO_KEEP_IMAGES=false"):
        overlay_png(client, job_id)
    client.statuses.create("overlay-queued", "caption")
    with pytest.raises(OverlayNotReady, match="has not finished: it is queued"):
        overlay_png(client, "overlay-queued")


def test_overlay_shows_the_image_as_the_model_saw_it_exif_rotated(
    worker_env: dict[str, str], client: Client, http_files, tmp_path: Path
) -> None:
    job_id = client.submit(http_files.base + "/rotated.jpg", "caption")  # stored 300x200, EXIF orientation 6
    result = client.result(job_id, timeout=60)
    out = tmp_path / "rotated.png"
    assert overlay(worker_env, job_id, out).returncode == 0
    assert Image.open(out).size == (result.image.width, result.image.height) == (200, 300)
