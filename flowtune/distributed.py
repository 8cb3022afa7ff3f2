"""Multi-process runs: which process this is, and starting N of them through Accelerate's launcher.

flowtune never spawns its own workers.  ``flowtune train RECIPE --num-processes N`` (and the same
for ``preprocess``) runs ``python -m accelerate.commands.launch --multi_gpu --num_processes N -m
flowtune train RECIPE ...``: exactly what a user would type, so one-node convenience and
``accelerate launch`` / ``torchrun`` / SLURM runs share one code path.  Inside a launched process
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) says who it is, before any
process group exists, which is what the CLI needs to print only once and to tag failures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from flowtune.errors import FlowtuneError

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process from the launcher's environment; ``(0, 1)`` when it
    was not started by torchrun / ``accelerate launch``."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def is_main_process() -> bool:
    """Whether this is rank 0 (the only process that prints results and writes run files)."""
    return world()[0] == 0


def rank_tag() -> str:
    """``" (rank R of N)"`` in a multi-process run, ``""`` otherwise: appended to error messages so
    that a failure on one process says which one."""
    rank, size = world()
    return f" (rank {rank} of {size})" if size > 1 else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(command: str, args: list[str], num_processes: int) -> list[str]:
    """The ``accelerate launch`` command line that runs ``flowtune COMMAND ARGS`` on
    ``num_processes`` processes of this machine (one per GPU; gloo processes on a CPU-only host),
    run through :func:`accelerate_launch`.

    Raises:
        FlowtuneError: ``num_processes`` < 1, or more processes than this machine has GPUs.
    """
    import torch

    if num_processes < 1:
        raise FlowtuneError(f"--num-processes must be 1 or more, got {num_processes}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and num_processes > gpus:
        raise FlowtuneError(
            f"--num-processes {num_processes} but this machine has {gpus} GPU{'s' if gpus != 1 else ''}: "
            "use one process per GPU (several nodes: see docs/distributed.md)"
        )
    return [
        sys.executable,
        "-m",
        "flowtune.distributed",  # accelerate launch, reporting failed processes without a traceback
        # --multi_gpu is accelerate's torchrun launcher; without GPUs it starts gloo CPU processes.
        *(["--multi_gpu"] if num_processes > 1 else []),
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        # The recipe decides precision and compilation; these only silence the launcher's notes.
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "flowtune",
        command,
        *args,
    ]


def relaunch(command: str, args: list[str], num_processes: int) -> int:
    """Run ``flowtune COMMAND ARGS`` on ``num_processes`` local processes through Accelerate's
    launcher and wait; returns its exit status (non-zero if any process failed).

    Raises:
        FlowtuneError: already inside a launched multi-process run (launch from a plain shell).
    """
    if world()[1] > 1:
        raise FlowtuneError(
            "--num-processes inside a process that accelerate launch / torchrun started: leave it out "
            "(the launcher already set the number of processes)"
        )
    process = subprocess.Popen(launch_command(command, args, num_processes))
    # A scheduler's SIGTERM to this process goes on to the launcher, which passes it to every
    # process (they checkpoint and exit).  Ctrl-C reaches them from the terminal by itself.
    forward = threading.current_thread() is threading.main_thread()
    previous = (
        signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM)) if forward else None
    )
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue  # wait for them to save their checkpoint
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


def avoid_cudnn_attention() -> None:
    """Turn off PyTorch's cuDNN backend of ``scaled_dot_product_attention`` on CUDA; flash and
    memory-efficient attention serve instead.

    Its backward failed on an H200 (torch 2.11, cuDNN 9.x) at FLUX.1-dev's 24 heads x 4656
    tokens with "Expected mha_graph.execute(...).is_good() to be true" (scripts/bench_memory.py;
    pytorch/pytorch#190321 and #134001 report the same defect and this workaround), a crash
    after a model has loaded that no recipe setting explains.
    """
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def has_accelerator() -> bool:
    """Whether torch sees a CUDA, XPU or MPS device (without one, Accelerate must be told
    ``cpu=True`` so that launched processes form a gloo group instead of running alone)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return (
        torch.cuda.is_available()
        or bool(xpu is not None and xpu.is_available())
        or bool(mps is not None and mps.is_available())
    )


class Processes:
    """The processes of a launched run as one work group (Accelerate's ``PartialState``), or this
    process alone when nothing launched several; used by preprocess to share out its work.

    Attributes:
        index: This process's rank.
        count: The number of processes.
        is_main: Whether this is rank 0.
    """

    def __init__(self) -> None:
        self.index, self.count = world()
        self._state = None
        if self.count > 1:
            from accelerate import PartialState

            self._state = PartialState(cpu=not has_accelerator())
            self.index, self.count = self._state.process_index, self._state.num_processes
        self.is_main = self.index == 0

    @property
    def device(self) -> Any:
        """This process's device in a launched run (its GPU), None when alone (caller decides)."""
        return self._state.device if self._state is not None else None

    def share(self, work: Sequence[T]) -> list[T]:
        """This process's part of ``work``: every ``count``-th element from ``index`` on."""
        return list(work[self.index :: self.count])

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main process first, then on the others (e.g. a download)."""
        if self._state is None:
            yield
        else:
            with self._state.main_process_first():
                yield

    def wait(self) -> None:
        """Barrier: return once every process got here."""
        if self._state is not None:
            self._state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """``value`` of every process, in rank order (``[value]`` when alone)."""
        if self._state is None:
            return [value]
        from accelerate.utils import gather_object

        return list(gather_object([value]))


def shutdown() -> None:
    """Leave the process group, if this process joined one.  Called once as a command ends: a
    gloo or NCCL group still alive at interpreter exit can abort the process ("terminate called
    without an active exception") after all its work was done.  Imports nothing: a command that
    never imported torch.distributed has no group to leave (and ``--help`` stays fast)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _failure_status(failures: Any) -> int:
    """The exit status of a multi-process run that failed: that of the first process that exited
    with a status (2 for a user error, 1 for a diverged loss, as on one process), else 128 + the
    signal that ended the first one; 1 if none says."""
    ordered = sorted(failures, key=lambda failure: failure.timestamp)
    for failure in ordered:
        if failure.exitcode > 0:
            return int(failure.exitcode)
    return 128 - int(ordered[0].exitcode) if ordered and ordered[0].exitcode < 0 else 1


def accelerate_launch(argv: list[str]) -> int:
    """``accelerate launch ARGV`` (Accelerate's own parser and launcher); returns the exit status.

    When processes fail, each has already printed its message tagged with its rank; the launcher's
    own traceback would only bury them, so its summary (which rank exited with which status) is
    printed instead, and the run exits with the first failed process's status.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr)
        return _failure_status(exc.failures.values())
    except subprocess.CalledProcessError as exc:  # one process (accelerate's simple launcher)
        return int(exc.returncode) or 1
    except SignalException as exc:  # SIGINT/SIGTERM: passed to the processes, which saved and exited
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(accelerate_launch(sys.argv[1:]))
