"""Device mesh, the one logical-axis rules table, and activation constraints.

Mesh axes are always ("data", "fsdp", "seq", "tensor"). Weights carry logical names
(`nnx.with_partitioning`) and activations are constrained with `constrain(x, names)`; both resolve through
`RULES`, defined in `layers.partitioning` (where ring attention reads it too) and re-exported here. Weights are
FSDP-sharded over ("fsdp", "seq") so that ring (context-parallel) devices also hold weight shards; activations
keep their tokens on "seq" and batch on ("data", "fsdp").
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from layers.partitioning import AXES, RULES, logical_to_spec  # the one rules table (re-exported here)
from vidlm.config import ConfigError, MeshConfig, resolve_mesh_shape


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """Mesh over all (or the given) devices with Auto axis types; -1 fills one axis."""
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(cfg, len(devices))
  if shape[0] * shape[1] * shape[2] * shape[3] != len(devices):
    raise ConfigError(f"config.mesh: {dict(zip(AXES, shape))} needs {shape} devices but {len(devices)} exist")
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Sharding constraint for an activation, by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  """Examples over ("data", "fsdp"), everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def input_sharding(mesh, name: str, shape: tuple[int, ...]) -> NamedSharding:
  """Sharding of one array of the data contract: examples over ("data", "fsdp"), and the video `frames`
  [B, F, H, W, C] also split over "seq" on F where it divides, so no device holds the whole video (a 16.8M-token
  video is 13 GiB of uint8 frames). VideoLM embeds each device's frames where they are."""
  seq = dict(mesh.shape).get("seq", 1)
  if name == "frames" and len(shape) == 5 and seq > 1 and shape[1] % seq == 0:
    return NamedSharding(mesh, logical_to_spec(("batch", "frames", None, None, None)))
  return batch_sharding(mesh, len(shape))


def describe(state) -> str:
  """A table of parameter paths, shapes and specs (written to <workdir>/param_shardings.txt at start)."""
  rows = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if not hasattr(leaf, "shape"):
      continue
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    rows.append(f"{jax.tree_util.keystr(path):<70} {str(tuple(leaf.shape)):<22} {spec}")
  return "\n".join(rows)


__all__ = ["AXES", "RULES", "batch_sharding", "constrain", "describe", "input_sharding", "logical_to_spec", "make_mesh"]
