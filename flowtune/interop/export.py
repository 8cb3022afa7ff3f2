"""``flowtune export``: a trained LoRA as a file other tools load, or merged into the transformer.

- :func:`export_lora` writes the checkpoint's LoRA in ``diffusers``, ``comfyui`` or ``kohya``
  layout (:mod:`flowtune.interop.lora`).
- :func:`merge_lora` loads the base transformer, fuses the LoRA into its weights with diffusers'
  own LoRA machinery (``load_lora_adapter`` + ``fuse_lora`` + ``unload_lora``) and saves a plain
  diffusers transformer folder.
- :func:`export` is what the command calls: it checks the options, finds the checkpoint and
  dispatches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowtune.errors import FlowtuneError
from flowtune.train.checkpoint import TrainedWeights, resolve_trained

if TYPE_CHECKING:
    from flowtune.families import FamilySpec
    from flowtune.recipe import Recipe


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes:
        path: The file (LoRA formats) or directory (merge) written.
        format: ``diffusers``, ``comfyui``, ``kohya``, or ``merged``.
        modules: Number of LoRA modules of the checkpoint (diffusers naming).
        original_modules: Number of original-layout modules written (kohya/comfyui), else None.
        more: Further files written: the low-noise expert's of a two-expert run
            (``model.expert: both``, :mod:`flowtune.experts`), beside ``path`` (the high-noise
            expert's).
    """

    path: Path
    format: str
    modules: int
    original_modules: int | None = None
    more: tuple[Path, ...] = ()


def _check_choice(value: str | None, option: str, allowed: tuple[str, ...] | list[str]) -> None:
    if value is not None and value not in allowed:
        raise FlowtuneError(f"{option} {value!r} is not one of: {', '.join(allowed)}")


def _lora_checkpoint(trained: TrainedWeights, spec_transformer_class: str) -> Path:
    """The LoRA file of ``trained``; a clear refusal for a full fine-tuning checkpoint, and for a
    LoRA file that cannot be read (truncated or damaged: named, with another checkpoint of the run
    suggested)."""
    from flowtune.train.checkpoint import readable_sibling, weights_problem

    if trained.lora_file is None:
        raise FlowtuneError(
            f"{trained.path} holds a fully fine-tuned transformer, not a LoRA: there is nothing to "
            f"convert or merge; {trained.transformer_dir} already is a diffusers model "
            f"({spec_transformer_class}.from_pretrained loads it)"
        )
    if problem := weights_problem(trained.lora_file):
        other = readable_sibling(trained.path, trained.lora_file.name)
        instead = (
            f"export another checkpoint of the run with --ckpt {other}"
            if other is not None
            else "no other checkpoint of the run has a readable LoRA"
        )
        raise FlowtuneError(f"cannot export {trained.path}: {problem}; {instead}")
    return trained.lora_file


def _family(trained: TrainedWeights) -> tuple[Recipe, FamilySpec]:
    """The checkpoint's recipe and model family."""
    from flowtune.families import get_family
    from flowtune.recipe import load_recipe

    recipe = load_recipe(trained.recipe_file)
    return recipe, get_family(recipe.model.family)


def export_lora(
    trained: TrainedWeights,
    fmt: str = "diffusers",
    out: Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write the LoRA of a checkpoint as a ``fmt`` file.

    Args:
        trained: The checkpoint (:func:`flowtune.train.checkpoint.resolve_trained`).
        fmt: ``diffusers`` (the checkpoint's file as it is), ``comfyui`` or ``kohya``.
        out: The file to write; an existing directory gets the default name inside it.  None:
            ``<run>/export/<run>-<checkpoint>-<fmt>.safetensors``.
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the LoRA weights; None = as stored.
        overwrite: Replace an existing file.

    Raises:
        FlowtuneError: unknown format or dtype, a full fine-tuning checkpoint, an existing file
            without ``overwrite``, or a LoRA that the format cannot express.
    """
    from flowtune.experts import expert_file_name, expert_loras, lora_expert
    from flowtune.interop.lora import DTYPES, FORMATS, write_lora
    from flowtune.interop.output import check_free_file, default_stem, write_file_atomically

    _check_choice(fmt, "--format", FORMATS)
    _check_choice(dtype, "--dtype", list(DTYPES))
    _, spec = _family(trained)
    lora_file = _lora_checkpoint(trained, spec.transformer_class)
    folder, stem = default_stem(trained.path)
    name = f"{stem}-{fmt}.safetensors"
    target = folder / name if out is None else Path(out).expanduser()
    if target.is_dir():
        target = target / name
    # A two-expert model's LoRAs (one, or both of a `both` run): each file named for its expert
    # (..._high_noise / ..._low_noise.safetensors), as musubi-tuner and ai-toolkit name them.
    jobs = []
    for lora in expert_loras(lora_file):
        expert = lora_expert(lora)
        path = target.with_name(expert_file_name(target.name, expert)) if expert is not None else target
        check_free_file(path, overwrite)
        jobs.append((lora, path))
    counts: list[tuple[int, int | None]] = []
    for lora, path in jobs:

        def write(tmp: Path, lora: Path = lora) -> None:
            counts.append(write_lora(lora, spec, fmt, tmp, DTYPES[dtype] if dtype else None))

        write_file_atomically(path, write)
    modules, original_modules = counts[0]
    return ExportResult(
        path=jobs[0][1],
        format=fmt,
        modules=modules,
        original_modules=original_modules,
        more=tuple(path for _, path in jobs[1:]),
    )


def merge_lora(
    trained: TrainedWeights,
    out: Path | None = None,
    dtype: str | None = None,
    lora_scale: float = 1.0,
    overwrite: bool = False,
    base_model: str | None = None,
) -> ExportResult:
    """Save the base transformer with the checkpoint's LoRA merged into its weights.

    The base is the recipe's ``model.pretrained`` (``transformer`` subfolder, ``model.revision``
    and ``model.variant``), loaded in ``dtype`` (default: ``model.dtype``), so the merge happens
    in that precision.  The result is a diffusers folder (``config.json`` + safetensors) that
    ``<family transformer class>.from_pretrained(out)`` loads, with no LoRA layers left.

    Args:
        trained: The checkpoint.
        out: The directory to write; None: ``<run>/export/<run>-<checkpoint>-merged``.
        dtype: ``float32``, ``bfloat16`` or ``float16``; None = the recipe's ``model.dtype``.
        lora_scale: Strength of the merged LoRA (1.0 = as trained).
        overwrite: Replace a non-empty ``out``.
        base_model: The base model (Hub id or directory) instead of the recipe's
            ``model.pretrained`` (a relative path that no longer resolves, a moved download).

    Raises:
        FlowtuneError: a full fine-tuning checkpoint, an unusable ``out``, a base model that cannot
            be found.
    """
    import diffusers

    from flowtune.interop.lora import DTYPES
    from flowtune.interop.output import check_free_dir, default_stem, write_dir_atomically
    from flowtune.model_files import resolve_pretrained
    from flowtune.quiet import quiet_libraries

    _check_choice(dtype, "--dtype", list(DTYPES))
    if not math.isfinite(lora_scale):
        raise FlowtuneError(f"--lora-scale must be a finite number, got {lora_scale}")
    recipe, spec = _family(trained)
    lora_file = _lora_checkpoint(trained, spec.transformer_class)
    folder, stem = default_stem(trained.path)
    path = folder / f"{stem}-merged" if out is None else Path(out).expanduser()
    check_free_dir(path, overwrite)

    quiet_libraries()
    try:
        model_dir = resolve_pretrained(
            base_model or recipe.model.pretrained, recipe.model.revision, ["transformer"]
        )
    except FlowtuneError as exc:
        where = (
            "--model"
            if base_model
            else f"the base model of {trained.recipe_file} (give another with --model)"
        )
        raise FlowtuneError(f"{where}: {exc}") from None
    kwargs = {"subfolder": "transformer", "dtype": DTYPES[dtype or recipe.model.dtype]}
    if recipe.model.variant is not None:
        kwargs["variant"] = recipe.model.variant
    transformer = getattr(diffusers, spec.transformer_class).from_pretrained(model_dir, **kwargs)
    prefix = spec.lora_class().transformer_name
    transformer.load_lora_adapter(
        str(lora_file.parent), weight_name=lora_file.name, prefix=prefix, adapter_name="flowtune"
    )
    modules = len(_lora_layers(transformer))
    transformer.fuse_lora(lora_scale=lora_scale, adapter_names=["flowtune"])
    transformer.unload_lora()  # the merged weights stay; the LoRA layers go
    if _lora_layers(transformer):
        raise RuntimeError("LoRA layers are left after unload_lora(); the merged model would not be plain")
    write_dir_atomically(path, lambda tmp: transformer.save_pretrained(tmp, safe_serialization=True))
    return ExportResult(path=path, format="merged", modules=modules)


def _lora_layers(model) -> list[str]:
    """Names of the peft LoRA layers in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def export(
    ckpt: str | Path,
    fmt: str | None = None,
    out: Path | None = None,
    merge: bool = False,
    lora_scale: float = 1.0,
    dtype: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
) -> ExportResult:
    """``flowtune export``: check the options, find the checkpoint, export or merge.

    Raises:
        FlowtuneError: options that do not go together, or any error of :func:`export_lora` /
            :func:`merge_lora`.
    """
    from flowtune.interop.lora import DTYPES, FORMATS
    from flowtune.train.model import LORA_WEIGHTS_NAME

    _check_choice(fmt, "--format", FORMATS)
    _check_choice(dtype, "--dtype", list(DTYPES))
    if merge and fmt is not None:
        raise FlowtuneError("--merge writes a diffusers transformer folder; leave out --format")
    if not merge and lora_scale != 1.0:
        raise FlowtuneError("--lora-scale applies to --merge only; exported LoRAs keep the trained scale")
    if not merge and base_model is not None:
        raise FlowtuneError("--model applies to --merge only (the base model to merge into)")
    trained = resolve_trained(ckpt, LORA_WEIGHTS_NAME)
    if merge and trained.lora_file is not None:
        from flowtune.experts import lora_expert

        if lora_expert(trained.lora_file) is not None:
            raise FlowtuneError(
                f"{trained.path} holds a LoRA of an expert of a two-expert model; --merge writes one "
                "transformer and does not merge experts yet: export it with --format instead"
            )
    if merge:
        return merge_lora(
            trained, out, dtype=dtype, lora_scale=lora_scale, overwrite=overwrite, base_model=base_model
        )
    return export_lora(trained, fmt or "diffusers", out, dtype=dtype, overwrite=overwrite)
