"""Writing a run's checkpoints: the trainer state, the trained weights (gathered under FSDP2),
atomic publication with retention, and ``final/``.

A part of :class:`flowtune.train.trainer.Trainer` (its attributes are the trainer's)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from flowtune import __version__
from flowtune.recipe import recipe_to_yaml
from flowtune.train import checkpoint as ckpt
from flowtune.train.model import META_BASE_MODEL, META_STEP, META_VERSION


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


class CheckpointWriter:
    """Writing a run's checkpoints: the trainer state, the trained weights (gathered under FSDP2), (mixed into :class:`~flowtune.train.trainer.Trainer`)."""

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
        return self.weights.gather(self.model, self.accelerator)

    def _save_weights(self, directory: Path, state: dict[str, torch.Tensor] | None) -> None:
        metadata = {
            META_BASE_MODEL: self.recipe.model.pretrained,
            META_STEP: str(self.step),
            META_VERSION: __version__,
        }
        self.weights.save(self.model, directory, state, metadata)

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

    def _publish_final(self) -> Path:
        """``output_dir/final``: the last checkpoint's weights (hard links when possible), recipe and
        trainer state (so that ``final/`` names its step)."""
        final = self.output_dir / ckpt.FINAL
        if self.is_main:
            partial = self.output_dir / f"{ckpt.PARTIAL_PREFIX}{ckpt.FINAL}"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            source = self.last_checkpoint
            for name in [*self.weights.files, ckpt.RECIPE_FILE, ckpt.STATE_FILE]:
                _link_or_copy(source / name, partial / name)
            ckpt.publish(partial, final)
        self.accelerator.wait_for_everyone()
        return final
