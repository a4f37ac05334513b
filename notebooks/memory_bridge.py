# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # The memory bridge: where it cuts a video, what it reads, how far it generalises
# MemoryBridgeLM (vidlm/models/memory_bridge.py, reference/memory_streaming.md section 2) cuts a video into
# segments, encodes each with M memory tokens (bridge), lets every new memory read the cache of all earlier
# memories (retriever), and answers from the bank of all memories with a small decoder.
#
# 1. **SceneTiling** on a procedural video (vidlm/data/procedural.py) against the generator's true hard cuts.
# 2. **A tiny model trained here** (experiments/memory_bridge.py:smoke sizes, seconds of CPU steps).
# 3. **What it attends to**: the retriever's weights over earlier segments, and the decoder's bank read for a needle
#    question, per segment, with the needle's segments marked. Recomputed from the model's public submodules (no
#    change to the model); each recomputation is checked against the model's own output.
# 4. **Accuracy vs length** of that tiny model at 1x, 4x and 8x its 8 training frames.
#
# CI runs this file (tests/vidlm/test_notebook_memory_bridge.py) and checks the values of the RESULTS line.

# %%
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # before JAX starts


def find_repo_root() -> Path:
  """The checkout holding layers/memory: searched upwards from this file (script) or the working directory."""
  start = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd().resolve()
  for d in (start, *start.parents):
    if (d / "layers" / "memory" / "__init__.py").is_file():
      return d
  raise FileNotFoundError(f"no layers/memory in {start} or above: open the notebook inside the vidlm checkout")


ROOT = find_repo_root()
if importlib.util.find_spec("layers") is None:  # not pip-installed: import from the checkout
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from layers import rope as rope_lib  # noqa: E402
from layers.memory import scene  # noqa: E402
from pallas_kernels.layout import MaskSpec  # noqa: E402
from vidlm import config as C  # noqa: E402
from vidlm.data import contract, procedural  # noqa: E402
from vidlm.models.registry import build_model  # noqa: E402

OUT = Path(tempfile.mkdtemp(prefix="memory_bridge_nb_"))
results: dict = {"repo_root": str(ROOT), "seconds": {}}
T0 = time.perf_counter()


def lap(name: str) -> None:
  """Record the seconds since the last lap (the notebook must stay quick: CI runs it)."""
  global T0
  results["seconds"][name] = round(time.perf_counter() - T0, 1)
  T0 = time.perf_counter()

# %% [markdown]
# ## 1. SceneTiling against the true cuts
# Features are the raw pixels of each frame (what the model's `segment_mode=scene` uses: parameter-free, so the
# boundaries do not move while the embedding trains). c_i = cos(frame i, frame i+1); depth d_i = L[i] + R[i] - 2 c_i
# (L, R: the peaks climbed left and right); a boundary at gap i ends a segment at frame i, so the model's segment
# starts are boundary + 1, to compare with the generator's `cut_frames` (frames that start a new scene).
# Threshold mode (d > mean + 0.5 std) with the model's default `scene_min_length=2`: two cuts one frame apart (a
# one-frame scene) can yield only one boundary, so such a cut is missed by design.
#
# Scored by a one-to-one match within one frame: precision = matched boundaries / boundaries found, recall =
# matched cuts / true cuts. The "clean" video (tier c, index 1) has no scene shorter than the minimum length.

# %%
FRAMES, SIZE, MIN_LEN, STD = 48, 32, 2, 0.5


def pixel_features(frames: np.ndarray) -> jnp.ndarray:
  """uint8 [F, H, W, 3] -> [1, F, H*W*3] float32 in [-1, 1], as MemoryBridgeLM.segments."""
  return jnp.asarray(frames.reshape(1, frames.shape[0], -1).astype(np.float32) / 127.5 - 1.0)


@jax.jit
def tile(feats: jnp.ndarray):
  n = jnp.full((1,), feats.shape[1], jnp.int32)
  c = scene.adjacent_similarity(feats, n)
  d = scene.depth_scores(c, n)
  ids, count = scene.scene_tiling(feats, max_segments=-(-feats.shape[1] // MIN_LEN), min_length=MIN_LEN,
                                  mode="threshold", threshold_std=STD)
  return c[0], d[0], ids[0], count[0]


def match(found: list[int], cuts: list[int], tol: int = 1) -> tuple[int, list[int]]:
  """Greedy one-to-one matching of found segment starts to true cuts within `tol` frames -> (matches, offsets)."""
  free, offsets = sorted(cuts), []
  for f in sorted(found):
    near = [c for c in free if abs(c - f) <= tol]
    if near:
      c = min(near, key=lambda c: abs(c - f))
      free.remove(c)
      offsets.append(f - c)
  return len(offsets), offsets


def starts_of(ids: np.ndarray) -> list[int]:
  return [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]]


seg_rows, tp, n_found, n_cuts = [], 0, 0, 0
for tier, idx in [("c", 1), ("b", 1), ("b", 0), ("c", 0), ("b", 3), ("c", 3)]:
  ex = procedural.make_example(0, idx, frames=FRAMES, height=SIZE, width=SIZE, tier=tier)
  c, d, ids, count = (np.asarray(x) for x in tile(pixel_features(ex["frames"])))
  found, cuts = starts_of(ids), list(ex["cut_frames"])
  m, offsets = match(found, cuts)
  tp, n_found, n_cuts = tp + m, n_found + len(found), n_cuts + len(cuts)
  seg_rows.append({"tier": tier, "index": idx, "cuts": cuts, "found": found, "matched": m, "offsets": offsets,
                   "segments": int(count)})
  print(f"tier {tier} #{idx}: true cuts {cuts}\n            found      {found}  ({m} matched within 1 frame)")
  if (tier, idx) == ("c", 1):
    clean = {"frames": ex["frames"], "sim": c, "depth": d, "found": found, "cuts": cuts}
precision, recall = tp / max(n_found, 1), tp / max(n_cuts, 1)
print(f"over {len(seg_rows)} videos: precision {precision:.2f}, recall {recall:.2f} (1-frame tolerance)")
results["segmentation"] = {"videos": seg_rows, "precision": precision, "recall": recall, "min_length": MIN_LEN,
                           "clean": {"cuts": clean["cuts"], "found": clean["found"]}}

# %%
fig, (ax0, ax1) = plt.subplots(2, 1, figsize=(14, 5), gridspec_kw={"height_ratios": [1, 2]})
ax0.imshow(np.concatenate(list(clean["frames"]), axis=1), interpolation="nearest")
ax0.set_yticks([])
ax0.set_xticks(np.arange(FRAMES) * SIZE + SIZE / 2, [str(t) for t in range(FRAMES)], fontsize=6)
ax0.set_title("tier (c) video #1: frames (true cuts red, found boundaries blue)")
for t in clean["cuts"]:
  ax0.axvline(t * SIZE - 0.5, color="red", lw=3)
for t in clean["found"]:
  ax0.axvline(t * SIZE - 0.5, color="blue", lw=1, ls="--")
gaps = np.arange(FRAMES - 1) + 0.5  # gap i lies between frames i and i+1
ax1.plot(gaps, clean["sim"], "k.-", label="cosine(frame i, i+1)")
depth = np.where(np.isfinite(clean["depth"]), clean["depth"], np.nan)
ax1.plot(gaps, depth, "g.-", label="depth score")
ax1.axhline(np.nanmean(depth) + STD * np.nanstd(depth), color="g", ls=":", label="threshold mean + 0.5 std")
for t in clean["cuts"]:
  ax1.axvline(t - 0.5, color="red", lw=3, alpha=0.4)
for t in clean["found"]:
  ax1.axvline(t - 0.5, color="blue", ls="--")
ax1.set_xlim(-0.5, FRAMES - 0.5)
ax1.set_xlabel("frame gap")
ax1.legend(fontsize=7, loc="lower left")
fig.tight_layout()
fig.savefig(OUT / "scene_tiling.png", dpi=70)
results["segmentation"]["png"] = str(OUT / "scene_tiling.png")
lap("segmentation")

# %% [markdown]
# ## 2. A tiny model trained here
# experiments/memory_bridge.py:smoke sizes: 32x32 frames, 8x8 tubelets (16 tokens per frame), 8 training frames,
# fixed segments of 4 frames every 2 (3 segments at 8 frames), M = 4 memory tokens, embed 32, one decoder layer.
# Trained on tiers (a) and (c) mixed, Adam 3e-3, `STEPS` steps of 8 examples: seconds on CPU, so it learns the
# answer's form and part of the 2-way tier (c) at best; the real demo trains minutes (experiments/memory_bridge.py).

# %%
STEPS, BATCH, TIERS = 40, 8, ("a", "c")
cfg = C.load_config(f"{ROOT / 'experiments' / 'memory_bridge.py'}:smoke")
cfg.mesh = C.MeshConfig(data=1)
cfg.data.tiers = TIERS
cfg = C.validate(cfg)
d = cfg.data
model = build_model(cfg, nnx.Rngs(0))
params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(f"model: {params:,} parameters; training frames {d.frames}, {d.height}x{d.width}")


def make_batch(n: int, *, frames: int, seed: int, tier: str | None = None, depth: float | None = None,
               start: int = 0) -> tuple[list[dict], dict]:
  exs = [procedural.make_example(seed, start + i, frames=frames, height=d.height, width=d.width,
                                 tier=tier or TIERS[i % len(TIERS)], depth=depth, text_len=d.text_len)
         for i in range(n)]
  arrays = [contract.model_example(e) for e in exs]
  return exs, {k: jnp.asarray(np.stack([a[k] for a in arrays])) for k in ("frames", "tokens", "targets", "loss_mask")}


graphdef, state = nnx.split(model)
opt = optax.adam(3e-3)
opt_state = opt.init(state)


@jax.jit
def train_step(state, opt_state, batch):
  (loss, sums), g = jax.value_and_grad(lambda s: nnx.merge(graphdef, s).loss(batch), has_aux=True)(state)
  upd, opt_state = opt.update(g, opt_state, state)
  return optax.apply_updates(state, upd), opt_state, loss, sums


lap("build")
t0, losses = time.perf_counter(), []
for i in range(STEPS):
  _, batch = make_batch(BATCH, frames=d.frames, seed=1, start=i * BATCH)
  state, opt_state, loss, sums = train_step(state, opt_state, batch)
  losses.append(float(loss))
  if i == 0:
    lap("first_step")
train_s = time.perf_counter() - t0
nnx.update(model, state)
lap("train")
print(f"{STEPS} steps in {train_s:.1f} s: loss {np.mean(losses[:3]):.3f} -> {np.mean(losses[-5:]):.3f}")
results["train"] = {"steps": STEPS, "batch": BATCH, "params": int(params), "seconds": round(train_s, 1),
                    "loss_first": float(np.mean(losses[:3])), "loss_last": float(np.mean(losses[-5:]))}

# %% [markdown]
# ## 3. What the retriever and the decoder's bank read attend to
# A tier (a) needle question on a 4x-length video (32 frames, 15 segments), needle at depth 0.6.
#
# *Retriever.* After segment s the new memory m_s (written to cache slot s) reads slots 0..s. Slots are never
# overwritten, so the final cache holds every query and key: the weights of step s are
# softmax_j<=s(q(m_s) . k(m_j) / sqrt(d)), averaged over heads and memory tokens. Checked: re-applying the retriever
# to the final cache with count s+1 reproduces the per-segment memories the scan returned.
#
# *Decoder read.* The decoder blocks are stacked on a layer axis; layer l is sliced out and its sub-modules are run
# in order (self-attention, then the read). The read's query is scaled by log(#keys) / log(#training keys)
# (`length_scaling`) before the softmax over the bank's K*M keys; the weights are summed over each segment's M
# keys. Checked: the recomputed read equals the block's `read` output, and the final logits equal `model.read`.
# What to expect here: the model of section 2 has trained for seconds; in our runs its tier (a) exact match was 0 and
# the needle's segments got no more than a uniform share of the read, so the picture shows the mechanics (which keys
# exist, how the weight spreads over them), not a learnt needle lookup.

# %%
from layers.memory import run_segments  # noqa: E402


def slice_layer(stacked: nnx.Module, i: int) -> nnx.Module:
  """Layer i of an `nnx.vmap`-stacked module (parameters on axis 0) as a plain module."""
  g, st = nnx.split(stacked)
  return nnx.merge(g, jax.tree.map(lambda x: x[i], st))


def heads_softmax(q, k, valid, scale):
  """q [B, T, H, D], k [B, S, H, D], valid [B, S] -> weights [B, H, T, S] (fp32, masked keys exactly 0)."""
  logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


@nnx.jit
def attention_maps(model, frames, tokens):
  mem0, seg_tokens, token_mask, valid, pos = model.segment_inputs(frames)
  carry, (mems, outs) = run_segments(model.bridge, model.retriever, mem0, seg_tokens, token_mask, valid, pos,
                                     remat="none")
  final, cache, count = carry
  b, k, m, e = cache.shape
  r = model.retriever
  kv = cache.reshape(b, k * m, e)
  qr, kr = r.q_proj(kv), r.k_proj(kv)  # [B, K*M, H, D]: every slot's memory as query and as key
  causal = (jnp.arange(k * m)[None, :] // m) <= (jnp.arange(k * m)[:, None] // m)  # slot j <= s
  lg = jnp.einsum("bthd,bshd->bhts", qr.astype(jnp.float32), kr.astype(jnp.float32)) * qr.shape[-1] ** -0.5
  w_ret = jax.nn.softmax(jnp.where(causal[None, None], lg, -jnp.inf), axis=-1)  # [B, H, K*M, K*M]
  w_ret = w_ret.reshape(b, -1, k, m, k, m).sum(-1).mean(axis=(1, 3))  # [B, K (step), K (slot)]
  # check: the retriever on the final cache with count s+1 gives the scan's per-segment memory
  redo = jax.vmap(lambda s: r(cache[:, s], cache, jnp.full((b,), s + 1, jnp.int32)), out_axes=1)(jnp.arange(k))
  ret_err = jnp.max(jnp.abs(redo - mems))
  bank, bank_valid = model.memory_bank(carry, outs, token_mask)
  # decoder, layer by layer
  x = model.text_embed(tokens)
  rope = rope_lib.tables(np.arange(tokens.shape[1]), model.head_dim, model.rope_theta)
  reads, read_err = [], 0.0
  for i in range(model.decoder_layers):
    blk = slice_layer(model.blocks, i)
    x = x + blk.attn(blk.attn_norm(x), rope, mask=MaskSpec.causal())
    h = blk.read_norm(x)
    rd = blk.read
    q = rd.q_proj(h.astype(rd.dtype))
    if rd.length_scaling:
      n = jnp.maximum(jnp.sum(bank_valid, axis=1), 2).astype(jnp.float32)
      q = q.astype(jnp.float32) * (jnp.log(n) / rd.log_ref)[:, None, None, None]
    bk = jnp.where(bank_valid[..., None], bank, 0).astype(rd.dtype)
    w = heads_softmax(q, rd.k_proj(bk), bank_valid, q.shape[-1] ** -0.5)  # [B, H, T, S]
    mine = rd.o_proj(jnp.einsum("bhts,bshd->bthd", w, rd.v_proj(bk).astype(jnp.float32)).astype(rd.dtype))
    theirs = rd(h, bank, bank_valid)
    read_err = jnp.maximum(read_err, jnp.max(jnp.abs(mine - theirs)))
    reads.append(w)
    x = x + theirs
    x = x + blk.mlp(blk.mlp_norm(x))
  logits = model.lm_head(model.final_norm(x)).astype(jnp.float32)
  logit_err = jnp.max(jnp.abs(logits - model.read(tokens, bank, bank_valid)))
  return w_ret, jnp.stack(reads, 1), bank_valid, (ret_err, read_err, logit_err)


table = nnx.jit(lambda model, f: model.segments(f))
ATT_FRAMES, NEEDLE_DEPTH = 4 * d.frames, 0.6
exs, batch = make_batch(1, frames=ATT_FRAMES, seed=7, tier="a", depth=NEEDLE_DEPTH)
w_ret, w_read, bank_valid, errs = attention_maps(model, batch["frames"], batch["tokens"])
frame_table, frame_mask, seg_valid = (np.asarray(x[0]) for x in table(model, batch["frames"]))
needle = exs[0]["needle_frames"]
needle_segs = [s for s in range(frame_table.shape[0]) if any(t in needle for t in frame_table[s][frame_mask[s]])]
K, M = frame_table.shape[0], cfg.model.memory_tokens
# the query whose logits predict the first answer token: the first position with a weighted target
q_pos = int(np.argmax(np.asarray(batch["loss_mask"][0]) > 0))
read_seg = np.asarray(w_read[0, :, :, q_pos, :]).reshape(w_read.shape[1], w_read.shape[2], K, M).sum(-1)  # [L, H, K]
read_seg_mean = read_seg.mean(axis=(0, 1))  # [K]
w_ret = np.asarray(w_ret[0])  # [K, K]
errs = [float(e) for e in errs]
print(f"needle frame {needle} -> segments {needle_segs} of {K}; checks (max abs error) retriever {errs[0]:.2e}, "
      f"read {errs[1]:.2e}, logits {errs[2]:.2e}")
print("decoder read per segment (mean over heads/layers):", np.round(read_seg_mean, 3).tolist())
share = float(read_seg_mean[needle_segs].sum())
print(f"the needle's segments get {share:.1%} of the read (uniform: {len(needle_segs) / K:.1%}); compare the tier (a) "
      "exact match in section 4: a model trained for seconds")
results["attention"] = {
  "frames": ATT_FRAMES, "segments": K, "memory_tokens": M, "needle_frames": needle, "needle_segments": needle_segs,
  "retriever_row_sums": w_ret.sum(1).tolist(), "retriever_upper_mass": float(np.triu(w_ret, 1).sum()),
  "read_per_segment": read_seg_mean.tolist(), "read_head_sums": read_seg.sum(-1).ravel().tolist(),
  "finite": bool(np.isfinite(w_ret).all() and np.isfinite(np.asarray(w_read)).all()),
  "check_errors": {"retriever": errs[0], "read": errs[1], "logits": errs[2]},
  "needle_read_share": share, "uniform_share": len(needle_segs) / K,
}

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5))
im = ax0.imshow(w_ret, cmap="viridis", interpolation="nearest")
ax0.set_title("retriever: step s (row) reads memory slot j (col)")
ax0.set_xlabel("memory slot (segment)")
ax0.set_ylabel("segment step")
for s in needle_segs:
  ax0.axvline(s, color="red", lw=1, ls=":")
fig.colorbar(im, ax=ax0)
for h in range(read_seg.shape[1]):
  ax1.plot(read_seg[:, h].mean(0), ".-", alpha=0.5, label=f"head {h}")
ax1.plot(read_seg_mean, "k.-", lw=2, label="mean")
for s in needle_segs:
  ax1.axvspan(s - 0.5, s + 0.5, color="red", alpha=0.2)
ax1.axhline(1 / K, color="grey", ls=":", label="uniform")
ax1.set_title(f"decoder read at the first answer token, {ATT_FRAMES} frames (needle: red)")
ax1.set_xlabel("segment")
ax1.set_ylabel("attention weight (sum over the segment's M keys)")
ax1.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "attention.png", dpi=70)
results["attention"]["png"] = str(OUT / "attention.png")
lap("attention")

# %% [markdown]
# ## 4. Accuracy vs length
# Teacher-forced exact match (argmax of one forward pass equals every answer token: greedy-equivalent) and
# per-token answer accuracy on held-out videos (seed 2, never trained on) at 1x, 4x and 8x the 8 training frames,
# `EVAL_N` examples per tier and length, needle depth random. Each length compiles its own static shapes.

# %%
MULTS, EVAL_N = (1, 4, 8), 8
score = nnx.jit(lambda model, b: model.loss(b, per_example=True)[1])
curve = []
for mult in MULTS:
  row = {"multiplier": mult, "frames": d.frames * mult}
  for tier in TIERS:
    _, b = make_batch(EVAL_N, frames=d.frames * mult, seed=2, tier=tier)
    s = {k: np.asarray(v) for k, v in score(model, b).items()}
    row[f"{tier}_exact"] = float(s["exact"].mean())
    row[f"{tier}_token_accuracy"] = float(s["correct"].sum() / s["weight"].sum())
    row[f"{tier}_loss"] = float(s["loss_sum"].sum() / s["weight"].sum())
  row["segments"] = int(model.plan.num_segments(row["frames"]))
  curve.append(row)
  print(row)
results["curve"] = curve

fig, ax = plt.subplots(figsize=(6, 4))
for tier in TIERS:
  ax.plot([r["frames"] for r in curve], [r[f"{tier}_exact"] for r in curve], "o-", label=f"tier {tier} exact match")
  ax.plot([r["frames"] for r in curve], [r[f"{tier}_token_accuracy"] for r in curve], "x--",
          label=f"tier {tier} answer-token accuracy")
ax.axvline(d.frames, color="grey", ls=":", label="training length")
ax.set_xscale("log", base=2)
ax.set_xlabel("frames")
ax.set_ylim(-0.05, 1.05)
ax.set_title(f"tiny memory bridge ({STEPS} CPU steps): accuracy vs length")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "curve.png", dpi=70)
results["curve_png"] = str(OUT / "curve.png")
lap("curve")
print("seconds per section:", results["seconds"])
results["chance_loss"] = math.log(cfg.model.vocab_size)
print("RESULTS " + json.dumps(results))
