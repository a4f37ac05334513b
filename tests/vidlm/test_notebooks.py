"""The notebooks are thin, jupytext-paired scripts: CI executes each one and checks the values it computes.

quickstart.py runs from the repository root and from `notebooks/` (a notebook kernel starts in the notebook's
folder), so both working directories are tested; the two runs are seeded alike and must agree.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "notebooks" / "quickstart.py"
_RUNS: dict[str, dict] = {}  # where -> results, for the cross-directory comparison
pytestmark = pytest.mark.xdist_group("notebooks")  # both runs in one worker, so the comparison always happens


def _run(path: Path, cwd: Path) -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")]
  assert len(lines) == 1, f"{path.name} printed no RESULTS line:\n{out.stdout[-2000:]}"
  return json.loads(lines[0].removeprefix("RESULTS "))


def test_only_known_notebooks():
  """A new notebook needs its own value checks here, not just a run."""
  # sparse_attention.py: its checks are in tests/vidlm/test_notebook_sparse.py; memory_bridge.py: in
  # tests/vidlm/test_notebook_memory_bridge.py; streaming.py: in tests/vidlm/test_notebook_streaming.py
  assert sorted(p.name for p in (ROOT / "notebooks").glob("*.py")) == [
    "memory_bridge.py", "quickstart.py", "sparse_attention.py", "streaming.py"]


@pytest.mark.parametrize("where", ["root", "notebooks"])
def test_quickstart_values(where):
  r = _run(QUICKSTART, ROOT if where == "root" else ROOT / "notebooks")
  _RUNS[where] = r
  assert Path(r["repo_root"]) == ROOT
  assert r["frames_shape"] == [8, 32, 32, 3]  # demo example: F, H, W, RGB
  assert r["answer_in_tokens"]
  assert r["steps"] == 4  # demo.py:smoke
  # 4 steps at lr 3e-3: the byte-level loss starts near chance (ln 260 = 5.56) and must fall by a clear margin
  assert 4.5 < r["train_loss_first"] < 7.0, r
  assert r["train_loss_last"] < 0.8 * r["train_loss_first"], r
  # held-out loss below chance; the fixed text template ("Code on the needle frame?") is partly learnt already
  assert r["held_out_loss"] < r["chance_loss"] - 1.0, r
  assert 0.1 < r["held_out_token_accuracy"] <= 1.0, r
  other = _RUNS.get("root" if where == "notebooks" else "notebooks")
  if other is not None:  # same seeds, same config: the working directory must not change the numbers
    for key in ("train_loss_first", "train_loss_last", "held_out_loss", "held_out_token_accuracy"):
      assert r[key] == pytest.approx(other[key], rel=1e-4), key
