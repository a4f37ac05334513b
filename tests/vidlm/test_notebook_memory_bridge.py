"""notebooks/memory_bridge.py: executed as a script; its SceneTiling boundaries, recomputed attention weights and
accuracy-vs-length curve are checked."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "memory_bridge.py"


pytestmark = pytest.mark.xdist_group("notebook_memory_bridge")  # one worker runs the module fixture once

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


def test_scene_tiling_finds_the_true_cuts(results):
  seg = results["segmentation"]
  assert Path(results["repo_root"]) == ROOT
  clean = seg["clean"]
  # the clean video (no scene shorter than min_length): one boundary within a frame of every cut, nothing else
  assert len(clean["found"]) == len(clean["cuts"]) >= 3
  for f, c in zip(sorted(clean["found"]), sorted(clean["cuts"]), strict=True):
    assert abs(f - c) <= 1, clean
  for v in seg["videos"]:
    assert all(abs(o) <= 1 for o in v["offsets"]) and v["matched"] <= min(len(v["found"]), len(v["cuts"]))
    assert v["segments"] == len(v["found"]) + 1
  # every boundary found is a real cut; cuts inside one-frame scenes may merge (min_length 2), not more than 1/3
  assert seg["precision"] >= 0.95 and seg["recall"] >= 0.66, seg
  assert Path(seg["png"]).stat().st_size > 10_000


def test_attention_weights_are_distributions_and_match_the_model(results):
  att = results["attention"]
  k = att["segments"]
  assert (att["frames"], k) == (32, 15)  # 4x the 8 training frames, segments of 4 every 2
  assert att["finite"]
  # the recomputed retriever weights, bank read and logits reproduce the model's own outputs
  assert all(e < 1e-4 for e in att["check_errors"].values()), att["check_errors"]
  np.testing.assert_allclose(att["retriever_row_sums"], 1.0, atol=1e-5)
  assert att["retriever_upper_mass"] == 0.0  # step s never reads a later slot
  np.testing.assert_allclose(att["read_head_sums"], 1.0, atol=1e-5)
  assert len(att["read_per_segment"]) == k and math.isclose(sum(att["read_per_segment"]), 1.0, abs_tol=1e-5)
  # the needle (frame round(31 * 0.6) = 19) lies in the overlapping segments 8 (frames 16-19) and 9 (18-21)
  assert att["needle_frames"] == [19] and att["needle_segments"] == [8, 9]
  assert Path(att["png"]).stat().st_size > 10_000


def test_accuracy_vs_length_curve(results):
  curve = results["curve"]
  assert [r["frames"] for r in curve] == [8, 32, 64] and [r["multiplier"] for r in curve] == [1, 4, 8]
  assert [r["segments"] for r in curve] == [3, 15, 31]
  for r in curve:
    for tier in ("a", "c"):
      assert 0.0 <= r[f"{tier}_exact"] <= 1.0 and 0.0 <= r[f"{tier}_token_accuracy"] <= 1.0
      assert math.isfinite(r[f"{tier}_loss"]) and r[f"{tier}_loss"] < results["chance_loss"]
  t = results["train"]
  assert t["loss_last"] < 0.6 * t["loss_first"], t  # the tiny model trained in the notebook learnt something
  assert Path(results["curve_png"]).stat().st_size > 5_000
