"""The trainable transformer: LoRA targets, frozen base, and LoRA files that diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.tiny import make_tiny, tiny_flux_transformer
from flowtune.train.model import (
    LORA_WEIGHTS_NAME,
    add_lora,
    expand_target_modules,
    load_transformer,
    save_lora,
)
from flowtune.train.noise import sample_generators
from tests.helpers import tiny_flux_inputs

FLUX = get_family("flux")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("flux", tmp_path_factory.mktemp("models") / "tiny-flux")


def _lora_modules(model: torch.nn.Module) -> set[str]:
    return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}


def test_default_targets_cover_both_block_types_but_not_the_final_projection() -> None:
    model = tiny_flux_transformer()
    add_lora(model, FLUX, rank=2, alpha=2)
    wrapped = _lora_modules(model)
    assert "single_transformer_blocks.1.proj_out" in wrapped
    assert "single_transformer_blocks.0.proj_mlp" in wrapped
    assert "single_transformer_blocks.0.attn.to_q" in wrapped
    assert "transformer_blocks.0.attn.add_k_proj" in wrapped
    assert "transformer_blocks.1.ff_context.net.2" in wrapped
    assert "proj_out" not in wrapped and "x_embedder" not in wrapped


def test_only_lora_weights_train_and_they_are_float32() -> None:
    model = tiny_flux_transformer().to(torch.bfloat16)
    model.requires_grad_(False)
    trainable = add_lora(model, FLUX, rank=2, alpha=4, target_modules=["attn.to_q", "attn.to_v"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(trainable) == len(names) and all(p.dtype == torch.float32 for p in trainable)
    assert next(model.x_embedder.parameters()).dtype == torch.bfloat16


def test_target_patterns_and_unknown_targets() -> None:
    model = tiny_flux_transformer()
    assert expand_target_modules(model, ["single_transformer_blocks.*.proj_out", "attn.to_q"]) == [
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.1.proj_out",
        "attn.to_q",
    ]
    with pytest.raises(FlowtuneError, match="'attn.to_qq' matches no module"):
        expand_target_modules(model, ["attn.to_qq"])


def test_saved_lora_loads_in_flux_pipeline_with_identical_outputs(tiny_flux: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    transformer = load_transformer(FLUX, tiny_flux, torch.float32)
    add_lora(transformer, FLUX, rank=4, alpha=8)  # scale alpha / rank = 2 must survive the round trip
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn_like(param) * 0.1)
    transformer.eval()
    with torch.no_grad():
        trained = transformer(**tiny_flux_inputs(text_tokens=8))[0]
    path = save_lora(transformer, FLUX, tmp_path / "lora")
    assert path == tmp_path / "lora" / LORA_WEIGHTS_NAME
    with safe_open(path, framework="pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.lora_alpha"] == 8 and metadata["transformer.r"] == 4
    assert "single_transformer_blocks.0.proj_out" in metadata["transformer.target_modules"]

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    with torch.no_grad():
        base = pipe.transformer(**tiny_flux_inputs(text_tokens=8))[0]
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        loaded = pipe.transformer(**tiny_flux_inputs(text_tokens=8))[0]
    assert not torch.allclose(base, trained)
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)


def test_sample_generators_depend_only_on_seed_step_and_index() -> None:
    def draws(gens):
        return [torch.randn(3, generator=g) for g in gens]

    whole = draws(sample_generators(7, 3, range(4)))
    split = draws(sample_generators(7, 3, [0, 1])) + draws(sample_generators(7, 3, [2, 3]))
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(whole[0], draws(sample_generators(7, 4, [0]))[0])
    assert not torch.equal(whole[0], draws(sample_generators(8, 3, [0]))[0])
