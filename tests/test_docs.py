"""The documentation holds together: README.md and docs/*.md link only to files (and headings) that exist,
and every setting and job error type the code defines is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from varco.tasks import errors
from varco.tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def doc_files(root: Path = ROOT) -> list[Path]:
    """The project's documentation: the README (the front door) and the reference pages under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def documentation(root: Path = ROOT) -> str:
    """All of the documentation as one text, for tests that check a name is documented somewhere."""
    return "\n".join(path.read_text(encoding="utf-8") for path in doc_files(root))


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered (`-1`, `-2`, ...)."""
    anchors: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def broken_links(root: Path = ROOT) -> list[str]:
    """Every link from a documentation page to a local file or heading that does not exist."""
    broken = []
    for page in doc_files(root):
        text = page.read_text(encoding="utf-8")
        for target in _LINK.findall(_FENCE.sub("", text)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(root)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{where} (no such heading)")
    return broken


def test_every_local_link_in_the_docs_resolves() -> None:
    assert broken_links() == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    """The check itself: a link to a page that is not there, and one to a heading the page lacks."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#its-title) [gone](docs/gone.md) [web](https://example.com/x.md)\n"
        "```\n[in code](not/checked.md)\n```\n"
    )
    (tmp_path / "docs" / "a.md").write_text("# Its title\n\n[up](../README.md) [here](#no-such-part)\n")
    assert broken_links(tmp_path) == [
        "README.md: docs/gone.md (no such file)",
        "docs/a.md: #no-such-part (no such heading)",
    ]


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [("Celery's own tools", "celerys-own-tools"), ("`make demo` and `make test`", "make-demo-and-make-test"),
     ("Scaling out and infra/", "scaling-out-and-infra"), ("Settings (environment, prefix `VARCO_`)",
     "settings-environment-prefix-varco_")],
)  # fmt: skip
def test_heading_anchors_follow_github(heading: str, anchor: str) -> None:
    assert heading_anchors(f"# {heading}\n") == {anchor}


def test_the_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    unlinked = [p.name for p in doc_files()[1:] if f"](docs/{p.name})" not in readme]
    assert unlinked == []


def test_every_setting_is_documented_in_the_settings_page() -> None:
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    prefix = Settings.model_config["env_prefix"]
    missing = [f"{prefix}{name.upper()}" for name in Settings.model_fields if f"`{prefix}{name.upper()}`" not in page]
    assert missing == []


# Error types users see in `error.type` that tasks/errors.py does not define: the resolver's, and httpx's
# for an image URL it cannot parse (an unexpected error keeps its class name: tasks.errors.error_info).
ERRORS_FROM_ELSEWHERE = ["InvalidRequest", "UnresolvableHostError", "InvalidURL"]


def test_every_job_error_type_is_documented() -> None:
    text = documentation()
    types = [name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, errors.JobError)]
    assert [name for name in [*types, *ERRORS_FROM_ELSEWHERE] if f"`{name}`" not in text and name != "JobError"] == []


def test_the_errors_from_elsewhere_exist_under_those_names() -> None:
    httpx = pytest.importorskip("httpx")
    from varco.workers.net.netguard import UnresolvableHostError

    assert {httpx.InvalidURL.__name__, UnresolvableHostError.__name__} <= set(ERRORS_FROM_ELSEWHERE)
