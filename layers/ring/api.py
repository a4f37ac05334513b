"""The entry point of ring attention: `ring_attention` on GLOBAL arrays, wrapping the ring in `shard_map`.

One job: validate the call, resolve the mesh axes (the ring axis, and the batch / head axes that ride along)
through the one logical-axis rules table (`layers.partitioning`), build the static hop plans and hand them with
the caller's hop kernel to the custom_vjp ring (`vjp`). `ring_flops` is the FLOP count benchmarks report.
"""

from __future__ import annotations

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from layers import partitioning
from layers.ring.hops import HopKernel
from layers.ring.layouts import device_chunks
from layers.ring.plans import build_plans
from layers.ring.sparse import build_ring_sparse
from layers.ring.vjp import RingCfg, ring_out, ring_out_lse
from pallas_kernels.layout import BlockLayout, MaskSpec


def _ring_axis() -> str:
  """The mesh axis the rules table gives the logical "tokens" axis: the ring runs over it."""
  axes = partitioning.mesh_axes("tokens")
  if len(axes) != 1:
    raise ValueError(
      f"ring_attention: the rules table (layers.partitioning.RULES) maps 'tokens' to {axes}; a ring runs over "
      "exactly one mesh axis: pass axis_name="
    )
  return axes[0]


def _divisible_axes(sizes: dict[str, int], logical: str, ring_axis: str, dims: tuple[int, ...]) -> tuple[str, ...]:
  """The mesh axes of `logical` (rules table, in order) that are in the mesh, are not the ring axis, and
  together divide every one of `dims`; an axis that does not divide is skipped."""
  out, prod = [], 1
  for a in partitioning.mesh_axes(logical):
    if a in sizes and a != ring_axis and all(dim % (prod * sizes[a]) == 0 for dim in dims):
      out.append(a)
      prod *= sizes[a]
  return tuple(out)


def _mesh_axes(mesh, ring_axis: str, b: int, hq: int, hkv: int):
  """PartitionSpec entries for the batch and head dims: the rules table's "batch" and "heads" axes that divide.

  Q and K/V heads are split over the same axes (each device keeps whole GQA groups), so the table must give
  "heads" and "kv_heads" the same axes.
  """
  if partitioning.mesh_axes("heads") != partitioning.mesh_axes("kv_heads"):
    raise ValueError(
      f"ring_attention: the rules table maps 'heads' to {partitioning.mesh_axes('heads')} but 'kv_heads' to "
      f"{partitioning.mesh_axes('kv_heads')}; ring attention needs both on the same mesh axes"
    )
  sizes = dict(mesh.shape)
  batch = _divisible_axes(sizes, "batch", ring_axis, (b,))
  heads = _divisible_axes(sizes, "heads", ring_axis, (hq, hkv))
  return (batch or None), (heads if len(heads) > 1 else (heads[0] if heads else None))


def ring_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec,
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  layout: BlockLayout | None = None,
  scale: float | None = None,
  return_lse: bool = False,
  hop: HopKernel,
  token_layout: str = "contiguous",
  axis_name: str | None = None,
  tokens_per_frame: int | None = None,
  _permute: bool = True,
  _uniform: bool = True,
  _barrier: bool = True,
):
  """Ring attention of GLOBAL q [B, T, Hq, D], k/v [B, T, Hkv, D] sharded over `axis_name` on the token dim.

  Tokens are stored in `token_layout` order (see `token_permutation`); `mask` and `segment_ids` semantics are
  those of `layers.attention.attention` with the mask in ORIGINAL positions (segment ids in storage order,
  i.e. permuted like the tokens). The mesh is the ambient `jax.set_mesh` one; batch and heads are split over
  the mesh axes the rules table (`layers.partitioning`) gives "batch" and "heads", as far as they divide.
  Returns out [B, T, Hq, D] (and lse [B, Hq, T] fp32).

  `layout` (block-sparse, a selector's `BlockLayout`) is indexed in ORIGINAL positions like the mask, batch and
  heads 1 or q's; its blocks must divide the runs each device stores (`ring.sparse`). Each hop then computes
  only the listed blocks of the travelling K/V chunk, and a hop call with nothing listed on the device is
  skipped (forward and backward). The hop kernel must take layouts (`HopKernel.sparse`: xla, flash, reference).

  Args:
    hop: the per-hop attention kernel (`layers.attention.hop_kernel("xla" | "flash" | "cudnn" | "reference")`).
    axis_name: the ring's mesh axis; None: the one the rules table gives the logical "tokens" axis (seq).
    tokens_per_frame: frame size of the frame_striped layout; defaults to mask.tokens_per_frame.
    _permute: benchmark only. False skips the K/V transfers (wrong results) to time the compute alone.
    _uniform: False always dispatches hops with different per-device plans by `lax.switch` (benchmarks, tests).
    _barrier: False drops the optimization barriers that pin each transfer to one hop (benchmarks).
  """
  from pallas_kernels import reference  # noqa: PLC0415

  reference.check_shapes(q, k, v, segment_ids)
  if layout is not None and not hop.sparse:
    raise ValueError(
      f"ring_attention: the {hop.name!r} hop kernel takes no BlockLayout (block-sparse); use kernel='xla' or 'flash'"
    )
  b, t, hq, d = q.shape
  if k.shape[1] != t:
    raise ValueError(f"ring_attention: self-attention only; q has {t} tokens, k/v have {k.shape[1]}")
  scale = float(d**-0.5 if scale is None else scale)
  axis_name = _ring_axis() if axis_name is None else axis_name
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis_name not in mesh.axis_names:
    raise ValueError(
      f"ring_attention: no mesh axis {axis_name!r} in the ambient mesh; wrap the call in `with jax.set_mesh(mesh):` "
      f"with the mesh axes {partitioning.AXES} (vidlm.sharding.make_mesh builds one)"
    )
  n = dict(mesh.shape)[axis_name]
  if token_layout == "frame_striped":
    tpf = tokens_per_frame or (mask.tokens_per_frame if mask.kind == "frame_causal" else None)
    if tpf is None:
      if mask.kind != "bidirectional":
        raise ValueError(
          f"ring_attention(token_layout='frame_striped', mask={mask.kind!r}) needs tokens_per_frame= (the layout's frame size)"
        )
      tpf = 1
  else:
    tpf = 1
  device_chunks(t, n, token_layout, tpf)  # validates divisibility with a clear message
  sparse = None if layout is None else build_ring_sparse(layout, t, n, token_layout, tpf)
  if n == 1:
    kw = {} if layout is None else {"layout": layout}
    return hop.whole(q, k, v, mask=mask, segment_ids=segment_ids, scale=scale, return_lse=return_lse, **kw)

  plans, table, uniform = build_plans(mask, t, n, token_layout, tpf, _uniform)
  if hop.check is not None:  # fail before tracing, naming the hop mask the kernel cannot do
    for call in (c for plan in plans for c in plan):
      hop.check(call.mask, call.q_hi - call.q_lo, call.kv_hi - call.kv_lo, segment_ids is not None)
  cfg = RingCfg(axis_name, n, plans, table, uniform, hop, scale, _permute, _barrier, sparse)
  batch, heads = _mesh_axes(mesh, axis_name, b, hq, k.shape[2])
  qspec = P(batch, axis_name, heads, None)
  lse_spec = P(batch, heads, axis_name)
  seg_spec = P(batch, axis_name)

  # The layout is global over the tokens (every device reads its own q blocks' rows); batch and heads split like
  # q where the layout has them (a layout of batch or heads 1 is shared, so replicated).
  lay, lay_spec = None, None
  if layout is not None:
    lb, lh = layout.kv_indices.shape[:2]
    if lb not in (1, b) or lh not in (1, hq):
      raise ValueError(f"ring_attention: BlockLayout batch/heads ({lb}, {lh}) must be 1 or q's ({b}, {hq})")
    lay = (layout.kv_indices, layout.kv_counts)
    lspec = (batch if lb == b else None, heads if lh == hq else None)
    lay_spec = (P(*lspec, None, None), P(*lspec, None))

  def local(q, k, v, seg_q, seg_kv, lay):
    seg_all = None if seg_kv is None else lax.all_gather(seg_kv, axis_name)  # [N, B, c]
    if return_lse:
      return ring_out_lse(cfg, q, k, v, seg_q, seg_all, lay)
    return ring_out(cfg, q, k, v, seg_q, seg_all, lay)

  seg_q, seg_kv = (None, None) if segment_ids is None else segment_ids
  fn = jax.shard_map(
    local,
    in_specs=(qspec, qspec, qspec, seg_spec, seg_spec, lay_spec),
    out_specs=(qspec, lse_spec) if return_lse else qspec,
    check_vma=False,
  )
  return fn(q, k, v, seg_q, seg_kv, lay)


def ring_flops(num_tokens: int, num_heads: int, head_dim: int, *, causal: bool, backward: bool) -> float:
  """Attention matmul FLOPs (4 T^2 H D forward, 2.5x that backward; halved under a causal mask)."""
  f = 4.0 * num_tokens**2 * num_heads * head_dim * (0.5 if causal else 1.0)
  return f * (3.5 if backward else 1.0)


__all__ = ["ring_attention", "ring_flops"]
