"""`varco --version` (issue 21 item 10): the installed package's version."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from varco.producer.cli import build_parser


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"varco {version('varco-queue')}\n"
