"""The long-video model of the main job: a MemoryBridgeLM trained on 8-frame NIAVH videos (tiers a, b, c) on CPU,
evaluated at 1x, 8x and 32x the training length (issue 12).

Command:  vidlm train --config experiments/memory_bridge.py --workdir runs/mb
          vidlm eval  --config experiments/memory_bridge.py --workdir runs/mb
Hardware: any CPU; sized for ~3-4 minutes of training on 2 quiet cores (the demo trains it beside the dense model).
Variant:  :smoke, a seconds-long run of the same path for tests.
Measured (2026-11-30, this config, 400 steps; shared 2-core CPU at load average ~12-13, so 950 s train wall; NIAVH
          5 depths x 10 seeds per cell, niavh_scoring=both: greedy decoding agreed with teacher forcing on every example):
            tier   1x (8 f)   8x (64 f)   32x (256 f)   128x (1024 f, 511 segments; teacher-forced only)
            a      100 %      100 %       100 %         100 %
            b        4 %        0 %         0 %           0 %
            c       56 %       46 %        52 %          56 %   (chance: 50 %)
          128x b and c: the same step-400 checkpoint of the demo run (runs/demo/memory_bridge), 2026-11-30,
          `vidlm eval --config experiments/memory_bridge.py --workdir <copy of it> --config.eval.length_multipliers=128
          --config.eval.tiers=b,c --config.eval.niavh_scoring=teacher_forced --config.eval.evaluators=niavh`, 50
          examples a tier, 1481 s on the shared 2-core CPU (load average 7-12).
          Tier (a) meets its targets (>= 90 % at 8x, >= 95 % at 32x). Tiers (b) and (c) miss theirs (>= 80 %): in this
          budget the model does not learn to read the 1-px 3x5 digits of (b)'s patch, nor (c)'s motion direction
          (at chance at every length), so what is missing is reading, not length generalisation.

Why these numbers: 8 frames of 32x32 with 8x8 tubelets (16 tokens per frame, as the dense demo). Segments of 4
frames every 2 frames (3 segments at 8 frames, 31 at 64, 127 at 256): every 3-frame motion needle lies whole in
one segment, and a longer video only adds segments. M = 8 memory tokens per segment form the bank the decoder reads
order-free, sharpened by log(#keys) (vidlm/models/memory_bridge.py explains why that generalises in length). One
per-frame block and (row, col) / slot-in-segment embeddings before the bridge: measured, without them tier (a)
trained alone reached 100 %, but mixed with (b) and (c) only 28 % at 1x after 400 steps (tier c at chance).

Why tiers (b) and (c) miss (measured 2026-11-30; the signal is there, the linear patch embedding does not learn to
read it, and a reader that can is slower than this CPU budget):
  * signal: at 32x32 the tier-(b) patch is 7x9 px with 1-px 3x5 digits, the tier-(c) marker 5x5 px stepping 4 px a
    frame (8 px over the needle, so its patch column always changes once), all inside one overlapping segment.
  * the whole model on one tier, 400 CPU steps (this recipe otherwise): tier (c) alone at chance (56 % / 46 % at
    1x / 8x; train loss stuck at ln 2 per answer); the same with tubelet (2, 8, 8) or with one segment block
    (`model.segment_layers=1`, tokens compare frames before the bridge) also at chance; tier (b) alone at chance
    (loss 1.57 = ln 10 per digit at step 100). Not a length problem and not the recurrence: the front end.
  * experiments/memory_bridge_probe.py trains the front end alone on the needle frames (finding the needle solved
    for it): with this model's linear 8x8 patch embedding it memorises the 4,096 training examples and stays at
    chance held out even after 3,200-3,500 GPU steps (b: 21-24 % first digit, chance 10 %; c: 47-48 %); with a
    conv stem (`model.patch_embed=conv`, layers/memory/stem.py: weights shared over positions) held-out accuracy is
    99-100 % on both tiers by step ~1,000-1,100 (one H200). So the fix is the tokenisation, and it needs more steps.
  * the whole model with the conv stem and a segment block, mixed tiers, 400 CPU steps at lr 3e-3: tier (a) 0 %,
    (b) 0 %, (c) 65 % at 1x (20 examples each): it learns nothing in this budget, and one step costs 2.8x the
    CPU time (1.48 vs 0.53 CPU-s at batch 32; stem_channels=16: 1.2x). The demo recipe keeps the linear
    embedding (tier a at 100 % to 128x); reading (b) and (c) needs the conv stem trained for thousands of steps,
    which is an accelerator's budget, not the 10-minute CPU demo's (a GPU run of the whole model was not made).
"""

from vidlm.config import Config, MeshConfig, apply_override, unknown_variant


def get_config(arg: str | None = None) -> Config:
  cfg = Config(name="memory_bridge")
  apply_override(cfg, "model.name", "memory_bridge")  # switches config.model to MemoryBridgeConfig
  cfg.mesh = MeshConfig(data=-1, fsdp=1, seq=1, tensor=1)
  m = cfg.model
  m.embed_dim, m.num_heads, m.head_dim, m.bridge_mlp_dim = 128, 4, 32, 256
  m.memory_tokens, m.segment_mode, m.segment_length, m.segment_stride = 8, "fixed", 4, 2
  m.frame_layers, m.position_embed = 1, True
  m.decoder_layers, m.decoder_mlp_dim, m.remat = 2, 384, "none"
  m.tubelet = (1, 8, 8)
  d = cfg.data
  d.frames, d.height, d.width, d.text_len = 8, 32, 32, 32
  # tiers cycle with the example index: half the examples are tier (a), the headline target, a quarter each b, c
  d.num_train, d.num_eval, d.tiers = 4096, 256, ("a", "b", "a", "c")
  t = cfg.train
  t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = 400, 32, 3e-3, 20, 25
  cfg.checkpoint.every = 100
  e = cfg.eval
  e.evaluators = ("loss", "niavh")
  e.length_multipliers, e.depths, e.seeds, e.tiers = (1, 8, 32), (0.0, 0.25, 0.5, 0.75, 1.0), 10, ("a", "b", "c")
  e.batch_size, e.batches = 16, 4
  if arg == "smoke":  # seconds-long variant for tests
    t.steps, t.batch_size, t.log_every, t.warmup_steps, d.num_train, d.num_eval = 4, 8, 1, 1, 64, 16
    cfg.checkpoint.every = 2
    m.embed_dim, m.head_dim, m.bridge_mlp_dim, m.decoder_mlp_dim, m.decoder_layers = 32, 8, 64, 64, 1
    m.memory_tokens, m.frame_layers = 4, 0
    e.batches, e.batch_size, e.length_multipliers, e.depths, e.seeds = 1, 8, (1, 2), (0.0, 1.0), 2
  elif arg is not None:
    raise unknown_variant(__file__, arg, ("smoke",))
  return cfg
