"""Long-context NIAVH on GPUs: 256-frame videos (4,224 tokens) with the flash kernel, evaluated out to 2,048
frames (32,896 tokens); the `:ring` variant trains at 1,024 frames (16,512 tokens) with ring attention over 8 GPUs.

Command (1 GPU, the default):
  pip install -e '.[gpu]'
  vidlm train --config experiments/long_context_gpu.py --workdir runs/long_gpu
  vidlm eval  --config experiments/long_context_gpu.py --workdir runs/long_gpu
Command (8 GPUs of one host, context parallel):
  vidlm train --config experiments/long_context_gpu.py:ring --workdir runs/long_ring
  vidlm eval  --config experiments/long_context_gpu.py:ring --workdir runs/long_ring
Smoke (any machine): append `:smoke` / `:ring_smoke` (8 frames of 64x64, 2 layers, 3 steps). Run here on the 2-core
  CPU on 2026-11-21 (attention through the kernels' interpret mode / ring over 8 fake devices with
  XLA_FLAGS=--xla_force_host_platform_device_count=8): train + eval took 63 s + 32 s (:smoke) and 50 s + 48 s
  (:ring_smoke), writing the full eval/ set. The full-size configs have not been run yet.

Hardware: default: one NVIDIA H100 or H200 (Hopper: the Mosaic GPU flash kernel). By estimate (not measured
  yet) it fits one 80 GB H100 with room to spare: ~32M parameters, bf16 activations of 16 x 4,224 tokens with
  `dots` remat, and evaluation at 8x = 32,896 tokens with batch 8 is forward only. `:ring`: 8 Hopper GPUs on one
  host (mesh seq=8; each GPU holds 1/8 of the 16,512 tokens; evaluation at 4x = 65,664 tokens). Disk: training
  examples compress to about 0.9 MB each (256 frames of 64x64, measured), so the default split is about 7 GB
  and the ring one (1,024 frames) about 14 GB of ArrayRecord shards under <workdir>/data; generation took
  0.03-0.05 s per 256-frame example on one core here, i.e. roughly 6 minutes for the default split, once.

Expected result (targets, not yet a measured run of this config): tier (a) exact match >= 90% at the training
  length and most of it kept at 2x; tiers (b) and (c) well above what the CPU demo reaches (the demo does not train
  on them); the heat maps show where length generalisation breaks down. Record measured numbers next to the
  command when a run is made.
"""

from vidlm.config import Config, MeshConfig, unknown_variant


def get_config(arg: str | None = None) -> Config:
  variant = arg or "default"
  if variant not in ("default", "ring", "smoke", "ring_smoke"):
    raise unknown_variant(__file__, arg, ("ring", "smoke", "ring_smoke"))
  ring = variant.startswith("ring")
  cfg = Config(name=f"long_context_gpu{'_ring' if ring else ''}")
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 512, 8, 8, 4, 64, 2048
  m.tubelet = (1, 16, 16)  # 16 tokens per 64x64 frame
  m.dtype, m.param_dtype, m.remat = "bfloat16", "float32", "dots"
  m.rope_theta = 1_000_000.0  # long RoPE wavelengths, as long-context LMs use (LWM: 1e7 at 1M tokens)
  d = cfg.data
  d.height, d.width, d.text_len = 64, 64, 128  # video tokens are a multiple of 128 and so is the text: kernel blocks
  d.tiers = ("a", "b", "c")
  d.num_eval = 256
  t = cfg.train
  t.lr, t.warmup_steps, t.grad_clip, t.log_every = 1e-3, 200, 1.0, 50
  cfg.checkpoint.every, cfg.checkpoint.keep = 500, 3
  a = cfg.attention
  e = cfg.eval
  e.evaluators = ("loss", "niavh", "ppl_vs_length")
  e.depths = tuple(i / 10 for i in range(11))
  e.seeds, e.tiers = 4, ("a", "b", "c")
  if not ring:
    cfg.mesh = MeshConfig(data=-1, fsdp=1, seq=1, tensor=1)
    a.kernel = "flash"
    d.frames, d.num_train = 256, 8192  # 4,096 video + 128 text = 4,224 tokens
    t.steps, t.batch_size = 6000, 16
    e.length_multipliers, e.batch_size = (1, 2, 4, 8), 8  # up to 2,048 frames = 32,896 tokens
  else:
    cfg.mesh = MeshConfig(data=1, fsdp=1, seq=-1, tensor=1)  # every GPU on the ring
    a.context_parallel, a.ring_layout = "ring", "zigzag"  # zigzag balances the causal work across the ring
    # hop blocks are N/16 tokens (16,512/16 = 1,032 here): the 128 text tokens keep them off the flash kernel's
    # 128-token tiles at every length, so the hops run dense XLA attention in bf16 (not the fp32 reference)
    a.kernel = "xla"
    d.frames, d.num_train = 1024, 4096  # 16,384 video + 128 text = 16,512 tokens (divisible by 2 x 8 chunks)
    t.steps, t.batch_size = 4000, 8
    e.length_multipliers, e.batch_size = (1, 2, 4), 2  # up to 4,096 frames = 65,664 tokens
  if variant.endswith("smoke"):
    m.num_layers, m.embed_dim, m.mlp_dim = 2, 128, 256
    d.frames, d.num_train, d.num_eval = 8, 32, 16  # 128 video + 128 text tokens
    t.steps, t.batch_size, t.warmup_steps, t.log_every = 3, 8 if not ring else 2, 1, 1
    cfg.checkpoint.every = 0
    e.length_multipliers, e.depths, e.seeds, e.batches = (1, 2), (0.0, 1.0), 1, 1
    e.batch_size = 8 if not ring else 2
  return cfg
