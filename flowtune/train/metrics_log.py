"""The per-step metrics of a run: the pending losses logged as one record to ``metrics.jsonl``,
the console and the trackers.

A part of :class:`flowtune.train.trainer.Trainer` (its attributes are the trainer's)."""

from __future__ import annotations

import time

from flowtune.train.metrics import peak_memory_bytes


class MetricsReport:
    """The per-step metrics of a run: the pending losses logged as one record to ``metrics.jsonl``, (mixed into :class:`~flowtune.train.trainer.Trainer`)."""

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
