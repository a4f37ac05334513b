"""`vidlm bench train_step` runs the real step on random data and reports consistent figures (CPU smoke)."""

import json

import pytest

from vidlm.bench import train_step


def test_train_step_bench_reports(tmp_path):
  out = tmp_path / "step.json"
  rc = train_step.main(
    "--config experiments/demo.py:smoke --steps 2 --forward-lengths 16 --config.mesh.data=-1".split() + ["--out", str(out)]
  )
  assert rc == 0
  res = json.loads(out.read_text())
  assert res["num_devices"] == 8 and res["params"] > 1e5
  assert len(res["step_times_s"]) == 2 and res["step_s"] > 0 and res["warmup_step_s"] > 0
  tokens_per_s = 8 * res["sequence_length"] / res["step_s"]
  assert abs(res["tokens_per_s"] - tokens_per_s) < 0.05 * tokens_per_s  # step_s is rounded to ms
  assert res["compile"]["compile_s"] > 0 and res["compile"]["estimated_peak_gib"] > 0
  assert res["forward_trials"][0]["result"] == "fits"


def test_train_step_bench_falls_back_when_the_estimate_does_not_fit(tmp_path):
  """A device too small for the compiled step (here: a 1 KiB limit) switches to --fallback-remat, and forward
  lengths in compile mode stop at the first that does not fit."""
  out = tmp_path / "step.json"
  args = "--config experiments/demo.py:smoke --steps 1 --config.model.remat=none --fallback-remat full"
  args += f" --device-memory-gib {1 / 2**20} --forward-lengths 16,32 --forward-mode compile --out {out}"
  rc = train_step.main(args.split())
  assert rc == 0
  res = json.loads(out.read_text())
  assert res["compile_rejected"]["remat"] == "none" and res["compile_rejected"]["fits"] is False
  assert res["remat"] == "full" and res["step_s"] > 0
  assert [t["result"] for t in res["forward_trials"]] == ["does not fit (compiler estimate)"]


def _layout_tiles(cfg, layer: int) -> int:
  """Tiles the model's selector lists for one layer on random q/k, summed over batch rows and q heads."""
  import jax
  import numpy as np

  from layers.sparse import make_selector
  from pallas_kernels.layout import MaskSpec
  from vidlm import config as C

  m, grid = cfg.model, C.video_grid(cfg)
  s = C.sequence_length(cfg)
  sel = make_selector(cfg.attention.sparsity, num_layers=m.num_layers, video_grid=grid)
  kq, kk = jax.random.split(jax.random.key(layer))
  q = jax.random.normal(kq, (1, s, m.num_heads, m.head_dim))
  k = jax.random.normal(kk, (1, s, m.num_kv_heads, m.head_dim))
  mask = MaskSpec.frame_causal(grid[1] * grid[2], video_tokens=grid[0] * grid[1] * grid[2])
  layout = sel(q, k, mask, layer)
  counts = np.asarray(layout.kv_counts)  # [1, 1 | Hq, nQ]
  return int(counts.sum()) * (m.num_heads // counts.shape[1])


@pytest.mark.parametrize("variant", ["moba", "static"])
def test_attention_tiles_count_what_the_selectors_list(variant):
  """The computed-FLOPs MFU's tile counts equal the tiles the model's own selector lists (ring_1m's sparse
  variants at smoke size), and a layer kept dense counts every visible tile."""
  from vidlm import config as C

  cfg = C.load_config(f"experiments/ring_1m.py:{variant},smoke")
  cfg.attention.sparsity.dense_layers = ("last",)
  tiles = train_step.attention_tiles(cfg)
  assert tiles["listed"][0] == _layout_tiles(cfg, 0)
  assert tiles["listed"][1] == tiles["visible"]  # the dense last layer
  assert 0 < tiles["listed"][0] < tiles["visible"]
  assert tiles["density"] == round(sum(tiles["listed"]) / (2 * tiles["visible"]), 4)
  dense_equiv = train_step._model_flops(cfg, 1000)
  computed = train_step._computed_flops(cfg, 1000, tiles)
  assert computed < dense_equiv  # a sparse layer computes fewer tiles than the dense model's FLOPs


def test_computed_flops_of_a_dense_model_are_its_model_flops_and_unknown_for_data_dependent_selectors():
  from vidlm import config as C

  cfg = C.load_config("experiments/ring_1m.py:smoke")
  tiles = train_step.attention_tiles(cfg)
  assert tiles["density"] == 1.0 and tiles["listed"] is None
  assert train_step._computed_flops(cfg, 1000, tiles) == train_step._model_flops(cfg, 1000)
  cfg.attention.sparsity.method, cfg.attention.sparsity.block_q, cfg.attention.sparsity.block_kv = "xattention", 8, 8
  tiles = train_step.attention_tiles(cfg)
  assert tiles["listed"] == [None, None] and tiles["density"] is None
  assert train_step._computed_flops(cfg, 1000, tiles) is None


def test_ring_1m_sparse_variants_at_1m_tokens_are_near_one_eighth_dense():
  """The 1M-token moba / static variants list ~12.5 % of the visible tiles (exact counts, no device work)."""
  from vidlm import config as C

  for variant in ("moba", "static"):
    tiles = train_step.attention_tiles(C.load_config(f"experiments/ring_1m.py:{variant}"))
    assert 0.12 <= tiles["density"] <= 0.13, (variant, tiles["density"])


def test_train_step_bench_reports_computed_flops_mfu_for_a_sparse_model(tmp_path):
  """A block-sparse demo model: the JSON carries both MFUs, the computed one below the dense-equivalent one."""
  out = tmp_path / "step.json"
  sparse = "method=moba block_q=8 block_kv=8 top_k=2".split()
  # kernel=xla: on CPU the layout becomes an element mask (the flash kernel would run interpreted, minutes)
  args = "--config experiments/demo.py:smoke --steps 1 --config.mesh.data=-1 --config.attention.kernel=xla".split()
  args += [f"--config.attention.sparsity.{kv}" for kv in sparse] + ["--out", str(out)]
  assert train_step.main(args) == 0
  res = json.loads(out.read_text())
  assert res["sparsity"] == "moba" and 0 < res["attention_tiles"]["density"] < 1
  assert res["mfu"] == res["mfu_dense_equivalent"]
  assert 0 < res["computed_flops_per_step"] < res["model_flops_per_step"]
  assert res["mfu_computed_flops"] <= res["mfu_dense_equivalent"]
