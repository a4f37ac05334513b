"""The demo's side-by-side report (vidlm/eval/demo.py) on hand-made results: the table holds a row per (tier, model)
and a column per length of either run, '-' where a run did not evaluate that length; the plot draws every run on
its own length grid; `exact_at` reads one cell."""

from vidlm.eval import demo


def _results(mults, frames, acc_by_tier):
  return {"niavh": {
    "lengths": [{"multiplier": m, "frames": f, "tokens": 16 * f + 32} for m, f in zip(mults, frames)],
    "protocol": {"train_frames": 8},
    "tiers": {t: {"mean_by_length": accs} for t, accs in acc_by_tier.items()},
  }}


DENSE = _results((1, 2), (8, 16), {"a": [1.0, 0.0]})
LONG = _results((1, 32), (8, 256), {"a": [1.0, 0.75]})


def test_exact_at_reads_one_cell():
  assert demo.exact_at(LONG, "a", 32) == 0.75
  assert demo.exact_at(LONG, "a", 2) is None and demo.exact_at(LONG, "b", 1) is None


def test_side_by_side_table_has_every_length_of_either_run():
  table = demo.format_side_by_side({"dense": DENSE, "memory_bridge": LONG}).splitlines()
  assert "1x 8f" in table[1] and "2x 16f" in table[1] and "32x 256f" in table[1]
  dense_row = next(r for r in table if r.startswith("a     dense"))
  long_row = next(r for r in table if r.startswith("a     memory_bridge"))
  assert dense_row.split()[2:] == ["100.0%", "0.0%", "-"]
  assert long_row.split()[2:] == ["100.0%", "-", "75.0%"]


def test_plot_draws_runs_on_their_own_grids(tmp_path):
  path = demo.plot_side_by_side(tmp_path / "acc.png", {"dense": DENSE, "memory_bridge": LONG})
  assert path.stat().st_size > 1000
  assert demo.plot_side_by_side(tmp_path / "none.png", {"x": {}}) is None
