"""flowtune train on a tiny FLUX.1 pipeline: recorded losses, exact resume, checkpoints, the LoRA
in diffusers, full fine-tuning, precision options, divergence and the refusal cases."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file

from flowtune.errors import FlowtuneError
from flowtune.recipe import load_recipe
from flowtune.train.checkpoint import list_checkpoints
from flowtune.train.divergence import NonFiniteLossError
from flowtune.train.metrics import read_metrics
from flowtune.train.model import LORA_WEIGHTS_NAME, RESUME_LORA_NAME
from flowtune.train.signals import TrainingInterrupted
from flowtune.train.trainer import Trainer
from tests.helpers import tiny_flux_inputs, tiny_flux_training_env

# Losses of the first 4 steps of the default test recipe (seed 0).  A change here means training
# itself changed: the sample order, the per-sample noise and timesteps, the adapter, the loss or
# the optimizer.  Re-recorded when flow.mix_uniform_ratio (0.1 by default) began mixing uniform
# draws into logit_normal as the reference does; with flow.mix_uniform_ratio=0 the run still gives
# the losses recorded when the trainer was written (7.73197, 5.77652, 8.23647, 4.68908).
RECORDED_LOSSES = [7.815245628356934, 5.981935501098633, 8.804839134216309, 4.472753047943115]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 model, 8 shapes in two buckets, their cache and a base recipe file."""
    root = tmp_path_factory.mktemp("train")
    tiny_flux_training_env(root)
    return root


def _recipe(env: Path, out: Path, *overrides: str):
    return load_recipe(env / "recipe.yaml", [f"train.output_dir={out}", *overrides])


def _console() -> Console:
    return Console(record=True, width=200, force_terminal=False)


def _train(env: Path, out: Path, *overrides: str, console: Console | None = None):
    return Trainer(_recipe(env, out, *overrides), console=console or _console()).run()


def _losses(out: Path) -> list[tuple[int, float, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in read_metrics(out / "metrics.jsonl")]


def _interrupt_after(trainer: Trainer, steps: int, signum: int = signal.SIGTERM) -> None:
    """Make ``trainer`` receive ``signum`` during its ``steps``-th step."""
    original = trainer.train_step

    def train_step(batches):
        result = original(batches)
        if trainer.step + 1 == steps:
            trainer.stop.request(signum)
        return result

    trainer.train_step = train_step


def test_a_few_steps_reproduce_the_recorded_losses(env, tmp_path) -> None:
    result = _train(env, tmp_path / "run")
    assert result.step == 4
    losses = [loss for _, loss, _, _ in _losses(tmp_path / "run")]
    assert losses == pytest.approx(RECORDED_LOSSES, rel=1e-4)


def test_the_live_display_draws_on_a_terminal(env, tmp_path) -> None:
    import io

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    _train(env, tmp_path / "run", "train.max_steps=3", console=console)
    text = buffer.getvalue()
    for fragment in ("flowtune train", "3/3", "loss", "samples/s", "mem", "ETA", "training done"):
        assert fragment in text


def test_metrics_records_have_every_documented_field(env, tmp_path) -> None:
    _train(env, tmp_path / "run", "train.log_every=2", "train.max_steps=3")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3]  # every log_every steps, and the last
    for record in records:
        assert {"step", "loss", "lr", "grad_norm", "time", "samples_per_s", "peak_mem_bytes"} <= record.keys()
        assert record["loss"] > 0 and record["samples_per_s"] > 0 and record["peak_mem_bytes"] > 0
    per_step = _train(env, tmp_path / "per-step", "train.max_steps=3")
    assert per_step.step == 3
    single = [loss for _, loss, _, _ in _losses(tmp_path / "per-step")]
    assert records[0]["loss"] == pytest.approx((single[0] + single[1]) / 2, rel=1e-6)


RESUME_SETTINGS = (
    "train.max_steps=6",
    "train.batch_size=2",
    "train.gradient_accumulation=2",
    "lora.dropout=0.1",  # the LoRA dropout draws from torch's global RNG: restored on resume
    "lr_scheduler.name=cosine",
    "lr_scheduler.warmup_steps=2",
    # Scale 1.5: the checkpoint's LoRA file holds B x 1.5, and the trained B in the file beside it.
    "lora.alpha=6",
)


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_run_bit_for_bit(env, tmp_path) -> None:
    whole = _train(env, tmp_path / "whole", *RESUME_SETTINGS)

    trainer = Trainer(_recipe(env, tmp_path / "split", *RESUME_SETTINGS), console=_console())
    _interrupt_after(trainer, 3)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    assert info.value.exit_code == 143 and info.value.step == 3
    # Step 3 is not a checkpoint_every step: the checkpoint was written for the signal.
    assert [c.step for c in list_checkpoints(tmp_path / "split")] == [2, 3]
    assert (tmp_path / "split" / "checkpoints" / "step-000003" / RESUME_LORA_NAME).is_file()
    assert "train.resume=latest" in str(info.value)

    resumed = _train(env, tmp_path / "split", *RESUME_SETTINGS, "train.resume=latest")
    assert resumed.start_step == 3 and resumed.step == 6
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    a = load_file(whole.final_dir / LORA_WEIGHTS_NAME)
    b = load_file(resumed.final_dir / LORA_WEIGHTS_NAME)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_from_an_older_checkpoint_rewrites_the_later_steps(env, tmp_path) -> None:
    out = tmp_path / "run"
    # Scale 2: the checkpoint's LoRA file holds B x 2, which resuming divides back out exactly.
    _train(env, out, "train.max_steps=6", "lora.alpha=8")
    before = _losses(out)
    first = load_file(out / "final" / LORA_WEIGHTS_NAME)
    assert not (out / "checkpoints" / "step-000004" / RESUME_LORA_NAME).exists()
    result = _train(
        env, out, "train.max_steps=6", "lora.alpha=8", f"train.resume={out / 'checkpoints' / 'step-000004'}"
    )
    assert result.start_step == 4
    assert _losses(out) == before  # the lines after step 4 were dropped, then written again
    again = load_file(out / "final" / LORA_WEIGHTS_NAME)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert [c.step for c in list_checkpoints(out)] == [2, 4, 6]


def test_a_resumed_run_follows_the_recipe_s_new_max_steps_and_lr(env, tmp_path) -> None:
    # Extending a run: the schedule is rebuilt for the new max_steps and continues at the restored
    # step (not at the old schedule's last value: 0 at the end of a 3-step cosine).
    cosine = ("lr_scheduler.name=cosine", "lr_scheduler.warmup_steps=1")
    _train(env, tmp_path / "long", *cosine, "train.max_steps=6")
    _train(env, tmp_path / "short", *cosine, "train.max_steps=3")
    assert _losses(tmp_path / "short")[-1][3] > 0
    _train(env, tmp_path / "short", *cosine, "train.max_steps=6", "train.resume=latest")
    lrs = {step: lr for step, _, _, lr in _losses(tmp_path / "short")}
    want = {step: lr for step, _, _, lr in _losses(tmp_path / "long")}
    assert [lrs[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-12)
    # A new peak learning rate applies from the resumed step on (the warning says it changed).
    _train(
        env,
        tmp_path / "long",
        *cosine,
        "train.max_steps=6",
        "optimizer.lr=2e-3",
        f"train.resume={tmp_path / 'long' / 'checkpoints' / 'step-000004'}",
    )
    assert [lr for step, _, _, lr in _losses(tmp_path / "long") if step > 4] == pytest.approx(
        [2 * want[5], 2 * want[6]], rel=1e-12
    )


def test_checkpoints_hold_the_lora_recipe_and_training_state(env, tmp_path) -> None:
    out = tmp_path / "run"
    _train(env, out, "train.max_steps=5", "train.keep_last=2")
    assert [c.step for c in list_checkpoints(out)] == [4, 5]  # every 2 steps and the last; newest 2 kept
    checkpoint = out / "checkpoints" / "step-000005"
    names = {p.name for p in checkpoint.iterdir()}
    assert {LORA_WEIGHTS_NAME, "recipe.yaml", "trainer_state.json", "optimizer.bin", "scheduler.bin"} <= names
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["batches_consumed"] == 5 and state["samples_per_step"] == 1
    assert not any(p.name.startswith(".partial") for p in (out / "checkpoints").iterdir())
    assert (out / "recipe.yaml").is_file() and (out / "final" / "recipe.yaml").is_file()
    assert torch.equal(
        load_file(out / "final" / LORA_WEIGHTS_NAME)[
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
        ],
        load_file(checkpoint / LORA_WEIGHTS_NAME)["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
    )


def test_partial_and_unmarked_checkpoint_directories_are_never_resumed(env, tmp_path) -> None:
    out = tmp_path / "run"
    _train(env, out, "train.max_steps=2")
    # A save killed before its rename, and a directory without trainer_state.json.
    (out / "checkpoints" / ".partial-step-000003").mkdir()
    (out / "checkpoints" / "step-000009").mkdir()
    assert [c.step for c in list_checkpoints(out)] == [2]
    result = _train(env, out, "train.max_steps=3", "train.resume=latest")
    assert result.start_step == 2
    assert not (out / "checkpoints" / ".partial-step-000003").exists()


def test_the_lora_loads_in_diffusers_and_gives_the_trained_model_s_outputs(env, tmp_path) -> None:
    from diffusers import FluxPipeline

    trainer = Trainer(
        _recipe(env, tmp_path / "run", "train.max_steps=3", "optimizer.lr=1e-2"), console=_console()
    )
    trainer.setup()
    try:
        result = trainer.train()
        trained = trainer.model
        trained.eval()
        pipe = FluxPipeline.from_pretrained(env / "tiny-flux", torch_dtype=torch.float32)
        pipe.load_lora_weights(result.final_dir)
        with safe_open(result.final_dir / LORA_WEIGHTS_NAME, "pt") as f:
            keys = set(f.keys())
            metadata = f.metadata()
        # Both block types and the single blocks' output projection are trained; the final
        # output layer (also named proj_out) is not.
        assert "transformer.single_transformer_blocks.0.proj_out.lora_A.weight" in keys
        assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in keys
        assert "transformer.transformer_blocks.0.ff.net.2.lora_B.weight" in keys
        assert not any(k.startswith("transformer.proj_out") for k in keys)
        adapter = json.loads(metadata["lora_adapter_metadata"])
        assert adapter["transformer.r"] == 4 and adapter["transformer.lora_alpha"] == 4

        inputs = tiny_flux_inputs()
        with torch.no_grad():
            ours = trained(**inputs)[0]
            theirs = pipe.transformer(**inputs)[0]
            pipe.unload_lora_weights()
            base = pipe.transformer(**inputs)[0]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
        assert not torch.allclose(base, ours)  # the LoRA changed the model
    finally:
        trainer.cleanup()


def test_full_fine_tuning_saves_a_loadable_transformer_and_resumes_exactly(env, tmp_path) -> None:
    from diffusers import FluxTransformer2DModel

    settings = ("train.mode=full", "train.max_steps=3", "optimizer.lr=1e-4")
    whole = _train(env, tmp_path / "whole", *settings)
    trainer = Trainer(_recipe(env, tmp_path / "split", *settings), console=_console())
    _interrupt_after(trainer, 1, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    assert info.value.exit_code == 130
    _train(env, tmp_path / "split", *settings, "train.resume=latest")
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")

    tuned = FluxTransformer2DModel.from_pretrained(whole.final_dir / "transformer")
    resumed = FluxTransformer2DModel.from_pretrained(tmp_path / "split" / "final" / "transformer")
    base = FluxTransformer2DModel.from_pretrained(env / "tiny-flux", subfolder="transformer")
    tuned_state, base_state = tuned.state_dict(), base.state_dict()
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in tuned_state.items())
    assert not torch.equal(tuned_state["proj_out.weight"], base_state["proj_out.weight"])


def test_gradient_checkpointing_gives_the_same_losses(env, tmp_path) -> None:
    _train(env, tmp_path / "plain", "train.max_steps=2")
    _train(env, tmp_path / "checkpointed", "train.max_steps=2", "train.gradient_checkpointing=true")
    plain, checkpointed = _losses(tmp_path / "plain"), _losses(tmp_path / "checkpointed")
    for a, b in zip(plain, checkpointed, strict=True):
        assert a[1] == pytest.approx(b[1], rel=1e-6) and a[2] == pytest.approx(b[2], rel=1e-5)


def test_bf16_mixed_precision_trains_on_the_cpu(env, tmp_path) -> None:
    _train(env, tmp_path / "run", "train.max_steps=2", "train.mixed_precision=bf16")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and all(0 < loss < 100 for _, loss, _, _ in losses)


def test_a_non_finite_loss_stops_the_run_naming_the_step(env, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = Trainer(_recipe(env, out, "train.max_steps=6", "train.log_every=5"), console=_console())
    trainer.setup()
    original = trainer.flow.step

    def step(*args, **kwargs):
        weighted, loss, mask, metrics = original(*args, **kwargs)
        if trainer.step == 3:  # the fourth step
            loss = loss * float("nan")
        return weighted, loss, mask, metrics

    trainer.flow.step = step
    try:
        with pytest.raises(NonFiniteLossError, match="at step 4") as info:
            trainer.train()
    finally:
        trainer.cleanup()
    assert info.value.exit_code == 1
    # Step 3's loss, run with the step-2 weights, was normal: step-000002 is good.
    assert "the last good checkpoint is" in str(info.value) and "step-000002" in str(info.value)
    # Detected at the step-4 checkpoint, which was therefore not written.
    assert [c.step for c in list_checkpoints(out)] == [2]


def test_a_new_run_refuses_an_output_dir_holding_another_run(env, tmp_path) -> None:
    out = tmp_path / "run"
    _train(env, out, "train.max_steps=2")
    with pytest.raises(FlowtuneError, match="already holds another run"):
        _train(env, out, "train.max_steps=2")
    console = _console()
    _train(env, out, "train.max_steps=1", "train.overwrite=true", console=console)
    assert [c.step for c in list_checkpoints(out)] == [1]  # the earlier run's checkpoints are gone
    assert "removed the earlier run" in console.export_text()
    assert [r[0] for r in _losses(out)] == [1]


def test_resume_errors_and_warnings(env, tmp_path) -> None:
    out = tmp_path / "run"
    with pytest.raises(FlowtuneError, match="no checkpoint directory"):
        _train(env, out, f"train.resume={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlowtuneError, match="not a flowtune checkpoint"):
        _train(env, out, f"train.resume={tmp_path / 'empty'}")

    console = _console()
    result = _train(env, out, "train.max_steps=2", "train.resume=latest", console=console)
    assert result.start_step == 0 and "no checkpoint" in console.export_text()

    with pytest.raises(FlowtuneError, match="lora.rank=4 and the recipe has 8"):
        _train(env, out, "train.max_steps=3", "train.resume=latest", "lora.rank=8")
    console = _console()
    _train(env, out, "train.max_steps=3", "train.resume=latest", "optimizer.lr=5e-4", console=console)
    assert "optimizer.lr: 0.001 -> 0.0005" in console.export_text()


def test_setup_errors_are_one_line_messages(env, tmp_path) -> None:
    with pytest.raises(FlowtuneError, match="no preprocessed cache"):
        _train(env, tmp_path / "run", f"data.cache_dir={tmp_path / 'no-cache'}")
    with pytest.raises(FlowtuneError, match="pip install wandb"):
        _train(env, tmp_path / "run", "logging.trackers=[wandb]")
    with pytest.raises(FlowtuneError, match="would hold out all"):
        _train(env, tmp_path / "run", "data.validation_split=0.99")


def test_validation_split_holds_items_out_of_training(env, tmp_path) -> None:
    trainer = Trainer(_recipe(env, tmp_path / "run", "data.validation_split=0.25"), console=_console())
    trainer.setup()
    try:
        held_out = {trainer.dataset.store.manifest["items"][i]["key"] for i in trainer.validation_indices}
        trained = {item["key"] for item in trainer.dataset.items}
        assert len(held_out) == 2 and len(trained) == 6 and not held_out & trained
    finally:
        trainer.cleanup()


def test_tensorboard_receives_the_scalars(env, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    _train(env, out, "train.max_steps=2", "logging.trackers=[tensorboard]")
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
