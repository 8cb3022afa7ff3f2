"""FlowMatchingPipeline (work in progress: constants first)."""

TIMESTEP_SAMPLING_METHODS: tuple[str, ...] = ("uniform", "logit_normal", "mode", "lognorm", "mix")
LOSS_WEIGHTING_SCHEMES: tuple[str, ...] = ("linear", "bsmntw")
