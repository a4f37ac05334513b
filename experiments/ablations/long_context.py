"""Long-context ablation (issue 12 item 3): which model trained at 8 frames still finds the needle at 8x-128x the
length: the dense VideoLM, the dense VideoLM with each position trick, and the memory-bridge model.

Command:  vidlm sweep --config experiments/ablations/long_context.py --workdir runs/ablate_long_context
          (add `--variants dense,dense_random` to run a subset; rerunning skips the finished variants;
          on a CPU add `--config.eval.length_multipliers=1,2,8,32`: 128x is 1,024 frames = 16,416 tokens, and
          the dense model's forward there took 268 s per example at batch 1 and 9.1 GB of host memory on the
          shared 2-core CPU, so 128x is for an accelerator)
Hardware: any CPU (see above for 128x). Every variant trains from scratch, then is evaluated on NIAVH.
Expected: the dense baseline answers ~100 % at 1x and ~0 beyond (its text and frame positions past 8 frames
          were never trained); the question is which trick changes that (no expectation asserted: this is what
          the sweep measures). Measured 2026-11-30 (README, "Ablation: length generalisation"; CPU sweep at
          1x/2x/8x/32x, 128x from the same checkpoints on one H200), NIAVH tier (a), 12 examples a length:
            dense              100 / 0 / 0 / 0 / 0 %      (1x / 2x / 8x / 32x / 128x)
            dense_random        33 / 17 / 0 / 8 / 0 %     (task half learnt at 120 steps)
            dense_shift        100 / 42 / 75 / 8 / 0 %
            dense_interp       100 / 100 / 100 / 100 / 50 %   (76 % at 128x, 50 % at 256x over 50 examples)
            dense_long           100 / 0 / 0 / 0 / 8 %
            dense_random_long   92 / 75 / 83 / 83 %, 128x 3 of 3 (CPU, 3 examples only)
          tiers (b) and (c): 0 % for every dense variant (never trained by the demo recipe).
          mb_fixed / mb_scene (CPU sweep at 1x / 8x / 32x, `--variants mb_fixed,mb_scene
          --config.eval.length_multipliers=1,8,32`, 15 min 17 s on the shared 2-core CPU, 2026-11-30):
            mb_fixed           a 100 / 100 / 100 %   b 17 / 0 / 0 %   c 67 / 25 / 67 %   (held-out exact match 56 %)
            mb_scene           a 100 / 100 / 100 %   b  0 / 0 / 0 %   c 67 / 33 / 67 %   (held-out exact match 56 %)
          (tier c: 12 examples a cell around chance, 50 %; experiments/memory_bridge.py says why b and c miss)
Variant:  :smoke, a seconds-long version of the same sweep (4 steps, lengths 1x and 2x, tier a; no accuracy
          expectation), to check the path (tests/vidlm/test_ablation_long_context.py validates every variant).

Variants (VideoLMConfig.train_positions / max_train_position / eval_positions, layers/rope.py):
  dense           experiments/demo.py's model and recipe unchanged (120 steps, tier (a), frame t = 0..7)
  dense_random    randomised positions (Ruoss et al. 2023): each training example's 8 frames sit at a sorted
                  random subset of [0, 1024) (h, w unchanged, text after the last frame as always); evaluation
                  contiguous. 1024 = the frames of the 128x length, so every evaluated position was trained.
  dense_shift     a random shift: the 8 frames contiguous at o..o+7, o uniform in [0, 1016]; evaluation contiguous
  dense_interp    trained as dense; evaluation scales a longer video's t into the trained [0, 8) (position
                  interpolation on the time axis, no fine-tuning), text where training put it (from 8 on)
  dense_long      dense trained 3x longer (360 steps), and dense_random trained 360 steps: at 120 steps random
  dense_random_long   positions leave the task half learnt (train exact match ~47 %), so this separates the trick
                  from the budget
  mb_fixed        MemoryBridgeLM with experiments/memory_bridge.py's model and training recipe (its steps, tiers
  mb_scene        a, b, c): fixed 4-frame segments every 2 frames / SceneTiling segments (segment_mode=scene)

The base is experiments/demo.py's config (8-frame 32x32 videos, 16 tokens a frame + 32 text = 160 tokens), with
the evaluation every tier at 1x, 8x, 32x and 128x the training length, needle depths 0 / 0.5 / 1 and 4 seeds
(12 examples a cell column), scored teacher-forced (exact match of the whole answer, greedy-equivalent), batch 4.
"""

from __future__ import annotations

import dataclasses

from experiments.demo import get_config as demo_config
from experiments.memory_bridge import get_config as memory_bridge_config
from vidlm.config import Config, unknown_variant

VARIANTS = (None, "smoke")
LONG = 3  # the *_long variants train LONG x the base's steps (360; random positions learn the task more slowly)
MAX_TRAIN_POSITION = 1024  # frame positions random / shift draw from: the 128x length's 8 x 128 frames
MEMORY_BRIDGE_TRAIN = ("steps", "lr", "warmup_steps", "batch_size")  # its recipe's train fields the variants take


def _check(arg: str | None) -> None:
  if arg not in VARIANTS:
    raise unknown_variant(__file__, arg, ("smoke",))


def get_config(arg: str | None = None) -> Config:
  _check(arg)
  cfg = demo_config("smoke" if arg == "smoke" else None)
  cfg.name = "ablate_long_context"
  e = cfg.eval
  e.evaluators = ("loss", "niavh")
  e.niavh_scoring = "teacher_forced"
  e.tiers, e.length_multipliers = ("a", "b", "c"), (1, 8, 32, 128)
  e.depths, e.seeds, e.batch_size = (0.0, 0.5, 1.0), 4, 4
  if arg == "smoke":
    e.tiers, e.length_multipliers, e.depths, e.seeds = ("a",), (1, 2), (0.0, 1.0), 2
  cfg.checkpoint.every = 0  # only the final checkpoint: the sweep evaluates it
  return cfg


def _memory_bridge(arg: str | None, segment_mode: str) -> dict:
  """Overrides that turn the base into experiments/memory_bridge.py's model and training recipe (model section,
  training tiers and the train fields in MEMORY_BRIDGE_TRAIN), with the given segment mode."""
  mb = memory_bridge_config("smoke" if arg == "smoke" else None)
  out: dict = {"model.name": mb.model.name}
  for f in dataclasses.fields(mb.model):
    if f.name != "name":
      out[f"model.{f.name}"] = getattr(mb.model, f.name)
  out["model.segment_mode"] = segment_mode
  out["data.tiers"] = mb.data.tiers
  for name in MEMORY_BRIDGE_TRAIN:
    out[f"train.{name}"] = getattr(mb.train, name)
  return out


def get_sweep(arg: str | None = None) -> dict[str, dict]:
  """variant -> overrides (applied to get_config(arg)): the dense baseline, one variant per position trick, then the
  memory-bridge model with fixed and SceneTiling segments."""
  _check(arg)
  trained = {"model.max_train_position": MAX_TRAIN_POSITION}
  long = {"train.steps": LONG * get_config(arg).train.steps}
  return {
    "dense": {},
    "dense_random": {"model.train_positions": "random", **trained},
    "dense_shift": {"model.train_positions": "shift", **trained},
    "dense_interp": {"model.eval_positions": "interpolate"},
    "dense_long": long,
    "dense_random_long": {"model.train_positions": "random", **trained, **long},
    "mb_fixed": _memory_bridge(arg, "fixed"),
    "mb_scene": _memory_bridge(arg, "scene"),
  }
