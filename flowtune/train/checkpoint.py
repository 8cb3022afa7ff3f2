"""Checkpoints of a training run on disk: naming, atomic publication, retention, resume lookup.

Layout of a run's output directory (``train.output_dir``)::

    recipe.yaml                      the resolved recipe of the latest start or resume
    metrics.jsonl                    one JSON object per logged step
    checkpoints/step-000250/         a resumable checkpoint (see below)
    checkpoints/.partial-step-.../   a checkpoint being written (never read; removed on start)
    final/                           the trained weights after the last step, with recipe.yaml
                                     and trainer_state.json (not resumable: no optimizer state)

A checkpoint directory holds the trained weights in the form users load elsewhere
(``pytorch_lora_weights.safetensors`` written by the family's diffusers LoRA saver, or
``transformer/`` in diffusers format for full fine-tuning), ``recipe.yaml``, ``trainer_state.json``
(step, data position, seed, batch geometry) and Accelerate's training state
(``optimizer.bin``, ``scheduler.bin``, ``random_states_<rank>.pkl``, and the gradient scaler for
fp16).  It is written under a ``.partial-`` name and renamed into place when complete, so a
process killed mid-save leaves no directory that looks like a checkpoint.
``trainer_state.json`` is the last file written before the rename; a directory without it is
never taken for a checkpoint.

This module is file-system logic only; what goes into a checkpoint is decided by the trainer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowtune.errors import FlowtuneError

CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
PARTIAL_PREFIX = ".partial-"
_NAME = re.compile(r"^step-(\d{6,})$")

# What a new run with train.overwrite=true removes from its output directory: only what a run
# writes, never other files a user keeps there.
RUN_OUTPUTS = (CHECKPOINTS, FINAL, METRICS_FILE, RECIPE_FILE, "samples", "tensorboard")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and the step it was taken after."""

    step: int
    path: Path

    def state(self) -> dict[str, Any]:
        """The checkpoint's ``trainer_state.json``."""
        return read_state(self.path)


def checkpoint_name(step: int) -> str:
    """``step-000250`` for step 250 (six digits, more when needed)."""
    return f"step-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[Checkpoint]:
    """The complete checkpoints of a run, oldest first (partial saves are not listed)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append(Checkpoint(int(match.group(1)), entry))
    return sorted(found, key=lambda c: c.step)


def read_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint directory.

    Raises:
        FlowtuneError: the directory is not a flowtune checkpoint, or its state is unreadable.
    """
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        raise FlowtuneError(
            f"{path} is not a flowtune checkpoint (no {STATE_FILE}); give a directory such as "
            f"OUTPUT/{CHECKPOINTS}/step-000250, or train.resume=latest"
        )
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise FlowtuneError(f"cannot read {state_file}: {exc}") from None


def find_resume(output_dir: Path, resume: str | None) -> Checkpoint | None:
    """The checkpoint ``train.resume`` names: ``None`` (new run), ``latest`` or a directory.

    ``latest`` with no checkpoint yet returns ``None``: the run starts at step 0 (the trainer says
    so), which lets one command both start and continue a pre-emptible job.

    Raises:
        FlowtuneError: a path that does not exist or is not a complete checkpoint.
    """
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise FlowtuneError(f"train.resume: no checkpoint directory at {path}")
    state = read_state(path)
    if not any(path.glob("random_states_*.pkl")):
        raise FlowtuneError(
            f"train.resume: {path} holds trained weights but no training state (optimizer, RNG); "
            f"resume from a directory under {CHECKPOINTS}/, or train.resume=latest"
        )
    return Checkpoint(int(state["step"]), path)


def check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a new run over another run's checkpoints.

    Raises:
        FlowtuneError: ``output_dir`` has checkpoints (or a final result), the recipe does not
            resume, and ``train.overwrite`` is false.
    """
    if resume is not None or overwrite:
        return
    output_dir = Path(output_dir)
    existing = list_checkpoints(output_dir)
    has_final = (output_dir / FINAL).is_dir()
    if existing or has_final:
        what = f"checkpoints up to step {existing[-1].step}" if existing else f"a {FINAL}/ result"
        raise FlowtuneError(
            f"{output_dir} already holds another run ({what}); continue it with train.resume=latest, "
            "start over with train.overwrite=true (deletes that run's outputs), or set train.output_dir "
            "to a new directory"
        )


def clear_run(output_dir: Path) -> list[Path]:
    """Delete the outputs of an earlier run in ``output_dir`` (for ``train.overwrite``).

    Only what flowtune writes (:data:`RUN_OUTPUTS`) is removed.  Returns the removed paths.
    """
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def remove_partial(output_dir: Path) -> None:
    """Remove half-written checkpoints left by a process killed during a save."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)


def partial_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before :func:`publish` renames it."""
    return Path(output_dir) / CHECKPOINTS / f"{PARTIAL_PREFIX}{checkpoint_name(step)}"


def write_state(directory: Path, state: dict[str, Any]) -> None:
    """Write ``trainer_state.json`` (last, as the mark of a complete checkpoint), fsynced."""
    path = Path(directory) / STATE_FILE
    with open(path, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def publish(partial: Path, final: Path) -> Path:
    """Rename a fully written directory into place, replacing an older one of the same name.

    An existing ``final`` (a checkpoint of the same step from an abandoned continuation, or the
    previous ``final/``) is first moved aside, so at every moment one complete version exists.
    """
    final = Path(final)
    _fsync_tree(partial)
    if final.exists():
        old = final.with_name(f"{PARTIAL_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    _fsync_dir(final.parent)
    return final


def prune(output_dir: Path, keep_last: int | None, keep: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (``None`` keeps all).

    Args:
        keep: A checkpoint never deleted (the one the run resumed from, while the run has not yet
            saved a newer one).

    Returns:
        The deleted checkpoint directories.
    """
    if keep_last is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = [c.path for c in checkpoints[: max(0, len(checkpoints) - keep_last)]]
    doomed = [p for p in doomed if keep is None or p.resolve() != Path(keep).resolve()]
    for path in doomed:
        # Rename first so that a kill mid-delete leaves a partial (ignored) name, not a
        # checkpoint with missing files.
        trash = path.with_name(f"{PARTIAL_PREFIX}deleted-{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TrainedWeights:
    """The trained weights of a run, found from a path a user gives (``--ckpt``).

    Attributes:
        path: The directory holding the weights (a checkpoint or ``final/``).
        recipe_file: Its ``recipe.yaml``: the base model, family and LoRA settings it was trained with.
        step: The step the weights are from (None if the directory does not say).
        lora_file: ``pytorch_lora_weights.safetensors`` for LoRA runs, else None.
        transformer_dir: ``transformer/`` (diffusers format) for full fine-tuning runs, else None.
    """

    path: Path
    recipe_file: Path
    step: int | None
    lora_file: Path | None
    transformer_dir: Path | None


def resolve_trained(path: str | Path, lora_name: str) -> TrainedWeights:
    """Find the weights ``path`` names: a checkpoint directory, a run's ``final/``, or a run's
    output directory (its ``final/``, or its newest checkpoint when it has no ``final/`` yet).

    Args:
        path: What the user gave.
        lora_name: The LoRA file name in checkpoints (``pytorch_lora_weights.safetensors``).

    Raises:
        FlowtuneError: nothing there, or a directory without flowtune weights and recipe.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FlowtuneError(f"no checkpoint at {path}")
    if not path.is_dir():
        raise FlowtuneError(
            f"{path} is a file; --ckpt takes a checkpoint directory (OUTPUT/{FINAL} or "
            f"OUTPUT/{CHECKPOINTS}/step-000250) or a run's output directory"
        )

    def has_weights(directory: Path) -> bool:
        return (directory / lora_name).is_file() or (directory / "transformer").is_dir()

    if not has_weights(path):  # a run's output directory
        if has_weights(path / FINAL):
            path = path / FINAL
        elif checkpoints := list_checkpoints(path):
            path = checkpoints[-1].path
    recipe_file = path / RECIPE_FILE
    lora_file = path / lora_name
    transformer_dir = path / "transformer"
    if not recipe_file.is_file() or not has_weights(path):
        raise FlowtuneError(
            f"{path} is not a flowtune checkpoint (it needs {RECIPE_FILE} and {lora_name} or "
            f"transformer/); give OUTPUT/{FINAL}, OUTPUT/{CHECKPOINTS}/step-000250 or a run's output directory"
        )
    step = None
    if (path / STATE_FILE).is_file():
        step = int(read_state(path).get("step", 0))
    return TrainedWeights(
        path=path,
        recipe_file=recipe_file,
        step=step,
        lora_file=lora_file if lora_file.is_file() else None,
        transformer_dir=transformer_dir if transformer_dir.is_dir() and not lora_file.is_file() else None,
    )
