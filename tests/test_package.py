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


def test_the_built_wheel_ships_the_recipes_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    """`pip wheel` of this checkout, installed (non-editable) into a fresh venv whose only other
    packages are this venv's dependencies: `flowtune recipes` lists the bundled recipes and
    `flowtune validate tiny-flux-demo` loads one, run from a folder outside the checkout."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    import venv

    # Built from a copy: pip builds in the source tree, and a build/ left in the checkout would
    # feed stale files into later wheels.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".flowtune-demo*"
        ),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            wheels,
            source,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("flowtune-*.whl")
    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    python = fresh / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies come from this venv's site-packages: a plain path entry, so its editable
    # flowtune hook (a .pth there) is not run and the wheel's flowtune is the one imported.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run(
        [python, "-c", "import flowtune; print(flowtune.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(site), where.stdout + where.stderr
    listed = subprocess.run(
        [fresh / "bin" / "flowtune", "recipes"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0 and "flux1-dev-lora-24gb" in listed.stdout, listed.stderr
    valid = subprocess.run(
        [fresh / "bin" / "flowtune", "validate", "tiny-flux-demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert valid.returncode == 0 and "is a valid recipe" in valid.stderr, valid.stderr
    assert str(REPO) not in valid.stderr  # the recipe came from the installed package


def test_cp_copies_a_bundled_recipe_to_start_one_s_own(tmp_path: Path) -> None:
    from tests.helpers import assert_user_error, cli

    result = cli("cp", "flux1-dev-lora-24gb", tmp_path)
    copied = tmp_path / "flux1-dev-lora-24gb.yaml"
    assert result.returncode == 0 and "builds on the bundled recipe 'flux1-dev-lora'" in result.stderr
    assert copied.read_text() == (REPO / "flowtune" / "recipes" / copied.name).read_text()
    assert cli("validate", copied).returncode == 0
    assert_user_error(cli("cp", "tiny-flux-demo", copied), "already exists; pass --force")
    assert cli("cp", "tiny-flux-demo", copied, "--force").returncode == 0
    assert "Tiny FLUX.1 demo" in copied.read_text()
    assert_user_error(cli("cp", "flux1-dev-lora-42gb", tmp_path / "x.yaml"), "recipe not found")
