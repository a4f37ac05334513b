"""Model registry: `config.model.name` -> constructor(cfg, rngs)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

_REGISTRY: dict[str, Callable] = {}


def register_model(name: str):
  def deco(ctor):
    _REGISTRY[name] = ctor
    return ctor

  return deco


def build_model(cfg, rngs: nnx.Rngs) -> nnx.Module:
  """Build `cfg.model.name` (the full Config is passed: models need data shapes and attention settings)."""
  from vidlm.models import video_lm  # noqa: F401,PLC0415  (registers itself)

  if cfg.model.name not in _REGISTRY:
    from vidlm.config import ConfigError  # noqa: PLC0415

    raise ConfigError(f"config.model.name: unknown model {cfg.model.name!r}; registered: {sorted(_REGISTRY)}")
  ctor = _REGISTRY[cfg.model.name]
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    # no mesh (a notebook, a unit test): build unsharded instead of failing on the sharding annotations
    with nnx.use_eager_sharding(False):
      return ctor(cfg, rngs=rngs)
  return ctor(cfg, rngs=rngs)
