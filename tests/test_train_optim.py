"""Optimizers and learning-rate schedules built from the recipe."""

from __future__ import annotations

import builtins

import pytest
import torch

from flowtune.errors import FlowtuneError
from flowtune.recipe import load_recipe
from flowtune.train.optim import build_optimizer, build_scheduler


def _recipe(*overrides: str):
    return load_recipe("tiny-flux-demo", list(overrides))


def test_adamw_takes_the_recipe_hyperparameters() -> None:
    recipe = _recipe("optimizer.lr=3e-4", "optimizer.betas=[0.8,0.95]", "optimizer.weight_decay=0.01")
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([param], recipe.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["lr"] == 3e-4 and group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.01


@pytest.mark.parametrize(("name", "package"), [("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt")])
def test_a_missing_optional_optimizer_says_what_to_install(monkeypatch, name: str, package: str) -> None:
    real_import = builtins.__import__

    def no_package(module, *args, **kwargs):
        if module.split(".")[0] == package:
            raise ImportError(module)
        return real_import(module, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    monkeypatch.delitem(__import__("sys").modules, package, raising=False)
    with pytest.raises(FlowtuneError, match=f"pip install {package}"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], _recipe(f"optimizer.name={name}").optimizer)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0]),
        ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.5]),
    ],
)
def test_schedules_warm_up_then_follow_their_shape(name: str, expected: list[float]) -> None:
    recipe = _recipe(f"lr_scheduler.name={name}", "lr_scheduler.warmup_steps=2", "optimizer.lr=1.0")
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], recipe.optimizer)
    scheduler = build_scheduler(optimizer, recipe.lr_scheduler, max_steps=4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(expected)
