"""SIGINT/SIGTERM stop a run cleanly: a readable checkpoint at the step it stopped, the signal named, no C++ abort.

The multi-process agreement (a signal sent to only one of two processes) is tested in test_multiprocess.py.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from vidlm.train.stopping import StopRequest

ROOT = Path(__file__).resolve().parents[2]


def _needs_main_thread():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers can only be installed from the main thread")


def _signal_self(signum: int) -> None:
  os.kill(os.getpid(), signum)
  time.sleep(0.01)  # the Python-level handler runs at the next bytecode boundary of the main thread


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_signal_is_agreed_at_the_next_check_and_handlers_are_restored(signum, code):
  _needs_main_thread()
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with StopRequest() as stop:
    assert not stop.should_stop(1)
    assert stop.exit_code is None
    _signal_self(signum)  # does not raise KeyboardInterrupt / kill the process
    assert stop.should_stop(2)
    assert stop.should_stop(3)  # stays stopped; the step is the first one that saw the request
    assert (stop.signal, stop.stop_step, stop.exit_code) == (signum, 2, code)
    assert stop.describe() == f"{signal.Signals(signum).name} received: checkpoint saved at step 2"
  assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


def test_second_signal_is_ignored_while_stopping(capfd):
  _needs_main_thread()
  with StopRequest() as stop:
    _signal_self(signal.SIGINT)
    assert stop.should_stop(5)
    _signal_self(signal.SIGINT)  # e.g. impatient Ctrl-C during the save: no KeyboardInterrupt, nothing changes
    _signal_self(signal.SIGTERM)
    assert (stop.signal, stop.stop_step, stop.exit_code) == (signal.SIGINT, 5, 130)
  err = capfd.readouterr().err
  assert "SIGINT received again: ignored, the checkpoint is being saved" in err
  assert "SIGTERM received again: ignored" in err


def test_sigint_saves_a_readable_checkpoint_and_exits_130(tmp_path):
  # 8 devices, as in this process (conftest), so the checkpoint restores here without a target tree
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONUNBUFFERED": "1"}
  cmd = [sys.executable, "-m", "vidlm.cli", "train", "--config", "experiments/demo.py:smoke", "--workdir",
         str(tmp_path), "--config.train.steps=100000", "--config.checkpoint.every=0",
         "--config.train.progress_bar=false", "--config.data.num_train=64"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  order = tmp_path / "data_order.jsonl"
  t0 = time.time()
  while not (order.exists() and len(order.read_text().splitlines()) >= 2):
    assert proc.poll() is None, f"training exited early with {proc.returncode}: {proc.stdout.read()}"
    if time.time() - t0 > 240:
      proc.kill()
      pytest.fail("timed out waiting for training progress")
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)  # a second Ctrl-C is ignored, not an abort mid-save
  try:
    out, _ = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail("training did not exit after SIGINT")
  assert "terminate called" not in out and "Traceback" not in out, out
  assert proc.returncode == 130, out
  lines = [ln for ln in out.splitlines() if ln.startswith("SIGINT received: checkpoint saved at step")]
  assert lines, out
  stopped = int(lines[-1].rsplit(" ", 1)[1])
  logged = [json.loads(ln)["step"] for ln in order.read_text().splitlines()]
  assert stopped == max(logged) >= 2
  mngr = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "data_iter"))
  try:
    assert mngr.all_steps() == [stopped]
    restored = mngr.restore(stopped, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert int(restored["state"]["1"]["step"]) == stopped  # the optimizer's step counter: the checkpoint is whole
  finally:
    mngr.close()
