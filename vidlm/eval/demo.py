"""The main job (`make demo` = `vidlm demo --workdir runs/demo`): train the demo config, evaluate, report.

Trains `experiments/demo.py` (resuming if `<workdir>/checkpoints` has a checkpoint; a finished run is not
retrained), runs its evaluators on the trained state, prints one results table (NIAVH exact match per tier and
length, answer loss and perplexity per length, held-out loss) and the paths of the plots, and writes the same
table to `<workdir>/eval/summary.txt`. With the default config and no overrides it also checks the demo's
promise, exact match >= 90% on tier (a) at the training length, and exits non-zero when it is missed.
"""

from __future__ import annotations

import time
from pathlib import Path

TARGET_TIER, TARGET_EXACT = "a", 0.90


def default_config_path() -> str:
  import experiments  # noqa: PLC0415

  return str(Path(experiments.__file__).parent / "demo.py")


def _pct(x: float) -> str:
  return f"{100 * x:5.1f}%"


def format_table(results: dict) -> str:
  """The printed report: NIAVH (tier x length), loss/ppl vs length, held-out loss, plot paths."""
  lines = []
  nv = results.get("niavh")
  if nv:
    lengths = nv["lengths"]
    heads = [f"{x['multiplier']}x {x['frames']}f/{x['tokens']}t" for x in lengths]
    width = max(16, *(len(h) + 2 for h in heads))
    p = nv["protocol"]
    lines.append(f"NIAVH exact match (step {results.get('step')}; trained at {p['train_frames']} frames; cell = mean "
                 f"over {len(nv['depths'])} depths x {p['seeds']} seeds, (worst depth))")
    lines.append("tier  " + "".join(h.rjust(width) for h in heads) + "     all lengths (worst depth)")
    for tier, r in nv["tiers"].items():
      cells = "".join(f"{_pct(m)} ({100 * w:3.0f}%)".rjust(width)
                      for m, w in zip(r["mean_by_length"], r["worst_depth_by_length"]))
      lines.append(f"{tier:<6}{cells}     {_pct(r['mean'])} ({100 * r['worst_depth']:3.0f}% at depth "
                   f"{r['worst_depth_at']:.0%})")
    gens = {tier: r["generate"] for tier, r in nv["tiers"].items() if "generate" in r}
    if gens:  # eval.niavh_scoring=both: real greedy decoding with a KV cache, beside the teacher-forced table
      lines.append("by greedy generation (KV cache): " + "; ".join(
        f"{tier} {_pct(g['mean']).strip()} (agrees with teacher-forced on {_pct(g['agreement']).strip()} of examples)"
        for tier, g in gens.items()))
    lines.append("")
  pv = results.get("ppl_vs_length")
  if pv:
    lines.append(f"Answer loss vs context length (tiers {','.join(pv['tiers'])}, {pv['examples_per_length']} "
                 f"examples per length, needles at random depths)")
    lines.append(f"{'length':<8}{'frames':>8}{'tokens':>8}{'loss':>9}{'ppl':>9}{'tok-acc':>9}{'exact':>9}")
    for r in pv["lengths"]:
      lines.append(f"{str(r['multiplier']) + 'x':<8}{r['frames']:>8}{r['tokens']:>8}{r['loss']:>9.4f}{r['ppl']:>9.3f}"
                   f"{_pct(r['token_accuracy']):>9}{_pct(r['exact_match']):>9}")
    lines.append("")
  lo = results.get("loss")
  if lo:
    lines.append(f"Held-out eval split (training length): loss {lo['loss']:.4f}  ppl {lo['ppl']:.3f}  "
                 f"token accuracy {_pct(lo['token_accuracy'])}  exact match {_pct(lo['exact_match'])}")
  return "\n".join(lines).rstrip() + "\n"


def plot_paths(results: dict) -> list[str]:
  paths = [r["heatmap"] for r in (results.get("niavh") or {}).get("tiers", {}).values()]
  if results.get("ppl_vs_length"):
    paths.append(results["ppl_vs_length"]["plot"])
  return paths


def target_exact(results: dict) -> float | None:
  """Tier (a) exact match at the training length (multiplier 1), if the grid has it."""
  nv = results.get("niavh") or {}
  tier = nv.get("tiers", {}).get(TARGET_TIER)
  if tier is None:
    return None
  for i, length in enumerate(nv["lengths"]):
    if length["multiplier"] == 1:
      return tier["mean_by_length"][i]
  return None


def main(workdir: str, config: str | None = None, extra_argv: list[str] | tuple[str, ...] = ()) -> int:
  t_start = time.perf_counter()
  from vidlm import config as config_lib  # noqa: PLC0415
  from vidlm import distributed  # noqa: PLC0415

  spec = config or default_config_path()
  cfg = config_lib.load_config(spec)
  for key, value in config_lib.parse_overrides(list(extra_argv)):
    config_lib.apply_override(cfg, key, value)
  distributed.initialize(cfg.distributed)
  import jax  # noqa: PLC0415

  jax.config.update("jax_threefry_partitionable", True)
  from vidlm.eval import run_evaluators  # noqa: PLC0415
  from vidlm.train.loop import Trainer  # noqa: PLC0415

  is_main = jax.process_index() == 0
  if is_main:
    print(f"vidlm demo: config {spec}, workdir {workdir}, {jax.device_count()} {jax.default_backend()} device(s)",
          flush=True)
  trainer = Trainer(cfg, workdir)
  summary = trainer.train()
  t_train = time.perf_counter()
  if summary.get("stopped"):  # SIGTERM / Ctrl-C: the checkpoint is saved; evaluating a cut-short run would mislead
    if is_main:
      print(f"stopped at step {summary['step']} before train.steps={trainer.cfg.train.steps}; not evaluating "
            f"(rerun `vidlm demo --workdir {workdir}` to resume)", flush=True)
    return int(summary.get("exit_code", 0))
  if is_main:
    print(f"trained to step {summary['step']} (loss {summary.get('loss', float('nan')):.4f}) "
          f"in {t_train - t_start:.0f} s", flush=True)
  results = run_evaluators(trainer.cfg, workdir, trainer=trainer, step=int(summary["step"]))
  t_end = time.perf_counter()
  if not is_main:
    return 0
  table = format_table(results)
  timing = (f"wall time: {t_end - t_start:.0f} s (train incl. data generation and compile {t_train - t_start:.0f} s, "
            f"evaluate {t_end - t_train:.0f} s)")
  plots = plot_paths(results)
  report = table + "\nplots:\n" + "".join(f"  {p}\n" for p in plots) + timing + "\n"
  acc = target_exact(results)
  checked = config is None and not extra_argv
  status = 0
  if acc is not None:
    verdict = "met" if acc >= TARGET_EXACT else "MISSED"
    report += f"target: tier ({TARGET_TIER}) exact match at the training length {_pct(acc)} (>= " \
              f"{TARGET_EXACT:.0%}): {verdict}\n"
    if checked and acc < TARGET_EXACT:
      status = 1
  out = Path(workdir) / "eval" / "summary.txt"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(report)
  print("\n" + report + f"(this report: {out}; all results: {out.parent / 'results.json'})", flush=True)
  return status
