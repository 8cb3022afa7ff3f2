"""What ``flowtune plan`` reports: the training step, preprocess and sampling phases, whether each
fits a GPU, and the changes that would make it fit (the CLI only prints this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flowtune.families import FamilySpec
from flowtune.memory.phases import PhasePlan, plan_preprocess, plan_sampling
from flowtune.memory.plan import GIB, FitChange, StepPlan, changes_to_fit, trace_recipe

ENCODER_MODES = ("int8", "nf4")


@dataclass
class PlanReport:
    """A recipe's plan.

    Attributes:
        step: The training step.
        phases: Preprocess, validation images (when the recipe has prompts) and ``flowtune
            sample``, where the components' configs are known.
        gpu_bytes: The GPU memory planned against, or None.
        changes: Changes that fit the training step (when it does not fit).
        advice: ``(phase, line)`` for each phase that does not fit.
    """

    step: StepPlan
    phases: list[PhasePlan]
    gpu_bytes: int | None = None
    changes: list[FitChange] = field(default_factory=list)
    advice: list[tuple[str, str]] = field(default_factory=list)

    def fits(self, peak: int) -> bool | None:
        return None if self.gpu_bytes is None else peak <= self.gpu_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (bytes as ints)."""
        return {
            "train_step": self.step.to_dict(),
            **{phase.name: phase.to_dict() for phase in self.phases},
            "gpu_memory_gib": None if self.gpu_bytes is None else self.gpu_bytes / GIB,
            "fits": self.fits(self.step.peak),
            "fits_phases": {phase.name: self.fits(phase.peak) for phase in self.phases},
            "changes_to_fit": [vars(c) for c in self.changes] if self.fits(self.step.peak) is False else None,
            "advice": dict(self.advice),
        }


def _preprocess_advice(recipe: Any, spec: FamilySpec, budget: int) -> str:
    """The cheapest ``model.encoder_quantize`` / ``data.encode_batch_size`` change whose
    preprocess plan fits ``budget``."""
    from flowtune.console import format_bytes
    from flowtune.memory.plan import _with

    current = recipe.model.encoder_quantize
    modes = [
        m for m in ENCODER_MODES if current is None or ENCODER_MODES.index(m) > ENCODER_MODES.index(current)
    ]
    for overrides in [[f"model.encoder_quantize={m}"] for m in modes] + [
        [*([f"model.encoder_quantize={m}"] if m else []), "data.encode_batch_size=1"] for m in [None, *modes]
    ]:
        plan = plan_preprocess(_with(recipe, overrides), spec)
        if plan is not None and plan.peak <= budget:
            return f"{' '.join(overrides)} fits ({format_bytes(plan.peak)})"
    return "no model.encoder_quantize or data.encode_batch_size setting fits it"


def build_report(recipe: Any, spec: FamilySpec, gpu_memory_gib: float | None = None) -> PlanReport:
    """Plan ``recipe`` (training step, then the phases) against ``gpu_memory_gib`` GiB if given.

    Raises:
        FlowtuneError: as :func:`flowtune.memory.plan.trace_recipe`.
    """
    trace = trace_recipe(recipe, spec)
    step = trace.plan(recipe, spec)
    phases = [p for p in [plan_preprocess(recipe, spec)] if p is not None]
    phases += plan_sampling(recipe, spec, trace, step)
    report = PlanReport(step, phases, None if gpu_memory_gib is None else int(gpu_memory_gib * GIB))
    if report.gpu_bytes is None:
        return report
    if not report.fits(step.peak):
        report.changes = changes_to_fit(recipe, spec, trace, report.gpu_bytes)
    for phase in phases:
        if report.fits(phase.peak):
            continue
        if phase.name == "preprocess":
            report.advice.append((phase.name, _preprocess_advice(recipe, spec, report.gpu_bytes)))
        elif phase.name == "validation":
            report.advice.append(
                (phase.name, "lower validation.height and validation.width, or set validation.prompts=[]")
            )
        elif spec.block_lists and recipe.train.block_offload is None:
            report.advice.append(
                (
                    phase.name,
                    "flowtune sample --cpu-offload keeps one component on the GPU at a time; "
                    "--block-offload N streams all but N transformer blocks after encoding the prompts "
                    "(this plan with train.block_offload=N gives its peak)",
                )
            )
        elif spec.block_lists:  # it samples with the recipe's block offload: fewer blocks resident
            report.advice.append(
                (
                    phase.name,
                    "flowtune sample --block-offload N with N below train.block_offload (this plan "
                    "with train.block_offload=N gives its peak)",
                )
            )
        else:
            report.advice.append(
                (phase.name, "flowtune sample --cpu-offload keeps one component on the GPU at a time")
            )
    return report
