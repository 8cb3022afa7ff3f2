"""Load a recipe: schema defaults <- YAML file <- ``key=value`` overrides, then validate.

OmegaConf checks the values against the typed schema while merging and resolves ``${...}``
interpolations; :func:`_check_semantics` then checks ranges and cross-field constraints.  Every
user mistake raises :class:`RecipeError` with one line that names the file or key, the offending
value and what is allowed, worded from the schema rather than from OmegaConf's messages."""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.recipe.schema import Recipe, schema_fields, section_classes

__all__ = [
    "BundledRecipe",
    "RecipeError",
    "all_keys",
    "bundled_recipes",
    "load_recipe",
    "recipe_to_yaml",
    "recipes_dir",
    "resolve_recipe_path",
]

_NoneType = type(None)


class RecipeError(FlowtuneError):
    """A recipe or override is invalid; the message is one line naming the key or file."""


@dataclass(frozen=True)
class BundledRecipe:
    """A recipe shipped in the package's ``flowtune/recipes/`` folder.

    Attributes:
        name: The file stem, usable wherever a recipe path is expected.
        path: The YAML file.
        description: The recipe's first comment line, without the ``#``.
    """

    name: str
    path: Path
    description: str


# --------------------------------------------------------------------------- bundled recipes


def recipes_dir() -> Path:
    """The folder of bundled recipes: ``flowtune/recipes/`` inside the package (package data,
    so an installed wheel has them too; a source checkout links ``recipes/`` to it)."""
    return Path(str(resources.files("flowtune") / "recipes"))


def _first_comment(path: Path) -> str:
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                stripped = line.strip()
                if stripped.startswith("#"):
                    return stripped.lstrip("#").strip()
                if stripped:
                    break
    except OSError:
        pass
    return ""


def bundled_recipes() -> list[BundledRecipe]:
    """The bundled recipes, sorted by name (empty if the folder is absent)."""
    folder = recipes_dir()
    if not folder.is_dir():
        return []
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [BundledRecipe(p.stem, p, _first_comment(p)) for p in paths]


def resolve_recipe_path(recipe: str | Path) -> Path:
    """The YAML file for ``recipe``: an existing file path, or a bundled recipe's name.

    ``"tiny-flux-demo"`` and ``"tiny-flux-demo.yaml"`` both name the bundled recipe; an existing
    file of that name in the current directory takes precedence.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError(f"recipe {str(recipe)!r} is a directory; give the path of a YAML file")
    bundled = {b.name: b for b in bundled_recipes()}
    name = path.name
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    if len(path.parts) == 1 and name in bundled:
        return bundled[name].path
    message = f"recipe not found: {str(recipe)!r}"
    close = difflib.get_close_matches(name, list(bundled), n=1)
    if close:
        message += f" — did you mean the bundled recipe {close[0]!r}?"
    if bundled:
        message += f" (bundled recipes: {', '.join(bundled)}; list them with `flowtune recipes`)"
    raise RecipeError(message)


# --------------------------------------------------------------------------- key lookups

_FIELDS = {f.key: f for f in schema_fields()}


def all_keys() -> list[str]:
    """Every settable dotted key of the schema, in section and field order."""
    return list(_FIELDS)


def _section_keys(section: str) -> list[str]:
    return [k for k in _FIELDS if k.startswith(section + ".")]


def _unknown_key_message(key: str) -> str:
    """``unknown key 'k' — did you mean 'x'?``, or the valid keys when nothing is close."""
    sections = list(section_classes())
    head, _, leaf = key.partition(".")
    # The same field name under another section (``train.lr`` -> ``optimizer.lr``).
    same_leaf = [k for k in _FIELDS if leaf and k.endswith("." + leaf)]
    if len(same_leaf) == 1:
        return f"unknown key {key!r} — did you mean {same_leaf[0]!r}?"
    candidates = all_keys() if leaf else sections
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.8)
    if close:
        return f"unknown key {key!r} — did you mean {close[0]!r}?"
    if head in sections and leaf:
        names = ", ".join(k.partition(".")[2] for k in _section_keys(head))
        return f"unknown key {key!r}; valid keys in {head!r}: {names}"
    close_section = difflib.get_close_matches(head, sections, n=1, cutoff=0.6)
    hint = f" — did you mean {close_section[0]!r}?" if close_section else ""
    return f"unknown key {key!r}: {head!r} is not a recipe section{hint} (sections: {', '.join(sections)})"


# --------------------------------------------------------------------------- error messages


def _fmt(value: Any) -> str:
    """A value as the user would write it (YAML flow style), without surrounding quotes."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().replace("\n", " ")
    return yaml.safe_dump(value).strip().removesuffix("...").strip()


def _describe(tp: Any, plural: bool = False) -> str:
    """English for a type: ``an integer``, ``a list of strings``, ``a string or null``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is UnionType:
        parts = [_describe(a, plural) for a in args if a is not _NoneType]
        text = " or ".join(parts)
        return text + " or null" if _NoneType in args else text
    if origin is Literal:
        return "one of " + ", ".join(_fmt(a) for a in args)
    if origin is list:
        item = args[0] if args else Any
        if get_origin(item) is Literal:
            inner = "values among " + ", ".join(_fmt(a) for a in get_args(item))
        else:
            inner = _describe(item, plural=True)
        return ("lists of " if plural else "a list of ") + inner
    if origin is dict or tp is dict:
        return "mappings" if plural else "a mapping (key: value)"
    singular, many = {
        int: ("an integer", "integers"),
        float: ("a float", "floats"),
        bool: ("a boolean (true or false)", "booleans"),
        str: ("a string", "strings"),
    }.get(tp, (f"a {getattr(tp, '__name__', tp)}", f"{getattr(tp, '__name__', tp)} values"))
    return many if plural else singular


def _invalid(key: str, value: Any, tp: Any) -> str:
    if get_origin(tp) is Literal:
        allowed = ", ".join(_fmt(c) for c in get_args(tp))
        return f"invalid value '{_fmt(value)}' for {key!r}; allowed values: {allowed}"
    return f"invalid value '{_fmt(value)}' for {key!r}: expected {_describe(tp)}"


def _first_leaf(prefix: str, value: Any) -> str:
    while isinstance(value, dict) and value:
        first = next(iter(value))
        prefix, value = f"{prefix}.{first}", value[first]
    return prefix


def _error_message(error: OmegaConfBaseException, data: dict[Any, Any] | None = None) -> str:
    """One line for OmegaConf's error about merging ``data`` (or resolving interpolations, when
    ``data`` is None), built from the key it names, the value and the schema, not its wording."""
    full_key = str(getattr(error, "full_key", None) or "")
    if isinstance(error, ConfigKeyError):
        if "." not in full_key:  # a whole unknown section: name its first key
            full_key = _first_leaf(full_key, (data or {}).get(full_key))
        return _unknown_key_message(full_key)
    path, item, _ = full_key.partition("[")  # "logging.trackers[1]" is an item of a list
    field = _FIELDS.get(".".join(path.split(".")[:2]))
    if field is None or not isinstance(error, ValidationError):  # pragma: no cover - not expected
        return f"invalid setting {full_key!r}: {_first_line(error)}"
    value, tp = error.value, field.type
    item_type = next((get_args(t)[0] for t in (tp, *get_args(tp)) if get_origin(t) is list), None)
    if item and get_origin(item_type) is Literal:  # a bad choice in a list: name the item
        tp = item_type
    elif data is not None:  # the value as written (OmegaConf's may be a node or one item)
        value = data[field.section][field.name]
    return _invalid(field.key, value, tp)


def _prepare(data: dict[Any, Any], origin: str) -> dict[Any, Any]:
    """``data`` ready to merge over the schema.

    Drops empty sections (``lora:`` with nothing under it), refuses a section that is not a
    mapping, and undoes two YAML readings that OmegaConf would refuse: a boolean for a choice
    that has the word (an unquoted ``no`` for ``train.mixed_precision``) and an integral float
    for an integer (``max_steps: 1e3``).
    """
    result: dict[Any, Any] = {}
    for section, body in data.items():
        if section in section_classes() and not isinstance(body, dict):
            if body is None:
                continue
            raise RecipeError(
                f"{origin}invalid value '{_fmt(body)}' for {section!r}: expected a mapping of "
                f"{section} settings (e.g. {_section_keys(section)[0]}: ...)"
            )
        if isinstance(body, dict):
            body = {name: _yaml_value(f"{section}.{name}", value) for name, value in body.items()}
        result[section] = body
    return result


def _yaml_value(key: str, value: Any) -> Any:
    tp = _FIELDS[key].type if key in _FIELDS else None
    word = "yes" if value is True else "no" if value is False else None
    if word and get_origin(tp) is Literal and word in get_args(tp):
        return word
    if isinstance(value, float) and value.is_integer() and int in (tp, *get_args(tp)):
        return int(value)
    return value


# --------------------------------------------------------------------------- parsing


def _read_yaml(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: cannot read the recipe: not UTF-8 text") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None:
            return {}
        if not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise RecipeError(
                f"{path}: a recipe must be a YAML mapping of sections (model:, data:, train:, ...), "
                f"but the file holds {kind}"
            )
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as e:
        raise RecipeError(_yaml_error_message(path, e)) from None
    except OmegaConfBaseException as e:
        raise RecipeError(f"{path}: invalid recipe: {_first_line(e)}") from None
    container = OmegaConf.to_container(loaded, resolve=False)
    assert isinstance(container, dict)
    return container


def recipe_base(path: Path) -> str | None:
    """The ``base:`` a recipe file names, or None."""
    base = _read_yaml(path).get("base")
    return base if isinstance(base, str) else None


def _read_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[Any, Any]]]:
    """The recipe at ``path`` and the recipes it builds on, base first: a top-level ``base:``
    names another recipe (a path relative to this file, or a bundled recipe's name) whose values
    this file's values override, e.g. ``base: flux1-dev-lora`` and only the keys that differ.

    Raises:
        RecipeError: a ``base`` that is not a string, does not exist, or leads back to itself.
    """
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return [(path, data)]
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{path}: base must name a recipe (a bundled recipe's name or a YAML path)")
    beside = path.parent / base
    base_path = beside if beside.is_file() else resolve_recipe_path(base)
    chain = (*seen, path.resolve())
    if base_path.resolve() in chain:
        raise RecipeError(
            f"{path}: base {base!r} leads back to {path.name}; recipes cannot build on themselves"
        )
    return [*_read_with_bases(base_path, chain), (path, data)]


def _yaml_error_message(path: Path, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or _first_line(error)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    message = f"{where}: invalid YAML: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        message += f" ({context} at line {context_mark.line + 1})"
    return message


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(
            f"malformed override {item!r}: expected key=value, e.g. train.max_steps=100 "
            "or validation.prompts=[a cat,a dog]"
        )
    if key.startswith(("+", "~")) or not re.fullmatch(r"[A-Za-z_][\w.]*", key) or ".." in key:
        raise RecipeError(f"malformed override {item!r}: {key!r} is not a dotted recipe key")
    try:
        parsed = OmegaConf.from_dotlist([f"{key}={value}"])
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as e:
        problem = getattr(e, "problem", None) or _first_line(e)
        raise RecipeError(f"malformed override {item!r}: cannot parse the value: {problem}") from None
    container = OmegaConf.to_container(parsed, resolve=False)
    assert isinstance(container, dict)
    return container


# --------------------------------------------------------------------------- semantic checks


def _check_semantics(cfg: Any) -> None:
    """Range and cross-field checks on a merged, resolved recipe; raise the first problem."""

    def fail(key: str, value: Any, requirement: str) -> None:
        raise RecipeError(f"invalid value '{_fmt(value)}' for {key!r}: {requirement}")

    def get(key: str) -> Any:
        section, name = key.split(".")
        return cfg[section][name]

    for key in (
        "train.max_steps",
        "train.batch_size",
        "train.gradient_accumulation",
        "train.checkpoint_every",
        "train.log_every",
        "lora.rank",
        "flow.num_train_timesteps",
        "flow.log_interval",
        "flow.summary_log_interval",
        "data.max_sequence_length",
        "data.encode_batch_size",
        "validation.steps",
    ):
        if get(key) < 1:
            fail(key, get(key), "must be a positive integer")
    if cfg.lora.alpha <= 0:
        fail("lora.alpha", cfg.lora.alpha, "must be a positive integer")
    for key in ("data.num_workers", "validation.every", "lr_scheduler.warmup_steps"):
        if get(key) < 0:
            fail(key, get(key), "must be 0 or a positive integer")
    keep_last = cfg.train.keep_last
    if keep_last is not None and keep_last < 1:
        fail("train.keep_last", keep_last, "must be a positive integer, or null to keep all checkpoints")

    for key in ("flow.i2v_prob", "flow.cfg_dropout_prob", "flow.mix_uniform_ratio", "lora.dropout"):
        value = get(key)
        if not 0.0 <= value <= 1.0:
            fail(key, value, "must be a probability in [0, 1]")
    if not 0.0 <= cfg.data.validation_split < 1.0:
        fail("data.validation_split", cfg.data.validation_split, "must be in [0, 1)")
    sigma_min, sigma_max = cfg.flow.sigma_min, cfg.flow.sigma_max
    if not 0.0 <= sigma_min < 1.0:
        fail("flow.sigma_min", sigma_min, "need 0 <= sigma_min < sigma_max <= 1")
    if not 0.0 < sigma_max <= 1.0:
        fail("flow.sigma_max", sigma_max, "need 0 <= sigma_min < sigma_max <= 1")
    if sigma_min >= sigma_max:
        fail(
            "flow.sigma_min",
            sigma_min,
            f"need 0 <= sigma_min < sigma_max <= 1 (flow.sigma_max is {_fmt(sigma_max)})",
        )
    for key, value in (
        ("flow.flow_shift", cfg.flow.flow_shift),
        ("flow.logit_std", cfg.flow.logit_std),
        ("flow.beta_alpha", cfg.flow.beta_alpha),
        ("flow.beta_beta", cfg.flow.beta_beta),
        ("optimizer.lr", cfg.optimizer.lr),
        ("optimizer.eps", cfg.optimizer.eps),
    ):
        if not (math.isfinite(value) and value > 0):
            fail(key, value, "must be a positive number")
    for key, value in (
        ("optimizer.weight_decay", cfg.optimizer.weight_decay),
        ("train.max_grad_norm", cfg.train.max_grad_norm),
    ):
        if not (math.isfinite(value) and value >= 0):
            fail(key, value, "must be 0 or a positive number")
    if not math.isfinite(cfg.flow.logit_mean):
        fail("flow.logit_mean", cfg.flow.logit_mean, "must be a finite number")
    betas = list(cfg.optimizer.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        fail("optimizer.betas", betas, "expected two values [beta1, beta2], each in [0, 1)")

    family = get_family(cfg.model.family)
    _resolve_sampling(cfg, family, fail)
    step = family.spatial_granularity
    resolution = cfg.data.resolution
    values = [resolution] if isinstance(resolution, int) else list(resolution)
    if not values:
        fail("data.resolution", values, "give at least one resolution")
    if len(set(values)) != len(values):
        fail("data.resolution", values, "each resolution may appear once")
    for value in values:
        if value <= 0 or value % step:
            fail(
                "data.resolution",
                resolution if isinstance(resolution, int) else values,
                f"each value must be a positive multiple of {step} for model family {family.name!r}",
            )
    bucket_step = cfg.data.bucket_step
    if bucket_step is not None and (bucket_step <= 0 or bucket_step % step):
        fail(
            "data.bucket_step",
            bucket_step,
            f"must be a positive multiple of {step} for model family {family.name!r}, or null",
        )
    for key in ("validation.height", "validation.width"):
        value = get(key)
        if value <= 0 or value % step:
            fail(key, value, f"must be a positive multiple of {step} for model family {family.name!r}")
    frames = cfg.validation.frames
    if frames is not None and family.frame_granularity == 0:
        fail("validation.frames", frames, f"model family {family.name!r} samples images: leave it null")
    elif frames is not None:
        from flowtune.data.video import frames_problem

        problem = frames_problem(family, frames)
        if problem is not None:
            fail("validation.frames", frames, problem)

    _check_video(cfg, family, fail)

    edit_pairs = cfg.data.edit_pairs
    if edit_pairs and not family.reference_images:
        fail("data.edit_pairs", edit_pairs, f"model family {family.name!r} takes no reference images")
    if edit_pairs is False and not family.references_optional and family.reference_images:
        fail("data.edit_pairs", edit_pairs, f"model family {family.name!r} always edits a reference image")

    images, prompts = list(cfg.validation.images), list(cfg.validation.prompts)
    if images and not family.reference_images and not family.first_frame_images:
        fail("validation.images", images, f"model family {family.name!r} takes no reference images; use []")
    required = family.reference_images and not family.references_optional
    if prompts and (images or required) and len(images) not in (1, len(prompts)):
        who = f"model family {family.name!r} edits" if required else "validation prompts edit"
        fail(
            "validation.images",
            images,
            f"{who} a reference image per prompt: give one image per validation prompt "
            f"({len(prompts)}), or one for all",
        )
    _check_adapter_arguments(family, OmegaConf.to_container(cfg.model.adapter))

    targets = cfg.lora.target_modules
    if targets is not None and (len(targets) == 0 or any(not t.strip() for t in targets)):
        fail(
            "lora.target_modules",
            list(targets),
            "give module name suffixes such as attn.to_q, or null for the family's defaults",
        )
    trackers = list(cfg.logging.trackers)
    if len(set(trackers)) != len(trackers):
        fail("logging.trackers", trackers, "each tracker may appear once")
    if cfg.flow.device is not None and not cfg.flow.device.strip():
        fail("flow.device", cfg.flow.device, "give a device such as cuda or cpu, or null")
    _check_block_offload(cfg, family, fail)
    _check_activation_offload(cfg, fail)
    _check_quantize(cfg, fail)
    _check_expert(cfg, fail)


def _resolve_sampling(cfg: Any, family: Any, fail: Callable[[str, Any, str], None]) -> None:
    """Fill ``validation.guidance`` and ``validation.negative_prompt`` left null with the family's
    defaults (so that checkpoints record what validation sampled with), and check them."""
    v = cfg.validation
    if v.guidance is None:
        v.guidance = family.guidance
    elif not (math.isfinite(v.guidance) and v.guidance >= 0):
        fail("validation.guidance", v.guidance, "must be 0 or a positive number")
    if v.guidance_2 is not None and not (math.isfinite(v.guidance_2) and v.guidance_2 >= 0):
        fail("validation.guidance_2", v.guidance_2, "must be 0 or a positive number, or null")
    if v.negative_prompt is None:
        v.negative_prompt = family.negative_prompt
    elif family.negative_prompt is None:
        fail(
            "validation.negative_prompt",
            v.negative_prompt,
            f"must be null: model family {family.name!r} samples without a negative prompt",
        )


def _check_video(cfg: Any, family: Any, fail: Callable[[str, Any, str], None]) -> None:
    """``data.frames``, ``data.fps``, ``data.frame_sampling``: checked against the family's
    ``frame_granularity``; image families take them only at their defaults."""
    from flowtune.data.video import frames_problem

    frames, fps, sampling = cfg.data.frames, cfg.data.fps, cfg.data.frame_sampling
    if family.frame_granularity <= 0:
        images_only = f"model family {family.name!r} trains on still images"
        if frames not in (None, 1):
            fail("data.frames", frames, f"{images_only}; remove it (null)")
        if fps is not None:
            fail("data.fps", fps, f"{images_only}; remove it (null)")
        if sampling != "head":
            fail("data.frame_sampling", sampling, f"{images_only}; remove it (head)")
        return
    if frames is not None:
        problem = frames_problem(family, frames)
        if problem is not None:
            fail("data.frames", frames, problem)
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        fail("data.fps", fps, f"must be a positive number of frames per second, or null ({family.fps})")
    if fps is None and not family.fps > 0:
        fail("data.fps", fps, f"model family {family.name!r} has no frame rate of its own; set one")


def _check_block_offload(cfg: Any, family: Any, fail: Callable[[str, Any, str], None]) -> None:
    """``train.block_offload``: a block count (its upper bound, the model's block count, is
    checked from the model's config.json when training starts), for LoRA on one GPU or DDP."""
    resident = cfg.train.block_offload
    if resident is None:
        return
    if resident < 0:
        fail(
            "train.block_offload",
            resident,
            "must be 0 or a positive number of blocks, or null for no offload",
        )
    if not family.block_lists:
        fail("train.block_offload", resident, f"model family {family.name!r} has no block offload; use null")
    if cfg.train.mode != "lora":
        fail(
            "train.block_offload",
            resident,
            "block offload streams frozen weights only, so it needs train.mode=lora (full fine-tuning "
            "updates every block); set train.block_offload=null",
        )
    if cfg.train.distributed == "fsdp":
        fail(
            "train.block_offload",
            resident,
            "FSDP2 already shards the blocks across GPUs and cannot be combined with block offload; "
            "set train.distributed=ddp or train.block_offload=null",
        )


def _check_activation_offload(cfg: Any, fail: Callable[[str, Any, str], None]) -> None:
    """``train.activation_offload``: it moves what gradient checkpointing keeps, and is not
    covered under FSDP2."""
    if not cfg.train.activation_offload:
        return
    if not cfg.train.gradient_checkpointing:
        fail(
            "train.activation_offload",
            True,
            "it moves the inputs that gradient checkpointing keeps for the backward pass to CPU memory, "
            "so it needs train.gradient_checkpointing=true",
        )
    if cfg.train.distributed == "fsdp":
        fail(
            "train.activation_offload",
            True,
            "it is not available with FSDP2 (untested with its sharded parameters); set "
            "train.distributed=ddp or train.activation_offload=false",
        )


def _check_quantize(cfg: Any, fail: Callable[[str, Any, str], None]) -> None:
    """``model.quantize``: a frozen base for LoRA, on one GPU or DDP (the mode itself is checked
    by the schema's choices)."""
    mode = cfg.model.quantize
    if mode is None:
        return
    if cfg.train.mode != "lora":
        fail(
            "model.quantize",
            mode,
            "a quantized base cannot be trained, so it needs train.mode=lora; set model.quantize=null "
            "for full fine-tuning",
        )
    if cfg.train.distributed == "fsdp":
        fail(
            "model.quantize",
            mode,
            "FSDP2 cannot shard torchao's quantized weights in flowtune yet; set train.distributed=ddp "
            "(each GPU holds the quantized model) or model.quantize=null",
        )


def _check_expert(cfg: Any, fail: Callable[[str, Any, str], None]) -> None:
    """``flow.sigma_range`` and ``model.expert``: a LoRA per expert, its sigma sampled within the
    expert's range (whether the model has two experts is checked from its model_index.json when
    training starts)."""
    sigma_range = cfg.flow.sigma_range
    if sigma_range is not None:
        values = list(sigma_range)
        if not (len(values) == 2 and 0.0 <= values[0] < values[1] <= 1.0):
            fail("flow.sigma_range", values, "give [low, high] with 0 <= low < high <= 1, or null")
        if cfg.flow.timestep_sampling == "beta" and cfg.flow.use_sigma_noise:
            fail(
                "flow.sigma_range",
                values,
                "beta sampling cannot be restricted to a range; use another method",
            )
    expert = cfg.model.expert
    if expert is None:
        return
    if sigma_range is not None:
        fail(
            "flow.sigma_range", list(sigma_range), "model.expert sets it to the expert's range; leave it null"
        )
    if cfg.train.mode != "lora":
        fail("model.expert", expert, "experts train LoRAs, so it needs train.mode=lora")
    if expert == "both" and cfg.train.block_offload is not None:
        fail(
            "model.expert",
            expert,
            "both experts stay on the GPU, without block offload; set train.block_offload=null, or train "
            "model.expert=high and model.expert=low in two runs (each can stream its blocks)",
        )
    if expert == "both" and cfg.train.distributed == "fsdp":
        fail("model.expert", expert, "FSDP2 is not supported with both experts; set train.distributed=ddp")
    if cfg.flow.timestep_sampling == "beta" and cfg.flow.use_sigma_noise:
        fail(
            "model.expert",
            expert,
            "an expert's sigmas are sampled within its range, which beta sampling cannot do; "
            "set flow.timestep_sampling to logit_normal, uniform, mode, lognorm or mix",
        )


def _check_adapter_arguments(family: Any, kwargs: Any) -> None:
    """``model.adapter`` must be keyword arguments the family's adapter accepts.

    Families that declare them (``FamilySpec.adapter_arguments``) are checked by name and type
    without importing torch; otherwise the adapter (a plain object, no weights) is built with the
    arguments.  With no arguments there is nothing to check.
    """
    if not kwargs:
        return
    declared = family.adapter_arguments
    if declared is not None:
        accepted = [name for name, _ in declared]
    else:
        from flowtune.flow_matching.pipeline import create_adapter

        parameters = inspect.signature(type(create_adapter(family.adapter)).__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            accepted = list(kwargs)
        else:
            accepted = [
                name
                for name, p in parameters.items()
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
    for name in kwargs:
        if name not in accepted:
            key = f"model.adapter.{name}"
            close = difflib.get_close_matches(str(name), accepted, n=1, cutoff=0.6)
            if close:
                raise RecipeError(f"unknown key {key!r} — did you mean 'model.adapter.{close[0]}'?")
            raise RecipeError(
                f"unknown key {key!r}; the {family.adapter!r} adapter accepts: "
                + (", ".join(accepted) or "no arguments")
            )
    if declared is not None:
        for name, type_name in declared:
            if name in kwargs and not _is_type(kwargs[name], type_name):
                raise RecipeError(
                    f"invalid value '{_fmt(kwargs[name])}' for 'model.adapter.{name}': expected a {type_name}"
                )
        return
    try:
        create_adapter(family.adapter, **kwargs)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"invalid value '{_fmt(kwargs)}' for 'model.adapter': {_first_line(e)}") from None


def _is_type(value: Any, type_name: str) -> bool:
    """Whether a YAML value is a ``type_name`` (``float`` takes integers too; ``bool`` is no number)."""
    if type_name == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if type_name == "float":
        return isinstance(value, int | float)
    return isinstance(value, {"int": int, "str": str}[type_name])


# --------------------------------------------------------------------------- entry points


def _merge(cfg: DictConfig, data: dict[Any, Any], origin: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(cfg, _prepare(data, origin))
    except OmegaConfBaseException as e:
        raise RecipeError(origin + _error_message(e, data)) from None
    assert isinstance(merged, DictConfig)
    return merged


def load_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load and validate a recipe.

    Args:
        recipe: A YAML file path, or the name of a bundled recipe (``"tiny-flux-demo"``).
        overrides: ``key=value`` strings in OmegaConf dotlist syntax, applied after the file
            (``train.max_steps=10``, ``optimizer.lr=3e-4``, ``validation.prompts=[a,b]``).

    Returns:
        A typed OmegaConf ``DictConfig`` over :class:`~flowtune.recipe.schema.Recipe` (attribute
        and item access, ``**recipe.flow`` works), with interpolations resolved.

    Raises:
        RecipeError: one line naming the file or key, the value and what is allowed.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    path = resolve_recipe_path(recipe)
    origin = f"{path}: "
    cfg = OmegaConf.structured(Recipe)
    for layer_path, layer in _read_with_bases(path):
        cfg = _merge(cfg, layer, f"{layer_path}: ")
    for item in overrides:
        cfg = _merge(cfg, _parse_override(item), "")

    try:
        OmegaConf.resolve(cfg)
    except ValidationError as e:  # an interpolation's value does not fit its key
        raise RecipeError(_error_message(e)) from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f" for {key!r}" if key else ""
        raise RecipeError(f"cannot resolve interpolation{where}: {_first_line(e)}") from None

    missing_keys = OmegaConf.missing_keys(cfg)
    missing = [k for k in all_keys() if k in missing_keys]
    if missing:
        keys = ", ".join(repr(k) for k in missing)
        how = " ".join(f"{k}=..." for k in missing)
        plural = "s" if len(missing) > 1 else ""
        raise RecipeError(
            f"{origin}missing required value{plural} for {keys}: set {'them' if plural else 'it'} "
            f"in the recipe or add the override{plural} {how}"
        )
    _check_semantics(cfg)
    return cfg  # type: ignore[return-value]


def recipe_to_yaml(recipe: Any) -> str:
    """The recipe as YAML (interpolations resolved), loadable again with :func:`load_recipe`."""
    return OmegaConf.to_yaml(recipe, resolve=True)
