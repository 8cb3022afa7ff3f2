"""The training console: a start banner, a live progress line, log lines and a final summary.

Only the main process shows anything.  On a terminal the progress bar redraws in place (step/total,
smoothed loss, learning rate, s/it, samples/s, peak memory, ETA) with one log line printed above it
every ``train.log_every`` steps; when the output is a file or a pipe (CI, SLURM logs) only the log
lines are written, so logs stay readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.text import Text

from flowtune.console import format_bytes, text_column


class TrainDisplay:
    """The live part of the console during training (a context manager).

    Args:
        console: Where to draw; ``None`` = show nothing (non-main processes).
        total_steps: ``train.max_steps``.
        start_step: The step the run starts or resumes at.
        smoothing: Weight of the newest loss in the displayed exponential moving average.
    """

    def __init__(self, console: Console | None, total_steps: int, start_step: int, smoothing: float = 0.1):
        self.console = console
        self.smoothing = smoothing
        self.smoothed_loss: float | None = None
        self._fields: dict[str, str] = {"loss": "-", "lr": "-", "speed": "-", "mem": "-"}
        self._progress: Progress | None = None
        if console is not None and console.is_terminal:
            self._progress = Progress(
                text_column("train", style="bold"),
                BarColumn(),
                MofNCompleteColumn(),
                text_column("loss {task.fields[loss]}"),
                text_column("lr {task.fields[lr]}"),
                text_column("{task.fields[speed]}"),
                text_column("mem {task.fields[mem]}"),
                text_column("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, **self._fields
            )

    def __enter__(self) -> TrainDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, step: int, seconds_per_step: float, samples_per_s: float) -> None:
        """Move the bar to ``step`` and show the latest speed (no device sync involved)."""
        if self._progress is None:
            return
        self._fields["speed"] = f"{seconds_per_step:.2f} s/it {samples_per_s:.1f} samples/s"
        self._progress.update(self._task, completed=step, **self._fields)

    def record(self, losses: Sequence[float], lr: float, peak_mem: int | None) -> None:
        """Fold newly synced per-step losses into the smoothed loss; show lr and memory."""
        for value in losses:
            if self.smoothed_loss is None:
                self.smoothed_loss = value
            else:
                self.smoothed_loss += self.smoothing * (value - self.smoothed_loss)
        if self.smoothed_loss is not None:
            self._fields["loss"] = f"{self.smoothed_loss:.4f}"
        self._fields["lr"] = f"{lr:.2e}"
        self._fields["mem"] = format_bytes(peak_mem)
        if self._progress is not None:
            self._progress.update(self._task, **self._fields)

    def log_line(self, record: dict[str, Any]) -> None:
        """Print one metrics record above the bar."""
        if self.console is None:
            return
        grad = record.get("grad_norm")
        self.console.print(
            Text(
                f"step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad {grad if grad is None else f'{grad:.3f}'}  {record['samples_per_s']:.1f} samples/s  "
                f"mem {format_bytes(record['peak_mem_bytes'])}"
            ),
            highlight=False,
        )

    def print(self, message: str | Text, **kwargs: Any) -> None:
        """Print a message above the bar: a string as it is (never read as markup), or a styled
        :class:`rich.text.Text`."""
        if self.console is not None:
            self.console.print(Text(message) if isinstance(message, str) else message, **kwargs)
