"""Model registry: `config.model.name` -> (constructor, config section class), filled by the models themselves.

Adding a model is one new file in `vidlm/models/` that decorates its constructor:

  @dataclasses.dataclass
  class MyConfig(vidlm.config.ModelSection):
    name: str = "my_model"
    width: int = 64

  @register_model("my_model", config=MyConfig)
  class MyModel(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs): ...
    def loss(self, batch, *, per_example=False) -> tuple[jax.Array, dict[str, jax.Array]]: ...

No other file changes: every module of the `vidlm.models` package is imported on the first registry lookup
(`pkgutil.iter_modules`), so its decorator runs; the trainer calls `model.loss(batch)`, and `config.model` becomes a
`MyConfig` when `model.name` says so (`vidlm.config.apply_override` / `from_dict`). A model registered from
elsewhere (a test, a notebook) works the same once its module has run.

The contract a registered model keeps (DESIGN section 5):
  - `Model(cfg, *, rngs)`: built from the whole Config (models need data shapes and attention settings).
  - `loss(batch) -> (loss, sums)`: `batch` holds every array the data layer decodes (`vidlm.train.loop.
    model_inputs`). `sums` are float32 scalars that add up over micro-batches and batches; they must include
    `loss_sum` and `weight`, with loss == loss_sum / max(weight, 1): the train step differentiates `loss_sum` and
    divides the gradients by the step's total `weight`, so gradient accumulation is exact.
  - optional `summarise(sums) -> metrics` (a staticmethod): the logged metrics from summed `sums`; without it the
    trainer logs `loss` only (`vidlm.train.step.summarise`).
  - optional `loss(batch, per_example=True)`: the same sums as [B] arrays, for the evaluators that score each
    example (`vidlm.eval.scoring`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

DEFAULT_MODEL = "video_lm"

_REGISTRY: dict[str, tuple[Callable, type]] = {}


def register_model(name: str, *, config: type) -> Callable:
  """Decorator: register `ctor(cfg, *, rngs) -> nnx.Module` under `name` with its config section class (a
  dataclass subclassing `vidlm.config.ModelSection` whose `name` default is `name`)."""
  from vidlm.config import ModelSection  # noqa: PLC0415  (vidlm.config imports this module lazily too)

  if not (isinstance(config, type) and issubclass(config, ModelSection)):
    raise TypeError(f"register_model({name!r}): config= must be a dataclass subclassing vidlm.config.ModelSection")
  if config().name != name:
    raise TypeError(f"register_model({name!r}): {config.__name__}().name is {config().name!r}; make it {name!r}")

  def deco(ctor):
    _REGISTRY[name] = (ctor, config)
    return ctor

  return deco


def discover() -> None:
  """Import every module of the `vidlm.models` package so their `register_model` decorators run.

  Cheap after the first call (a directory listing; imported modules come from sys.modules), so it runs on every
  lookup and a model file added while a notebook is open is found too. An import error in a model file is raised,
  not skipped: a model that silently fails to register would surface later as "unknown model".
  """
  import vidlm.models as package  # noqa: PLC0415

  for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"{package.__name__}.{info.name}")


def registered_models() -> list[str]:
  """Names of every registered model (after discovery), sorted."""
  discover()
  return sorted(_REGISTRY)


def _entry(name: Any) -> tuple[Callable, type]:
  if name not in _REGISTRY:
    discover()
  if name not in _REGISTRY:
    from vidlm.config import ConfigError  # noqa: PLC0415

    raise ConfigError(f"config.model.name: unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def model_config_class(name: str) -> type:
  """The config section class of model `name` (ConfigError naming the registered models when unknown)."""
  return _entry(name)[1]


def build_model(cfg, rngs: nnx.Rngs) -> nnx.Module:
  """Build `cfg.model.name` (the full Config is passed: models need data shapes and attention settings)."""
  ctor, section = _entry(cfg.model.name)
  if not isinstance(cfg.model, section):
    from vidlm.config import ConfigError  # noqa: PLC0415

    raise ConfigError(
      f"config.model is a {type(cfg.model).__name__} but model.name={cfg.model.name!r} needs a {section.__name__}"
    )
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    # no mesh (a notebook, a unit test): build unsharded instead of failing on the sharding annotations
    with nnx.use_eager_sharding(False):
      return ctor(cfg, rngs=rngs)
  return ctor(cfg, rngs=rngs)
