"""Render the recipe reference (``docs/recipes.md``) from the schema's field docstrings.

``scripts/gen_recipe_docs.py`` writes the file; a test checks that it equals
:func:`render_recipe_docs`, so the reference cannot drift from the schema.
"""

from __future__ import annotations

import json
import re
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from omegaconf import MISSING

from flowtune.recipe.schema import Recipe, SchemaField, field_docs, schema_fields, section_classes

__all__ = ["render_recipe_docs", "type_text", "default_text"]

DOCS_PATH = "docs/recipes.md"
GENERATOR = "scripts/gen_recipe_docs.py"

_INTRO = """\
A recipe is a YAML file that describes one fine-tuning run. It has the sections below; every key
has a default except the required ones (`model.pretrained`, `data.source`), so a recipe only
needs the keys it changes. Bundled recipes ship inside the package (`flowtune/recipes/`, linked
as `recipes/` in a source checkout; list them with `flowtune recipes`), can be named without a
path, e.g. `tiny-flux-demo`, and `flowtune cp NAME my-recipe.yaml` copies one to start your own.

## Loading and overrides

A recipe is built in three layers, each overriding the one before:

1. the defaults documented below,
2. the YAML file (and first the recipe it names as its `base:`, if any),
3. `key=value` overrides on the command line (OmegaConf dotlist syntax).

A recipe can build on another with a top-level `base:` key (a bundled recipe's name, or a path
relative to the file) and hold only the keys it changes: `recipes/flux1-dev-lora-24gb.yaml` is
`base: flux1-dev-lora` plus its memory settings. Bases can have bases; a loop is an error.

```bash
flowtune train recipes/flux1-dev-lora.yaml train.max_steps=2000 optimizer.lr=5e-5 \\
    data.resolution=[512,768,1024] 'validation.prompts=[a photo of sks dog, sks dog in the snow]'
```

Values are YAML: `null`, `true`/`false`, numbers (`3e-4`), strings and `[a, b]` lists. Strings
may refer to other keys with `${...}` interpolation, e.g. `data.cache_dir: ${train.output_dir}/cache`.

`flowtune validate <recipe> [key=value ...]` loads a recipe with its overrides, checks it and
prints the merged result, without loading any model. Every mistake is reported in one line that
names the key, for example:

```text
unknown key 'train.max_step' — did you mean 'train.max_steps'?
invalid value 'abc' for 'train.max_steps': expected an integer
invalid value 'banana' for 'flow.timestep_sampling'; allowed values: uniform, logit_normal, mode, lognorm, mix, beta
```

Conventions: sigma = 1 is pure noise and sigma = 0 is data; x_t = (1 - sigma) x0 + sigma noise and
the model predicts the velocity noise - x0. "Steps" are optimizer steps (one step =
`train.gradient_accumulation` micro-batches).
"""


def _inline(value: Any) -> str:
    """A default value in YAML flow style."""
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, float):
        return repr(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def type_text(tp: Any) -> str:
    """A short type name for the reference: ``int``, ``str | null``, ``one of: a, b``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union or origin is UnionType:
        parts = [type_text(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " \\| ".join(parts)
    if origin is Literal:
        return "one of: " + ", ".join(f"`{_inline(a)}`" for a in args)
    if origin is list:
        inner = args[0] if args else Any
        if get_origin(inner) is Literal:
            return "list of: " + ", ".join(f"`{_inline(a)}`" for a in get_args(inner))
        return f"list[{type_text(inner)}]"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def default_text(spec: SchemaField) -> str:
    """The default of a key for the reference; ``**required**`` when it has none."""
    if spec.default == MISSING:
        return "**required**"
    return f"`{_inline(spec.default)}`"


def _escape(text: str) -> str:
    """One table cell: newlines joined, ``|`` escaped, ``*`` escaped outside code spans."""
    text = " ".join(text.split())
    pieces = re.split(r"(`[^`]*`)", text)
    out = []
    for piece in pieces:
        if piece.startswith("`") and piece.endswith("`") and len(piece) >= 2:
            out.append(piece.replace("|", "\\|"))
        else:
            out.append(piece.replace("|", "\\|").replace("*", "\\*"))
    return "".join(out)


def render_recipe_docs() -> str:
    """The complete Markdown reference of every recipe key."""
    fields = schema_fields()
    section_docs = field_docs(Recipe)
    lines = [
        "# Recipe reference",
        "",
        f"<!-- Generated from the field docstrings in flowtune/recipe/schema.py by {GENERATOR}; "
        "do not edit by hand. -->",
        "",
        _INTRO,
        "## Sections",
        "",
    ]
    for section in section_classes():
        lines.append(f"- [`{section}`](#{section}): {_escape(section_docs.get(section, ''))}")
    lines.append("")
    for section, cls in section_classes().items():
        lines += [f"## {section}", ""]
        if cls.__doc__:
            lines += [_escape(cls.__doc__), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for spec in fields:
            if spec.section != section:
                continue
            lines.append(
                f"| `{spec.key}` | {type_text(spec.type)} | {default_text(spec)} | {_escape(spec.doc)} |"
            )
        lines.append("")
    lines += _family_table()
    return "\n".join(lines).rstrip("\n") + "\n"


def _family_table() -> list[str]:
    """The ``model.family`` values, from the registry (:mod:`flowtune.families`)."""
    from flowtune.families import FAMILIES

    lines = [
        "## Model families",
        "",
        "The values of `model.family`, from the family registry (`flowtune/families/`). *guidance*: the "
        "pipeline argument that `validation.guidance` and `flowtune sample --guidance` set, with the "
        "family's default; *negative prompt*: the default of `validation.negative_prompt` (none: the "
        "family takes none); *references*: whether it edits reference images (`data.edit_pairs`, "
        "`validation.images`, `flowtune sample --image`); *frames*: a video family's clip lengths "
        "(`validation.frames`, `flowtune sample --frames`) and frame rate (images: one frame).",
        "",
        "| family | diffusers pipeline | guidance | negative prompt | references | frames | what it is |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in FAMILIES.values():
        references = (
            "optional" if spec.references_optional else ("required" if spec.reference_images else "no")
        )
        negative = "none" if spec.negative_prompt is None else f"`{json.dumps(spec.negative_prompt)}`"
        g = spec.frame_granularity
        frames = f"{g}n + 1 at {spec.fps} fps" if g else "image"
        lines.append(
            f"| `{spec.name}` | `{spec.pipeline_class}` | `{spec.guidance_argument}` = {spec.guidance:g} "
            f"| {negative} | {references} | {frames} | {_escape(spec.description)} |"
        )
    return [*lines, ""]
