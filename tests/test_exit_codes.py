"""The README's exit-status table, checked against the commands: each failure of the hardening
campaign (issue 16) run through the command line, with its exit status and no traceback.

Signals (130/143) are checked with real processes in tests/test_cli.py; a full disk and a
read-only directory, which need mounts, in tests/test_hardening_files.py.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch

from flowtune import runlock
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.tiny import make_tiny
from flowtune.train import checkpoint as ckpt
from tests.helpers import REPO, Result, cli


def _documented_statuses() -> dict[int, str]:
    """``{status: meaning}`` from the README's "Exit status" table."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("### Exit status") :].split("\n## ")[0]
    statuses: dict[int, str] = {}
    for codes, meaning in re.findall(r"^\| ([0-9 /]+) \| (.+) \|$", table, re.MULTILINE):
        for code in codes.split("/"):
            statuses[int(code)] = meaning
    return statuses


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 and FLUX.2, 4 shapes, their cache, and a 2-step run checkpointed at 1 and 2."""
    root = tmp_path_factory.mktemp("exits")
    model = make_tiny("flux", root / "tiny-flux")
    make_tiny("flux2", root / "tiny-flux2")
    make_shapes_dataset(root / "dataset", 4, seed=1)
    (root / "recipe.yaml").write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 4}\n"
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16}\n"
        f"train: {{output_dir: '{root / 'run'}', max_steps: 2, checkpoint_every: 1, keep_last: null,"
        " mixed_precision: 'no'}\n"
        "validation: {prompts: []}\n"
    )
    assert cli("preprocess", root / "recipe.yaml").returncode == 0
    assert cli("train", root / "recipe.yaml").returncode == 0
    return root


def _run_copy(env: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(env / "run", tmp / "run"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _locked_output_dir(env: Path, tmp: Path) -> Result:
    out = _run_copy(env, tmp)
    lock = runlock.acquire(out / ckpt.LOCK_FILE, what="the run", command="flowtune train", hint="wait")
    try:
        return cli("train", env / "recipe.yaml", f"train.output_dir={out}", "train.resume=latest")
    finally:
        lock.release()


def _diverged(env: Path, tmp: Path) -> Result:
    return cli(
        "train",
        env / "recipe.yaml",
        f"train.output_dir={tmp / 'run'}",
        "optimizer.lr=1e6",
        "train.max_steps=6",
    )


def _missing_rng_state(env: Path, tmp: Path) -> Result:
    out = _run_copy(env, tmp)
    (out / "checkpoints" / "step-000002" / ckpt.rng_file(0)).unlink()
    return cli(
        "train", env / "recipe.yaml", f"train.output_dir={out}", "train.resume=latest", "train.max_steps=3"
    )


def _truncated_shard(env: Path, tmp: Path) -> Result:
    cache = Path(shutil.copytree(env / "cache", tmp / "cache"))
    _truncate(next((cache / "shards").glob("*.safetensors")))
    return cli("train", env / "recipe.yaml", f"data.cache_dir={cache}", f"train.output_dir={tmp / 'run'}")


def _truncated_optimizer(env: Path, tmp: Path) -> Result:
    out = _run_copy(env, tmp)
    _truncate(out / "checkpoints" / "step-000002" / ckpt.OPTIMIZER_FILE)
    return cli(
        "train", env / "recipe.yaml", f"train.output_dir={out}", "train.resume=latest", "train.max_steps=3"
    )


def _export_truncated_lora(env: Path, tmp: Path) -> Result:
    out = _run_copy(env, tmp)
    _truncate(out / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
    return cli("export", "--ckpt", out / "checkpoints" / "step-000002", "--out", tmp / "lora.safetensors")


def _model_of_another_family(env: Path, tmp: Path) -> Result:
    return cli(
        "preprocess",
        env / "recipe.yaml",
        f"model.pretrained={env / 'tiny-flux2'}",
        f"data.cache_dir={tmp / 'cache'}",
    )


def _nothing_could_be_cached(env: Path, tmp: Path) -> Result:
    (tmp / "broken").mkdir()
    (tmp / "broken" / "a.png").write_bytes(b"not an image")
    return cli(
        "preprocess", env / "recipe.yaml", f"data.source={tmp / 'broken'}", f"data.cache_dir={tmp / 'c'}"
    )


CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.55 GiB"


def _out_of_memory_in_a_step(env: Path, tmp: Path) -> Result:
    out = _run_copy(env, tmp)
    oom = torch.OutOfMemoryError(CUDA_OOM)
    with mock.patch("flowtune.train.trainer.Trainer._to_device", side_effect=oom):  # the plan still traces
        return cli(
            "train",
            env / "recipe.yaml",
            f"train.output_dir={out}",
            "train.resume=latest",
            "train.max_steps=4",
            "--gpu-memory",
            "1",
        )


def _out_of_memory_loading(env: Path, tmp: Path) -> Result:
    oom = torch.OutOfMemoryError(CUDA_OOM)
    with mock.patch("flowtune.train.trainer.load_transformer", side_effect=oom):
        return cli("train", env / "recipe.yaml", f"train.output_dir={tmp / 'run'}")


# (failure, the command that meets it, its status, words of the README's meaning of that status,
# words of the one-line message, or several pieces of it)
FAILURES: list[tuple[str, Callable[[Path, Path], Result], int, str, str | tuple[str, ...]]] = [
    ("output dir in use", _locked_output_dir, 2, "locked by another process", "is in use by pid"),
    ("diverged loss", _diverged, 1, "NaN or infinite", "training diverged: loss nan at step 3"),
    (
        "missing RNG state",
        _missing_rng_state,
        2,
        "missing or corrupt files",
        "random_states_0.pkl is missing",
    ),
    ("truncated cache shard", _truncated_shard, 2, "missing or corrupt files", "flowtune preprocess"),
    ("truncated optimizer", _truncated_optimizer, 2, "missing or corrupt files", "train.resume="),
    ("truncated LoRA", _export_truncated_lora, 2, "missing or corrupt files", "truncated or damaged"),
    ("another family", _model_of_another_family, 2, "another family", "holds a Flux2Pipeline"),
    ("nothing cached", _nothing_could_be_cached, 1, "nothing could be cached", "nothing could be cached"),
    (
        "out of memory in a step",
        _out_of_memory_in_a_step,
        2,
        "ran out of memory",
        (
            "out of memory on cpu in training step 3 (a batch of 1 at ",
            ", asking for 2.00 GiB more. flowtune plan predicted a ",
            "Nothing after checkpoint ",
            "step-000002 was saved.",
            "recipe.yaml --gpu-memory 1` lists the changes that fit, then continue with train.resume=latest.",
        ),
    ),
    (
        "out of memory loading",
        _out_of_memory_loading,
        2,
        "ran out of memory",
        "out of memory on cpu while setting up the run, before its first step",
    ),
]


@pytest.mark.parametrize(
    ("name", "run", "status", "documented", "says"), FAILURES, ids=[f[0] for f in FAILURES]
)
def test_each_failure_exits_with_its_documented_status_and_no_traceback(
    env: Path,
    tmp_path: Path,
    name: str,
    run: Callable[[Path, Path], Result],
    status: int,
    documented: str,
    says: str | tuple[str, ...],
) -> None:
    result = run(env, tmp_path)
    assert result.returncode == status, result.stderr
    assert documented in _documented_statuses()[status]
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, result.stderr
    for words in (says,) if isinstance(says, str) else says:
        assert words in errors[0], errors[0]


def test_the_table_documents_every_status_the_commands_use() -> None:
    assert sorted(_documented_statuses()) == [0, 1, 2, 130, 143]


def test_a_sample_that_fails_before_writing_an_image_leaves_no_out_dir(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples" / "a"
    result = cli("sample", "--ckpt", env / "run", "--model", env / "tiny-flux2", "-p", "x", "--out", out)
    assert result.returncode == 2 and "holds a Flux2Pipeline" in result.stderr, result.stderr
    assert not (tmp_path / "samples").exists()
