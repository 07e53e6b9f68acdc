"""Images are decoded no larger than the processor uses, and few full-size decodes are held at once."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

from PIL import Image

from varco.tasks.settings import Settings
from varco.workers.input.decode import DEFAULT_MAX_SIDE, PixelBudget, processor_max_side, worker_max_side
from varco.workers.input.fetch import ImageFetcher


def encoded(image: Image.Image, format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


class RecordingBudget(PixelBudget):
    """Records the pixels of every full-size decode charged to it."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.charged: list[int] = []

    def hold(self, pixels: int):  # type: ignore[override]
        self.charged.append(pixels)
        return super().hold(pixels)


def fetcher(max_side: int, budget_pixels: int = 64_000_000) -> tuple[ImageFetcher, RecordingBudget]:
    f = ImageFetcher(Settings(_env_file=None), max_side=max_side)
    f.budget = RecordingBudget(budget_pixels)
    return f, f.budget


def test_a_large_image_is_shrunk_to_the_processor_side_and_keeps_its_original_size() -> None:
    f, _ = fetcher(max_side=300)
    data = encoded(Image.new("P", (3000, 1000), 0), "PNG")
    fetched = f.fetch("data:image/png;base64," + base64.b64encode(data).decode())
    assert fetched.image.size == (300, 100) and fetched.image.mode == "RGB"
    assert (fetched.width, fetched.height) == (3000, 1000)  # pixel boxes are in the original's pixels


def test_a_large_jpeg_decodes_at_a_reduced_scale_never_below_the_processor_side() -> None:
    f, budget = fetcher(max_side=500)
    decoded = f.decode_bounded(encoded(Image.new("RGB", (4000, 3000), (200, 10, 10)), "JPEG"))
    assert budget.charged == [1000 * 750]  # DCT scaling by 1/4: never a 12 Mpx decode
    assert decoded.image.size == (500, 375) and (decoded.width, decoded.height) == (4000, 3000)


def test_the_original_size_follows_exif_orientation() -> None:
    f, _ = fetcher(max_side=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter
    decoded = f.decode_bounded(encoded(Image.new("RGB", (400, 200), (0, 0, 0)), "JPEG", exif=exif))
    assert (decoded.width, decoded.height) == (200, 400) and decoded.image.size == (50, 100)


def test_small_images_are_untouched() -> None:
    f, budget = fetcher(max_side=300)
    decoded = f.decode_bounded(encoded(Image.new("RGB", (300, 120), (1, 2, 3)), "PNG"))
    assert decoded.image.size == (300, 120) and budget.charged == [300 * 120]


def test_the_pixel_budget_holds_back_a_decode_that_would_pass_it() -> None:
    budget = PixelBudget(100)
    entered = threading.Event()

    def second() -> None:
        with budget.hold(60):
            entered.set()

    with budget.hold(60):
        thread = threading.Thread(target=second)
        thread.start()
        while not budget._cond._waiters and not entered.is_set():  # type: ignore[attr-defined]  # it waits, or passed
            pass
        assert not entered.is_set() and budget.in_use == 60
    thread.join()
    assert entered.is_set() and budget.in_use == 0


def test_an_image_over_the_whole_budget_runs_alone_rather_than_never() -> None:
    budget = PixelBudget(100)
    with budget.hold(10_000):
        assert budget.in_use == 100


def test_the_processor_side_comes_from_the_model_directory(tmp_path: Path) -> None:
    pinpoints = [[384, 384], [384, 2304], [2304, 768]]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_grid_pinpoints": pinpoints}))
    assert processor_max_side(str(tmp_path)) == 2304
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "processor_config.json").write_text(
        json.dumps({"image_processor": {"image_grid_pinpoints": [[32, 192]]}})
    )
    assert worker_max_side(str(nested)) == 192
    assert worker_max_side(str(tmp_path / "absent")) == DEFAULT_MAX_SIDE


def test_a_large_decode_hands_its_freed_memory_back(monkeypatch) -> None:
    """glibc keeps what each task thread freed in that thread's arena: six threads decoding one 64 Mpx
    image each in turn held six (bench/image_memory.py). A large decode trims; a small one costs nothing."""
    from varco.workers.input import decode

    trims: list[int] = []
    monkeypatch.setattr(decode, "give_back_freed_memory", lambda: trims.append(1))
    f, _ = fetcher(max_side=300)
    f.decode_bounded(encoded(Image.new("RGB", (2500, 2000)), "PNG"))
    assert trims == [1]
    f.decode_bounded(encoded(Image.new("RGB", (300, 200)), "PNG"))
    assert trims == [1]
    decode.give_back_freed_memory()  # the real one runs (a no-op where libc has no malloc_trim)
