"""Graceful stops: SIGINT/SIGTERM finish the current step, then the trainer checkpoints and exits.

The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's pre-emption notice, ``kill``) only records the
request; the trainer checks it between optimizer steps, saves a checkpoint and raises
:class:`TrainingInterrupted`, which the CLI turns into exit status 130 (SIGINT) or 143 (SIGTERM).
A SIGINT after the first signal, while the step or the save is still running, interrupts at once
(KeyboardInterrupt), for a user who really wants out; checkpoints are written atomically, so that
never leaves a broken one behind.  A repeated SIGTERM is ignored: a scheduler and a launcher may
both deliver one, and a pre-emption notice must still end with a checkpoint.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from rich.text import Text

from flowtune.errors import FlowtuneError

_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class TrainingInterrupted(FlowtuneError):
    """Training stopped on a signal after saving a checkpoint.

    Attributes:
        signum: The signal received.
        checkpoint: The checkpoint saved on the way out (``None`` if none could be).
        step: The last completed step.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None, message: str):
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + int(signum)


def received_message(signum: int) -> str:
    """What the trainer prints on the first SIGINT or SIGTERM: what happens now, and how to stop
    at once.  A repeated SIGTERM is ignored (a scheduler or launcher may deliver it twice, and the
    checkpoint must still be written); a SIGINT after either stops at once."""
    at_once = "Ctrl-C again to stop at once" if signum == signal.SIGINT else "send SIGINT to stop at once"
    return f"{_NAMES.get(signum, signum)} received: finishing this step, then saving a checkpoint ({at_once})"


class StopRequest:
    """Records SIGINT/SIGTERM while installed (a context manager; main thread only, else inert).

    Attributes:
        signum: The first signal received, or ``None``.

    Args:
        console: Anything with a rich-style ``print`` that announces the first signal, or None.
    """

    def __init__(self, console: Any = None):
        self.signum: int | None = None
        self.console = console
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was requested."""
        return self.signum is not None

    def request(self, signum: int) -> None:
        """Record a stop request as if ``signum`` had been received."""
        if self.signum is None:
            self.signum = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.signum is None
        self.request(signum)
        if first and self.console is not None:
            self.console.print(Text(received_message(signum), style="yellow"))

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in _NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class SignalStop:
    """Stopping a run on a signal at the same step on every process, after a checkpoint (mixed
    into :class:`~flowtune.train.trainer.Trainer`; its attributes are the trainer's)."""

    def _stop_requested(self) -> bool:
        import torch

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
