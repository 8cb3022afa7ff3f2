"""The Accelerator of a run: mixed precision, trackers, the FSDP2 plugin, and the save/load
hooks that leave the trained weights to the trainer.

A part of :class:`flowtune.train.trainer.Trainer` (its attributes are the trainer's)."""

from __future__ import annotations

import os
from typing import Any

from flowtune.distributed import avoid_cudnn_attention, has_accelerator
from flowtune.errors import FlowtuneError


class AcceleratorSetup:
    """The Accelerator of a run: mixed precision, trackers, the FSDP2 plugin, and the save/load (mixed into :class:`~flowtune.train.trainer.Trainer`)."""

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        r = self.recipe
        trackers = list(r.logging.trackers)
        self._check_trackers(trackers)
        fsdp_plugin = self._fsdp_plugin()
        avoid_cudnn_attention()
        try:
            accelerator = Accelerator(
                # Without an accelerator, say so: Accelerate then sets up multi-process CPU runs
                # (gloo) under `accelerate launch` / torchrun instead of N independent processes.
                cpu=not has_accelerator(),
                mixed_precision=r.train.mixed_precision,
                log_with=trackers or None,
                project_config=ProjectConfiguration(
                    project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "tensorboard")
                ),
                # The schedule steps once per optimizer step, whatever the number of processes,
                # so a run's learning-rate curve does not depend on the world size.
                step_scheduler_with_optimizer=False,
                fsdp_plugin=fsdp_plugin,
                # model.expert=both trains one of two experts a step: DDP must expect the other's
                # LoRA to get no gradient (flowtune.train.experts).
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
                if r.model.expert == "both"
                else None,
            )
        except (ValueError, RuntimeError) as exc:
            raise FlowtuneError(
                f"train.mixed_precision={r.train.mixed_precision!r} is not available here: {exc} "
                "(use train.mixed_precision=no on a CPU)"
            ) from None
        # Checkpoints hold the trained weights in the files users load (the diffusers LoRA file,
        # or transformer/ for full fine-tuning), written and read by the trainer itself, so
        # Accelerate's state keeps only what it alone knows: optimizer, schedule, RNG, scaler.
        accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, directory: models.clear())
        self.sharded = accelerator.is_fsdp2
        if fsdp_plugin is not None and not self.sharded and accelerator.num_processes > 1:
            self._warnings.append(
                "train.distributed=fsdp: Accelerate shards only across GPUs; these CPU processes run DDP"
            )
        return accelerator

    def _fsdp_plugin(self) -> Any:
        """Accelerate's FSDP2 plugin for ``train.distributed=fsdp`` (None for ``ddp``).

        Each transformer block (the model's ``_no_split_modules``) is one FSDP unit, its weights
        resharded after the forward pass; the frozen base and the trainable LoRA (or full) weights
        are both sharded, and only the trainable ones are in the optimizer.

        Raises:
            FlowtuneError: ``ddp`` in the recipe but the launcher's Accelerate config turns FSDP on
                (the recipe decides; the two must agree).
        """
        from accelerate import FullyShardedDataParallelPlugin

        if self.recipe.train.distributed != "fsdp":
            if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
                raise FlowtuneError(
                    "the accelerate launch configuration enables FSDP but the recipe has "
                    "train.distributed=ddp; set train.distributed=fsdp, or launch without FSDP in the "
                    "accelerate config"
                )
            return None
        return FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # the model's _no_split_modules
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",  # Accelerate's resumable state, one shard per rank
            cpu_ram_efficient_loading=False,
        )

    @staticmethod
    def _check_trackers(trackers: list[str]) -> None:
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
        for name in trackers:
            if not available[name]():
                raise FlowtuneError(
                    f"logging.trackers lists {name!r} but the {name} package is not installed: "
                    f"pip install {name} (or remove it from logging.trackers)"
                )
