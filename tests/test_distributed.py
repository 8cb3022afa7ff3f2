"""Multi-process training and preprocessing on CPU gloo processes, launched as users launch them
(``flowtune ... --num-processes N`` through Accelerate's launcher, and ``torchrun``).

The promise under test: with the same global batch, any number of processes trains the same run:
the same loss at every step and the same final LoRA (fp32 on the CPU, within 1e-5), with DDP and
with FSDP2, and a checkpoint resumes on another number of processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from flowtune.data.preprocess import preprocess
from flowtune.data.store import CacheStore
from flowtune.distributed import launch_command
from flowtune.recipe import load_recipe
from flowtune.train.metrics import read_metrics
from flowtune.train.model import LORA_WEIGHTS_NAME
from flowtune.train.trainer import Trainer
from tests.helpers import REPO, assert_user_error, cli, flowtune, tiny_flux_training_env

pytestmark = [pytest.mark.slow, pytest.mark.processes]

STEPS = 6  # 3 epochs of 2 global batches of 4: buckets and epochs change inside the run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1, 8 shapes in two buckets, their cache, a recipe (global batch 4, fp32) and
    the reference run: one process, batch 4, in ``env/one``."""
    root = tmp_path_factory.mktemp("distributed")
    tiny_flux_training_env(
        root,
        train=f"max_steps: {STEPS}, batch_size: 4, seed: 0, mixed_precision: 'no', checkpoint_every: 3,"
        " log_every: 1, keep_last: null",
        rest="optimizer: {lr: 1.0e-3}\n"
        "lr_scheduler: {name: constant_with_warmup, warmup_steps: 2}\n"  # independent of max_steps
        # One validation image after the last step (under FSDP every process takes part in it).
        "validation: {prompts: ['a red circle'], every: 0, steps: 2, height: 64, width: 64}\n",
    )
    recipe = load_recipe(root / "recipe.yaml", [f"train.output_dir={root / 'one'}"])
    Trainer(recipe, console=Console(quiet=True)).run()
    return root


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _assert_same_run(run: Path, reference: Path) -> None:
    """Same loss at every step and the same final LoRA as ``reference`` (within 1e-5)."""
    got, want = _losses(run), _losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-5)
    a = load_file(run / "final" / LORA_WEIGHTS_NAME)
    b = load_file(reference / "final" / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    assert not torch.equal(a[next(k for k in a if "lora_B" in k)], torch.zeros(1))  # it trained


def _torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N ARGS`` offline; returns the completed process."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "200",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    return subprocess.run([*command, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def launched(request: pytest.FixtureRequest, env: Path) -> dict[str, subprocess.CompletedProcess]:
    """The run of ``env`` launched as users launch it, each process with its part of the global
    batch of 4: ``two`` by ``flowtune train --num-processes 2`` in ``env/two`` (its step-3
    checkpoint is also where the resume test starts from) and, if the test that checks it was
    selected, ``four`` by ``torchrun --nproc_per_node 4`` in ``env/four``.  The two launches run at
    the same time, a few seconds sooner than one after the other: each spends some of its time on
    one core (the launchers' start, the processes' shutdown), which the other's processes use."""
    recipe = str(env / "recipe.yaml")
    launches = {
        "two": lambda: flowtune(
            "train", recipe, f"train.output_dir={env / 'two'}", "train.batch_size=2", "--num-processes", "2"
        ),
    }
    if any(
        getattr(item, "originalname", None)
        == test_four_processes_under_torchrun_train_the_same_run_as_one.__name__
        for item in request.session.items
    ):
        launches["four"] = lambda: _torchrun(
            4, "-m", "flowtune", "train", recipe, f"train.output_dir={env / 'four'}", "train.batch_size=1"
        )
    with ThreadPoolExecutor(len(launches)) as pool:
        running = {name: pool.submit(launch) for name, launch in launches.items()}
        return {name: future.result() for name, future in running.items()}


def test_two_processes_train_the_same_run_as_one(
    env: Path, launched: dict[str, subprocess.CompletedProcess]
) -> None:
    two = launched["two"]
    assert two.returncode == 0, two.stderr
    _assert_same_run(env / "two", env / "one")
    # DDP's optimizer holds exactly the LoRA weights (A and B of every adapted layer).
    optimizer = torch.load(env / "two" / "checkpoints" / "step-000006" / "optimizer.bin")
    lora = load_file(env / "two" / "final" / LORA_WEIGHTS_NAME)
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == len(lora)
    # Only the main process prints: one banner, one summary, one result line.
    assert two.stdout.count("flowtune train") == 1 and two.stdout.count("training done") == 1
    assert two.stdout.count("4 samples per step = 2 x 2 processes x 1 accumulation") == 1
    assert two.stderr.count("✓ trained to step 6") == 1


@pytest.mark.extended
def test_four_processes_under_torchrun_train_the_same_run_as_one(
    env: Path, launched: dict[str, subprocess.CompletedProcess]
) -> None:
    four = launched["four"]
    assert four.returncode == 0, four.stderr[-3000:]
    _assert_same_run(env / "four", env / "one")


def test_a_checkpoint_resumes_on_another_number_of_processes(
    env: Path, launched: dict[str, subprocess.CompletedProcess]
) -> None:
    assert launched["two"].returncode == 0, launched["two"].stderr
    # The two-process run as it stood after step 3: its step-3 checkpoint and its metrics (the
    # resumed run drops the lines after step 3), in a directory of their own.
    out = env / "resumed"
    checkpoint = out / "checkpoints" / "step-000003"
    shutil.copytree(env / "two" / "checkpoints" / "step-000003", checkpoint)
    shutil.copy(env / "two" / "metrics.jsonl", out / "metrics.jsonl")
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    # Continue on one process with the same global batch (4 = 4 x 1 instead of 2 x 2).
    console = Console(record=True, width=200)
    recipe_now = load_recipe(env / "recipe.yaml", [f"train.output_dir={out}", "train.resume=latest"])
    Trainer(recipe_now, console=console).run()
    assert "resuming from" in console.export_text() and "global batch changed" not in console.export_text()
    _assert_same_run(out, env / "one")


def test_fsdp2_shards_trains_the_same_run_saves_full_loras_and_resumes(env: Path) -> None:
    recipe = str(env / "recipe.yaml")
    out = env / "fsdp"
    entry = str(REPO / "tests" / "fsdp_on_cpu.py")
    args = ["train", recipe, f"train.output_dir={out}", "train.batch_size=2", "train.distributed=fsdp"]
    first = _torchrun(2, entry, *args, "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step-000003"
    # Accelerate's sharded optimizer and model state, next to the full LoRA file the main
    # process wrote (the same tensors as an unsharded run's step 3 would hold).
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / "pytorch_model_fsdp_0").is_dir()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["sharded"] is True
    # The sharded optimizer state holds the LoRA weights' moments and nothing of the frozen base.
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(checkpoint / "optimizer_0")).read_metadata().state_dict_metadata
    moments = [k for k in keys if k.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments and all(".lora_A." in k or ".lora_B." in k for k in moments)
    lora = load_file(checkpoint / LORA_WEIGHTS_NAME)
    reference = load_file(env / "one" / "checkpoints" / "step-000003" / LORA_WEIGHTS_NAME)
    assert lora.keys() == reference.keys()
    for key in lora:
        torch.testing.assert_close(lora[key], reference[key], rtol=0, atol=1e-5, msg=key)

    second = _torchrun(2, entry, *args, "train.resume=latest")
    assert second.returncode == 0, second.stderr[-3000:]
    _assert_same_run(out, env / "one")
    # The validation image, sampled by both processes of the sharded model, written once.
    image = out / "samples" / "step-000006" / "000000.png"
    reference = np.asarray(Image.open(env / "one" / "samples" / "step-000006" / image.name), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(image), dtype=np.int16) - reference).max() <= 1

    # A sharded checkpoint's optimizer state cannot be read by a DDP run: refused, not guessed.
    ddp = cli("train", recipe, f"train.output_dir={out}", f"train.resume={checkpoint}")
    assert_user_error(ddp, "saved by a FSDP run", "train.distributed")


def test_preprocess_shares_its_work_across_processes(env: Path, tmp_path: Path) -> None:
    recipe = str(env / "recipe.yaml")
    cache = tmp_path / "cache"
    result = flowtune("preprocess", recipe, f"data.cache_dir={cache}", "--num-processes", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("✓ 8 items cached") == 1
    sharded, single = CacheStore.open(cache), CacheStore.open(env / "cache")
    assert len({ref.shard for ref in sharded.entries.values()}) == 2  # one shard per process
    assert sharded.manifest["complete"] and sharded.manifest["items"] == single.manifest["items"]
    assert sharded.entries.keys() == single.entries.keys()
    for key, ref in single.entries.items():
        fields = sharded.manifest["fields"]["image" if ref.kind == "image" else "text"]
        mine, theirs = sharded.read(key, fields), single.read(key, fields)
        for name in fields:
            assert torch.equal(mine[name], theirs[name]), (key, name)

    # Complete as one process's cache would be: a rerun (here on one process, in this one)
    # encodes nothing again.
    again = cli("preprocess", recipe, f"data.cache_dir={cache}")
    assert again.returncode == 0, again.stderr
    assert "0 images, 0 captions" in again.stdout  # idempotent: nothing encoded twice
    assert CacheStore.open(cache).entries == sharded.entries


def test_a_failure_on_each_process_names_its_rank(env: Path, tmp_path: Path) -> None:
    result = flowtune(
        "train", str(env / "recipe.yaml"), f"data.cache_dir={tmp_path / 'none'}", "--num-processes", "2"
    )
    assert result.returncode == 2  # a user error, as on one process
    assert "Traceback" not in result.stderr
    # Both processes hit the error; the launcher stops the other one when the first exits, so one
    # or both report it, each naming its rank, and the launcher's summary names the exit statuses.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors and all(re.match(r"error \(rank [01] of 2\): no preprocessed cache at", e) for e in errors)
    assert "exitcode  : 2" in result.stderr


def test_launch_command_is_accelerate_launch_of_the_same_flowtune_command() -> None:
    command = launch_command("train", ["recipe.yaml", "train.max_steps=5"], 2)
    assert command[:3] == [sys.executable, "-m", "flowtune.distributed"]  # accelerate launch
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[-5:] == ["-m", "flowtune", "train", "recipe.yaml", "train.max_steps=5"]


def test_num_processes_errors_are_one_line_messages(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Refused before anything is launched, so they run in this process.
    assert_user_error(cli("train", str(env / "recipe.yaml"), "--num-processes", "0"), "--num-processes")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    inside = cli("train", str(env / "recipe.yaml"), "--num-processes", "2")
    assert inside.returncode == 2 and "leave it out" in inside.stderr and "(rank 1 of 2)" in inside.stderr


def test_ddp_recipe_under_an_fsdp_launch_config_is_refused(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flowtune.errors import FlowtuneError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    trainer = Trainer(load_recipe(env / "recipe.yaml", [f"train.output_dir={env / 'never'}"]))
    with pytest.raises(FlowtuneError, match="enables FSDP but the recipe has train.distributed=ddp"):
        trainer._fsdp_plugin()


def test_the_slurm_script_parses_and_launches_flowtune_train_with_torchrun() -> None:
    script = REPO / "scripts" / "slurm-train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "torchrun" in text and "-m flowtune train" in text and "--rdzv_backend c10d" in text


def test_sigterm_to_a_num_processes_run_checkpoints_every_process_and_exits_143(env: Path) -> None:
    out = env / "stopped"
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [
        f"train.output_dir={out}",
        "train.batch_size=2",
        "train.max_steps=1000000",
        "train.checkpoint_every=1000000",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "flowtune", "train", str(env / "recipe.yaml"), *args, "--num-processes", "2"],
        cwd=REPO,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or (out / "metrics.jsonl").stat().st_size == 0:
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)  # as a scheduler does: to the command the user ran
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-2000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert f"checkpoint saved to {checkpoint}" in stderr
    assert json.loads((checkpoint / "trainer_state.json").read_text())["num_processes"] == 2
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}


# In `make test-extended` (the suite's time budget): FSDP2 itself is covered by the float32 LoRA
# and full fine-tuning runs above and below, which `make test` runs.
@pytest.mark.extended
def test_fsdp2_with_a_bf16_base_and_bf16_autocast_follows_the_single_process_run(
    env: Path, tmp_path: Path
) -> None:
    # The real-GPU configuration: frozen base in bfloat16, LoRA in float32 in the same FSDP units,
    # Accelerate's bf16 mixed-precision policy.  Equal up to bf16 rounding.
    bf16 = ["model.dtype=bfloat16", "train.mixed_precision=bf16", f"data.cache_dir={tmp_path / 'cache'}"]
    recipe = load_recipe(
        env / "recipe.yaml", [*bf16, f"train.output_dir={tmp_path / 'one'}", "validation.prompts=[]"]
    )
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    args = [
        "train",
        str(env / "recipe.yaml"),
        *bf16,
        f"train.output_dir={tmp_path / 'fsdp'}",
        "validation.prompts=[]",
    ]
    result = _torchrun(
        2, str(REPO / "tests" / "fsdp_on_cpu.py"), *args, "train.batch_size=2", "train.distributed=fsdp"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = _losses(tmp_path / "fsdp"), _losses(tmp_path / "one")
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-3)
    lora = load_file(tmp_path / "fsdp" / "final" / LORA_WEIGHTS_NAME)
    assert all(t.dtype == torch.float32 for t in lora.values())  # trained and saved in float32


def test_fsdp2_full_fine_tuning_saves_the_gathered_transformer_in_diffusers_format(
    env: Path, tmp_path: Path
) -> None:
    from diffusers import FluxTransformer2DModel

    full = ["train.mode=full", "train.max_steps=2", "validation.prompts=[]"]
    recipe = load_recipe(env / "recipe.yaml", [*full, f"train.output_dir={tmp_path / 'one'}"])
    Trainer(recipe, console=Console(quiet=True)).run()
    args = ["train", str(env / "recipe.yaml"), *full, f"train.output_dir={tmp_path / 'fsdp'}"]
    result = _torchrun(
        2, str(REPO / "tests" / "fsdp_on_cpu.py"), *args, "train.batch_size=2", "train.distributed=fsdp"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = FluxTransformer2DModel.from_pretrained(tmp_path / "fsdp" / "final" / "transformer").state_dict()
    single = FluxTransformer2DModel.from_pretrained(tmp_path / "one" / "final" / "transformer").state_dict()
    assert sharded.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=0, atol=1e-5, msg=key)
