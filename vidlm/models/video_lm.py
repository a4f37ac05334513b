"""VideoLM: a decoder-only video-language model (LWM-style), DESIGN section 5.

Sequence = video tokens (tubelet patch embeddings, 3D RoPE over t/h/w) followed by text tokens (byte-level,
1D RoPE). Video attends frame-causally (a token sees its own frame and earlier ones), text causally over
everything before it. Logits are produced for the text positions only; the loss (vidlm/train/step.py)
is taken on answer tokens.

With ring attention the tokens are stored in the ring layout's order (zigzag, frame-striped, ...): the
embeddings and RoPE tables are permuted once after embedding and the text hidden states gathered back
before the head, so the mask spec keeps describing original positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers import rope as rope_lib
from layers import scan
from layers.block import DecoderBlock
from layers.embed import TokenEmbed, TubeletEmbed
from layers.norm import RMSNorm
from pallas_kernels.layout import MaskSpec
from vidlm import config as config_lib
from vidlm.models.registry import register_model
from vidlm.sharding import constrain

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class VideoLM(nnx.Module):
  def __init__(self, cfg: config_lib.Config, *, rngs: nnx.Rngs):
    m, a = cfg.model, cfg.attention
    self.tubelet = tuple(m.tubelet)
    self.head_dim, self.rope_theta = m.head_dim, m.rope_theta
    self.attention_impl, self.ring_layout = a.impl, a.ring_layout
    self.remat, self.scan_layers = m.remat, m.scan_layers
    dtype, param_dtype = _DTYPES[m.dtype], _DTYPES[m.param_dtype]
    self.video_embed = TubeletEmbed(self.tubelet, 3, m.embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.text_embed = TokenEmbed(m.vocab_size, m.embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def make_block(r):
      return DecoderBlock(
        embed_dim=m.embed_dim, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
        mlp_dim=m.mlp_dim, attention_impl=a.impl, ring_layout=a.ring_layout, dtype=dtype,
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
    """Storage order of tokens for ring layouts (None = original order)."""
    if self.attention_impl != "ring" or self.ring_layout == "contiguous":
      return None
    mesh = jax.sharding.get_abstract_mesh()
    ring_size = 1 if mesh is None or mesh.empty else mesh.shape.get("seq", 1)
    if ring_size == 1:
      return None
    from layers import ring  # noqa: PLC0415

    # zigzag chunks need not hold whole frames (each hop's mask is exact through position offsets); the
    # frame-striped layout deals whole frames, and the text after the video is dealt in groups of the same size
    group = tokens_per_frame if self.ring_layout == "frame_striped" else 1
    return ring.token_permutation(num_tokens, ring_size, self.ring_layout, group)

  def _split_frames(self, frames: jax.Array) -> jax.Array:
    """Split the video over `seq` by frames before it is embedded, so each device converts and embeds only
    its own frames. Without it XLA may convert and embed the whole video on every device (it does on CPU:
    tests/vidlm/test_sharding.py). Frame counts that do not divide stay replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    seq = 1 if mesh is None or mesh.empty else mesh.shape.get("seq", 1)
    if seq == 1 or frames.shape[1] % (seq * self.tubelet[0]):
      return frames
    return constrain(frames, ("batch", "frames", None, None, None))

  def __call__(
    self,
    frames: jax.Array,
    tokens: jax.Array,
    *,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """frames uint8/float [B, F, H, W, 3], tokens int32 [B, L] -> text logits float32 [B, L, V]."""
    _, f, h, w, _ = frames.shape
    tt, th, tw = self.tubelet
    grid = (f // tt, h // th, w // tw)
    num_video = grid[0] * grid[1] * grid[2]
    text_len = tokens.shape[1]
    x = jnp.concatenate([self.video_embed(self._split_frames(frames)), self.text_embed(tokens)], axis=1)  # [B, N, E]
    rope = rope_lib.tables(rope_lib.video_text_positions(grid, text_len), self.head_dim, self.rope_theta)
    mask = MaskSpec.frame_causal(grid[1] * grid[2], video_tokens=num_video)

    order = self._token_order(num_video + text_len, grid[1] * grid[2])
    if order is not None:
      x, rope = x[:, order], rope.take(order)
      if segment_ids is not None:
        segment_ids = tuple(s[:, order] for s in segment_ids)
    residual = lambda y: constrain(y, ("batch", "tokens", "embed"))
    x = residual(x)

    def body(block, y):
      return block(y, rope, mask=mask, segment_ids=segment_ids, constrain=residual)

    if self.scan_layers:
      x = scan.apply(self.blocks, x, body, remat=self.remat)
    else:
      for block in self.blocks:
        x = body(block, x)

    text_slots = num_video + np.arange(text_len)
    if order is not None:
      text_slots = np.argsort(order)[text_slots]
    x = self.final_norm(x[:, text_slots])
    return self.lm_head(x).astype(jnp.float32)


@register_model("video_lm")
def _build(cfg: config_lib.Config, *, rngs: nnx.Rngs) -> VideoLM:
  return VideoLM(cfg, rngs=rngs)
