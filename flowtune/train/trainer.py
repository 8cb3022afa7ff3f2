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
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console

from flowtune import runlock
from flowtune.console import make_console, warning_text
from flowtune.data.loader import (
    BucketBatchSampler,
    CacheCollator,
    CachedDataset,
    repeated_items_warning,
    split_validation,
)
from flowtune.data.preprocess import check_cache
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.fileio import tree_bytes, write_errors
from flowtune.memory.quantize import exclude_quantized_from_ddp
from flowtune.model_files import resolve_pretrained
from flowtune.recipe import recipe_to_yaml
from flowtune.train import checkpoint as ckpt
from flowtune.train.accelerator_setup import AcceleratorSetup
from flowtune.train.activation_offload import ActivationOffload
from flowtune.train.checkpoint_writer import CheckpointWriter
from flowtune.train.display import TrainDisplay
from flowtune.train.divergence import DivergenceGuard
from flowtune.train.experts import ExpertFlows, expert_model, recipe_experts
from flowtune.train.health import LossJudge
from flowtune.train.memory_check import MemoryCheck, check_memory
from flowtune.train.metrics import MetricsLog, tracker_config
from flowtune.train.metrics_log import MetricsReport
from flowtune.train.model import load_transformer
from flowtune.train.noise import sample_generators
from flowtune.train.offload import check_block_offload, offload_blocks, quantized_host_blocks
from flowtune.train.optim import build_optimizer, build_scheduler
from flowtune.train.out_of_memory import run_out_of_memory
from flowtune.train.report import RunReport
from flowtune.train.resume_policy import ResumePolicy
from flowtune.train.signals import SignalStop, StopRequest
from flowtune.train.validation import Validator
from flowtune.train.weights import trained_weights

# Recipe keys whose change makes a checkpoint unusable (the trained tensors would not fit).
# Keys that may change freely between a checkpoint and its resumption.


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


class Trainer(
    AcceleratorSetup, ResumePolicy, DivergenceGuard, CheckpointWriter, MetricsReport, RunReport, SignalStop
):
    """A LoRA (or full) fine-tuning run of a flow-matching transformer, driven by a recipe.

    Use :meth:`run`, or :meth:`setup`, :meth:`train` and :meth:`cleanup` separately (tests and
    benchmarks call :meth:`train_step` directly).  The parts beside the loop live in their own
    modules: the Accelerator (``accelerator_setup``), output lock and resume (``resume_policy``),
    divergence checks (``divergence``), checkpoint writing (``checkpoint_writer``), metrics
    (``metrics_log``), banner and summary (``report``), signal stops (``signals``).

    Args:
        recipe: A validated recipe (:func:`flowtune.recipe.load_recipe`).
        console: Where the main process prints; ``None`` = a new stdout console.
    """

    def __init__(self, recipe: Any, console: Console | None = None, gpu_memory: float | None = None):
        self.recipe = recipe
        self.gpu_memory = gpu_memory  # flowtune train --gpu-memory (GiB): plan against it
        self.memory: MemoryCheck | None = None
        self.family = get_family(recipe.model.family)
        self.weights = trained_weights(recipe, self.family)  # what train.mode trains
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

        if self.is_main:  # the plan's figure, and a warning before any weight loads
            self.memory = check_memory(r, self.family, self.device, self.gpu_memory, acc.num_processes)
            warning = self.memory.warning() if self.memory is not None else None
            if warning is not None:
                self.console.print(warning_text(warning))
        self._setup_data()
        if resume is not None:
            self._check_resume_compatible(resume, resume.state())
        self._setup_model(resume)
        # model.expert (flowtune.train.experts): sigma sampled within each expert's range.
        self.flows = ExpertFlows(
            self.family.adapter,
            OmegaConf.to_container(r.model.adapter),
            OmegaConf.to_container(r.flow),
            self.experts,
            r.train.seed,
        )
        self.expert_flows, self.flow = self.flows.by_expert, self.flows.default
        self.validator = Validator(
            r, self.family, self.store, self.validation_indices, self.accelerator, self.output_dir
        )
        if resume is not None:
            self._resume(resume)
        self._setup_outputs(resume)

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
        self.experts = recipe_experts(r, self.family)
        subfolders = [e.component for e in self.experts] or ["transformer"]
        model_dir = resolve_pretrained(r.model.pretrained, r.model.revision, subfolders, family=self.family)
        # Seeds Python, numpy and torch (LoRA initialisation, LoRA dropout) identically on every
        # process; the flow-matching draws use their own per-sample generators.
        set_seed(r.train.seed)
        host = quantized_host_blocks(self.family, model_dir, r.model.quantize, r.train.block_offload)
        m = r.model
        loaded = [
            load_transformer(
                self.family, model_dir, self.dtype, m.variant, m.quantize, self.device, host, sub
            )
            for sub in subfolders
        ]
        self.quantized = getattr(loaded[0], "flowtune_quantized", None)
        transformer = expert_model(loaded, self.experts)  # model.expert=both: TwoExperts
        params = self.weights.prepare(transformer)
        if resume is not None:
            try:
                self.weights.load(transformer, resume.path)
            except FlowtuneError as exc:
                raise ckpt.refuse_resume(resume, str(exc), self.weights.name) from None
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
        if r.train.activation_offload:  # its hooks run around every forward of the transformer
            ActivationOffload(self.device).install(transformer)
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
                self._batch_keys = batch.get("keys", [])  # named if its step runs out of memory
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
        self.flow = self.flows.for_step(self.step, self.model)
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
        self.flow = self.flows.after_step(self.model)
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

    # ------------------------------------------------------------------ saving

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
        """:meth:`setup`, :meth:`train`, :meth:`cleanup`; running out of GPU memory is one message
        (:class:`~flowtune.train.out_of_memory.TrainingOutOfMemory`)."""
        try:
            self.setup()
            return self.train()
        except torch.OutOfMemoryError as error:
            raise run_out_of_memory(self, error) from None
        finally:
            self.cleanup()
