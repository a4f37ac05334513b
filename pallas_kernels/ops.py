"""The one entry point the rest of the code imports for attention kernels: platform dispatch + custom_vjp.

`flash_attention` and `block_sparse_attention` implement the attention contract (DESIGN section 3) with a
kernel forward *and* a kernel backward on every platform:

  backend     forward / backward                                        chosen by default on
  "gpu"       pallas_kernels.gpu.flash (Mosaic GPU; with a BlockLayout      gpu
              gpu.sparse_forward / sparse_backward)
  "tpu"       pallas_kernels.tpu.flash (pallas_call + scalar prefetch)   tpu
  "interpret" the TPU kernels in Pallas interpret mode                   cpu   (slow; for tests and debugging)
  "reference" dense fp32 math from reference.py (O(T * S) memory)        never (explicit only)

No silent fallback: a call the chosen kernel cannot run raises `UnsupportedCall`, a one-line error naming the
property (dtype, head dim, lengths vs blocks, layout blocks a kernel does not take), unless the caller
passes `allow_reference_fallback=True` (config `attention.allow_reference_fallback`): then the dense fp32 reference
runs, with a warning once per process. `unsupported_reason` is the same predicate on shapes alone (no device
work), for config validation.

Both functions return `out` and, with `return_lse=True`, the fp32 log-sum-exp. The lse is differentiable:
ring attention merges hops through (out, lse) and differentiates through the merge, so the backward takes
the lse cotangent too (it only shifts the per-row delta: dS = P * (dP - delta + dlse)).

`attention_forward` / `attention_backward` expose the same dispatch without the custom_vjp, for code that
differentiates several kernel calls as one (ring attention feeds every hop's backward the merged out / lse).

Residuals are (inputs, out, lse; on the GPU block-sparse path also the forward's kv lists), out / lse tagged with
`checkpoint_name` ("flash_out", "flash_lse") so a remat policy such as
`jax.checkpoint_policies.save_only_these_names("flash_out", "flash_lse")` keeps them (the lists are small and
rebuilt under such a policy).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import reference
from pallas_kernels.layout import BlockLayout, MaskSpec
from pallas_kernels.tpu import flash as tpu_flash

Backend = Literal["gpu", "tpu", "interpret", "reference"]
BACKENDS: tuple[str, ...] = ("gpu", "tpu", "interpret", "reference")
# Block candidates, largest first. On a real TPU the row blocks of lse / segment ids put the block in the lane
# dimension, so blocks must be multiples of 128 (or the whole sequence); interpret mode takes anything.
_TPU_BLOCKS = (512, 256, 128)
_INTERPRET_BLOCKS = (128, 64, 32, 16, 8)


# ---------------------------------------------------------------------------------------------------------------
# Backend plumbing
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _warn_once(message: str) -> None:
  warnings.warn(message, UserWarning, stacklevel=4)


def default_backend() -> str:
  """The backend `flash_attention` uses when none is given: the kernel for the platform, interpret on CPU."""
  platform = jax.default_backend()
  return {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}.get(platform, "interpret")


class UnsupportedCall(ValueError):
  """The chosen kernel cannot run this attention call (and the reference fallback was not allowed)."""


def _gpu_module():
  """The Mosaic GPU kernels, or raise naming why they cannot be imported (e.g. a jax build without Mosaic GPU)."""
  try:
    from pallas_kernels.gpu import flash as gpu_flash  # noqa: PLC0415
  except Exception as e:  # noqa: BLE001  (any import failure means "no GPU kernel")
    raise UnsupportedCall(f"the Mosaic GPU kernels cannot be imported ({type(e).__name__}: {e})") from None
  return gpu_flash


def _gpu_reason(q, k, v, segment_ids, mask: MaskSpec, layout, config) -> str | None:
  """Why the GPU kernels cannot run these (abstract) inputs, or None. The module's `supports` is the authority;
  the named checks only make the message say which property failed."""
  try:
    gpu = _gpu_module()
  except UnsupportedCall as e:
    return str(e)
  if isinstance(config, tpu_flash.TpuFlashConfig):
    config = None  # block sizes are per backend
  from pallas_kernels.gpu import common as gpu_common  # noqa: PLC0415  (imported above through gpu.flash)

  d = q.shape[-1]
  if jnp.dtype(q.dtype) not in gpu_common._DTYPES or not q.dtype == k.dtype == v.dtype:
    return f"dtype {jnp.dtype(q.dtype).name}/{jnp.dtype(k.dtype).name} (the GPU kernels take bfloat16 or float16)"
  if layout is not None:  # the block-sparse kernels take their blocks from the layout (config is not used)
    from pallas_kernels.gpu import sparse_schedule  # noqa: PLC0415

    if mask.q_offset < 0 or mask.kv_offset < 0:
      return f"negative mask offsets in {mask}"
    return sparse_schedule.layout_reason(layout, q.shape[0], q.shape[2], q.shape[1], k.shape[1], d)
  if d not in gpu_common._HEAD_DIMS:
    return f"head_dim={d} (the GPU kernels take {gpu_common._HEAD_DIMS})"
  if mask.q_offset < 0 or mask.kv_offset < 0:
    return f"negative mask offsets in {mask}"
  cfg = gpu_common._resolve_config(config, d)
  t, s = q.shape[1], k.shape[1]
  cw = cfg.compute_wgs_bwd
  need_t = math.lcm(2 * cfg.block_q, cw * cfg.block_q_dq, cfg.block_q_dkv)
  need_s = math.lcm(cfg.block_kv, cfg.block_kv_dq, cw * cfg.block_kv_dkv)
  if t % need_t or s % need_s:
    return f"lengths T={t}, S={s} (the GPU kernels need T % {need_t} == 0 and S % {need_s} == 0)"
  if not gpu.supports(q, k, v, segment_ids, mask, config=config):
    return f"q{tuple(q.shape)}, k{tuple(k.shape)}, mask={mask} (rejected by pallas_kernels.gpu.flash.supports)"
  return None


def _tpu_reason(q, k, segment_ids, mask, layout, config, backend) -> str | None:
  cfg = _tpu_config(q.shape[1], k.shape[1], config, layout, backend)
  if cfg is not None or layout is not None:
    if tpu_flash.supports(q, k, k, segment_ids, mask, layout=layout, config=cfg, hardware=backend == "tpu"):
      return None
  blocks = None if layout is None else (layout.block_q, layout.block_kv)
  return (
    f"lengths T={q.shape[1]}, S={k.shape[1]} (no {backend} kernel block divides them; config={cfg}, layout "
    f"blocks={blocks}; on a TPU blocks are multiples of 128 dividing the lengths: pad the sequence)"
  )


def unsupported_reason(
  q, k, v, *, mask: MaskSpec, segment_ids=None, layout: BlockLayout | None = None, backend: str | None = None,
  config: Any = None,
) -> str | None:
  """Why the `backend` flash kernels cannot run this call, or None if they can.

  Pure: q/k/v may be `jax.ShapeDtypeStruct`s (config validation lists every call the model will make
  before any device work); `backend=None` is the platform's (`default_backend()`).
  """
  backend = default_backend() if backend is None else backend
  if backend not in BACKENDS:
    raise ValueError(f"flash_attention(backend={backend!r}): expected one of {BACKENDS}")
  if backend == "gpu":
    return _gpu_reason(q, k, v, segment_ids, mask, layout, config)
  if backend in ("tpu", "interpret"):
    return _tpu_reason(q, k, segment_ids, mask, layout, config, backend)
  return None


def _tpu_config(t: int, s: int, config, layout: BlockLayout | None, backend: str) -> tpu_flash.TpuFlashConfig | None:
  """Block sizes for the TPU/interpret kernels: the caller's config, else the largest dividing blocks.

  The TPU defaults are untuned (no TPU was available while writing them): 512 / 256 / 128 as they divide.
  """
  if config is not None and not isinstance(config, tpu_flash.TpuFlashConfig):
    # a GPU config in a model config that also runs on CPU/TPU: the block sizes are per backend
    _warn_once(f"pallas_kernels.ops: the {backend} backend ignores config={config!r} (it takes a TpuFlashConfig)")
    config = None
  if config is not None or layout is not None:
    return config

  blocks = _TPU_BLOCKS if backend == "tpu" else _INTERPRET_BLOCKS

  def pick(n: int) -> int | None:
    if n <= blocks[0]:
      return n
    return next((b for b in blocks if n % b == 0), None)

  bq, bk = pick(t), pick(s)
  if bq is None or bk is None:
    return None
  return tpu_flash.TpuFlashConfig(block_q=bq, block_kv=bk)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: the custom_vjp's nondiff argument)."""

  backend: str  # resolved: "gpu" | "tpu" | "interpret" | "reference"
  mask: MaskSpec
  scale: float
  config: Any


def _plan(q, k, v, segment_ids, layout, mask, scale, backend, config, allow_reference_fallback) -> _Static:
  """Resolve the backend for these shapes; a call it cannot run raises unless the reference fallback is allowed."""
  backend = default_backend() if backend is None else backend
  reason = unsupported_reason(q, k, v, mask=mask, segment_ids=segment_ids, layout=layout, backend=backend, config=config)
  if reason is None:
    if backend == "gpu":
      return _Static("gpu", mask, scale, None if isinstance(config, tpu_flash.TpuFlashConfig) else config)
    if backend in ("tpu", "interpret"):
      return _Static(backend, mask, scale, _tpu_config(q.shape[1], k.shape[1], config, layout, backend))
    return _Static("reference", mask, scale, None)
  message = f"pallas_kernels.ops: the {backend} flash kernel cannot run this call: {reason}"
  if not allow_reference_fallback:
    raise UnsupportedCall(
      f"{message}; use another attention.kernel, or set attention.allow_reference_fallback=true to run the dense "
      "fp32 reference (O(T*S) memory, slow)"
    )
  _warn_once(f"{message}; running the dense fp32 reference (attention.allow_reference_fallback=true)")
  return _Static("reference", mask, scale, None)


# ---------------------------------------------------------------------------------------------------------------
# Dense reference backward (fallback and "reference" backend)
# ---------------------------------------------------------------------------------------------------------------


def _reference_backward(q, k, v, segment_ids, layout, out, lse, dout, dlse, *, mask, scale):
  """Exact dense gradients from the same formulas the kernels use (fp32, O(T * S) memory)."""
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = hq // hkv
  hi = jax.lax.Precision.HIGHEST
  qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  dof = dout.astype(jnp.float32).reshape(b, t, hkv, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qf, kf, precision=hi) * scale
  vis = reference.visibility(t, s, mask=mask, segment_ids=segment_ids, layout=layout)
  vis = jnp.broadcast_to(vis, (b, hq, t, s)).reshape(b, hkv, g, t, s)
  lse_f = lse.astype(jnp.float32).reshape(b, hkv, g, t)
  lse_safe = jnp.where(jnp.isfinite(lse_f), lse_f, 0.0)
  p = jnp.where(vis, jnp.exp(logits - lse_safe[..., None]), 0.0)
  delta = jnp.einsum("btkgd,btkgd->bkgt", out.astype(jnp.float32).reshape(b, t, hkv, g, d), dof, precision=hi)
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32).reshape(b, hkv, g, t)
  dv = jnp.einsum("bkgts,btkgd->bskd", p, dof, precision=hi)
  dp = jnp.einsum("btkgd,bskd->bkgts", dof, vf, precision=hi)
  ds = p * (dp - delta[..., None])
  dq = jnp.einsum("bkgts,bskd->btkgd", ds, kf, precision=hi).reshape(b, t, hq, d) * scale
  dk = jnp.einsum("bkgts,btkgd->bskd", ds, qf, precision=hi) * scale
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Forward / backward dispatch
# ---------------------------------------------------------------------------------------------------------------


def _forward(st: _Static, q, k, v, segment_ids, layout, return_lists: bool = False):
  """(out, lse); with return_lists ((out, lse), lists): the GPU block-sparse forward's kv lists (a residual: the
  backward's dQ walks the same lists and dK/dV their transpose, so it need not build them again), None elsewhere."""
  if st.backend == "gpu" and layout is not None:
    from pallas_kernels.gpu.sparse_forward import sparse_forward  # noqa: PLC0415  (importable: _plan checked)

    return sparse_forward(q, k, v, segment_ids, layout, mask=st.mask, scale=st.scale, return_lists=return_lists)
  out_lse = _forward_without_lists(st, q, k, v, segment_ids, layout)
  return (out_lse, None) if return_lists else out_lse


def _forward_without_lists(st: _Static, q, k, v, segment_ids, layout):
  if st.backend == "reference":
    return reference.attention(
      q, k, v, mask=st.mask, segment_ids=segment_ids, layout=layout, scale=st.scale, return_lse=True
    )
  if st.backend == "gpu":
    return _gpu_module().flash_forward(q, k, v, segment_ids, mask=st.mask, scale=st.scale, config=st.config)
  return tpu_flash.flash_forward(
    q,
    k,
    v,
    segment_ids,
    mask=st.mask,
    scale=st.scale,
    layout=layout,
    interpret=st.backend == "interpret",
    config=st.config,
  )


def _backward(st: _Static, q, k, v, segment_ids, layout, out, lse, dout, dlse, lists=None):
  kw = dict(mask=st.mask, scale=st.scale)
  if st.backend == "gpu" and layout is not None:
    from pallas_kernels.gpu.sparse_backward import sparse_backward  # noqa: PLC0415  (importable: _plan checked)

    return sparse_backward(q, k, v, segment_ids, layout, out, lse, dout, dlse=dlse, fwd_lists=lists, **kw)
  if st.backend == "gpu":
    return _gpu_module().flash_backward(q, k, v, segment_ids, out, lse, dout, config=st.config, dlse=dlse, **kw)
  if st.backend in ("tpu", "interpret"):
    return tpu_flash.flash_backward(
      q,
      k,
      v,
      segment_ids,
      out,
      lse,
      dout,
      layout=layout,
      dlse=dlse,
      interpret=st.backend == "interpret",
      config=st.config,
      **kw,
    )
  return _reference_backward(q, k, v, segment_ids, layout, out, lse, dout, dlse, **kw)


def _zero_cotangent(x):
  """Cotangent for integer pytrees (segment ids, layouts): float0 zeros."""
  return jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jax.dtypes.float0), x)


def _fwd_common(st, q, k, v, segment_ids, layout):
  """(out, lse, lists) for the custom_vjp residuals; lists as in `_forward`."""
  (out, lse), lists = _forward(st, q, k, v, segment_ids, layout, return_lists=True)
  out = checkpoint_name(out, "flash_out")
  lse = checkpoint_name(lse, "flash_lse")
  return out, lse, lists


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attn_out(q, k, v, segment_ids, layout, st: _Static):
  return _forward(st, q, k, v, segment_ids, layout)[0]


def _attn_out_fwd(q, k, v, segment_ids, layout, st):
  out, lse, lists = _fwd_common(st, q, k, v, segment_ids, layout)
  return out, (q, k, v, segment_ids, layout, out, lse, lists)


def _attn_out_bwd(st, res, dout):
  q, k, v, segment_ids, layout, out, lse, lists = res
  dq, dk, dv = _backward(st, q, k, v, segment_ids, layout, out, lse, dout, None, lists)
  return dq, dk, dv, _zero_cotangent(segment_ids), _zero_cotangent(layout)


_attn_out.defvjp(_attn_out_fwd, _attn_out_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attn_lse(q, k, v, segment_ids, layout, st: _Static):
  return _forward(st, q, k, v, segment_ids, layout)


def _attn_lse_fwd(q, k, v, segment_ids, layout, st):
  out, lse, lists = _fwd_common(st, q, k, v, segment_ids, layout)
  return (out, lse), (q, k, v, segment_ids, layout, out, lse, lists)


def _attn_lse_bwd(st, res, cts):
  q, k, v, segment_ids, layout, out, lse, lists = res
  dout, dlse = cts
  # rows with lse = -inf saw no key: their lse does not depend on the inputs
  dlse = jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
  dq, dk, dv = _backward(st, q, k, v, segment_ids, layout, out, lse, dout, dlse, lists)
  return dq, dk, dv, _zero_cotangent(segment_ids), _zero_cotangent(layout)


_attn_lse.defvjp(_attn_lse_fwd, _attn_lse_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def flash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec = MaskSpec(),
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  layout: BlockLayout | None = None,
  scale: float | None = None,
  return_lse: bool = False,
  backend: Backend | None = None,
  config: Any = None,
  allow_reference_fallback: bool = False,
):
  """Flash attention: q [B, T, Hq, D], k/v [B, S, Hkv, D] -> out [B, T, Hq, D] (+ lse [B, Hq, T] fp32).

  Args:
    mask: `MaskSpec`, evaluated per tile inside the kernel (never materialised).
    segment_ids: ([B, T], [B, S]) int32; tokens attend only within equal ids.
    layout: optional `BlockLayout` restricting the kv blocks of each q block (see `block_sparse_attention`).
    scale: softmax scale, default 1/sqrt(D).
    return_lse: also return the (differentiable) log-sum-exp; -inf on rows that see no key.
    backend: "gpu" | "tpu" | "interpret" | "reference"; default: the platform's kernel (interpret on CPU).
    config: backend block sizes (`TpuFlashConfig` for tpu/interpret, the GPU module's `FlashConfig`).
    allow_reference_fallback: run the dense fp32 reference (with a warning) when the kernel cannot run the
      call, instead of raising `UnsupportedCall`.
  """
  reference.check_shapes(q, k, v, segment_ids)
  if not isinstance(mask, MaskSpec):
    raise TypeError(f"flash_attention(mask=...): expected a MaskSpec, got {type(mask).__name__}")
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  if segment_ids is not None:
    segment_ids = tuple(jnp.asarray(x, jnp.int32) for x in segment_ids)
  st = _plan(q, k, v, segment_ids, layout, mask, scale, backend, config, allow_reference_fallback)
  if return_lse:
    return _attn_lse(q, k, v, segment_ids, layout, st)
  return _attn_out(q, k, v, segment_ids, layout, st)


def attention_forward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec = MaskSpec(),
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  layout: BlockLayout | None = None,
  scale: float | None = None,
  backend: Backend | None = None,
  config: Any = None,
  allow_reference_fallback: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The forward kernel alone (no custom_vjp): out [B, T, Hq, D], lse [B, Hq, T] fp32.

  For code that owns its own custom_vjp over several kernel calls, e.g. ring attention, which runs one
  forward per hop and merges (out, lse) itself; pair it with `attention_backward`.
  """
  reference.check_shapes(q, k, v, segment_ids)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  st = _plan(q, k, v, segment_ids, layout, mask, scale, backend, config, allow_reference_fallback)
  return _forward(st, q, k, v, segment_ids, layout)


def attention_backward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  out: jax.Array,
  lse: jax.Array,
  dout: jax.Array,
  *,
  mask: MaskSpec = MaskSpec(),
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  layout: BlockLayout | None = None,
  dlse: jax.Array | None = None,
  scale: float | None = None,
  backend: Backend | None = None,
  config: Any = None,
  allow_reference_fallback: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The backward kernels alone: (dq [B, T, Hq, D], dk, dv [B, S, Hkv, D]) in the input dtypes.

  `out` / `lse` may be *global* statistics (e.g. ring attention's merged ones) rather than this call's own:
  the kernels recompute P = exp(S - lse) and use delta = rowsum(out * dout) - dlse, which is exactly the
  per-hop share of the global gradient. `dlse` [B, Hq, T] is the lse cotangent (None = 0); rows with
  lse = -inf are ignored.
  """
  reference.check_shapes(q, k, v, segment_ids)
  scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
  st = _plan(q, k, v, segment_ids, layout, mask, scale, backend, config, allow_reference_fallback)
  if dlse is not None:
    dlse = jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
  return _backward(st, q, k, v, segment_ids, layout, out, lse, dout, dlse)


def block_sparse_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  mask: MaskSpec = MaskSpec(),
  layout: BlockLayout,
  segment_ids: tuple[jax.Array, jax.Array] | None = None,
  scale: float | None = None,
  return_lse: bool = False,
  backend: Backend | None = None,
  config: Any = None,
  allow_reference_fallback: bool = False,
):
  """Block-sparse attention: like `flash_attention`, computing only the kv blocks `layout` lists.

  An element is visible iff its tile is listed AND the mask (and segment ids) allow it, matching
  `reference.attention(..., layout=layout)`. T and S must be multiples of the layout's blocks.
  """
  if layout is None:
    raise ValueError("block_sparse_attention: layout is required (build one with layers.sparse or BlockLayout)")
  return flash_attention(
    q,
    k,
    v,
    mask=mask,
    segment_ids=segment_ids,
    layout=layout,
    scale=scale,
    return_lse=return_lse,
    backend=backend,
    config=config,
    allow_reference_fallback=allow_reference_fallback,
  )
