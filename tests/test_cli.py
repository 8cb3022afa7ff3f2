"""The command line as a user runs it: exit codes, one-line errors, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, assert_user_error, cli


def test_validate_suggests_the_closest_key():
    result = cli("validate", "recipes/flux1-dev-lora.yaml", "train.max_step=5")
    assert_user_error(result, "unknown key 'train.max_step' — did you mean 'train.max_steps'?")


def test_validate_rejects_an_invalid_choice_with_allowed_values():
    result = cli("validate", "recipes/tiny-flux-demo.yaml", "flow.timestep_sampling=banana")
    assert_user_error(
        result, "'banana'", "flow.timestep_sampling", "uniform, logit_normal, mode, lognorm, mix"
    )


def test_validate_rejects_a_wrong_type():
    assert_user_error(cli("validate", "tiny-flux-demo", "train.max_steps=abc"), "'abc'", "train.max_steps")


def test_validate_prints_the_resolved_recipe_with_overrides():
    result = cli("validate", "tiny-flux-demo", "train.max_steps=7", "optimizer.lr=3e-4")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 7 and resolved["optimizer"]["lr"] == pytest.approx(3e-4)
    assert resolved["flow"]["timestep_sampling"] in ("uniform", "logit_normal", "mode", "lognorm", "mix")


def test_validate_missing_recipe():
    assert_user_error(cli("validate", "no-such-recipe.yaml"), "no-such-recipe")


def test_recipes_lists_bundled_recipes():
    result = cli("recipes")
    assert result.returncode == 0, result.stderr
    assert "flux1-dev-lora" in result.stdout and "tiny-flux-demo" in result.stdout


def test_unknown_command_and_help():
    result = cli("bogus")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    result = cli("--help")
    assert result.returncode == 0
    for command in ("validate", "recipes", "make-tiny"):
        assert command in result.stdout
    assert cli("--version").stdout.startswith("flowtune ")


def test_make_tiny(tmp_path: Path):
    out = tmp_path / "tiny"
    result = cli("make-tiny", "flux", str(out), "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (out / "model_index.json").is_file() and (out / "transformer").is_dir()
    assert_user_error(cli("make-tiny", "flux", str(out)), "--overwrite")
    assert cli("make-tiny", "flux", str(out), "--overwrite").returncode == 0
    assert_user_error(cli("make-tiny", "sd15", str(tmp_path / "x")), "unknown model family 'sd15'", "flux")


def test_demo_chain_runs_on_the_tiny_model(tmp_path: Path):
    """`make demo` in a fresh directory: make-tiny, make-dataset, preprocess (twice), one LoRA step.

    The steps run in this process; `python -m flowtune train` of this recipe in a process of its
    own is what the signal tests below run."""
    recipe = str(REPO / "recipes" / "tiny-flux-demo.yaml")
    assert cli("make-tiny", "flux", ".flowtune-demo/tiny-flux", cwd=tmp_path).returncode == 0
    made = cli("make-dataset", ".flowtune-demo/dataset", "--count", "6", "--size", "96x64", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    first = cli("preprocess", recipe, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "6 images, 8 captions" in first.stdout and "6 items cached" in first.stderr
    again = cli("preprocess", recipe, cwd=tmp_path)
    assert "0 images, 0 captions" in again.stdout and "6 images, 8 captions" in again.stdout
    trained = cli("train", recipe, "train.max_steps=4", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "13,568 trainable" in trained.stdout and "training done" in trained.stdout
    assert (tmp_path / ".flowtune-demo" / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    # The demo recipe sets train.overwrite, so running it again starts over instead of refusing.
    again = cli("train", recipe, "train.max_steps=2", cwd=tmp_path)
    assert again.returncode == 0 and "removed the earlier run" in again.stdout


@pytest.fixture(scope="module")
def cached_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny model, 4 images and their cache (built in-process), and the recipe overrides."""
    from rich.console import Console

    from flowtune.data.preprocess import preprocess
    from flowtune.data.synthetic import make_shapes_dataset
    from flowtune.recipe import load_recipe
    from flowtune.tiny import make_tiny

    root = tmp_path_factory.mktemp("cli-train")
    make_tiny("flux", root / "tiny-flux")
    make_shapes_dataset(root / "data", 4, seed=0)
    settings = [
        f"model.pretrained={root / 'tiny-flux'}",
        f"data.source={root / 'data'}",
        f"data.cache_dir={root / 'cache'}",
    ]
    preprocess(load_recipe("tiny-flux-demo", settings), console=Console(quiet=True))
    return root, settings


SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}


@pytest.fixture(scope="module")
def signalled(cached_demo, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real `flowtune train` process per signal in :data:`SIGNALS`, started together (their
    start-ups overlap on two cores), each sent its signal once its metrics have 3 lines.

    Returns per signal ``(directory, exit status, stdout, stderr)``; the run is ``directory/run``.
    """
    settings = [*cached_demo[1], "train.output_dir=run"]
    long_run = [*settings, "train.max_steps=1000000", "train.log_every=1", "train.checkpoint_every=1000000"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    runs = {}
    try:
        for signum in SIGNALS:
            root = tmp_path_factory.mktemp(f"signal-{signum}")
            runs[signum] = (
                root,
                subprocess.Popen(
                    [sys.executable, "-m", "flowtune", "train", "tiny-flux-demo", *long_run],
                    cwd=root,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        deadline = time.monotonic() + 120
        waiting = dict(runs)
        while waiting:
            for signum, (root, process) in list(waiting.items()):
                metrics = root / "run" / "metrics.jsonl"
                if metrics.is_file() and metrics.read_text().count("\n") >= 3:
                    process.send_signal(signum)
                    del waiting[signum]
                elif process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"the run did not start: {process.communicate()}")
            time.sleep(0.05)
        ended = {}
        for signum, (root, process) in runs.items():
            stdout, stderr = process.communicate(timeout=120)
            ended[signum] = root, process.returncode, stdout, stderr
        return ended
    finally:
        for _, process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.parametrize("signum", list(SIGNALS), ids=lambda signum: signum.name)
def test_train_checkpoints_and_exits_on_a_signal(cached_demo, signalled, signum: int):
    """A real signal to a real `flowtune train` process: checkpoint, resume hint, exit 128 + N."""
    root, returncode, stdout, stderr = signalled[signum]
    assert returncode == SIGNALS[signum], stderr
    assert "Traceback" not in stdout + stderr
    assert "train.resume=latest" in stderr
    metrics = root / "run" / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    checkpoint = root / "run" / "checkpoints" / f"step-{steps[-1]:06d}"
    assert (checkpoint / "trainer_state.json").is_file() and (
        checkpoint / "pytorch_lora_weights.safetensors"
    ).is_file()
    assert steps == list(range(1, steps[-1] + 1))

    resumed = cli(
        "train",
        "tiny-flux-demo",
        *cached_demo[1],
        "train.output_dir=run",
        "train.resume=latest",
        f"train.max_steps={steps[-1] + 2}",
        cwd=root,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"({steps[-1]} -> {steps[-1] + 2})" in resumed.stdout


def test_train_user_errors_are_one_line(tmp_path: Path):
    recipe = str(REPO / "recipes" / "tiny-flux-demo.yaml")
    assert_user_error(cli("train", recipe, cwd=tmp_path), "no preprocessed cache", "flowtune preprocess")
    assert_user_error(cli("train", recipe, "train.resume=nowhere", cwd=tmp_path), "train.resume")


def test_preprocess_user_errors_are_one_line(tmp_path: Path):
    recipe = str(REPO / "recipes" / "tiny-flux-demo.yaml")
    assert_user_error(cli("preprocess", recipe, cwd=tmp_path), "data.source", "does not exist")
    assert cli("make-dataset", "data", "--count", "2", cwd=tmp_path).returncode == 0
    assert_user_error(
        cli("preprocess", recipe, "data.source=data", "model.pretrained=nowhere/at-all/x", cwd=tmp_path),
        "model.pretrained",
        "does not exist",
    )
    assert_user_error(cli("make-dataset", "data", cwd=tmp_path), "not empty", "--overwrite")


def test_preprocess_exits_1_when_nothing_could_be_cached(tmp_path: Path):
    model = tmp_path / "tiny-flux"
    assert cli("make-tiny", "flux", str(model)).returncode == 0
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "empty.jpg").write_bytes(b"")
    result = cli(
        "preprocess", "tiny-flux-demo", f"model.pretrained={model}", f"data.source={data}", cwd=tmp_path
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "broken.png" in result.stdout and "empty.jpg" in result.stdout
    assert "nothing could be cached" in result.stderr
    assert len((tmp_path / ".flowtune-demo" / "cache" / "errors.jsonl").read_text().splitlines()) == 2
