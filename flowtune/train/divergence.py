"""Divergence checks of a run: per-step losses and gradient norms read back and judged
(:mod:`flowtune.train.health`), checkpoints marked bad, the last good checkpoint named, and the
newest confirmed-good checkpoint kept from pruning.

A part of :class:`flowtune.train.trainer.Trainer` (its attributes are the trainer's)."""

from __future__ import annotations

import math

import torch

from flowtune.console import warning_text
from flowtune.errors import FlowtuneError
from flowtune.train import checkpoint as ckpt


class NonFiniteLossError(FlowtuneError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped without saving."""

    exit_code = 1


class DivergenceGuard:
    """Divergence checks of a run: per-step losses and gradient norms read back and judged (mixed into :class:`~flowtune.train.trainer.Trainer`)."""

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
