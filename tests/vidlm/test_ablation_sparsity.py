"""experiments/ablations/sparsity.py: every variant's overrides apply and validate as `vidlm sweep` applies them
(no training), the selection blocks tile the demo sequence, and the measured densities stay near the 25 % the
ablation is about."""

from pathlib import Path

import pytest

from experiments.ablations import sparsity
from vidlm import config as config_lib
from vidlm import sweep

ROOT = Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "experiments" / "ablations" / "sparsity.py")
NAMES = ["dense", "static", "moba", "xattention", "vmoba"]


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_every_variant_validates(arg):
  spec = SPEC if arg is None else f"{SPEC}:{arg}"
  variants = sweep.load_sweep(spec)
  assert list(variants) == NAMES
  for name, overrides in variants.items():
    cfg = sweep.check_variant(spec, name, sweep.variant_args([], overrides))  # raises ConfigError if rejected
    sp = cfg.attention.sparsity
    assert sp.method == ("none" if name == "dense" else name)
    assert cfg.attention.kernel == "xla" and cfg.eval.niavh_scoring == "teacher_forced"
    if name != "dense":
      n = config_lib.sequence_length(cfg)
      assert n == 160 or arg == "smoke"
      assert n % sp.block_q == 0 and n % sp.block_kv == 0
      assert config_lib.tokens_per_frame(cfg) % sp.block_kv == 0
      assert sp.dense_layers == ()
      for key, value in sparsity.SELECTORS[name].items():
        assert getattr(sp, key) == value


def test_unknown_variant_is_one_line():
  with pytest.raises(config_lib.ConfigError, match="unknown variant 'big'"):
    sparsity.get_sweep("big")


def test_measured_density_near_a_quarter():
  density = sparsity.measure_density(seeds=2)
  assert set(density) == set(NAMES[1:])
  for name, per_layer in density.items():
    mean = sum(per_layer) / len(per_layer)
    assert 0.15 <= mean <= 0.35, f"{name}: density {per_layer}"
