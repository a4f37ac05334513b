"""Exact resume after SIGKILL (from the newest checkpoint, logs not duplicated), SIGTERM saves and exits 0, corrupt
checkpoints fall back, NaN stops the run."""

import json
import logging
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
  """step -> example indices; each step must be logged once, however often the run was killed and resumed."""
  order = {}
  for line in (workdir / "data_order.jsonl").read_text().splitlines():
    rec = json.loads(line)
    assert rec["step"] not in order, f"step {rec['step']} logged twice in data_order.jsonl"
    order[rec["step"]] = rec["index"]
  return order


def _logged_steps(workdir: Path) -> tuple[list[int], list[int]]:
  """Steps of the train loss in metrics.jsonl and in the tensorboard event files, in file order."""
  from vidlm.train.metrics import read_tb_scalars

  jsonl = [json.loads(ln)["step"] for ln in (workdir / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in json.loads(ln)]
  tb = [step for tag, step, _ in read_tb_scalars(workdir / "tb") if tag == "train/loss"]
  return jsonl, tb


def _wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"training exited early with {proc.returncode}: {proc.stdout.read()}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for training progress")
    time.sleep(0.05)


def _ckpt_steps(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _kill_after(workdir: Path, cmd, min_ckpt: int) -> int:
  """Start training, SIGKILL it once a checkpoint >= min_ckpt exists and two more steps were logged after it;
  return the newest checkpoint step on disk at the kill (the step a resume must start from)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  def ready():
    steps = _ckpt_steps(workdir)
    if not steps or steps[-1] < min_ckpt or not (workdir / "data_order.jsonl").exists():
      return False
    return len((workdir / "data_order.jsonl").read_text().splitlines()) >= steps[-1] + 2

  _wait_for(ready, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return _ckpt_steps(workdir)[-1]


def _resumed_from(out: str) -> int:
  lines = [ln for ln in out.splitlines() if ln.startswith("resumed from checkpoint step ")]
  assert len(lines) == 1, out
  return int(lines[0].split()[4])


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
  """Killed twice (each time after a checkpoint and more logged steps), resumed twice: each resume starts from the
  newest checkpoint, the final state and data order equal an uninterrupted run, and every log holds each step once."""
  steps = ["--config.train.steps=32", "--config.checkpoint.every=4"]
  ref, crashed = tmp_path / "ref", tmp_path / "crashed"
  subprocess.run(_train_cmd(ref, *steps), check=True, cwd=ROOT, env=_env(), capture_output=True)

  first_ckpt = _kill_after(crashed, _train_cmd(crashed, *steps), 8)
  assert max(_data_order(crashed)) > first_ckpt, "no steps were logged after the checkpoint"
  second_ckpt = _kill_after(crashed, _train_cmd(crashed, *steps), first_ckpt + 8)
  assert second_ckpt < 32 and max(_data_order(crashed)) < 32, "the run finished before it could be killed"
  last = subprocess.run(_train_cmd(crashed, *steps), check=True, cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert _resumed_from(last.stdout) == second_ckpt
  final = [json.loads(ln) for ln in last.stdout.splitlines() if ln.startswith('{"final"')]
  assert final and final[0]["final"]["resumed_from"] == second_ckpt, last.stdout

  step_ref, state_ref = _final_state(ref)
  step_crash, state_crash = _final_state(crashed)
  assert step_ref == step_crash == 32
  flat_ref = {"/".join(map(str, k)): v for k, v in _flatten(state_ref)}
  flat_crash = {"/".join(map(str, k)): v for k, v in _flatten(state_crash)}
  assert flat_ref.keys() == flat_crash.keys() and len(flat_ref) > 10
  for k in flat_ref:
    np.testing.assert_array_equal(flat_crash[k], flat_ref[k], err_msg=k)
  assert _data_order(crashed) == _data_order(ref)
  assert sorted(_data_order(ref)) == list(range(1, 33))
  jsonl, tb = _logged_steps(crashed)
  assert jsonl == list(range(1, 33)), jsonl
  assert sorted(tb) == list(range(1, 33)), tb
  assert _logged_steps(ref) == (list(range(1, 33)), list(range(1, 33)))


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


def test_corrupt_latest_checkpoint_falls_back(trained, caplog):
  from vidlm.train.checkpoint import Checkpointer
  from vidlm.train.loop import Trainer

  cfg, workdir = trained
  broken = tmp = workdir.parent / "broken"
  shutil.copytree(workdir, tmp)
  for f in (broken / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  trainer = Trainer(cfg, broken)
  ckpt = Checkpointer(broken / "checkpoints", cfg.checkpoint)
  with caplog.at_level(logging.WARNING, logger="vidlm.train.checkpoint"):
    step, _ = ckpt.restore(trainer.state, trainer.data_iterator("train"))
  ckpt.close()
  assert step == 4
  assert any(f"{broken / 'checkpoints' / '6'} is unreadable" in r.getMessage() for r in caplog.records)
  assert [p.name.split(".")[0] for p in ckpt.moved_aside] == ["6"]  # more cases: test_checkpoint_corrupt.py


def test_nan_loss_stops_with_step(trained, tmp_path):
  from vidlm.train.loop import Trainer, TrainingDiverged

  cfg, _ = trained
  cfg = C.from_dict(C.to_dict(cfg))
  # a huge (valid, finite) learning rate: the first update throws the weights to ~1e30, the next loss is not finite
  cfg.train.lr, cfg.train.grad_clip, cfg.train.warmup_steps = 1e30, 0.0, 0
  with pytest.raises(TrainingDiverged, match=r"step [23]: loss is (nan|inf).*batch example indices \["):
    Trainer(cfg, tmp_path).train()


def test_cli_bad_override_is_one_line(tmp_path):
  out = subprocess.run(_train_cmd(tmp_path, "--config.train.stepz=3"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
  assert out.returncode == 2
  assert out.stderr.strip() == "error: config.train.stepz: unknown field"
