"""Evaluator registry and the context every evaluator receives.

Evaluators are plain functions `fn(ctx: EvalContext) -> dict` registered under a name, so a config lists them by
name (`eval.evaluators = ("loss", "niavh", "ppl_vs_length")`) and a researcher adds one with a decorator and no
edits elsewhere. The context carries a restored `Trainer`, which owns the mesh, the model state and the jitted
steps, so an evaluator never rebuilds or re-restores anything.

Each evaluator also declares its *headline* scalars, the few numbers a sweep table shows per run
(`vidlm sweep`, DESIGN §10): `register_evaluator(name, headline=((label, path), ...))`. `path` is a dotted path
into the evaluator's result dict: `*` runs over every key of a dict (or index of a list), `name[key=value]`
picks the list element whose `key` equals `value`, and `name[key=*]` runs over the elements, keyed by their
`key`. Each `*` match fills the next `{}` of `label`. `headline_scalars(name, result)` turns a result into
`{"<name>/<label>": float}`; a path the result lacks yields no entry (e.g. a length that was not evaluated).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidlm import config as config_lib

if TYPE_CHECKING:
  from vidlm.train.loop import Trainer

Evaluator = Callable[["EvalContext"], dict[str, Any]]
Headline = tuple[tuple[str, str], ...]  # ((label, path into the result), ...), see the module docstring
EVALUATORS: dict[str, Evaluator] = {}
HEADLINES: dict[str, Headline] = {}


def register_evaluator(name: str, *, headline: Headline = ()) -> Callable[[Evaluator], Evaluator]:
  """Decorator: make `fn` runnable as `eval.evaluators = (..., name)`, with its headline scalars."""

  def wrap(fn: Evaluator) -> Evaluator:
    if name in EVALUATORS and EVALUATORS[name] is not fn:
      raise ValueError(f"evaluator {name!r} is already registered ({EVALUATORS[name].__module__})")
    EVALUATORS[name] = fn
    HEADLINES[name] = tuple(headline)
    return fn

  return wrap


_SELECT = re.compile(r"^(?P<field>[^\[]+)\[(?P<key>[^=\]]+)=(?P<value>[^\]]+)\]$")


def _walk(node: Any, parts: list[str], keys: tuple[str, ...]):
  """Yield (wildcard matches, value) for every node `parts` reaches from `node`."""
  if not parts:
    yield keys, node
    return
  part, rest = parts[0], parts[1:]
  m = _SELECT.match(part)
  if m:
    items = node.get(m["field"]) if isinstance(node, dict) else None
    for item in items if isinstance(items, list) else ():
      if isinstance(item, dict) and m["key"] in item and (m["value"] == "*" or str(item[m["key"]]) == m["value"]):
        yield from _walk(item, rest, (*keys, str(item[m["key"]])) if m["value"] == "*" else keys)
  elif part == "*":
    pairs = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, child in pairs:
      yield from _walk(child, rest, (*keys, str(k)))
  elif isinstance(node, dict) and part in node:
    yield from _walk(node[part], rest, keys)
  elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
    yield from _walk(node[int(part)], rest, keys)


def headline_scalars(name: str, result: dict) -> dict[str, float]:
  """`{"<evaluator>/<label>": value}` for the evaluator's declared headline paths found in `result`."""
  out = {}
  for label, path in HEADLINES.get(name, ()):
    for keys, value in _walk(result, path.split("."), ()):
      if isinstance(value, int | float) and not isinstance(value, bool):
        out[f"{name}/{label.format(*keys)}"] = float(value)
  return out


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
