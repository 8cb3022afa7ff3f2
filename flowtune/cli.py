"""The ``flowtune`` command line (Typer).

Commands print one-line messages for user mistakes (exit 2) and never a traceback; see
:class:`flowtune.errors.FlowtuneError`.  Heavy libraries (torch, diffusers) are imported inside
the commands that need them so that ``flowtune --help``, ``flowtune recipes`` and ``flowtune
validate`` stay fast (a test checks that they do not import torch).  Output goes through
:func:`flowtune.console.make_console` consoles, which never read user text as rich markup.

Exit status (the table in the README): 0 done; 1 the loss diverged, or preprocess could cache
nothing; 2 a user, input or environment error (one line, no traceback); 130 / 143 stopped by
SIGINT / SIGTERM.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from flowtune import __version__
from flowtune.console import PlainTable, error_text, make_console, ok_text, warning_text
from flowtune.errors import FlowtuneError
from flowtune.families import FAMILIES, family_names, reference_family_names
from flowtune.quiet import quiet_libraries

app = typer.Typer(
    name="flowtune",
    help="Fine-tune flow-matching diffusion transformers (FLUX.1, ...) with YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = make_console()
err = make_console(stderr=True)

RecipeArg = Annotated[
    str, typer.Argument(help="A recipe YAML file, or the name of a bundled recipe (see `flowtune recipes`).")
]
NumProcessesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-processes",
        help="Run on N processes of this machine (one per GPU) through Accelerate's launcher; "
        "the same as `accelerate launch --multi_gpu --num_processes N -m flowtune ...`.",
        show_default="1 (or as launched)",
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as dotted key=value pairs, e.g. train.max_steps=10 optimizer.lr=3e-4.",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        out.print(f"flowtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune flow-matching diffusion transformers with YAML recipes."""


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Check a recipe (with overrides) and print it fully resolved, every default filled in."""
    from flowtune.recipe import load_recipe, recipe_to_yaml, resolve_recipe_path

    path = resolve_recipe_path(recipe)
    resolved = load_recipe(path, overrides or [])
    sys.stdout.write(recipe_to_yaml(resolved))
    err.print(ok_text(f"{path} is a valid recipe"))


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes with a one-line description each."""
    from flowtune.recipe import bundled_recipes

    table = PlainTable(box=None, show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("description")
    for entry in bundled_recipes():
        table.add_row(entry.name, entry.description)
    out.print(table)
    out.print(
        "Use one by name (`flowtune validate NAME`), or start your own: `flowtune cp NAME my-recipe.yaml`."
    )


@app.command("cp")
def copy_recipe(
    name: Annotated[str, typer.Argument(help="A bundled recipe (`flowtune recipes` lists them).")],
    dest: Annotated[Path, typer.Argument(help="The file to write, or a folder to write NAME.yaml in.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite DEST if it exists.")] = False,
) -> None:
    """Copy a bundled recipe to DEST to start a recipe of your own."""
    from flowtune.fileio import atomic_write_bytes, write_errors
    from flowtune.recipe import bundled_recipes, resolve_recipe_path
    from flowtune.recipe.load import recipe_base

    bundled = {b.name: b for b in bundled_recipes()}
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    if stem not in bundled:
        resolve_recipe_path(stem)  # not a bundled name: one line with the closest names
        raise FlowtuneError(f"{name!r} is a file, not a bundled recipe; copy it with cp")
    source = bundled[stem].path
    target = dest / source.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise FlowtuneError(f"{target} already exists; pass --force to overwrite it, or give another DEST")
    if not target.parent.is_dir():
        raise FlowtuneError(f"{target.parent} is not a folder; create it first")
    with write_errors(target, what="the recipe"):
        atomic_write_bytes(target, source.read_bytes(), what="the recipe")
    base = recipe_base(source)
    err.print(ok_text(f"copied {stem} to {target}"))
    if base is not None:
        err.print(
            f"it builds on the bundled recipe {base!r} (its `base:` key), whose keys it does not repeat"
        )
    err.print(
        f"edit it (data.source, validation.prompts, train.output_dir), then `flowtune validate {target}`"
    )


def _tiny_variants() -> str:
    """The families' tiny variants for ``make-tiny --help``: ``family: a, b; ...``."""
    return "; ".join(
        f"{name}: {', '.join(variant for variant, _ in spec.tiny_variants)}"
        for name, spec in FAMILIES.items()
        if spec.tiny_variants
    )


@app.command("make-tiny")
def make_tiny_command(
    family: Annotated[str, typer.Argument(help=f"Model family: one of {', '.join(family_names())}.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the diffusers-format pipeline to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT_DIR.")] = False,
    variant: Annotated[
        str | None,
        typer.Option(help=f"Another checkpoint kind of FAMILY ({_tiny_variants()})."),
    ] = None,
) -> None:
    """Write a tiny random pipeline of FAMILY (offline, for tests and demos) to OUT_DIR."""
    from flowtune.tiny import make_tiny

    quiet_libraries()
    path = make_tiny(family, out_dir, seed=seed, overwrite=overwrite, variant=variant)
    kind = f" {variant}" if variant else ""
    err.print(ok_text(f"tiny {family}{kind} pipeline written to {path}"))


def _relaunched(
    command: str,
    recipe: str,
    overrides: list[str] | None,
    num_processes: int | None,
    options: tuple[str, ...] = (),
) -> None:
    """With ``--num-processes N``: run the same command (with ``options``, e.g. ``--verify``) on N
    processes and exit with its status."""
    if num_processes is None:
        return
    from flowtune.distributed import relaunch
    from flowtune.recipe import load_recipe, resolve_recipe_path

    load_recipe(resolve_recipe_path(recipe), overrides or [])  # a bad recipe fails once, here
    raise typer.Exit(relaunch(command, [recipe, *(overrides or []), *options], num_processes))


@app.command()
def preprocess(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    num_processes: NumProcessesOpt = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Read every tensor of every cache shard (not only their headers) and hash every "
            "image file again (not trusting its size and mtime); re-encode whatever fails or changed.",
        ),
    ] = False,
) -> None:
    """Encode the recipe's dataset (VAE latents, text embeddings) into data.cache_dir.

    Incremental: only images and captions that changed since the last run are encoded, and an
    interrupted run continues where it stopped; cache shards that no longer read back are
    re-encoded.  Exit status 1 if nothing could be cached.  Launched on several processes, each
    encodes its share into its own shards.
    """
    from flowtune.data.preprocess import preprocess as run_preprocess
    from flowtune.distributed import is_main_process
    from flowtune.recipe import load_recipe, resolve_recipe_path

    _relaunched("preprocess", recipe, overrides, num_processes, ("--verify",) if verify else ())
    quiet_libraries()
    resolved = load_recipe(resolve_recipe_path(recipe), overrides or [])
    try:
        report = run_preprocess(resolved, console=out, verify=verify)
    except KeyboardInterrupt:
        if is_main_process():
            err.print(
                "interrupted: everything encoded so far is saved in "
                f"{resolved.data.cache_dir}; run the same command again to continue"
            )
        raise typer.Exit(130) from None
    if report.items == 0:
        if is_main_process():
            err.print(error_text("nothing could be cached: every item had a problem (see above)"))
        raise typer.Exit(1)
    if is_main_process():
        err.print(
            ok_text(f"{report.items} item{'s' if report.items != 1 else ''} cached in {report.cache_dir}")
        )


@app.command()
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    num_processes: NumProcessesOpt = None,
    gpu_memory: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory",
            help="Plan against a GPU of this many GiB (default: the GPU's own memory) and warn before "
            "loading the model if the step will not fit.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train a LoRA (or the full transformer) on the recipe's preprocessed cache.

    Writes checkpoints, metrics.jsonl and the final weights to train.output_dir.  Ctrl-C or
    SIGTERM finishes the current step, saves a checkpoint and exits (130 / 143); continue with
    train.resume=latest.  Exit status 1 if the loss diverges.  On several processes (--num-processes,
    accelerate launch or torchrun) the global batch is train.batch_size x processes x
    train.gradient_accumulation; see docs/distributed.md.
    """
    from flowtune.distributed import is_main_process
    from flowtune.recipe import load_recipe, resolve_recipe_path
    from flowtune.train.signals import TrainingInterrupted
    from flowtune.train.trainer import Trainer

    if gpu_memory is not None and not gpu_memory > 0:
        raise FlowtuneError(
            f"--gpu-memory {gpu_memory:g}: give the GPU's memory in GiB, e.g. --gpu-memory 24"
        )
    options = ("--gpu-memory", f"{gpu_memory:g}") if gpu_memory is not None else ()
    _relaunched("train", recipe, overrides, num_processes, options)
    quiet_libraries()
    resolved = load_recipe(resolve_recipe_path(recipe), overrides or [])
    try:
        result = Trainer(resolved, console=out, gpu_memory=gpu_memory).run()
    except TrainingInterrupted as stop:
        if is_main_process():
            err.print(Text(str(stop), style="yellow"))
        raise typer.Exit(stop.exit_code) from None
    if is_main_process():
        err.print(ok_text(f"trained to step {result.step}; weights in {result.final_dir}"))


@app.command()
def sample(
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="A prompt; repeat for several.", show_default=False),
    ] = None,
    ckpt: Annotated[
        Path | None,
        typer.Option(
            help="A flowtune checkpoint: OUTPUT/final, OUTPUT/checkpoints/step-N or a run's output "
            "directory. Base model and defaults come from its recipe.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="A base model (Hub id or diffusers directory) with an optional --lora; with --ckpt, "
            "the base model to use instead of the recipe's model.pretrained.",
            show_default=False,
        ),
    ] = None,
    lora: Annotated[
        Path | None, typer.Option(help="A LoRA file to load into --model.", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="A text file with one prompt per line.", show_default=False)
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            help=f"Image-editing families ({', '.join(reference_family_names())}): the reference image to "
            "edit; one for all "
            "prompts or one per prompt.",
            show_default="the recipe's validation.images",
        ),
    ] = None,
    control_resize: Annotated[
        str | None,
        typer.Option(
            help="With --image: pipeline (the family's pipeline resizes the reference its own way) "
            "or match_target (resized to the output size), as the LoRA was trained.",
            show_default="the recipe's data.control_resize, else pipeline",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of each prompt's first image (image j: seed + j).", show_default="recipe or 42"
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.", show_default="recipe or 28")] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Guidance: the family's guidance argument (distilled guidance or classifier-free "
            "guidance scale; the families table of docs/recipes.md).",
            show_default="recipe, else the family's",
        ),
    ] = None,
    guidance_2: Annotated[
        float | None,
        typer.Option(
            "--guidance-2",
            help="Two-expert models (Wan 2.2 A14B): the low-noise expert's classifier-free guidance "
            "scale (the pipeline's guidance_scale_2); --guidance is then the high-noise expert's.",
            show_default="recipe, else --guidance",
        ),
    ] = None,
    negative_prompt: Annotated[
        str | None,
        typer.Option(
            help="The negative prompt of the families that take one ("
            + ", ".join(name for name, spec in FAMILIES.items() if spec.negative_prompt is not None)
            + ").",
            show_default="recipe, else the family's",
        ),
    ] = None,
    height: Annotated[
        int | None, typer.Option(help="Height in pixels.", show_default="recipe or 1024")
    ] = None,
    width: Annotated[int | None, typer.Option(help="Width in pixels.", show_default="recipe or 1024")] = None,
    frames: Annotated[
        int | None,
        typer.Option(
            help="Video families ("
            + ", ".join(name for name, spec in FAMILIES.items() if spec.frame_granularity > 0)
            + "): frames per clip (granularity n + 1, e.g. 4n + 1); writes an MP4 and a frame strip.",
            show_default="recipe's validation.frames, else the pipeline's",
        ),
    ] = None,
    fps: Annotated[
        int | None,
        typer.Option(help="Video families: the MP4's frame rate.", show_default="the family's"),
    ] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    lora_scale: Annotated[float, typer.Option(help="LoRA strength (1 = as trained).")] = 1.0,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Output directory (numbering continues after existing images).")
    ] = Path("samples"),
    device: Annotated[
        str | None, typer.Option(help="Device, e.g. cuda, cuda:1, cpu.", show_default="cuda if available")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="bfloat16, float16 or float32.", show_default="recipe's, else bfloat16 on GPU"),
    ] = None,
    cpu_offload: Annotated[
        bool,
        typer.Option("--cpu-offload", help="Move each model to the GPU only while it runs (less memory)."),
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Store the transformer's linear weights as int8, fp8 or nf4 (none: as loaded); a LoRA "
            "loads on top.",
            show_default="the recipe's model.quantize, else none",
        ),
    ] = None,
    encoder_quantize: Annotated[
        str | None,
        typer.Option(
            help="Store the text encoders' linear weights as int8, fp8 or nf4 (none: as loaded).",
            show_default="the recipe's model.encoder_quantize, else none",
        ),
    ] = None,
    block_offload: Annotated[
        str | None,
        typer.Option(
            help="Keep this many transformer blocks on the GPU and stream the others from CPU "
            "memory (none: all on the GPU); the prompts are encoded first and the text encoders "
            "freed.",
            show_default="the recipe's train.block_offload, else none",
        ),
    ] = None,
) -> None:
    """Generate images with a trained checkpoint (or a base model and a LoRA) through the
    family's diffusers pipeline; writes OUT/NNNNNN.png, OUT/samples.jsonl and OUT/grid.png."""
    from flowtune.sample import SampleSettings, read_prompts, source_from_checkpoint, source_from_model
    from flowtune.sample import sample as run_sample

    quiet_libraries()
    if ckpt is None and model is None:
        raise FlowtuneError("give --ckpt CHECKPOINT, or --model MODEL (with --lora FILE)")
    if lora is not None and ckpt is not None:
        raise FlowtuneError("--lora goes with --model; a --ckpt brings its own LoRA")
    if dtype is not None and dtype not in ("bfloat16", "float16", "float32"):
        raise FlowtuneError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    for option, mode in (("--quantize", quantize), ("--encoder-quantize", encoder_quantize)):
        if mode is not None and mode != "none":
            _check_quantize_option(option, mode)
    source = (
        source_from_checkpoint(ckpt, base_model=model) if ckpt is not None else source_from_model(model, lora)
    )
    prompts = read_prompts(prompt or [], prompts_file)
    if quantize is not None:
        source.quantize = None if quantize == "none" else quantize
    if encoder_quantize is not None:
        source.encoder_quantize = None if encoder_quantize == "none" else encoder_quantize
    if block_offload is not None:
        if block_offload != "none" and not block_offload.isdigit():
            raise FlowtuneError(
                f"--block-offload {block_offload!r}: give the number of blocks to keep on the GPU, or none"
            )
        source.block_offload = None if block_offload == "none" else int(block_offload)
    if control_resize is not None:
        if control_resize not in ("pipeline", "match_target", "kontext"):
            raise FlowtuneError(f"--control-resize {control_resize!r}: choose pipeline or match_target")
        source.control_resize = control_resize
    images: list[str | Path] = list(image or [])
    if not prompts and prompt is None and prompts_file is None:
        prompts = source.prompts  # a checkpoint's validation prompts (with their images)
        images = images or list(source.images)
    given = {
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "guidance_2": guidance_2,
        "height": height,
        "width": width,
        "negative_prompt": negative_prompt,
        "frames": frames,
        "fps": fps,
    }
    settings = SampleSettings(
        **{**source.defaults, **{k: v for k, v in given.items() if v is not None}},
        num_images=num_images,
        lora_scale=lora_scale,
    )
    total = len(prompts) * settings.num_images
    noun = "clip" if source.spec.frame_granularity > 0 else "image"  # video families sample clips
    weights = source.checkpoint or source.lora_file
    step = f" (step {source.step})" if source.step is not None else ""
    out.print(
        f"sampling {total} {noun}{'s' if total != 1 else ''} with {source.spec.name} {source.pretrained}"
        + (f" + {weights}{step}" if weights else "")
    )

    def progress(done: int, _: int, path: Path) -> None:
        out.print(f"  {done}/{total} {path}")

    result = run_sample(
        source,
        prompts,
        settings,
        out_dir,
        device=device,
        dtype=dtype,
        cpu_offload=cpu_offload,
        progress=progress,
        images=images,
    )
    for warning in result.warnings:
        err.print(warning_text(warning))
    err.print(
        ok_text(
            f"{len(result.images)} {noun}{'s' if len(result.images) != 1 else ''} in {out_dir} (grid: {result.grid})"
        )
    )


def _check_quantize_option(option: str, mode: str) -> None:
    """Refuse a ``flowtune sample`` quantization mode that is unknown or needs a missing package."""
    from flowtune.memory.quantize import QUANTIZE_MODES, check_quantize_available

    if mode not in QUANTIZE_MODES:
        raise FlowtuneError(f"{option} {mode!r}: choose {', '.join(QUANTIZE_MODES)} or none")
    check_quantize_available(mode, option)


@app.command("make-dataset")
def make_dataset_command(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write images and .txt captions to.")],
    count: Annotated[int, typer.Option(help="Number of images.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the shapes and colours.")] = 0,
    size: Annotated[
        list[str] | None,
        typer.Option(help="Image size WxH; repeat for several (cycled).", show_default="64x64"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace images and captions in OUT_DIR.")
    ] = False,
    edit_pairs: Annotated[
        bool,
        typer.Option(
            "--edit-pairs",
            help=f"Write edit pairs for image-editing families ({', '.join(reference_family_names())}): "
            "OUT_DIR/images/ (the "
            "shape recoloured, with the instruction as caption) and OUT_DIR/control/ (the original).",
        ),
    ] = False,
    control_size: Annotated[
        list[str] | None,
        typer.Option(
            help="With --edit-pairs: control image size WxH; repeat for several.", show_default="--size"
        ),
    ] = None,
    video: Annotated[
        bool,
        typer.Option(
            "--video",
            help="Write clips for video families: a small shape moving across the frame, with its "
            "motion in the caption (OUT_DIR/0000.mp4 + 0000.txt, ...).",
        ),
    ] = False,
    frames: Annotated[int, typer.Option(help="With --video: frames per clip.")] = 17,
    fps: Annotated[int, typer.Option(help="With --video: frames per second.")] = 16,
    video_format: Annotated[str, typer.Option(help="With --video: mp4 or gif.")] = "mp4",
) -> None:
    """Write a synthetic dataset: coloured shapes with captions that describe them (for demos)."""
    from flowtune.data.synthetic import (
        make_edit_pairs_dataset,
        make_shapes_dataset,
        make_video_dataset,
        parse_size,
    )

    sizes = [parse_size(s) for s in size or ["64x64"]]
    if video:
        if edit_pairs or control_size:
            raise FlowtuneError("--video cannot be combined with --edit-pairs or --control-size")
        paths = make_video_dataset(
            out_dir,
            count,
            seed=seed,
            sizes=sizes,
            frames=frames,
            fps=fps,
            video_format=video_format,
            overwrite=overwrite,
        )
        err.print(ok_text(f"{len(paths)} clips with captions written to {out_dir}"))
        return
    if edit_pairs:
        control_sizes = [parse_size(s) for s in control_size] if control_size else None
        paths = make_edit_pairs_dataset(
            out_dir, count, seed=seed, sizes=sizes, control_sizes=control_sizes, overwrite=overwrite
        )
        err.print(ok_text(f"{len(paths)} edit pairs written to {out_dir} (images/, control/)"))
        return
    if control_size:
        raise FlowtuneError("--control-size goes with --edit-pairs")
    paths = make_shapes_dataset(out_dir, count, seed=seed, sizes=sizes, overwrite=overwrite)
    err.print(ok_text(f"{len(paths)} images with captions written to {out_dir}"))


@app.command()
def export(
    ckpt: Annotated[
        Path,
        typer.Option(
            "--ckpt",
            help="A checkpoint: OUTPUT/final, OUTPUT/checkpoints/step-000250, or a run's output directory.",
            show_default=False,
        ),
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="LoRA layout: diffusers (diffusers, ComfyUI), comfyui or kohya (kohya sd-scripts, "
            "ComfyUI, Forge).",
            show_default="diffusers",
        ),
    ] = None,
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="File to write (a directory with --merge).",
            show_default="RUN/export/RUN-CHECKPOINT-FORMAT.safetensors",
        ),
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Write the base transformer with the LoRA merged in.")
    ] = False,
    lora_scale: Annotated[float, typer.Option("--lora-scale", help="Strength of the merged LoRA.")] = 1.0,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="float32, bfloat16 or float16: of the LoRA weights, or of the merged transformer.",
            show_default="as stored; model.dtype with --merge",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="With --merge: the base model to merge into.", show_default="the recipe's model.pretrained"
        ),
    ] = None,
) -> None:
    """Export a trained LoRA for other tools (ComfyUI, kohya, diffusers), or merge it into the transformer."""
    from flowtune.interop import export as run_export

    quiet_libraries()
    result = run_export(
        ckpt,
        fmt,
        out_path,
        merge=merge,
        lora_scale=lora_scale,
        dtype=dtype,
        overwrite=overwrite,
        base_model=model,
    )
    if result.format == "merged":
        what = f"transformer with {result.modules} LoRA modules merged (scale {lora_scale:g})"
    elif result.original_modules is None:
        what = f"{result.modules} LoRA modules ({result.format})"
    else:
        what = f"{result.modules} LoRA modules as {result.original_modules} {result.format} modules"
    paths = " and ".join(str(p) for p in (result.path, *result.more))  # more: a second expert's
    err.print(ok_text(f"{what} written to {paths}"))


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    gpu_memory: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory",
            help="GPU memory in GiB: say whether each phase fits, and what to change where not.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON (bytes).")] = False,
) -> None:
    """Predict the peak GPU memory of RECIPE's training step, preprocess, validation images and
    flowtune sample, without downloading weights.

    Traces the step on fake tensors at the largest resolution bucket and train.batch_size; see
    docs/training.md "Planning memory" for what it counts and its measured error.
    """
    import json

    from flowtune.console import format_bytes, key_value_table
    from flowtune.families import get_family
    from flowtune.memory.report import build_report
    from flowtune.recipe import load_recipe, resolve_recipe_path

    quiet_libraries()
    if gpu_memory is not None and not gpu_memory > 0:
        raise FlowtuneError(
            f"--gpu-memory {gpu_memory:g}: give the GPU's memory in GiB, e.g. --gpu-memory 24"
        )
    resolved = load_recipe(resolve_recipe_path(recipe), overrides or [])
    report = build_report(resolved, get_family(resolved.model.family), gpu_memory)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
        return
    step = report.step
    rows = [
        *step.settings,
        ("frozen weights", format_bytes(step.weights)),
        ("LoRA weights", format_bytes(step.lora)),
        ("LoRA gradients", format_bytes(step.gradients)),
        ("optimizer states", format_bytes(step.optimizer)),
        ("activations and temporaries", format_bytes(step.activations)),
    ]
    if step.offload_saved:
        rows.append(("saved by block offload", "-" + format_bytes(step.offload_saved)))
    rows.append(("peak of a training step", format_bytes(step.peak)))
    titles = {
        "preprocess": "peak of flowtune preprocess",
        "validation": "peak of validation images",
        "sample": "peak of flowtune sample",
    }
    for phase in report.phases:
        parts = "; ".join(f"{what} {format_bytes(size)}" for what, size in phase.parts)
        rows.append((titles[phase.name], f"{format_bytes(phase.peak)} ({parts})"))
    out.print(key_value_table("flowtune plan", rows))
    if gpu_memory is None:
        return
    fits = report.fits(step.peak)
    if fits:
        err.print(
            ok_text(f"the training step fits a {gpu_memory:g} GiB GPU (plus its CUDA context, ~0.5 GiB)")
        )
    else:
        err.print(
            warning_text(
                f"the training step does not fit a {gpu_memory:g} GiB GPU: needs {format_bytes(step.peak)}"
            )
        )
        if report.changes:
            err.print(
                f"changes that fit it, cheapest first (flowtune plan {recipe} ... KEY=VALUE to check one):"
            )
            for change in report.changes:
                err.print(f"  {' '.join(change.overrides)}: {format_bytes(change.peak)}; {change.cost}")
        else:
            train = resolved.train
            offload_tried = train.gradient_checkpointing and train.distributed != "fsdp"
            tried = (
                "model.quantize, train.block_offload or train.activation_offload"
                if offload_tried
                else "model.quantize or train.block_offload"
            )
            more = (
                "use a GPU with more memory"
                if train.gradient_checkpointing
                else "turn train.gradient_checkpointing on"
            )
            err.print(f"no {tried} setting fits it; lower data.resolution or train.batch_size, or {more}")
    for phase, advice in report.advice:
        err.print(warning_text(f"{titles[phase]} does not fit a {gpu_memory:g} GiB GPU: {advice}"))


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one-line messages.

    Typer's standalone mode already reports usage errors (unknown command or option) in one
    message with exit status 2; flowtune's own user errors are handled here the same way, and so
    is any write the file system refuses (:data:`flowtune.fileio.WRITE_ERRNOS`, torch.save's
    stream errors) that a command did not already turn into a message.
    """
    from flowtune.allocator import configure_allocator
    from flowtune.distributed import rank_tag, shutdown
    from flowtune.fileio import write_failure_message

    configure_allocator()  # before torch is imported: expandable segments (flowtune.allocator)
    quiet_libraries()
    try:
        try:
            app()
        finally:
            shutdown()
    except FlowtuneError as exc:
        err.print(error_text(str(exc), rank_tag()))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print(f"interrupted{rank_tag()}")
        sys.exit(130)
    except Exception as exc:
        # A write the file system refused (read-only, full disk, no permission, quota) wherever
        # no command translated it: one line naming the path, never a traceback.
        message = write_failure_message(exc)
        if message is not None:
            err.print(error_text(message, rank_tag()))
            sys.exit(2)
        if rank_tag():  # a bug, not a user error: the traceback, but say which process it was
            err.print(error_text(f"{type(exc).__name__}: {exc}", rank_tag()))
        raise


if __name__ == "__main__":
    main()
