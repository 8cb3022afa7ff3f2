"""Locating a pretrained model's component folders, and fingerprinting them."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowtune.errors import FlowtuneError
from flowtune.model_files import fingerprint_components, resolve_pretrained


def _model(root: Path) -> Path:
    for component, size in (("vae", 10), ("text_encoder", 300_000), ("transformer", 10)):
        (root / component).mkdir(parents=True)
        (root / component / "config.json").write_text(f'{{"component": "{component}"}}')
        (root / component / "weights.safetensors").write_bytes(bytes(range(256)) * (size // 256 + 1))
    return root


def test_a_local_directory_is_used_as_it_is(tmp_path: Path) -> None:
    model = _model(tmp_path / "m")
    assert resolve_pretrained(str(model), None, ["vae", "text_encoder"]) == model
    with pytest.raises(FlowtuneError, match="has no tokenizer folder"):
        resolve_pretrained(str(model), None, ["vae", "tokenizer"])


@pytest.mark.parametrize("value", ["./nowhere", "/abs/path/model", "models/a/b", "x"])
def test_a_missing_path_is_a_one_line_error(value: str) -> None:
    with pytest.raises(FlowtuneError, match="does not exist") as info:
        resolve_pretrained(value, None, ["vae"])
    assert "\n" not in str(info.value)


def test_a_hub_id_downloads_only_the_components_needed(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_pretrained("owner/model", "v1", ["vae", "text_encoder"]) == tmp_path
    assert calls == [("owner/model", "v1", ["model_index.json", "vae/*", "text_encoder/*"])]


def test_an_unreachable_hub_id_is_a_one_line_error(monkeypatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the Hub.\nMore details follow.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FlowtuneError) as info:
        resolve_pretrained("owner/model", None, ["vae"])
    message = str(info.value)
    assert "owner/model" in message and "couldn't connect" in message and "\n" not in message


def test_fingerprint_follows_the_files_of_the_named_components_only(tmp_path: Path) -> None:
    model = _model(tmp_path / "m")
    first = fingerprint_components(model, ["vae", "text_encoder"])
    assert first == fingerprint_components(model, ["text_encoder", "vae"])
    (model / "transformer" / "weights.safetensors").write_bytes(b"other")
    assert fingerprint_components(model, ["vae", "text_encoder"]) == first
    # A change in the middle of a large file is not seen (only its size, head and tail are
    # hashed), but any change of its head, tail or size is.
    weights = model / "text_encoder" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert fingerprint_components(model, ["vae", "text_encoder"]) != first
