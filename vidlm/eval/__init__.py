"""Evaluators by name: held-out `loss`, needle in a video haystack (`niavh`), `ppl_vs_length`.

  vidlm eval --config experiments/demo.py --workdir runs/demo

restores the newest checkpoint of `<workdir>/checkpoints` (or `checkpoint.restore_from`) into a fresh
`Trainer(cfg, workdir).state`, runs `cfg.eval.evaluators` in order and writes their results, keyed by name,
to `<workdir>/eval/results.json`. Add an evaluator with `@register_evaluator("name")` on a function
`fn(ctx: EvalContext) -> dict` (see registry.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from vidlm import config as config_lib
from vidlm.eval import niavh as _niavh  # noqa: F401  (registers "niavh")
from vidlm.eval import ppl as _ppl  # noqa: F401  (registers "loss" and "ppl_vs_length")
from vidlm.eval import stream as _stream  # noqa: F401  (registers "niavh_stream")
from vidlm.eval.registry import EVALUATORS, EvalContext, get_evaluator, register_evaluator

__all__ = ["EVALUATORS", "EvalContext", "register_evaluator", "restore_checkpoint", "run_evaluators"]


def _checkpoint_dirs(cfg: config_lib.Config, workdir: Path) -> list[Path]:
  """Where to look, in order: the run's own checkpoints, then `checkpoint.restore_from` (a checkpoints dir or a
  workdir that holds one)."""
  dirs = [workdir / "checkpoints"]
  if cfg.checkpoint.restore_from:
    src = Path(cfg.checkpoint.restore_from)
    dirs += [src / "checkpoints", src] if (src / "checkpoints").is_dir() else [src]
  return dirs


def restore_checkpoint(trainer, cfg: config_lib.Config, workdir: str | Path) -> tuple[int, Path]:
  """Load the newest readable checkpoint into `trainer.state` in place; returns (step, directory)."""
  from vidlm.train.checkpoint import Checkpointer  # noqa: PLC0415

  looked = []
  for directory in _checkpoint_dirs(cfg, Path(workdir)):
    looked.append(str(directory))
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
      continue
    ckpt = Checkpointer(directory, cfg.checkpoint)
    try:
      restored = ckpt.restore(trainer.state)
    finally:
      ckpt.close()
    if restored is not None:
      return restored[0], directory
  raise config_lib.ConfigError(
    f"config.checkpoint.restore_from: no checkpoint found in {' or '.join(looked)}; train first "
    f"(vidlm train --config ... --workdir {workdir}) or pass --config.checkpoint.restore_from=DIR"
  )


def run_evaluators(
  cfg: config_lib.Config,
  workdir: str | Path,
  *,
  trainer=None,
  step: int | None = None,
  evaluators: tuple[str, ...] | None = None,
) -> dict:
  """Run `evaluators` (default `cfg.eval.evaluators`) and return {name: result, "step": ..., "seconds": ...}.

  With `trainer=None` a fresh `Trainer(cfg, workdir)` is built and the newest checkpoint restored into it; pass
  a trainer that has just trained (as `vidlm demo` does) to evaluate its state as is.
  """
  import jax  # noqa: PLC0415

  names = tuple(cfg.eval.evaluators if evaluators is None else evaluators)
  fns = [get_evaluator(n) for n in names]  # unknown names fail before any work
  workdir = Path(workdir)
  restored_from = None
  if trainer is None:
    from vidlm.train.loop import Trainer  # noqa: PLC0415

    trainer = Trainer(cfg, workdir)
    step, restored_from = restore_checkpoint(trainer, trainer.cfg, workdir)
  ctx = EvalContext(cfg=trainer.cfg, workdir=workdir, trainer=trainer, step=step)
  results: dict = {"config": cfg.name, "step": step, "checkpoint": str(restored_from) if restored_from else None}
  seconds = {}
  for name, fn in zip(names, fns):
    t0 = time.perf_counter()
    results[name] = fn(ctx)
    seconds[name] = time.perf_counter() - t0
  results["seconds"] = seconds
  if jax.process_index() == 0:
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
  return results
