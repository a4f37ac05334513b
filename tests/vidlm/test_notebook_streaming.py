"""notebooks/streaming.py: executed as a script (random weights); its stream, questions, memory and retrieval picks
are checked against what the caches' specs imply."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "streaming.py"


@pytest.fixture(scope="module")
def results() -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  env.pop("VIDLM_STREAM_WORKDIR", None)
  out = subprocess.run(
    [sys.executable, str(NOTEBOOK)], cwd=ROOT / "notebooks", env=env, capture_output=True, text=True, timeout=900
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")]
  assert len(lines) == 1, out.stdout[-2000:]
  return json.loads(lines[0].removeprefix("RESULTS "))


def test_streaming_notebook(results):
  rows = results["rows"]
  assert [(r["kind"], r["frames"]) for r in rows] == [
    (k, n) for n in (32, 64, 128) for k in ("sink_window", "block_retrieval")
  ]
  assert all(isinstance(r["answer"], str) for r in rows) and results["weights"] == "random"
  for kind in ("sink_window", "block_retrieval"):  # memory flat from 32 to 128 frames
    assert len({r["state_bytes"] for r in rows if r["kind"] == kind}) == 1
  sw, br = (next(r["state_bytes"] for r in rows if r["kind"] == k) for k in ("sink_window", "block_retrieval"))
  assert br > 5 * sw  # the store of 128 frames dwarfs sinks + a 16-frame window
  assert results["window"] == [112, 127] and results["compiles"] == {"sink_window": 1, "block_retrieval": 1}
  picked = results["picked_frames"]  # [layers][kv heads][top_k]: evicted frames only (not sinks, not the window)
  assert len(picked) == 2 and all(len(layer) == 2 and all(len(h) == 2 for h in layer) for layer in picked)
  assert all(1 <= f < 112 for layer in picked for h in layer for f in h)
  png = Path(results["png"])
  assert png.is_file() and png.stat().st_size > 5_000
