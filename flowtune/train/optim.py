"""The optimizer and learning-rate schedule of a run, from the recipe.

Optimizers: ``adamw`` (torch's AdamW, the fused kernel on CUDA), ``adamw8bit`` (bitsandbytes'
8-bit AdamW) and ``prodigy`` (prodigyopt, learning-rate free).  The last two are optional
installs; asking for one that is missing is a one-line error saying what to install.
Schedules come from diffusers' ``get_scheduler``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch

from flowtune.errors import FlowtuneError

_OPTIONAL = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}


def _optional_module(name: str) -> Any:
    module, package = _OPTIONAL[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FlowtuneError(
            f"optimizer.name {name!r} needs the {package} package: pip install {package} "
            "(or use optimizer.name=adamw)"
        ) from None


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over ``params`` (``cfg`` = the recipe's ``optimizer``)."""
    params = list(params)
    kwargs = {
        "lr": float(cfg.lr),
        "betas": tuple(float(b) for b in cfg.betas),
        "eps": float(cfg.eps),
        "weight_decay": float(cfg.weight_decay),
    }
    if cfg.name == "adamw":
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)
    if cfg.name == "adamw8bit":
        return _optional_module("adamw8bit").optim.AdamW8bit(params, **kwargs)
    if cfg.name == "prodigy":
        return _optional_module("prodigy").Prodigy(params, **kwargs)
    raise FlowtuneError(f"unknown optimizer.name {cfg.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' ``get_scheduler(cfg.name, ...)`` with ``cfg.warmup_steps`` over ``max_steps``
    optimizer steps (``cfg`` = the recipe's ``lr_scheduler``; call ``step()`` once per
    optimizer step)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.name,
        optimizer,
        num_warmup_steps=int(cfg.warmup_steps),
        num_training_steps=int(max_steps),
    )


def realign_schedule(scheduler: Any, lr: float) -> None:
    """After a resume, make the restored schedule follow the recipe: peak ``lr`` and the schedule
    shape built for this run's ``train.max_steps``, at the restored step.

    A checkpoint's schedule state holds the learning rates of the run that wrote it; if the
    recipe's ``optimizer.lr`` or ``train.max_steps`` changed since (both allowed on resume), the
    next step would otherwise still use the old values (e.g. 0, the end of a shorter cosine).  With
    nothing changed this computes exactly the restored values.

    Args:
        scheduler: The LambdaLR of :func:`build_scheduler` (or Accelerate's wrapper of it), with
            its state loaded.
        lr: ``optimizer.lr`` of the recipe.
    """
    inner = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(inner, torch.optim.lr_scheduler.LambdaLR):
        return
    inner.base_lrs = [float(lr)] * len(inner.base_lrs)
    values = [base * fn(inner.last_epoch) for base, fn in zip(inner.base_lrs, inner.lr_lambdas, strict=True)]
    for group, value in zip(inner.optimizer.param_groups, values, strict=True):
        group["lr"] = value
        group["initial_lr"] = float(lr)
    inner._last_lr = values  # what get_last_lr() reports (torch keeps no public setter)
