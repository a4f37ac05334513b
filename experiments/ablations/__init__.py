"""Ablation sweeps: experiment files with get_config and get_sweep, run by `vidlm sweep` (DESIGN section 10)."""
