"""The training run: one readable :class:`Trainer` with setup / train / save / cleanup.

What one optimizer step does (:meth:`Trainer.train_step`), for ``A = train.gradient_accumulation``
micro-batches of ``B = train.batch_size`` samples on each of ``P`` processes:

1. take this process's slice of the next global batch from the :class:`BucketBatchSampler`
   (global batches of ``B * P`` samples, all from one bucket);
2. draw every sample's sigma, noise and caption dropout from its own generator, seeded by
   ``(train.seed, step, index)`` with ``index = a * B * P + rank * B + i`` for micro-batch ``a``:
   a sample's randomness never depends on how the step is split across processes;
3. ``FlowMatchingPipeline.step`` (the family adapter builds the transformer inputs), backward of
   ``loss / A`` (gradients of the non-final micro-batches are not all-reduced: ``no_sync``);
4. clip the gradient norm (``train.max_grad_norm``; the norm is always measured and logged), step
   the optimizer and the learning-rate schedule, zero the gradients.

The loss is not read back every step (a device sync on GPUs): per-step losses stay on the device
until the next log step, checkpoint or the end, where they are checked (a non-finite loss stops
the run before anything is saved) and written to ``metrics.jsonl``.

Resuming restores the LoRA (or full) weights from the checkpoint's own files, Accelerate's
optimizer / scheduler / RNG state, and the sampler position; since the per-sample randomness is a
function of the step, a resumed run repeats the uninterrupted run's losses exactly (bit for bit
on a CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from omegaconf import OmegaConf
from rich.console import Console

from flowtune import __version__, runlock
from flowtune.console import format_bytes, format_duration, key_value_table, make_console, warning_text
from flowtune.data.cache import check_cache
from flowtune.data.loader import (
    BucketBatchSampler,
    CacheCollator,
    CachedDataset,
    repeated_items_warning,
    split_validation,
)
from flowtune.distributed import has_accelerator
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.fileio import tree_bytes, write_errors
from flowtune.flow_matching import create_pipeline
from flowtune.memory.quantize import exclude_quantized_from_ddp
from flowtune.model_files import resolve_pretrained
from flowtune.recipe import recipe_to_yaml
from flowtune.train import checkpoint as ckpt
from flowtune.train.display import TrainDisplay
from flowtune.train.health import LossJudge
from flowtune.train.metrics import MetricsLog, peak_memory_bytes, read_metrics, tracker_config
from flowtune.train.model import (
    LORA_WEIGHTS_NAME,
    META_BASE_MODEL,
    META_STEP,
    META_VERSION,
    add_lora,
    load_full,
    load_lora,
    load_transformer,
    lora_state_dict,
    make_fully_trainable,
    save_full,
    save_lora,
)
from flowtune.train.noise import sample_generators
from flowtune.train.offload import check_block_offload, offload_blocks
from flowtune.train.optim import build_optimizer, build_scheduler, realign_schedule
from flowtune.train.signals import StopRequest, TrainingInterrupted
from flowtune.train.validation import SAMPLES_DIR, Validator

T = TypeVar("T")

# Recipe keys whose change makes a checkpoint unusable (the trained tensors would not fit).
_INCOMPATIBLE_ON_RESUME = ("model.family", "train.mode", "lora.rank", "lora.target_modules")
# Keys that may change freely between a checkpoint and its resumption.
_FREE_ON_RESUME = (
    "train.output_dir",
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_last",
    "train.log_every",
    "train.resume",
    "train.overwrite",
    "train.distributed",
    "train.batch_size",  # compared as the global batch size instead
    "train.gradient_accumulation",
    "data.num_workers",
    "validation",
    "logging",
)


class NonFiniteLossError(FlowtuneError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped without saving."""

    exit_code = 1


@dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        output_dir: ``train.output_dir``.
        final_dir: ``output_dir/final``: the trained weights and the recipe.
        checkpoint: The last checkpoint written.
        start_step: The step the run started (or resumed) at.
        step: The last step trained (``train.max_steps``).
        seconds: Wall time of this invocation.
    """

    output_dir: Path
    final_dir: Path
    checkpoint: Path | None
    start_step: int
    step: int
    seconds: float


def _nested_get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "model.adapter":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class Trainer:
    """A LoRA (or full) fine-tuning run of a flow-matching transformer, driven by a recipe.

    Use :meth:`run`, or :meth:`setup`, :meth:`train` and :meth:`cleanup` separately (tests and
    benchmarks call :meth:`train_step` directly).

    Args:
        recipe: A validated recipe (:func:`flowtune.recipe.load_recipe`).
        console: Where the main process prints; ``None`` = a new stdout console.
    """

    def __init__(self, recipe: Any, console: Console | None = None):
        self.recipe = recipe
        self.family = get_family(recipe.model.family)
        self.output_dir = Path(recipe.train.output_dir)
        self.console = console if console is not None else make_console()
        self.step = 0
        self.batches_consumed = 0
        self.stop = StopRequest()
        self.resumed_from: ckpt.Checkpoint | None = None
        self.last_checkpoint: Path | None = None
        self._metrics: MetricsLog | None = None
        # (step, loss, grad norm, lr) of the steps since the last log; loss and norm stay device
        # tensors until read back by _check_pending.
        self._pending: list[tuple[int, Any, Any, float]] = []
        self._warnings: list[str] = []
        self._trackers = False
        self._elapsed_before = 0.0
        self._started_at = time.time()
        self._lock: runlock.RunLock | None = None
        # Checkpoint health (flowtune.train.health): the loss judge, the verdict on the last step
        # read back (None = normal), the checkpoint still waiting for its step s+1 verdict, the
        # checkpoints this run saved and those it found bad.
        self._judge = LossJudge()
        self._last_verdict: tuple[int, str | None] = (0, None)
        self._awaiting: ckpt.Checkpoint | None = None
        self._saved: list[ckpt.Checkpoint] = []
        self._judged_bad: dict[int, str] = {}  # step -> why, for this run's checkpoints

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build everything: accelerator, data, model with LoRA, optimizer, schedule; resume."""
        r = self.recipe
        self.accelerator = self._make_accelerator()
        acc = self.accelerator
        self.is_main = acc.is_main_process
        self.device = acc.device
        self.display_console = self.console if self.is_main else None

        resume = self._main_decides(self._claim_output_dir)
        if r.train.resume == "latest" and resume is None:
            self._warnings.append(
                f"train.resume=latest: no checkpoint in {self.output_dir / ckpt.CHECKPOINTS}, starting at step 0"
            )

        self._setup_data()
        if resume is not None:
            self._check_resume_compatible(resume, resume.state())
        self._setup_model(resume)
        self.flow = create_pipeline(
            self.family.adapter,
            OmegaConf.to_container(r.model.adapter),
            **OmegaConf.to_container(r.flow),
        )
        self.validator = Validator(
            r, self.family, self.store, self.validation_indices, self.accelerator, self.output_dir
        )
        if resume is not None:
            self._resume(resume)
        self._setup_outputs(resume)

    def _claim_output_dir(self) -> ckpt.Checkpoint | None:
        """On the main process: lock ``train.output_dir`` for the run (:mod:`flowtune.runlock`;
        released by :meth:`cleanup`), check it, and find the checkpoint to resume from."""
        r = self.recipe
        self._lock = runlock.acquire(
            self.output_dir / ckpt.LOCK_FILE,
            what=f"the output directory {self.output_dir}",
            command="flowtune train",
            hint="wait for that run to end, or set train.output_dir to another directory",
            elsewhere="set train.output_dir to another directory",
        )
        if warning := self._lock.takeover_warning(f"the output directory {self.output_dir}"):
            self._warnings.append(warning)
        ckpt.check_output_dir(self.output_dir, r.train.resume, r.train.overwrite)
        return ckpt.find_resume(self.output_dir, r.train.resume, self._weights_name, self._warnings)

    @property
    def _weights_name(self) -> str:
        """The trained weights' name in a checkpoint: the LoRA file, or ``transformer``."""
        return LORA_WEIGHTS_NAME if self.recipe.train.mode == "lora" else "transformer"

    def _main_decides(self, decide: Callable[[], T]) -> T:
        """Run ``decide`` on the main process only and give its result to every process; a
        :class:`FlowtuneError` it raises is raised on every process (none is left waiting at a
        later collective)."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        outcome: list[Any] = [None]
        try:
            if acc.is_main_process:
                try:
                    outcome = [("result", decide())]
                except FlowtuneError as exc:
                    outcome = [("error", str(exc))]
                except BaseException as exc:
                    outcome = [("failed", f"{type(exc).__name__}: {exc}")]
                    raise
        finally:
            if acc.num_processes > 1:
                broadcast_object_list(outcome, from_process=0)
        kind, value = outcome[0]
        if kind == "error":
            raise FlowtuneError(value)
        if kind == "failed":
            raise RuntimeError(f"the main process failed: {value}")
        return value

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        r = self.recipe
        trackers = list(r.logging.trackers)
        self._check_trackers(trackers)
        fsdp_plugin = self._fsdp_plugin()
        try:
            accelerator = Accelerator(
                # Without an accelerator, say so: Accelerate then sets up multi-process CPU runs
                # (gloo) under `accelerate launch` / torchrun instead of N independent processes.
                cpu=not has_accelerator(),
                mixed_precision=r.train.mixed_precision,
                log_with=trackers or None,
                project_config=ProjectConfiguration(
                    project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "tensorboard")
                ),
                # The schedule steps once per optimizer step, whatever the number of processes,
                # so a run's learning-rate curve does not depend on the world size.
                step_scheduler_with_optimizer=False,
                fsdp_plugin=fsdp_plugin,
            )
        except (ValueError, RuntimeError) as exc:
            raise FlowtuneError(
                f"train.mixed_precision={r.train.mixed_precision!r} is not available here: {exc} "
                "(use train.mixed_precision=no on a CPU)"
            ) from None
        # Checkpoints hold the trained weights in the files users load (the diffusers LoRA file,
        # or transformer/ for full fine-tuning), written and read by the trainer itself, so
        # Accelerate's state keeps only what it alone knows: optimizer, schedule, RNG, scaler.
        accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, directory: models.clear())
        self.sharded = accelerator.is_fsdp2
        if fsdp_plugin is not None and not self.sharded and accelerator.num_processes > 1:
            self._warnings.append(
                "train.distributed=fsdp: Accelerate shards only across GPUs; these CPU processes run DDP"
            )
        return accelerator

    def _fsdp_plugin(self) -> Any:
        """Accelerate's FSDP2 plugin for ``train.distributed=fsdp`` (None for ``ddp``).

        Each transformer block (the model's ``_no_split_modules``) is one FSDP unit, its weights
        resharded after the forward pass; the frozen base and the trainable LoRA (or full) weights
        are both sharded, and only the trainable ones are in the optimizer.

        Raises:
            FlowtuneError: ``ddp`` in the recipe but the launcher's Accelerate config turns FSDP on
                (the recipe decides; the two must agree).
        """
        from accelerate import FullyShardedDataParallelPlugin

        if self.recipe.train.distributed != "fsdp":
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                raise FlowtuneError(
                    "the accelerate launch configuration enables FSDP but the recipe has "
                    "train.distributed=ddp; set train.distributed=fsdp, or launch without FSDP in the "
                    "accelerate config"
                )
            return None
        return FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # the model's _no_split_modules
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",  # Accelerate's resumable state, one shard per rank
            cpu_ram_efficient_loading=False,
        )

    @staticmethod
    def _check_trackers(trackers: list[str]) -> None:
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
        for name in trackers:
            if not available[name]():
                raise FlowtuneError(
                    f"logging.trackers lists {name!r} but the {name} package is not installed: "
                    f"pip install {name} (or remove it from logging.trackers)"
                )

    def _setup_data(self) -> None:
        r = self.recipe
        acc = self.accelerator
        store = self.store = check_cache(r)
        keys = [item["key"] for item in store.manifest.get("items", [])]
        if not keys:
            raise FlowtuneError(f"the cache at {r.data.cache_dir} has no items; check data.source")
        try:
            train_indices, self.validation_indices = split_validation(keys, r.data.validation_split)
        except ValueError as exc:
            raise FlowtuneError(str(exc)) from None
        self.dataset = CachedDataset(store, train_indices)
        self.data_fingerprint = hashlib.sha256(
            "\n".join(i["key"] for i in self.dataset.items).encode()
        ).hexdigest()
        self.sampler = BucketBatchSampler(
            self.dataset.batch_groups,
            r.train.batch_size,
            seed=r.train.seed,
            num_replicas=acc.num_processes,
            rank=acc.process_index,
        )
        repeats = repeated_items_warning(self.dataset.batch_groups, r.train.batch_size, acc.num_processes)
        if repeats is not None:
            self._warnings.append(repeats)
        self.collate = CacheCollator(self.dataset.sequence_fields)
        self.samples_per_step = r.train.batch_size * acc.num_processes * r.train.gradient_accumulation

    def _setup_model(self, resume: ckpt.Checkpoint | None) -> None:
        """Load the transformer, add the LoRA (or make it trainable), restore a checkpoint's
        weights (before any DDP/FSDP wrapping, so both load the same full tensors), then let
        Accelerate wrap model, optimizer and schedule."""
        from accelerate.utils import set_seed

        r = self.recipe
        self.dtype = getattr(torch, r.model.dtype)
        if r.train.block_offload is not None:  # from config.json, before the weights download
            check_block_offload(self.family, r.model.pretrained, r.model.revision, r.train.block_offload)
        model_dir = resolve_pretrained(
            r.model.pretrained, r.model.revision, ["transformer"], family=self.family
        )
        # Seeds Python, numpy and torch (LoRA initialisation, LoRA dropout) identically on every
        # process; the flow-matching draws use their own per-sample generators.
        set_seed(r.train.seed)
        transformer = load_transformer(
            self.family, model_dir, self.dtype, r.model.variant, quantize=r.model.quantize, device=self.device
        )
        self.quantized = getattr(transformer, "flowtune_quantized", None)
        if r.train.mode == "lora":
            params = add_lora(
                transformer,
                self.family,
                rank=r.lora.rank,
                alpha=r.lora.alpha,
                dropout=r.lora.dropout,
                target_modules=list(r.lora.target_modules) if r.lora.target_modules else None,
                init=r.lora.init,
            )
        else:
            params = make_fully_trainable(transformer)
        if resume is not None:
            try:
                (load_lora if r.train.mode == "lora" else load_full)(transformer, resume.path)
            except FlowtuneError as exc:
                raise ckpt.refuse_resume(resume, str(exc), self._weights_name) from None
        if r.train.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if self.quantized is not None:
            exclude_quantized_from_ddp(transformer)
        self.trainable_parameters = sum(p.numel() for p in params)
        self.total_parameters = sum(p.numel() for p in transformer.parameters())
        optimizer = build_optimizer(params, r.optimizer)
        scheduler = build_scheduler(optimizer, r.lr_scheduler, r.train.max_steps)
        # Block offload puts on the device what stays there and registers its hooks before
        # Accelerate sees the model, which must then not move it all to the device.
        self.offload = None
        if r.train.block_offload is not None:
            self.offload = offload_blocks(transformer, self.family, r.train.block_offload, self.device)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            transformer, optimizer, scheduler, device_placement=[False if self.offload else None, None, None]
        )
        # FSDP2 replaces the parameters by sharded ones (and points the optimizer at them).
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _setup_outputs(self, resume: ckpt.Checkpoint | None) -> None:
        r = self.recipe
        if self.is_main:
            if resume is None and r.train.overwrite:
                removed = ckpt.clear_run(self.output_dir)
                if removed:
                    self._warnings.append(
                        f"train.overwrite=true: removed the earlier run's {', '.join(p.name for p in removed)}"
                    )
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_partial(self.output_dir)
            (self.output_dir / ckpt.RECIPE_FILE).write_text(recipe_to_yaml(r))
            self._metrics = MetricsLog(
                self.output_dir / ckpt.METRICS_FILE, resume_step=self.step if resume is not None else None
            )
        if r.logging.trackers:
            run_name = r.logging.run_name or self.output_dir.resolve().name
            self.accelerator.init_trackers(
                r.logging.project,
                config=tracker_config(OmegaConf.to_container(r)),
                init_kwargs={"wandb": {"name": run_name}},
            )
            self._trackers = True
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ resume

    def _resume(self, checkpoint: ckpt.Checkpoint) -> None:
        """Restore Accelerate's state (optimizer, schedule, RNG) and the run's position; the
        weights were loaded by :meth:`_setup_model`.  The checkpoint may come from another number
        of processes: the position counts global batches."""
        state = checkpoint.state()
        try:
            self.accelerator.load_state(str(checkpoint.path))
        except Exception as exc:  # noqa: BLE001 - a file find_resume could not fault (a damaged middle)
            raise ckpt.refuse_resume(
                checkpoint, _reading_failed(checkpoint.path, exc), self._weights_name
            ) from None
        realign_schedule(self.scheduler, self.recipe.optimizer.lr)
        self.step = int(state["step"])
        self.batches_consumed = int(state["batches_consumed"])
        self._elapsed_before = float(state.get("elapsed_seconds", 0.0))
        self.resumed_from = checkpoint
        self.last_checkpoint = checkpoint.path
        self._judge = LossJudge(state.get("loss_reference", ()))
        self._awaiting = checkpoint  # the first step judges the weights it resumed

    def _check_resume_compatible(self, checkpoint: ckpt.Checkpoint, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose tensors cannot fit; warn about every other changed setting."""
        recipe_file = checkpoint.path / ckpt.RECIPE_FILE
        old = OmegaConf.to_container(OmegaConf.load(recipe_file)) if recipe_file.is_file() else {}
        new = OmegaConf.to_container(self.recipe)
        for key in _INCOMPATIBLE_ON_RESUME:
            if key == "lora.target_modules" and new["train"]["mode"] != "lora":
                continue
            before, now = _nested_get(old, key), _nested_get(new, key)
            if old and before != now:
                raise FlowtuneError(
                    f"cannot resume from {checkpoint.path}: it was trained with {key}={json.dumps(before)} "
                    f"and the recipe has {json.dumps(now)}; restore it, or start a new run in another "
                    "train.output_dir"
                )
        if bool(state.get("sharded", False)) != self.sharded:
            saved, now = ("FSDP", "DDP") if state.get("sharded") else ("DDP", "FSDP")
            raise FlowtuneError(
                f"cannot resume from {checkpoint.path}: its optimizer state was saved by a {saved} run and this "
                f"run uses {now} (train.distributed and the kind of device must match the checkpoint's; "
                "the number of processes may change)"
            )
        old_flat, new_flat = _flatten(old), _flatten(new)
        changed = [
            f"{key}: {json.dumps(old_flat.get(key))} -> {json.dumps(value)}"
            for key, value in new_flat.items()
            if old_flat
            and old_flat.get(key) != value
            and not any(key == free or key.startswith(free + ".") for free in _FREE_ON_RESUME)
        ]
        if changed:
            self._warnings.append("resuming with changed settings: " + "; ".join(changed))
        if state.get("samples_per_step") != self.samples_per_step:
            self._warnings.append(
                f"the global batch changed ({state.get('samples_per_step')} -> {self.samples_per_step} samples "
                "per step): the sample order will differ from an uninterrupted run"
            )
        if state.get("data_fingerprint") != self.data_fingerprint:
            self._warnings.append(
                f"the training items changed since the checkpoint ({state.get('data_items')} -> "
                f"{len(self.dataset)} items): the sample order will differ from an uninterrupted run"
            )

    # ------------------------------------------------------------------ the loop

    def batches(self) -> Iterator[dict[str, Any]]:
        """This process's micro-batches from the current position on, across epochs."""
        from torch.utils.data import DataLoader

        workers = self.recipe.data.num_workers
        while True:
            self.sampler.set_position(self.batches_consumed)
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                collate_fn=self.collate,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                # Its own generator: each new iterator draws a base seed from it, which would
                # otherwise come from torch's global RNG (that the LoRA dropout uses) at a point
                # that differs between an uninterrupted and a resumed run.
                generator=torch.Generator().manual_seed(self.recipe.train.seed),
            )
            for batch in loader:
                self.batches_consumed += 1
                yield batch

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.batches_consumed // max(1, self.sampler.batches_per_epoch)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {
            k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()
        }

    def train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step (``train.gradient_accumulation`` micro-batches) at ``self.step``.

        Returns:
            The step's loss on this process (mean over its samples, a 0-d device tensor, not
            synced) and the gradient norm before clipping (0-d device tensor).
        """
        r = self.recipe
        acc = self.accelerator
        rounds = r.train.gradient_accumulation
        b = r.train.batch_size
        per_round = b * acc.num_processes
        first = acc.process_index * b
        total = torch.zeros((), device=self.device)
        for a in range(rounds):
            batch = self._to_device(next(batches))
            generators = sample_generators(
                r.train.seed, self.step, range(a * per_round + first, a * per_round + first + b)
            )
            sync = a == rounds - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                _, loss, _, _ = self.flow.step(
                    self.model,
                    batch,
                    device=self.device,
                    dtype=self.dtype,
                    global_step=self.step,
                    collect_metrics=False,
                    check_loss=False,
                    generator=generators,
                )
                acc.backward(loss / rounds)
            total += loss.detach().float()
        max_norm = r.train.max_grad_norm if r.train.max_grad_norm > 0 else math.inf
        grad_norm = acc.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / rounds, torch.as_tensor(grad_norm, device=self.device).detach().float()

    def _current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self) -> TrainResult:
        """Train from ``self.step`` to ``train.max_steps``, checkpointing and logging on the way.

        Raises:
            TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
            NonFiniteLossError: a NaN/inf loss or gradient norm; nothing was saved after it.
        """
        r = self.recipe
        start_step = self.step
        started = self._started_at = time.time()
        self._print_banner()
        batches = self.batches()
        stop_at = r.train.max_steps
        self._interval_start = (time.perf_counter(), self.step)
        with self.stop, TrainDisplay(self.display_console, stop_at, self.step) as display:
            self.stop.console = display if self.is_main else None
            self._display = display
            while self.step < stop_at:
                step_start = time.perf_counter()
                lr = self._current_lr()
                loss, grad_norm = self.train_step(batches)
                self.step += 1
                self._pending.append((self.step, loss, grad_norm, lr))
                seconds = time.perf_counter() - step_start
                display.advance(self.step, seconds, self.samples_per_step / max(seconds, 1e-9))
                last = self.step == stop_at
                if self.step % r.train.log_every == 0 or last:
                    self._flush_metrics()
                if self.step % r.train.checkpoint_every == 0 or last:
                    self.save()
                # After the checkpoint: a failure while validating never loses the step.
                if self.validator.due(self.step, last):
                    self.validate()
                if self._stop_requested() and not last:
                    self._stop_for_signal()
        self._flush_metrics()
        if self.last_checkpoint is None or ckpt.read_state(self.last_checkpoint)["step"] != self.step:
            self.save()
        final = self._publish_final()
        seconds = time.time() - started
        self._print_summary(start_step, seconds, final)
        return TrainResult(self.output_dir, final, self.last_checkpoint, start_step, self.step, seconds)

    def validate(self) -> dict[str, Any]:
        """Validation images and loss of the current weights (:class:`Validator`), logged to
        ``metrics.jsonl`` (``{"step", "val_loss", "time"}``), the console and the trackers.  Its
        time is left out of the next interval's samples/s."""
        started = time.perf_counter()
        result = self.validator.run(self.flow, self.model, self.step, self.device)
        if "val_loss" in result:
            record = {"step": self.step, "val_loss": result["val_loss"], "time": time.time()}
            if self.is_main:
                self._metrics.write(record)
            if self._trackers:
                self.accelerator.log({"val_loss": result["val_loss"]}, step=self.step)
        if self.is_main:
            parts = [f"val_loss {result['val_loss']:.4f}"] if "val_loss" in result else []
            if "samples" in result:
                parts.append(f"samples in {result['samples']}")
            if parts:
                self._display.print(f"step {self.step:>6}  validation: {'  '.join(parts)}", highlight=False)
            if "warning" in result:
                self._display.print(warning_text(result["warning"]))
        spent = time.perf_counter() - started
        self._interval_start = (self._interval_start[0] + spent, self._interval_start[1])
        return result

    def _stop_requested(self) -> bool:
        signum = self.stop.signum or 0
        if self.accelerator.num_processes > 1:
            # Every process must stop at the same step (a signal may reach only some of them).
            flag = torch.tensor([signum], device=self.device)
            signum = int(self.accelerator.reduce(flag, "max").item())
            if signum:
                self.stop.request(signum)
        return bool(signum)

    def _stop_for_signal(self) -> None:
        self._flush_metrics()
        path = self.save()
        signum = int(self.stop.signum)
        name = "SIGINT" if signum == 2 else "SIGTERM" if signum == 15 else f"signal {signum}"
        raise TrainingInterrupted(
            signum,
            self.step,
            path,
            f"{name}: stopped after step {self.step} of {self.recipe.train.max_steps}; checkpoint saved to "
            f"{path}. Resume with: flowtune train RECIPE train.resume=latest (same output_dir)",
        )

    # ------------------------------------------------------------------ metrics

    def _check_pending(self) -> None:
        """Read back the per-step losses and gradient norms not synced yet, and check them.

        Each loss is judged (:class:`LossJudge`); the loss of step ``s + 1`` judges the checkpoint
        of step ``s``, which is marked bad when it is not normal (:mod:`flowtune.train.health`).

        Raises:
            NonFiniteLossError: one of them is NaN or infinite.
        """
        fresh = [i for i, p in enumerate(self._pending) if isinstance(p[1], torch.Tensor)]
        if not fresh:
            return
        losses = torch.stack([self._pending[i][1] for i in fresh])
        if self.accelerator.num_processes > 1:
            losses = self.accelerator.reduce(losses, "mean")
        norms = torch.stack([self._pending[i][2] for i in fresh])
        for i, value, norm in zip(fresh, losses.tolist(), norms.tolist(), strict=True):
            step, _, _, lr = self._pending[i]
            self._pending[i] = (step, value, norm, lr)
        check_norms = self.recipe.train.mixed_precision != "fp16"  # fp16 skips inf steps by design
        for i in fresh:
            step, value, norm, _ = self._pending[i]
            verdict = self._judge.judge(value)
            if verdict is None and check_norms and not math.isfinite(norm):
                verdict = f"gradient norm {norm}"
            self._last_verdict = (step, verdict)
            finite = math.isfinite(value) and (math.isfinite(norm) or not check_norms)
            awaiting = self._awaiting
            if awaiting is not None and step == awaiting.step + 1:
                self._awaiting = None
                if verdict is not None:
                    reason = f"step {step}, run with its weights: {verdict}"
                    self._mark_bad(awaiting, reason, step, announce=finite)
            if finite:
                continue
            what = f"loss {value}" if not math.isfinite(value) else f"gradient norm {norm}"
            self._diverged(f"{what} at step {step}", step)

    def _mark_bad(
        self, checkpoint: ckpt.Checkpoint, reason: str, judged_by_step: int, announce: bool = True
    ) -> None:
        """Mark a checkpoint of this run bad in its ``trainer_state.json`` (main process) and,
        when the run goes on (``announce``), say so."""
        self._judged_bad[checkpoint.step] = reason
        if not self.is_main:
            return
        ckpt.mark_bad(checkpoint.path, reason, judged_by_step)
        display = getattr(self, "_display", None)
        if announce and display is not None:
            display.print(
                warning_text(
                    f"checkpoint {checkpoint.path.name} marked bad, train.resume=latest will skip it: {reason}"
                )
            )

    def _diverged(self, what: str, step: int) -> None:
        """Stop the run: raise the divergence message naming the last good checkpoint (or saying
        plainly that none qualifies).

        Raises:
            NonFiniteLossError: always.
        """
        resumed = self.resumed_from.step if self.resumed_from is not None else -1
        trajectory = {c.path for c in self._saved}
        earlier = [
            c
            for c in ckpt.list_checkpoints(self.output_dir)
            if c.step < step and (c.step <= resumed or c.path in trajectory)
        ]
        good = next(
            (c for c in reversed(earlier) if c.step not in self._judged_bad and ckpt.is_good(c.state())),
            None,
        )
        fix = "Lower optimizer.lr, raise lr_scheduler.warmup_steps or use train.max_grad_norm"
        if good is not None:
            where = f"the last good checkpoint is {good.path}"
            then = f"then resume from it with train.resume=latest (it skips checkpoints marked bad) or train.resume={good.path}"
        else:
            bad = [c for c in earlier if c.step in self._judged_bad or not ckpt.is_good(c.state())]
            judged = "; ".join(
                f"{c.path.name}: {self._judged_bad.get(c.step) or ckpt.bad_reason(c.state())}"
                for c in bad[-2:]
            )
            where = "no checkpoint qualifies as good" + (
                f" ({judged})" if judged else " (none was saved yet)"
            )
            then = "then start over with train.overwrite=true"
        raise NonFiniteLossError(
            f"training diverged: {what}; stopped at step {self.step} without saving ({where}). {fix}, {then}"
        )

    def _check_weights_finite(self) -> None:
        """Refuse to save trainable weights holding a NaN or infinity (every process checks its
        own weights or shards; the count is summed across processes).

        Raises:
            NonFiniteLossError: some weight is not finite.
        """
        local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in self.params]
        bad = torch.stack([(~torch.isfinite(t)).sum() for t in local]).sum().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item():
            self._diverged(
                f"{int(bad.item())} trainable weights became NaN or infinite at step {self.step}",
                self.step + 1,
            )

    def _flush_metrics(self) -> None:
        """Check the pending per-step values and log them as one record (and show them)."""
        if not self._pending:
            return
        self._check_pending()
        pending, self._pending = self._pending, []
        loss_values = [p[1] for p in pending]
        norm_values = [p[2] for p in pending]
        now_perf = time.perf_counter()
        interval_seconds = now_perf - self._interval_start[0]
        interval_steps = self.step - self._interval_start[1]
        self._interval_start = (now_perf, self.step)
        peak = peak_memory_bytes(self.device)
        record = {
            "step": self.step,
            "loss": sum(loss_values) / len(loss_values),
            "lr": pending[-1][3],
            "grad_norm": sum(norm_values) / len(norm_values),
            "time": time.time(),
            "samples_per_s": interval_steps * self.samples_per_step / max(interval_seconds, 1e-9),
            "peak_mem_bytes": peak,
            "epoch": self.epoch,
        }
        self._display.record(loss_values, record["lr"], peak)
        if self.is_main:
            self._metrics.write(record)
            self._display.log_line(record)
        if self._trackers:
            scalars = {k: v for k, v in record.items() if k not in ("step", "time")}
            self.accelerator.log(scalars, step=self.step)

    # ------------------------------------------------------------------ saving

    def _trainer_state(self) -> dict[str, Any]:
        r = self.recipe
        step, own = self._last_verdict
        verdict = f"step {step}, its own loss: {own}" if step == self.step and own is not None else None
        return {
            "step": self.step,
            "batches_consumed": self.batches_consumed,
            "epoch": self.epoch,
            "samples_per_step": self.samples_per_step,
            "batch_size": r.train.batch_size,
            "num_processes": self.accelerator.num_processes,
            "sharded": self.sharded,
            "gradient_accumulation": r.train.gradient_accumulation,
            "seed": r.train.seed,
            "mode": r.train.mode,
            "family": r.model.family,
            "data_items": len(self.dataset),
            "data_fingerprint": self.data_fingerprint,
            "elapsed_seconds": self._elapsed_before + (time.time() - self._started_at),
            # flowtune.train.health: the losses later steps are judged against, and this
            # checkpoint's verdict so far (its weights are finite; step s's own loss).
            "loss_reference": self._judge.reference,
            ckpt.HEALTH: {"good": verdict is None, "reason": verdict, "judged_by_step": self.step},
            "time": time.time(),
            "flowtune_version": __version__,
        }

    def _gather_weights(self) -> dict[str, torch.Tensor] | None:
        """The trained weights as full tensors when FSDP shards them (a collective: every process
        calls it; the main process writes them), else None (the files are written from the model)."""
        if not self.sharded:
            return None
        if self.recipe.train.mode == "lora":
            return lora_state_dict(self.model)
        return self.accelerator.get_state_dict(self.model)

    def _save_weights(self, directory: Path, state: dict[str, torch.Tensor] | None) -> None:
        if self.recipe.train.mode == "lora":
            save_lora(
                self.model,
                self.family,
                directory,
                state=state,
                metadata={
                    META_BASE_MODEL: self.recipe.model.pretrained,
                    META_STEP: str(self.step),
                    META_VERSION: __version__,
                },
            )
        else:
            save_full(self.model, directory, state=state)

    def save(self) -> Path:
        """Write the checkpoint of the current step (atomically) and apply ``train.keep_last``.

        All processes must call it (Accelerate saves each process's RNG state).  A write the file
        system refuses (full disk, read-only, quota) removes the half-written checkpoint, leaves
        the earlier ones and ``final/`` as they were and raises a one-line :class:`~flowtune.fileio.WriteError`.
        """
        previous = self.last_checkpoint
        with write_errors(
            self.output_dir / ckpt.CHECKPOINTS,
            what="checkpoint",
            needed=(lambda: tree_bytes(previous)) if previous is not None else None,
            needed_as="the last checkpoint took {}",
            then="resume with train.resume=latest",
            remove=ckpt.partial_dir(self.output_dir, self.step),
        ):
            return self._write_checkpoint()

    def _write_checkpoint(self) -> Path:
        acc = self.accelerator
        self._check_pending()  # never save weights that a non-finite step produced
        self._check_weights_finite()  # nor non-finite weights
        target = self.output_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(self.step)
        partial = ckpt.partial_dir(self.output_dir, self.step)
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        weights = self._gather_weights()
        acc.wait_for_everyone()
        if self.is_main:
            self._save_weights(partial, weights)
            (partial / ckpt.RECIPE_FILE).write_text(recipe_to_yaml(self.recipe))
            ckpt.write_state(partial, self._trainer_state())
            ckpt.publish(partial, target)
            keep = [c.path for c in (self._resumed_still_newest(), self._newest_confirmed_good()) if c]
            ckpt.prune(self.output_dir, self.recipe.train.keep_last, keep=keep)
        acc.wait_for_everyone()
        self.last_checkpoint = target
        checkpoint = ckpt.Checkpoint(self.step, target)
        self._saved.append(checkpoint)
        self._awaiting = checkpoint  # judged by the loss of the next step
        if self._last_verdict[0] == self.step and self._last_verdict[1] is not None:
            self._judged_bad[self.step] = f"step {self.step}, its own loss: {self._last_verdict[1]}"
        return target

    def _resumed_still_newest(self) -> ckpt.Checkpoint | None:
        """The checkpoint the run resumed from, while the run has saved none since."""
        if self.resumed_from is not None and self.last_checkpoint == self.resumed_from.path:
            return self.resumed_from
        return None

    def _newest_confirmed_good(self) -> ckpt.Checkpoint | None:
        """The newest checkpoint of this run's trajectory already judged good by the loss of the
        step after it (:mod:`flowtune.train.health`); ``train.keep_last`` never prunes it."""
        candidates = [*([self.resumed_from] if self.resumed_from else []), *self._saved]
        for checkpoint in sorted(candidates, key=lambda c: c.step, reverse=True):
            if checkpoint.step >= self.step or checkpoint.step in self._judged_bad:
                continue
            try:
                if ckpt.is_good(checkpoint.state()):
                    return checkpoint
            except FlowtuneError:  # pruned already
                continue
        return None

    def _publish_final(self) -> Path:
        """``output_dir/final``: the last checkpoint's weights (hard links when possible), recipe and
        trainer state (so that ``final/`` names its step)."""
        final = self.output_dir / ckpt.FINAL
        if self.is_main:
            partial = self.output_dir / f"{ckpt.PARTIAL_PREFIX}{ckpt.FINAL}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            source = self.last_checkpoint
            names = [LORA_WEIGHTS_NAME] if self.recipe.train.mode == "lora" else ["transformer"]
            for name in [*names, ckpt.RECIPE_FILE, ckpt.STATE_FILE]:
                _link_or_copy(source / name, partial / name)
            ckpt.publish(partial, final)
        self.accelerator.wait_for_everyone()
        return final

    # ------------------------------------------------------------------ console

    def _print_banner(self) -> None:
        if not self.is_main:
            return
        r = self.recipe
        acc = self.accelerator
        if r.train.mode == "lora":
            what = f"LoRA rank {r.lora.rank}, alpha {r.lora.alpha}"
        else:
            what = "full fine-tuning"
        start = (
            f"resuming from {self.resumed_from.path} (step {self.step})"
            if self.resumed_from
            else "new run, step 0"
        )
        rows = [
            ("model", f"{r.model.family}: {r.model.pretrained} ({r.model.dtype})"),
            (
                "training",
                f"{what}; {self.trainable_parameters:,} trainable of {self.total_parameters:,} parameters",
            ),
            (
                "data",
                f"{len(self.dataset)} items in {len(set(self.dataset.buckets))} buckets from {r.data.cache_dir}"
                + (f" ({len(self.validation_indices)} held out)" if self.validation_indices else ""),
            ),
            (
                "batch",
                f"{self.samples_per_step} sample{'s' if self.samples_per_step != 1 else ''} per step = "
                f"{r.train.batch_size} x {acc.num_processes} "
                f"process{'es' if acc.num_processes != 1 else ''} x {r.train.gradient_accumulation} accumulation",
            ),
            ("steps", f"{r.train.max_steps} ({self.sampler.batches_per_epoch} batches per epoch); {start}"),
            (
                "precision",
                (
                    f"{r.model.dtype} (no mixed precision)"
                    if r.train.mixed_precision == "no"
                    else f"{r.train.mixed_precision} mixed precision"
                )
                + f" on {self.device}"
                + (", gradient checkpointing" if r.train.gradient_checkpointing else "")
                + (
                    f", block offload ({len(self.offload.blocks)} blocks streamed from the CPU)"
                    if self.offload is not None
                    else ""
                ),
            ),
            ("optimizer", f"{r.optimizer.name}, lr {r.optimizer.lr:g}, {r.lr_scheduler.name}"),
            ("output", f"{self.output_dir} (checkpoints every {r.train.checkpoint_every} steps)"),
        ]
        if self.quantized is not None:
            rows.append(("quantized base", self.quantized.describe()))
        if self.validator.enabled:
            rows.append(("validation", self.validator.describe()))
        self.console.print(key_value_table("flowtune train", rows))
        for warning in self._warnings:
            self.console.print(warning_text(warning))

    def _print_summary(self, start_step: int, seconds: float, final: Path) -> None:
        if not self.is_main:
            return
        records = read_metrics(self.output_dir / ckpt.METRICS_FILE)
        losses = [r["loss"] for r in records if "loss" in r]
        last_loss = f"{losses[-1]:.4f}" if losses else "-"
        val_losses = [r["val_loss"] for r in records if "val_loss" in r]
        trained = self.step - start_step
        steps = f"{trained} this run ({start_step} -> {self.step}) in {format_duration(seconds)}"
        if trained == 0:  # resumed a run that had already reached train.max_steps
            steps += (
                f"; the run was already complete at train.max_steps={self.step}: to train on, resume "
                f"with a higher limit, e.g. train.max_steps={2 * self.step} train.resume=latest"
            )
        weights = final / (LORA_WEIGHTS_NAME if self.recipe.train.mode == "lora" else "transformer")
        rows = [
            ("steps", steps),
            ("last loss", last_loss),
            *([("val_loss", f"{val_losses[-1]:.4f}")] if val_losses else []),
            ("peak memory", format_bytes(peak_memory_bytes(self.device))),
            ("weights", str(weights)),
            ("checkpoint", str(self.last_checkpoint)),
            ("metrics", str(self.output_dir / ckpt.METRICS_FILE)),
        ]
        if self.validator.prompts:
            rows.append(("samples", str(self.output_dir / SAMPLES_DIR)))
        if self._trackers:
            rows.append(("trackers", ", ".join(self.recipe.logging.trackers)))
        self.console.print(key_value_table("training done", rows))

    # ------------------------------------------------------------------ teardown

    def cleanup(self) -> None:
        """Close the metrics file and the trackers; release Accelerate's per-run state (the
        process group stays), so that another run can start in the same process; release the
        output directory's lock."""
        from accelerate.state import AcceleratorState, GradientState

        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._trackers:
            self.accelerator.end_training()
            self._trackers = False
        AcceleratorState._reset_state()
        GradientState._reset_state()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def run(self) -> TrainResult:
        """:meth:`setup`, :meth:`train`, :meth:`cleanup`."""
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()


def _reading_failed(directory: Path, exc: Exception) -> str:
    """``reading DIR failed (first line of the error)``: for a resume that failed while loading."""
    lines = str(exc).strip().splitlines()
    return f"reading {directory} failed ({lines[0] if lines else type(exc).__name__})"


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a file or a directory's files (no extra disk space), or copy where links fail."""
    if source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            _link_or_copy(child, target / child.name)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
