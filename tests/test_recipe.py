"""Recipe schema, loader, error messages, bundled recipes and the generated reference."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import MISSING, OmegaConf

from flowtune.errors import FlowtuneError
from flowtune.families import FAMILIES, get_family
from flowtune.flow_matching.pipeline import LOSS_WEIGHTING_SCHEMES, TIMESTEP_SAMPLING_METHODS
from flowtune.recipe import (
    Recipe,
    RecipeError,
    all_keys,
    bundled_recipes,
    load_recipe,
    recipe_to_yaml,
    resolve_recipe_path,
)
from flowtune.recipe.docs import render_recipe_docs
from flowtune.recipe.schema import Flow, field_docs, schema_fields, section_classes

ROOT = Path(__file__).resolve().parents[1]
DEMO = "tiny-flux-demo"

# Key names that users' scripts rely on: renaming one is a breaking change.
CONTRACT_KEYS = [
    "model.family",
    "model.pretrained",
    "model.dtype",
    "data.source",
    "data.cache_dir",
    "data.resolution",
    "train.output_dir",
    "train.max_steps",
    "train.seed",
    "train.batch_size",
    "train.gradient_accumulation",
    "train.checkpoint_every",
    "train.log_every",
    "train.mixed_precision",
    "train.resume",
    "optimizer.lr",
    "lora.rank",
    "lora.alpha",
    "lora.target_modules",
]


def _error(recipe: str | Path = DEMO, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The message of the RecipeError that loading raises; it must be a single line."""
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe, overrides)
    message = str(info.value)
    assert "\n" not in message, f"multi-line error message: {message!r}"
    assert "Traceback" not in message and "full_key" not in message
    return message


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "model:\n  pretrained: some/model\ndata:\n  source: data/images\n"


# --------------------------------------------------------------------------- bundled recipes


def test_bundled_recipes_are_listed_with_descriptions():
    recipes = {b.name: b for b in bundled_recipes()}
    assert {"flux1-dev-lora", "tiny-flux-demo"} <= set(recipes)
    for bundled in recipes.values():
        assert bundled.description, f"{bundled.path} needs a first comment line describing it"
        assert bundled.path.is_file()
    assert recipes["flux1-dev-lora"].description.startswith("FLUX.1-dev LoRA:")
    assert recipes["tiny-flux-demo"].description.startswith("Tiny FLUX.1 demo:")


@pytest.mark.parametrize("bundled", bundled_recipes(), ids=lambda b: b.name)
def test_every_bundled_recipe_loads_and_validates(bundled, tmp_path):
    recipe = load_recipe(bundled.path)
    assert OmegaConf.get_type(recipe) is Recipe
    assert OmegaConf.missing_keys(recipe) == set()
    # The merged recipe written as YAML loads back to the same recipe.
    again = load_recipe(_write(tmp_path, recipe_to_yaml(recipe)))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(recipe)


def test_resolve_bundled_recipe_by_name():
    expected = ROOT / "flowtune" / "recipes" / "tiny-flux-demo.yaml"
    assert resolve_recipe_path("tiny-flux-demo") == expected
    assert resolve_recipe_path("tiny-flux-demo.yaml") == expected
    assert load_recipe("tiny-flux-demo").model.pretrained == ".flowtune-demo/tiny-flux"


def test_existing_file_path_wins_over_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, MINIMAL, name="tiny-flux-demo.yaml")
    assert load_recipe("tiny-flux-demo.yaml").model.pretrained == "some/model"


def test_tiny_demo_recipe_runs_offline_on_cpu_settings():
    recipe = load_recipe(DEMO)
    assert recipe.model.family == "flux"
    assert recipe.model.dtype == "float32"
    assert recipe.train.mixed_precision == "no"
    assert recipe.data.source == ".flowtune-demo/dataset"
    assert recipe.data.cache_dir == ".flowtune-demo/cache"
    assert recipe.train.output_dir == ".flowtune-demo/run"
    assert recipe.data.resolution == 64
    assert recipe.validation.height == recipe.validation.width == 64
    assert recipe.train.max_steps <= 50


def test_flux1_dev_recipe_settings():
    recipe = load_recipe("flux1-dev-lora")
    assert recipe.model.pretrained == "black-forest-labs/FLUX.1-dev"
    assert recipe.model.dtype == "bfloat16"
    assert recipe.lora.rank == 16 and recipe.lora.alpha == 16
    assert recipe.optimizer.lr == pytest.approx(1e-4)
    assert recipe.flow.timestep_sampling == "logit_normal"
    assert recipe.flow.flow_shift == 3.0
    assert recipe.train.gradient_checkpointing is True
    assert recipe.validation.prompts


# --------------------------------------------------------------------------- schema


def test_contract_keys_exist():
    keys = set(all_keys())
    missing = [k for k in CONTRACT_KEYS if k not in keys]
    assert not missing, f"public recipe keys removed or renamed: {missing}"
    recipe = load_recipe(DEMO)
    for key in CONTRACT_KEYS:
        section, name = key.split(".")
        assert name in recipe[section]


def test_all_keys_are_dotted_and_unique():
    keys = all_keys()
    assert len(keys) == len(set(keys))
    assert all(k.count(".") == 1 for k in keys)
    assert [k.split(".")[0] for k in keys if k.endswith(".pretrained")] == ["model"]
    assert list(section_classes()) == [
        "model",
        "lora",
        "data",
        "flow",
        "train",
        "optimizer",
        "lr_scheduler",
        "validation",
        "logging",
    ]


def test_every_schema_field_has_a_docstring():
    undocumented = [f.key for f in schema_fields() if not f.doc.strip()]
    assert not undocumented, f"fields without an attribute docstring: {undocumented}"
    for section, cls in section_classes().items():
        assert (cls.__doc__ or "").strip(), f"section {section} needs a class docstring"
    assert set(field_docs(Recipe)) == set(section_classes())


def test_field_docs_reads_attribute_docstrings():
    @dataclass
    class Example:
        a: int = 1
        """First line
        second line."""
        b: str = "x"
        c: float = 0.5
        """Doc of c."""

    assert field_docs(Example) == {"a": "First line\nsecond line.", "c": "Doc of c."}


def test_choices_come_from_their_source():
    types = {f.key: f.type for f in schema_fields()}
    assert types["flow.timestep_sampling"].__args__ == TIMESTEP_SAMPLING_METHODS
    assert types["flow.loss_weighting_scheme"].__args__ == LOSS_WEIGHTING_SCHEMES
    assert types["model.family"].__args__ == tuple(FAMILIES)


def test_required_keys():
    assert [f.key for f in schema_fields() if f.required] == ["model.pretrained", "data.source"]


def test_flow_section_matches_flow_matching_pipeline_constructor():
    from flowtune.flow_matching.pipeline import FlowMatchingPipeline

    parameters = inspect.signature(FlowMatchingPipeline.__init__).parameters
    expected = {name: p.default for name, p in parameters.items() if name not in ("self", "model_adapter")}
    assert inspect.Parameter.empty not in expected.values(), "all pipeline arguments need defaults"
    schema = {f.name: f.default for f in dataclasses.fields(Flow)}
    assert schema == expected
    assert list(schema) == list(expected), "keep the flow section in constructor order"
    recipe = load_recipe(DEMO)
    assert dict(**recipe.flow).keys() == expected.keys()


def test_flow_defaults_are_the_reference_values():
    flow = {f.name: f.default for f in dataclasses.fields(Flow)}
    assert flow == {
        "num_train_timesteps": 1000,
        "timestep_sampling": "logit_normal",
        "flow_shift": 3.0,
        "i2v_prob": 0.3,
        "cfg_dropout_prob": 0.1,
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mix_uniform_ratio": 0.1,
        "beta_alpha": 2.5,
        "beta_beta": 1.5,
        "use_sigma_noise": True,
        "sigma_min": 0.0,
        "sigma_max": 1.0,
        "sigma_range": None,  # a flowtune addition (the whole range, as the reference samples)
        "use_loss_weighting": True,
        "loss_weighting_scheme": "linear",
        "log_interval": 100,
        "summary_log_interval": 10,
        "device": None,
    }


# --------------------------------------------------------------------------- merging


def test_defaults_fill_keys_the_file_leaves_out(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL))
    assert recipe.model.family == "flux"
    assert recipe.train.max_steps == 1000
    assert recipe.lora.target_modules is None
    assert recipe.model.adapter == {}
    assert recipe.optimizer.betas == [0.9, 0.999]


def test_overrides_apply_with_types():
    recipe = load_recipe(
        DEMO,
        [
            "train.max_steps=10",
            "optimizer.lr=3e-4",
            "flow.flow_shift=1",
            "validation.prompts=[a cat, a dog]",
            "data.resolution=[64,128]",
            "train.gradient_checkpointing=true",
            "train.keep_last=null",
            "lora.target_modules=[attn.to_q,attn.to_k]",
            "model.adapter.guidance_scale=1.0",
            "train.max_steps=12",  # later overrides win
        ],
    )
    assert recipe.train.max_steps == 12 and isinstance(recipe.train.max_steps, int)
    assert recipe.optimizer.lr == pytest.approx(3e-4) and isinstance(recipe.optimizer.lr, float)
    assert recipe.flow.flow_shift == 1.0 and isinstance(recipe.flow.flow_shift, float)
    assert list(recipe.validation.prompts) == ["a cat", "a dog"]
    assert list(recipe.data.resolution) == [64, 128]
    assert recipe.train.gradient_checkpointing is True
    assert recipe.train.keep_last is None
    assert list(recipe.lora.target_modules) == ["attn.to_q", "attn.to_k"]
    assert recipe.model.adapter == {"guidance_scale": 1.0}


def test_integer_valued_float_is_accepted_for_an_integer():
    assert load_recipe(DEMO, ["train.max_steps=1e3"]).train.max_steps == 1000


def test_unquoted_yaml_no_is_accepted_for_mixed_precision(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  mixed_precision: no\n")
    assert load_recipe(path).train.mixed_precision == "no"
    assert load_recipe(DEMO, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_interpolations_are_resolved(tmp_path):
    path = _write(
        tmp_path,
        "model:\n  pretrained: m\ndata:\n  source: d\n  cache_dir: ${train.output_dir}/cache\n"
        "train:\n  output_dir: runs/a\n  max_steps: ${validation.every}\n",
    )
    recipe = load_recipe(path)
    assert recipe.data.cache_dir == "runs/a/cache"
    assert recipe.train.max_steps == 250 and isinstance(recipe.train.max_steps, int)
    assert "${" not in recipe_to_yaml(recipe)


def test_empty_section_is_allowed(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL + "lora:\n"))
    assert recipe.lora.rank == 16


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_step=10", "unknown key 'train.max_step' — did you mean 'train.max_steps'?"),
        ("trian.max_steps=10", "unknown key 'trian.max_steps' — did you mean 'train.max_steps'?"),
        ("train.lr=1e-4", "unknown key 'train.lr' — did you mean 'optimizer.lr'?"),
        ("train.max_steps=abc", "invalid value 'abc' for 'train.max_steps': expected an integer"),
        ("train.max_steps=2.5", "invalid value '2.5' for 'train.max_steps': expected an integer"),
        ("optimizer.lr=fast", "invalid value 'fast' for 'optimizer.lr': expected a float"),
        (
            "train.gradient_checkpointing=maybe",
            "invalid value 'maybe' for 'train.gradient_checkpointing': expected a boolean (true or false)",
        ),
        ("model.pretrained=[a,b]", "invalid value '[a, b]' for 'model.pretrained': expected a string"),
        (
            "validation.prompts=a cat",
            "invalid value 'a cat' for 'validation.prompts': expected a list of strings",
        ),
        (
            "data.resolution=big",
            "invalid value 'big' for 'data.resolution': expected an integer or a list of integers",
        ),
        ("train.keep_last=many", "invalid value 'many' for 'train.keep_last': expected an integer or null"),
        (
            "flow.timestep_sampling=banana",
            "invalid value 'banana' for 'flow.timestep_sampling'; "
            "allowed values: uniform, logit_normal, mode, lognorm, mix, beta",
        ),
        (
            "flow.loss_weighting_scheme=cubic",
            "invalid value 'cubic' for 'flow.loss_weighting_scheme'; allowed values: linear, bsmntw",
        ),
        (
            "model.family=sd15",
            "invalid value 'sd15' for 'model.family'; allowed values: " + ", ".join(FAMILIES),
        ),
        (
            "logging.trackers=[tensorboard,mlflow]",
            "invalid value 'mlflow' for 'logging.trackers'; allowed values: tensorboard, wandb",
        ),
        (
            "train.mixed_precision=fp8",
            "invalid value 'fp8' for 'train.mixed_precision'; allowed values: no, bf16, fp16",
        ),
    ],
)
def test_override_errors(override, message):
    assert _error(DEMO, [override]) == message


def test_unknown_key_with_nothing_close_lists_the_section_keys():
    message = _error(DEMO, ["optimizer.learning_rate=1e-4"])
    assert message.startswith("unknown key 'optimizer.learning_rate'; valid keys in 'optimizer': ")
    assert "name, lr, weight_decay, betas, eps" in message


def test_unknown_section_with_nothing_close_lists_the_sections():
    message = _error(DEMO, ["zzz.yyy=1"])
    assert message.startswith("unknown key 'zzz.yyy'")
    assert "model, lora, data, flow, train, optimizer, lr_scheduler, validation, logging" in message


def test_unknown_keys_in_the_file_name_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  max_step: 10\n")
    assert _error(path) == f"{path}: unknown key 'train.max_step' — did you mean 'train.max_steps'?"
    path = _write(tmp_path, MINIMAL + "trian:\n  max_steps: 10\n")
    assert _error(path) == f"{path}: unknown key 'trian.max_steps' — did you mean 'train.max_steps'?"


def test_wrong_types_in_the_file_name_the_file(tmp_path):
    path = _write(tmp_path, MINIMAL + "train:\n  max_steps: abc\n")
    assert _error(path) == f"{path}: invalid value 'abc' for 'train.max_steps': expected an integer"
    path = _write(tmp_path, MINIMAL + "flow:\n  timestep_sampling: banana\n")
    assert _error(path) == (
        f"{path}: invalid value 'banana' for 'flow.timestep_sampling'; "
        "allowed values: uniform, logit_normal, mode, lognorm, mix, beta"
    )
    path = _write(tmp_path, MINIMAL + "train: 5\n")
    assert _error(path).startswith(f"{path}: invalid value '5' for 'train': expected a mapping")


def test_missing_required_value_says_how_to_set_it(tmp_path):
    path = _write(tmp_path, "data:\n  source: images\n")
    message = _error(path)
    assert "missing required value for 'model.pretrained'" in message
    assert "model.pretrained=..." in message
    path = _write(tmp_path, "train:\n  max_steps: 5\n")
    message = _error(path)
    assert "'model.pretrained', 'data.source'" in message
    assert "model.pretrained=... data.source=..." in message
    # An override supplies the missing value.
    assert load_recipe(path, ["model.pretrained=m", "data.source=d"]).train.max_steps == 5


@pytest.mark.parametrize(
    ("overrides", "key", "requirement"),
    [
        (["train.max_steps=0"], "train.max_steps", "must be a positive integer"),
        (["train.batch_size=-1"], "train.batch_size", "must be a positive integer"),
        (["train.gradient_accumulation=0"], "train.gradient_accumulation", "must be a positive integer"),
        (["lora.rank=0"], "lora.rank", "must be a positive integer"),
        (["flow.num_train_timesteps=0"], "flow.num_train_timesteps", "must be a positive integer"),
        (["train.log_every=0"], "train.log_every", "must be a positive integer"),
        (["train.checkpoint_every=0"], "train.checkpoint_every", "must be a positive integer"),
        (["optimizer.lr=0"], "optimizer.lr", "must be a positive number"),
        (["optimizer.lr=-1e-4"], "optimizer.lr", "must be a positive number"),
        (["flow.flow_shift=0"], "flow.flow_shift", "must be a positive number"),
        (["flow.beta_alpha=0"], "flow.beta_alpha", "must be a positive number"),
        (["flow.cfg_dropout_prob=1.5"], "flow.cfg_dropout_prob", "must be a probability in [0, 1]"),
        (["flow.i2v_prob=-0.1"], "flow.i2v_prob", "must be a probability in [0, 1]"),
        (["flow.mix_uniform_ratio=2"], "flow.mix_uniform_ratio", "must be a probability in [0, 1]"),
        (["flow.sigma_min=-0.1"], "flow.sigma_min", "0 <= sigma_min < sigma_max <= 1"),
        (["flow.sigma_max=1.5"], "flow.sigma_max", "0 <= sigma_min < sigma_max <= 1"),
        (["flow.sigma_min=0.6", "flow.sigma_max=0.4"], "flow.sigma_min", "0 <= sigma_min < sigma_max <= 1"),
        (["data.resolution=100"], "data.resolution", "multiple of 16"),
        (["data.resolution=[64,100]"], "data.resolution", "multiple of 16"),
        (["data.resolution=0"], "data.resolution", "positive multiple of 16"),
        (["validation.height=30"], "validation.height", "multiple of 16"),
        (["data.resolution=[64,64]"], "data.resolution", "once"),
        (["data.bucket_step=24"], "data.bucket_step", "positive multiple of 16"),
        (["data.encode_batch_size=0"], "data.encode_batch_size", "positive integer"),
        (["optimizer.betas=[0.9]"], "optimizer.betas", "two values"),
        (["train.keep_last=0"], "train.keep_last", "positive integer"),
        (["data.validation_split=1"], "data.validation_split", "[0, 1)"),
        (["logging.trackers=[wandb,wandb]"], "logging.trackers", "once"),
        (["lora.target_modules=[]"], "lora.target_modules", "null for the family's defaults"),
    ],
)
def test_semantic_checks_name_the_key(overrides, key, requirement):
    message = _error(DEMO, overrides)
    assert message.startswith("invalid value '"), message
    assert f"for {key!r}: " in message
    assert requirement in message


def test_adapter_arguments_are_checked_against_the_family_adapter():
    assert _error(DEMO, ["model.adapter.guidance=1.0"]) == (
        "unknown key 'model.adapter.guidance' — did you mean 'model.adapter.guidance_scale'?"
    )
    message = _error(DEMO, ["model.adapter.zzz=1"])
    assert message.startswith("unknown key 'model.adapter.zzz'; the 'flux' adapter accepts: ")
    assert "guidance_scale" in message and "use_guidance_embeds" in message
    recipe = load_recipe(DEMO, ["model.adapter.use_guidance_embeds=false"])
    assert recipe.model.adapter == {"use_guidance_embeds": False}
    assert _error(DEMO, ["model.adapter.use_guidance_embeds=3"]) == (
        "invalid value '3' for 'model.adapter.use_guidance_embeds': expected a bool"
    )


def test_validation_sampling_defaults_come_from_the_family_and_flux_takes_no_negative_prompt():
    recipe = load_recipe(DEMO, ["validation.guidance=null"])
    spec = get_family(recipe.model.family)
    assert (recipe.validation.guidance, recipe.validation.negative_prompt) == (spec.guidance, None)
    assert _error(DEMO, ["validation.negative_prompt=blurry"]) == (
        "invalid value 'blurry' for 'validation.negative_prompt': must be null: model family 'flux' "
        "samples without a negative prompt"
    )
    assert "must be 0 or a positive number" in _error(DEMO, ["validation.guidance=-1"])


def test_recipe_not_found_suggests_bundled_recipes(tmp_path):
    message = _error(tmp_path / "nope.yaml")
    assert message.startswith(f"recipe not found: '{tmp_path / 'nope.yaml'}'")
    assert "tiny-flux-demo" in message and "flux1-dev-lora" in message
    assert "did you mean the bundled recipe 'tiny-flux-demo'?" in _error("tiny-flux-dem")


def test_directory_is_not_a_recipe(tmp_path):
    assert "is a directory" in _error(tmp_path)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "model:\n  pretrained: m\ndata:\n  source: [unclosed\ntrain:\n  seed: 1\n")
    message = _error(path)
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message
    assert f"{path}:5:" in message or f"{path}:4:" in message


def test_tab_indentation_is_a_yaml_error(tmp_path):
    path = _write(tmp_path, "model:\n\tpretrained: m\n")
    assert _error(path).startswith(f"{path}:2:")


def test_duplicate_keys_are_a_yaml_error(tmp_path):
    path = _write(tmp_path, MINIMAL + "data:\n  cache_dir: c\n")
    message = _error(path)
    assert message.startswith(f"{path}:5:") and "duplicate key" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message = _error(_write(tmp_path, "- model\n- data\n"))
    assert "must be a YAML mapping" in message and "a list" in message
    assert "must be a YAML mapping" in _error(_write(tmp_path, "just words\n"))


def test_empty_file_reports_missing_required_values(tmp_path):
    message = _error(_write(tmp_path, ""))
    assert "missing required values for 'model.pretrained', 'data.source'" in message


def test_unreadable_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    assert "cannot read the recipe" in _error(path)


@pytest.mark.parametrize("override", ["train.max_steps", "=5", "+train.foo=1"])
def test_malformed_override(override):
    message = _error(DEMO, [override])
    assert message.startswith(f"malformed override {override!r}")


def test_unparsable_override_value():
    assert _error(DEMO, ["validation.prompts=[a,b"]).startswith(
        "malformed override 'validation.prompts=[a,b': cannot parse the value"
    )


def test_bad_interpolation_is_one_line():
    message = _error(DEMO, ["train.output_dir=${nowhere.key}"])
    assert "'train.output_dir'" in message and "interpolation" in message


def test_recipe_error_is_a_flowtune_error():
    assert issubclass(RecipeError, FlowtuneError)
    assert RecipeError("x").exit_code == 2


# --------------------------------------------------------------------------- docs


def test_recipe_reference_is_up_to_date():
    current = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert current == render_recipe_docs(), (
        "docs/recipes.md is out of date with flowtune/recipe/schema.py; "
        "regenerate it with: .venv/bin/python scripts/gen_recipe_docs.py"
    )


def test_recipe_reference_documents_every_key():
    text = render_recipe_docs()
    for spec in schema_fields():
        assert f"| `{spec.key}` |" in text
    assert "**required**" in text
    assert MISSING not in text.replace("`???`", "")


def test_a_recipe_builds_on_its_base(tmp_path):
    """``base:`` names a bundled recipe or a file beside this one; this file's keys win, the
    rest comes from the base (two levels here), and loops or unknown bases are one line."""
    (tmp_path / "mid.yaml").write_text("base: flux1-dev-lora\ntrain: {max_steps: 7}\nlora: {rank: 8}\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\nlora: {rank: 4}\ndata: {source: here}\n")
    cfg = load_recipe(tmp_path / "top.yaml")
    base = load_recipe("flux1-dev-lora", ["data.source=here"])
    assert (cfg.lora.rank, cfg.train.max_steps, cfg.data.source) == (4, 7, "here")
    assert cfg.model.pretrained == base.model.pretrained and cfg.validation.prompts == base.validation.prompts
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(RecipeError, match="leads back to loop.yaml"):
        load_recipe(tmp_path / "loop.yaml")
    (tmp_path / "lost.yaml").write_text("base: no-such-recipe\n")
    with pytest.raises(RecipeError, match="no-such-recipe") as info:
        load_recipe(tmp_path / "lost.yaml")
    assert "\n" not in str(info.value)
