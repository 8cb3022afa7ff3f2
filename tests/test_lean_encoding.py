"""Lean preprocess and sampling (issue 17): one model at a time on the device during preprocess,
quantized text encoders (``model.encoder_quantize``), and ``flowtune sample --quantize
--encoder-quantize`` with a LoRA loaded on the quantized transformer, on tiny models on the CPU."""

from __future__ import annotations

import copy
import json
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from flowtune.data.preprocess import check_cache, preprocess
from flowtune.data.synthetic import make_shapes_dataset
from flowtune.encoders import EncoderSettings, FamilyEncoder, create_encoder
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.families.flux.encoder import FluxEncoder
from flowtune.memory.quantize import matches_any
from flowtune.recipe import load_recipe
from flowtune.tiny import make_tiny
from flowtune.train.checkpoint import RECIPE_FILE
from flowtune.train.model import LORA_WEIGHTS_NAME
from tests.helpers import assert_user_error, cli

PROMPTS = ["a red circle on a white background", "a blue star above a green square"]

# Relative error ||quantized - unquantized|| / ||unquantized|| of the text embeddings of PROMPTS,
# bound per family and mode (measured on these tiny random encoders: FLUX.1's T5 1.0%, 3.8%, 14%;
# FLUX.2's Mistral3 6.8%, 23%, and 74% for nf4, which is left out here: quantizing the 220 linear
# layers of the tiny Mistral3 to nf4 takes 5 s on a CPU).
MAX_RELATIVE_ERROR = {
    "flux": {"int8": 0.02, "fp8": 0.06, "nf4": 0.2},
    "flux2": {"int8": 0.1, "fp8": 0.3},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: make_tiny(family, root / family) for family in ("flux", "flux2")}


def _recipe(root: Path, model: Path, *overrides: str):
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "dataset").is_dir():
        make_shapes_dataset(root / "dataset", 3, seed=2, sizes=[(64, 64)])
    path = root / "recipe.yaml"
    path.write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32}}\n"
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16}\n"
    )
    return load_recipe(path, list(overrides))


def test_preprocess_frees_the_text_encoders_before_it_loads_the_vae(models, tmp_path, monkeypatch) -> None:
    """Every caption is encoded with no VAE loaded; every image after the text encoders were freed
    (garbage: no reference left anywhere) and with none loaded."""
    seen: list[tuple[str, bool, bool]] = []
    text_encoders: list[weakref.ref] = []
    encode_images, encode_prompts = FluxEncoder.encode_images, FluxEncoder.encode_prompts

    def images(enc, batch, generators=None):
        seen.append(("images", enc.pipe.vae is not None, enc.pipe.text_encoder_2 is not None))
        assert text_encoders and all(ref() is None for ref in text_encoders)
        return encode_images(enc, batch, generators)

    def prompts(enc, batch):
        seen.append(("texts", enc.pipe.vae is not None, enc.pipe.text_encoder_2 is not None))
        text_encoders.extend(weakref.ref(enc.pipe.components[k]) for k in ("text_encoder", "text_encoder_2"))
        return encode_prompts(enc, batch)

    monkeypatch.setattr(FluxEncoder, "encode_images", images)
    monkeypatch.setattr(FluxEncoder, "encode_prompts", prompts)
    report = preprocess(_recipe(tmp_path, models["flux"]), console=Console(quiet=True))
    assert report.images_encoded == 3 and report.texts_encoded == 4  # 3 captions + the empty one
    assert {kind for kind, *_ in seen} == {"images", "texts"}
    assert all(tuple(loaded) == (kind == "images", kind == "texts") for kind, *loaded in seen), seen
    assert seen.index(("images", True, False)) > max(i for i, s in enumerate(seen) if s[0] == "texts")


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_quantized_text_embeddings_stay_close_to_the_unquantized_ones(models, family) -> None:
    spec = get_family(family)

    def encode(mode: str | None) -> tuple[dict[str, torch.Tensor], object]:
        encoder = create_encoder(
            spec, models[family], EncoderSettings("float32", 16, "mode", None, mode), "cpu"
        )
        encoder.load(images=False, texts=True)
        return encoder.encode_prompts(PROMPTS), encoder.pipe

    reference, _ = encode(None)
    for mode, bound in MAX_RELATIVE_ERROR[family].items():
        out, pipe = encode(mode)
        error = (out["text_embeddings"] - reference["text_embeddings"]).norm() / reference[
            "text_embeddings"
        ].norm()
        assert 0 < error < bound, (mode, float(error))
        for component, skip in spec.encoder_quantize_skip:
            weights = {
                n: type(m.weight) for n, m in getattr(pipe, component).named_modules() if hasattr(m, "weight")
            }
            quantized = {n for n, t in weights.items() if t not in (torch.Tensor, torch.nn.Parameter)}
            assert quantized and not any(matches_any(n, skip) for n in quantized)
            assert all(any(matches_any(n, (p,)) for n in weights) for p in skip)  # each names a layer
    if family == "flux":  # CLIP is kept as loaded: its pooled embedding is unchanged
        assert torch.equal(out["pooled_prompt_embeds"], reference["pooled_prompt_embeds"])


def test_changing_encoder_quantize_re_encodes_the_captions_and_nothing_else(models, tmp_path) -> None:
    plain = _recipe(tmp_path, models["flux"])
    preprocess(plain, console=Console(quiet=True))
    quantized = _recipe(tmp_path, models["flux"], "model.encoder_quantize=int8")
    with pytest.raises(FlowtuneError, match=r"model.encoder_quantize=null \(the recipe has \"int8\"\)"):
        check_cache(quantized)
    report = preprocess(quantized, console=Console(quiet=True))
    assert (report.texts_encoded, report.images_encoded, report.images_reused) == (4, 0, 3)
    check_cache(quantized)
    with pytest.raises(FlowtuneError, match="model.encoder_quantize"):
        check_cache(plain)


def _lora(model: Path, out: Path) -> Path:
    """A random LoRA (rank 4) for the tiny FLUX.1's attention and feed-forward output layers,
    strong enough to change the images clearly."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = FluxTransformer2DModel.from_pretrained(model / "transformer")
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "ff.net.2"])
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out / LORA_WEIGHTS_NAME


def _pixels(folder: Path) -> np.ndarray:
    return np.asarray(Image.open(folder / "000000.png"), dtype=np.float32)


def test_sample_loads_a_lora_on_each_quantized_transformer(models, tmp_path) -> None:
    model = models["flux"]
    lora = _lora(model, tmp_path / "lora")
    common = ("-p", PROMPTS[0], "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu")
    for name, extra in {
        "base": ("--model", str(model)),
        "lora": ("--model", str(model), "--lora", str(lora)),
        **{
            mode: ("--model", str(model), "--lora", str(lora), "--quantize", mode)
            for mode in ("int8", "fp8", "nf4")
        },
    }.items():
        result = cli("sample", *extra, *common, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    lora_effect = np.abs(_pixels(tmp_path / "lora") - _pixels(tmp_path / "base")).mean()
    assert lora_effect > 5
    for mode in ("int8", "fp8", "nf4"):
        assert np.abs(_pixels(tmp_path / mode) - _pixels(tmp_path / "lora")).mean() < 0.3 * lora_effect, mode
    record = json.loads((tmp_path / "nf4" / "samples.jsonl").read_text())
    assert record["quantize"] == "nf4" and "encoder_quantize" not in record


def test_sampling_a_checkpoint_defaults_to_its_recipe_s_quantization(models, tmp_path) -> None:
    model = models["flux"]
    ckpt = tmp_path / "final"
    _lora(model, ckpt)
    (ckpt / RECIPE_FILE).write_text(
        f"model: {{family: flux, pretrained: '{model}', dtype: float32, quantize: int8, encoder_quantize: fp8}}\n"
        f"data: {{source: '{tmp_path}', max_sequence_length: 16}}\n"
        "validation: {steps: 1, height: 32, width: 32}\n"
    )
    result = cli("sample", "--ckpt", str(ckpt), "-p", "x", "--device", "cpu", "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "a" / "samples.jsonl").read_text())
    assert (record["quantize"], record["encoder_quantize"]) == ("int8", "fp8")
    result = cli(
        "sample", "--ckpt", str(ckpt), "-p", "x", "--device", "cpu", "--out", str(tmp_path / "b"),
        "--quantize", "none", "--encoder-quantize", "nf4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "b" / "samples.jsonl").read_text())
    assert "quantize" not in record and record["encoder_quantize"] == "nf4"


def test_bad_quantization_values_are_one_line_errors_before_loading(models, tmp_path) -> None:
    for option in ("--quantize", "--encoder-quantize"):
        assert_user_error(
            cli("sample", "--model", str(tmp_path / "nowhere"), "-p", "x", option, "int4"),
            f"{option} 'int4'",
            "int8, fp8, nf4 or none",
        )
    with pytest.raises(FlowtuneError, match="model.encoder_quantize"):
        _recipe(tmp_path, models["flux"], "model.encoder_quantize=int4")


def test_a_missing_torchao_is_one_line_before_any_model_loads(models, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError
    monkeypatch.setattr(FamilyEncoder, "load", lambda *_, **__: pytest.fail("a model was loaded"))
    recipe = _recipe(tmp_path, models["flux"], "model.encoder_quantize=nf4")
    with pytest.raises(FlowtuneError, match=r"^model.encoder_quantize=nf4 needs torchao; install it"):
        preprocess(recipe, console=Console(quiet=True))
    for option in ("--quantize", "--encoder-quantize"):
        assert_user_error(
            cli("sample", "--model", str(models["flux"]), "-p", "x", option, "int8"),
            f"{option}=int8 needs torchao",
        )


def test_text_encoders_lose_only_what_encoding_never_runs(models, monkeypatch) -> None:
    """FLUX.2's Mistral3 keeps its layers up to hidden state 30 and loses its head and vision
    tower; the embeddings stay bit for bit.  The tiny model's 30 layers are deepened to 33 first,
    so that hidden state 30 is a layer's raw output, as in FLUX.2 [dev]'s 40 layers, and pruning
    drops layers."""
    from flowtune.families.flux2.encoder import Flux2Encoder

    monkeypatch.setattr(Flux2Encoder, "prune_text_encoder", classmethod(lambda cls, name, model: None))
    encoder = create_encoder(
        get_family("flux2"), models["flux2"], EncoderSettings("float32", 16, "mode"), "cpu"
    )
    encoder.load(images=False, texts=True)
    model = encoder.pipe.text_encoder
    layers = model.get_decoder().layers
    layers.extend(copy.deepcopy(layers[-3:]))
    model.get_decoder().config.num_hidden_layers = len(layers)
    whole = encoder.encode_prompts(PROMPTS)["text_embeddings"]
    monkeypatch.undo()

    Flux2Encoder.prune_text_encoder("text_encoder", model)
    assert len(layers) == 31 and isinstance(model.lm_head, torch.nn.Identity)
    assert model.model.vision_tower is None and model.model.multi_modal_projector is None
    assert torch.equal(encoder.encode_prompts(PROMPTS)["text_embeddings"], whole)
