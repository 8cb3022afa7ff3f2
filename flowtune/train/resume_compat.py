"""Which setting changes a resumed run refuses and which it warns about: a pure function of the
checkpoint's recipe and state and the new run's recipe and facts (no files, no trainer).

Refused: what changes the trained tensors' shapes or meaning (``model.family``, ``train.mode``,
``lora.rank``, ``lora.target_modules``) and a change between sharded (FSDP2) and unsharded
optimizer state.  Warned about: every other changed setting except those free to change on
resume (``_FREE_ON_RESUME``), a changed global batch and changed training items (both change the
sample order an uninterrupted run would have seen).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_INCOMPATIBLE_ON_RESUME = (
    "model.family",
    "model.expert",
    "train.mode",
    "lora.rank",
    "lora.target_modules",
)


_FREE_ON_RESUME = (
    "train.output_dir",
    "train.max_steps",
    "train.checkpoint_every",
    "train.keep_last",
    "train.log_every",
    "train.resume",
    "train.overwrite",
    "train.distributed",
    "train.batch_size",  # compared as the global batch size instead
    "train.gradient_accumulation",
    "train.activation_offload",  # where saved activations wait for the backward: same results
    "data.num_workers",
    "validation",
    "logging",
)


def _nested_get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "model.adapter":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True)
class RunFacts:
    """What the resuming run is, beyond its recipe.

    Attributes:
        sharded: Its optimizer state is sharded (FSDP2 on several GPUs).
        samples_per_step: Its global batch.
        data_fingerprint: The hash of its training items' keys.
        data_items: How many training items it has.
    """

    sharded: bool
    samples_per_step: int
    data_fingerprint: str
    data_items: int


def resume_verdict(
    old: dict[str, Any], new: dict[str, Any], state: dict[str, Any], now: RunFacts
) -> tuple[str | None, list[str]]:
    """(why the checkpoint cannot be resumed, or None; the warnings about what changed).

    Args:
        old: The checkpoint's recipe as a plain mapping ({} when the checkpoint has none: nothing
            is compared then).
        new: The resuming run's recipe as a plain mapping.
        state: The checkpoint's ``trainer_state.json``.
        now: The resuming run's facts.
    """
    for key in _INCOMPATIBLE_ON_RESUME:
        if key == "lora.target_modules" and new["train"]["mode"] != "lora":
            continue
        before, after = _nested_get(old, key), _nested_get(new, key)
        if old and before != after:
            return (
                f"it was trained with {key}={json.dumps(before)} and the recipe has {json.dumps(after)}; "
                "restore it, or start a new run in another train.output_dir",
                [],
            )
    if bool(state.get("sharded", False)) != now.sharded:
        saved, running = ("FSDP", "DDP") if state.get("sharded") else ("DDP", "FSDP")
        return (
            f"its optimizer state was saved by a {saved} run and this run uses {running} (train.distributed "
            "and the kind of device must match the checkpoint's; the number of processes may change)",
            [],
        )
    warnings = []
    old_flat, new_flat = _flatten(old), _flatten(new)
    changed = [
        f"{key}: {json.dumps(old_flat.get(key))} -> {json.dumps(value)}"
        for key, value in new_flat.items()
        if old_flat
        and old_flat.get(key) != value
        and not any(key == free or key.startswith(free + ".") for free in _FREE_ON_RESUME)
    ]
    if changed:
        warnings.append("resuming with changed settings: " + "; ".join(changed))
    if state.get("samples_per_step") != now.samples_per_step:
        warnings.append(
            f"the global batch changed ({state.get('samples_per_step')} -> {now.samples_per_step} samples "
            "per step): the sample order will differ from an uninterrupted run"
        )
    if state.get("data_fingerprint") != now.data_fingerprint:
        warnings.append(
            f"the training items changed since the checkpoint ({state.get('data_items')} -> "
            f"{now.data_items} items): the sample order will differ from an uninterrupted run"
        )
    return None, warnings
