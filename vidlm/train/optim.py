"""optax optimizer from config: AdamW + linear warm-up / cosine decay + global-norm clipping."""

from __future__ import annotations

import optax

from vidlm.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = max(min(cfg.warmup_steps, cfg.steps - 1), 0)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.lr,
    warmup_steps=warmup,
    decay_steps=max(cfg.steps, warmup + 1),
    end_value=cfg.lr * cfg.min_lr_ratio,
  )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Gradient accumulation happens inside the step (micro-batches under lax.scan), so the optimizer sees one
  averaged gradient per step and `steps` always counts optimizer updates."""
  return optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
    optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
  )
