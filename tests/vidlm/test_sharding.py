"""Parameter/activation specs on several mesh shapes, and the loss on each equals the 1-device loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from vidlm import config as C
from vidlm import sharding
from vidlm.models import build_model
from vidlm.train import step as step_lib

MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2)]


def _cfg(shape=(1, 1, 1, 1)):
  cfg = C.load_config("experiments/demo.py")
  cfg.mesh = C.MeshConfig(*shape)
  cfg.model.embed_dim, cfg.model.mlp_dim, cfg.model.num_heads, cfg.model.num_kv_heads = 64, 128, 4, 2
  cfg.model.head_dim = 16
  cfg.data.text_len = 32
  cfg.attention.kernel = "xla"
  return cfg


def _loss_on(shape):
  cfg = _cfg(shape)
  devices = jax.devices()[: int(np.prod(shape))]
  mesh = sharding.make_mesh(cfg.mesh, devices)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
    model = build_model(cfg, nnx.Rngs(0))
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in step_lib.random_batch(cfg.data, 8).items()}
    loss, _ = nnx.jit(step_lib.loss_fn)(model, batch)
    return float(loss), nnx.state(model), mesh


def test_logical_rules_resolve():
  assert sharding.logical_to_spec(("batch", "tokens", "embed")) == P(("data", "fsdp"), "seq", None)
  assert sharding.logical_to_spec(("embed", "mlp")) == P(("fsdp", "seq"), "tensor")
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, ("fsdp", "seq"), "tensor", None)
  with pytest.raises(KeyError, match="unknown logical axis"):
    sharding.logical_to_spec(("nope",))


def test_mesh_auto_fill_and_axis_types():
  mesh = sharding.make_mesh(C.MeshConfig(data=-1, fsdp=2, seq=2, tensor=1))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "seq": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape", MESHES)
def test_param_specs_and_loss_match_single_device(shape):
  ref_loss, _, _ = _loss_on((1, 1, 1, 1))
  loss, state, mesh = _loss_on(shape)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}

  def check(path_part, *expected):
    (key,) = [k for k in leaves if path_part in k]
    x = leaves[key]
    want = jax.sharding.NamedSharding(mesh, P(*expected))
    assert x.sharding.is_equivalent_to(want, x.ndim), (key, x.sharding.spec, expected)

  # stacked layers: leading "layers" axis replicated, model dim FSDP over (fsdp, seq), heads over tensor
  check("['q_proj']['kernel']", None, ("fsdp", "seq"), "tensor", None)
  check("['k_proj']['kernel']", None, ("fsdp", "seq"), "tensor", None)
  check("['o_proj']['kernel']", None, "tensor", None, ("fsdp", "seq"))
  check("['mlp']['gate']['kernel']", None, ("fsdp", "seq"), "tensor")
  check("['mlp']['down']['kernel']", None, "tensor", ("fsdp", "seq"))
  check("['lm_head']['kernel']", ("fsdp", "seq"), "tensor")
  check("['text_embed']['embed']['embedding']", "tensor", ("fsdp", "seq"))
  # the weight really is split across devices when the axes are > 1
  q = [x for p, x in jax.tree_util.tree_leaves_with_path(state) if "q_proj" in jax.tree_util.keystr(p)][0]
  fsdp_shards = mesh.shape["fsdp"] * mesh.shape["seq"] * mesh.shape["tensor"]
  assert len({s.index for s in q.addressable_shards}) == fsdp_shards


@pytest.mark.parametrize("shape", MESHES)
def test_activation_constraint_spec(shape):
  cfg = _cfg(shape)
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    x = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "tokens", "embed")))(jnp.ones((8, 16, 32)))
  want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "seq", None))
  assert x.sharding.is_equivalent_to(want, 3), x.sharding.spec
  # and it is really split: one distinct shard per (data*fsdp, seq) position
  assert len({s.index for s in x.addressable_shards}) == shape[0] * shape[1] * shape[2]


def test_video_is_embedded_per_seq_shard():
  """With seq > 1 each device embeds only its frames: the compiled program holds per-device patch tensors
  [B * F/seq * tokens_per_frame, patch] and never the whole video's."""
  cfg = _cfg((1, 1, 4, 1))
  d, (tt, th, tw) = cfg.data, cfg.model.tubelet
  video_tokens = d.frames // tt * (d.height // th) * (d.width // tw)
  patch = tt * th * tw * 3
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
  with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.RULES):
    model = build_model(cfg, nnx.Rngs(0))
    batch = {
      k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in step_lib.random_batch(cfg.data, 2).items()
    }
    hlo = nnx.jit(lambda m, f, t: m(f, t)).lower(model, batch["frames"], batch["tokens"]).compile().as_text()
  assert f"[{2 * video_tokens // 4},{patch}]" in hlo
  assert f"[{2 * video_tokens},{patch}]" not in hlo and f"[2,{video_tokens},{patch}]" not in hlo
