"""Training: optimizer from config, jit'd steps, orbax checkpoints, metrics writers, the loop."""
