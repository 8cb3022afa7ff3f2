"""Hardening of the command line (issue 16, points 8, 9 and 11).

- User text is never read as rich markup: ``[dev]`` and ``[/]`` in paths, prompts, recipe
  descriptions and messages print as they are, through preprocess, train and sample.
- A model folder of another family is refused in one line naming its pipeline class.
- Messages: a finished run resumed, SIGTERM, plurals, precision, a checkpoint whose base model
  moved; ``--help``, ``recipes`` and ``validate`` do not import torch.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from flowtune.console import (
    PlainTable,
    error_text,
    key_value_table,
    make_console,
    ok_text,
    text_column,
    warning_text,
)
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from tests.helpers import REPO

# A path holding a closing tag that crashed rich (nothing to close), then a tag it swallowed.
WEIRD = ("a[", "]b", "runs[x]")
PROMPT = "a [dev] circle [/] in red"


def _text(console: Console) -> str:
    return console.export_text(clear=False)


# ------------------------------------------------------------------------------ console helpers


@pytest.mark.parametrize("markup", [True, False])
def test_tables_messages_and_progress_columns_print_brackets_as_they_are(markup: bool) -> None:
    """On a console with markup on (as callers may pass) or off (flowtune's), nothing is parsed."""
    console = Console(record=True, width=200, markup=markup)
    text = "teach FLUX.1 [dev] a subject in /data/a[/]b [bold]x"
    console.print(key_value_table("title [x]", [("path [/]", text)]))
    table = PlainTable(title="[dev]")
    table.add_column("recipe")
    table.add_row(text)
    console.print(table)
    for message in (ok_text(text), warning_text(text), error_text(text, " (rank 1 of 2)")):
        console.print(message)
    output = _text(console)
    assert output.count(text) == 5 and "title [x]" in output and "path [/]" in output
    assert "error (rank 1 of 2): " in output and "warning: " in output and "✓ " in output
    column = text_column("{task.description}")
    assert column.render(type("Task", (), {"description": "[/] [dev]"})()).plain == "[/] [dev]"


def test_flowtune_consoles_print_strings_literally() -> None:
    console = make_console(record=True, width=200)
    console.print("[red]not red[/] :smile: [/]")
    assert _text(console).strip() == "[red]not red[/] :smile: [/]"


def test_train_display_and_stop_messages_print_brackets(tmp_path: Path) -> None:
    from flowtune.train.display import TrainDisplay
    from flowtune.train.signals import StopRequest

    console = Console(record=True, width=200)  # markup on
    display = TrainDisplay(console, total_steps=4, start_step=0)
    display.print(f"step      2  validation: samples in {tmp_path}/a[/]b")
    stop = StopRequest(console=display)
    stop._handle(signal.SIGTERM, None)
    output = _text(console)
    assert f"samples in {tmp_path}/a[/]b" in output
    # SIGTERM: no "Ctrl-C again" (there was no Ctrl-C); a repeated SIGTERM is ignored, SIGINT stops.
    assert "SIGTERM received: finishing this step, then saving a checkpoint" in output
    assert "Ctrl-C" not in output and "send SIGINT to stop at once" in output
    stop._handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
    console = Console(record=True, width=200)
    StopRequest(console=console)._handle(signal.SIGINT, None)
    assert "SIGINT received" in _text(console) and "Ctrl-C again to stop at once" in _text(console)


def test_preprocess_summary_prints_problem_paths_as_they_are(tmp_path: Path) -> None:
    from flowtune.data.preprocess import PreprocessReport, Problem, print_summary

    cache = tmp_path / "c[/]ache"
    report = PreprocessReport(
        cache_dir=cache,
        source_kind="folder",
        records=2,
        items=1,
        images_encoded=1,
        texts_encoded=1,
        images_reused=0,
        texts_reused=0,
        buckets={"64x64": 1},
        problems=[Problem("img[/]/[dev].png", "cannot decode [bold]", "error")],
        cache_bytes=10,
    )
    console = Console(record=True, width=200)
    print_summary(report, console)
    output = _text(console)
    assert "error: img[/]/[dev].png: cannot decode [bold]" in output
    assert f"{cache} (" in output and str(cache / "errors.jsonl") in output


# ------------------------------------------------------------------------------ end to end


def _cli(*args: str) -> str:
    """Run ``flowtune ARGS`` in this process (Typer's test runner: no second interpreter to start);
    returns stdout and stderr, checking that it succeeded without a traceback or markup error."""
    from typer.testing import CliRunner

    from flowtune import cli

    widths = cli.out.width, cli.err.width
    cli.out.width = cli.err.width = 400  # no wrapped table cells
    try:
        result = CliRunner().invoke(cli.app, list(args))
    finally:
        cli.out.width, cli.err.width = widths
    assert result.exception is None or result.exit_code == 0, result.output
    assert result.exit_code == 0, result.output
    assert "MarkupError" not in result.output
    return result.output


@pytest.fixture(scope="module")
def weird(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny FLUX.1 model, 4 images, a recipe, and `flowtune preprocess` + `flowtune train`
    (2 steps, a validation image) run on them, everything under a path holding ``[x]`` and ``[/]``."""
    from flowtune.data.synthetic import make_shapes_dataset
    from flowtune.tiny import make_tiny

    root = tmp_path_factory.mktemp("hardening").joinpath(*WEIRD)
    model = make_tiny("flux", root / "tiny-flux")
    make_shapes_dataset(root / "data", 4, seed=0, sizes=[(64, 64)])
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"family": "flux", "pretrained": str(model), "dtype": "float32"},
                "lora": {"rank": 2, "alpha": 2},
                "data": {
                    "source": str(root / "data"),
                    "cache_dir": str(root / "cache"),
                    "resolution": 64,
                    "max_sequence_length": 16,
                },
                "train": {
                    "output_dir": str(root / "run"),
                    "max_steps": 2,
                    "seed": 0,
                    "mixed_precision": "no",
                    "checkpoint_every": 2,
                },
                "validation": {"prompts": [PROMPT], "every": 0, "steps": 1, "height": 32, "width": 32},
            }
        )
    )
    preprocessed = _cli("preprocess", str(recipe))
    trained = _cli("train", str(recipe))
    return {"root": root, "model": model, "recipe": recipe, "preprocess": preprocessed, "train": trained}


def test_preprocess_and_train_print_bracketed_paths(weird: dict) -> None:
    root = weird["root"]
    assert "[/]" in str(root) and "[x]" in str(root)
    assert f"{root / 'cache'} (" in weird["preprocess"]  # the summary
    assert f"4 items cached in {root / 'cache'}" in weird["preprocess"]
    for fragment in (
        f"from {root / 'cache'}",  # the banner
        f"{root / 'run'} (checkpoints every 2 steps)",
        "1 sample per step = 1 x 1 process x 1 accumulation",
        "float32 (no mixed precision) on cpu",
        f"samples in {root / 'run' / 'samples'}",  # the validation message
        str(root / "run" / "final" / "pytorch_lora_weights.safetensors"),  # the summary
        f"trained to step 2; weights in {root / 'run' / 'final'}",
    ):
        assert fragment in weird["train"], fragment


def test_sample_prints_bracketed_paths_and_keeps_bracketed_prompts(weird: dict) -> None:
    from PIL import Image

    root = weird["root"]
    out = root / "samples[/]"
    output = _cli(
        "sample", "--ckpt", str(root / "run"), "-p", PROMPT, "--steps", "1", "--height", "32",
        "--width", "32", "--out", str(out),
    )  # fmt: skip
    assert f"with flux {weird['model']} + {root / 'run' / 'final'} (step 2)" in output
    assert f"1/1 {out / '000000.png'}" in output
    assert f"1 image in {out} (grid: {out / 'grid.png'})" in output
    assert Image.open(out / "000000.png").text["prompt"] == PROMPT


def test_help_recipes_and_validate_import_no_torch_and_print_brackets(weird: dict) -> None:
    """One interpreter runs the commands in turn, as `python -m flowtune` does, and reports what
    each printed and whether torch or diffusers had been imported by then."""
    script = """
import contextlib, io, json, sys
from flowtune.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["flowtune", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exit:
            code = exit.code
    heavy = [name for name in ("torch", "diffusers", "transformers") if name in sys.modules]
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy})
print(json.dumps(results))
"""
    missing = weird["root"] / "missing.yaml"
    bundled = REPO / "recipes" / "flux2-dev-lora.yaml"  # with model.adapter arguments
    commands = [
        ["--help"],
        ["recipes"],
        ["validate", str(weird["recipe"])],
        ["validate", str(missing)],
        ["validate", str(bundled)],
    ]
    env = {"HF_HUB_OFFLINE": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    help_, recipes, valid, invalid, adapter = json.loads(done.stdout)
    assert help_["code"] == 0 and "preprocess" in help_["out"]
    assert recipes["code"] in (0, None) and "teach FLUX.1 [dev] a subject" in recipes["out"]
    assert valid["code"] in (0, None) and f"✓ {weird['recipe']} is a valid recipe" in valid["err"]
    assert invalid["code"] == 2 and str(missing) in invalid["err"]
    assert invalid["err"].startswith("error: ") and invalid["err"].count("\n") == 1
    assert adapter["code"] in (0, None) and "is a valid recipe" in adapter["err"], adapter["err"]
    assert [r["heavy"] for r in (help_, recipes, valid, invalid, adapter)] == [[], [], [], [], []]


# ------------------------------------------------------------------------------ messages (point 11)


def test_resuming_a_finished_run_says_it_is_complete_and_how_to_extend_it(weird: dict) -> None:
    from flowtune.recipe import load_recipe
    from flowtune.train.trainer import Trainer

    console = Console(record=True, width=300)
    recipe = load_recipe(weird["recipe"], ["train.resume=latest", "validation.prompts=[]"])
    result = Trainer(recipe, console=console).run()
    assert result.step == 2
    output = _text(console)
    assert "0 this run (2 -> 2)" in output
    assert "the run was already complete at train.max_steps=2" in output
    assert "train.max_steps=4 train.resume=latest" in output


def test_sample_from_a_checkpoint_whose_base_model_moved_suggests_model(weird: dict, tmp_path: Path) -> None:
    from flowtune.sample import SampleSettings, sample, source_from_checkpoint

    checkpoint = shutil.copytree(weird["root"] / "run" / "final", tmp_path / "final")
    recipe = yaml.safe_load((checkpoint / "recipe.yaml").read_text())
    recipe["model"]["pretrained"] = "models/local/tiny-flux"  # relative: resolved elsewhere
    (checkpoint / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(FlowtuneError) as info:
        sample(source_from_checkpoint(checkpoint), ["x"], SampleSettings(height=32, width=32), tmp_path)
    message = str(info.value)
    assert "give another with --model" in message and "'models/local/tiny-flux' does not exist" in message
    assert str(checkpoint / "recipe.yaml") in message and "\n" not in message


# ------------------------------------------------------------------------------ families (point 9)


@pytest.fixture(scope="module")
def other_families(weird: dict) -> dict[str, Path]:
    """Tiny FLUX.1 Kontext and FLUX.2 folders next to the FLUX.1 one."""
    from flowtune.tiny import make_tiny

    root = weird["root"]
    return {
        "flux": weird["model"],
        "flux-kontext": make_tiny("flux-kontext", root / "tiny-kontext"),
        "flux2": make_tiny("flux2", root / "tiny-flux2"),
    }


@pytest.mark.parametrize(
    "family, folder, pipeline",
    [
        ("flux2", "flux", "FluxPipeline"),
        ("flux", "flux2", "Flux2Pipeline"),
        ("flux-kontext", "flux", "FluxPipeline"),
        ("flux", "flux-kontext", "FluxKontextPipeline"),
    ],
)
def test_preprocess_refuses_another_family_s_model_folder(
    other_families: dict, weird: dict, family: str, folder: str, pipeline: str, tmp_path: Path
) -> None:
    from flowtune.data.preprocess import preprocess
    from flowtune.recipe import load_recipe

    model = other_families[folder]
    settings = [f"model.family={family}", f"model.pretrained={model}", f"data.cache_dir={tmp_path / 'cache'}"]
    if get_family(family).reference_images and not get_family(family).references_optional:
        from flowtune.data.synthetic import make_edit_pairs_dataset

        make_edit_pairs_dataset(tmp_path / "pairs", 2, sizes=[(64, 64)])
        settings += [f"data.source={tmp_path / 'pairs'}", "validation.prompts=[]"]
    recipe = load_recipe(weird["recipe"], settings)
    with pytest.raises(FlowtuneError) as info:
        preprocess(recipe, console=make_console(quiet=True))
    assert str(info.value) == (
        f"model.pretrained {str(model)!r} holds a {pipeline} (family {folder}), but the recipe says "
        f"model.family: {family}; set model.family: {folder}, or give a "
        f"{get_family(family).pipeline_class} model"
    )


def test_train_and_sample_refuse_another_family_s_model_folder(
    other_families: dict, weird: dict, tmp_path: Path
) -> None:
    from flowtune.recipe import load_recipe
    from flowtune.sample import SampleSettings, sample, source_from_checkpoint
    from flowtune.train.trainer import Trainer

    # The FLUX.1 folder relabelled as FLUX.2's pipeline: the cache (same path, same encoder files)
    # is accepted, so only the family check can refuse it.
    index_file = weird["model"] / "model_index.json"
    index = index_file.read_text()
    index_file.write_text(json.dumps({**json.loads(index), "_class_name": "Flux2Pipeline"}))
    recipe = load_recipe(weird["recipe"], [f"train.output_dir={tmp_path / 'run'}"])
    try:
        with pytest.raises(
            FlowtuneError, match=r"holds a Flux2Pipeline \(family flux2\), but the recipe says"
        ):
            Trainer(recipe, console=make_console(quiet=True)).run()
    finally:
        index_file.write_text(index)

    source = source_from_checkpoint(weird["root"] / "run", base_model=str(other_families["flux2"]))
    with pytest.raises(FlowtuneError) as info:
        sample(source, ["x"], SampleSettings(height=32, width=32), tmp_path / "out")
    assert str(info.value).startswith(
        f"--model {str(other_families['flux2'])!r} holds a Flux2Pipeline (family flux2), but the recipe "
        "says model.family: flux"
    )


def test_a_hub_model_s_downloaded_index_is_checked(other_families: dict, monkeypatch) -> None:
    import huggingface_hub

    from flowtune.model_files import resolve_pretrained

    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: str(other_families["flux-kontext"])
    )
    with pytest.raises(FlowtuneError, match=r"model.pretrained 'owner/kontext' holds a FluxKontextPipeline"):
        resolve_pretrained("owner/kontext", None, ["transformer"], family=get_family("flux2"))
    kontext = get_family("flux-kontext")
    assert (
        resolve_pretrained("owner/kontext", None, ["transformer"], family=kontext)
        == other_families["flux-kontext"]
    )


def test_an_unknown_pipeline_class_or_unreadable_index_is_one_line(tmp_path: Path) -> None:
    from flowtune.model_files import check_model_family

    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        FlowtuneError, match="holds a StableDiffusionPipeline, which flowtune does not support"
    ):
        check_model_family(folder, get_family("flux"))
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(FlowtuneError, match="cannot read the pipeline class from"):
        check_model_family(folder, get_family("flux"))
