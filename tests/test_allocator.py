"""flowtune's commands run with the CUDA allocator's expandable segments unless the user set the
allocator (flowtune.allocator)."""

from __future__ import annotations

import os
from unittest import mock

import pytest

from flowtune.allocator import configure_allocator
from tests.helpers import cli


def test_expandable_segments_unless_the_user_set_the_allocator() -> None:
    environ: dict[str, str] = {}
    assert configure_allocator(environ) and environ == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        users = {name: "max_split_size_mb:512"}
        assert not configure_allocator(users) and users == {name: "max_split_size_mb:512"}


def test_every_command_runs_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    seen = []
    with mock.patch("flowtune.cli.app", lambda: seen.append(os.environ.get("PYTORCH_ALLOC_CONF"))):
        assert cli("--version").returncode == 0
    assert seen == ["expandable_segments:True"]
