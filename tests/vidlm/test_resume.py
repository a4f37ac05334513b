"""Exact resume after SIGKILL, SIGTERM saves and exits 0, corrupt checkpoints fall back, NaN stops the run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from vidlm import config as C

pytestmark = pytest.mark.xdist_group("resume")
ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--config", "experiments/demo.py:smoke"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "vidlm.cli", "train", *SMOKE, "--workdir", str(workdir),
          "--config.train.progress_bar=false", "--config.data.num_train=256", *overrides]


def _final_state(workdir: Path):
  mngr = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data_iter"))
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return step, restored["state"]


def _data_order(workdir: Path) -> dict[int, list[int]]:
  order = {}
  for line in (workdir / "data_order.jsonl").read_text().splitlines():
    rec = json.loads(line)
    order[rec["step"]] = rec["index"]  # a step re-run after a crash overwrites its earlier record
  return order


def _wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}: {proc.stdout.read()}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for training progress")
    time.sleep(0.05)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
  steps = ["--config.train.steps=24", "--config.checkpoint.every=4"]
  ref, crashed = tmp_path / "ref", tmp_path / "crashed"
  subprocess.run(_train_cmd(ref, *steps), check=True, cwd=ROOT, env=_env(), capture_output=True)

  proc = subprocess.Popen(_train_cmd(crashed, *steps), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait_for(lambda: (crashed / "checkpoints" / "8").is_dir(), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_data_order(crashed))
  assert killed_at < 24, "the run finished before it could be killed"
  subprocess.run(_train_cmd(crashed, *steps), check=True, cwd=ROOT, env=_env(), capture_output=True)

  step_ref, state_ref = _final_state(ref)
  step_crash, state_crash = _final_state(crashed)
  assert step_ref == step_crash == 24
  flat_ref = {"/".join(map(str, k)): v for k, v in _flatten(state_ref)}
  flat_crash = {"/".join(map(str, k)): v for k, v in _flatten(state_crash)}
  assert flat_ref.keys() == flat_crash.keys() and len(flat_ref) > 10
  for k in flat_ref:
    np.testing.assert_array_equal(flat_crash[k], flat_ref[k], err_msg=k)
  assert _data_order(crashed) == _data_order(ref)
  assert sorted(_data_order(ref)) == list(range(1, 25))


def _flatten(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, (*prefix, k))
  else:
    yield prefix, np.asarray(tree)


def test_sigterm_saves_at_the_step_it_stopped(tmp_path):
  proc = subprocess.Popen(
    _train_cmd(tmp_path, "--config.train.steps=100000", "--config.checkpoint.every=0"),
    cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
  )
  _wait_for(lambda: (tmp_path / "data_order.jsonl").exists() and
            len((tmp_path / "data_order.jsonl").read_text().splitlines()) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  line = [ln for ln in out.splitlines() if "checkpoint saved at step" in ln]
  assert line, out
  stopped = int(line[0].rsplit(" ", 1)[1])
  step, _ = _final_state(tmp_path)
  assert step == stopped == max(_data_order(tmp_path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  from vidlm.train.loop import Trainer

  workdir = tmp_path_factory.mktemp("trained")
  cfg = C.load_config("experiments/demo.py:smoke")
  cfg.train.steps, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.train.progress_bar = 6, 2, 3, False
  cfg.data.num_train = 64
  Trainer(cfg, workdir).train()
  return cfg, workdir


def test_corrupt_latest_checkpoint_falls_back(trained):
  from vidlm.train.checkpoint import Checkpointer
  from vidlm.train.loop import Trainer

  cfg, workdir = trained
  broken = tmp = workdir.parent / "broken"
  shutil.copytree(workdir, tmp)
  for f in (broken / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  trainer = Trainer(cfg, broken)
  with pytest.warns(RuntimeWarning, match="step 6 .* unreadable.*falling back to step 4"):
    step, _ = Checkpointer(broken / "checkpoints", cfg.checkpoint).restore(trainer.state, trainer.data_iterator("train"))
  assert step == 4


def test_nan_loss_stops_with_step(trained, tmp_path):
  from vidlm.train.loop import Trainer, TrainingDiverged

  cfg, _ = trained
  cfg = C.from_dict(C.to_dict(cfg))
  cfg.train.lr, cfg.train.grad_clip, cfg.train.warmup_steps = float("inf"), 0.0, 0
  with pytest.raises(TrainingDiverged, match=r"step 2: loss is nan"):
    Trainer(cfg, tmp_path).train()


def test_cli_bad_override_is_one_line(tmp_path):
  out = subprocess.run(_train_cmd(tmp_path, "--config.train.stepz=3"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip() == "error: config.train.stepz: unknown field"
