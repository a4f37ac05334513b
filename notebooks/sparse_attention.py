# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Block-sparse attention: which blocks each selector picks
# A procedural needle-in-a-haystack video (vidlm/data/procedural.py) is cut into tubelet tokens; its raw pixel
# patches serve as queries and keys, so the gates see real video structure (scene cuts, the needle frame). Each
# selector in `layers/sparse/` builds a `BlockLayout` under the frame-causal mask VideoLM uses; we draw the listed
# (q block, kv block) tiles as an image and print the measured density (listed tiles / tiles the mask leaves
# visible). CI runs this file (tests/vidlm/test_notebook_sparse.py) and checks the densities it prints.

# %%
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path


def find_repo_root() -> Path:
  """The checkout holding layers/sparse: searched upwards from this file (script) or the working directory."""
  start = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd().resolve()
  for d in (start, *start.parents):
    if (d / "layers" / "sparse" / "__init__.py").is_file():
      return d
  raise FileNotFoundError(f"no layers/sparse in {start} or above: open the notebook inside the vidlm checkout")


ROOT = find_repo_root()
if importlib.util.find_spec("layers") is None:  # not pip-installed: import from the checkout
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from layers.sparse import make_selector  # noqa: E402
from pallas_kernels.layout import MaskSpec  # noqa: E402
from vidlm.data import procedural  # noqa: E402

# %% [markdown]
# ## A real procedural video as tokens
# 16 frames of 32 x 32, tubelets 1 x 8 x 8: 16 tokens per frame, 256 video tokens of 192 pixel features.

# %%
F, H, W, TUB = 16, 32, 32, 8
ex = procedural.make_example(0, 3, frames=F, height=H, width=W, tier="a")
video = np.asarray(ex["frames"], np.float32)  # [F, H, W, 3]
if video.max() > 1.5:
  video = video / 255.0
patches = video.reshape(F, H // TUB, TUB, W // TUB, TUB, 3).transpose(0, 1, 3, 2, 4, 5).reshape(F * 16, -1)
feats = patches - patches.mean(0)  # [N, 192]
grid = (F, H // TUB, W // TUB)
tpf = grid[1] * grid[2]
N = feats.shape[0]
q = jnp.asarray(feats)[None, :, None, :]  # [1, N, 1, D]
k = q
mask = MaskSpec.frame_causal(tpf, video_tokens=N)
print("needle at frame", ex["needle_frames"], "| tokens", N, "| features", feats.shape[1])

# %% [markdown]
# ## Each selector's blocks (block 8 tokens = half a frame)

# %%
BLOCK = 8
params = dict(
  block_q=BLOCK, block_kv=BLOCK, dense_layers=(), top_k=2, sinks=1, window=1, frame_globals=1, stride=4,
  tau=0.5, max_kv_blocks=4, chunk_frames=2, chunk_bands=1, threshold=0.5,
)
n = N // BLOCK
dense_tiles = mask.dense(N, N).reshape(n, BLOCK, n, BLOCK).any(axis=(1, 3))  # visible tiles (small: plot only)
results = {"tokens": N, "blocks": n, "visible_tiles": int(dense_tiles.sum()), "density": {}, "counts": {}}
panels = [("static", 0), ("moba", 0), ("xattention", 0), ("vmoba", 0), ("vmoba", 1), ("vmoba", 2)]
fig, axes = plt.subplots(2, 3, figsize=(12, 8))
for ax, (method, layer) in zip(axes.ravel(), panels, strict=True):
  sel = make_selector(types.SimpleNamespace(method=method, **params), num_layers=3, video_grid=grid)
  layout = jax.jit(lambda q, k, sel=sel, layer=layer: sel(q, k, mask, layer))(q, k)
  listed = np.asarray(layout.dense_block_mask(n))[0, 0]  # [nQ, nK]
  assert not (listed & ~dense_tiles).any(), f"{method} listed a masked tile"
  name = method if method != "vmoba" else f"vmoba_{['temporal', 'spatial', 'spatiotemporal'][layer]}"
  density = float(listed.sum() / dense_tiles.sum())
  results["density"][name] = round(density, 4)
  results["counts"][name] = np.asarray(layout.kv_counts)[0, 0].tolist()
  img = np.where(listed, 2, np.where(dense_tiles, 1, 0))
  ax.imshow(img, cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
  ax.set_title(f"{name}: density {density:.1%}")
  ax.set_xlabel("kv block")
  ax.set_ylabel("q block")
  print(f"{name:26s} density {density:.3f}")
fig.suptitle("listed tiles (black) among visible tiles (grey), frame-causal mask")
out_dir = Path(tempfile.mkdtemp(prefix="sparse_nb_"))
png = out_dir / "sparse_blocks.png"
fig.savefig(png, dpi=80)
results["png"] = str(png)
results["repo_root"] = str(ROOT)
print("RESULTS " + json.dumps(results))
