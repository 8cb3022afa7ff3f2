"""flowtune export --format kohya|comfyui for FLUX.2: the BFL names checked against diffusers' own
FLUX.2 checkpoint converter, the files read back by diffusers' FLUX.2 LoRA converters, and images
of Flux2Pipeline with an exported file equal to images with flowtune's own LoRA."""

from __future__ import annotations

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
from flowtune.families.flux2.naming import FLUX2_NAMING
from flowtune.interop import export
from flowtune.interop.lora import read_lora, to_original, write_lora
from flowtune.train.model import LORA_WEIGHTS_NAME
from tests.helpers import assert_user_error, cli

TEXT_TOKENS = 48  # the tiny Mistral's system message takes ~30 tokens before the caption
HIDDEN = 32  # the tiny transformer (flowtune.families.flux2.tiny.tiny_flux2_transformer)
QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
# The modules diffusers' kohya FLUX.2 converter does not know: it drops them with a warning.
KOHYA_CONVERTER_DROPS = {
    "time_guidance_embed.guidance_embedder.linear_1",
    "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
    "norm_out.linear",
}

# ---------------------------------------------------------------------------------------------
# 1. Every linear layer of FLUX.2, against diffusers' converters (no training).
# ---------------------------------------------------------------------------------------------


def _all_linear_lora(out_dir: Path, **config) -> Path:
    """A LoRA (scale alpha / r = 2 unless ``config`` says otherwise) on every linear layer of the
    tiny FLUX.2 transformer, random A and B, written as flowtune writes it."""
    from peft import LoraConfig

    from flowtune.families.flux2.tiny import tiny_flux2_transformer
    from flowtune.train.model import save_lora

    torch.manual_seed(0)
    transformer = tiny_flux2_transformer()
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    settings = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    transformer.add_adapter(LoraConfig(target_modules=linears, **settings))
    save_lora(transformer, get_family("flux2"), out_dir)
    return out_dir / LORA_WEIGHTS_NAME


def _lora_view(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A diffusers-named LoRA state dict as ``{module: (A, B)}``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, which = key.removeprefix("transformer.").rpartition(".lora_")
        modules.setdefault(module, {})[which] = tensor
    return {m: (t["A.weight"], t["B.weight"]) for m, t in modules.items()}


def test_every_linear_layer_maps_to_the_name_diffusers_checkpoint_converter_reads(tmp_path) -> None:
    """Each exported module's update, put in a BFL checkpoint under its BFL name and converted by
    diffusers' FLUX.2 single-file converter, lands on its diffusers module: names, qkv row order,
    the final layer's shift/scale swap, with mixed ranks and scales."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    source = _all_linear_lora(
        tmp_path,
        rank_pattern={"transformer_blocks.0.attn.to_k": 2},
        alpha_pattern={"transformer_blocks.1.attn.add_v_proj": 2, "norm_out.linear": 2},
    )
    lora = read_lora(source)
    modules = to_original(lora, FLUX2_NAMING)
    names = {m.name for m in modules}
    assert len(lora.modules) == 39 and len(names) == 39 - 2 * 2 * 2  # two fused qkv per double block
    assert {n for n in names if n.startswith(("double_blocks.0.", "single_blocks.0."))} == {
        "double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
        "double_blocks.0.txt_attn.proj", "double_blocks.0.img_mlp.0", "double_blocks.0.img_mlp.2",
        "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2",
        "single_blocks.0.linear1", "single_blocks.0.linear2",
    }  # fmt: skip

    checkpoint = {f"{m.name}.weight": m.alpha / m.down.shape[0] * (m.up @ m.down) for m in modules}
    converted = convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)
    assert converted.keys() == {f"{module}.weight" for module in lora.modules}
    for module, weights in lora.modules.items():
        torch.testing.assert_close(converted[f"{module}.weight"], weights.delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_diffusers_flux2_lora_converters_read_the_files_back(tmp_path, fmt) -> None:
    from diffusers import Flux2Pipeline

    source = _all_linear_lora(tmp_path)
    lora = read_lora(source).modules
    out = tmp_path / f"{fmt}.safetensors"
    assert write_lora(source, get_family("flux2"), fmt, out, None) == (39, 31)
    converted = _lora_view(Flux2Pipeline.lora_state_dict(str(out)))

    if fmt == "kohya":
        # diffusers' kohya converter splits each qkv back into the parts' own A and B (it finds
        # the block-diagonal lora_up) and multiplies the scale alpha / rank = 2 into A.
        assert converted.keys() == lora.keys() - KOHYA_CONVERTER_DROPS
        for module in converted:
            a, b = converted[module]
            assert torch.equal(a, 2 * lora[module].down), module
            assert torch.equal(b, lora[module].up), module
        return

    # ComfyUI layout (lora_A/lora_B, no alpha): diffusers gives each qkv part the whole fused A and
    # its rows of lora_B, whose other parts' columns are zero.  The update is the part's exactly.
    assert converted.keys() == lora.keys()
    with safe_open(str(out), "pt") as handle:
        assert not any(key.endswith(".alpha") for key in handle.keys())  # noqa: SIM118 - not a dict
    generator = torch.Generator().manual_seed(1)
    for module, weights in lora.items():
        a, b = converted[module]
        expected = weights.delta()
        if module == "norm_out.linear":
            # BFL's final modulation is [shift; scale] (the file is right: see the test above), but
            # diffusers' LoRA converter does not swap it to diffusers' [scale; shift] as its
            # checkpoint converter does.
            expected = torch.cat(expected.chunk(2)[::-1])
        probe = torch.randn(a.shape[1], 8, generator=generator, dtype=torch.float64)
        torch.testing.assert_close(
            b.double() @ (a.double() @ probe), expected.double() @ probe, rtol=1e-6, atol=1e-6, msg=module
        )


def test_a_module_without_a_bfl_name_is_refused(tmp_path) -> None:
    source = _all_linear_lora(tmp_path)
    tensors = load_file(source)
    tensors["transformer.transformer_blocks.0.attn.to_gate.lora_A.weight"] = torch.ones(4, HIDDEN)
    tensors["transformer.transformer_blocks.0.attn.to_gate.lora_B.weight"] = torch.ones(HIDDEN, 4)
    with safe_open(str(source), "pt") as handle:
        save_file(tensors, str(source), metadata=handle.metadata())
    with pytest.raises(
        FlowtuneError,
        match=r"'transformer_blocks.0.attn.to_gate' has no counterpart in the FLUX.2 \(BFL\) layout.*"
        "--format diffusers",
    ):
        write_lora(source, get_family("flux2"), "kohya", tmp_path / "out.safetensors", None)


# ---------------------------------------------------------------------------------------------
# 2. A tiny trained FLUX.2 LoRA: the files' tensors, diffusers' pipeline, CLI errors.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.2 LoRA run (default targets, rank 4, alpha 8: scale 2) trained 2 steps; returns
    its output dir."""
    from flowtune.data.preprocess import preprocess
    from flowtune.data.synthetic import make_shapes_dataset
    from flowtune.recipe import load_recipe
    from flowtune.tiny import make_tiny
    from flowtune.train.trainer import Trainer

    root = tmp_path_factory.mktemp("flux2-export")
    model = make_tiny("flux2", root / "tiny-flux2")
    make_shapes_dataset(root / "dataset", 2, seed=1, sizes=[(64, 64)])
    (root / "recipe.yaml").write_text(
        f"model: {{family: flux2, pretrained: '{model}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 8, init: gaussian}\n"
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        f" max_sequence_length: {TEXT_TOKENS}}}\n"
        f"train: {{output_dir: '{root / 'run'}', max_steps: 2, seed: 0, mixed_precision: 'no',"
        " checkpoint_every: 2, log_every: 1}\n"
        "optimizer: {lr: 5.0e-2}\n"
        "lr_scheduler: {name: constant}\n"
    )
    recipe = load_recipe(root / "recipe.yaml")
    preprocess(recipe, console=Console(quiet=True))
    Trainer(recipe, console=Console(quiet=True)).run()
    return root / "run"


@pytest.mark.slow
def test_kohya_and_comfyui_files_hold_the_trained_weights(trained, tmp_path) -> None:
    kohya_path = export(trained / "final", "kohya", tmp_path / "k.safetensors").path
    comfy_path = export(trained / "final", "comfyui", tmp_path / "c.safetensors").path
    kohya, comfy = load_file(kohya_path), load_file(comfy_path)

    double = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj")
    double += ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
    names = {f"double_blocks.{i}.{n}" for i in range(2) for n in double}
    names |= {f"single_blocks.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")}
    kohya_suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    assert set(kohya) == {f"lora_unet_{n.replace('.', '_')}{s}" for n in names for s in kohya_suffixes}
    assert set(comfy) == {
        f"diffusion_model.{n}{s}" for n in names for s in (".lora_A.weight", ".lora_B.weight")
    }
    for path in (kohya_path, comfy_path):
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["ss_network_module"] == "networks.lora_flux_2"
        assert metadata["ss_base_model_version"] == "flux2"
        assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
        assert metadata["flowtune.family"] == "flux2" and metadata["flowtune.step"] == "2"
        assert "lora_adapter_metadata" not in metadata

    # A fused qkv: lora_down stacks the parts' A exactly, lora_up holds their B exactly on its
    # block diagonal (kohya: scale 2 in alpha = 2 x 12; ComfyUI: scale 2 multiplied into B, which
    # is exact) and zeros off it.
    source = read_lora(trained / "final" / LORA_WEIGHTS_NAME).modules
    for block in (0, 1):
        for bfl, parts in QKV.items():
            name = f"double_blocks.{block}.{bfl}"
            a_parts = [source[f"transformer_blocks.{block}.{p}"].down for p in parts]
            b_parts = [source[f"transformer_blocks.{block}.{p}"].up for p in parts]
            assert all(b.any() for b in b_parts)  # trained: B moved away from zero
            key = f"lora_unet_{name.replace('.', '_')}"
            assert torch.equal(kohya[f"{key}.lora_down.weight"], torch.cat(a_parts))
            assert torch.equal(kohya[f"{key}.lora_up.weight"], torch.block_diag(*b_parts))
            assert kohya[f"{key}.alpha"].item() == 24.0
            assert torch.equal(comfy[f"diffusion_model.{name}.lora_A.weight"], torch.cat(a_parts))
            assert torch.equal(
                comfy[f"diffusion_model.{name}.lora_B.weight"], torch.block_diag(*[2 * b for b in b_parts])
            )
    # linear1 is one module in diffusers too (to_qkv_mlp_proj): A and B as trained.
    trained_linear1 = source["single_transformer_blocks.1.attn.to_qkv_mlp_proj"]
    assert torch.equal(kohya["lora_unet_single_blocks_1_linear1.lora_down.weight"], trained_linear1.down)
    assert torch.equal(kohya["lora_unet_single_blocks_1_linear1.lora_up.weight"], trained_linear1.up)
    assert kohya["lora_unet_single_blocks_1_linear1.alpha"].item() == 8.0
    assert torch.equal(comfy["diffusion_model.single_blocks.1.linear1.lora_A.weight"], trained_linear1.down)
    assert torch.equal(comfy["diffusion_model.single_blocks.1.linear1.lora_B.weight"], 2 * trained_linear1.up)


def _images(pipe, prompt: str = "a red circle") -> np.ndarray:
    return pipe(
        prompt=prompt, height=64, width=48, num_inference_steps=2, guidance_scale=2.5, max_sequence_length=TEXT_TOKENS,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).images  # fmt: skip


@pytest.mark.slow
def test_flux2_pipeline_images_with_the_exported_files_equal_the_checkpoints(trained, tmp_path) -> None:
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(trained.parent / "tiny-flux2", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = _images(pipe)
    pipe.load_lora_weights(trained / "final")
    from_checkpoint = _images(pipe)
    assert np.abs(from_checkpoint - base).max() > 1e-2  # the LoRA does change the images
    images = {}
    for fmt in ("kohya", "comfyui"):
        pipe.unload_lora_weights()
        path = export(trained / "final", fmt, tmp_path / f"{fmt}.safetensors").path
        pipe.load_lora_weights(str(path))
        assert len(pipe.get_list_adapters()["transformer"]) == 1
        images[fmt] = _images(pipe)
    # kohya: diffusers recovers each part's A (times the scale 2, exact) and B: the same products.
    assert np.array_equal(images["kohya"], from_checkpoint)
    # ComfyUI: each qkv part is loaded as the whole fused A with zero columns in its B (rank 12, not
    # 4), the same update summed in another order: equal up to float32 rounding.
    np.testing.assert_allclose(images["comfyui"], from_checkpoint, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_module_without_a_bfl_name_is_a_one_line_error(trained, tmp_path) -> None:
    checkpoint = tmp_path / "final"
    shutil.copytree(trained / "final", checkpoint)
    lora_file = checkpoint / LORA_WEIGHTS_NAME
    tensors = load_file(lora_file)
    tensors["transformer.transformer_blocks.1.attn.to_gate.lora_A.weight"] = torch.ones(4, HIDDEN)
    tensors["transformer.transformer_blocks.1.attn.to_gate.lora_B.weight"] = torch.ones(HIDDEN, 4)
    with safe_open(str(lora_file), "pt") as handle:
        save_file(tensors, str(lora_file), metadata=handle.metadata())
    assert_user_error(
        cli("export", "--ckpt", str(checkpoint), "--format", "comfyui", "--out", str(tmp_path / "x")),
        "'transformer_blocks.1.attn.to_gate' has no counterpart in the FLUX.2 (BFL) layout",
        "--format diffusers",
    )
    assert not (tmp_path / "x").exists()
