"""The names the flow-matching pipeline accepts for its options (torch-free, so that recipes can
be validated without importing torch)."""

TIMESTEP_SAMPLING_METHODS: tuple[str, ...] = ("uniform", "logit_normal", "mode", "lognorm", "mix", "beta")
"""Values of ``timestep_sampling``: the distribution of u before the flow shift (``beta``: of sigma
itself, with no shift)."""

LOSS_WEIGHTING_SCHEMES: tuple[str, ...] = ("linear", "bsmntw")
"""Values of ``loss_weighting_scheme``."""
