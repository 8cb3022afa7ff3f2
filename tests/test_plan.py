"""``flowtune plan``: the fake-tensor trace of a training step against a real CPU step, the
bundled configs, the command's table, JSON and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import assert_user_error, cli, write

# A FLUX.1-shaped transformer big enough that activations, not overheads, dominate the step.
MID_FLUX = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 32,
    "axes_dims_rope": [8, 12, 12],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 128,
    "num_attention_heads": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "patch_size": 1,
    "pooled_projection_dim": 64,
}
# The plan's peak against the peak of the bytes the CPU allocator really handed out in the same
# step (torch profiler's memory events): measured -0.1% here (docs/performance.md).
TOLERANCE = 0.05


def _model_folder(root: Path, config: dict) -> Path:
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def mid_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_folder(tmp_path_factory.mktemp("mid-flux"), MID_FLUX)


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 double-stream + 2 single-stream blocks."""
    return _model_folder(
        tmp_path_factory.mktemp("four-blocks"), {**MID_FLUX, "num_layers": 2, "num_single_layers": 2}
    )


def _recipe(model: Path, *overrides: str):
    from flowtune.recipe import load_recipe, resolve_recipe_path

    return load_recipe(
        resolve_recipe_path("tiny-flux-demo"),
        [
            f"model.pretrained={model}",
            "model.dtype=bfloat16",
            "data.resolution=256",
            "data.max_sequence_length=64",
            "train.batch_size=2",
            *overrides,
        ],
    )


def test_plan_matches_the_memory_a_real_cpu_step_allocates(mid_flux: Path) -> None:
    """The plan (fake tensors) is within TOLERANCE of the peak of the CPU allocator's live bytes
    in a real LoRA training step with gradient checkpointing, as torch's profiler records them
    (independent of the plan's own dispatch-mode counter)."""
    from flowtune.families import get_family
    from flowtune.memory.plan import load_transformer_config, plan_training_step
    from flowtune.memory.steps import run_training_steps
    from tests.helpers import allocated_peak

    recipe = _recipe(mid_flux, "train.gradient_checkpointing=true")
    spec = get_family("flux")
    planned = plan_training_step(recipe, spec)
    config, _ = load_transformer_config(str(mid_flux))
    peak = allocated_peak(lambda: run_training_steps(recipe, spec, config, fake=False))
    assert abs(planned.peak - peak) / peak < TOLERANCE, (planned.peak, peak)
    assert planned.weights + planned.lora + planned.gradients + planned.optimizer < planned.peak
    assert planned.optimizer == 2 * planned.lora == 2 * planned.gradients  # AdamW: two fp32 states


def test_a_quantized_plan_places_the_dequantization_where_a_real_step_has_it(mid_flux: Path) -> None:
    """With the weights quantized for real, the plan's counter on the real tensors of the same
    steps (their peak, not the quantization's at load; float32, whose plan is exact
    unquantized): the plan is at most 1% below it and at most 3% above it (nf4 is counted
    +2% high: its lookup's peak on top of everything alive at the layer's moments; int8 within
    0.2%; docs/performance.md).  Both plans come from one trace."""
    from flowtune.families import get_family
    from flowtune.memory.plan import LiveBytes, _with, load_transformer_config, trace_recipe
    from flowtune.memory.steps import run_training_steps

    recipe = _recipe(mid_flux, "train.gradient_checkpointing=true", "model.dtype=float32")
    spec = get_family("flux")
    trace = trace_recipe(recipe, spec)
    config, _ = load_transformer_config(str(mid_flux))
    for mode in ("nf4", "int8"):
        quantized = _with(recipe, [f"model.quantize={mode}"])
        planned = trace.plan(quantized, spec).peak
        peak = run_training_steps(quantized, spec, config, fake=False, savers=True, tracker=LiveBytes()).peak
        assert peak * 0.99 <= planned <= peak * 1.03, (mode, planned, peak)


def test_savers_lower_the_plan_by_what_they_store(four_blocks: Path) -> None:
    """int8 about halves the quantized bf16 weights; block offload with 1 resident block of 4
    takes 3 - 2 = 1 block's frozen weights off (both accounted on the same traced step)."""
    from flowtune.families import get_family
    from flowtune.memory.plan import LiveBytes, load_transformer_config, plan_from_trace
    from flowtune.memory.steps import run_training_steps

    spec = get_family("flux")
    small = ("data.resolution=128", "data.max_sequence_length=16", "train.gradient_checkpointing=true")
    config, source = load_transformer_config(str(four_blocks))
    run = run_training_steps(_recipe(four_blocks, *small), spec, config, tracker=LiveBytes())

    def plan(*overrides: str):
        return plan_from_trace(
            _recipe(four_blocks, *small, *overrides), spec, run.model, run.counts(), source
        )

    base, int8, offload = plan(), plan("model.quantize=int8"), plan("train.block_offload=1")
    assert 0.5 * base.weights < int8.weights < 0.7 * base.weights
    assert int8.peak - base.peak == int8.weights - base.weights + int8.activations - base.activations
    assert offload.offload_saved > 0 and offload.peak == base.peak - offload.offload_saved


def test_activation_offload_takes_the_saved_activations_off_the_gpu_plan(mid_flux: Path) -> None:
    """The fake-tensor step with train.activation_offload (its size floor set to 0, so the tiny
    model's saved tensors move): when the transformer's forward ends, the GPU count is lower by
    what the hooks hold in CPU memory then (the blocks' saved inputs); the step's peak drops, by
    less than all of it (the inputs of the block being recomputed come back); the plan reports
    the pinned CPU memory."""
    from unittest import mock

    from flowtune.families import get_family
    from flowtune.memory.plan import LiveBytes, load_transformer_config, plan_from_trace
    from flowtune.memory.steps import run_training_steps
    from flowtune.train import activation_offload

    spec = get_family("flux")
    small = ("data.resolution=128", "data.max_sequence_length=16", "train.gradient_checkpointing=true")
    config, source = load_transformer_config(str(mid_flux))
    hooks = activation_offload.ActivationOffload.hooks

    def step(*overrides: str) -> tuple:
        tracker, ends = LiveBytes(), []
        with (
            mock.patch.object(activation_offload, "MIN_BYTES", 0),
            mock.patch.object(
                activation_offload.ActivationOffload, "hooks", autospec=True, side_effect=hooks
            ) as made,
        ):

            def forward_end(model) -> None:
                host = lambda: made.call_args.args[0].host_bytes if made.called else 0  # noqa: E731
                model.register_forward_hook(lambda *_: ends.append((tracker.current, host())))

            recipe = _recipe(mid_flux, *small, *overrides)
            run = run_training_steps(recipe, spec, config, tracker=tracker, on_model=forward_end, steps=1)
        return recipe, run, ends[0]

    _, plain, (gpu, _) = step()
    recipe, moved, (moved_gpu, host) = step("train.activation_offload=true")
    # A saved view frees its whole storage (hidden states sliced from a concatenation): a bit more.
    assert 0 < host <= gpu - moved_gpu <= 1.1 * host, (gpu - moved_gpu, host)
    assert plain.peak - moved.host_activations < moved.peak < plain.peak
    planned = plan_from_trace(recipe, spec, moved.model, moved.counts(), source)
    assert planned.host_activations == moved.host_activations >= host
    assert dict(planned.settings)["activation offload"].endswith("in pinned CPU memory")


@pytest.fixture(scope="module")
def four_blocks_trace(four_blocks: Path) -> tuple:
    """The four-block model's recipe at 128 px with gradient checkpointing, and its trace."""
    from flowtune.families import get_family
    from flowtune.memory.plan import trace_recipe

    spec = get_family("flux")
    recipe = _recipe(
        four_blocks, "data.resolution=128", "data.max_sequence_length=16", "train.gradient_checkpointing=true"
    )
    return recipe, spec, trace_recipe(recipe, spec)


def test_sampling_with_block_offload_streams_the_blocks_after_the_text_encoders(four_blocks_trace) -> None:
    """``flowtune sample`` of a run with train.block_offload (its --block-offload default): the
    transformer's resident part, LoRA and VAE, by what offload saves below the plain sample; the
    text encoders (none in this folder) alone before it."""
    from flowtune.memory.phases import plan_sampling
    from flowtune.memory.plan import _with

    recipe, spec, trace = four_blocks_trace
    offload = _with(recipe, ["train.block_offload=1"])
    plain = plan_sampling(recipe, spec, trace, trace.plan(recipe, spec))[-1]
    step = trace.plan(offload, spec)
    streamed = plan_sampling(offload, spec, trace, step)[-1]
    assert streamed.name == plain.name == "sample" and step.offload_saved > 0
    assert streamed.peak == plain.peak - step.offload_saved
    assert [what for what, _ in streamed.parts][:2] == [
        "text encoders, encoding the prompts first",
        "transformer (blocks streamed), LoRA and VAE",
    ]


def test_changes_to_fit_each_fit_and_come_cheapest_first(
    four_blocks_trace: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Just under the unchanged plan, block offload alone fits and comes first; every change's
    figure is the plan of the recipe with it.  Under the lowest plan of block offload and
    quantization, the changes keep the checkpointed activations in CPU memory too (its size
    floor set to 0, so the small model's move), with the RAM it takes; a budget nothing can meet
    gets no change."""
    from omegaconf import OmegaConf

    from flowtune.memory import plan
    from flowtune.memory.plan import ACTIVATION_OFFLOAD, _with, changes_to_fit
    from flowtune.train import activation_offload

    monkeypatch.setattr(activation_offload, "MIN_BYTES", 0)
    recipe, spec, trace = four_blocks_trace
    budget = trace.plan(recipe, spec).peak - 1
    changes = changes_to_fit(recipe, spec, trace, budget, limit=10)
    assert [c.overrides[0].split("=")[0] for c in changes[:2]] == ["train.block_offload", "model.quantize"]
    # The most resident blocks that fit: 3 streamed blocks save one (two are on the GPU in flight).
    assert changes[0].overrides == ["train.block_offload=1"]
    for change in changes:
        assert change.peak <= budget and change.cost
        assert trace.plan(_with(recipe, change.overrides), spec).peak == change.peak

    # The two calls below trace the recipe with activation offload: once is enough here.
    traced: dict[str, object] = {}
    trace_recipe = plan.trace_recipe

    def trace_once(changed, spec):
        key = OmegaConf.to_yaml(changed)
        if key not in traced:
            traced[key] = trace_recipe(changed, spec)
        return traced[key]

    monkeypatch.setattr(plan, "trace_recipe", trace_once)
    lowest = trace.plan(_with(recipe, ["model.quantize=nf4", "train.block_offload=0"]), spec).peak
    changes = changes_to_fit(recipe, spec, trace, lowest - 1)
    assert changes and all(c.overrides[0] == ACTIVATION_OFFLOAD and c.peak < lowest for c in changes)
    assert "KiB of RAM" in changes[0].cost
    assert changes_to_fit(recipe, spec, trace, 1) == [] and len(traced) == 1


def _stored_bytes(tensor) -> int:
    """Bytes of a tensor's storage, or of a torchao tensor subclass's inner tensors."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.untyped_storage().nbytes()


@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4"])
def test_quantized_bytes_are_what_torchao_stores(mode: str) -> None:
    import torch
    from torch import nn

    from flowtune.memory.plan import quantized_bytes
    from flowtune.memory.quantize import quantize_linears

    model = nn.Sequential(nn.Linear(1024, 768, dtype=torch.bfloat16))
    quantize_linears(model, mode)
    stored = _stored_bytes(model[0].weight)
    assert abs(quantized_bytes(torch.Size([768, 1024]), mode) - stored) / stored < 0.01, stored


def test_plan_command_prints_a_table_json_and_whether_it_fits(mid_flux: Path) -> None:
    common = [
        "tiny-flux-demo",
        f"model.pretrained={mid_flux}",
        "data.resolution=128",
        "data.max_sequence_length=16",
    ]
    table = cli("plan", *common, "--gpu-memory", "0.001")
    assert table.returncode == 0, table.stderr
    assert "peak of a training step" in table.stdout and " px, 16 text tokens" in table.stdout
    assert "does not fit a 0.001 GiB GPU" in table.stderr
    assert "no model.quantize or train.block_offload setting fits it" in table.stderr
    assert "flowtune sample does not fit" in table.stderr and "--block-offload N streams" in table.stderr
    data = json.loads(cli("plan", *common, "--json", "--gpu-memory", "80").stdout)
    assert data["fits"] is True and data["train_step"]["peak"] > data["train_step"]["weights"] > 0


def test_plan_needs_a_config_and_names_what_to_do(tmp_path: Path) -> None:
    assert_user_error(
        cli("plan", "tiny-flux-demo", "model.pretrained=someone/unknown-model"), "transformer/config.json"
    )
    assert_user_error(
        cli("plan", "tiny-flux-demo", f"model.pretrained={tmp_path}"), "transformer/config.json"
    )
    assert_user_error(cli("plan", "tiny-flux-demo", "--gpu-memory", "0"), "--gpu-memory")
    folder = _model_folder(tmp_path / "model", MID_FLUX)
    assert_user_error(
        cli("plan", "tiny-flux-demo", f"model.pretrained={folder}", "train.mode=full"), "train.mode"
    )


@pytest.mark.parametrize(
    "hub_id",
    ["black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-Kontext-dev", "black-forest-labs/FLUX.2-dev"],
)
def test_bundled_configs_are_configs_of_the_families_classes(hub_id: str) -> None:
    """Each bundled config builds its family's diffusers class (on the meta device: no memory)
    at the published size: FLUX.1 about 11.9B parameters, FLUX.2 about 32B."""
    from flowtune.memory.plan import load_transformer_config
    from tests.helpers import bundled_billions

    config, _ = load_transformer_config(hub_id)
    assert "config only" in config["_flowtune_note"]
    billions = bundled_billions(hub_id, "transformer")
    assert (11.8 < billions < 12.0) if "FLUX.1" in hub_id else (31 < billions < 33), billions


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import tiny_flux_training_env

    return tiny_flux_training_env(
        tmp_path_factory.mktemp("plan-train"),
        train="max_steps: 1, seed: 0, mixed_precision: 'no', checkpoint_every: 1, gradient_checkpointing: true",
    )


def test_train_warns_before_loading_the_model_when_the_plan_does_not_fit(
    tiny_env: Path, tmp_path: Path
) -> None:
    """--gpu-memory below the plan: one warning with a change that fits, printed before any weight
    loads (loading is made to fail here); enough memory: the banner's planned figure, no warning."""
    from unittest import mock

    from flowtune.errors import FlowtuneError

    with mock.patch("flowtune.train.trainer.load_transformer", side_effect=FlowtuneError("loading now")):
        result = cli("train", tiny_env, f"train.output_dir={tmp_path / 'a'}", "--gpu-memory", "0.0006")
    assert result.returncode == 2 and "loading now" in result.stderr
    warning = [line for line in result.stdout.splitlines() if "flowtune plan predicts" in line]
    assert len(warning) == 1 and "more than the 629.1 KiB of --gpu-memory 0.0006" in warning[0], result.stdout
    assert "train.block_offload=" in warning[0] or "model.quantize=" in warning[0]

    result = cli("train", tiny_env, f"train.output_dir={tmp_path / 'b'}", "--gpu-memory", "80")
    assert result.returncode == 0, result.stderr
    assert "flowtune plan predicts" not in result.stdout
    assert "peak per GPU (flowtune plan); --gpu-memory 80: 80.0 GiB" in " ".join(result.stdout.split())
    assert_user_error(cli("train", tiny_env, "--gpu-memory", "-1"), "--gpu-memory")


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_preprocess_phases_trace_what_real_encoders_allocate(family: str, tmp_path: Path) -> None:
    """On a tiny pipeline folder, the fake trace of each preprocess half (text encoders on
    captions, VAE on images) counts what the same code allocates on real random weights."""
    from flowtune.families import get_family
    from flowtune.memory.phases import _text_phase, _vae_phase
    from flowtune.recipe import load_recipe, resolve_recipe_path
    from flowtune.tiny import make_tiny

    model = make_tiny(family, tmp_path / "tiny")
    recipe = load_recipe(
        resolve_recipe_path("tiny-flux2-demo" if family == "flux2" else "tiny-flux-demo"),
        [f"model.pretrained={model}", "data.max_sequence_length=32"],
    )
    spec = get_family(family)
    assert _text_phase(recipe, spec, 2) == _text_phase(recipe, spec, 2, fake=False)
    assert _vae_phase(recipe, spec, 2, 64, 96, decode=False) == _vae_phase(
        recipe, spec, 2, 64, 96, False, fake=False
    )


@pytest.mark.parametrize(
    ("hub_id", "component", "billions"),
    [
        ("black-forest-labs/FLUX.1-dev", "text_encoder", (0.12, 0.13)),  # CLIP-L text
        ("black-forest-labs/FLUX.1-dev", "text_encoder_2", (4.7, 4.8)),  # T5-XXL encoder
        ("black-forest-labs/FLUX.1-Kontext-dev", "vae", (0.08, 0.09)),  # FLUX.1's VAE
        ("black-forest-labs/FLUX.2-dev", "text_encoder", (23, 24.1)),  # Mistral Small 3.1
        ("black-forest-labs/FLUX.2-dev", "vae", (0.08, 0.09)),
    ],
)
def test_bundled_component_configs_build_at_their_published_sizes(hub_id, component, billions) -> None:
    from tests.helpers import bundled_billions

    assert billions[0] < bundled_billions(hub_id, component) < billions[1]


def test_plan_reports_each_phase_and_what_makes_preprocess_fit() -> None:
    """FLUX.2-dev preprocess: the bf16 Mistral3, pruned of what encoding never runs, needs over
    32 GiB; int8 brings it under 24 GiB, which the plan names first for a 24 GiB GPU."""
    from flowtune.families import get_family
    from flowtune.memory.phases import plan_preprocess
    from flowtune.memory.report import _preprocess_advice
    from flowtune.recipe import load_recipe

    spec = get_family("flux2")
    bf16 = plan_preprocess(load_recipe("flux2-dev-lora"), spec)
    int8 = plan_preprocess(load_recipe("flux2-dev-lora", ["model.encoder_quantize=int8"]), spec)
    assert bf16.peak > 32 * 2**30 > 24 * 2**30 > int8.peak
    assert _preprocess_advice(load_recipe("flux2-dev-lora"), spec, 24 * 2**30).startswith(
        "model.encoder_quantize=int8 fits"
    )


def test_a_plan_that_fails_to_trace_never_stops_training(tiny_env: Path, tmp_path: Path) -> None:
    from unittest import mock

    with mock.patch("flowtune.memory.plan.trace_recipe", side_effect=RuntimeError("fake mode broke")):
        result = cli("train", tiny_env, f"train.output_dir={tmp_path / 'run'}", "--gpu-memory", "24")
    assert result.returncode == 0, result.stderr
    assert "no plan (the plan could not trace this model (RuntimeError: fake mode broke))" in " ".join(
        result.stdout.split()
    )


def test_validation_that_encodes_its_prompts_plans_the_text_encoders_too(tmp_path: Path) -> None:
    """Qwen-Image-Edit's validation encodes each instruction with its image (its encoder's
    ``text_uses_references``): the text encoders are on the GPU beside the training state (other
    families' validation samples from cached prompt embeddings).  On the tiny model."""
    import json

    from flowtune.tiny import make_tiny

    model = make_tiny("qwen-image-edit", tmp_path / "tiny")
    recipe = write(
        tmp_path / "recipe.yaml",
        f"model: {{family: qwen-image-edit, pretrained: '{model}'}}\n"
        f"data: {{source: '{tmp_path}', resolution: 32, max_sequence_length: 16}}\n"
        "validation: {prompts: [make it blue], height: 32, width: 32, images: [x.png]}\n",
    )
    result = cli("plan", recipe, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    text = plan["validation"]["parts"]["text encoders"]
    assert text == plan["preprocess"]["parts"]["text encoder weights"] > 0
    assert plan["validation"]["peak"] >= plan["validation"]["parts"]["training state and VAE"] + text


def test_the_plan_s_task_types_take_the_worst_case_without_reading_the_draw() -> None:
    """On fake tensors the plan cannot read the pipeline's image-to-video draw back: a video batch
    is traced as "i2v" whenever i2v_prob is above 0, with the per-sample mask as drawn; images and
    i2v_prob 0 as "t2v"."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flowtune.flow_matching import create_pipeline
    from flowtune.memory.steps import _worst_case_task_types

    flow = create_pipeline("hunyuan_video", {}, i2v_prob=0.3)
    with FakeTensorMode():
        task, mask = _worst_case_task_types(flow, "video", 3)
        assert task == "i2v" and mask.shape == (3,) and mask.dtype == torch.bool
        assert _worst_case_task_types(flow, "image", 3) == ("t2v", None)
        flow.i2v_prob = 0.0
        assert _worst_case_task_types(flow, "video", 3)[0] == "t2v"
