"""The package under test is this checkout's, and it installs what the README promises."""

import re
from pathlib import Path

import pytest

import flowtune

REPO = Path(__file__).resolve().parents[1]


def test_tests_import_this_checkout():
    assert Path(flowtune.__file__).resolve().parent == REPO / "flowtune"


def test_no_torchvision_or_open_clip_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    names = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    assert "torch" in names and not names & {"torchvision", "open-clip-torch", "open-clip"}


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
