"""Orbax checkpoints of (model + optimizer state, data-iterator state), behind one small class.

Restores go into an abstract target that carries the live shardings, so a checkpoint written on one mesh
restores onto another. Training (`Trainer.train`) and evaluation (`vidlm eval`) restore through the same
`Checkpointer.restore`, so both always use the newest *readable* step.

An unreadable step (a crash mid-write, a truncated or garbled file, a broken data-iterator JSON) is moved aside
to `<dir>/<step>.corrupt-<UTC time>` rather than deleted (the bytes may still be worth a look) and the restore
falls back to the previous step. Moving it matters: a corrupt step left in place would be saved over later
(orbax refuses: `StepAlreadyExistsError`, every rerun) or silently shadow the steps written after it. A checkpoint
whose parameter shapes differ from the config's is *not* corrupt: that is a `ConfigError` and nothing is moved.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from vidlm import config as config_lib
from vidlm.config import CheckpointConfig

log = logging.getLogger(__name__)

# restore outcome codes, agreed across processes by taking the max: any process failing fails all of them
_OK, _UNREADABLE, _MISMATCH = 0, 1, 2

# config fields that may not change between a run and its resume, because they change the parameter / optimizer
# state shapes or the function the parameters were trained for. All other fields (train.steps, lr, eval.*, mesh,
# model.remat / model.dtype: how it is computed, not what) may differ freely.
_FREE_MODEL_FIELDS = frozenset({"remat", "dtype"})
_FIXED_DATA_FIELDS = ("frames", "height", "width", "text_len")


def _grain_args():
  import grain  # noqa: PLC0415  (only training needs grain; keep GPU benchmarks free of it)

  return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


def abstract_like(pure_state):
  """ShapeDtypeStructs with the live shardings: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), pure_state)


def describe_error(e: BaseException, limit: int = 240) -> str:
  """`Type: first line of the message`, without tensorstore specs or `<bound method ...>` reprs: a log line."""
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  first = lines[0] if lines else ""
  first = first.split(" [tensorstore_spec=")[0]
  first = re.sub(r"<bound method (\S+) of [^>]*>+", r"\1", first)
  if len(first) > limit:
    first = first[: limit - 3] + "..."
  return f"{type(e).__name__}: {first}" if first else type(e).__name__


def check_config_matches_run(cfg: config_lib.Config, workdir: str | Path) -> None:
  """Raise a one-line `ConfigError` if `cfg` cannot resume the run in `workdir` (its `config.json`).

  Compared: every `model.*` field except `remat`/`dtype`, and the data shape fields. Called before anything is
  written to the workdir, so a mistyped override changes nothing there.
  """
  path = Path(workdir) / "config.json"
  if not path.is_file() or not any(p.name.isdigit() for p in (Path(workdir) / "checkpoints").glob("*")):
    return  # nothing to resume: any config may start here
  try:
    old = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise config_lib.ConfigError(f"{path}: unreadable ({describe_error(e)}); fix or remove it") from e
  new = config_lib.to_dict(cfg)
  fields = [("model", f.name) for f in dataclasses.fields(cfg.model) if f.name not in _FREE_MODEL_FIELDS]
  fields += [("data", name) for name in _FIXED_DATA_FIELDS]
  diffs = []
  for section, name in fields:
    if section not in old or name not in old[section]:
      continue  # a field newer than the run: nothing to compare against
    was, now = old[section][name], new[section][name]
    if (list(was) if isinstance(was, (list, tuple)) else was) != (list(now) if isinstance(now, tuple) else now):
      diffs.append(f"{section}.{name} (run: {json.dumps(was)}, now: {json.dumps(now)})")
  if diffs:
    raise config_lib.ConfigError(
      f"config does not match the run in {workdir}: {', '.join(diffs)}; use the run's values or a new --workdir"
    )


def _agree(code: int) -> int:
  """The max of `code` over processes (a collective when there is more than one)."""
  if jax.process_count() == 1:
    return code
  return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


def _shape_mismatch(stored, target) -> list[str]:
  """Leaves whose stored shape differs from the target's (or exist on one side only), as 'path: a vs b'."""
  have = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(m.shape)
          for p, m in jax.tree_util.tree_leaves_with_path(stored) if hasattr(m, "shape")}
  want = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(target)}
  out = [f"{k}: checkpoint {have.get(k, 'missing')} vs config {want.get(k, 'missing')}"
         for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
  return out


class Checkpointer:
  def __init__(self, directory: str | Path, cfg: CheckpointConfig):
    self.directory = Path(directory).absolute()
    self.cfg = cfg
    self.moved_aside: list[Path] = []  # unreadable steps moved aside by restore(), in order
    self._skipped: set[int] = set()  # unreadable steps that could not be moved (a read-only restore_from dir)
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=self.cfg.keep,
      enable_async_checkpointing=self.cfg.use_async,
      create=True,
    )
    return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data_iter"))

  def save(self, step: int, state: nnx.State, data_iter=None, *, wait: bool = False) -> None:
    save_iter, _ = _grain_args()
    items = {"state": ocp.args.StandardSave(nnx.to_pure_dict(state))}
    if data_iter is not None:
      items["data_iter"] = save_iter(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if wait:
      self.manager.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(s for s in self.manager.all_steps() if s not in self._skipped)

  def restore(self, state: nnx.State, data_iter=None, *, step: int | None = None) -> tuple[int, nnx.State] | None:
    """Restore the newest readable checkpoint (or exactly `step`) into `state`'s structure and shardings.

    Returns (step, state), or None when no readable checkpoint is left. `data_iter` is restored in place (after
    a failed attempt it may hold a partly restored state: callers that get None after `moved_aside` grew should
    build a fresh iterator). Every unreadable step met on the way is moved aside (process 0 renames it; all
    processes agree on the outcome of each attempt, since the restore is collective). Raises `ConfigError` when
    the checkpoint's parameter shapes differ from `state`'s, and RuntimeError when an explicit `step` is unreadable.
    """
    target = abstract_like(nnx.to_pure_dict(state))
    while True:
      candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
      if not candidates:
        return None
      s = candidates[0]
      restored, problem = self._try_restore(s, target, data_iter)
      code = _agree(_OK if problem is None else _MISMATCH if isinstance(problem, list) else _UNREADABLE)
      if code == _OK:
        nnx.replace_by_pure_dict(state, restored["state"])
        return s, state
      if code == _MISMATCH:
        detail = "; ".join(problem[:3]) + (f" (+{len(problem) - 3} more)" if len(problem) > 3 else "") \
          if isinstance(problem, list) else "shapes differ on another process"
        raise config_lib.ConfigError(
          f"checkpoint {self.directory / str(s)} does not match the config ({detail}); use the config it was "
          "trained with (the workdir's config.json) or a new --workdir"
        )
      reason = problem if isinstance(problem, str) else "unreadable on another process"
      if step is not None:
        raise RuntimeError(f"checkpoint {self.directory / str(s)} could not be restored: {reason}")
      self._move_aside(s, reason)

  def _try_restore(self, s: int, target, data_iter):
    """(restored, None) | (None, reason str: unreadable) | (None, [differing leaves]: shape mismatch)."""
    reader = ocp.StandardCheckpointHandler()
    try:
      stored = reader.metadata(self.directory / str(s) / "state")
    except Exception as e:  # noqa: BLE001  (any unreadable metadata: the step is unreadable)
      return None, describe_error(e)
    finally:
      reader.close()
    if stored is None or not jax.tree_util.tree_leaves(stored):
      return None, "no readable parameter metadata"
    mismatch = _shape_mismatch(stored, target)
    if mismatch:
      return None, mismatch
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:  # grain only here: an eval-only restore (no data iterator) must work without it
      _, restore_iter = _grain_args()
      items["data_iter"] = restore_iter(data_iter)
    try:
      return self.manager.restore(s, args=ocp.args.Composite(**items)), None
    except config_lib.ConfigError as e:  # readable but unusable (a data_iter state of an older format): not corrupt
      raise config_lib.ConfigError(f"checkpoint {self.directory / str(s)}: {e}") from None
    except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: move it aside and fall back)
      return None, describe_error(e)

  def _move_aside(self, s: int, reason: str) -> None:
    """Rename step `s` to `<s>.corrupt-<UTC>` (process 0), then reopen the manager on every process: orbax caches
    its step list, and a stale one would still offer (or refuse to save over) the moved step."""
    src = self.directory / str(s)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    dst = self.directory / f"{s}.corrupt-{stamp}"
    moved = True
    if jax.process_index() == 0:
      try:
        src.rename(dst)
      except OSError as e:
        moved = False
        log.warning("checkpoint %s is unreadable (%s) and could not be moved aside (%s); skipping it",
                    src, reason, describe_error(e))
    moved = _agree(0 if moved else 1) == 0
    if moved:
      self.moved_aside.append(dst)
      if jax.process_index() == 0:
        log.warning("checkpoint %s is unreadable (%s); moved it to %s and falling back to the previous step",
                    src, reason, dst.name)
    else:
      self._skipped.add(s)
    self.manager.close()
    self.manager = self._open()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
