"""What a run records: ``metrics.jsonl``, the trackers, and peak memory.

``metrics.jsonl`` has one JSON object per logged step::

    {"step": 10, "loss": 0.41, "lr": 0.0001, "grad_norm": 0.8, "time": 1763900000.1,
     "samples_per_s": 12.5, "peak_mem_bytes": 123456789, "epoch": 0}

``loss`` and ``grad_norm`` are means over the steps since the previous logged step (with
``train.log_every: 1``, the step's own values); ``loss`` is the flow-matching loss averaged over
the whole global batch (all processes).  ``peak_mem_bytes`` is the accelerator's peak allocated
memory (``torch.cuda.max_memory_allocated``), or on a CPU-only machine the process's peak
resident set size.  A resumed run first drops the lines after its checkpoint's step, so the file
always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory on ``device``, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return int(torch.xpu.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (main process only; line-buffered, crash-safe).

    Args:
        path: The file.
        resume_step: When resuming, lines with ``step`` greater than this are dropped first (they
            came from the part of an earlier run after its last checkpoint).  ``None`` = a new run:
            the file is started afresh.
    """

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line from a killed process
        self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (non-finite floats are written as null: JSON has no NaN)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def tracker_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe flattened to ``{"section.key": scalar}`` for trackers' hyperparameter tables
    (lists and dicts as JSON strings, ``None`` as "null")."""
    flat: dict[str, Any] = {}
    for section, values in recipe.items():
        for key, value in values.items():
            if isinstance(value, bool | int | float | str):
                flat[f"{section}.{key}"] = value
            else:
                flat[f"{section}.{key}"] = json.dumps(value)
    return flat
