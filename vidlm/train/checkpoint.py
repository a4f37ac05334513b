"""Orbax checkpoints of (model + optimizer state, data-iterator state), behind one small class.

Restores go into an abstract target that carries the live shardings, so a checkpoint written on one mesh
restores onto another. If the newest checkpoint cannot be read (a crash mid-write, a corrupted file) we warn
and fall back to the previous one instead of losing the run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from vidlm.config import CheckpointConfig

log = logging.getLogger(__name__)


def _grain_args():
  import grain  # noqa: PLC0415  (only training needs grain; keep GPU benchmarks free of it)

  return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


def abstract_like(pure_state):
  """ShapeDtypeStructs with the live shardings: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), pure_state)


class Checkpointer:
  def __init__(self, directory: str | Path, cfg: CheckpointConfig):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep,
      enable_async_checkpointing=cfg.use_async,
      create=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data_iter"))

  def save(self, step: int, state: nnx.State, data_iter=None, *, wait: bool = False) -> None:
    save_iter, _ = _grain_args()
    items = {"state": ocp.args.StandardSave(nnx.to_pure_dict(state))}
    if data_iter is not None:
      items["data_iter"] = save_iter(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, state: nnx.State, data_iter=None, *, step: int | None = None) -> tuple[int, nnx.State] | None:
    """Restore the newest readable checkpoint (or `step`) into `state`'s structure and shardings.

    Returns (step, state) or None when there is no checkpoint. `data_iter` is restored in place.
    """
    _, restore_iter = _grain_args()
    candidates = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    target = abstract_like(nnx.to_pure_dict(state))
    for i, s in enumerate(candidates):
      items = {"state": ocp.args.StandardRestore(target)}
      if data_iter is not None:
        items["data_iter"] = restore_iter(data_iter)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: fall back)
        if step is not None or i == len(candidates) - 1:
          raise RuntimeError(f"checkpoint {self.directory / str(s)} could not be restored: {e}") from e
        warnings.warn(
          f"checkpoint step {s} in {self.directory} is unreadable ({type(e).__name__}: {str(e)[:200]}); "
          f"falling back to step {candidates[i + 1]}",
          RuntimeWarning,
          stacklevel=2,
        )
        continue
      nnx.replace_by_pure_dict(state, restored["state"])
      return s, state
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
