"""The one logical-axis rules table: logical dimension names -> mesh axes.

One job: say which mesh axes a logical dimension (batch, tokens, heads, ...) is split over. It lives in
`layers` so that layers (ring attention) and vidlm (weights via `nnx.with_partitioning` + `nnx.logical_axis_rules`,
activations via `vidlm.sharding.constrain`) resolve through the same table; `vidlm.sharding` re-exports it.
Mesh axes are always ("data", "fsdp", "seq", "tensor"). Weights are FSDP-sharded over ("fsdp", "seq") so that
ring (context-parallel) devices also hold weight shards; activations keep their tokens on "seq" and batch on
("data", "fsdp").
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

AXES: tuple[str, ...] = ("data", "fsdp", "seq", "tensor")

# logical name -> mesh axis / axes / None. The one table.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", ("data", "fsdp")),
  ("tokens", "seq"),
  ("frames", "seq"),  # input video frames: split like the tokens they become
  ("embed", ("fsdp", "seq")),  # weights' model dim: FSDP over fsdp x seq
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("memory", None),
  ("layers", None),
  ("patch", None),
)
_RULES = dict(RULES)


def mesh_axes(name: str) -> tuple[str, ...]:
  """The mesh axes the logical dimension `name` is split over, in order (() = replicated)."""
  if name not in _RULES:
    raise KeyError(f"sharding: unknown logical axis {name!r}; known: {sorted(_RULES)}")
  axes = _RULES[name]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def logical_to_spec(names: tuple[str | None, ...]) -> P:
  """PartitionSpec for logical names. A mesh axis already used by an earlier dim is dropped, so an
  activation [batch, tokens, embed] becomes P(("data","fsdp"), "seq", None) while a weight [embed, mlp]
  becomes P(("fsdp","seq"), "tensor")."""
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    free = tuple(a for a in mesh_axes(name) if a not in used)
    used.update(free)
    spec.append(free if len(free) > 1 else (free[0] if free else None))
  return P(*spec)


__all__ = ["AXES", "RULES", "logical_to_spec", "mesh_axes"]
