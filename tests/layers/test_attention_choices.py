"""The three attention choices (DESIGN section 3): kernel x context_parallel give the same numbers, the selector hook
sees the right layer index (also inside a scanned stack), and ring attention does not import the dispatcher."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from layers import rope as rope_lib
from layers import scan
from layers.attention import Attention, Ring, attention
from layers.block import DecoderBlock
from pallas_kernels.layout import BlockLayout, MaskSpec

T, HQ, HKV, D = 64, 4, 2, 16


def _qkv(seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (2, T, HQ, D), jnp.float32)
  k = jax.random.normal(ks[1], (2, T, HKV, D), jnp.float32)
  v = jax.random.normal(ks[2], (2, T, HKV, D), jnp.float32)
  return q, k, v


def test_ring_module_does_not_import_the_dispatcher():
  """layers/ring/ imports nothing from layers.attention (at module level or inside functions): no cycle."""
  from layers import ring  # noqa: PLC0415

  files = sorted(Path(ring.__file__).parent.glob("*.py"))
  assert len(files) > 1  # the package's modules, not just __init__
  imported = set()
  for node in (n for f in files for n in ast.walk(ast.parse(f.read_text()))):
    if isinstance(node, ast.ImportFrom):
      imported |= {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      imported |= {a.name for a in node.names}
  assert "pallas_kernels.layout" in imported  # the walk sees the imports
  assert not any(name.startswith("layers.attention") for name in imported), imported


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_kernel_by_context_parallel_outputs_agree(layout):
  q, k, v = _qkv()
  mask = MaskSpec.frame_causal(8, video_tokens=48)
  want, want_lse = attention(q, k, v, mask=mask, kernel="reference", return_lse=True)
  mesh = jax.make_mesh((1, 1, 4, 1), ("data", "fsdp", "seq", "tensor"), axis_types=(AxisType.Auto,) * 4)
  from layers import ring  # noqa: PLC0415

  perm = ring.token_permutation(T, 4, layout)
  inv = np.argsort(perm)
  for kernel in ("xla", "reference", "flash"):  # flash: the interpret-mode kernels on CPU
    out, lse = attention(q, k, v, mask=mask, kernel=kernel, return_lse=True)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5, err_msg=kernel)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5, err_msg=kernel)
    with jax.set_mesh(mesh):
      o_r, lse_r = jax.jit(
        lambda q, k, v, kernel=kernel: attention(
          q, k, v, mask=mask, kernel=kernel, context_parallel=Ring(layout), return_lse=True
        )
      )(q[:, perm], k[:, perm], v[:, perm])
    np.testing.assert_allclose(np.asarray(o_r)[:, inv], want, atol=2e-5, rtol=2e-5, err_msg=f"ring {kernel}")
    np.testing.assert_allclose(np.asarray(lse_r)[:, :, inv], want_lse, atol=2e-5, rtol=2e-5, err_msg=f"ring {kernel}")


class _Recorder:
  """A selector that records the layer index it is called with and keeps only the diagonal kv block
  on layer 1 (dense elsewhere), so the output shows whether the layout reached the kernel."""

  def __init__(self):
    self.seen = []

  def __call__(self, q, k, mask, layer_index):
    jax.debug.callback(lambda i: self.seen.append(int(i)), layer_index)
    nq = q.shape[1] // 16
    diag = BlockLayout.from_block_mask(np.eye(nq, dtype=bool)[None, None], 16, 16)
    full = BlockLayout.from_block_mask(np.ones((1, 1, nq, nq), bool), 16, 16)
    pick = lambda a, b: jnp.where(layer_index == 1, a, b)  # noqa: E731
    return jax.tree.map(pick, diag, full)


def test_selector_hook_gets_the_layer_index_in_a_scanned_stack():
  rec = _Recorder()
  layers = 3

  def make(r):
    return DecoderBlock(
      embed_dim=32, num_heads=HQ, num_kv_heads=HKV, head_dim=8, mlp_dim=32, attention_kernel="xla",
      attention_selector=rec, rngs=r,
    )

  x = jax.random.normal(jax.random.key(1), (1, T, 32))
  rope = rope_lib.tables(np.arange(T), 8, 10_000.0)

  def body(block, carry):
    y, i = carry
    return block(y, rope, mask=MaskSpec.causal(), layer_index=i), i + 1

  mesh = jax.make_mesh((1, 1, 1, 1), ("data", "fsdp", "seq", "tensor"), axis_types=(AxisType.Auto,) * 4,
                       devices=jax.devices()[:1])
  from flax import linen  # noqa: PLC0415

  from vidlm.sharding import RULES  # noqa: PLC0415

  with jax.set_mesh(mesh), linen.logical_axis_rules(RULES):  # stacked weights carry logical partition names
    blocks = scan.stack(make, layers, nnx.Rngs(0))
    out, n = scan.apply(blocks, (x, jnp.zeros((), jnp.int32)), body)
  jax.effects_barrier()
  assert int(n) == layers and rec.seen == [0, 1, 2]
  assert np.all(np.isfinite(np.asarray(out)))


def test_attention_layer_passes_the_selectors_layout_to_the_kernel():
  rngs = nnx.Rngs(0)
  rope = rope_lib.tables(np.arange(T), 8, 10_000.0)
  x = jax.random.normal(jax.random.key(2), (1, T, 32))
  from flax import linen  # noqa: PLC0415

  from vidlm.sharding import RULES  # noqa: PLC0415

  mesh = jax.make_mesh((1, 1, 1, 1), ("data", "fsdp", "seq", "tensor"), axis_types=(AxisType.Auto,) * 4,
                       devices=jax.devices()[:1])
  with jax.set_mesh(mesh), linen.logical_axis_rules(RULES):
    dense = Attention(32, HQ, HKV, 8, kernel="xla", rngs=rngs)
    sparse = Attention(32, HQ, HKV, 8, kernel="xla", selector=_Recorder(), rngs=nnx.Rngs(0))
    a = dense(x, rope, mask=MaskSpec.causal(), layer_index=1)
    b = sparse(x, rope, mask=MaskSpec.causal(), layer_index=1)  # diagonal blocks only: differs
    c = sparse(x, rope, mask=MaskSpec.causal(), layer_index=0)  # every block listed: same as dense
  np.testing.assert_allclose(c, a, atol=1e-5)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3
