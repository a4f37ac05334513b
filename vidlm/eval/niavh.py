"""Needle in a video haystack: exact match over a grid of context lengths x needle depths x seeds, per tier.

Protocol (memory_streaming.md section 3, scaled to the demo): for each tier in `eval.tiers`, each length
`data.frames * m` for m in `eval.length_multipliers`, each depth in `eval.depths` and seeds 0..`eval.seeds`-1,
example `seed` of the "niavh" split is generated with its (first asked) needle pinned at
round((F - needle_len) * depth). The haystack depends on (seed, length, tier) but not on the depth, so a row of
the heat map moves one needle through one video, as in LWM's and MM-NIAVH's grids. Scoring is exact match of the
whole answer, `eval.niavh_scoring`: teacher_forced (argmax of one forward pass, greedy-equivalent, see scoring.py),
generate (real greedy decoding with a KV cache, `vidlm.infer.generate`) or both (the default: the headline stays
the teacher-forced score, the generated one is reported beside it under `generate`, with `agreement`, the fraction
of examples on which the two verdicts and matched-prefix lengths agree; they should all agree).

Writes `<workdir>/eval/niavh.json` and one heat map per tier, `<workdir>/eval/niavh_<tier>.png`
(rows = depth, columns = context length, colour = exact match over seeds).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from vidlm import config as config_lib
from vidlm.data import procedural
from vidlm.eval import grid, plotting
from vidlm.eval.registry import EvalContext, register_evaluator

log = logging.getLogger(__name__)
SPLIT = "niavh"  # its own seed stream: never the train or eval split's examples
SCORINGS = ("teacher_forced", "generate", "both")
_SCORING_TEXT = {
  "teacher_forced": "exact match of the whole answer (teacher-forced argmax == greedy decoding)",
  "generate": "exact match of the whole answer by greedy decoding with a KV cache",
  "both": "exact match of the whole answer: teacher-forced argmax (headline) and greedy decoding with a KV cache "
  "(under 'generate'), compared example by example",
}


def _check_depths(depths) -> tuple[float, ...]:
  depths = tuple(float(x) for x in depths)
  if not depths or any(not 0.0 <= x <= 1.0 for x in depths):
    raise config_lib.ConfigError(f"config.eval.depths: expected values in [0, 1], got {depths}")
  return depths


# headline (a sweep table's columns): per tier, exact match at each length multiplier and over the whole grid
@register_evaluator("niavh", headline=(
  ("{}_{}x", "tiers.*.by_multiplier.*"), ("{}_mean", "tiers.*.mean"),
  ("{}_generate_mean", "tiers.*.generate.mean"), ("{}_agreement", "tiers.*.generate.agreement"),
))
def evaluate(ctx: EvalContext) -> dict:
  """Returns the JSON written to niavh.json (see module docstring); accuracies are fractions in [0, 1]."""
  cfg, e = ctx.cfg, ctx.cfg.eval
  lengths = grid.lengths(cfg)
  depths = _check_depths(e.depths)
  if e.seeds < 1:
    raise config_lib.ConfigError(f"config.eval.seeds must be >= 1, got {e.seeds}")
  scoring = e.niavh_scoring
  if scoring not in SCORINGS:
    raise config_lib.ConfigError(f"config.eval.niavh_scoring: {scoring!r}; expected one of {' | '.join(SCORINGS)}")
  sparse = cfg.attention.sparsity.method != "none"
  if sparse and scoring == "generate":
    raise config_lib.ConfigError(
      f"config.eval.niavh_scoring=generate: decoding with a KV cache has no block-sparse path yet "
      f"(attention.sparsity.method={cfg.attention.sparsity.method}); use eval.niavh_scoring=teacher_forced"
    )
  if sparse and scoring == "both":  # score what can be scored, and say so in the output
    scoring = "teacher_forced"
    log.warning("niavh: attention.sparsity.method=%s has no cached decode path yet: teacher-forced scoring only",
                cfg.attention.sparsity.method)
  tiers = tuple(e.tiers)
  if not tiers:
    raise config_lib.ConfigError("config.eval.tiers: empty; expected some of a, b, c")
  for tier in tiers:
    for length in lengths:
      grid.check_tier(cfg, tier, length.frames)

  result = {
    "protocol": {
      "split_seed": procedural.split_seed(cfg.data.seed, SPLIT),
      "seeds": int(e.seeds),
      "num_needles": cfg.data.num_needles,
      "num_asked": cfg.data.num_asked,
      "train_frames": cfg.data.frames,
      "scoring": _SCORING_TEXT[scoring],
      "niavh_scoring": scoring,  # as run (both -> teacher_forced for block-sparse models, see above)
    },
    "lengths": [length.as_dict() for length in lengths],
    "depths": list(depths),
    "tiers": {},
    "cells": [],
  }
  for tier in tiers:
    acc = np.zeros((len(depths), len(lengths)))
    gen_acc, agree = np.zeros_like(acc), np.zeros_like(acc)
    t0 = time.perf_counter()
    for j, length in enumerate(lengths):
      examples = [
        grid.example(cfg, SPLIT, s, frames=length.frames, tier=tier, depth=depth)
        for depth in depths
        for s in range(e.seeds)
      ]
      shape = (len(depths), e.seeds)
      scores = ctx.scorer(examples) if scoring != "generate" else None
      generated = ctx.scorer.generate(examples) if scoring != "teacher_forced" else None
      exact = (scores or generated)["exact"].reshape(shape)
      acc[:, j] = exact.mean(axis=1)
      if generated is not None:
        gen_exact = generated["exact"].reshape(shape)
        gen_acc[:, j] = gen_exact.mean(axis=1)
      if scores is not None and generated is not None:
        same = (scores["exact"] == generated["exact"]) & (scores["prefix"] == generated["prefix"])
        agree[:, j] = same.reshape(shape).mean(axis=1)
      for i, depth in enumerate(depths):
        cell = {
          "tier": tier,
          "multiplier": length.multiplier,
          "frames": length.frames,
          "tokens": length.tokens,
          "depth": depth,
          "correct": int(exact[i].sum()),
          "total": int(e.seeds),
          "accuracy": float(acc[i, j]),
        }
        if scores is not None:
          loss = scores["loss_sum"].reshape(shape) / np.maximum(scores["weight"].reshape(shape), 1.0)
          cell["loss"] = float(loss[i].mean())
        if generated is not None:
          cell["generate_correct"] = int(gen_exact[i].sum())
        if scoring == "both":
          cell["agreement"] = float(agree[i, j])
        result["cells"].append(cell)
    per_depth = acc.mean(axis=1)  # [depths], averaged over lengths
    heatmap_path = ctx.out_dir / f"niavh_{tier}.png"
    if ctx.is_main:
      plotting.heatmap(
        heatmap_path,
        acc,
        row_labels=[f"{d:.0%}" for d in depths],
        col_labels=[f"{x.frames}f\n{x.tokens} tok" for x in lengths],
        xlabel="context length (frames / tokens)",
        ylabel="needle depth",
        title=f"NIAVH tier ({tier}): exact match, {e.seeds} seeds per cell (trained at {cfg.data.frames} frames)",
      )
    result["tiers"][tier] = {
      "accuracy": acc.tolist(),  # [depth][length]
      "mean": float(acc.mean()),
      "worst_depth": float(per_depth.min()),
      "worst_depth_at": depths[int(per_depth.argmin())],
      "mean_by_length": acc.mean(axis=0).tolist(),
      "by_multiplier": {str(x.multiplier): float(acc[:, j].mean()) for j, x in enumerate(lengths)},
      "worst_depth_by_length": acc.min(axis=0).tolist(),
      "heatmap": str(heatmap_path),
      "seconds": time.perf_counter() - t0,
    }
    if scoring == "both":  # the headline above is teacher-forced; greedy decoding's score beside it
      result["tiers"][tier]["generate"] = {
        "accuracy": gen_acc.tolist(),
        "mean": float(gen_acc.mean()),
        "by_multiplier": {str(x.multiplier): float(gen_acc[:, j].mean()) for j, x in enumerate(lengths)},
        "agreement": float(agree.mean()),  # fraction of examples whose verdicts and matched prefixes agree
      }
  if ctx.is_main:
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "niavh.json").write_text(json.dumps(result, indent=1))
  return result
