"""A corrupt newest checkpoint never traps a run: it is moved aside, training and `vidlm eval` use the newest
readable step, and the result equals an uninterrupted run from that step."""

import logging
import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from vidlm import config as C

pytestmark = pytest.mark.xdist_group("resume")


def _cfg(steps: int, every: int = 2):
  cfg = C.load_config("experiments/demo.py:smoke")
  cfg.train.steps, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.train.progress_bar = steps, every, 3, False
  cfg.data.num_train = 64
  cfg.eval.evaluators = ("loss",)
  # a constant learning rate after warm-up: the cosine schedule depends on train.steps, and these runs resume with
  # different train.steps; without this, "equal to an uninterrupted run" would compare different schedules
  cfg.train.min_lr_ratio = 1.0
  return cfg


def _train(workdir: Path, steps: int, every: int = 2) -> dict:
  from vidlm.train.loop import Trainer

  return Trainer(_cfg(steps, every), workdir).train()


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
  mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data_iter"))
  try:
    tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    mngr.close()
  out = {}

  def walk(t, prefix):
    if isinstance(t, dict):
      for k, v in t.items():
        walk(v, f"{prefix}/{k}")
    else:
      out[prefix] = np.asarray(t)

  walk(tree, "")
  return out


def _listed_steps(workdir: Path) -> list[int]:
  """The steps a fresh orbax manager lists (what any later run or `vidlm eval` will see)."""
  mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data_iter"))
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def _truncate_state_file(step_dir: Path) -> None:
  files = sorted(f for f in (step_dir / "state" / "d").iterdir() if f.is_file())
  assert files, step_dir
  files[0].write_bytes(files[0].read_bytes()[:7])


def _break_data_iter_json(step_dir: Path) -> None:
  files = sorted((step_dir / "data_iter").glob("*.json"))
  assert files, step_dir
  files[0].write_text(files[0].read_text()[:-5])


def _moved_warning(caplog, step_dir: Path) -> str:
  lines = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
  assert len(lines) == 1, lines
  line = lines[0]
  assert str(step_dir) in line and "unreadable (" in line and "\n" not in line, line
  assert "<bound method" not in line and "tensorstore_spec" not in line, line
  return line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A finished 6-step run (checkpoints 2, 4, 6) and the reference: the same run continued uninterrupted from
  step 4 (the fallback step) to step 10, checkpoints 6, 8, 10."""
  base = tmp_path_factory.mktemp("ckpt_corrupt")
  run = base / "run"
  _train(run, 6)
  assert _listed_steps(run) == [2, 4, 6]
  ref = base / "ref"
  shutil.copytree(run, ref)
  shutil.rmtree(ref / "checkpoints" / "6")
  assert _train(ref, 10)["resumed_from"] == 4
  return run, ref


def _copy(run: Path, dst: Path) -> Path:
  shutil.copytree(run, dst)
  return dst


def test_truncated_state_file_is_moved_aside_and_training_continues(runs, tmp_path, caplog):
  run, ref = runs
  work = _copy(run, tmp_path / "w")
  _truncate_state_file(work / "checkpoints" / "6")
  with caplog.at_level(logging.WARNING, logger="vidlm.train.checkpoint"):
    summary = _train(work, 8)  # falls back to 4, trains past the corrupt step 6 (saving a new 6) to 8
  assert summary["resumed_from"] == 4 and summary["step"] == 8
  line = _moved_warning(caplog, work / "checkpoints" / "6")
  assert "ValueError" in line or "Error" in line, line
  aside = sorted(p.name for p in (work / "checkpoints").glob("6.corrupt-*"))
  assert len(aside) == 1, aside
  assert _listed_steps(work) == [4, 6, 8]  # the new 6 was saved (no StepAlreadyExistsError); keep=3

  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="vidlm.train.checkpoint"):
    summary = _train(work, 10)  # resume again: from 8, nothing unreadable left
  assert summary["resumed_from"] == 8 and summary["step"] == 10
  assert not [r for r in caplog.records if "unreadable" in r.getMessage()]
  got, want = _params(work, 10), _params(ref, 10)
  assert got.keys() == want.keys() and len(want) > 10
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_broken_data_iter_json_without_periodic_checkpoints(runs, tmp_path, caplog):
  """checkpoint.every=0 used to exit 0 leaving the corrupt step in place, and `vidlm eval` then used step 4."""
  from vidlm.eval import run_evaluators

  run, ref = runs
  work = _copy(run, tmp_path / "w")
  _break_data_iter_json(work / "checkpoints" / "6")
  with caplog.at_level(logging.WARNING, logger="vidlm.train.checkpoint"):
    summary = _train(work, 8, every=0)
  assert summary["resumed_from"] == 4 and summary["step"] == 8
  line = _moved_warning(caplog, work / "checkpoints" / "6")
  assert "JSONDecodeError" in line, line
  assert len(list((work / "checkpoints").glob("6.corrupt-*"))) == 1
  assert _listed_steps(work) == [2, 4, 8]
  got, want = _params(work, 8), _params(ref, 8)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  assert _train(work, 8, every=0)["resumed_from"] == 8  # resume again: the newest readable step
  results = run_evaluators(_cfg(8), work)
  assert results["step"] == 8 and np.isfinite(results["loss"]["loss"])


def test_eval_falls_back_and_moves_aside(runs, tmp_path, caplog):
  from vidlm.eval import run_evaluators

  run, _ = runs
  work = _copy(run, tmp_path / "w")
  _truncate_state_file(work / "checkpoints" / "6")
  with caplog.at_level(logging.WARNING, logger="vidlm.train.checkpoint"):
    results = run_evaluators(_cfg(6), work)
  assert results["step"] == 4
  _moved_warning(caplog, work / "checkpoints" / "6")
  assert len(list((work / "checkpoints").glob("6.corrupt-*"))) == 1
  assert _listed_steps(work) == [2, 4]


def test_every_step_unreadable_starts_fresh_keeping_the_bytes(runs, tmp_path):
  from vidlm.train.checkpoint import Checkpointer
  from vidlm.train.loop import Trainer

  run, _ = runs
  work = _copy(run, tmp_path / "w")
  for s in (2, 4, 6):
    _break_data_iter_json(work / "checkpoints" / str(s))
  trainer = Trainer(_cfg(6), work)
  ckpt = Checkpointer(work / "checkpoints", trainer.cfg.checkpoint)
  try:
    assert ckpt.restore(trainer.state, trainer.data_iterator("train")) is None
    assert [p.name.split(".")[0] for p in ckpt.moved_aside] == ["6", "4", "2"]
    assert ckpt.steps() == []
  finally:
    ckpt.close()
  assert all(p.is_dir() for p in ckpt.moved_aside)


def test_error_description_is_one_readable_line():
  from vidlm.train.checkpoint import describe_error

  class Thing:
    def read(self):
      pass

  e = ValueError(f"cannot read {Thing().read} here [tensorstore_spec='{{...}}']\nsecond line\n" + "x" * 500)
  text = describe_error(e)
  assert text.startswith("ValueError: cannot read ") and "Thing.read" in text, text
  assert "<bound method" not in text and "\n" not in text and "tensorstore_spec" not in text, text
