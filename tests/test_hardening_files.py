"""Files flowtune writes: a read-only or full output location is a one-line error naming the path
(exit 2, no traceback) and never damages earlier outputs; every file honours the umask.

Read-only locations are read-only bind mounts and full disks small tmpfs mounts (real file-system
errors, as a user meets them); without the privilege to mount, read-only falls back to chmod (which
binds a non-root user) and the full-disk tests are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from flowtune.fileio import atomic_dir, atomic_write_bytes, tree_bytes
from tests.helpers import assert_user_error, cli

PROMPT = ["-p", "a red circle on a white background"]
SAMPLE = ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _cli(*args: str | Path) -> tuple[int, str]:
    """Run ``flowtune ARGS`` through :func:`flowtune.cli.main` in this process (a traceback
    escapes as the exception); returns the exit status and stderr."""
    from flowtune.cli import main

    stderr = io.StringIO()
    argv = ["flowtune", *map(str, args)]
    with (
        mock.patch.object(sys, "argv", argv),
        contextlib.redirect_stderr(stderr),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    return code, stderr.getvalue()


def _assert_one_line(result: tuple[int, str], *fragments: str) -> str:
    code, stderr = result
    message = stderr.strip()
    assert code == 2, stderr
    assert "\n" not in message, f"expected one line, got:\n{message}"
    for fragment in fragments:
        assert fragment in message, message
    return message


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[str]:
    """Make the existing directory ``path`` read-only for this process; yields the reason a write
    then fails with ("read-only file system", or "permission denied" with the chmod fallback)."""
    if _mount("--bind", "-o", "ro", str(path), str(path)):
        try:
            yield "read-only file system"
        finally:
            _umount(path)
        return
    if os.geteuid() == 0:
        pytest.skip("a read-only location needs a bind mount (root can write through chmod)")
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
    for directory in modes:
        directory.chmod(0o555)
    try:
        yield "permission denied"
    finally:
        for directory, mode in modes.items():
            directory.chmod(mode)


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs root")
    try:
        yield path
    finally:
        _umount(path)


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` up to ``leave`` free bytes."""
    (disk / "ballast").unlink(missing_ok=True)
    free = shutil.disk_usage(disk).free
    with open(disk / "ballast", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo chain under umask 022: tiny model, dataset, cache, a 2-step run with checkpoints,
    samples, a ComfyUI export and a merged transformer."""
    root = tmp_path_factory.mktemp("files")
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"model: {{family: flux, pretrained: '{root / 'tiny'}', dtype: float32}}\n"
        "lora: {rank: 4, alpha: 4}\n"
        f"data: {{source: '{root / 'dataset'}', cache_dir: '{root / 'cache'}', resolution: 64,"
        " max_sequence_length: 16}\n"
        f"train: {{output_dir: '{root / 'run'}', max_steps: 2, seed: 0, mixed_precision: 'no',"
        " checkpoint_every: 1, log_every: 1}\n"
        "lr_scheduler: {name: constant}\n"
    )
    run = root / "run"
    with _umask(0o022):
        for args in (
            ["make-tiny", "flux", root / "tiny"],
            ["make-dataset", root / "dataset", "--count", "4"],
            ["preprocess", recipe],
            ["train", recipe],
            ["sample", "--ckpt", run, "--out", root / "samples", *PROMPT, *SAMPLE],
            ["export", "--ckpt", run, "--format", "comfyui"],
            ["export", "--ckpt", run, "--merge", "--out", root / "merged"],
        ):
            code, stderr = _cli(*args)
            assert code == 0, stderr
    return root


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_with_umask_022_every_output_is_readable_by_group_and_others(chain) -> None:
    outputs = {
        "cache/manifest.json",
        "run/checkpoints/step-000002/pytorch_lora_weights.safetensors",
        "run/checkpoints/step-000002/optimizer.bin",
        "run/final/pytorch_lora_weights.safetensors",
        "run/export/run-final-comfyui.safetensors",
        "merged/diffusion_pytorch_model.safetensors",
        "samples/000000.png",
        "samples/grid.png",
    }
    modes = _modes(chain)
    assert outputs <= modes.keys()
    assert any(name.startswith("cache/shards/") for name in modes)
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o755 if (chain / name).is_dir() else 0o644) and name != "recipe.yaml"
    }
    assert not wrong, wrong


def test_with_umask_077_outputs_stay_private(chain, tmp_path) -> None:
    recipe = chain / "recipe.yaml"
    with _umask(0o077):
        atomic_write_bytes(tmp_path / "file.bin", b"x")
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "inside.txt").write_text("y")
        for args in (
            ["preprocess", recipe, f"data.cache_dir={tmp_path / 'cache'}"],
            ["export", "--ckpt", chain / "run", "--out", tmp_path / "lora.safetensors"],
            ["export", "--ckpt", chain / "run", "--merge", "--out", tmp_path / "merged"],
            ["sample", "--ckpt", chain / "run", "--out", tmp_path / "samples", *PROMPT, *SAMPLE],
        ):
            code, stderr = _cli(*args)
            assert code == 0, stderr
    modes = _modes(tmp_path)
    assert {
        "file.bin",
        "folder",
        "cache/manifest.json",
        "lora.safetensors",
        "merged",
        "samples/000000.png",
    } <= (modes.keys())
    wrong = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (tmp_path / name).is_dir() else 0o600)
    }
    assert not wrong, wrong


def test_read_only_outputs_are_one_line_errors_naming_the_path(chain, tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    recipe, run = chain / "recipe.yaml", chain / "run"
    with _read_only(locked) as reason:
        for args in (
            ["make-dataset", locked / "dataset", "--count", "2"],
            ["make-tiny", "flux", locked / "tiny"],
            ["preprocess", recipe, f"data.cache_dir={locked / 'cache'}"],
            ["train", recipe, f"train.output_dir={locked / 'run'}"],
            ["sample", "--ckpt", run, "--out", locked / "samples", *PROMPT, *SAMPLE],
            ["export", "--ckpt", run, "--out", locked / "lora.safetensors"],
            ["export", "--ckpt", run, "--merge", "--out", locked / "merged"],
        ):
            message = _assert_one_line(_cli(*args), str(locked))
            assert reason in message.lower(), message
    assert not any(locked.iterdir())


def test_a_read_only_checkpoint_can_be_sampled_and_exported_elsewhere(chain, tmp_path) -> None:
    run = chain / "run"
    with _read_only(run):
        code, stderr = _cli("sample", "--ckpt", run, "--out", tmp_path / "samples", *PROMPT, *SAMPLE)
        assert code == 0, stderr
        code, stderr = _cli("export", "--ckpt", run, "--out", tmp_path / "lora.safetensors")
        assert code == 0, stderr
        # The default place, RUN/export/, is in the read-only run: the message says to use --out.
        _assert_one_line(_cli("export", "--ckpt", run, "--format", "kohya"), str(run / "export"), "--out")
    assert (tmp_path / "samples" / "000000.png").is_file() and (tmp_path / "lora.safetensors").is_file()


def test_a_full_disk_keeps_the_earlier_checkpoints_and_says_how_much_space(chain, tmp_path) -> None:
    recipe = chain / "recipe.yaml"
    with _small_disk(tmp_path / "disk", "8m") as disk:
        run = disk / "run"
        code, stderr = _cli("train", recipe, f"train.output_dir={run}", "train.max_steps=1")
        assert code == 0, stderr
        first = run / "checkpoints" / "step-000001"
        before = {"first": _digest(first), "final": _digest(run / "final")}
        _fill(disk, leave=tree_bytes(first) // 2)
        result = cli(
            "train", str(recipe), f"train.output_dir={run}", "train.resume=latest", "train.max_steps=2"
        )
        assert_user_error(
            result,
            f"cannot write checkpoint to {run / 'checkpoints'}",
            "no space left on device (",
            "free; the last checkpoint took",
        )
        assert "(0 bytes free" not in result.stderr  # the half-written checkpoint's space came back
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
        assert {"first": _digest(first), "final": _digest(run / "final")} == before

        # The other writers on the full disk: one line each, no temporary file left behind.
        _fill(disk, leave=0)
        for args, path in (
            (
                ["export", "--ckpt", chain / "run", "--out", disk / "lora.safetensors"],
                disk / "lora.safetensors",
            ),
            (["export", "--ckpt", chain / "run", "--merge", "--out", disk / "merged"], disk / "merged"),
            (["sample", "--ckpt", chain / "run", "--out", disk / "s", *PROMPT, *SAMPLE], disk / "s"),
            (["make-dataset", disk / "dataset", "--count", "2"], disk / "dataset"),
        ):
            _assert_one_line(_cli(*args), str(path), "no space left on device (0 bytes free")
        _fill(disk, leave=8192)  # room for the cache's lock file, not for its first shard
        code, stderr = _cli("preprocess", recipe, f"data.cache_dir={disk / 'cache'}")
        _assert_one_line((code, stderr), str(disk / "cache" / "shards"), "no space left on device (")
        leftovers = [p.name for p in disk.iterdir() if p.name.startswith(".")]
        assert not leftovers, leftovers
