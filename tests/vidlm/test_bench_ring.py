"""`vidlm bench ring` on 8 fake CPU devices: the frame_causal mask next to causal, FLOP accounting, one-line errors.

The bench times GPUs; here `--allow-cpu` and the xla hop kernel run its code paths at a tiny size (the numbers are
CPU timings and mean nothing), checking that every row is produced and the ring matches the fp32 reference.
"""

import json

import numpy as np
import pytest

from pallas_kernels.layout import MaskSpec
from vidlm.bench import ring as bench
from vidlm.config import ConfigError


def test_visible_pairs_match_the_dense_mask():
  for mask in (MaskSpec.causal(), MaskSpec.frame_causal(8), MaskSpec.frame_causal(8, video_tokens=40)):
    assert bench.visible_pairs(mask, 48) == int(mask.dense(48, 48).sum()), mask
  # without text, frame_causal sees T (T + tokens_per_frame) / 2 pairs
  assert bench.visible_pairs(MaskSpec.frame_causal(256), 8192) == 8192 * (8192 + 256) // 2


def test_ring_bench_times_causal_and_frame_causal_on_cpu(tmp_path):
  out = tmp_path / "ring.json"
  args = "--allow-cpu --local-impl xla --tokens-per-device 128 --ring-sizes 2,1 --layouts zigzag --heads 2"
  args += " --kv-heads 1 --head-dim 16 --masks causal,frame_causal --tokens-per-frame 16 --text-tokens 32"
  args += f" --warmup 0 --iters 1 --check-tokens 128 --json {out}"
  assert bench.main(args.split()) == 0
  res = json.loads(out.read_text())
  assert res["meta"]["masks"] == ["causal", "frame_causal"]
  assert res["meta"]["frame_causal"] == {"tokens_per_frame": 16, "text_tokens": 32}
  checks = {c["mask"]: c for c in res["checks"]}
  assert set(checks) == {"causal", "frame_causal"}
  for c in checks.values():
    assert "error" not in c, c
    # bf16 inputs: the single-device kernel is ~5e-3 off the fp32 reference; the ring must add nothing to that
    assert c["single_vs_fp32_ref"] < 2e-2 and c["ring_vs_fp32_ref"] <= 1.5 * c["single_vs_fp32_ref"] + 1e-3
  rows = {(r["mask"], r["ring"]): r for r in res["rows"]}
  assert set(rows) == {("causal", 1), ("causal", 2), ("frame_causal", 1), ("frame_causal", 2)}
  for r in rows.values():
    assert "error" not in r, r
    assert r["ring_ms"] > 0 and r["efficiency_pct"] > 0
  assert "exposed_comm_pct" in rows[("frame_causal", 2)] and "exposed_comm_pct" not in rows[("frame_causal", 1)]
  # frame_causal over 256 tokens (224 video in frames of 16, 32 text) counts its exact visible pairs
  mask = MaskSpec.frame_causal(16, video_tokens=256 - 32)
  pairs = int(mask.dense(256, 256).sum())
  np.testing.assert_allclose(rows[("frame_causal", 2)]["flops_fwd_bwd"], 3.5 * 4 * pairs * 2 * 16)
  assert rows[("frame_causal", 2)]["flops_fwd_bwd"] > rows[("causal", 2)]["flops_fwd_bwd"]


@pytest.mark.parametrize(
  ("flags", "field"),
  [
    ("--local-impl cudnn --masks frame_causal", "--local-impl cudnn"),
    ("--masks causal,sliding", "--masks"),
    ("--local-impl flash --masks frame_causal --text-tokens 9000", "--text-tokens"),
    ("--layouts striped", "--layouts"),
  ],
)
def test_ring_bench_bad_flags_are_one_line(flags, field):
  with pytest.raises(ConfigError, match=field):
    bench.main(["--allow-cpu", *flags.split()])
