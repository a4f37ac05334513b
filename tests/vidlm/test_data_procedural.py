"""Procedural NIAVH generator: needle placement per tier, readable answers, determinism, validation.

The needles are located from pixels (difference against the needle-free haystack that the same RNG stream
renders), and the codes are read back by template matching, so a generator that put the needle elsewhere or
drew a different code than the answer says would fail.
"""

import numpy as np
import pytest

from vidlm.data import procedural as P
from vidlm.data import tokenizer as T

F, H, W = 16, 32, 32


def build(tier, depth=None, *, index=3, seed=0, num_needles=1, num_asked=1, text_len=32, frames=F):
  return P._build(seed, index, frames=frames, height=H, width=W, tier=tier, depth=depth, num_needles=num_needles,
                  num_asked=num_asked, text_len=text_len, keep_haystack=True)


def changed(ex):
  """bool [F, H, W]: where the needles changed the haystack."""
  return (ex["frames"] != ex["haystack"]).any(-1)


def read_full_frame_code(frame):
  """Tier a: read the big digits back by matching each half of the frame against the 5x7 font."""
  cell = W // P.CODE_DIGITS
  my, mx = max(1, H // 16), max(1, cell // 8)
  bright = frame.mean(-1) > 120
  digits = []
  for i in range(P.CODE_DIGITS):
    region = bright[my : H - my, i * cell + mx : (i + 1) * cell - mx]
    scores = [(P._resize_mask(g, *region.shape) == region).mean() for g in P.DIGITS_5X7]
    assert max(scores) > 0.97, scores
    digits.append(str(int(np.argmax(scores))))
  return "".join(digits)


def read_patch_code(frame, box):
  """Tier b: read the 3x5 digits inside the patch rectangle `box` = (y0, y1, x0, x1)."""
  y0, y1, x0, x1 = box
  patch = frame[y0:y1, x0:x1]
  s = patch.shape[0] // 7
  ink = patch.max(-1) < 100
  code = ""
  for i in range(P.CODE_DIGITS):
    cell = ink[s : 6 * s, (1 + 4 * i) * s : (4 + 4 * i) * s][::s, ::s]
    matches = [j for j, g in enumerate(P.DIGITS_3X5) if (g == cell).all()]
    assert len(matches) == 1, cell
    code += str(matches[0])
  return code


def bbox(mask):
  ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return ys[0], ys[-1] + 1, xs[0], xs[-1] + 1


def check_text(ex):
  tokens, targets, mask = ex["tokens"], ex["targets"], ex["loss_mask"]
  assert tokens.dtype == np.int32 and targets.dtype == np.int32 and mask.dtype == np.float32
  assert tokens[0] == T.BOS
  assert T.decode(tokens) == ex["question"] + ex["answer"]
  np.testing.assert_array_equal(targets[:-1], tokens[1:])
  assert targets[-1] == T.PAD
  assert T.answer_from_arrays(targets, mask) == ex["answer"]
  assert mask.sum() == len(ex["answer"].encode()) + 1
  assert targets[mask > 0][-1] == T.EOS


@pytest.mark.parametrize("depth", [0.0, 0.37, 0.5, 1.0])
def test_tier_a_full_frame_needle_at_depth(depth):
  ex = build("a", depth)
  t = round((F - 1) * depth)
  assert ex["needle_frames"] == [t] == ex["asked_frames"]
  touched = changed(ex)
  assert np.flatnonzero(touched.any((1, 2))).tolist() == [t]
  assert touched[t].mean() > 0.9  # full frame
  assert read_full_frame_code(ex["frames"][t]) == ex["answer"]
  assert ex["question"] == "Code on the needle frame?"
  check_text(ex)


@pytest.mark.parametrize("depth", [0.0, 0.6, 1.0])
def test_tier_b_small_patch_needle_without_cut(depth):
  ex = build("b", depth, index=11)
  t = round((F - 1) * depth)
  assert ex["needle_frames"] == [t]
  touched = changed(ex)
  assert np.flatnonzero(touched.any((1, 2))).tolist() == [t]
  box = bbox(touched[t])
  area = (box[1] - box[0]) * (box[3] - box[2])
  assert area <= 0.10 * H * W
  assert read_patch_code(ex["frames"][t], box) == ex["answer"]
  # No cut at, into or out of the needle frame: the scene runs on around it.
  assert not {t, t + 1} & set(ex["cut_frames"])
  check_text(ex)


@pytest.mark.parametrize("depth,index", [(0.0, 1), (0.5, 2), (1.0, 3), (0.25, 4)])
def test_tier_c_motion_over_three_frames(depth, index):
  ex = build("c", depth, index=index)
  s = round((F - 3) * depth)
  assert ex["needle_frames"] == [s, s + 1, s + 2]
  touched = changed(ex)
  assert np.flatnonzero(touched.any((1, 2))).tolist() == [s, s + 1, s + 2]
  xs, ys = [], []
  for t in (s, s + 1, s + 2):
    y0, y1, x0, x1 = bbox(touched[t])
    xs.append((x0 + x1) / 2)
    ys.append((y0 + y1) / 2)
  steps = np.diff(xs)
  assert (steps > 0).all() if ex["answer"] == "right" else (steps < 0).all(), (ex["answer"], xs)
  assert max(ys) - min(ys) <= 1  # horizontal motion
  assert not set(range(s, s + 4)) & set(ex["cut_frames"])
  check_text(ex)


def test_tier_c_answers_cover_both_directions():
  answers = {P.make_example(0, i, frames=8, height=H, width=W, tier="c")["answer"] for i in range(20)}
  assert answers == {"left", "right"}


def test_multi_needle_k_inserted_m_asked():
  ex = build("a", 0.6, num_needles=4, num_asked=2, text_len=48, index=5)
  touched = np.flatnonzero(changed(ex).any((1, 2))).tolist()
  assert touched == ex["needle_frames"] and len(touched) == 4
  assert round((F - 1) * 0.6) in ex["asked_frames"] and len(ex["asked_frames"]) == 2
  codes = [read_full_frame_code(ex["frames"][t]) for t in ex["needle_frames"]]
  ordinals = [ex["needle_frames"].index(t) + 1 for t in ex["asked_frames"]]
  assert ex["question"] == f"Codes on needle frames {ordinals[0]},{ordinals[1]}?"
  assert ex["answer"] == " ".join(codes[o - 1] for o in ordinals)
  check_text(ex)
  one = build("a", 0.2, num_needles=3, num_asked=1, text_len=48, index=8)
  ordinal = one["needle_frames"].index(round((F - 1) * 0.2)) + 1
  assert one["asked_frames"] == [round((F - 1) * 0.2)]
  assert one["question"] == f"Code on needle frame {ordinal}?"
  assert one["answer"] == read_full_frame_code(one["frames"][one["asked_frames"][0]])
  for tier in "bc":
    ex = build(tier, None, num_needles=3, num_asked=2, text_len=48, index=6)
    n = P.NEEDLE_LEN[tier]
    assert np.flatnonzero(changed(ex).any((1, 2))).tolist() == ex["needle_frames"]
    assert len(ex["needle_frames"]) == 3 * n and len(ex["asked_frames"]) == 2 * n
    assert len(ex["answer"].split(" ")) == 2
    check_text(ex)


def test_deterministic_by_seed_and_index():
  kw = dict(frames=F, height=H, width=W, tier="b")
  a, b = P.make_example(7, 42, **kw), P.make_example(7, 42, **kw)
  for key in a:
    if isinstance(a[key], np.ndarray):
      np.testing.assert_array_equal(a[key], b[key])
    else:
      assert a[key] == b[key], key
  c = P.make_example(7, 43, **kw)
  d = P.make_example(8, 42, **kw)
  assert not np.array_equal(a["frames"], c["frames"])
  assert not np.array_equal(a["frames"], d["frames"])
  # Many indices: distinct videos, and the answers vary (not one constant code).
  exs = [P.make_example(0, i, frames=4, height=H, width=W, tier="a") for i in range(30)]
  assert len({e["frames"].tobytes() for e in exs}) == 30
  assert len({e["answer"] for e in exs}) > 10


def test_random_depth_covers_the_clip_and_haystacks_have_cuts():
  exs = [P.make_example(1, i, frames=F, height=H, width=W, tier="a") for i in range(60)]
  positions = {e["needle_frames"][0] for e in exs}
  assert len(positions) >= 10 and min(positions) <= 2 and max(positions) >= F - 3
  assert np.mean([len(e["cut_frames"]) > 0 for e in exs]) > 0.7


def test_cut_detector_does_not_find_patch_needles():
  """Tier b needles sit in running scenes: the largest frame-to-frame change is almost never the needle."""
  hits, with_cuts = 0, 0
  for i in range(30):
    ex = P.make_example(2, i, frames=F, height=H, width=W, tier="b")
    diff = np.abs(np.diff(ex["frames"].astype(np.int16), axis=0)).mean((1, 2, 3))  # [F-1], change into t+1
    if ex["cut_frames"]:
      with_cuts += 1
      hits += int(np.argmax(diff)) + 1 == ex["needle_frames"][0]
  assert with_cuts >= 15 and hits <= 0.2 * with_cuts


def test_validation_names_the_field():
  kw = dict(frames=F, height=H, width=W)
  with pytest.raises(ValueError, match="data.tiers"):
    P.make_example(0, 0, tier="d", **kw)
  with pytest.raises(ValueError, match="data.num_asked"):
    P.make_example(0, 0, num_needles=2, num_asked=3, **kw)
  with pytest.raises(ValueError, match="data.text_len"):
    P.make_example(0, 0, num_needles=4, num_asked=2, text_len=32, **kw)
  with pytest.raises(ValueError, match="data.frames"):
    P.make_example(0, 0, tier="c", frames=5, height=H, width=W, num_needles=2)
  with pytest.raises(ValueError, match="data.height"):
    P.make_example(0, 0, tier="b", frames=4, height=16, width=16)
  with pytest.raises(ValueError, match="depth"):
    P.make_example(0, 0, depth=1.5, **kw)


def test_generation_is_fast():
  import time

  start = time.perf_counter()
  for i in range(300):
    P.make_example(0, i, frames=16, height=32, width=32, tier="abc"[i % 3])
  # ~1-2 ms per clip on one core; generous bound for a loaded 2-core CI box (2k clips in seconds, not minutes).
  assert time.perf_counter() - start < 15
