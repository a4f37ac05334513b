"""Answer-text loss and perplexity against context length, plus the held-out `loss` evaluator.

`ppl_vs_length` scores `eval.batch_size * eval.batches` examples of the training distribution (the data config's
tiers, needles at random depths) at each length `data.frames * m`, m in `eval.length_multipliers`, from the
"ppl" seed stream. The loss is the mean cross-entropy per answer token (answer bytes and EOS, the tokens the
model is trained on), so it is directly comparable with the training loss at 1x. Writes
`<workdir>/eval/ppl_vs_length.json` and `ppl_vs_length.png`.
"""

from __future__ import annotations

import json
import math

from vidlm.eval import grid, plotting
from vidlm.eval.registry import EvalContext, register_evaluator
from vidlm.eval.scoring import summarise

SPLIT = "ppl"


@register_evaluator("loss", headline=(("exact_match", "exact_match"), ("token_accuracy", "token_accuracy"), ("loss", "loss")))
def held_out_loss(ctx: EvalContext) -> dict:
  """Held-out loss / token accuracy / exact match on the eval split at the training length (+ perplexity)."""
  out = ctx.trainer.evaluate_loss()
  out["ppl"] = math.exp(min(out["loss"], 700.0))
  return out


@register_evaluator("ppl_vs_length", headline=(("loss_{}x", "lengths[multiplier=*].loss"),))
def ppl_vs_length(ctx: EvalContext) -> dict:
  cfg = ctx.cfg
  lengths = grid.lengths(cfg)
  tiers = tuple(cfg.data.tiers)
  n = cfg.eval.batch_size * cfg.eval.batches
  for tier in tiers:
    for length in lengths:
      grid.check_tier(cfg, tier, length.frames, field="config.data.tiers")
  rows = []
  for length in lengths:
    examples = [
      grid.example(cfg, SPLIT, i, frames=length.frames, tier=tiers[i % len(tiers)], depth=None) for i in range(n)
    ]
    rows.append({**length.as_dict(), **summarise(ctx.scorer(examples))})
  result = {"tiers": list(tiers), "examples_per_length": n, "train_frames": cfg.data.frames, "lengths": rows}
  plot_path = ctx.out_dir / "ppl_vs_length.png"
  if ctx.is_main:
    train_tokens = next((r["tokens"] for r in rows if r["multiplier"] == 1), None)
    plotting.line_plot(
      plot_path,
      [r["tokens"] for r in rows],
      {f"tier{"s" if len(tiers) > 1 else ""} {",".join(tiers)}": [r["loss"] for r in rows]},
      xlabel="context length (tokens)",
      ylabel="answer loss (nats / token)",
      title=f"Text loss vs context length ({n} examples per length)",
      mark_x=train_tokens,
    )
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "ppl_vs_length.json").write_text(json.dumps({**result, "plot": str(plot_path)}, indent=1))
  result["plot"] = str(plot_path)
  return result
