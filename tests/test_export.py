"""flowtune export: LoRAs in diffusers / ComfyUI / kohya layouts, checked with diffusers' own
converters and pipelines, and the merged transformer."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.interop import export
from flowtune.interop.lora import read_lora, write_lora
from flowtune.train.model import LORA_WEIGHTS_NAME
from tests.helpers import assert_user_error, cli, tiny_flux_inputs

# ---------------------------------------------------------------------------------------------
# 1. Round trip through diffusers' converter, in FLUX.1 [dev] shapes.
# ---------------------------------------------------------------------------------------------

HIDDEN, MLP = 3072, 12288  # FLUX.1 [dev]; diffusers' converter hard-codes these for linear1

# Every kind of module the FLUX.1 mapping knows: (in_features, out_features).
_DOUBLE = {
    "attn.to_q": (HIDDEN, HIDDEN),
    "attn.to_k": (HIDDEN, HIDDEN),
    "attn.to_v": (HIDDEN, HIDDEN),
    "attn.add_q_proj": (HIDDEN, HIDDEN),
    "attn.add_k_proj": (HIDDEN, HIDDEN),
    "attn.add_v_proj": (HIDDEN, HIDDEN),
    "attn.to_out.0": (HIDDEN, HIDDEN),
    "attn.to_add_out": (HIDDEN, HIDDEN),
    "ff.net.0.proj": (HIDDEN, MLP),
    "ff.net.2": (MLP, HIDDEN),
    "ff_context.net.0.proj": (HIDDEN, MLP),
    "ff_context.net.2": (MLP, HIDDEN),
    "norm1.linear": (HIDDEN, 6 * HIDDEN),
    "norm1_context.linear": (HIDDEN, 6 * HIDDEN),
}
_SINGLE = {
    "attn.to_q": (HIDDEN, HIDDEN),
    "attn.to_k": (HIDDEN, HIDDEN),
    "attn.to_v": (HIDDEN, HIDDEN),
    "proj_mlp": (HIDDEN, MLP),
    "proj_out": (HIDDEN + MLP, HIDDEN),
    "norm.linear": (HIDDEN, 3 * HIDDEN),
}
_TOP = {
    "x_embedder": (64, HIDDEN),
    "context_embedder": (4096, HIDDEN),
    "time_text_embed.timestep_embedder.linear_1": (256, HIDDEN),
    "time_text_embed.timestep_embedder.linear_2": (HIDDEN, HIDDEN),
    "time_text_embed.guidance_embedder.linear_1": (256, HIDDEN),
    "time_text_embed.guidance_embedder.linear_2": (HIDDEN, HIDDEN),
    "time_text_embed.text_embedder.linear_1": (768, HIDDEN),
    "time_text_embed.text_embedder.linear_2": (HIDDEN, HIDDEN),
    "proj_out": (HIDDEN, 64),
    "norm_out.linear": (HIDDEN, 2 * HIDDEN),
}
# Single block 1 trains q, k, v but not the MLP input: linear1 gets a zero MLP block.
UNTRAINED = "single_transformer_blocks.1.proj_mlp"


def _dev_shaped_modules() -> dict[str, tuple[int, int]]:
    modules = {f"transformer_blocks.{i}.{name}": shape for i in (0, 1) for name, shape in _DOUBLE.items()}
    modules |= {f"single_transformer_blocks.{i}.{n}": shape for i in (0, 1) for n, shape in _SINGLE.items()}
    modules |= _TOP
    del modules[UNTRAINED]
    return modules


def _write_lora_file(
    path: Path,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    alpha: float,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> None:
    """A LoRA file as flowtune writes it: diffusers keys, float32, the peft config in metadata."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (n_in, n_out) in shapes.items():
        r = (rank_pattern or {}).get(module, rank)
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(r, n_in, generator=generator)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(n_out, r, generator=generator)
    config = {
        "transformer.r": rank,
        "transformer.lora_alpha": alpha,
        "transformer.rank_pattern": rank_pattern or {},
        "transformer.alpha_pattern": alpha_pattern or {},
        "transformer.use_rslora": False,
        "transformer.target_modules": sorted(shapes),
    }
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(config),
        "flowtune.family": "flux",
        "flowtune.step": "7",
    }
    save_file(tensors, str(path), metadata=metadata)


def _diffusers_view(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``FluxPipeline.lora_state_dict`` of a file (diffusers' kohya/ComfyUI converter), as
    ``{module: (A, B)}``.  The converter leaves the ``transformer.`` prefix off the embedders and
    the final layer; it is added back here."""
    from diffusers import FluxPipeline

    state = FluxPipeline.lora_state_dict(str(path))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, which = key.removeprefix("transformer.").rpartition(".lora_")
        modules.setdefault(module, {})[which] = tensor
    return {m: (t["A.weight"], t["B.weight"]) for m, t in modules.items()}


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_diffusers_converter_recovers_the_exact_a_and_b_when_alpha_equals_rank(tmp_path, fmt) -> None:
    source = tmp_path / "lora.safetensors"
    shapes = _dev_shaped_modules()
    _write_lora_file(source, shapes, rank=4, alpha=4)
    out = tmp_path / f"{fmt}.safetensors"
    assert write_lora(source, get_family("flux"), fmt, out, None) == (len(shapes), 2 * 10 + 2 * 3 + 10)

    original = read_lora(source).modules
    converted = _diffusers_view(out)
    assert converted.keys() == original.keys() | {UNTRAINED}
    for module, weights in original.items():
        a, b = converted[module]
        assert torch.equal(a, weights.down), module
        assert torch.equal(b, weights.up), module
    a, b = converted[UNTRAINED]  # the zero block of the fused linear1
    assert a.shape == (4, HIDDEN) and b.shape == (MLP, 4)
    assert not a.any() and not b.any()


def test_diffusers_converter_keeps_every_update_when_alpha_differs_from_rank(tmp_path) -> None:
    source = tmp_path / "lora.safetensors"
    shapes = _dev_shaped_modules()
    # Scale 2 in general; one qkv part with scale 0.5 (the parts' scales differ: folded into B);
    # one linear1 part of rank 2 (padded to 4); the final layer (whose alpha diffusers ignores).
    _write_lora_file(
        source,
        shapes,
        rank=4,
        alpha=8,
        rank_pattern={"single_transformer_blocks.0.attn.to_v": 2},
        alpha_pattern={"transformer_blocks.1.attn.to_k": 2, "single_transformer_blocks.0.attn.to_v": 1},
    )
    original = read_lora(source).modules
    assert original["transformer_blocks.0.attn.to_k"].scale == 2.0
    assert original["transformer_blocks.1.attn.to_k"].scale == 0.5
    assert original["single_transformer_blocks.0.attn.to_v"].scale == 0.5
    assert original["single_transformer_blocks.0.attn.to_v"].rank == 2
    out = tmp_path / "kohya.safetensors"
    write_lora(source, get_family("flux"), "kohya", out, None)

    converted = _diffusers_view(out)
    assert converted.keys() == original.keys() | {UNTRAINED}
    generator = torch.Generator().manual_seed(1)
    for module, weights in original.items():
        a, b = converted[module]
        # The updates applied to random inputs (cheaper than forming the [out, in] matrices).
        probe = torch.randn(a.shape[1], 8, generator=generator, dtype=torch.float64)
        ours = b.double() @ (a.double() @ probe)
        theirs = weights.scale * (weights.up.double() @ (weights.down.double() @ probe))
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, msg=module)
    # diffusers loads the converted file with scale 1: the file must not carry the peft config.
    with safe_open(str(out), "pt") as handle:
        assert "lora_adapter_metadata" not in handle.metadata()


def test_read_lora_scales_match_peft(tmp_path) -> None:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from flowtune.families.flux.tiny import tiny_flux_transformer
    from flowtune.train.model import save_lora

    torch.manual_seed(0)
    transformer = tiny_flux_transformer()
    transformer.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["attn.to_q", "attn.to_k", "proj_mlp"],
            rank_pattern={"transformer_blocks.0.attn.to_k": 2},
            alpha_pattern={"single_transformer_blocks.1.proj_mlp": 3},
        )
    )
    save_lora(transformer, get_family("flux"), tmp_path)
    read = read_lora(tmp_path / LORA_WEIGHTS_NAME).modules
    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    assert read.keys() == layers.keys()
    for name, layer in layers.items():
        assert read[name].scale == layer.scaling["default"], name
    assert read["transformer_blocks.0.attn.to_k"].scale == 4.0
    assert read["single_transformer_blocks.1.proj_mlp"].scale == 0.75


def test_modules_without_an_original_name_and_families_without_a_mapping_are_refused(tmp_path) -> None:
    source = tmp_path / "lora.safetensors"
    _write_lora_file(source, {"transformer_blocks.0.attn.to_q": (8, 8), "custom.proj": (8, 8)}, 2, 2)
    with pytest.raises(FlowtuneError, match="'custom.proj' has no counterpart.*--format diffusers"):
        write_lora(source, get_family("flux"), "kohya", tmp_path / "out.safetensors", None)
    unmapped = dataclasses.replace(get_family("flux"), lora_original_names=None)
    with pytest.raises(FlowtuneError, match="no original-layout LoRA naming for --format comfyui"):
        write_lora(source, unmapped, "comfyui", tmp_path / "out.safetensors", None)
    # diffusers layout needs no mapping.
    assert write_lora(source, unmapped, "diffusers", tmp_path / "out.safetensors", None) == (2, None)


# ---------------------------------------------------------------------------------------------
# 2.-4. A tiny trained checkpoint: diffusers export, kohya/ComfyUI layout, merge, CLI errors.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1 LoRA run (rank 4, alpha 8: scale 2) trained 2 steps; returns its output dir."""
    from flowtune.data.preprocess import preprocess
    from flowtune.data.synthetic import make_shapes_dataset
    from flowtune.recipe import load_recipe
    from flowtune.tiny import make_tiny
    from flowtune.train.trainer import Trainer

    root = tmp_path_factory.mktemp("export")
    model = make_tiny("flux", root / "tiny-flux")
    make_shapes_dataset(root / "dataset", 2, seed=1, sizes=[(64, 64)])
    (root / "recipe.yaml").write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8}\n"
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16}\n"
        f"train: {{output_dir: '{root / 'run'}', max_steps: 2, seed: 0, mixed_precision: 'no',"
        " checkpoint_every: 1, log_every: 1}\n"
        "optimizer: {lr: 1.0e-2}\n"
        "lr_scheduler: {name: constant}\n"
    )
    recipe = load_recipe(root / "recipe.yaml")
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    return root / "run"


def _images(pipe) -> np.ndarray:
    return pipe(
        "a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_diffusers_export_gives_the_same_images_as_the_checkpoint(trained, tmp_path) -> None:
    from diffusers import FluxPipeline

    out = tmp_path / "lora.safetensors"
    result = cli("export", "--ckpt", str(trained / "final"), "--format", "diffusers", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"34 LoRA modules (diffusers) written to {out}" in result.stderr

    pipe = FluxPipeline.from_pretrained(trained.parent / "tiny-flux", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = _images(pipe)
    pipe.load_lora_weights(trained / "final")
    from_checkpoint = _images(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out))
    from_export = _images(pipe)
    assert np.array_equal(from_export, from_checkpoint)
    assert not np.array_equal(from_checkpoint, base)  # the LoRA does change the images


def test_default_output_is_next_to_the_run_and_dtype_is_applied(trained) -> None:
    result = export(trained / "checkpoints" / "step-000001", "kohya", dtype="bfloat16")
    assert result.path == trained / "export" / "run-step-000001-kohya.safetensors"
    assert (result.modules, result.original_modules) == (34, 20)
    tensors = load_file(result.path)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_down.weight"].dtype == torch.bfloat16
    assert tensors["lora_unet_single_blocks_0_linear1.alpha"].dtype == torch.float32
    # A run's output directory means its final/.
    assert export(trained, "comfyui").path == trained / "export" / "run-final-comfyui.safetensors"
    as_bf16 = export(trained / "final", "diffusers", dtype="bfloat16").path
    assert all(t.dtype == torch.bfloat16 for t in load_file(as_bf16).values())
    with safe_open(str(as_bf16), "pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()


def _original_names(blocks: int = 2) -> set[str]:
    double = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj")
    double += ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
    names = {f"double_blocks.{i}.{n}" for i in range(blocks) for n in double}
    return names | {f"single_blocks.{i}.{n}" for i in range(blocks) for n in ("linear1", "linear2")}


def test_kohya_and_comfyui_files_of_a_trained_checkpoint(trained, tmp_path) -> None:
    kohya = load_file(export(trained / "final", "kohya", tmp_path / "k.safetensors").path)
    comfy_path = export(trained / "final", "comfyui", tmp_path / "c.safetensors").path
    comfy = load_file(comfy_path)

    names = _original_names()
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert set(kohya) == {f"lora_unet_{n.replace('.', '_')}{s}" for n in names for s in suffixes}
    assert set(comfy) == {f"diffusion_model.{n}{s}" for n in names for s in suffixes}
    for name in names:
        for suffix in suffixes:
            assert torch.equal(
                kohya[f"lora_unet_{name.replace('.', '_')}{suffix}"], comfy[f"diffusion_model.{name}{suffix}"]
            )

    with safe_open(str(comfy_path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert metadata["ss_base_model_version"] == "flux1"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
    assert metadata["flowtune.family"] == "flux" and metadata["flowtune.step"] == "2"
    assert "lora_adapter_metadata" not in metadata

    # Each part of a fused module: its diagonal block reproduces the part's scale * B @ A, and
    # the blocks off the diagonal are zero.
    source = read_lora(trained / "final" / LORA_WEIGHTS_NAME).modules
    hidden = 32  # the tiny transformer
    fused = {
        "double_blocks.1.img_attn.qkv": [("transformer_blocks.1.attn.to_" + p, hidden) for p in "qkv"],
        "double_blocks.0.txt_attn.qkv": [(f"transformer_blocks.0.attn.add_{p}_proj", hidden) for p in "qkv"],
        "single_blocks.1.linear1": [("single_transformer_blocks.1.attn.to_" + p, hidden) for p in "qkv"]
        + [("single_transformer_blocks.1.proj_mlp", 4 * hidden)],
    }
    for name, parts in fused.items():
        down, up = (
            comfy[f"diffusion_model.{name}.lora_down.weight"],
            comfy[f"diffusion_model.{name}.lora_up.weight"],
        )
        rank = down.shape[0]
        assert rank == 4 * len(parts) and up.shape == (sum(rows for _, rows in parts), rank)
        scale = comfy[f"diffusion_model.{name}.alpha"].item() / rank
        row = 0
        for index, (module, rows) in enumerate(parts):
            columns = slice(4 * index, 4 * index + 4)
            block = up[row : row + rows, columns]
            torch.testing.assert_close(
                scale * block @ down[columns], source[module].delta(), rtol=1e-5, atol=1e-6
            )
            assert torch.count_nonzero(up[row : row + rows]) == torch.count_nonzero(block)
            row += rows
    # An unfused module keeps A and B and carries the scale in alpha.
    assert torch.equal(
        comfy["diffusion_model.double_blocks.0.img_mlp.2.lora_down.weight"],
        source["transformer_blocks.0.ff.net.2"].down,
    )
    assert comfy["diffusion_model.double_blocks.0.img_mlp.2.alpha"].item() == 8.0
    # Nothing is scaled twice: the exported update (alpha / rank x up @ down) is the default file's
    # own B @ A (its B holds the scale 2, which is what ComfyUI applies from that file).
    default = load_file(trained / "final" / LORA_WEIGHTS_NAME)
    key, prefix = "transformer.transformer_blocks.0.ff.net.2", "diffusion_model.double_blocks.0.img_mlp.2"
    exported = 8.0 / 4 * comfy[f"{prefix}.lora_up.weight"] @ comfy[f"{prefix}.lora_down.weight"]
    assert torch.equal(exported, default[f"{key}.lora_B.weight"] @ default[f"{key}.lora_A.weight"])
    assert not torch.equal(default[f"{key}.lora_B.weight"], source["transformer_blocks.0.ff.net.2"].up)


def test_merged_transformer_equals_the_base_with_the_lora_loaded(trained, tmp_path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    merged_dir = export(trained / "final", out=tmp_path / "merged", merge=True).path
    half_dir = export(trained / "final", out=tmp_path / "half", merge=True, lora_scale=0.5).path
    merged = FluxTransformer2DModel.from_pretrained(merged_dir)
    half = FluxTransformer2DModel.from_pretrained(half_dir)
    assert not any("lora" in key for key in merged.state_dict())
    assert merged.dtype == torch.float32

    pipe = FluxPipeline.from_pretrained(trained.parent / "tiny-flux", torch_dtype=torch.float32)
    inputs = tiny_flux_inputs()
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(trained / "final", adapter_name="trained")
        with_lora = pipe.transformer(**inputs)[0]
        pipe.set_adapters("trained", 0.5)
        with_half = pipe.transformer(**inputs)[0]
        torch.testing.assert_close(merged(**inputs)[0], with_lora, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(half(**inputs)[0], with_half, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_lora, base, atol=1e-3)


def test_export_user_errors_are_one_line(trained, tmp_path) -> None:
    final = str(trained / "final")
    assert_user_error(cli("export", "--ckpt", str(tmp_path / "nowhere")), "no checkpoint at")
    assert_user_error(
        cli("export", "--ckpt", final, "--format", "onnx"),
        "--format 'onnx'",
        "diffusers, comfyui, kohya",
    )

    full = tmp_path / "full"
    full.mkdir()
    shutil.copy(trained / "final" / "recipe.yaml", full / "recipe.yaml")
    shutil.copytree(trained.parent / "tiny-flux" / "transformer", full / "transformer")
    assert_user_error(
        cli("export", "--ckpt", str(full), "--format", "kohya"),
        "fully fine-tuned transformer",
        "nothing to convert or merge",
        "FluxTransformer2DModel.from_pretrained",
    )

    existing = tmp_path / "lora.safetensors"
    existing.write_bytes(b"keep me")
    assert_user_error(cli("export", "--ckpt", final, "--out", str(existing)), "already exists", "--overwrite")
    assert existing.read_bytes() == b"keep me"
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "note.txt").write_text("keep me")
    assert_user_error(
        cli("export", "--ckpt", final, "--merge", "--out", str(tmp_path / "merged")),
        "not empty",
        "--overwrite",
    )
    assert_user_error(cli("export", "--ckpt", final, "--lora-scale", "0.5"), "--merge only")


def test_options_that_do_not_go_together_are_refused(trained) -> None:
    with pytest.raises(FlowtuneError, match="leave out --format"):
        export(trained / "final", "kohya", merge=True)
    with pytest.raises(FlowtuneError, match="--dtype 'fp8' is not one of: float32, bfloat16, float16"):
        export(trained / "final", "kohya", dtype="fp8")
    with pytest.raises(FlowtuneError, match="finite"):
        export(trained / "final", merge=True, lora_scale=float("nan"))
    with pytest.raises(FlowtuneError, match="--model applies to --merge only"):
        export(trained / "final", "kohya", base_model="somewhere")


def test_merge_into_another_copy_of_the_base_model(trained, tmp_path) -> None:
    """--model replaces a base model path that no longer resolves (a relative path, a moved copy)."""
    from diffusers import FluxTransformer2DModel

    moved = tmp_path / "moved-flux"
    shutil.copytree(trained.parent / "tiny-flux", moved)
    with pytest.raises(FlowtuneError, match="^--model: .*gone' does not exist"):
        export(trained / "final", out=tmp_path / "x", merge=True, base_model=str(tmp_path / "gone"))
    merged = export(trained / "final", out=tmp_path / "merged", merge=True, base_model=str(moved)).path
    reference = export(trained / "final", out=tmp_path / "reference", merge=True).path
    a = FluxTransformer2DModel.from_pretrained(merged).state_dict()
    b = FluxTransformer2DModel.from_pretrained(reference).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
