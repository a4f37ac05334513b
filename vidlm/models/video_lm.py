"""VideoLM: a decoder-only video-language model (LWM-style), DESIGN section 5.

Sequence = video tokens (tubelet patch embeddings, 3D RoPE over t/h/w) followed by text tokens (byte-level,
1D RoPE). Video attends frame-causally (a token sees its own frame and earlier ones), text causally over
everything before it. Logits are produced for the text positions only; the loss (`VideoLM.loss`,
vidlm/models/losses.py) is taken on answer tokens. The model's config section is `VideoLMConfig` below.

With ring attention the tokens are stored in the ring layout's order (zigzag, frame-striped, ...): the
embeddings and RoPE tables are permuted once after embedding and the text hidden states gathered back
before the head, so the mask spec keeps describing original positions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import rope as rope_lib
from layers import scan, token_drop
from layers.attention import Ring, storage_order
from layers.block import DecoderBlock
from layers.cache import KVCache
from layers.embed import TokenEmbed, TubeletEmbed
from layers.norm import RMSNorm
from layers.sparse import make_selector
from pallas_kernels.layout import MaskSpec
from vidlm import config as config_lib
from vidlm.models import losses
from vidlm.models.registry import register_model
from vidlm.models.video_lm_stream import StreamingMixin
from vidlm.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TRAIN_POSITIONS = ("contiguous", "random", "shift")
EVAL_POSITIONS = ("contiguous", "interpolate")


@dataclasses.dataclass
class VideoLMConfig(config_lib.ModelSection):
  """`config.model` for VideoLM (`vidlm.config.ModelConfig` is this class)."""

  name: str = "video_lm"
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 512
  vocab_size: int = 260
  # tubelet (frames, height, width) of one video token
  tubelet: tuple[int, int, int] = (1, 8, 8)
  # token drop (TimeChat-Online DTD, layers/token_drop.py): a video token whose tubelet embedding has cosine > tau
  # to the same (h, w) token of the previous frame is masked out (keeps its slot and position); 1.0 = off
  token_drop_tau: float = 1.0
  rope_theta: float = 10_000.0
  dtype: str = "float32"  # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  # none | full | dots | dots_no_batch | save_attention  (see layers/scan.py)
  remat: str = "none"
  scan_layers: bool = True
  # Length generalisation (positions of the video's frames on RoPE's t axis; h, w and the text rule unchanged):
  # train_positions: contiguous (t = 0..F-1, today) | random (a sorted random subset of [0, max_train_position) per
  # example, Ruoss et al. 2023) | shift (t = o + 0..F-1, o uniform so t < max_train_position). Drawn per example
  # from (train.seed, batch index) in training steps only (`VideoLM.deterministic`); evaluation is contiguous.
  train_positions: str = "contiguous"
  max_train_position: int = 0  # frame-position range of random / shift, in tubelet rows of t (= frames at t=1)
  # eval_positions: contiguous | interpolate (a video longer than the trained frame range has t scaled into it:
  # t * range / F, range = data.frames / tubelet_t, or max_train_position under random / shift)
  eval_positions: str = "contiguous"

  def check_values(self, cfg: config_lib.Config) -> None:
    from vidlm.config_checks import check_field as need  # noqa: PLC0415  (config_checks imports vidlm.config)
    from vidlm.data import tokenizer  # noqa: PLC0415

    m = self
    for name in ("embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
      need(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "must be >= 1")
    need(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (RoPE rotates pairs of channels)")
    need(m.vocab_size >= tokenizer.VOCAB_SIZE, "model.vocab_size", m.vocab_size,
         f"must be >= {tokenizer.VOCAB_SIZE} (256 bytes + PAD/BOS/EOS/SEP of the byte tokenizer)")
    need(isinstance(m.rope_theta, int | float) and math.isfinite(m.rope_theta) and m.rope_theta > 0,
         "model.rope_theta", m.rope_theta, "must be a positive number")
    need(m.train_positions in TRAIN_POSITIONS, "model.train_positions", m.train_positions,
         f"expected {' | '.join(TRAIN_POSITIONS)}")
    need(m.eval_positions in EVAL_POSITIONS, "model.eval_positions", m.eval_positions,
         f"expected {' | '.join(EVAL_POSITIONS)}")
    if m.train_positions != "contiguous":
      frames = cfg.data.frames // max(m.tubelet[0], 1)
      need(isinstance(m.max_train_position, int) and m.max_train_position >= frames, "model.max_train_position",
           m.max_train_position, f"must be an int >= the training video's {frames} frame positions "
           f"(data.frames / tubelet t) with model.train_positions={m.train_positions}")

  def validate(self, cfg: config_lib.Config, *, num_devices: int | None = None, platform: str | None = None) -> None:
    """Tubelet vs data shapes, dtypes, remat, the ring's chunks of the video+text sequence, and every attention
    call the model will make (`vidlm.attention_calls`, no device work)."""
    from layers.scan import REMAT_POLICIES  # noqa: PLC0415
    from vidlm.config import ConfigError, sequence_length, video_tokens  # noqa: PLC0415

    m, d, a = self, cfg.data, cfg.attention
    a.sparsity.dense_layer_set(m.num_layers)
    if m.dtype not in ("float32", "bfloat16") or m.param_dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"config.model.dtype/param_dtype: expected float32 or bfloat16, got {m.dtype}/{m.param_dtype}")
    if m.remat not in REMAT_POLICIES:
      raise ConfigError(f"config.model.remat: unknown policy {m.remat!r}; expected {' | '.join(REMAT_POLICIES)}")
    if m.num_heads % m.num_kv_heads:
      raise ConfigError(f"config.model.num_heads={m.num_heads} is not a multiple of model.num_kv_heads={m.num_kv_heads}")
    if len(m.tubelet) != 3 or min(m.tubelet) < 1:
      raise ConfigError(f"config.model.tubelet: expected three positive ints (t, h, w), got {m.tubelet}")
    for name, size, tub in zip(("frames", "height", "width"), (d.frames, d.height, d.width), m.tubelet):
      if size % tub:
        raise ConfigError(f"config.data.{name}={size} is not divisible by the tubelet size {tub} (model.tubelet)")
    tau = m.token_drop_tau
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0.0 <= tau <= 1.0:
      raise ConfigError(f"config.model.token_drop_tau={tau!r}: expected a number in [0, 1] (1.0 = no token drop)")
    seq_len = sequence_length(cfg)
    ring = a.context_parallel == "ring"
    if ring and a.ring_layout == "frame_striped" and d.text_len and cfg.mesh.seq > 1:
      raise ConfigError(
        "config.attention.ring_layout: 'frame_striped' deals whole video frames and cannot hold the text that follows "
        "the video in VideoLM; use 'zigzag' (balanced for causal masks) or 'contiguous'"
      )
    ring_chunks = cfg.mesh.seq * (2 if ring and a.ring_layout == "zigzag" else 1)
    if cfg.mesh.seq > 0 and seq_len % ring_chunks:
      raise ConfigError(
        f"config.mesh.seq: sequence length {seq_len} (video {video_tokens(cfg)} + text {d.text_len}) "
        f"is not divisible by {ring_chunks} (mesh.seq{' x 2 for zigzag' if ring_chunks != cfg.mesh.seq else ''})"
      )
    from vidlm.attention_calls import check_attention_calls  # noqa: PLC0415

    check_attention_calls(cfg, num_devices=num_devices, platform=platform)  # every call the model makes, no device work

  def sequence_length(self, cfg: config_lib.Config) -> int:
    return config_lib.sequence_length(cfg)


class VideoLM(StreamingMixin, nnx.Module):
  def __init__(self, cfg: config_lib.Config, *, rngs: nnx.Rngs):
    m, a = cfg.model, cfg.attention
    self.tubelet = tuple(m.tubelet)
    self.head_dim, self.rope_theta = m.head_dim, m.rope_theta
    # frame positions (VideoLMConfig.train_positions / eval_positions); `deterministic` is NNX's train/eval switch
    # (`Module.train()` clears it: the train step does), so only training steps draw random positions
    self.train_positions, self.eval_positions = m.train_positions, m.eval_positions
    self.max_train_position, self.position_seed = m.max_train_position, cfg.train.seed
    self.trained_frame_range = (
      m.max_train_position if m.train_positions != "contiguous" else cfg.data.frames // m.tubelet[0]
    )
    self.deterministic = True
    self.ring_layout = a.ring_layout if a.context_parallel == "ring" else None
    context_parallel = Ring(a.ring_layout) if self.ring_layout is not None else None
    self.remat, self.scan_layers = m.remat, m.scan_layers
    dtype, param_dtype = _DTYPES[m.dtype], _DTYPES[m.param_dtype]
    self.num_layers, self.num_kv_heads, self.dtype = m.num_layers, m.num_kv_heads, dtype
    self.video_embed = TubeletEmbed(self.tubelet, 3, m.embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_embed = TokenEmbed(m.vocab_size, m.embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_drop_tau = float(m.token_drop_tau)
    # attention.sparsity -> the selector every block's Attention asks for a BlockLayout (None: dense)
    selector = make_selector(a.sparsity, num_layers=m.num_layers, video_grid=config_lib.video_grid(cfg))

    def make_block(r):
      return DecoderBlock(
        embed_dim=m.embed_dim, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
        mlp_dim=m.mlp_dim, attention_kernel=a.kernel, context_parallel=context_parallel, attention_selector=selector,
        allow_reference_fallback=a.allow_reference_fallback, rope_theta=m.rope_theta, dtype=dtype,
        param_dtype=param_dtype, rngs=r,
      )

    if m.scan_layers:
      self.blocks = scan.stack(make_block, m.num_layers, rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(m.num_layers)])
    self.final_norm = RMSNorm(m.embed_dim, param_dtype=param_dtype)
    self.lm_head = nnx.Linear(
      m.embed_dim, m.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab")), rngs=rngs,
    )

  def _token_order(self, num_tokens: int, tokens_per_frame: int) -> np.ndarray | None:
    """Storage order of tokens for ring layouts (None = original order). The same `storage_order` the sparse
    Attention layers invert to hand their selector q/k in original order, so the two cannot disagree."""
    if self.ring_layout is None:
      return None
    # zigzag chunks need not hold whole frames (each hop's mask is exact through position offsets); the
    # frame-striped layout deals whole frames, and the text after the video is dealt in groups of the same size
    return storage_order(Ring(self.ring_layout, tokens_per_frame=tokens_per_frame), num_tokens, MaskSpec())

  def _split_frames(self, frames: jax.Array) -> jax.Array:
    """Split the video over `seq` by frames before it is embedded, so each device converts and embeds only
    its own frames. Without it XLA may convert and embed the whole video on every device (it does on CPU:
    tests/vidlm/test_sharding.py). Frame counts that do not divide stay replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    seq = 1 if mesh is None or mesh.empty else mesh.shape.get("seq", 1)
    if seq == 1 or frames.shape[1] % (seq * self.tubelet[0]):
      return frames
    return constrain(frames, ("batch", "frames", None, None, None))

  def _grid(self, frames_shape) -> tuple[int, int, int]:
    _, f, h, w, _ = frames_shape
    tt, th, tw = self.tubelet
    return f // tt, h // th, w // tw

  def positions(self, frames_shape: tuple[int, ...], text_len: int) -> np.ndarray:
    """The default (evaluation) positions [N, 3] of a video of `frames_shape` [B, F, H, W, 3] followed by
    `text_len` text tokens: video (t, h, w) in raster order, then text (p, p, p) from the largest video coordinate
    on; int32. With model.eval_positions=interpolate a video longer than the trained frame range has its t
    scaled into that range (float32; text then starts right after the range, where training put it)."""
    grid = self._grid(frames_shape)
    if self.eval_positions == "interpolate" and grid[0] > self.trained_frame_range:
      t = rope_lib.interpolated_frame_t(grid[0], self.trained_frame_range)
      with jax.ensure_compile_time_eval():  # concrete under jit too: positions of a shape, not of data
        return np.asarray(rope_lib.frame_positions(t, grid[1:], text_len), np.float32)
    return rope_lib.video_text_positions(grid, text_len)

  def training_positions(self, frames_shape: tuple[int, ...], text_len: int, index: jax.Array) -> jax.Array | None:
    """Per-example training positions int32 [B, N, 3] under model.train_positions=random | shift, drawn from
    (train.seed, index[b]) so a run is reproducible and each example keeps its draw; None when contiguous (the
    default forward's positions, unchanged)."""
    if self.train_positions == "contiguous":
      return None
    grid = self._grid(frames_shape)
    draw = rope_lib.random_frame_t if self.train_positions == "random" else rope_lib.shifted_frame_t
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(self.position_seed), i))(index.astype(jnp.int32))
    frame_t = jax.vmap(lambda k: draw(k, grid[0], self.max_train_position))(keys)  # [B, gt]
    return rope_lib.frame_positions(frame_t, grid[1:], text_len)

  def __call__(
    self,
    frames: jax.Array,
    tokens: jax.Array,
    *,
    positions: jax.Array | np.ndarray | None = None,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """frames uint8/float [B, F, H, W, 3], tokens int32 [B, L] -> text logits float32 [B, L, V].

    positions: int [N, 3] or [B, N, 3] (N = video tokens + L), the true (t, h, w) position of every token, which
    RoPE rotates by (default `self.positions(...)`): offsets, dropped tokens and caches keep their positions."""
    return self._forward(frames, tokens, positions=positions, segment_ids=segment_ids)[0]

  def prefill(
    self,
    frames: jax.Array,
    prompt: jax.Array,
    *,
    prompt_lengths: jax.Array | None = None,
    max_new_tokens: int = 64,
    positions: jax.Array | np.ndarray | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Run video + prompt [B, P] once and fill a fresh full KV cache: -> (text logits float32 [B, P, V], cache).

    The logits are the full forward's. The cache holds video + P prompt slots + `max_new_tokens` free slots, all
    layers stacked ([num_layers, B, S_max, Hkv, D]). `prompt_lengths` [B] (default P) marks right-padded prompts:
    a row's next token goes to slot video + prompt_lengths[b] (its padding is overwritten, never attended)."""
    b, p = prompt.shape
    grid = self._grid(frames.shape)
    num_video = grid[0] * grid[1] * grid[2]
    n = num_video + p
    if positions is None:
      positions = self.positions(frames.shape, p)
    mask = MaskSpec.frame_causal(grid[1] * grid[2], video_tokens=num_video)
    cache = KVCache.init(
      b, n + max_new_tokens, self.num_kv_heads, self.head_dim, num_layers=self.num_layers, dtype=self.dtype, mask=mask
    )
    lengths = p if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    cache = cache.record(  # the padding of short prompts is written but not counted
      jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b, n, 3)), jnp.broadcast_to(jnp.arange(n), (b, n)),
      num_video + lengths,
    )
    logits, cache = self._forward(frames, prompt, positions=positions, cache=cache)
    return logits, cache.advance()

  def decode_step(self, token: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """token int32 [B] (or [B, 1]), appended to each row of `cache` at the next text position -> (logits float32
    [B, V] of the token after it, cache), any cache kind: a one-token `extend_text` (vidlm/models/video_lm_stream.py).
    Attention reads the whole cache context (context parallelism does not apply)."""
    logits, cache = self.extend_text(token.reshape(-1, 1), cache)
    return logits[:, 0], cache

  def _forward(self, frames, tokens, *, positions=None, segment_ids=None, cache: KVCache | None = None):
    """The full forward over video + text (and, given a fresh cache, its prefill): -> (text logits, cache)."""
    grid = self._grid(frames.shape)
    num_video = grid[0] * grid[1] * grid[2]
    text_len = tokens.shape[1]
    video = self.video_embed(self._split_frames(frames))  # [B, Nv, E]
    x = jnp.concatenate([video, self.text_embed(tokens)], axis=1)  # [B, N, E]
    if self.token_drop_tau < 1.0:
      segment_ids, cache = self._drop_tokens(video, grid, text_len, segment_ids, cache)
    if positions is None:
      positions = self.positions(frames.shape, text_len)
    rope = rope_lib.tables(positions, self.head_dim, self.rope_theta)  # [N | B,N, D/2]
    mask = MaskSpec.frame_causal(grid[1] * grid[2], video_tokens=num_video)

    order = self._token_order(num_video + text_len, grid[1] * grid[2])
    if order is not None:
      x, rope = x[:, order], rope.take(order)
      if segment_ids is not None:
        segment_ids = tuple(s[:, order] for s in segment_ids)
    residual = lambda y: constrain(y, ("batch", "tokens", "embed"))
    x = residual(x)
    # a ring stores token i of the layout at sequence slot order[i]: the cache is written in sequence order
    slots = None if order is None else jnp.asarray(order, jnp.int32)
    x, cache = self._layers(x, rope, mask=mask, segment_ids=segment_ids, residual=residual, cache=cache,
                            cache_slots=slots)

    text_slots = num_video + np.arange(text_len)
    if order is not None:
      text_slots = np.argsort(order)[text_slots]
    x = self.final_norm(x[:, text_slots])
    return self.lm_head(x).astype(jnp.float32), cache

  def _drop_tokens(self, video, grid, text_len, segment_ids, cache: KVCache | None):
    """DTD (layers/token_drop.py) decided on the tubelet embeddings (the visual encoder's features, as in
    TimeChat-Online): a dropped video token keeps its slot and position but gets segment id -1, which no kept token
    or text shares, so nothing kept ever attends it. In a prefill its cache slot is recorded at a sequence index
    past every query (`token_drop.DROPPED_SEQ_INDEX`), so the cache's mask rule hides it from decoding as well."""
    b = video.shape[0]
    per_frame = video.reshape(b, grid[0], grid[1] * grid[2], video.shape[-1])  # [B, F', h*w, E]
    keep = token_drop.keep_mask(per_frame, self.token_drop_tau).reshape(b, -1)  # [B, Nv]
    segment_ids = token_drop.segment_ids(keep, text_len, segment_ids)
    if cache is not None:  # prefill recorded slot == sequence index, video first
      nv = keep.shape[1]
      hidden = jnp.where(keep, cache.seq_index[:, :nv], token_drop.DROPPED_SEQ_INDEX)
      cache = dataclasses.replace(cache, seq_index=cache.seq_index.at[:, :nv].set(hidden))
    return segment_ids, cache

  def _layers(self, x, rope, *, mask, residual, segment_ids=None, cache: KVCache | None = None, decode=False,
              cache_slots=None):
    """The block stack on x [B, N, E] -> (x, cache): one `nnx.scan` (or a loop); a stacked cache's k/v are
    scanned beside the weights, one layer's slice of every per-layer cache array (`KVCache.layer_arrays`) per step."""
    if cache is None:

      def body(block, carry):
        # the layer index rides in the carry: inside the scan it is a traced int32 the selector can use
        y, index = carry
        return block(y, rope, mask=mask, segment_ids=segment_ids, constrain=residual, layer_index=index), index + 1

      if self.scan_layers:
        x, _ = scan.apply(self.blocks, (x, jnp.zeros((), jnp.int32)), body, remat=self.remat)
      else:
        for i, block in enumerate(self.blocks):
          x, _ = body(block, (x, i))
      return x, None

    def cached_body(block, carry, arrays):
      y, index = carry
      layer_cache = cache.with_layer_arrays(arrays)
      y, layer_cache = block(
        y, rope, mask=mask, segment_ids=segment_ids, constrain=residual, layer_index=index, cache=layer_cache,
        decode=decode, cache_slots=cache_slots,
      )
      return (y, index + 1), layer_cache.layer_arrays()

    if self.scan_layers:  # inference: nothing to rematerialise
      (x, _), arrays = scan.apply_with_xs(self.blocks, (x, jnp.zeros((), jnp.int32)), cache.layer_arrays(), cached_body)
    else:
      per_layer = []
      for i, block in enumerate(self.blocks):
        (x, _), arrays_i = cached_body(block, (x, i), cache.layer(i).layer_arrays())
        per_layer.append(arrays_i)
      arrays = tuple(jnp.stack(a) for a in zip(*per_layer))
    return x, cache.with_layer_arrays(arrays)

  def loss(
    self, batch: dict[str, jax.Array], *, per_example: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy on the answer tokens -> (mean loss, sums): `losses.answer_loss` on this
    model's text logits. Reads frames, tokens, targets, loss_mask; the batch's other keys (index, cut_frames)
    are not used by VideoLM."""
    positions = None
    if not self.deterministic and self.train_positions != "contiguous":  # a training step (see __init__)
      if "index" not in batch:
        raise ValueError("VideoLM.loss: model.train_positions needs the batch's 'index' (per-example draws)")
      positions = self.training_positions(batch["frames"].shape, batch["tokens"].shape[1], batch["index"])
    logits = self(batch["frames"], batch["tokens"], positions=positions)
    return losses.answer_loss(logits, batch, per_example=per_example)

  summarise = staticmethod(losses.summarise_answer)  # metrics from summed sums: loss, token_accuracy, exact_match


@register_model("video_lm", config=VideoLMConfig)
def _build(cfg: config_lib.Config, *, rngs: nnx.Rngs) -> VideoLM:
  return VideoLM(cfg, rngs=rngs)
