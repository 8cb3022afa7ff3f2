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
