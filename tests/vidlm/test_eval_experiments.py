"""Experiment configs owned by the evaluation work: they load, validate on their intended device counts, and
every length of their evaluation grid is a valid sequence for their attention kernel (kernel blocks, ring chunks)."""

import pytest

from vidlm import config as config_lib
from vidlm.eval import grid


@pytest.mark.parametrize(
  "spec, devices",
  [
    ("experiments/demo.py", 1),
    ("experiments/demo.py:smoke", 8),
    ("experiments/eval_only.py", 1),
    ("experiments/long_context_gpu.py", 1),
    ("experiments/long_context_gpu.py:smoke", 1),
    ("experiments/long_context_gpu.py:ring", 8),
    ("experiments/long_context_gpu.py:ring_smoke", 8),
  ],
)
def test_experiment_config_and_eval_grid_validate(spec, devices):
  cfg = config_lib.validate(config_lib.load_config(spec), devices)
  lengths = grid.lengths(cfg)
  assert lengths[0].multiplier == 1 and lengths[0].tokens == config_lib.sequence_length(cfg)
  for tier in cfg.eval.tiers:
    for length in lengths:
      grid.check_tier(cfg, tier, length.frames)
  assert set(cfg.eval.evaluators) >= {"niavh", "ppl_vs_length"}


def test_long_context_config_is_long():
  cfg = config_lib.load_config("experiments/long_context_gpu.py")
  assert cfg.attention.kernel == "flash" and 256 <= cfg.data.frames <= 1024
  assert grid.lengths(cfg)[-1].tokens > 32_000
  ring = config_lib.load_config("experiments/long_context_gpu.py:ring")
  assert ring.attention.context_parallel == "ring" and ring.mesh.seq == -1 and ring.data.frames == 1024
  with pytest.raises(ValueError, match="unknown variant"):
    config_lib.load_config("experiments/long_context_gpu.py:huge")


def test_demo_and_eval_only_share_the_model():
  demo = config_lib.load_config("experiments/demo.py")
  ev = config_lib.load_config("experiments/eval_only.py")
  assert ev.model == demo.model and ev.data == demo.data and ev.checkpoint.restore_from is None
  assert ev.eval.evaluators == ("loss", "niavh", "ppl_vs_length")
