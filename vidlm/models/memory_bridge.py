"""MemoryBridgeLM: a VideoLLaMB-style recurrent video encoder with a small text decoder that reads its memories
(DESIGN section 5; reference/memory_streaming.md section 2; issue 12).

  frames -> tubelet tokens [B, T, P, E] -> segments [B, K, L*P, E] (fixed, optionally overlapping, or SceneTiling)
         -> `run_segments`: per segment, a bridge layer encodes [memory (M) ; segment tokens]; the new memory is
            written to a cache of all memories, and the retriever reads the cache to form the next segment's memory
            (a LEARNED initial memory; `nnx.scan` over segments with remat, so training backpropagates through all)
         -> bank = the cache of every segment's memory [B, K*M, E] (+ the final memory / last segment's outputs)
         -> decoder: causal self-attention over the text (1D RoPE), cross-attention onto the bank, SwiGLU.

Length-free by design, so a model trained on 8-frame videos runs on 1,000-frame ones:
  * nothing the decoder sees carries a segment index or an absolute time: the bank's keys have no positions (the
    read is order-free), and positions exist only within a segment (frame offset, row, column for the bridge's
    RoPE) and within the text. A longer video only adds memories to the bank.
  * K, the number of segments, is derived from the video length at call time (`model.max_segments=0`), so every
    length compiles its own static shapes; a padding segment (a fixed K larger than needed, or SceneTiling's
    variable count) leaves the carry untouched and its bank slots masked, so padding never changes a result.
  * the bank read sharpens with log(#keys) (`model.length_scaling`, layers/memory/reader.py): the needle memory
    that wins over a training video's keys keeps winning over 32x more keys of the same kind.
  * overlapping fixed segments (stride < length) keep every short event (the 3-frame motion needle of tier c)
    whole inside one segment, where the bridge sees its frames in order.
  * what a token may know of where it is is bounded by the frame and the segment: optional per-frame blocks
    (`frame_layers`) and learned (row, col) / slot-in-segment embeddings (`position_embed`), all seen in training.
  * the front end is optional in three ways: a conv patch embedding (`patch_embed=conv`, layers/memory/stem.py)
    that reads small patterns at any offset, segment blocks (`segment_layers`) that let tokens compare the frames of
    a segment before the bridge, and a per-row `frame_count` in the batch (the rest of the row is padding that no
    segment reads), so one static-shape batch trains on a variable number of segments in fixed mode too.

Generation: `prefill` encodes the video once and runs the prompt through the decoder into a KV cache over the
text; `decode_step` appends a token. The bank rides beside the text cache (`MemoryCache`), so greedy decoding
(`vidlm.infer.generate`) is the teacher-forced forward token by token.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import rope as rope_lib
from layers import scan
from layers.attention import Attention
from layers.block import DecoderBlock
from layers.cache import KVCache
from layers.embed import TokenEmbed, TubeletEmbed
from layers.memory import (
  BridgeLayer,
  ConvStem,
  MemoryReader,
  Retriever,
  run_segments,
  scene_tiling,
  segment_frame_table,
  strided_frame_table,
  strided_segment_count,
)
from layers.memory.stem import stem_patch_ok
from layers.mlp import SwiGLU
from layers.norm import RMSNorm
from pallas_kernels.layout import MaskSpec
from vidlm import config as config_lib
from vidlm.models import losses
from vidlm.models.registry import register_model
from vidlm.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SEGMENT_MODES = ("fixed", "scene")
DECODER_READS = ("cache", "cache+final", "cache+last")
PATCH_EMBEDS = ("linear", "conv")


@dataclasses.dataclass
class MemoryBridgeConfig(config_lib.ModelSection):
  """`config.model` for MemoryBridgeLM (`--config.model.name=memory_bridge`)."""

  name: str = "memory_bridge"
  embed_dim: int = 128
  num_heads: int = 4
  head_dim: int = 32
  bridge_mlp_dim: int = 256  # the bridge layer's GELU MLP
  # transformer blocks within each frame before segmentation (bidirectional over its tokens, 2D RoPE on (row, col)):
  # lets small details that straddle tubelets (tier b's code patch) be read before the bridge compresses them
  frame_layers: int = 0
  # learned embeddings of a token's (row, col) in its frame and of its frame's slot in its segment, added to the
  # tokens: values then carry where a token is (RoPE only shapes attention scores), which reading a motion's
  # direction needs. Both are bounded by the frame size and model.segment_length, so every one is seen in training
  position_embed: bool = False
  # transformer blocks over each segment's tokens (all its frames; bidirectional, 3D RoPE on (slot, row, col),
  # padded frames masked) between the slot embedding and the bridge: tokens compare frames before the bridge's one
  # layer compresses them into M memory tokens. Measured: without them the bridge does not learn tier (c)'s motion
  # direction (the memory's single read of the segment cannot compare two frames' marker positions);
  # experiments/memory_bridge.py
  segment_layers: int = 0
  vocab_size: int = 260
  tubelet: tuple[int, int, int] = (1, 8, 8)  # (frames, height, width) of one video token
  # how a frame becomes tokens: linear (one linear map of each tubelet, as VideoLM) | conv (layers/memory/stem.py:
  # strided 3x3 convolutions to the same token grid; needs tubelet (1, p, p), p a power of two). Measured: with
  # linear, small needles (tier b's 1-px digits, tier c's marker) are memorised, not read (chance held out)
  patch_embed: str = "linear"
  stem_channels: int = 32  # conv: channels of the first convolution (doubling at each stride-2 one)
  memory_tokens: int = 4  # M: memory tokens carried between segments and written to the bank per segment
  segment_mode: str = "fixed"  # fixed | scene (SceneTiling on per-frame pixels, threshold boundaries)
  # frames (tubelet time steps) per segment: fixed mode's length; scene mode's cap (longer scenes are sub-sampled
  # at integer linspace, both ends kept)
  segment_length: int = 4
  segment_stride: int = 2  # fixed mode: a segment starts every `segment_stride` frames (< segment_length: overlap)
  max_segments: int = 0  # K; 0 = derived from each video's length at call time (static per length)
  scene_min_length: int = 2  # scene mode: frames per segment at least (also sets K = ceil(frames / min_length))
  scene_threshold_std: float = 0.5  # scene mode: boundaries where depth > mean + std_factor * std
  decoder_layers: int = 2
  decoder_mlp_dim: int = 384
  decoder_reads: str = "cache"  # cache | cache+final (also the final memory) | cache+last (+ last segment's outputs)
  length_scaling: bool = True  # bank read sharpened by log(#keys) / log(#keys of a training video)
  rope_theta: float = 10_000.0
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  remat: str = "full"  # recurrence and decoder stack: none | full | dots | dots_no_batch | save_attention

  def check_values(self, cfg: config_lib.Config) -> None:
    from layers.scan import REMAT_POLICIES  # noqa: PLC0415
    from vidlm.config_checks import check_field as need  # noqa: PLC0415
    from vidlm.data import tokenizer  # noqa: PLC0415

    m = self
    for name in ("embed_dim", "num_heads", "head_dim", "bridge_mlp_dim", "memory_tokens", "segment_length",
                 "segment_stride", "scene_min_length", "decoder_layers", "decoder_mlp_dim"):
      v = getattr(m, name)
      need(isinstance(v, int) and v >= 1, f"model.{name}", v, "must be an integer >= 1")
    need(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (RoPE rotates pairs of channels)")
    need(m.vocab_size >= tokenizer.VOCAB_SIZE, "model.vocab_size", m.vocab_size,
         f"must be >= {tokenizer.VOCAB_SIZE} (256 bytes + PAD/BOS/EOS/SEP of the byte tokenizer)")
    need(m.segment_stride <= m.segment_length, "model.segment_stride", m.segment_stride,
         f"must be <= model.segment_length={m.segment_length} (a larger stride would skip frames)")
    for name in ("frame_layers", "segment_layers"):
      v = getattr(m, name)
      need(isinstance(v, int) and v >= 0, f"model.{name}", v, "must be an integer >= 0")
    need(isinstance(m.max_segments, int) and m.max_segments >= 0, "model.max_segments", m.max_segments,
         "must be 0 (derived from the video length) or a positive segment count")
    need(m.segment_mode in SEGMENT_MODES, "model.segment_mode", m.segment_mode, f"expected {' | '.join(SEGMENT_MODES)}")
    need(m.decoder_reads in DECODER_READS, "model.decoder_reads", m.decoder_reads,
         f"expected {' | '.join(DECODER_READS)}")
    need(isinstance(m.scene_threshold_std, int | float) and math.isfinite(m.scene_threshold_std),
         "model.scene_threshold_std", m.scene_threshold_std, "must be a finite number")
    need(isinstance(m.rope_theta, int | float) and math.isfinite(m.rope_theta) and m.rope_theta > 0,
         "model.rope_theta", m.rope_theta, "must be a positive number")
    need(m.dtype in _DTYPES, "model.dtype", m.dtype, "expected float32 | bfloat16")
    need(m.param_dtype in _DTYPES, "model.param_dtype", m.param_dtype, "expected float32 | bfloat16")
    need(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"expected {' | '.join(REMAT_POLICIES)}")
    need(len(m.tubelet) == 3 and all(isinstance(t, int) and t >= 1 for t in m.tubelet), "model.tubelet",
         m.tubelet, "expected three positive ints (t, h, w)")
    need(isinstance(m.length_scaling, bool), "model.length_scaling", m.length_scaling, "expected true or false")
    need(isinstance(m.position_embed, bool), "model.position_embed", m.position_embed, "expected true or false")
    need(m.patch_embed in PATCH_EMBEDS, "model.patch_embed", m.patch_embed, f"expected {' | '.join(PATCH_EMBEDS)}")
    need(isinstance(m.stem_channels, int) and m.stem_channels >= 1, "model.stem_channels", m.stem_channels,
         "must be an integer >= 1")
    if m.patch_embed == "conv":
      t, th, tw = m.tubelet
      need(t == 1 and th == tw and stem_patch_ok(th), "model.tubelet", m.tubelet,
           "must be (1, p, p) with p a power of two >= 2 for model.patch_embed=conv (the stem halves H and W per conv)")

  def validate(self, cfg: config_lib.Config, *, num_devices: int | None = None, platform: str | None = None) -> None:
    """Tubelet vs data shapes, the segment count at this length, and the attention settings this model has no
    path for (context parallelism, block sparsity: every sequence it attends over is one segment or the bank)."""
    from vidlm.config import ConfigError  # noqa: PLC0415

    m, d, a = self, cfg.data, cfg.attention
    for name, size, tub in zip(("frames", "height", "width"), (d.frames, d.height, d.width), m.tubelet):
      if size % tub:
        raise ConfigError(f"config.data.{name}={size} is not divisible by the tubelet size {tub} (model.tubelet)")
    if a.context_parallel != "none" or cfg.mesh.seq not in (1,):
      raise ConfigError("config.attention.context_parallel / config.mesh.seq: memory_bridge attends within one "
                        "segment at a time and does not split tokens over `seq`; use context_parallel=none, mesh.seq=1")
    if a.sparsity.method != "none":
      raise ConfigError(f"config.attention.sparsity.method={a.sparsity.method}: memory_bridge has no block-sparse "
                        "path (its attention spans are one segment or the memory bank); use method=none")
    frames = d.frames // m.tubelet[0]
    if m.max_segments and m.segment_mode == "fixed":
      need = strided_segment_count(frames, m.segment_length, m.segment_stride)
      if m.max_segments < need:
        raise ConfigError(
          f"config.model.max_segments={m.max_segments} cannot hold {frames} frames in segments of "
          f"{m.segment_length} every {m.segment_stride} (needs {need}); raise it or set 0 (derived from the length)"
        )

  def sequence_length(self, cfg: config_lib.Config) -> int:
    return config_lib.sequence_length(cfg)  # video tokens + text tokens read per example


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
  """How a video is cut (hashable: it sits in the model's graph definition, which jit caches key on)."""

  mode: str
  length: int
  stride: int
  max_segments: int
  min_length: int
  threshold_std: float

  @staticmethod
  def of(m: MemoryBridgeConfig) -> SegmentPlan:
    return SegmentPlan(m.segment_mode, m.segment_length, m.segment_stride, m.max_segments, m.scene_min_length,
                       float(m.scene_threshold_std))

  def derived_segments(self, frames: int) -> int:
    """The segments a video of `frames` tubelet time steps needs (fixed), or may need at most (scene)."""
    if self.mode == "fixed":
      return strided_segment_count(frames, self.length, self.stride)
    return max(1, -(-frames // self.min_length))

  def num_segments(self, frames: int) -> int:
    """K for a video of `frames` tubelet time steps: `max_segments`, or derived from the length when it is 0."""
    need = self.derived_segments(frames)
    if self.mode == "fixed" and self.max_segments and self.max_segments < need:
      raise ValueError(f"model.max_segments={self.max_segments} cannot hold {frames} frames (needs {need})")
    return self.max_segments or need


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MemoryCache:
  """What decoding carries: the decoder's KV cache over the text and the memory bank it reads every step."""

  kv: KVCache
  bank: jax.Array  # [B, S, E]
  bank_valid: jax.Array  # [B, S] bool


class ReadBlock(nnx.Module):
  """Pre-norm decoder block: x + self_attn(norm x) (causal, text RoPE); x + read(norm x, bank); x + mlp(norm x)."""

  def __init__(self, *, embed_dim, num_heads, head_dim, mlp_dim, kernel, length_scaling, reference_keys,
               rope_theta, dtype, param_dtype, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(embed_dim, param_dtype=param_dtype)
    self.attn = Attention(embed_dim, num_heads, num_heads, head_dim, kernel=kernel, rope_theta=rope_theta,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.read_norm = RMSNorm(embed_dim, param_dtype=param_dtype)
    self.read = MemoryReader(embed_dim, num_heads, head_dim, kernel=kernel, length_scaling=length_scaling,
                             reference_keys=reference_keys, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(embed_dim, param_dtype=param_dtype)
    self.mlp = SwiGLU(embed_dim, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, rope, bank, bank_valid, *, constrain, cache: KVCache | None = None, decode: bool = False):
    a = self.attn(self.attn_norm(x), rope, mask=MaskSpec.causal(), cache=cache, decode=decode)
    if cache is not None:
      a, cache = a
    x = constrain(x + a)
    x = constrain(x + self.read(self.read_norm(x), bank, bank_valid))
    x = constrain(x + self.mlp(self.mlp_norm(x)))
    return x, cache


class MemoryBridgeLM(nnx.Module):
  def __init__(self, cfg: config_lib.Config, *, rngs: nnx.Rngs):
    m, a = cfg.model, cfg.attention
    self.plan, self.decoder_reads = SegmentPlan.of(m), m.decoder_reads
    self.tubelet = tuple(m.tubelet)
    self._grid = tuple(config_lib.video_grid(cfg)[1:])  # (rows, cols) of tubelets per frame
    self.dtype, param_dtype = _DTYPES[m.dtype], _DTYPES[m.param_dtype]
    self.remat, self.head_dim, self.rope_theta = m.remat, m.head_dim, m.rope_theta
    self.num_heads, self.decoder_layers = m.num_heads, m.decoder_layers
    dt = dict(dtype=self.dtype, param_dtype=param_dtype)
    if m.patch_embed == "conv":
      self.video_embed = ConvStem(self.tubelet[1], m.stem_channels, m.embed_dim, rngs=rngs, **dt)
    else:
      self.video_embed = TubeletEmbed(self.tubelet, 3, m.embed_dim, rngs=rngs, **dt)
    self.text_embed = TokenEmbed(m.vocab_size, m.embed_dim, rngs=rngs, **dt)
    # learned initial memory; unit-scale and random so the M tokens start (and stay) distinct: they share the
    # bridge's position (0, 0, 0), and identical tokens would stay identical through every layer
    init = nnx.with_partitioning(nnx.initializers.normal(1.0), ("memory", "embed"))
    def encoder_blocks(n: int):  # n scanned blocks of the bridge's width (per-frame or per-segment attention)
      return scan.stack(
        lambda r: DecoderBlock(embed_dim=m.embed_dim, num_heads=m.num_heads, num_kv_heads=m.num_heads,
                               head_dim=m.head_dim, mlp_dim=m.bridge_mlp_dim, attention_kernel=a.kernel,
                               rope_theta=m.rope_theta, rngs=r, **dt),
        n, rngs,
      )

    self.frame_layers = m.frame_layers
    if m.frame_layers:
      self.frame_blocks = encoder_blocks(m.frame_layers)
    self.segment_layers = m.segment_layers
    if m.segment_layers:
      self.segment_blocks = encoder_blocks(m.segment_layers)
    self.position_embed = m.position_embed
    if m.position_embed:
      gh, gw = self._grid
      small = nnx.initializers.normal(0.02)
      small = nnx.with_partitioning(small, (None, "embed"))
      self.spatial_embed = nnx.Param(small(rngs.params(), (gh * gw, m.embed_dim), param_dtype))
      self.slot_embed = nnx.Param(small(rngs.params(), (m.segment_length, m.embed_dim), param_dtype))
    self.memory_init = nnx.Param(init(rngs.params(), (m.memory_tokens, m.embed_dim), param_dtype))
    self.bridge = BridgeLayer(m.embed_dim, m.num_heads, m.head_dim, m.bridge_mlp_dim, kernel=a.kernel,
                              rope_theta=m.rope_theta, rngs=rngs, **dt)
    self.retriever = Retriever(m.embed_dim, m.num_heads, m.head_dim, kernel=a.kernel, rngs=rngs, **dt)
    # the bank size of a training video (not of its padding): the reference of the read's log-length scaling
    reference_keys = self.plan.derived_segments(cfg.data.frames // self.tubelet[0]) * m.memory_tokens

    def make_block(r):
      return ReadBlock(embed_dim=m.embed_dim, num_heads=m.num_heads, head_dim=m.head_dim, mlp_dim=m.decoder_mlp_dim,
                       kernel=a.kernel, length_scaling=m.length_scaling, reference_keys=reference_keys,
                       rope_theta=m.rope_theta, rngs=r, **dt)

    self.blocks = scan.stack(make_block, m.decoder_layers, rngs)
    self.final_norm = RMSNorm(m.embed_dim, param_dtype=param_dtype)
    self.lm_head = nnx.Linear(
      m.embed_dim, m.vocab_size, use_bias=False, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "vocab")), rngs=rngs, **dt,
    )

  # ------------------------------------------------------------------ video -> memory bank

  def segments(self, frames: jax.Array, frame_count: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """frames [B, F, H, W, 3] -> (frame table [B, K, L] int32 over tubelet time steps, frame mask [B, K, L],
    segment valid [B, K]); K from the length (`SegmentPlan.num_segments`). frame_count [B] int32 (optional): each
    row's real frames (a multiple of the tubelet's time size), the rest padding that no segment reads, so a row
    gets the segments of its own length: a variable number of valid segments in one static-shape batch."""
    b, f = frames.shape[:2]
    t = f // self.tubelet[0]
    plan = self.plan
    k = plan.num_segments(t)
    steps = None if frame_count is None else jnp.asarray(frame_count, jnp.int32) // self.tubelet[0]
    if plan.mode == "fixed":
      return strided_frame_table(b, t, segment_length=plan.length, stride=plan.stride, max_segments=k,
                                 num_frames=steps)
    # SceneTiling on raw pixels (parameter-free, so boundaries do not move as the embedding trains)
    feats = frames.reshape(b, t, -1).astype(jnp.float32) / 127.5 - 1.0
    ids, count = scene_tiling(feats, steps, max_segments=k, min_length=plan.min_length, mode="threshold",
                              threshold_std=plan.threshold_std)
    return segment_frame_table(ids, count, max_segments=k, frames_per_segment=plan.length)

  def frame_tokens(self, frames: jax.Array) -> jax.Array:
    """frames [B, F, H, W, 3] -> per-frame tokens [B, T, P, E]: tubelet embedding, + (row, col) embedding with
    `position_embed`, then the per-frame blocks (`frame_layers`). Shared with streaming ingest
    (vidlm/infer/memory_stream.py), so a stream and a whole video compute the same tokens."""
    b, f, h, w, _ = frames.shape
    tt, th, tw = self.tubelet
    t, gh, gw = f // tt, h // th, w // tw
    p = gh * gw
    x = self.video_embed(frames)  # [B, T*P, E]
    e = x.shape[-1]
    if self.position_embed:  # (row, col) within the frame
      x = (x.reshape(b, t, p, e) + self.spatial_embed[...].astype(x.dtype)).reshape(b, t * p, e)
    if self.frame_layers:  # each frame on its own: [B*T, P, E], positions (0, row, col)
      hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
      fpos = np.stack([np.zeros_like(hh), hh, ww], -1).reshape(p, 3).astype(np.int32)
      residual = lambda y: constrain(y, ("batch", None, "embed"))

      def frame_body(block, y):
        return block(y, fpos, mask=MaskSpec.bidirectional(), constrain=residual)

      x = scan.apply(self.frame_blocks, residual(x.reshape(b * t, p, e)), frame_body, remat=self.remat)
    return constrain(x.reshape(b, t, p, e), ("batch", None, None, "embed"))

  def segment_tokens(self, tokens: jax.Array, frame_mask: jax.Array | None = None) -> jax.Array:
    """Segment tokens [B, K, L, P, E] -> the bridge's input tokens [B, K, L, P, E]: + the embedding of each
    frame's slot in its segment (`position_embed`), then the segment blocks (`segment_layers`), each segment on
    its own, its padded frames (frame_mask [B, K, L] False; None = all real) invisible to its real ones. Shared
    with streaming ingest (vidlm/infer/memory_stream.py)."""
    if self.position_embed:
      tokens = tokens + self.slot_embed[...].astype(tokens.dtype)[:, None]
    if not self.segment_layers:
      return tokens
    b, k, seg_len, p, e = tokens.shape
    gh, gw = self._grid
    if gh * gw != p:
      raise ValueError(f"memory_bridge segment blocks: {p} tokens per frame, the model was built for {gh}x{gw}")
    jj, hh, ww = np.meshgrid(np.arange(seg_len), np.arange(gh), np.arange(gw), indexing="ij")
    pos = np.stack([jj, hh, ww], -1).reshape(seg_len * p, 3).astype(np.int32)  # (slot, row, col)
    if frame_mask is None:
      ids = jnp.ones((b * k, seg_len * p), jnp.int32)
    else:  # real tokens see real ones; padded ones see padded ones (never an empty row, so no NaN to mask away)
      ids = jnp.repeat(frame_mask.reshape(b * k, seg_len), p, axis=1).astype(jnp.int32)
    residual = lambda y: constrain(y, ("batch", None, "embed"))

    def body(block, y):
      return block(y, pos, mask=MaskSpec.bidirectional(), segment_ids=(ids, ids), constrain=residual)

    x = scan.apply(self.segment_blocks, residual(tokens.reshape(b * k, seg_len * p, e)), body, remat=self.remat)
    return x.reshape(b, k, seg_len, p, e)

  def segment_inputs(self, frames: jax.Array, frame_count: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """frames [B, F, H, W, 3] -> the recurrence's inputs: (initial memory [B, M, E], segment tokens [B, K, L*P, E],
    token mask [B, K, L*P] bool, segment valid [B, K] bool, within-segment positions [B, K, L*P, 3] int32)."""
    b, f, h, w, _ = frames.shape
    tt, th, tw = self.tubelet
    gh, gw = h // th, w // tw
    p = gh * gw
    x = self.frame_tokens(frames)  # [B, T, P, E]
    e = x.shape[-1]
    table, fmask, valid = self.segments(frames, frame_count)  # [B, K, L], [B, K, L], [B, K]
    k, seg_len = table.shape[1:]
    tokens = jnp.take_along_axis(x, table.reshape(b, k * seg_len)[:, :, None, None], axis=1)  # [B, K*L, P, E]
    tokens = self.segment_tokens(tokens.reshape(b, k, seg_len, p, e), fmask)
    tokens = constrain(tokens.reshape(b, k, seg_len * p, e), ("batch", None, None, "embed"))
    token_mask = jnp.repeat(fmask, p, axis=2)  # [B, K, L*P]
    jj, hh, ww = np.meshgrid(np.arange(seg_len), np.arange(gh), np.arange(gw), indexing="ij")
    pos = np.stack([jj, hh, ww], -1).reshape(seg_len * p, 3).astype(np.int32)  # within-segment (frame, row, col)
    pos = jnp.broadcast_to(jnp.asarray(pos), (b, k, seg_len * p, 3))
    mem0 = jnp.broadcast_to(self.memory_init[...].astype(self.dtype), (b, *self.memory_init.shape))
    return mem0, tokens, token_mask, valid, pos

  def memory_bank(self, carry: tuple[jax.Array, jax.Array, jax.Array], outs: jax.Array,
                  token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The recurrence's final carry (memory [B, M, E], cache [B, K, M, E], count [B]) and segment outputs
    [B, K, N, E] -> (bank [B, S, E], bank_valid [B, S] bool): every segment's memory (cache order = segment order,
    but the decoder reads it order-free), plus the `decoder_reads` extras."""
    final, cache, count = carry
    b, k, mm, e = cache.shape
    bank = cache.reshape(b, k * mm, e)
    bank_valid = jnp.repeat(jnp.arange(k)[None, :] < count[:, None], mm, axis=1)  # [B, K*M]
    if self.decoder_reads == "cache+final":
      bank = jnp.concatenate([bank, final], axis=1)
      bank_valid = jnp.concatenate([bank_valid, jnp.ones((b, mm), bool)], axis=1)
    elif self.decoder_reads == "cache+last":
      last = jnp.maximum(count - 1, 0)  # the last valid segment of each row
      out_last = jnp.take_along_axis(outs, last[:, None, None, None], axis=1)[:, 0]  # [B, N, E]
      mask_last = jnp.take_along_axis(token_mask, last[:, None, None], axis=1)[:, 0]
      bank = jnp.concatenate([bank, out_last], axis=1)
      bank_valid = jnp.concatenate([bank_valid, mask_last], axis=1)
    return constrain(bank, ("batch", None, "embed")), bank_valid

  def encode(self, frames: jax.Array, frame_count: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """frames [B, F, H, W, 3] -> (bank [B, S, E], bank_valid [B, S] bool): segment, recur, collect."""
    mem0, tokens, token_mask, valid, pos = self.segment_inputs(frames, frame_count)
    carry, (_, outs) = run_segments(self.bridge, self.retriever, mem0, tokens, token_mask, valid, pos,
                                    remat=self.remat)
    return self.memory_bank(carry, outs, token_mask)

  # ------------------------------------------------------------------ decoder

  def _decode_text(self, tokens, positions, bank, bank_valid, *, cache: KVCache | None = None, decode=False):
    """tokens [B, N] at positions [N | B,N, 3] -> (logits float32 [B, N, V], cache): the decoder stack (one
    `nnx.scan` over layers; a stacked cache's k/v scanned beside the weights)."""
    x = constrain(self.text_embed(tokens), ("batch", None, "embed"))
    rope = rope_lib.tables(positions, self.head_dim, self.rope_theta)
    residual = lambda y: constrain(y, ("batch", None, "embed"))
    if cache is None:

      def body(block, y):
        return block(y, rope, bank, bank_valid, constrain=residual)[0]

      x = scan.apply(self.blocks, x, body, remat=self.remat)
    else:

      def cached_body(block, y, kv):
        layer_cache = dataclasses.replace(cache, k=kv[0], v=kv[1])
        y, layer_cache = block(y, rope, bank, bank_valid, constrain=residual, cache=layer_cache, decode=decode)
        return y, (layer_cache.k, layer_cache.v)

      x, (k, v) = scan.apply_with_xs(self.blocks, x, (cache.k, cache.v), cached_body)
      cache = dataclasses.replace(cache, k=k, v=v)
    return self.lm_head(self.final_norm(x)).astype(jnp.float32), cache

  def read(self, tokens: jax.Array, bank: jax.Array, bank_valid: jax.Array) -> jax.Array:
    """tokens int32 [B, L] reading bank [B, S, E] -> text logits float32 [B, L, V] (teacher-forced decoder)."""
    return self._decode_text(tokens, np.arange(tokens.shape[1]), bank, bank_valid)[0]

  def __call__(self, frames: jax.Array, tokens: jax.Array, frame_count: jax.Array | None = None) -> jax.Array:
    """frames uint8/float [B, F, H, W, 3], tokens int32 [B, L] -> text logits float32 [B, L, V]."""
    return self.read(tokens, *self.encode(frames, frame_count))

  def prefill(self, frames: jax.Array, prompt: jax.Array, *, prompt_lengths: jax.Array | None = None,
              max_new_tokens: int = 64) -> tuple[jax.Array, MemoryCache]:
    """Encode the video, run prompt [B, P] through the decoder into a fresh text KV cache of P + max_new_tokens
    slots -> (text logits float32 [B, P, V], MemoryCache). Right-padded prompts: `prompt_lengths` [B]."""
    b, p = prompt.shape
    bank, bank_valid = self.encode(frames)
    cache = KVCache.init(b, p + max_new_tokens, self.num_heads, self.head_dim, num_layers=self.decoder_layers,
                         dtype=self.dtype, mask=MaskSpec.causal())
    pos = jnp.broadcast_to(rope_lib.text_positions(0, p), (b, p, 3))
    lengths = p if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    # the padding of short prompts is written but not counted: the next token goes to (and is positioned at) the
    # row's own prompt length
    cache = cache.record(pos, jnp.broadcast_to(jnp.arange(p), (b, p)), lengths).sharded()
    logits, cache = self._decode_text(prompt, pos, bank, bank_valid, cache=cache)
    return logits, MemoryCache(cache.advance(), bank, bank_valid)

  def decode_step(self, token: jax.Array, cache: MemoryCache) -> tuple[jax.Array, MemoryCache]:
    """token int32 [B] (or [B, 1]) appended at each row's next text position -> (logits float32 [B, V], cache)."""
    token = token.reshape(-1, 1)
    kv = cache.kv
    pos = kv.next_position()[:, None]  # [B, 1, 3]
    kv = kv.record(pos, kv.next_seq_index()[:, None]).sharded()
    logits, kv = self._decode_text(token, pos, cache.bank, cache.bank_valid, cache=kv, decode=True)
    return logits[:, 0], dataclasses.replace(cache, kv=kv.advance())

  def loss(self, batch: dict[str, jax.Array], *, per_example: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy on the answer tokens (`losses.answer_loss`). Reads frames and the text
    arrays, and an optional `frame_count` [B] int32 (each row's real frames, the rest padding: training on a
    variable number of segments); segmentation is the model's own (the batch's cut_frames are ground truth for
    tests, not an input)."""
    logits = self(batch["frames"], batch["tokens"], batch.get("frame_count"))
    return losses.answer_loss(logits, batch, per_example=per_example)

  summarise = staticmethod(losses.summarise_answer)


@register_model("memory_bridge", config=MemoryBridgeConfig)
def _build(cfg: config_lib.Config, *, rngs: nnx.Rngs) -> MemoryBridgeLM:
  return MemoryBridgeLM(cfg, rngs=rngs)
