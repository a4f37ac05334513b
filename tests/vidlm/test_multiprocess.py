"""Two processes on localhost (CPU, jax.distributed) train to the same losses as one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("multiprocess")
ROOT = Path(__file__).resolve().parents[2]


def _cmd(workdir):
  return [sys.executable, "-m", "vidlm.cli", "train", "--config", "experiments/demo.py:smoke",
          "--workdir", str(workdir), "--config.train.steps=3", "--config.train.log_every=1",
          "--config.train.progress_bar=false", "--config.checkpoint.every=0", "--config.data.num_train=64"]


def _losses(workdir):
  recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train/loss"] for r in recs if "train/loss" in r]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": ""}
  single = tmp_path / "single"
  subprocess.run(_cmd(single) + ["--config.distributed.local_device_count=8"], cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=300)

  multi = tmp_path / "multi"
  port = _free_port()
  procs = []
  for pid in range(2):
    penv = {**env, "VIDLM_COORDINATOR": f"127.0.0.1:{port}", "VIDLM_NUM_PROCESSES": "2",
            "VIDLM_PROCESS_ID": str(pid), "VIDLM_LOCAL_DEVICE_COUNT": "4"}
    procs.append(subprocess.Popen(_cmd(multi), cwd=ROOT, env=penv, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  one, two = _losses(single), _losses(multi)
  assert len(one) == len(two) == 3
  np.testing.assert_allclose(two, one, rtol=1e-5)
  for out in outs:
    final = json.loads([ln for ln in out.splitlines() if ln.startswith('{"final"')][-1])
    assert (final["processes"], final["devices"]) == (2, 8)
  # both processes saw 8 global devices and wrote one checkpoint together
  assert (multi / "checkpoints" / "3").is_dir()
