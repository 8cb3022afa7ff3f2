"""Wan 2.2 T2V-A14B's two experts (``model.expert``, :mod:`flowtune.experts`): sigma sampled within
an expert's range (the distribution restricted, deterministic), the tiny two-expert pipeline, a
short run whose LoRA loads into the right transformer and samples pixel-equal to the plain
WanPipeline, and its exports loading back through diffusers' Wan converter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowtune.errors import FlowtuneError
from flowtune.experts import boundary_ratio, expert_for_step, lora_expert
from flowtune.families import get_family
from flowtune.flow_matching import FlowMatchingPipeline
from flowtune.flow_matching.adapters.simple import SimpleAdapter
from flowtune.train.validation import validation_sigmas
from tests.helpers import cli

SPEC = get_family("wan")
FRAMES, HEIGHT, WIDTH, GUIDANCE, TEXT_TOKENS = 5, 32, 48, 2.5, 10
# Sampling: 2 UniPC steps at timesteps 999 (the high-noise expert) and 750 (the low-noise one), of
# one-frame clips (cheap: both experts and their LoRAs are what is checked).
STEPS, SAMPLE_FRAMES = 2, 1
GUIDANCE_2 = 1.5  # the low-noise expert's (guidance_scale_2), from the checkpoint's recipe
PROMPT = "a blue square"


# ------------------------------------------------------------------------- range sampling


@pytest.mark.parametrize("method", ["logit_normal", "mode", "uniform"])
def test_sigmas_are_the_distribution_restricted_to_the_range(method) -> None:
    """With sigma_range the pipeline draws the recipe's distribution conditioned on the range (as
    rejection sampling would: same quantiles), not clamped into it; the same generators give the
    same draws; the range's probability is the distribution's mass there."""
    settings = {"timestep_sampling": method, "flow_shift": 5.0, "mix_uniform_ratio": 0.1, "logit_mean": 0.3}
    full = FlowMatchingPipeline(SimpleAdapter(), **settings)
    torch.manual_seed(0)
    unrestricted, _, _ = full.sample_timesteps(40_000)
    grid = torch.linspace(0, 1, 201)

    def cdf(draws: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(draws.sort().values, grid, right=True) / len(draws)

    for low, high in ((0.875, 1.0), (0.0, 0.875)):
        inside = unrestricted[(unrestricted >= low) & (unrestricted <= high)]
        pipe = FlowMatchingPipeline(SimpleAdapter(), sigma_range=(low, high), **settings)
        sigma, timesteps, _ = pipe.sample_timesteps(20_000, generator=torch.Generator().manual_seed(1))
        assert low <= float(sigma.min()) and float(sigma.max()) <= high
        assert validation_sigmas(pipe) == ((0.9,) if low else (0.1, 0.3, 0.5, 0.7))  # its val_loss
        assert torch.equal(timesteps, sigma * 1000)
        assert (cdf(inside) - cdf(sigma)).abs().max() < 0.02  # Kolmogorov-Smirnov distance
        assert abs(full.sigma_mass(low, high) - len(inside) / len(unrestricted)) < 0.01
        generators = [torch.Generator().manual_seed(i) for i in range(4)]
        again = [torch.Generator().manual_seed(i) for i in range(4)]
        assert torch.equal(
            pipe.sample_timesteps(4, generator=generators)[0], pipe.sample_timesteps(4, generator=again)[0]
        )
    # The clamp is kept as it was: sigma_min / sigma_max still pile the mass at the ends.
    clamped, _, _ = FlowMatchingPipeline(SimpleAdapter(), sigma_min=0.875, **settings).sample_timesteps(1000)
    assert (clamped == 0.875).float().mean() > 0.3


def test_a_range_refuses_beta_sampling_and_an_empty_range() -> None:
    with pytest.raises(ValueError, match="beta"):
        FlowMatchingPipeline(SimpleAdapter(), timestep_sampling="beta", sigma_range=(0.5, 1.0))
    with pytest.raises(ValueError, match="low < high"):
        FlowMatchingPipeline(SimpleAdapter(), sigma_range=(0.9, 0.9))


def test_the_expert_of_a_step_depends_only_on_the_seed_and_the_step() -> None:
    """``both`` runs: the choice is a function of (seed, step), so every process and a resumed run
    choose alike; over many steps the high expert's share is the given probability."""
    choices = [expert_for_step(7, step, 0.4) for step in range(2000)]
    assert choices == [expert_for_step(7, step, 0.4) for step in range(2000)]
    assert abs(choices.count("high") / len(choices) - 0.4) < 0.04
    assert choices != [expert_for_step(8, step, 0.4) for step in range(2000)]


# ------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowtune.families.wan.tiny_a14b import BOUNDARY_RATIO, build_tiny_wan22_a14b

    path = tmp_path_factory.mktemp("wan22") / "tiny-wan22"
    build_tiny_wan22_a14b(path, seed=0)
    assert boundary_ratio(path) == BOUNDARY_RATIO
    return path


def _pipe(model: Path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_model_is_a_two_expert_wan_pipeline(model) -> None:
    pipe = _pipe(model)
    assert pipe.config.boundary_ratio == 0.875 and pipe.transformer_2 is not None
    assert {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")} == {
        k: v for k, v in pipe.transformer_2.config.items() if not k.startswith("_")
    }
    first, second = pipe.transformer.state_dict(), pipe.transformer_2.state_dict()
    assert not torch.equal(first["proj_out.weight"], second["proj_out.weight"])


def test_expert_needs_a_second_transformer(model, tmp_path) -> None:
    index = json.loads((model / "model_index.json").read_text())
    del index["transformer_2"], index["boundary_ratio"]  # a Wan 2.1 folder's
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FlowtuneError, match="only for two-expert checkpoints"):
        boundary_ratio(tmp_path)


def _train(model: Path, root: Path, expert: str, *overrides: str) -> Path:
    """A short LoRA run of ``model.expert=expert`` on 4 synthetic clips (cached once under
    ``root``), with a validation clip at the end; returns its output directory."""
    from rich.console import Console

    from flowtune.data.preprocess import preprocess
    from flowtune.data.synthetic import make_video_dataset
    from flowtune.recipe import load_recipe
    from flowtune.train.trainer import Trainer

    recipe_file = root / "recipe.yaml"
    if not recipe_file.is_file():
        make_video_dataset(root / "data", 4, seed=0, sizes=[(32, 32)], frames=FRAMES, fps=16)
        recipe_file.write_text(
            f"model: {{family: wan, pretrained: '{model}', dtype: float32}}\n"
            "lora: {rank: 4, alpha: 8, init: gaussian}\n"
            f"data: {{source: '{root / 'data'}', cache_dir: '{root / 'cache'}', resolution: 32,"
            f" max_sequence_length: {TEXT_TOKENS}, frames: {FRAMES}}}\n"
            "train: {seed: 0, mixed_precision: 'no', batch_size: 2}\n"
            f"validation: {{prompts: ['{PROMPT}'], every: 0, seed: 5, steps: {STEPS}, guidance: {GUIDANCE},"
            f" guidance_2: {GUIDANCE_2},"
            f" height: {HEIGHT}, width: {WIDTH}, frames: {SAMPLE_FRAMES}}}\n"
            "optimizer: {lr: 5.0e-2}\n"
        )
        preprocess(load_recipe(recipe_file), console=Console(quiet=True))
    out = root / f"out-{expert}-{len(list(root.glob('out-*')))}"
    recipe = load_recipe(recipe_file, [f"model.expert={expert}", f"train.output_dir={out}", *overrides])
    trainer = Trainer(recipe, console=Console(quiet=True))
    trainer.run()
    assert {name: flow.sigma_range for name, flow in trainer.expert_flows.items()} == {
        name: r for name, r in (("high", (0.875, 1.0)), ("low", (0.0, 0.875))) if expert in (name, "both")
    }
    return out


@pytest.fixture(scope="module")
def runs(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-step run on the low-noise expert (one block of 2 streamed), and a 4-step run on both
    (checkpoints every 2)."""
    root = tmp_path_factory.mktemp("wan22-runs")
    return {
        # Block offload: the trained expert's first block, and at validation the other's, stream.
        "low": _train(model, root, "low", "train.max_steps=1", "train.block_offload=1"),
        "both": _train(model, root, "both", "train.max_steps=4", "train.checkpoint_every=2"),
    }


def _frames(pipe) -> list[np.ndarray]:
    video = pipe(
        prompt=PROMPT, negative_prompt="", num_frames=SAMPLE_FRAMES, height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, guidance_scale_2=GUIDANCE_2,
        max_sequence_length=TEXT_TOKENS, generator=torch.Generator().manual_seed(5), output_type="np",
    ).frames[0]  # fmt: skip
    return [(frame * 255).round().astype("uint8") for frame in video]


def _strip(path: Path) -> list[np.ndarray]:
    from PIL import Image

    strip = np.asarray(Image.open(path))
    return [strip[:, k * WIDTH : (k + 1) * WIDTH] for k in range(SAMPLE_FRAMES)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_low_expert_lora_validates_as_the_pipeline_with_it_in_transformer_2(model, runs) -> None:
    """A `low` run trains transformer_2 only; its validation clip (the other expert loaded from
    the model folder, its first block streamed as ``train.block_offload=1`` says) is pixel-equal to
    the plain WanPipeline with the LoRA loaded ``load_into_transformer_2=True``."""
    run = runs["low"]
    assert lora_expert(run / "final" / "pytorch_lora_weights.safetensors") == "low"
    pipe = _pipe(model)
    plain = _frames(pipe)
    pipe.load_lora_weights(run / "final", load_into_transformer_2=True)
    assert not any(hasattr(m, "lora_A") for m in pipe.transformer.modules())
    expected = _frames(pipe)
    assert _same(_strip(run / "samples" / "step-000001" / "000000.png"), expected)
    assert not _same(plain, expected)  # the LoRA matters


def test_sampling_a_run_with_block_offload_streams_both_experts_and_quantizes_both(
    runs, tmp_path, monkeypatch
) -> None:
    """`flowtune sample` of the `low` run takes its train.block_offload (1 of 2 blocks resident)
    for both experts, with the prompts encoded first: the validation clip's pixels.  With
    --quantize, both experts are quantized, as training quantizes the frozen other one."""
    import flowtune.sample as sampling
    from flowtune.train.offload import streamed_weights

    run = runs["low"]
    source = sampling.source_from_checkpoint(run)
    assert source.block_offload == 1
    seen = []
    generate = sampling.generate_frames

    def watched(pipe, job, *args):
        experts = (pipe.transformer, pipe.transformer_2)
        # A streamed block's weights are in CPU memory between uses (None in the module then).
        kinds = [
            {type(m.weight).__name__ for n, m in e.named_modules() if isinstance(m, torch.nn.Linear)}
            - {"NoneType"}
            for e in experts
        ]
        seen.append(([len(streamed_weights(e)) > 0 for e in experts], kinds))
        return generate(pipe, job, *args)

    monkeypatch.setattr(sampling, "generate_frames", watched)
    settings = sampling.SampleSettings(**source.defaults)
    result = sampling.sample(source, source.prompts, settings, tmp_path / "streamed")
    assert seen.pop() == ([True, True], [{"Parameter"}, {"Parameter"}])
    assert _same(_strip(result.images[0]), _strip(run / "samples" / "step-000001" / "000000.png"))
    source.quantize = "int8"
    sampling.sample(source, source.prompts, settings, tmp_path / "int8")
    streams, kinds = seen.pop()
    assert streams == [True, True] and all(len(k - {"Parameter"}) == 1 for k in kinds), kinds


def test_the_other_expert_streams_its_blocks_under_no_grad(model, runs) -> None:
    """With ``train.block_offload=1`` a `low` run's validation loads the high expert with its first
    block's weights off the device (strict: empty between uses), onloaded for its forward under
    ``torch.no_grad()`` and dropped after it: the output equals the expert loaded whole.  Between
    validations only its resident part moves to CPU memory (``move_resident``)."""
    from diffusers import WanTransformer3DModel

    from flowtune.recipe import load_recipe
    from flowtune.train.offload import streamed_weights
    from flowtune.train.validation import frozen_expert

    recipe = load_recipe(runs["low"].parent / "recipe.yaml", ["model.expert=low", "train.block_offload=1"])
    expert = frozen_expert(SPEC, model, "transformer", recipe, torch.device("cpu"), strict=True)
    assert expert.flowtune_block_offload.blocks == [expert.blocks[0]] and not expert.training
    first, last = expert.blocks[0].ffn.net[2].weight, expert.blocks[1].ffn.net[2].weight
    assert first.numel() == 0 and last.numel() > 0
    whole = WanTransformer3DModel.from_pretrained(model, subfolder="transformer").eval()
    config = whole.config
    inputs = {
        "hidden_states": torch.randn(
            1, config.in_channels, 1, 4, 4, generator=torch.Generator().manual_seed(0)
        ),
        "timestep": torch.tensor([900.0]),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config.text_dim),
        "return_dict": False,
    }
    with torch.no_grad():
        assert torch.equal(expert(**inputs)[0], whole(**inputs)[0])
    assert first.numel() == 0  # dropped again after its forward
    # Parked between validations, the resident part moves; the streamed weights stay with their hooks.
    streamed = streamed_weights(expert)
    resident = {n for n, m in expert.named_modules() for k in m._parameters if (id(m), k) not in streamed}
    assert {"blocks.1.ffn.net.2", "proj_out"} <= resident and "blocks.0.ffn.net.2" not in resident
    assert resident >= {
        n for n, m in expert.named_modules() if not n.startswith("blocks.0") and m._parameters
    }


def test_both_experts_sample_as_the_pipeline_with_their_two_loras(model, runs, tmp_path) -> None:
    """A `both` checkpoint holds the high expert's LoRA (the usual file) and the low expert's
    (``..._low_noise``); `flowtune sample` and validation load each into its transformer and
    sample pixel-equal to the plain WanPipeline with both loaded as diffusers loads them."""
    run = runs["both"]
    final = run / "final"
    assert lora_expert(final / "pytorch_lora_weights.safetensors") == "high"
    assert lora_expert(final / "pytorch_lora_weights_low_noise.safetensors") == "low"
    out = tmp_path / "out"
    result = cli(
        "sample", "--ckpt", run, "-p", PROMPT, "--seed", "5", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
        "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(SAMPLE_FRAMES), "--out", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pipe = _pipe(model)
    pipe.load_lora_weights(final)
    pipe.load_lora_weights(
        final, weight_name="pytorch_lora_weights_low_noise.safetensors", load_into_transformer_2=True
    )
    expected = _frames(pipe)
    assert _same(_strip(out / "000000.png"), expected)
    assert _same(_strip(run / "samples" / "step-000004" / "000000.png"), expected)


def test_both_resumes_choosing_the_same_experts(model, runs) -> None:
    """Resumed from its step-2 checkpoint, a `both` run trains the same experts at steps 3 and 4
    (the choice is a function of seed and step) and ends with the same two LoRAs, bit for bit."""
    from safetensors.torch import load_file

    run = runs["both"]
    resumed = _train(
        model, run.parent, "both", "train.max_steps=4", f"train.resume={run / 'checkpoints' / 'step-000002'}",
        "validation.prompts=[]",
    )  # fmt: skip
    files = {"high": "pytorch_lora_weights.safetensors", "low": "pytorch_lora_weights_low_noise.safetensors"}
    for name in files.values():
        first, again = load_file(run / "final" / name), load_file(resumed / "final" / name)
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # Steps 3 and 4 (indices 2, 3) changed only the LoRA of the experts they chose: the other's
    # weights are those of step 2, bit for bit (no gradient: AdamW leaves them alone).
    high_share = FlowMatchingPipeline(SimpleAdapter()).sigma_mass(0.875, 1.0)  # the recipe's flow
    chosen = {expert_for_step(0, step, high_share) for step in (2, 3)}
    for expert, name in files.items():
        before, after = (load_file(run / "checkpoints" / f"step-00000{k}" / name) for k in (2, 4))
        assert all(torch.equal(before[k], after[k]) for k in before) == (expert not in chosen)


def test_exports_are_named_for_each_expert_and_load_back_into_it(model, runs, tmp_path) -> None:
    """``flowtune export --format comfyui`` writes ``..._high_noise`` and ``..._low_noise`` files
    (one, for a one-expert run); diffusers' Wan converter loads each into its transformer with
    the checkpoint's own latents."""
    result = cli("export", "--ckpt", runs["both"], "--format", "comfyui", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    high, low = sorted(tmp_path.iterdir())
    assert high.name.endswith("-final-comfyui_high_noise.safetensors")
    assert low.name == high.name.replace("_high_noise", "_low_noise")
    pipe = _pipe(model)

    def latents() -> torch.Tensor:
        return pipe(
            prompt=PROMPT, num_frames=SAMPLE_FRAMES, height=32, width=32, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, max_sequence_length=TEXT_TOKENS,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        ).frames  # fmt: skip

    final = runs["both"] / "final"
    pipe.load_lora_weights(final)
    pipe.load_lora_weights(
        final, weight_name="pytorch_lora_weights_low_noise.safetensors", load_into_transformer_2=True
    )
    own = latents()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(high))
    pipe.load_lora_weights(str(low), load_into_transformer_2=True)
    assert torch.equal(latents(), own)
    merged = cli("export", "--ckpt", runs["low"], "--merge", "--out", tmp_path / "merged")
    assert merged.returncode == 2 and "does not merge experts" in merged.stderr
    (tmp_path / "low").mkdir()
    single = cli("export", "--ckpt", runs["low"], "--format", "kohya", "--out", tmp_path / "low")
    assert single.returncode == 0, single.stderr
    assert [p.name.endswith("-final-kohya_low_noise.safetensors") for p in (tmp_path / "low").iterdir()] == [
        True
    ]


def _recipe(runs: dict[str, Path], *overrides: str):
    from flowtune.recipe import load_recipe

    return load_recipe(runs["low"].parent / "recipe.yaml", list(overrides))


@pytest.fixture(scope="module")
def trace(runs):
    """The traced step of a `high` run (the plan's savers and model.expert do not change it)."""
    from flowtune.memory.plan import trace_recipe

    return trace_recipe(_recipe(runs, "model.expert=high"), SPEC)


def test_plan_counts_a_second_expert_for_both(runs, trace) -> None:
    """``model.expert=both`` keeps both experts on the GPU: the plan doubles the frozen weights,
    LoRA and optimizer states, not the gradients (one expert's a step) or the activations."""
    one, two = (_recipe(runs, f"model.expert={e}") for e in ("high", "both"))
    a, b = trace.plan(one, SPEC), trace.plan(two, SPEC)
    assert (b.weights, b.lora, b.optimizer) == (2 * a.weights, 2 * a.lora, 2 * a.optimizer)
    assert (b.gradients, b.activations) == (a.gradients, a.activations)
    assert b.peak == a.peak + a.weights + a.lora + a.optimizer


def test_plan_counts_the_other_expert_for_validation_and_sampling(runs, trace) -> None:
    """A one-expert run samples with the other expert too: validation adds it whole, or only its
    resident part (its weights less its streamed blocks) with ``train.block_offload``; `flowtune
    sample` adds it whole."""
    from flowtune.memory.phases import plan_sampling

    def phases(*overrides: str) -> tuple[dict, object]:
        recipe = _recipe(runs, *overrides)
        step = trace.plan(recipe, SPEC)
        return {p.name: p for p in plan_sampling(recipe, SPEC, trace, step)}, step

    (alone, _), (whole, step) = phases("model.expert=null"), phases("model.expert=high")
    assert whole["validation"].peak - alone["validation"].peak == step.weights > 0
    assert whole["sample"].peak - alone["sample"].peak == step.weights
    (streamed, offload), (alone, _) = (
        phases(f"model.expert={e}", "train.block_offload=1") for e in ("low", "null")
    )
    block = sum(
        p.numel() * p.element_size() for p in trace.model.blocks[0].parameters() if not p.requires_grad
    )
    assert offload.offloaded == block and offload.weights == step.weights  # one block of 2 streams
    resident = dict(streamed["validation"].parts)["other expert, blocks streamed"]
    assert resident == step.weights - block
    assert streamed["validation"].peak - alone["validation"].peak == resident


def test_recipe_checks_expert_and_sigma_range() -> None:
    from flowtune.recipe import RecipeError, load_recipe

    recipe = load_recipe("wan22-t2v-a14b-lora", ["data.source=x", "model.expert=low"])
    assert recipe.model.expert == "low" and recipe.flow.sigma_range is None
    for overrides, message in (
        (["model.expert=low", "flow.sigma_range=[0.2,0.5]"], "model.expert sets it"),
        (
            ["model.expert=high", "train.mode=full", "model.quantize=null", "train.block_offload=null"],
            "train.mode=lora",
        ),
        (["model.expert=high", "flow.timestep_sampling=beta"], "beta"),
        (["model.expert=null", "flow.sigma_range=[0.5,0.5]"], "0 <= low < high <= 1"),
        (["validation.guidance_2=-1"], "validation.guidance_2"),
        (["model.expert=both"], "train.block_offload=null"),  # the recipe streams 20 blocks
        (
            [
                "model.expert=both",
                "train.block_offload=null",
                "model.quantize=null",
                "train.distributed=fsdp",
            ],
            "FSDP2",
        ),
    ):
        with pytest.raises(RecipeError, match=message):
            load_recipe("wan22-t2v-a14b-lora", ["data.source=x", *overrides])


def test_bundled_config_plans_one_expert_at_its_published_size() -> None:
    """``flowtune plan`` sizes one 14B expert (each run trains one); the text encoder and VAE are
    Wan 2.1's (``component_sources``)."""
    from flowtune.memory.phases import SAME_COMPONENTS
    from tests.helpers import bundled_billions

    hub = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert 14.2 < bundled_billions(hub, "transformer") < 14.4
    assert SAME_COMPONENTS[hub] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


@pytest.mark.processes
@pytest.mark.extended
def test_both_on_two_processes_trains_the_same_run_as_one(model, runs) -> None:
    """DDP with ``find_unused_parameters`` (each step leaves one expert's LoRA without a gradient):
    two gloo processes with half the batch each train the run one process trains."""
    from safetensors.torch import load_file

    from flowtune.train.metrics import read_metrics
    from tests.helpers import flowtune

    root = runs["both"].parent
    args = [
        "train", root / "recipe.yaml", "model.expert=both", "train.max_steps=4", "train.log_every=1",
        "validation.prompts=[]",
    ]  # fmt: skip
    run, out = root / "one-process", root / "two-processes"
    assert cli(*args, f"train.output_dir={run}").returncode == 0
    result = flowtune(*args, "train.batch_size=1", f"train.output_dir={out}", "--num-processes", "2")
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(path: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(path / "metrics.jsonl") if "loss" in r]

    assert losses(out) == pytest.approx(losses(run), rel=1e-5, abs=1e-5) and len(losses(out)) == 4
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_low_noise.safetensors"):
        one, two = load_file(run / "final" / name), load_file(out / "final" / name)
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5, msg=key)
