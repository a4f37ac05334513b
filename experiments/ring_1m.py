"""~1.1B-parameter VideoLM trained at 1M tokens per example with ring attention on 4 GPUs.

Command (one host, 4x H200, 141 GB each):
  vidlm train --config experiments/ring_1m.py --workdir runs/ring_1m
Variants: `:seq=8` for 8 GPUs (same sequence, half the tokens per device); `:smoke` shrinks everything so the
same code path (ring + fsdp + remat + bf16) runs on 8 fake CPU devices in seconds.

Layout: mesh (data=1, fsdp=1, seq=4, tensor=1). Every attention layer is a zigzag ring over `seq` (262,144
tokens per GPU, causal work balanced across hops); weights, gradients and Adam moments are FSDP-sharded over
("fsdp", "seq"), so each GPU holds a quarter of them. Every layer is rematerialised except the attention
kernels' outputs (`remat=save_attention`): the backward pass reruns the projections and MLP but not the ring
forward. Kept per layer for the backward: the layer input and the attention output (1M x 2048 bf16 each,
1 GiB per GPU each).

Sequence: 4096 frames of 256x256 in 16x16 tubelets (256 tokens per frame) = 1,048,576 video tokens + 2048 text
tokens. Measured on 4x H200 (BENCHMARKS.md, "1M-token training step"): 204.5-207.7 s per step, MFU 47.1-47.8%,
peak 81-83 GiB per GPU. That peak does not fit 80 GB GPUs; `--config.model.remat=full` saves 1 GiB per layer per GPU
(~22 GiB) for 24% more step time (both measured on a 2-layer slice; the full model with it was not run).
"""

from vidlm.config import Config, MeshConfig, unknown_variant


def get_config(arg: str | None = None) -> Config:
  cfg = Config(name="ring_1m")
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2048, 24, 16, 4, 128, 5632
  m.tubelet, m.dtype, m.param_dtype, m.remat = (1, 16, 16), "bfloat16", "float32", "save_attention"
  m.rope_theta = 10_000_000.0  # long context: LWM uses 1e7 at 1M tokens
  cfg.attention.context_parallel, cfg.attention.ring_layout = "ring", "zigzag"
  cfg.mesh = MeshConfig(data=1, fsdp=1, seq=4, tensor=1)
  d = cfg.data
  # 2048 text tokens keep every zigzag half-chunk (T / 8) a multiple of the GPU kernel's 256-row q tiles
  d.frames, d.height, d.width, d.text_len = 4096, 256, 256, 2048
  d.num_train, d.num_eval, d.tiers = 256, 16, ("a", "b", "c")
  t = cfg.train
  t.steps, t.batch_size, t.lr, t.warmup_steps, t.log_every = 1000, 1, 3e-4, 50, 1
  cfg.checkpoint.every = 50
  cfg.eval.batch_size = 1
  if arg and arg.startswith("seq="):
    if not arg[4:].isdigit() or int(arg[4:]) < 1:
      raise unknown_variant(__file__, arg, ("seq=N (N a positive int)", "smoke"))
    cfg.mesh.seq = int(arg[4:])
  elif arg == "smoke":
    m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 64, 2, 4, 2, 16, 128
    m.tubelet, m.dtype = (1, 8, 8), "float32"
    d.frames, d.height, d.width, d.text_len, d.num_train, d.num_eval = 8, 32, 32, 64, 16, 4
    t.steps, t.batch_size, cfg.eval.batch_size = 2, 2, 2  # eval batches split over data=2 like training
    cfg.mesh = MeshConfig(data=2, fsdp=1, seq=4, tensor=1)
  elif arg:
    raise unknown_variant(__file__, arg, ("seq=N", "smoke"))
  return cfg
