"""The console report of a run: the start banner and the end summary.

A part of :class:`flowtune.train.trainer.Trainer` (its attributes are the trainer's)."""

from __future__ import annotations

from pathlib import Path

from flowtune.console import format_bytes, format_duration, key_value_table, warning_text
from flowtune.train import checkpoint as ckpt
from flowtune.train.metrics import peak_memory_bytes, read_metrics
from flowtune.train.validation import SAMPLES_DIR


class RunReport:
    """The console report of a run: the start banner and the end summary. (mixed into :class:`~flowtune.train.trainer.Trainer`)."""

    def _print_banner(self) -> None:
        if not self.is_main:
            return
        r = self.recipe
        acc = self.accelerator
        what = self.weights.describe()
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
                )
                + (", activation offload to CPU memory" if r.train.activation_offload else ""),
            ),
            ("optimizer", f"{r.optimizer.name}, lr {r.optimizer.lr:g}, {r.lr_scheduler.name}"),
            ("output", f"{self.output_dir} (checkpoints every {r.train.checkpoint_every} steps)"),
        ]
        if self.quantized is not None:
            rows.append(("quantized base", self.quantized.describe()))
        if self.memory is not None:
            rows.append(("planned memory", self.memory.banner()))
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
        weights = final / self.weights.name
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
