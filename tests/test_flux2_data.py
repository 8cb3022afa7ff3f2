"""FLUX.2 data on the tiny Flux2Pipeline: cached latents, text embeddings and reference (control)
latents against what diffusers' Flux2Pipeline computes itself, the caption-length warning, the
PixtralProcessor tokenizer layout of FLUX.2 [dev], and data.edit_pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from flowtune.data.loader import CachedDataset
from flowtune.data.preprocess import preprocess
from flowtune.data.synthetic import make_edit_pairs_dataset, make_shapes_dataset
from flowtune.encoders import EncoderSettings, create_encoder
from flowtune.errors import FlowtuneError
from flowtune.families import get_family
from flowtune.recipe import load_recipe
from flowtune.recipe.load import RecipeError
from flowtune.tiny import make_tiny
from tests.helpers import assert_user_error, cli, save_image, write

# 64x64 and 80x48 are buckets at resolution 64 (no resampling); 96x64 and 64x112 are cropped.
SIZES = [(64, 64), (80, 48), (96, 64), (64, 112)]
LENGTH = 64  # tokens: FLUX.2's system message and chat markup take 31 of them (tiny tokenizer)
PROMPTS = ["a red circle"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from intra-op threads; on a busy 2-core machine their
    spinning slows the 30-layer text encoder ~100x.  Both sides of every comparison run here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny("flux2", tmp_path_factory.mktemp("models") / "tiny-flux2")


@pytest.fixture(scope="module")
def pipe(tiny_flux2: Path):
    """The tiny Flux2Pipeline without its transformer, as diffusers loads it."""
    from diffusers import Flux2Pipeline

    return Flux2Pipeline.from_pretrained(tiny_flux2, transformer=None)


def _recipe(root: Path, model: Path, source: Path, *overrides: str, family: str = "flux2", res: int = 64):
    root.mkdir(parents=True, exist_ok=True)
    write(
        root / "recipe.yaml",
        f"model: {{family: {family}, pretrained: '{model}', dtype: float32}}\n"
        f"data: {{source: '{source}', cache_dir: '{root / 'cache'}', resolution: {res},"
        f" max_sequence_length: {LENGTH}, encode_batch_size: 1, min_size: upscale}}\n"
        f"validation: {{prompts: {json.dumps(PROMPTS)}}}\n",
    )
    return load_recipe(root / "recipe.yaml", list(overrides))


def _run(recipe):
    return preprocess(recipe, console=Console(quiet=True))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory, tiny_flux2: Path) -> CachedDataset:
    """A plain captioned folder (no control/) preprocessed for flux2, one image per VAE call as
    the pipeline encodes one reference, so that comparisons can be bitwise."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root / "data", len(SIZES), seed=4, sizes=SIZES)
    recipe = _recipe(root, tiny_flux2, root / "data")
    report = _run(recipe)
    assert report.items == len(SIZES) and report.errors == []
    return CachedDataset(recipe.data.cache_dir)


def _cropped(item: dict) -> Image.Image:
    """The item's image cropped to its bucket as recorded in the manifest: one Lanczos resample
    of the crop box (PIL's own resize-with-box; no resampling when the image is the bucket)."""
    with Image.open(item["source"]) as image:
        rgb = image.convert("RGB")
    if item["original_size"] == item["bucket"]:
        return rgb
    return rgb.resize(tuple(item["bucket"]), Image.Resampling.LANCZOS, box=tuple(item["crop_box"]))


def test_image_latents_equal_flux2_pipeline_encode_vae_image(pipe, shapes) -> None:
    assert {tuple(i["bucket"]) for i in shapes.items} >= {(64, 64), (80, 48), (48, 80)}
    uncropped = 0
    for index, item in enumerate(shapes.items):
        width, height = item["bucket"]
        uncropped += item["original_size"] == item["bucket"]
        with torch.no_grad():
            expected = pipe._encode_vae_image(pipe.image_processor.preprocess(_cropped(item)), generator=None)
        cached = shapes[index]["image_latents"]
        assert cached.shape == (128, height // 16, width // 16)
        assert torch.equal(cached, expected[0]), item["source"]
    assert 0 < uncropped < len(shapes.items)


def test_unnormalized_latents_decode_like_the_vae_round_trip(pipe, shapes) -> None:
    vae = pipe.vae
    uncropped = [i for i, item in enumerate(shapes.items) if item["original_size"] == item["bucket"]]
    assert len(uncropped) == 2  # 64x64 and 80x48
    for index in uncropped:
        item = shapes.items[index]
        pixels = pipe.image_processor.preprocess(_cropped(item))
        cached = shapes[index]["image_latents"][None]
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.mode()
            unpatchified = pipe._unpatchify_latents(cached * std + mean)
            decoded, expected = vae.decode(unpatchified).sample, vae.decode(z).sample
        assert unpatchified.shape == z.shape == (1, 32, pixels.shape[2] // 8, pixels.shape[3] // 8)
        # Not bitwise: (x - m) / s * s + m is x only up to float32 rounding (measured <= 6e-8 on
        # latents of magnitude < 1), which the random decoder amplifies to <= 1e-5 on outputs of
        # magnitude ~5; hence 1e-6 and 1e-4.  A wrong statistic, patch order or transposition
        # changes the latents by O(0.1-1).
        torch.testing.assert_close(unpatchified, z, atol=1e-6, rtol=0)
        torch.testing.assert_close(decoded, expected, atol=1e-4, rtol=0)


def test_text_embeddings_equal_flux2_encode_prompt(pipe, shapes) -> None:
    with torch.no_grad():
        for index in (0, 1):
            sample = shapes[index]
            expected, _ = pipe.encode_prompt(prompt=sample["caption"], max_sequence_length=LENGTH)
            assert sample["text_embeddings"].shape == (LENGTH, 48)
            assert torch.equal(sample["text_embeddings"], expected[0])
        for prompt in [*PROMPTS, ""]:
            expected, _ = pipe.encode_prompt(prompt=prompt, max_sequence_length=LENGTH)
            assert torch.equal(shapes.prompt_embeddings(prompt)["text_embeddings"], expected)
    first, second = shapes[0], shapes[1]
    assert first["caption"] != second["caption"]
    assert not torch.allclose(first["text_embeddings"], second["text_embeddings"], atol=1e-3)


def test_plain_folders_are_the_flux2_default(shapes) -> None:
    manifest = shapes.store.manifest
    assert all("controls" not in item for item in manifest["items"])
    assert "data.control_resize" not in manifest["settings"]
    assert not [k for k in shapes[0] if k.startswith("control")]


def test_captions_longer_than_the_limit_with_the_system_message_are_warned_about(
    tmp_path, tiny_flux2
) -> None:
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import AutoTokenizer

    data = tmp_path / "data"
    make_shapes_dataset(data, 3, seed=1)
    (data / "0000.txt").write_text(" ".join(["red"] * 40))  # 40 tokens; 71 with the system message
    (data / "0001.txt").write_text("a cat")
    report = _run(_recipe(tmp_path, tiny_flux2, data, "validation.prompts=[]"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_flux2 / "tokenizer")

    def tokens(caption: str) -> int:
        chat = format_input(prompts=[caption], system_message=SYSTEM_MESSAGE)[0]
        return len(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])

    captions = {p.name: p.with_suffix(".txt").read_text().strip() for p in data.glob("*.png")}
    assert len(tokenizer(captions["0000.png"], add_special_tokens=False)["input_ids"]) < LENGTH
    expected = {name for name, caption in captions.items() if tokens(caption) > LENGTH}
    assert "0000.png" in expected and "0001.png" not in expected
    warned = {Path(p.path).name: p.reason for p in report.problems if p.kind == "warning"}
    assert set(warned) == expected
    assert warned["0000.png"] == (
        f"caption has {tokens(captions['0000.png'])} tokens; the text encoder sees only the first "
        f"{LENGTH} (data.max_sequence_length)"
    )
    assert report.items == 3  # a warning, not an error


def _processor_layout(model: Path, root: Path) -> Path:
    """A copy of the tiny model whose tokenizer folder is laid out as FLUX.2 [dev] ships it: a
    PixtralProcessor with its chat template in chat_template.json only."""
    copy = shutil.copytree(model, root / "processor-layout")
    index = json.loads((copy / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]
    write(copy / "model_index.json", json.dumps(index))
    folder = copy / "tokenizer"
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text() if jinja.is_file() else None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = config.pop("chat_template", None) or template
    write(folder / "tokenizer_config.json", json.dumps(config))
    jinja.unlink(missing_ok=True)
    assert template
    write(folder / "chat_template.json", json.dumps({"chat_template": template}))
    processor = {
        "processor_class": "PixtralProcessor",
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
        "patch_size": 16,
        "spatial_merge_size": 2,
    }
    write(folder / "processor_config.json", json.dumps(processor))
    return copy


def test_processor_layout_tokenizer_loads_and_encodes_the_same(tmp_path, tiny_flux2) -> None:
    spec = get_family("flux2")
    settings = EncoderSettings("float32", LENGTH, "mode")
    prompts = ["a red circle", "make the star blue"]
    original = create_encoder(spec, tiny_flux2, settings, "cpu")
    original.load(images=False, texts=True)
    copy = _processor_layout(tiny_flux2, tmp_path)
    encoder = create_encoder(spec, copy, settings, "cpu")
    encoder.load(images=False, texts=True)
    assert encoder.pipe.vae is None and encoder.pipe.tokenizer.chat_template
    expected = original.encode_prompts(prompts)["text_embeddings"]
    assert torch.equal(encoder.encode_prompts(prompts)["text_embeddings"], expected)
    assert encoder.token_counts(prompts) == original.token_counts(prompts)

    (copy / "tokenizer" / "chat_template.json").unlink()
    with pytest.raises(FlowtuneError, match="chat_template"):
        create_encoder(spec, copy, settings, "cpu").load(images=False, texts=True)


# ------------------------------------------------------------------------------------ edit pairs

# (target, control): a control whose sides are not multiples of 16, one over 1024 x 1024 pixels.
PAIRS = [((96, 96), (100, 76)), ((128, 80), (1040, 1040)), ((96, 96), (72, 88))]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    make_edit_pairs_dataset(root, 3, seed=6, sizes=[t for t, _ in PAIRS], control_sizes=[c for _, c in PAIRS])
    return root


def _pipeline_reference_latents(pipe, image: Image.Image) -> torch.Tensor:
    """A reference image's latents as Flux2Pipeline.__call__ computes them: its step 4 ("process
    images"), then prepare_image_latents' _encode_vae_image."""
    pipe.image_processor.check_image_input(image)
    width, height = image.size
    if width * height > 1024 * 1024:
        image = pipe.image_processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.size
    multiple_of = pipe.vae_scale_factor * 2
    width, height = width // multiple_of * multiple_of, height // multiple_of * multiple_of
    pixels = pipe.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")
    with torch.no_grad():
        return pipe._encode_vae_image(pixels, generator=None)[0]


@pytest.mark.parametrize("mode", ["pipeline", "match_target"])
def test_control_latents_equal_flux2_pipeline_reference_latents(tmp_path, tiny_flux2, pipe, pairs, mode):
    recipe = _recipe(
        tmp_path, tiny_flux2, pairs, "data.edit_pairs=true", f"data.control_resize={mode}", res=96
    )
    report = _run(recipe)
    assert report.items == len(PAIRS) and report.errors == []
    assert report.controls_encoded == len(PAIRS)
    data = CachedDataset(recipe.data.cache_dir)
    sizes = []
    for index, item in enumerate(data.items):
        (control,) = item["controls"]
        with Image.open(control["source"]) as image:
            rgb = image.convert("RGB")
        if mode == "match_target":
            # As sampling passes the reference: resized to the target's size, which the pipeline keeps.
            width, height = item["bucket"]
            rgb = pipe.image_processor.resize(rgb, height, width)
        expected = _pipeline_reference_latents(pipe, rgb)
        cached = data[index]["control_latents_0"]
        assert cached.shape == expected.shape
        assert torch.equal(cached, expected), control["source"]
        sizes.append(tuple(control["size"]))
        assert cached.shape[1:] == (control["size"][1] // 16, control["size"][0] // 16)
    if mode == "pipeline":
        # 1040 x 1040 scales to int(1023.99...) = 1023 (float rounding), floored to 1008.
        assert sizes == [(96, 64), (1008, 1008), (64, 80)]
    else:
        assert sizes == [tuple(i["bucket"]) for i in data.items] == [(96, 96), (128, 80), (96, 96)]


def test_edit_pairs_need_the_edit_pair_layout(tmp_path, tiny_flux2) -> None:
    data = tmp_path / "data"
    make_shapes_dataset(data / "images", 2)  # images/ but no control/
    _recipe(tmp_path, tiny_flux2, data)
    result = cli("preprocess", str(tmp_path / "recipe.yaml"), "data.edit_pairs=true")
    assert_user_error(result, "not an edit-pair folder", "control/")


def test_edit_pairs_setting_must_fit_the_family(tmp_path, tiny_flux2) -> None:
    source = save_image(tmp_path / "data" / "a.png").parent
    no_prompts = "validation.prompts=[]"  # flux-kontext would need a reference per prompt
    with pytest.raises(RecipeError, match=r"'data\.edit_pairs'.*'flux' takes no reference images") as err:
        _recipe(tmp_path / "flux", tiny_flux2, source, "data.edit_pairs=true", family="flux")
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=r"'data\.edit_pairs'.*always edits"):
        _recipe(
            tmp_path / "kontext",
            tiny_flux2,
            source,
            "data.edit_pairs=false",
            no_prompts,
            family="flux-kontext",
        )
    for value in ("true", "false"):
        recipe = _recipe(tmp_path / "flux2", tiny_flux2, source, f"data.edit_pairs={value}")
        assert recipe.data.edit_pairs is (value == "true")
    for family in ("flux", "flux-kontext"):
        assert (
            _recipe(tmp_path / family, tiny_flux2, source, no_prompts, family=family).data.edit_pairs is None
        )


def test_controls_flux2_pipeline_would_refuse_as_references_are_warned_about(tmp_path, tiny_flux2) -> None:
    # 48 x 48 is under Flux2Pipeline's 64 px minimum, 600 x 64 over its 8:1 aspect ratio; 80 x 64 is fine.
    make_edit_pairs_dataset(
        tmp_path / "data", 3, seed=2, sizes=[(64, 64)], control_sizes=[(48, 48), (600, 64), (80, 64)]
    )
    recipe = _recipe(tmp_path, tiny_flux2, tmp_path / "data", "data.edit_pairs=true")
    report = _run(recipe)
    assert report.items == 3  # they train
    warned = {Path(p.path).name: p.reason for p in report.problems if "as a reference" in p.reason}
    assert sorted(warned) == ["0000.png", "0001.png"]
    assert "at least 64px" in warned["0000.png"] and "(48x48)" in warned["0000.png"]
    assert "Aspect ratio too extreme" in warned["0001.png"]
    # Resized to the 64 x 64 target (match_target), the same controls are taken as they are.
    again = _run(
        _recipe(
            tmp_path / "mt",
            tiny_flux2,
            tmp_path / "data",
            "data.edit_pairs=true",
            "data.control_resize=match_target",
        )
    )
    assert not [p for p in again.problems if "as a reference" in p.reason]


def test_a_reference_flux2_pipeline_would_refuse_is_a_one_line_error_before_loading(
    tmp_path, tiny_flux2
) -> None:
    small = save_image(tmp_path / "small.png", (32, 32))
    result = cli("sample", "--model", str(tiny_flux2), "-p", "x", "--image", str(small), "--steps", "1")
    assert_user_error(result, f"the reference image {small} (32x32) cannot be used", "at least 64px")
    # Handed over at the output size (match_target), the same file is fine.
    from flowtune.sample import pair_references

    flux2 = get_family("flux2")
    assert pair_references(flux2, ["x"], [small], (64, 64), "match_target") == [(str(small),)]
    with pytest.raises(FlowtuneError, match="cannot be used"):
        pair_references(flux2, ["x"], [small], (64, 64), "pipeline")
