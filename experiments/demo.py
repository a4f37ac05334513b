"""The main job's config: a tiny VideoLM trained on CPU to find full-frame needles (tier a) in 8-frame videos.

Command:  make demo            (= vidlm demo --workdir runs/demo: train, then evaluators loss / niavh / ppl_vs_length)
     or:  vidlm train --config experiments/demo.py --workdir runs/demo
          vidlm eval  --config experiments/demo.py --workdir runs/demo
Hardware: any CPU; on a 2-core machine the whole `make demo` finishes in under 10 minutes, including data generation
          and compilation (see the README's results section for a measured run).
Expected: exact match >= 90% on tier (a) at the training length (8 frames, 160 tokens). Tiers (b) and (c) are not
          trained here and the 2x/4x/8x lengths lie beyond the trained positions; both are reported as measured
          (experiments/long_context_gpu.py is where they are pushed).
Variant:  :smoke, a seconds-long run of the same path for tests (`vidlm demo --config experiments/demo.py:smoke`).

Why these numbers: 8 frames of 32x32 with 8x8 tubelets are 128 video tokens plus 32 text tokens; with batch 32 the
model reads the two needle digits reliably after ~75 steps, so 120 steps leave a margin while keeping a loaded
2-core machine inside the time budget. 32x32 is the smallest frame on which all three tiers can be generated
(tier b's code patch must stay within 10% of the frame).
"""

from vidlm.config import Config, MeshConfig, unknown_variant


def get_config(arg: str | None = None) -> Config:
  cfg = Config(name="demo")
  cfg.mesh = MeshConfig(data=-1, fsdp=1, seq=1, tensor=1)
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 128, 2, 4, 2, 32, 384
  m.tubelet = (1, 8, 8)
  d = cfg.data
  d.frames, d.height, d.width, d.text_len = 8, 32, 32, 32
  d.num_train, d.num_eval, d.tiers = 4096, 256, ("a",)
  t = cfg.train
  t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = 120, 32, 3e-3, 12, 20
  cfg.checkpoint.every = 40
  e = cfg.eval
  e.evaluators = ("loss", "niavh", "ppl_vs_length")
  e.length_multipliers, e.depths, e.seeds, e.tiers = (1, 2, 4, 8), (0.0, 0.25, 0.5, 0.75, 1.0), 10, ("a", "b", "c")
  e.batch_size, e.batches = 16, 4
  if arg == "smoke":  # seconds-long variant for tests and notebooks
    t.steps, t.batch_size, t.log_every, t.warmup_steps, d.num_train, d.num_eval = 4, 8, 1, 1, 64, 16
    cfg.checkpoint.every = 2
    e.batches, e.batch_size, e.length_multipliers, e.depths, e.seeds = 1, 8, (1, 2), (0.0, 1.0), 2
  elif arg is not None:
    raise unknown_variant(__file__, arg, ("smoke",))
  return cfg
