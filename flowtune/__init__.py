"""flowtune: fine-tune flow-matching diffusion transformers with YAML recipes."""

__version__ = "0.1.0"
