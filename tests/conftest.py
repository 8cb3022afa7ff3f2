"""Shared test set-up: everything offline, quiet, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# The order in which `make test`'s pytest-xdist workers take the test files (`--dist loadfile
# --no-loadscope-reorder`): longest first, so that the last files to start are short ones and
# both workers finish together.  Each file's time measured on a fresh clone (2026-11-30,
# docs/performance.md "Test suite"); files not listed follow, those with tests marked `slow` (a
# family's learning run) first, then by their number of tests.
LONGEST_FIRST = (
    "test_family_contract.py",
    "test_plan.py",
    "test_preprocess.py",
    "test_wan.py",
    "test_flux2_klein.py",
    "test_qwen_image_edit.py",
    "test_z_image.py",
    "test_cli.py",
    "test_train.py",
    "test_quantize.py",
    "test_kontext_data.py",
    "test_qwen_image.py",
    "test_hunyuan_video.py",
    "test_wan22.py",
    "test_hardening_files.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """Order the test files as :data:`LONGEST_FIRST` says, each file's tests in their order."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.path.name, []).append(item)

    def weight(name: str) -> tuple[int, int, int]:
        if name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(name), 0)
        slow = any(item.get_closest_marker("slow") for item in files[name])
        return (1 if slow else 2, 0, -len(files[name]))

    items[:] = [item for name in sorted(files, key=weight) for item in files[name]]
