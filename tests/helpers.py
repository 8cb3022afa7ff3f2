"""Helpers shared by the tests that run the ``flowtune`` command line as a user does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def flowtune(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m flowtune ARGS`` offline in a subprocess; returns the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flowtune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit status 2, no traceback, one line on stderr holding every fragment."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.count("\n") == 0, f"expected one line, got:\n{message}"
    for fragment in fragments:
        assert fragment in message, message


def wide_tiny_model(family: str, root: Path) -> Path:
    """The tiny pipeline of ``family`` (flux, flux-kontext) with a transformer of hidden size 64.

    A FLUX transformer's prediction is ``proj_out`` of its hidden state, so with hidden 32 it spans
    only half of the 64 dimensions of a packed latent token and can never fit the velocity; real
    FLUX.1 (hidden 3072) has no such limit.  Width 64 is the smallest that has none either.
    """
    import torch

    from flowtune.tiny import make_tiny, tiny_flux_transformer

    model = make_tiny(family, root / f"tiny-{family}")
    torch.manual_seed(0)
    transformer = tiny_flux_transformer(hidden=64)
    shutil.rmtree(model / "transformer")
    transformer.save_pretrained(model / "transformer")
    return model
