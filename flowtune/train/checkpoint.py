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

``trainer_state.json`` also says whether the checkpoint is *good* to go back to (``health``, see
:mod:`flowtune.train.health` for the rule): the trainer marks a checkpoint bad when a later loss
shows its weights diverged, and ``train.resume=latest`` then skips it.  Before a resume, every
file the resume reads is checked (:func:`find_resume`): a missing or damaged file is refused in one
line that names it and the next older checkpoint to resume from instead.

This module is file-system logic only; what goes into a checkpoint is decided by the trainer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowtune.errors import FlowtuneError
from flowtune.fileio import replace_dir

CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
PARTIAL_PREFIX = ".partial-"
LOCK_FILE = ".flowtune.lock"  # held by the run that writes the directory (flowtune.runlock)
HEALTH = "health"  # trainer_state.json: {"good": bool, "reason": str | None, "judged_by_step": int | None}
# Accelerate's save_state files (accelerate.utils.constants): optimizer, schedule, RNG per rank.
OPTIMIZER_FILE = "optimizer.bin"
SCHEDULER_FILE = "scheduler.bin"
SCALER_FILE = "scaler.pt"
SHARDED_OPTIMIZER_DIR = "optimizer_0"


def rng_file(rank: int) -> str:
    """``random_states_<rank>.pkl``: the RNG states of one process (Accelerate's ``save_state``)."""
    return f"random_states_{rank}.pkl"


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


def is_good(state: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``trainer_state.json`` leaves it good to resume from (not marked bad;
    a checkpoint without a judgement counts as good)."""
    return bool(state.get(HEALTH, {}).get("good", True))


def bad_reason(state: dict[str, Any]) -> str:
    """Why a checkpoint was marked bad (from its ``trainer_state.json``)."""
    return str(state.get(HEALTH, {}).get("reason") or "marked bad")


def mark_bad(path: Path, reason: str, judged_by_step: int | None) -> None:
    """Record in a checkpoint's ``trainer_state.json`` (rewritten atomically) that it is not good
    to go back to, and why; ``train.resume=latest`` then skips it.  A checkpoint deleted in the
    meantime (``train.keep_last``) is left alone."""
    from flowtune.fileio import atomic_write_json

    try:
        state = read_state(path)
    except FlowtuneError:
        return
    state[HEALTH] = {"good": False, "reason": reason, "judged_by_step": judged_by_step}
    atomic_write_json(Path(path) / STATE_FILE, state)


def find_resume(
    output_dir: Path, resume: str | None, weights: str, warnings: list[str] | None = None
) -> Checkpoint | None:
    """The checkpoint ``train.resume`` names: ``None`` (new run), ``latest`` or a directory,
    checked to hold every file a resume reads (:func:`resume_problem`).

    ``latest`` is the newest checkpoint not marked bad (the ones skipped are listed in
    ``warnings``); with no checkpoint yet it returns ``None``: the run starts at step 0 (the
    trainer says so), which lets one command both start and continue a pre-emptible job.  A
    directory marked bad is resumed when named explicitly, with a warning.

    Args:
        weights: The trained weights' name in a checkpoint: the LoRA file, or ``transformer``.
        warnings: Where to add the warnings for the run's banner.

    Raises:
        FlowtuneError: a path that does not exist or is not a complete checkpoint; a checkpoint
            with a missing or unreadable file (named, with the next older checkpoint suggested);
            ``latest`` when every checkpoint is marked bad.
    """
    notes = warnings if warnings is not None else []
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            return None
        skipped = []
        for checkpoint in reversed(checkpoints):
            state = checkpoint.state()
            if is_good(state):
                break
            skipped.append(f"{checkpoint.path.name} ({bad_reason(state)})")
        else:
            raise FlowtuneError(
                f"train.resume=latest: no checkpoint in {Path(output_dir) / CHECKPOINTS} is good to resume "
                f"from, every one was marked bad ({'; '.join(skipped)}); start over with "
                "train.overwrite=true, or resume one anyway with train.resume=PATH"
            )
        if skipped:
            notes.append(
                f"train.resume=latest: skipped the checkpoints marked bad: {'; '.join(skipped)}; "
                f"resuming from {checkpoint.path.name}"
            )
        _check_resumable(checkpoint, weights)
        return checkpoint
    path = Path(resume)
    if not path.is_dir():
        raise FlowtuneError(f"train.resume: no checkpoint directory at {path}")
    state = read_state(path)
    checkpoint = Checkpoint(int(state["step"]), path)
    _check_resumable(checkpoint, weights)
    if not is_good(state):
        notes.append(f"resuming from {path}, which was marked bad: {bad_reason(state)}")
    return checkpoint


def _check_resumable(checkpoint: Checkpoint, weights: str) -> None:
    """Raise the one-line refusal for a checkpoint that :func:`resume_problem` finds fault with."""
    path = checkpoint.path
    if not any(path.glob("random_states_*.pkl")) and not (path / OPTIMIZER_FILE).exists():
        if not (path / SHARDED_OPTIMIZER_DIR).exists():
            raise FlowtuneError(
                f"train.resume: {path} holds trained weights but no training state (optimizer, RNG); "
                f"resume from a directory under {CHECKPOINTS}/, or train.resume=latest"
            )
    problem = resume_problem(path, weights)
    if problem is not None:
        raise refuse_resume(checkpoint, problem, weights)


def refuse_resume(checkpoint: Checkpoint, problem: str, weights: str) -> FlowtuneError:
    """The one-line refusal of a checkpoint that cannot be resumed: ``cannot resume from PATH:
    PROBLEM; resume from the next older checkpoint with train.resume=OLDER`` (the newest older
    checkpoint of the run that is complete and not marked bad), or how to start over."""
    path = checkpoint.path
    older = [c for c in list_checkpoints(path.parent.parent) if c.step < checkpoint.step]
    if path.parent.name != CHECKPOINTS:
        older = []
    instead = next(
        (c for c in reversed(older) if is_good(c.state()) and resume_problem(c.path, weights) is None), None
    )
    what = (
        f"resume from the next older checkpoint with train.resume={instead.path}"
        if instead is not None
        else "no older checkpoint of this run is complete and good: start over with train.overwrite=true"
    )
    return FlowtuneError(f"cannot resume from {path}: {problem}; {what}")


def resume_problem(path: Path, weights: str) -> str | None:
    """What keeps a checkpoint from being resumed exactly, or None when every file it needs is
    there and readable: the trained weights (``weights``: every safetensors file's header and
    size), Accelerate's ``optimizer.bin`` (or FSDP's ``optimizer_0/``), ``scheduler.bin``, the
    gradient scaler when there is one, and ``random_states_<r>.pkl`` of every process ``r`` of
    the run that wrote it (``num_processes`` in ``trainer_state.json``): without them the resumed
    run would not repeat the uninterrupted one.  Tensor files are read memory-mapped, so the check
    stays cheap for a large optimizer state.
    """
    path = Path(path)
    try:
        state = read_state(path)
    except FlowtuneError as exc:
        return str(exc)
    target = path / weights
    tensor_files = sorted(target.glob("*.safetensors")) if target.is_dir() else [target]
    if not target.exists() or not tensor_files:
        return f"{target} is missing (the trained weights)"
    for file in tensor_files:
        if problem := _unreadable(file, _read_safetensors):
            return problem
        # A LoRA whose scale is folded into its file names the file of its unscaled weights.
        companion = _companion_file(file)
        if companion is not None:
            what = "the unscaled LoRA weights that resume reads"
            if problem := _unreadable(file.parent / companion, _read_safetensors, what):
                return problem
    if state.get("sharded"):
        if not (path / SHARDED_OPTIMIZER_DIR).is_dir():
            return f"{path / SHARDED_OPTIMIZER_DIR} is missing (the sharded optimizer state)"
    elif problem := _unreadable(path / OPTIMIZER_FILE, _read_torch, "the optimizer state"):
        return problem
    if problem := _unreadable(path / SCHEDULER_FILE, _read_torch, "the learning-rate schedule"):
        return problem
    if (path / SCALER_FILE).exists() and (problem := _unreadable(path / SCALER_FILE, _read_torch)):
        return problem
    for rank in range(int(state.get("num_processes", 1))):
        rng = path / rng_file(rank)
        what = f"the RNG state of process {rank}; without it the run would not repeat the uninterrupted one"
        if problem := _unreadable(rng, _read_torch, what):
            return problem
    return None


def weights_problem(file: Path) -> str | None:
    """``FILE is missing`` / ``FILE is unreadable, truncated or damaged (...)`` for a safetensors
    weights file (its header is checked against its size), or None when it reads."""
    return _unreadable(Path(file), _read_safetensors)


def readable_sibling(path: Path, lora_name: str) -> Path | None:
    """The newest other checkpoint of the run that ``path`` (a checkpoint or ``final/``) belongs to
    whose LoRA file reads, to suggest instead of a damaged one; None when there is none."""
    path = Path(path)
    run = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    for checkpoint in reversed(list_checkpoints(run)):
        if (
            checkpoint.path.resolve() != path.resolve()
            and weights_problem(checkpoint.path / lora_name) is None
        ):
            return checkpoint.path
    return None


def _unreadable(file: Path, read: Callable[[Path], object], what: str = "") -> str | None:
    """``FILE is missing (WHAT)`` / ``FILE is unreadable (REASON)``, or None when ``read`` reads it."""
    about = f" ({what})" if what else ""
    if not file.is_file():
        return f"{file} is missing{about}"
    try:
        read(file)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same message
        lines = str(exc).strip().splitlines()
        reason = lines[0].split(". ")[0] if lines else type(exc).__name__
        return f"{file} is unreadable, truncated or damaged ({reason})"
    return None


def _read_safetensors(file: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:  # checks the header against the file size
        handle.keys()


def _companion_file(file: Path) -> str | None:
    """The file a LoRA file's ``flowtune.resume_file`` metadata names, or None."""
    from safetensors import safe_open

    from flowtune.train.model import META_RESUME_FILE

    with safe_open(str(file), framework="pt") as handle:
        return (handle.metadata() or {}).get(META_RESUME_FILE)


def _read_torch(file: Path) -> None:
    from accelerate.utils import load  # what Accelerate's load_state reads these files with

    load(str(file), map_location="cpu", mmap=True)


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
    # The umask's permissions (safetensors writes 0600 files), fsynced; the old version is moved
    # to a .partial- name, which remove_partial() deletes should a kill leave it behind.
    return replace_dir(partial, final, aside=final.with_name(f"{PARTIAL_PREFIX}old-{final.name}"))


def prune(output_dir: Path, keep_last: int | None, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (``None`` keeps all).

    Args:
        keep: Checkpoints never deleted: the one the run resumed from, while the run has not yet
            saved a newer one, and the newest one confirmed good (so that a run whose newer
            checkpoints turn out bad still has one to go back to).

    Returns:
        The deleted checkpoint directories.
    """
    if keep_last is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = [c.path for c in checkpoints[: max(0, len(checkpoints) - keep_last)]]
    kept = {Path(p).resolve() for p in keep}
    doomed = [p for p in doomed if p.resolve() not in kept]
    for path in doomed:
        # Rename first so that a kill mid-delete leaves a partial (ignored) name, not a
        # checkpoint with missing files.
        trash = path.with_name(f"{PARTIAL_PREFIX}deleted-{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


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
