"""Training: the LoRA-wrapped transformer, per-sample randomness, and (next) the trainer loop."""
