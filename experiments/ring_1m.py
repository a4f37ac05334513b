"""~1.1B-parameter VideoLM trained at 1M tokens per example with ring attention on 4 GPUs.

Command (one host, 4x H200, 141 GB each):
  vidlm train --config experiments/ring_1m.py --workdir runs/ring_1m
Variants (`FILE.py:a,b`: comma-separated, any order, at most one attention variant):
  dense       the default: every layer dense (frame-causal video + causal text, our flash kernel per ring hop)
  moba        block-sparse MoBA in every layer: each 128-token q block keeps its own block and the top_k=528
              best-gated 128-token kv blocks, measured density 12.47 % of the tiles the frame-causal mask leaves
              visible (`vidlm.bench.train_step.attention_tiles`, exact: the count does not depend on the data)
  static      block-sparse fixed pattern in every layer: 1 sink block + its own block + window=528 blocks on each
              side (the causal mask drops the future side), no per-frame globals; density 12.51 %
  seq=N       N GPUs in the ring (same sequence, 1M / N tokens per device)
  smoke       shrinks everything so the same code path (ring + fsdp + remat + bf16 + the chosen sparsity) runs on 8
              fake CPU devices in seconds (blocks of 8 tokens there; moba top_k=2, static window=1)
  train       a short real training run (issue 14, run 4): 2 procedural long videos (tier a), a checkpoint every 2
              steps, held-out loss on 1 batch at the end; pick the step count with --config.train.steps
The block-sparse variants run the sparse ring (layers/ring/sparse.py): each hop computes only the listed tiles of the
travelling K/V chunk and skips hops with nothing listed; on GPU each hop runs the Mosaic GPU block-sparse kernels
(pallas_kernels/gpu/sparse_*.py). The config check passes them for 4 GPUs; no sparse ring has run on a GPU yet
(BENCHMARKS.md, "4xH200 runs (issue 14)").

Layout: mesh (data=1, fsdp=1, seq=4, tensor=1). Every attention layer is a zigzag ring over `seq` (262,144
tokens per GPU, causal work balanced across hops); weights, gradients and Adam moments are FSDP-sharded over
("fsdp", "seq"), so each GPU holds a quarter of them. Every layer is rematerialised except the attention
kernels' outputs (`remat=save_attention`): the backward pass reruns the projections and MLP but not the ring
forward. Kept per layer for the backward: the layer input and the attention output (1M x 2048 bf16 each,
1 GiB per GPU each).

Sequence: 4096 frames of 256x256 in 16x16 tubelets (256 tokens per frame) = 1,048,576 video tokens + 2048 text
tokens = 1,050,624 = 8208 blocks of 128. Zigzag stores runs of T / 8 = 131,328 tokens (1026 blocks of 128) per
device, so the sparsity blocks tile every run. Measured on 4x H200 (BENCHMARKS.md, "1M-token training step"):
dense 204.5-207.7 s per step, MFU 47.1-47.8%, peak 81-83 GiB per GPU. That peak does not fit 80 GB GPUs;
`--config.model.remat=full` saves 1 GiB per layer per GPU (~22 GiB) for 24% more step time (both measured on a
2-layer slice; the full model with it was not run).
"""

from vidlm.config import Config, MeshConfig, unknown_variant

KNOWN = ("dense", "moba", "static", "seq=N", "smoke", "train")
SPARSITY = {  # attention.sparsity per variant at 1M tokens (block 128): ~12.5 % of the visible tiles
  "moba": {"method": "moba", "top_k": 528},
  "static": {"method": "static", "sinks": 1, "window": 528, "frame_globals": 0},
}
SMOKE_SPARSITY = {"moba": {"top_k": 2}, "static": {"window": 1}}  # 192 tokens in blocks of 8 (24 x 24 tiles)


def _parts(arg: str | None) -> list[str]:
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  for p in parts:
    ok = p in KNOWN or (p.startswith("seq=") and p[4:].isdigit() and int(p[4:]) >= 1)
    if not ok:
      raise unknown_variant(__file__, arg, KNOWN)
  if sum(p in ("dense", "moba", "static") for p in parts) > 1:
    raise unknown_variant(__file__, arg, ("at most one of dense | moba | static, e.g. moba,smoke",))
  return parts


def get_config(arg: str | None = None) -> Config:
  parts = _parts(arg)
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
  sparse = next((p for p in parts if p in SPARSITY), None)
  if sparse:
    sp = cfg.attention.sparsity
    sp.block_q = sp.block_kv = 128
    sp.dense_layers = ()
    for key, value in SPARSITY[sparse].items():
      setattr(sp, key, value)
    cfg.name = f"ring_1m_{sparse}"
  if "train" in parts:  # run 4: a few real steps on procedural long videos, checkpointed and resumable
    # one 4096-frame video: 10.5 s to generate + 46 s to zlib its 805 MB of frames on a loaded 2-core CPU
    d.num_train, d.num_eval, d.tiers = 2, 1, ("a",)
    t.steps, t.warmup_steps, t.lr = 6, 2, 1e-3  # a short run: warm up fast so the loss moves within the steps
    t.progress_bar = False
    cfg.checkpoint.every, cfg.checkpoint.keep = 2, 2
    cfg.eval.every, cfg.eval.batches, cfg.eval.evaluators = 0, 1, ("loss",)
    cfg.name += "_train"
  for p in parts:
    if p.startswith("seq="):
      cfg.mesh.seq = int(p[4:])
  if "smoke" in parts:
    m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 64, 2, 4, 2, 16, 128
    m.tubelet, m.dtype = (1, 8, 8), "float32"
    d.frames, d.height, d.width, d.text_len, d.num_train, d.num_eval = 8, 32, 32, 64, 16, 4
    t.steps, t.batch_size, cfg.eval.batch_size = 2, 2, 2  # eval batches split over data=2 like training
    if "train" in parts:
      t.steps, t.warmup_steps = 4, 1
    cfg.mesh = MeshConfig(data=2, fsdp=1, seq=4, tensor=1)
    if sparse:  # zigzag over 4 stores runs of 192 / 8 = 24 tokens: blocks of 8 tile them and the 16-token frames
      sp = cfg.attention.sparsity
      sp.block_q = sp.block_kv = 8
      for key, value in SMOKE_SPARSITY[sparse].items():
        setattr(sp, key, value)
  return cfg
