"""Every attention call a config's model will make, listed and checked against the kernels before any device work.

`validate()` calls `check_attention_calls`: a run that would hit a kernel unable to run one of its calls
(a ring hop whose block the flash kernel cannot tile, cuDNN asked for VideoLM's frame-causal mask, fp32 on the
GPU kernels, ...) fails at once with one line naming the call and the reason, instead of failing (or, before,
silently running the dense fp32 reference) after compilation. Pure: shapes are `jax.ShapeDtypeStruct`s and the
ring's hop plans are static NumPy; nothing is placed on or run on a device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.layout import BlockLayout, MaskSpec
from vidlm import config as config_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """One attention call: q [B, tq, Hq, D] against k/v [B, tk, Hkv, D] under `mask`, on concrete `kernel`."""

  where: str  # e.g. "layers 0-7 self-attention", "ring hop 1 (devices 0-7)"
  q: jax.ShapeDtypeStruct
  k: jax.ShapeDtypeStruct
  mask: MaskSpec
  kernel: str
  has_segments: bool = False
  return_lse: bool = False
  layout: BlockLayout | None = None  # abstract (ShapeDtypeStruct leaves) when attention.sparsity selects blocks


def _ring_size(cfg: config_lib.Config, num_devices: int | None) -> int | None:
  if cfg.mesh.seq != -1:
    return cfg.mesh.seq
  if num_devices is None:
    return None
  return config_lib.resolve_mesh_shape(cfg.mesh, num_devices)[2]


def attention_calls(
  cfg: config_lib.Config, *, num_devices: int | None = None, platform: str | None = None
) -> list[AttentionCall]:
  """The distinct attention calls VideoLM makes for `cfg` (every layer makes the same ones).

  Without context parallelism: one [N, N] frame-causal call. With context_parallel=ring: the sub-block calls of
  every hop's static plan (the per-hop shapes and masks the kernel sees); a ring of one device runs the whole
  sequence. `mesh.seq=-1` needs `num_devices` to know the ring size (without it the hops are not listed).
  """
  from layers import attention as attention_lib  # noqa: PLC0415
  from layers import ring as ring_lib  # noqa: PLC0415

  m, a = cfg.model, cfg.attention
  dtype = _DTYPES.get(m.dtype, jnp.float32)
  tpf = config_lib.tokens_per_frame(cfg)
  num_video = config_lib.video_tokens(cfg)
  n_tokens = config_lib.sequence_length(cfg)
  mask = MaskSpec.frame_causal(tpf, video_tokens=num_video)
  segs = m.token_drop_tau < 1.0  # token drop hides dropped video tokens through segment ids

  def shapes(tq: int, tk: int):
    q = jax.ShapeDtypeStruct((1, tq, m.num_heads, m.head_dim), dtype)
    return q, jax.ShapeDtypeStruct((1, tk, m.num_kv_heads, m.head_dim), dtype)

  layers = f"layers 0-{m.num_layers - 1}" if m.num_layers > 1 else "layer 0"
  n = _ring_size(cfg, num_devices) if a.context_parallel == "ring" else 1
  if n is None:
    return []
  if n == 1:
    layout = _abstract_layout(cfg, n_tokens)
    kernel = attention_lib.resolve_kernel(
      a.kernel, platform=platform, dtype=dtype, mask=mask, has_layout=layout is not None, has_segments=segs
    )
    where = f"{layers} self-attention [{n_tokens} x {n_tokens}]"
    if layout is not None:
      where += f" with a {a.sparsity.method} BlockLayout"
    return [AttentionCall(where, *shapes(n_tokens, n_tokens), mask, kernel, has_segments=segs, layout=layout)]
  kernel = attention_lib.resolve_kernel(
    a.kernel, platform=platform, dtype=dtype, mask=mask, ring_hop=True, has_segments=segs
  )
  group = tpf if a.ring_layout == "frame_striped" else 1
  plans, table, _ = ring_lib.build_plans(mask, n_tokens, n, a.ring_layout, group)
  calls, seen = [], set()
  sp = a.sparsity
  for t, row in enumerate(table):
    for r, plan_id in enumerate(row):
      for c in plans[plan_id]:
        key = (c.q_hi - c.q_lo, c.kv_hi - c.kv_lo, c.mask)
        if key in seen:
          continue
        seen.add(key)
        where = f"ring hop {t} on seq device {r} ({a.ring_layout}, ring of {n}): [{key[0]} x {key[1]}] {c.mask.kind}"
        layout = None
        if sp.method != "none" and key[0] % sp.block_q == 0:  # the hop's local layout (blocks checked above)
          layout = _abstract_layout(cfg, key[0])
          where += f" with a {sp.method} BlockLayout"
        calls.append(AttentionCall(
          where, *shapes(key[0], key[1]), c.mask, kernel, has_segments=segs, return_lse=True, layout=layout
        ))
  return calls


def unsupported_calls(
  cfg: config_lib.Config, *, num_devices: int | None = None, platform: str | None = None
) -> list[tuple[AttentionCall, str]]:
  """(call, reason) for every listed call its kernel cannot run on `platform`."""
  from layers import attention as attention_lib  # noqa: PLC0415
  from layers import ring as ring_lib  # noqa: PLC0415

  a = cfg.attention
  out = []
  for call in attention_calls(cfg, num_devices=num_devices, platform=platform):
    kw = dict(mask=call.mask, has_segments=call.has_segments, platform=platform)
    if call.kernel == "cudnn" and call.return_lse:  # a ring hop: cuDNN's private lse path, square causal / full only
      # platform and dtype as for a plain causal call; then the hop mask
      reason = attention_lib.unsupported("cudnn", call.q, call.k, call.k, mask=MaskSpec.causal(), platform=platform)
      if reason is None and call.layout is not None:
        reason = "kernel=cudnn cannot take a BlockLayout; use kernel=flash or xla"
      if reason is None:
        try:
          ring_lib.cudnn_hop_check(call.mask, call.q.shape[1], call.k.shape[1], call.has_segments)
        except ValueError as e:
          reason = str(e)
    else:
      reason = attention_lib.unsupported(
        call.kernel, call.q, call.k, call.k, return_lse=call.return_lse, layout=call.layout,
        allow_reference_fallback=a.allow_reference_fallback, **kw,
      )
    if reason is not None:
      out.append((call, reason))
  return out


def check_attention_calls(
  cfg: config_lib.Config, *, num_devices: int | None = None, platform: str | None = None
) -> None:
  """ConfigError (one line) naming the first call no kernel can run, how many there are, and what to change."""
  check_sparsity_shapes(cfg, num_devices=num_devices)
  bad = unsupported_calls(cfg, num_devices=num_devices, platform=platform)
  if not bad:
    return
  call, reason = bad[0]
  more = f" (and {len(bad) - 1} more attention calls)" if len(bad) > 1 else ""
  raise config_lib.ConfigError(
    f"config.attention.kernel={cfg.attention.kernel}: {call.where} cannot run: {reason}{more}; choose another "
    "attention.kernel, change the lengths, or set attention.allow_reference_fallback=true for the dense reference"
  )


def _abstract_layout(cfg: config_lib.Config, n_tokens: int) -> BlockLayout | None:
  """The shape of the layout the sparsity selector hands every sparse layer (None when the model is dense)."""
  sp = cfg.attention.sparsity
  if sp.method == "none":
    return None
  n_q = n_tokens // sp.block_q
  idx = jax.ShapeDtypeStruct((1, cfg.model.num_heads, n_q, 1), jnp.int32)
  cnt = jax.ShapeDtypeStruct((1, cfg.model.num_heads, n_q), jnp.int32)
  return BlockLayout(idx, cnt, sp.block_q, sp.block_kv)


def check_sparsity_shapes(cfg: config_lib.Config, *, num_devices: int | None = None) -> None:
  """ConfigError (one line, naming the field) when the selector cannot cut this model's sequence into blocks."""
  sp, a = cfg.attention.sparsity, cfg.attention
  if sp.method == "none":
    return
  # any ring layout: a sparse Attention layer hands its selector q/k gathered back to original order
  # (layers.attention.storage_order), the order the layout (like the mask) is indexed by
  n_tokens = config_lib.sequence_length(cfg)
  for name in ("block_q", "block_kv"):
    if n_tokens % getattr(sp, name):
      raise config_lib.ConfigError(
        f"config.attention.sparsity.{name}={getattr(sp, name)} does not divide the sequence length {n_tokens} "
        f"(video {config_lib.video_tokens(cfg)} + text {cfg.data.text_len}); pick a block that divides it"
      )
  n = _ring_size(cfg, num_devices) if a.context_parallel == "ring" else 1
  tpf = config_lib.tokens_per_frame(cfg)
  if n is not None and n > 1:
    from layers import ring as ring_lib  # noqa: PLC0415

    # each device's stored runs (its chunk; zigzag's two half chunks; frame_striped's frames) must be whole blocks
    group = tpf if a.ring_layout == "frame_striped" else 1
    try:
      runs = [run for dev in ring_lib.device_chunks(n_tokens, n, a.ring_layout, group) for run in dev]
    except ValueError as e:
      raise config_lib.ConfigError(f"config.attention.ring_layout={a.ring_layout}: {e}") from None
    if any(s % blk or ln % blk for s, ln in runs for blk in (sp.block_q, sp.block_kv)):
      raise config_lib.ConfigError(
        f"config.attention.sparsity.block_q={sp.block_q}/block_kv={sp.block_kv} must divide each run of "
        f"{min(ln for _, ln in runs):g} tokens a ring device stores ({n_tokens} tokens over mesh.seq={n}, "
        f"ring_layout={a.ring_layout}); pick smaller blocks"
      )
  if sp.method == "vmoba" and tpf % sp.block_kv:
    raise config_lib.ConfigError(
      f"config.attention.sparsity.block_kv={sp.block_kv} must divide the frame size {tpf} tokens for vmoba's video "
      "chunks (frames of whole kv blocks)"
    )
