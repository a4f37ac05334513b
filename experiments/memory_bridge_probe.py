"""Can a patch embedding read the small NIAVH needles at all? A probe for issue 12's tiers (b) and (c).

The probe takes the needle frames alone (tier b: the one frame with the code patch, label = the code's first digit,
10 classes; tier c: the 3 marker frames, label = left/right), so finding the needle is solved for it, and trains
the memory bridge's front end on them: a patch embedding ((row, col) embedding added), `--layers` transformer
blocks over all the needle frames' tokens (3D RoPE), mean pooling and a linear classifier. Held-out accuracy on 512
examples of another seed says whether the embedding can read the needle from the demo's 4,096 training examples.

Command:  python experiments/memory_bridge_probe.py --tier c --steps 6000 --embed conv   (conv | linear)
Measured (2026-11-30, one H200, 4,096 training examples, batch 32, Adam 1e-3, 1 block, 32x32 frames, 8x8 patches):
            embedding      tier b (first digit, chance 10 %)           tier c (direction, chance 50 %)
            linear 8x8     train loss -> ~0, held out 21-24 % (3,500)   train loss -> ~0, held out 47-48 % (3,200)
            conv stem      held out 99-100 % from step ~1,100           held out 99.6-100 % from step ~1,000
          (steps reached in a 95-s limit in brackets; the conv rows' first logged step in the output kept was 1,000 /
          1,100, so they may learn sooner). On the shared 2-core CPU, 400 steps: linear 8x8 tier c 47 %, linear 4x4
          49 %, conv 51 % (not yet learnt at 400 steps).
Reading: with one linear map per 8x8 patch, a 1-px digit or a 5-px marker lands at one of 64 offsets inside a patch
(or across two to four), each a separate pattern to learn; from 4,096 examples the probe memorises instead. The conv
stem (layers/memory/stem.py) shares its weights over positions and reads both.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from layers.block import DecoderBlock
from layers.embed import TubeletEmbed
from layers.memory import ConvStem
from pallas_kernels.layout import MaskSpec
from vidlm.data import procedural

SIZE, EMBED = 32, 128


def needle_data(tier: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(needle frames uint8 [n, 1 or 3, 32, 32, 3], labels int [n]) from 8-frame demo examples."""
  frames, labels = [], []
  span = procedural.NEEDLE_LEN[tier]
  for i in range(n):
    ex = procedural.make_example(seed, i, frames=8, height=SIZE, width=SIZE, tier=tier)
    s = ex["needle_frames"][0]
    frames.append(ex["frames"][s : s + span])
    labels.append(int(ex["answer"][0]) if tier == "b" else int(ex["answer"] == "right"))
  return np.stack(frames), np.asarray(labels)


class Probe(nnx.Module):
  def __init__(self, *, frames: int, classes: int, embed: str, patch: int, layers: int, rngs: nnx.Rngs):
    grid = SIZE // patch
    if embed == "conv":
      self.embed = ConvStem(patch, 32, EMBED, rngs=rngs)
    else:
      self.embed = TubeletEmbed((1, patch, patch), 3, EMBED, rngs=rngs)
    self.where = nnx.Param(jax.random.normal(rngs.params(), (frames * grid * grid, EMBED)) * 0.02)
    self.blocks = nnx.List([
      DecoderBlock(embed_dim=EMBED, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=256, attention_kernel="xla",
                   rngs=rngs)
      for _ in range(layers)
    ])
    self.head = nnx.Linear(EMBED, classes, rngs=rngs)
    t, h, w = np.meshgrid(np.arange(frames), np.arange(grid), np.arange(grid), indexing="ij")
    self.pos = np.stack([t, h, w], -1).reshape(-1, 3).astype(np.int32)

  def __call__(self, frames: jax.Array) -> jax.Array:
    x = self.embed(frames) + self.where[...]  # [B, frames * grid^2, E]
    for block in self.blocks:
      x = block(x, self.pos, mask=MaskSpec.bidirectional())
    return self.head(x.mean(1))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tier", choices=("b", "c"), required=True)
  ap.add_argument("--steps", type=int, default=2000)
  ap.add_argument("--embed", choices=("linear", "conv"), default="conv")
  ap.add_argument("--patch", type=int, default=8)
  ap.add_argument("--layers", type=int, default=1)
  args = ap.parse_args()
  x_train, y_train = needle_data(args.tier, 4096, 0)
  x_test, y_test = needle_data(args.tier, 512, 1)
  with nnx.use_eager_sharding(False):
    model = Probe(frames=x_train.shape[1], classes=10 if args.tier == "b" else 2, embed=args.embed,
                  patch=args.patch, layers=args.layers, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  @nnx.jit
  def accuracy(model, x, y):
    return (model(x).argmax(-1) == y).mean()

  rng, t0 = np.random.default_rng(0), time.time()
  for i in range(args.steps):
    idx = rng.integers(0, len(x_train), 32)
    loss = step(model, opt, jnp.asarray(x_train[idx]), jnp.asarray(y_train[idx]))
    if (i + 1) % 100 == 0:
      held_out = float(accuracy(model, jnp.asarray(x_test), jnp.asarray(y_test)))
      print(f"step {i + 1}  train loss {float(loss):.4f}  held-out accuracy {held_out:.3f}  {time.time() - t0:.0f} s",
            flush=True)


if __name__ == "__main__":
  main()
