"""Evaluators on a tiny trained model: registry, restore, scoring against loss_fn, JSON schemas, plots."""

import dataclasses
import json
import math
import sys

import jax
import numpy as np
import pytest
from matplotlib import image as mpimg

from vidlm import config as config_lib
from vidlm.eval import EVALUATORS, EvalContext, register_evaluator, restore_checkpoint, run_evaluators
from vidlm.eval import grid as grid_lib
from vidlm.eval.scoring import Scorer
from vidlm.train import step as step_lib
from vidlm.train.loop import Trainer, global_batch

pytestmark = pytest.mark.xdist_group("eval_evaluators")  # one worker builds the trained fixture once


def tiny_config() -> config_lib.Config:
  cfg = config_lib.Config(name="eval_test")
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 1, 2, 1, 16, 64
  m.tubelet = (1, 16, 16)
  d = cfg.data
  d.frames, d.height, d.width, d.text_len = 4, 32, 32, 32
  d.num_train, d.num_eval, d.tiers = 16, 16, ("a", "c")
  t = cfg.train
  t.steps, t.batch_size, t.warmup_steps, t.log_every, t.progress_bar = 2, 8, 1, 1, False
  cfg.checkpoint.every, cfg.checkpoint.use_async = 0, False
  e = cfg.eval
  e.evaluators = ("loss", "niavh", "ppl_vs_length")
  e.length_multipliers, e.depths, e.seeds, e.tiers = (1, 2), (0.0, 0.5, 1.0), 2, ("a", "b", "c")
  e.batch_size, e.batches = 8, 1
  return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(cfg, workdir, results) after 2 training steps and a fresh-process-style eval (new Trainer + restore)."""
  workdir = tmp_path_factory.mktemp("eval_run")
  cfg = tiny_config()
  Trainer(cfg, workdir).train()
  results = run_evaluators(tiny_config(), workdir)
  return cfg, workdir, results


def test_results_json_and_restore(trained):
  cfg, workdir, results = trained
  on_disk = json.loads((workdir / "eval" / "results.json").read_text())
  assert on_disk["step"] == results["step"] == cfg.train.steps
  assert set(cfg.eval.evaluators) <= set(on_disk) and set(on_disk["seconds"]) == set(cfg.eval.evaluators)
  lo = on_disk["loss"]
  assert set(lo) >= {"loss", "ppl", "token_accuracy", "exact_match"}
  assert math.isfinite(lo["loss"]) and lo["loss"] > 0 and lo["ppl"] == pytest.approx(math.exp(lo["loss"]))


def test_restored_state_equals_trained_state(trained, tmp_path):
  cfg, workdir, _ = trained
  t1 = Trainer(cfg, workdir)
  step, _ = restore_checkpoint(t1, cfg, workdir)
  t0 = Trainer(cfg, tmp_path)  # fresh init: must differ from the restored one
  leaves0 = jax.tree.leaves(jax.device_get(t0.state))
  leaves1 = jax.tree.leaves(jax.device_get(t1.state))
  assert step == cfg.train.steps
  assert any(not np.array_equal(a, b) for a, b in zip(leaves0, leaves1))
  # and restore_from pointing at the workdir finds the same checkpoint
  other = tiny_config()
  other.checkpoint.restore_from = str(workdir)
  t2 = Trainer(other, tmp_path / "elsewhere")
  assert restore_checkpoint(t2, other, tmp_path / "elsewhere")[0] == cfg.train.steps
  for a, b in zip(leaves1, jax.tree.leaves(jax.device_get(t2.state))):
    np.testing.assert_array_equal(a, b)


def test_eval_only_restore_works_without_grain(trained, monkeypatch, tmp_path):
  """The GPU image has no grain: restoring parameters for eval (no data iterator) must not import it."""
  cfg, workdir, _ = trained
  monkeypatch.setitem(sys.modules, "grain", None)  # any `import grain` now raises ImportError
  with pytest.raises(ImportError):
    import grain  # noqa: F401
  trainer = Trainer(cfg, tmp_path)
  assert restore_checkpoint(trainer, cfg, workdir)[0] == cfg.train.steps


def test_niavh_schema_and_heatmaps(trained):
  cfg, workdir, results = trained
  nv = json.loads((workdir / "eval" / "niavh.json").read_text())
  assert nv == json.loads(json.dumps(results["niavh"]))
  e = cfg.eval
  assert [x["multiplier"] for x in nv["lengths"]] == list(e.length_multipliers)
  assert [x["frames"] for x in nv["lengths"]] == [cfg.data.frames * m for m in e.length_multipliers]
  # tokens per cell: (F / tt) * (H / th) * (W / tw) video tokens + text
  assert [x["tokens"] for x in nv["lengths"]] == [f * 4 + cfg.data.text_len for f in (4, 8)]
  assert nv["depths"] == list(e.depths)
  assert len(nv["cells"]) == len(e.tiers) * len(e.length_multipliers) * len(e.depths)
  assert set(nv["tiers"]) == set(e.tiers)
  for tier, r in nv["tiers"].items():
    acc = np.array(r["accuracy"])
    assert acc.shape == (len(e.depths), len(e.length_multipliers))
    assert np.all((acc >= 0) & (acc <= 1)) and not np.isnan(acc).any()
    # every cell is a whole number of correct seeds, and cells / summaries agree
    assert np.allclose(acc * e.seeds, np.round(acc * e.seeds))
    cells = [c for c in nv["cells"] if c["tier"] == tier]
    for c in cells:
      i, j = nv["depths"].index(c["depth"]), list(e.length_multipliers).index(c["multiplier"])
      assert c["total"] == e.seeds and c["accuracy"] == pytest.approx(acc[i, j]) == c["correct"] / e.seeds
    assert r["mean"] == pytest.approx(acc.mean())
    assert r["worst_depth"] == pytest.approx(acc.mean(axis=1).min()) and 0 <= r["worst_depth"] <= r["mean"]
    assert r["mean_by_length"] == pytest.approx(acc.mean(axis=0).tolist())
    png = workdir / "eval" / f"niavh_{tier}.png"
    assert r["heatmap"] == str(png) and png.stat().st_size > 1000
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_ppl_vs_length_schema_and_plot(trained):
  cfg, workdir, results = trained
  pv = json.loads((workdir / "eval" / "ppl_vs_length.json").read_text())
  assert pv["lengths"] == json.loads(json.dumps(results["ppl_vs_length"]["lengths"]))
  assert pv["examples_per_length"] == cfg.eval.batch_size * cfg.eval.batches
  assert [r["frames"] for r in pv["lengths"]] == [4, 8]
  for r in pv["lengths"]:
    assert math.isfinite(r["loss"]) and r["loss"] > 0 and r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert 0 <= r["token_accuracy"] <= 1 and 0 <= r["exact_match"] <= 1
    assert r["examples"] == pv["examples_per_length"]
  png = workdir / "eval" / "ppl_vs_length.png"
  assert png.stat().st_size > 1000 and mpimg.imread(png).ndim == 3


def test_scorer_matches_loss_fn_and_exact_match_logic(trained):
  """Per-example sums agree with the training loss_fn on the same batch; exact match flips on one wrong byte."""
  cfg, workdir, _ = trained
  trainer = Trainer(cfg, workdir)
  restore_checkpoint(trainer, cfg, workdir)
  rng = np.random.default_rng(0)
  exs = [grid_lib.example(cfg, "scorer_test", i, frames=8, tier="a", depth=float(rng.uniform())) for i in range(8)]
  scorer = Scorer(trainer)
  got = scorer(exs[:5])  # a short last batch is padded internally and the padding dropped
  assert got["exact"].shape == (5,)
  full = scorer(exs)
  for key in got:
    np.testing.assert_allclose(full[key][:5], got[key], rtol=1e-6)
  batch = {k: np.stack([e[k] for e in exs]) for k in ("frames", "tokens", "targets", "loss_mask")}
  with trainer.activate():
    gb = global_batch(trainer.mesh, batch)
    _, sums = step_lib.loss_fn(trainer.model, gb)
    logits = trainer.model(gb["frames"], gb["tokens"])
  for key in ("loss_sum", "weight", "correct", "exact"):
    assert float(full[key].sum()) == pytest.approx(float(sums[key]), rel=1e-5), key
  assert float(full["loss_sum"].sum()) > 0
  # Make targets equal to the model's own argmax: every example must then be exactly right...
  pred = np.asarray(jax.device_get(logits)).argmax(-1)
  own = [dict(e, targets=pred[i].astype(np.int32)) for i, e in enumerate(exs)]
  assert scorer(own)["exact"].tolist() == [1.0] * 8
  # ...and one changed answer byte makes exactly that example wrong.
  first = int(np.flatnonzero(own[2]["loss_mask"] > 0)[0])
  own[2]["targets"] = own[2]["targets"].copy()
  own[2]["targets"][first] = (own[2]["targets"][first] + 1) % 256
  assert scorer(own)["exact"].tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_registry_custom_and_unknown_evaluators(trained):
  cfg, workdir, _ = trained

  @register_evaluator("test_only_count_params")
  def count(ctx: EvalContext) -> dict:
    return {"params": int(sum(x.size for x in jax.tree.leaves(ctx.trainer.state))), "step": ctx.step}

  try:
    out = run_evaluators(cfg, workdir, evaluators=("test_only_count_params",))
    assert out["test_only_count_params"]["params"] > 0 and out["test_only_count_params"]["step"] == 2
    with pytest.raises(config_lib.ConfigError, match="config.eval.evaluators: unknown evaluator 'nope'"):
      run_evaluators(cfg, workdir, evaluators=("loss", "nope"))
  finally:
    EVALUATORS.pop("test_only_count_params")


def test_errors_name_the_field(tmp_path):
  cfg = tiny_config()
  with pytest.raises(config_lib.ConfigError, match="config.checkpoint.restore_from: no checkpoint"):
    run_evaluators(cfg, tmp_path / "empty")
  bad = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, length_multipliers=(1, 0)))
  with pytest.raises(config_lib.ConfigError, match="config.eval.length_multipliers"):
    grid_lib.lengths(bad)
  sparse = tiny_config()
  sparse.data.text_len, sparse.data.frames = 48, 4  # 16 video + 48 text = 64 tokens: one 64-token block
  sparse.attention.sparsity.method = "moba"
  sparse.attention.sparsity.block_q = sparse.attention.sparsity.block_kv = 64
  grid_lib.lengths(dataclasses.replace(sparse, eval=dataclasses.replace(sparse.eval, length_multipliers=(1,))))
  sparse.eval.length_multipliers = (1, 3)  # 3x = 48 + 48 = 96 tokens: not a multiple of the 64-token blocks
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.length_multipliers: 3x .*sparsity"):
    grid_lib.lengths(sparse)
  small = tiny_config()
  small.data.height = small.data.width = 16
  with pytest.raises(config_lib.ConfigError, match="config.eval.tiers: tier 'b'"):
    grid_lib.check_tier(small, "b", 4)


def test_heatmap_checks_grid_against_labels(tmp_path):
  from vidlm.eval import plotting

  values = np.array([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
  path = plotting.heatmap(tmp_path / "h.png", values, row_labels=["0%", "100%"], col_labels=["8f", "16f", "32f"],
                          xlabel="length", ylabel="depth", title="t")
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.std() > 0  # not a blank canvas
  with pytest.raises(ValueError, match="heatmap: values"):
    plotting.heatmap(tmp_path / "bad.png", values, row_labels=["0%"], col_labels=["8f", "16f", "32f"],
                     xlabel="x", ylabel="y", title="t")
