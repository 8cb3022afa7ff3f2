"""The resume compatibility policy as a pure function: what a resumed run refuses and what it
warns about (the trainer's resume tests cover it end to end)."""

from __future__ import annotations

import copy

from omegaconf import OmegaConf

from flowtune.recipe import load_recipe
from flowtune.train.resume_compat import RunFacts, resume_verdict

RECIPE = OmegaConf.to_container(load_recipe("tiny-flux-demo"))
STATE = {"sharded": False, "samples_per_step": 2, "data_fingerprint": "abc", "data_items": 8}
FACTS = RunFacts(sharded=False, samples_per_step=2, data_fingerprint="abc", data_items=8)


def _changed(**changes: object) -> dict:
    recipe = copy.deepcopy(RECIPE)
    for key, value in changes.items():
        section, name = key.split("__")
        recipe[section][name] = value
    return recipe


def test_the_same_run_resumes_without_a_word() -> None:
    assert resume_verdict(RECIPE, RECIPE, STATE, FACTS) == (None, [])


def test_changes_to_the_trained_tensors_are_refused() -> None:
    refusal, _ = resume_verdict(RECIPE, _changed(lora__rank=8), STATE, FACTS)
    assert refusal.startswith(f"it was trained with lora.rank={RECIPE['lora']['rank']} and the recipe has 8")
    full = _changed(train__mode="full", lora__target_modules=["to_q"])
    assert resume_verdict(_changed(train__mode="full"), full, STATE, FACTS)[0] is None  # no LoRA targets
    sharded = RunFacts(True, 2, "abc", 8)
    assert "saved by a DDP run and this run uses FSDP" in resume_verdict(RECIPE, RECIPE, STATE, sharded)[0]


def test_other_changes_are_warnings_and_free_keys_are_silent() -> None:
    new = _changed(optimizer__lr=5e-4, train__max_steps=999, train__batch_size=4)
    refusal, warnings = resume_verdict(RECIPE, new, STATE, RunFacts(False, 4, "def", 9))
    assert refusal is None and len(warnings) == 3
    assert (
        warnings[0] == f"resuming with changed settings: optimizer.lr: {RECIPE['optimizer']['lr']} -> 0.0005"
    )
    assert "the global batch changed (2 -> 4" in warnings[1] and "(8 -> 9 items)" in warnings[2]
    assert resume_verdict({}, new, STATE, FACTS) == (None, [])  # a checkpoint without its recipe
