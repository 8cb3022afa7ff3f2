"""The ``flowtune`` command line (Typer).

Commands print one-line messages for user mistakes (exit 2) and never a traceback; see
:class:`flowtune.errors.FlowtuneError`.  Heavy libraries (torch, diffusers) are imported inside
the commands that need them so that ``flowtune --help`` and ``flowtune validate`` stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flowtune import __version__
from flowtune.errors import FlowtuneError
from flowtune.quiet import quiet_libraries

app = typer.Typer(
    name="flowtune",
    help="Fine-tune flow-matching diffusion transformers (FLUX.1, ...) with YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

RecipeArg = Annotated[
    str, typer.Argument(help="A recipe YAML file, or the name of a bundled recipe (see `flowtune recipes`).")
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
    err.print(f"[green]✓[/green] {path} is a valid recipe")


@app.command("recipes")
def list_recipes() -> None:
    """List the bundled recipes with a one-line description each."""
    from flowtune.recipe import bundled_recipes

    table = Table(box=None, show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("description")
    for entry in bundled_recipes():
        table.add_row(entry.name, entry.description)
    out.print(table)
    out.print("Use one with `flowtune validate NAME` or copy its file (the path is recipes/NAME.yaml).")


@app.command("make-tiny")
def make_tiny_command(
    family: Annotated[str, typer.Argument(help="Model family, e.g. flux.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the diffusers-format pipeline to.")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT_DIR.")] = False,
) -> None:
    """Write a tiny random pipeline of FAMILY (offline, for tests and demos) to OUT_DIR."""
    from flowtune.tiny import make_tiny

    quiet_libraries()
    path = make_tiny(family, out_dir, seed=seed, overwrite=overwrite)
    err.print(f"[green]✓[/green] tiny {family} pipeline written to {path}")


@app.command()
def preprocess(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Encode the recipe's dataset (VAE latents, text embeddings) into data.cache_dir.

    Incremental: only images and captions that changed since the last run are encoded, and an
    interrupted run continues where it stopped.  Exit status 1 if nothing could be cached.
    """
    from flowtune.data.cache import preprocess as run_preprocess
    from flowtune.recipe import load_recipe, resolve_recipe_path

    quiet_libraries()
    resolved = load_recipe(resolve_recipe_path(recipe), overrides or [])
    try:
        report = run_preprocess(resolved, console=out)
    except KeyboardInterrupt:
        err.print(
            "interrupted: everything encoded so far is saved in "
            f"{resolved.data.cache_dir}; run the same command again to continue"
        )
        raise typer.Exit(130) from None
    if report.items == 0:
        err.print("[red]error:[/red] nothing could be cached: every item had a problem (see above)")
        raise typer.Exit(1)
    err.print(f"[green]✓[/green] {report.items} items cached in {report.cache_dir}")


@app.command()
def train(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Train a LoRA (or the full transformer) on the recipe's preprocessed cache.

    Writes checkpoints, metrics.jsonl and the final weights to train.output_dir.  Ctrl-C or
    SIGTERM finishes the current step, saves a checkpoint and exits (130 / 143); continue with
    train.resume=latest.  Exit status 1 if the loss diverges.
    """
    from flowtune.recipe import load_recipe, resolve_recipe_path
    from flowtune.train.signals import TrainingInterrupted
    from flowtune.train.trainer import Trainer

    quiet_libraries()
    resolved = load_recipe(resolve_recipe_path(recipe), overrides or [])
    try:
        result = Trainer(resolved, console=out).run()
    except TrainingInterrupted as stop:
        err.print(f"[yellow]{escape(str(stop))}[/yellow]", highlight=False)
        raise typer.Exit(stop.exit_code) from None
    err.print(f"[green]✓[/green] trained to step {result.step}; weights in {result.final_dir}")


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
) -> None:
    """Write a synthetic dataset: coloured shapes with captions that describe them (for demos)."""
    from flowtune.data.synthetic import make_shapes_dataset, parse_size

    sizes = [parse_size(s) for s in size or ["64x64"]]
    paths = make_shapes_dataset(out_dir, count, seed=seed, sizes=sizes, overwrite=overwrite)
    err.print(f"[green]✓[/green] {len(paths)} images with captions written to {out_dir}")


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one-line messages.

    Typer's standalone mode already reports usage errors (unknown command or option) in one
    message with exit status 2; flowtune's own user errors are handled here the same way.
    """
    quiet_libraries()
    try:
        app()
    except FlowtuneError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
