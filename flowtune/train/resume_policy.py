"""How a run claims its output directory and resumes: the run lock, the checkpoint to resume
from, which setting changes are refused or warned about, and restoring Accelerate's state.

A part of :class:`flowtune.train.trainer.Trainer` (its attributes are the trainer's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from flowtune import runlock
from flowtune.errors import FlowtuneError
from flowtune.train import checkpoint as ckpt
from flowtune.train.health import LossJudge
from flowtune.train.optim import realign_schedule
from flowtune.train.resume_compat import RunFacts, resume_verdict

T = TypeVar("T")


def _reading_failed(directory: Path, exc: Exception) -> str:
    """``reading DIR failed (first line of the error)``: for a resume that failed while loading."""
    lines = str(exc).strip().splitlines()
    return f"reading {directory} failed ({lines[0] if lines else type(exc).__name__})"


class ResumePolicy:
    """How a run claims its output directory and resumes: the run lock, the checkpoint to resume (mixed into :class:`~flowtune.train.trainer.Trainer`)."""

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
        return ckpt.find_resume(self.output_dir, r.train.resume, self.weights.name, self._warnings)

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

    def _resume(self, checkpoint: ckpt.Checkpoint) -> None:
        """Restore Accelerate's state (optimizer, schedule, RNG) and the run's position; the
        weights were loaded by :meth:`_setup_model`.  The checkpoint may come from another number
        of processes: the position counts global batches."""
        state = checkpoint.state()
        try:
            self.accelerator.load_state(str(checkpoint.path))
        except Exception as exc:  # noqa: BLE001 - a file find_resume could not fault (a damaged middle)
            raise ckpt.refuse_resume(
                checkpoint, _reading_failed(checkpoint.path, exc), self.weights.name
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
        """Refuse a checkpoint whose tensors cannot fit; warn about every other changed setting
        (the policy: :func:`flowtune.train.resume_compat.resume_verdict`)."""
        recipe_file = checkpoint.path / ckpt.RECIPE_FILE
        old = OmegaConf.to_container(OmegaConf.load(recipe_file)) if recipe_file.is_file() else {}
        now = RunFacts(self.sharded, self.samples_per_step, self.data_fingerprint, len(self.dataset))
        refusal, warnings = resume_verdict(old, OmegaConf.to_container(self.recipe), state, now)
        if refusal is not None:
            raise FlowtuneError(f"cannot resume from {checkpoint.path}: {refusal}")
        self._warnings.extend(warnings)
