"""The main job's config: a tiny VideoLM trained on CPU to find full-frame needles (tier a).

Command:  make demo            (= vidlm demo --workdir runs/demo)
     or:  vidlm train --config experiments/demo.py --workdir runs/demo
Hardware: any CPU (2 cores suffice); finishes in under 10 minutes including evaluation.
Expected: exact match >= 90% on tier (a) at the training length (8 frames); longer lengths and tiers b/c are
reported as measured.
"""

from vidlm.config import Config, MeshConfig


def get_config(arg: str | None = None) -> Config:
  cfg = Config(name="demo")
  cfg.mesh = MeshConfig(data=-1, fsdp=1, seq=1, tensor=1)
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 128, 2, 4, 2, 32, 384
  m.tubelet = (1, 8, 8)
  d = cfg.data
  d.frames, d.height, d.width, d.text_len = 8, 32, 32, 48
  d.num_train, d.num_eval, d.tiers = 4096, 256, ("a",)
  t = cfg.train
  t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = 300, 32, 3e-3, 30, 25
  cfg.checkpoint.every = 100
  cfg.eval.evaluators = ("loss", "niavh", "ppl_vs_length")
  if arg == "smoke":  # seconds-long variant for tests and notebooks
    t.steps, t.batch_size, t.log_every, d.num_train, d.num_eval = 4, 8, 1, 64, 16
    cfg.checkpoint.every = 2
    cfg.eval.batches = 1
  return cfg
