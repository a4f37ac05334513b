"""Evaluator registry and the context every evaluator receives.

Evaluators are plain functions `fn(ctx: EvalContext) -> dict` registered under a name, so a config lists them by
name (`eval.evaluators = ("loss", "niavh", "ppl_vs_length")`) and a researcher adds one with a decorator and no
edits elsewhere. The context carries a restored `Trainer`, which owns the mesh, the model state and the jitted
steps, so an evaluator never rebuilds or re-restores anything.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidlm import config as config_lib

if TYPE_CHECKING:
  from vidlm.train.loop import Trainer

Evaluator = Callable[["EvalContext"], dict[str, Any]]
EVALUATORS: dict[str, Evaluator] = {}


def register_evaluator(name: str) -> Callable[[Evaluator], Evaluator]:
  """Decorator: make `fn` runnable as `eval.evaluators = (..., name)`."""

  def wrap(fn: Evaluator) -> Evaluator:
    if name in EVALUATORS and EVALUATORS[name] is not fn:
      raise ValueError(f"evaluator {name!r} is already registered ({EVALUATORS[name].__module__})")
    EVALUATORS[name] = fn
    return fn

  return wrap


def get_evaluator(name: str) -> Evaluator:
  if name not in EVALUATORS:
    raise config_lib.ConfigError(
      f"config.eval.evaluators: unknown evaluator {name!r}; registered: {', '.join(sorted(EVALUATORS))}"
    )
  return EVALUATORS[name]


@dataclasses.dataclass
class EvalContext:
  """What an evaluator needs: the config, where to write, and a trainer holding the restored state."""

  cfg: config_lib.Config
  workdir: Path
  trainer: Trainer
  step: int | None = None  # the checkpoint step being evaluated (None: the state was not restored from one)

  @property
  def out_dir(self) -> Path:
    """`<workdir>/eval`: every evaluator writes its JSON and plots here."""
    return self.workdir / "eval"

  @property
  def is_main(self) -> bool:
    import jax  # noqa: PLC0415

    return jax.process_index() == 0

  @functools.cached_property
  def scorer(self):
    """Per-example scoring of prepared examples (shared by evaluators, so each length compiles once)."""
    from vidlm.eval.scoring import Scorer  # noqa: PLC0415

    return Scorer(self.trainer)
