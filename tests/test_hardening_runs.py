"""Hardening of a run's output directory and checkpoints: one run per directory (the lock), which
checkpoints count as good after a divergence, and resumes or exports from checkpoints with
missing or damaged files (one-line refusals naming the file and what to use instead)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from rich.console import Console

from flowtune import runlock
from flowtune.data.preprocess import preprocess
from flowtune.data.store import CacheStore
from flowtune.errors import FlowtuneError
from flowtune.interop.export import export
from flowtune.recipe import load_recipe
from flowtune.train import checkpoint as ckpt
from flowtune.train.divergence import NonFiniteLossError
from flowtune.train.health import FACTOR, LossJudge
from flowtune.train.model import LORA_WEIGHTS_NAME
from flowtune.train.trainer import Trainer
from tests.helpers import assert_user_error, cli, flowtune, tiny_flux_training_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1, 8 shapes and their cache, a recipe, and a 4-step run in ``env/run`` with
    checkpoints at steps 2 and 4 (copied by the tests that damage them)."""
    root = tmp_path_factory.mktemp("hardening")
    tiny_flux_training_env(root)
    _train(root, root / "run")
    return root


def _trainer(env: Path, out: Path, *overrides: str, console: Console | None = None) -> Trainer:
    recipe = load_recipe(env / "recipe.yaml", [f"train.output_dir={out}", *overrides])
    return Trainer(recipe, console=console or Console(record=True, width=400))


def _train(env: Path, out: Path, *overrides: str, console: Console | None = None):
    return _trainer(env, out, *overrides, console=console).run()


def _copy_run(env: Path, to: Path) -> Path:
    shutil.copytree(env / "run", to)
    return to


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------ 1. one run per output dir


def test_a_second_run_on_a_used_output_dir_is_refused_naming_pid_and_host(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    held = runlock.acquire(
        out / ckpt.LOCK_FILE, what="the output directory", command="flowtune train", hint="wait"
    )
    try:
        # Another process: the lock is held by this one.
        result = flowtune("train", str(env / "recipe.yaml"), f"train.output_dir={out}", "train.resume=latest")
        assert_user_error(
            result, f"{out} is in use by pid {os.getpid()} on host {socket.gethostname()}", "train.output_dir"
        )
        assert not (out / "metrics.jsonl").exists()  # refused before writing anything
    finally:
        held.release()


def test_a_run_refused_before_writing_anything_leaves_no_output_dir(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "a"
    with pytest.raises(FlowtuneError, match="no preprocessed cache at"):
        _train(env, out, f"data.cache_dir={tmp_path / 'nowhere'}")
    assert not (tmp_path / "runs").exists()  # neither the lock file nor the folders made for it


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed with SIGKILL leaves: its record, and no lock (the kernel released it).
    (out / ckpt.LOCK_FILE).write_text(
        json.dumps({"pid": 999999, "host": "gpu-7", "command": "flowtune train", "started": 0.0})
    )
    console = Console(record=True, width=400)
    _train(env, out, "train.max_steps=1", console=console)
    text = console.export_text()
    assert "last used by pid 999999 on host gpu-7 (flowtune train" in text
    assert "ended without releasing it" in text
    # The run's own lock is released at the end (the file stays, emptied).
    assert (out / ckpt.LOCK_FILE).read_text() == ""


@pytest.mark.parametrize("rank", [0, 1])
def test_every_process_of_a_multi_process_run_learns_the_main_process_s_refusal(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: int
) -> None:
    """Only the main process takes the lock; its verdict is broadcast, so the other processes
    raise the same one-line error instead of waiting at the next collective."""
    from types import SimpleNamespace

    import accelerate.utils

    sent: list = []

    def broadcast(objects: list, from_process: int = 0) -> list:
        if rank == 0:
            sent.append(list(objects))
        else:  # what the main process sends when the output directory is in use
            objects[0] = ("error", "the output directory X is in use by pid 1 on host h; wait")
        return objects

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast)
    trainer = _trainer(env, tmp_path / "run")
    trainer.accelerator = SimpleNamespace(is_main_process=rank == 0, num_processes=2)

    def decide():
        raise FlowtuneError("the output directory X is in use by pid 1 on host h; wait")

    with pytest.raises(FlowtuneError, match="in use by pid 1 on host h"):
        trainer._main_decides(decide)
    assert sent == (
        [[("error", "the output directory X is in use by pid 1 on host h; wait")]] if rank == 0 else []
    )


def test_preprocess_s_cache_lock_names_pid_and_host(env: Path) -> None:
    with CacheStore.open(env / "cache").locked() as warning:
        assert warning is None
        with pytest.raises(FlowtuneError, match=f"in use by pid {os.getpid()} on host .*data.cache_dir"):
            with CacheStore.open(env / "cache").locked():
                pass


def test_preprocess_takes_over_a_lock_left_by_a_killed_preprocess_with_a_warning(env: Path) -> None:
    from flowtune.data.store import LOCK_NAME

    (env / "cache" / LOCK_NAME).write_text(
        json.dumps({"pid": 999999, "host": "gpu-7", "command": "flowtune preprocess", "started": 0.0})
    )
    console = Console(record=True, width=400)
    preprocess(load_recipe(env / "recipe.yaml"), console=console)
    assert "last used by pid 999999 on host gpu-7 (flowtune preprocess" in console.export_text()
    assert (env / "cache" / LOCK_NAME).read_text() == ""  # released


# ------------------------------------------------------------------ 2. good checkpoints


def test_the_loss_judge_compares_with_the_median_of_earlier_normal_losses() -> None:
    judge = LossJudge()
    assert judge.judge(100.0) is None  # the first loss only has to be finite
    assert judge.judge(1.0) is None and judge.judge(2.0) is None  # median now 2
    assert judge.judge(FACTOR * 2.0) is None
    assert "over 10 x the median" in judge.judge(FACTOR * 2.0 * 10 + 1)
    assert judge.judge(float("nan")) == "loss nan"
    assert judge.reference == [100.0, 1.0, 2.0, 20.0]  # abnormal losses never join
    assert LossJudge(judge.reference).judge(1e4) is not None  # restored from trainer_state.json


def test_a_diverged_run_names_only_a_good_checkpoint_and_resume_latest_skips_bad_ones(
    env: Path, tmp_path: Path
) -> None:
    out = _copy_run(env, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-000004")
    # From step 2, at lr 1e6: step 3's loss is normal, its update blows the weights up (finite),
    # step 4's loss -- run with the step-3 checkpoint's weights -- is NaN.
    settings = ("train.max_steps=8", "train.checkpoint_every=1", "train.resume=latest")
    with pytest.raises(NonFiniteLossError) as info:
        _train(env, out, *settings, "optimizer.lr=1e6")
    message = str(info.value)
    assert "loss nan at step 4" in message
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in message
    state = ckpt.read_state(out / "checkpoints" / "step-000003")
    assert state["health"] == {
        "good": False,
        "reason": "step 4, run with its weights: loss nan",
        "judged_by_step": 4,
    }
    assert ckpt.is_good(ckpt.read_state(out / "checkpoints" / "step-000002"))

    # train.resume=latest skips the bad checkpoint, says so, and resumes the good one.
    console = Console(record=True, width=400)
    result = _train(env, out, "train.max_steps=3", "train.resume=latest", console=console)
    assert result.start_step == 2
    assert "skipped the checkpoints marked bad: step-000003" in console.export_text()


def test_keep_last_never_prunes_the_newest_checkpoint_confirmed_good(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = _trainer(env, out, "train.max_steps=6", "train.checkpoint_every=1", "train.keep_last=1")
    trainer.setup()
    original = trainer.flow.step

    def step(*args, **kwargs):
        weighted, loss, mask, metrics = original(*args, **kwargs)
        return weighted, loss * float("nan") if trainer.step == 3 else loss, mask, metrics

    trainer.flow.step = step
    try:
        # keep_last=1 alone would have pruned step 2 when step 3 was saved; step 4's NaN then
        # condemns step 3, and step 2 (confirmed good by step 3's loss) is what is left.
        with pytest.raises(NonFiniteLossError, match="the last good checkpoint is .*step-000002"):
            trainer.train()
    finally:
        trainer.cleanup()
    assert [c.step for c in ckpt.list_checkpoints(out)] == [2, 3]


def test_when_no_checkpoint_qualifies_the_run_says_so_and_resume_latest_refuses(
    env: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # lr 1e6 from the start: step 2's update gives weights up to ~1e8, step 3's loss is NaN.
    with pytest.raises(NonFiniteLossError, match="no checkpoint qualifies as good") as info:
        _train(env, out, "train.max_steps=6", "optimizer.lr=1e6")
    assert "step-000002: step 3, run with its weights: loss nan" in str(info.value)
    assert "train.overwrite=true" in str(info.value)
    with pytest.raises(FlowtuneError, match="no checkpoint in .* is good to resume from"):
        _train(env, out, "train.max_steps=6", "train.resume=latest")


def test_a_checkpoint_with_non_finite_weights_is_never_written(env: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = _trainer(env, out, "train.max_steps=1")
    trainer.setup()
    try:
        with torch.no_grad():
            trainer.params[0][0, 0] = float("inf")
        with pytest.raises(NonFiniteLossError, match="1 trainable weights became NaN or infinite"):
            trainer.save()
    finally:
        trainer.cleanup()
    assert ckpt.list_checkpoints(out) == []


# ------------------------------------------------------------------ 3 and 5. damaged checkpoints


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda c: (c / "random_states_0.pkl").unlink(), id="rng-missing"),
        pytest.param(lambda c: _truncate(c / "random_states_0.pkl"), id="rng-truncated"),
        pytest.param(lambda c: _truncate(c / "optimizer.bin"), id="optimizer-truncated"),
        pytest.param(lambda c: _truncate(c / "scheduler.bin"), id="scheduler-truncated"),
        pytest.param(lambda c: _truncate(c / LORA_WEIGHTS_NAME), id="lora-truncated"),
    ],
)
def test_latest_and_path_refuse_a_damaged_checkpoint_naming_the_file_and_the_older_one(
    env: Path, tmp_path: Path, damage
) -> None:
    out = _copy_run(env, tmp_path / "run")
    newest = out / "checkpoints" / "step-000004"
    before = {p.name: p.stat().st_size for p in newest.iterdir()}
    damage(newest)
    (damaged,) = [p.name for p in newest.iterdir() if before[p.name] != p.stat().st_size] or [
        n for n in before if not (newest / n).exists()
    ]
    for resume in ("latest", str(newest)):
        with pytest.raises(FlowtuneError) as info:
            ckpt.find_resume(out, resume, LORA_WEIGHTS_NAME)
        message = str(info.value)
        assert message.startswith(f"cannot resume from {newest}: {newest / damaged} is ")
        assert message.endswith(f"train.resume={out / 'checkpoints' / 'step-000002'}")
        assert "\n" not in message


def test_rng_states_are_required_for_every_process_that_saved_the_checkpoint(
    env: Path, tmp_path: Path
) -> None:
    checkpoint = shutil.copytree(env / "run" / "checkpoints" / "step-000004", tmp_path / "step-000004")
    state = ckpt.read_state(checkpoint)
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    assert "random_states_1.pkl is missing" in ckpt.resume_problem(checkpoint, LORA_WEIGHTS_NAME)
    shutil.copy(checkpoint / "random_states_0.pkl", checkpoint / "random_states_1.pkl")
    assert ckpt.resume_problem(checkpoint, LORA_WEIGHTS_NAME) is None  # a 2-process checkpoint
    # Resumed on more processes than saved it: the ranks beyond have no file and need none.
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 1}))
    assert ckpt.resume_problem(checkpoint, LORA_WEIGHTS_NAME) is None


def test_a_truncated_lora_is_one_line_for_export_and_resume(env: Path, tmp_path: Path) -> None:
    out = _copy_run(env, tmp_path / "run")
    lora = out / "checkpoints" / "step-000004" / LORA_WEIGHTS_NAME
    _truncate(lora)  # final/ holds a hard link to the same file in a real run; a copy here
    result = cli("export", "--ckpt", str(lora.parent), "--format", "kohya")
    assert_user_error(result, f"{lora} is unreadable", f"--ckpt {out / 'checkpoints' / 'step-000002'}")
    with pytest.raises(FlowtuneError, match="is unreadable"):
        export(lora.parent, fmt="comfyui")
    with pytest.raises(FlowtuneError, match=f"cannot resume from {lora.parent}: {lora} is unreadable"):
        _train(env, out, "train.max_steps=6", "train.resume=latest")


def test_a_missing_unscaled_lora_file_is_named_before_resuming(env: Path, tmp_path: Path) -> None:
    """A LoRA file whose scale is folded in names the unscaled file resume reads beside it: the
    checkpoint check reports it missing, as any other file of the checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from flowtune.train.model import META_RESUME_FILE, RESUME_LORA_NAME

    checkpoint = shutil.copytree(env / "run" / "checkpoints" / "step-000004", tmp_path / "step-000004")
    lora = checkpoint / LORA_WEIGHTS_NAME
    with safe_open(str(lora), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata() or {}
    save_file(tensors, str(lora), metadata={**metadata, META_RESUME_FILE: RESUME_LORA_NAME})
    problem = ckpt.resume_problem(checkpoint, LORA_WEIGHTS_NAME)
    assert (
        problem == f"{checkpoint / RESUME_LORA_NAME} is missing (the unscaled LoRA weights that resume reads)"
    )
    save_file(tensors, str(checkpoint / RESUME_LORA_NAME))
    assert ckpt.resume_problem(checkpoint, LORA_WEIGHTS_NAME) is None
