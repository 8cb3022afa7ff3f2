"""The trainable transformer: LoRA targets, frozen base, and LoRA files that diffusers, ComfyUI and
kohya-style loaders apply alike and that training resumes from bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_file_tensors

from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.families.flux.tiny import tiny_flux_transformer
from flowtune.tiny import make_tiny
from flowtune.train.model import (
    LORA_WEIGHTS_NAME,
    META_TRAINED_LORA,
    RESUME_LORA_NAME,
    add_lora,
    expand_target_modules,
    load_lora,
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


def _trained_lora(model_dir: Path, alpha: int, **config) -> torch.nn.Module:
    """The tiny FLUX.1 with a rank-4 LoRA of ``alpha`` whose B moved away from zero, in eval mode."""
    transformer = load_transformer(FLUX, model_dir, torch.float32)
    if config:  # peft's own config (patterns, rsLoRA) on the default targets
        from peft import LoraConfig

        targets = list(FLUX.lora_target_modules)
        transformer.add_adapter(
            LoraConfig(
                r=4, lora_alpha=alpha, target_modules=expand_target_modules(transformer, targets), **config
            )
        )
    else:
        add_lora(transformer, FLUX, rank=4, alpha=alpha)
    generator = torch.Generator().manual_seed(alpha)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return transformer.eval()


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


# alpha 8 / rank 4: scale 2, a power of two, so the scaled B is exact and so is every update;
# alpha 6: scale 1.5, rounded once in float32; peft's patterns: per-module scales 2, 4 and 0.75.
PATTERNS = {"rank_pattern": {"attn.to_k": 2}, "alpha_pattern": {"proj_mlp": 3}}


@pytest.mark.parametrize("alpha, config", [(8, {}), (6, {}), (8, PATTERNS)])
def test_saved_lora_loads_in_flux_pipeline_with_identical_outputs(
    tiny_flux: Path, tmp_path: Path, alpha, config
) -> None:
    from diffusers import FluxPipeline

    transformer = _trained_lora(tiny_flux, alpha, **config)
    with torch.no_grad():
        trained = transformer(**tiny_flux_inputs(text_tokens=8))[0]
    path = save_lora(transformer, FLUX, tmp_path / "lora")
    assert path == tmp_path / "lora" / LORA_WEIGHTS_NAME
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    own = json.loads(metadata["lora_adapter_metadata"])
    # The file's scale is in its B: its own config says alpha = rank; the trained one is kept aside.
    assert own["transformer.lora_alpha"] == 4 and own["transformer.r"] == 4
    assert own["transformer.alpha_pattern"] == own["transformer.rank_pattern"]
    assert not own["transformer.use_rslora"]
    assert "single_transformer_blocks.0.proj_out" in own["transformer.target_modules"]
    assert json.loads(metadata[META_TRAINED_LORA])["lora_alpha"] == alpha

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    with torch.no_grad():
        base = pipe.transformer(**tiny_flux_inputs(text_tokens=8))[0]
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        loaded = pipe.transformer(**tiny_flux_inputs(text_tokens=8))[0]
    assert not torch.allclose(base, trained)
    if alpha == 8 and not config:
        assert torch.equal(loaded, trained)
    else:
        torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-6)


def _merged_by_a_metadata_blind_loader(
    weight: torch.Tensor, tensors: dict[str, torch.Tensor], key: str, rule: str
) -> torch.Tensor:
    """``weight`` patched with the LoRA ``key`` (``transformer.<module>``) of a file's tensors, as
    loaders that never read the safetensors metadata do (the file's peft config is invisible).

    - ``comfyui``: ComfyUI's LoraLoader (``comfy.utils.load_torch_file(path, safe_load=True)``,
      no metadata; ``comfy/lora.py`` ``load_lora``: alpha = the ``<key>.alpha`` tensor or None;
      ``comfy/weight_adapter/lora.py`` ``LoRAAdapter.calculate_weight``: ``alpha / rank`` if alpha
      is not None else 1.0, then ``weight += (strength * alpha) * mm(up, down)`` in float32).
      ComfyUI maps ``transformer.<diffusers module>`` keys to the BFL weights (``flux_to_diffusers``,
      q/k/v as row slices of qkv), which adds the same product to the same rows.
    - ``kohya``: kohya-style loaders (sd-scripts' ``convert_flux_lora.py`` for peft-named files):
      a module without ``.alpha`` gets alpha = its rank.
    """
    up, down = tensors[f"{key}.lora_B.weight"].float(), tensors[f"{key}.lora_A.weight"].float()
    alpha = tensors[f"{key}.alpha"].item() if f"{key}.alpha" in tensors else None
    if rule == "kohya" and alpha is None:
        alpha = down.shape[0]
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    strength = 1.0
    return weight + ((strength * scale) * torch.mm(up, down)).type(weight.dtype)


@pytest.mark.parametrize("alpha", [8, 6])
def test_loaders_that_ignore_the_metadata_apply_the_trained_update(
    tiny_flux: Path, tmp_path: Path, alpha
) -> None:
    from safetensors.torch import load_file

    transformer = _trained_lora(tiny_flux, alpha)
    save_lora(transformer, FLUX, tmp_path)
    tensors = load_file(tmp_path / LORA_WEIGHTS_NAME)  # tensors only, as ComfyUI reads it
    assert not any(key.endswith(".alpha") for key in tensors)
    layers = _lora_layers(transformer)
    assert {f"transformer.{name}.lora_A.weight" for name in layers} == {k for k in tensors if ".lora_A." in k}
    for name, layer in layers.items():
        base = layer.get_base_layer().weight
        expected = base + layer.get_delta_weight("default")  # peft: (B @ A) * alpha / rank
        for rule in ("comfyui", "kohya"):
            merged = _merged_by_a_metadata_blind_loader(base, tensors, f"transformer.{name}", rule)
            if alpha == 8:
                assert torch.equal(merged, expected), (rule, name)
            else:
                torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7, msg=f"{rule} {name}")
    # The trained B with the scale only in the metadata (what the file held before) gives
    # rank / alpha of the update to such a loader.
    name, layer = next(iter(layers.items()))
    unscaled = {
        f"transformer.{name}.lora_A.weight": layer.lora_A["default"].weight,
        f"transformer.{name}.lora_B.weight": layer.lora_B["default"].weight,
    }
    base = layer.get_base_layer().weight
    update = _merged_by_a_metadata_blind_loader(base, unscaled, f"transformer.{name}", "comfyui") - base
    torch.testing.assert_close(update * alpha / 4, layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "alpha, config",
    [
        (8, {}),  # scale 2: the scale is divided back out of B, exactly
        (6, {}),  # scale 1.5, not a power of two: read from the unscaled file beside it
        (4, {}),  # scale 1
        (8, PATTERNS),  # 2, 4 and 0.75
        (8, {"use_rslora": True}),  # 8 / sqrt(4) = 4
    ],
)
def test_load_lora_restores_the_trained_weights_bit_for_bit(
    tiny_flux: Path, tmp_path: Path, alpha, config
) -> None:
    trained = _trained_lora(tiny_flux, alpha, **config)
    save_lora(trained, FLUX, tmp_path)
    scales = {layer.scaling["default"] for layer in _lora_layers(trained).values()}
    exact = all(math.frexp(s)[0] == 0.5 for s in scales)
    assert (tmp_path / RESUME_LORA_NAME).is_file() is not exact
    if scales != {1.0}:  # the file does hold scaled weights
        saved = load_file_tensors(tmp_path / LORA_WEIGHTS_NAME)
        assert not torch.equal(
            saved["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
            trained.get_submodule("transformer_blocks.0.attn.to_q").lora_B["default"].weight,
        )

    resumed = load_transformer(FLUX, tiny_flux, torch.float32)
    resumed.add_adapter(trained.peft_config["default"])
    load_lora(resumed, tmp_path)
    want = {k: v for k, v in trained.state_dict().items() if ".lora_" in k}
    got = {k: v for k, v in resumed.state_dict().items() if ".lora_" in k}
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_load_lora_reads_older_unscaled_files_and_needs_the_unscaled_file_it_names(
    tiny_flux: Path, tmp_path: Path
) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    trained = _trained_lora(tiny_flux, 6)
    # A file from before the scale went into B: the trained weights as they are, no trained_lora.
    state = get_peft_model_state_dict(trained)
    (tmp_path / "old").mkdir()
    save_file({f"transformer.{k}": v for k, v in state.items()}, str(tmp_path / "old" / LORA_WEIGHTS_NAME))
    resumed = load_transformer(FLUX, tiny_flux, torch.float32)
    add_lora(resumed, FLUX, rank=4, alpha=6)
    load_lora(resumed, tmp_path / "old")
    assert all(
        torch.equal(v, resumed.state_dict()[k]) for k, v in trained.state_dict().items() if ".lora_" in k
    )

    save_lora(trained, FLUX, tmp_path / "new")
    (tmp_path / "new" / RESUME_LORA_NAME).unlink()
    with pytest.raises(FlowtuneError, match=f"{RESUME_LORA_NAME} is missing"):
        load_lora(resumed, tmp_path / "new")


def test_sample_generators_depend_only_on_seed_step_and_index() -> None:
    def draws(gens):
        return [torch.randn(3, generator=g) for g in gens]

    whole = draws(sample_generators(7, 3, range(4)))
    split = draws(sample_generators(7, 3, [0, 1])) + draws(sample_generators(7, 3, [2, 3]))
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(whole[0], draws(sample_generators(7, 4, [0]))[0])
    assert not torch.equal(whole[0], draws(sample_generators(8, 3, [0]))[0])


def _lora_step(model: torch.nn.Module, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """One forward/backward of the tiny FLUX.1; returns the output, the LoRA gradients and how
    many float32 tensors the operators made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made = [0]

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            leaves = torch.utils._pytree.tree_leaves(out)
            made[0] += sum(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in leaves)
            return out

    inputs = {
        k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in tiny_flux_inputs().items()
    }
    model.zero_grad(set_to_none=True)
    with Dtypes(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs)[0]
        out.float().square().mean().backward()
    return out, [p.grad for p in model.parameters() if p.requires_grad], made[0]


def test_lora_layers_skip_the_float32_input_copy_only_under_autocast() -> None:
    torch.manual_seed(0)
    model = tiny_flux_transformer().to(torch.bfloat16)
    model.requires_grad_(False)
    add_lora(model, FLUX, rank=2, alpha=2, init="gaussian")
    for p in model.parameters():  # lora_B starts at zero: give the LoRA path values to compare
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(bool(m.cast_input_dtype_enabled) for m in layers)  # no autocast here
    out, grads, made = _lora_step(model, autocast=True)
    for m in layers:
        m.cast_input_dtype_enabled = True
    ref_out, ref_grads, ref_made = _lora_step(model, autocast=True)
    # Under autocast peft's cast makes a float32 copy of every LoRA layer's input; now none ...
    assert ref_made - made >= len(layers), (ref_made, made)
    # ... and the results are those of peft's own cast, bit for bit.
    assert torch.equal(out, ref_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    # Without autocast the cast stays: a bf16 input meets the float32 LoRA weights.
    fresh = tiny_flux_transformer().to(torch.bfloat16).requires_grad_(False)
    add_lora(fresh, FLUX, rank=2, alpha=2)
    assert _lora_step(fresh, autocast=False)[0].dtype == torch.bfloat16
