"""notebooks/sparse_attention.py: executed as a script; the densities it measures on a procedural video are
checked against what each selector's parameters imply."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "sparse_attention.py"


def _visible(n: int) -> np.ndarray:
  """Frame-causal tiles of the notebook's video: 8-token blocks, 16-token frames (2 blocks a frame)."""
  f = np.arange(n) // 2
  return f[None, :] <= f[:, None]


@pytest.fixture(scope="module")
def results() -> dict:
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  out = subprocess.run(
    [sys.executable, str(NOTEBOOK)], cwd=ROOT / "notebooks", env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS ")]
  assert len(lines) == 1, out.stdout[-2000:]
  return json.loads(lines[0].removeprefix("RESULTS "))


def test_sparse_notebook_densities(results):
  n = results["blocks"]
  assert (results["tokens"], n) == (256, 32) and Path(results["repo_root"]) == ROOT
  vis = _visible(n)
  assert results["visible_tiles"] == vis.sum()
  d = results["density"]
  # static (sinks 1, window 1, one global block per frame): the exact pattern
  want = [({0, i - 1, i, i + 1} | set(range(0, n, 2))) & set(np.flatnonzero(vis[i])) for i in range(n)]
  assert results["counts"]["static"] == [len(w) for w in want]
  assert d["static"] == pytest.approx(sum(map(len, want)) / vis.sum(), abs=1e-4)
  # moba top_k=2: own blocks (the block itself) + 2 gated ones, as far as the mask allows
  assert results["counts"]["moba"] == [min(3, int(vis[i].sum())) for i in range(n)]
  assert d["moba"] == pytest.approx(sum(min(3, int(vis[i].sum())) for i in range(n)) / vis.sum(), abs=1e-4)
  # xattention: at most max_kv_blocks (4) + sink + diagonal per row, fewer than visible at the end
  assert max(results["counts"]["xattention"]) <= 6 and 0.1 < d["xattention"] < 0.5
  # vmoba: the three chunk shapes select differently; all sparse, none empty
  vm = [d[f"vmoba_{p}"] for p in ("temporal", "spatial", "spatiotemporal")]
  assert all(0.1 < x < 0.8 for x in vm) and len(set(vm)) == 3
  png = Path(results["png"])
  assert png.is_file() and png.stat().st_size > 10_000
