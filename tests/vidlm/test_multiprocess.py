"""Two processes on localhost (CPU, jax.distributed, 2 x 4 devices) on a mesh whose axes span both processes.

One test, three launches (kept together because each launch pays JAX start-up and compilation on a 2-core box):
1. a stop signal sent to ONLY process 1: both processes stop at the same step, save one checkpoint together and
   exit 0 (no hang: every wait has a timeout);
2. a rerun with two more steps resumes from that checkpoint (it says so) and finishes;
3. one process with 8 devices on the same mesh trains the same steps to the same losses.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.xdist_group("multiprocess"), pytest.mark.slow]  # slow: scheduled first (tests/conftest.py)
ROOT = Path(__file__).resolve().parents[2]
# mesh (data, fsdp, seq, tensor) = (1, 2, 4, 1) over 8 devices, process p holding devices 4p..4p+3: fsdp splits the
# processes, seq runs inside each, and the weights (sharded over ("fsdp", "seq")) span both processes
MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.seq=4"]
TIMEOUT = 300


def _cmd(workdir, steps):
  return [sys.executable, "-m", "vidlm.cli", "train", "--config", "experiments/demo.py:smoke",
          "--workdir", str(workdir), f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.progress_bar=false", "--config.checkpoint.every=0", "--config.data.num_train=64",
          # constant lr after warmup: the schedule must not depend on train.steps, which the reruns change
          "--config.train.min_lr_ratio=1.0", *MESH]


def _env():
  return {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": ""}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(workdir, steps):
  port = _free_port()
  procs = []
  for pid in range(2):
    penv = {**_env(), "VIDLM_COORDINATOR": f"127.0.0.1:{port}", "VIDLM_NUM_PROCESSES": "2",
            "VIDLM_PROCESS_ID": str(pid), "VIDLM_LOCAL_DEVICE_COUNT": "4"}
    procs.append(subprocess.Popen(_cmd(workdir, steps), cwd=ROOT, env=penv, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout=TIMEOUT):
  """Outputs of all processes; a process still running after `timeout` is a hang: kill all and fail."""
  deadline = time.time() + timeout
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("multi-process run hung: " + " || ".join(p.communicate()[0][-2000:] for p in procs))
  return outs


def _losses(workdir) -> dict[int, float]:
  recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}


def _final(out):
  return json.loads([ln for ln in out.splitlines() if ln.startswith('{"final"')][-1])


def test_two_processes_stop_together_resume_and_match_one(tmp_path):
  multi = tmp_path / "multi"
  procs = _launch_two(multi, 100000)
  t0 = time.time()
  while not ((multi / "metrics.jsonl").exists() and len(_losses(multi)) >= 2):
    if any(p.poll() is not None for p in procs) or time.time() - t0 > TIMEOUT:
      for p in procs:
        p.kill()
      pytest.fail("no training progress: " + " || ".join(p.communicate()[0][-2000:] for p in procs))
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only one process is told to stop
  outs = _finish(procs)
  assert [p.returncode for p in procs] == [0, 0], outs
  stops = [[ln for ln in out.splitlines() if ln.startswith("SIGTERM received (by process 1): checkpoint saved")]
           for out in outs]
  assert all(stops), outs
  stopped = {int(s[-1].rsplit(" ", 1)[1]) for s in stops}
  assert len(stopped) == 1, stops  # the same step on both processes
  (stop_step,) = stopped
  assert stop_step >= 2
  for out in outs:
    final = _final(out)
    assert (final["final"]["step"], final["processes"], final["devices"]) == (stop_step, 2, 8)
  assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [stop_step]

  total = stop_step + 2
  procs = _launch_two(multi, total)
  outs = _finish(procs)
  assert [p.returncode for p in procs] == [0, 0], outs
  assert f"resumed from checkpoint step {stop_step} " in outs[0], outs[0]
  assert all(_final(out)["final"]["step"] == total for out in outs)

  single = tmp_path / "single"
  subprocess.run(_cmd(single, total) + ["--config.distributed.local_device_count=8"], cwd=ROOT, env=_env(),
                 check=True, capture_output=True, timeout=TIMEOUT)
  one, two = _losses(single), _losses(multi)
  assert sorted(one) == sorted(two) == list(range(1, total + 1))
  steps = sorted(one)
  np.testing.assert_allclose([two[s] for s in steps], [one[s] for s in steps], rtol=1e-5)
