"""Procedural needle-in-a-video-haystack (NIAVH) examples, reproducible from (seed, index), numpy only.

Haystack: scenes of drifting blocky/striped textures with a few moving sprites (letter glyphs, boxes, discs,
triangles), separated by random hard cuts. Needles (memory_streaming.md section 3, scaled to tiny frames):

  tier a  one full-frame needle frame: two big digits, each filling half the frame, on a dark plain background.
          It is a cut-like event, but the haystack has cuts of its own, so a cut detector alone cannot tell which
          cut is the needle; the model must read the digits.
  tier b  one frame of an ongoing scene (no cut) gets a small white patch (<= 10% of the frame area) with a
          2-digit code in a 3x5 font.
  tier c  a marker (white cross in a black box) drawn over 3 consecutive frames of an ongoing scene, stepping
          left or right; the answer is "left" or "right".

Multi-needle: `num_needles` needles of the same tier are inserted at non-overlapping frames and `num_asked` of
them are asked by temporal ordinal (1-based); the answer joins their codes with spaces in that order.

Placement: a needle spanning n frames (1 for a/b, 3 for c) starts at round((F - n) * depth), i.e. at
round((F - 1) * depth) for one-frame needles; depth None draws the position from (seed, index). With several
needles, `depth` places the first asked needle and the others go at random free frames.
"""

import functools

import numpy as np

from vidlm.data import tokenizer

TIERS = ("a", "b", "c")
NEEDLE_LEN = {"a": 1, "b": 1, "c": 3}
CODE_DIGITS = 2
MAX_PATCH_FRACTION = 0.10
# Mean scene length in frames; cuts are Bernoulli per frame boundary, so most clips have a few.
MEAN_SCENE_FRAMES = 6.0

_QUESTIONS_ONE = {
  "a": "Code on the needle frame?",
  "b": "Code in the small patch?",
  "c": "Marker moved which way?",
}
_QUESTIONS_MANY = {  # several asked, by 1-based temporal ordinal
  "a": "Codes on needle frames {}?",
  "b": "Codes in small patches {}?",
  "c": "Marker moves {}: which way?",
}
_QUESTIONS_PICK = {  # one of several asked
  "a": "Code on needle frame {}?",
  "b": "Code in small patch {}?",
  "c": "Marker move {}: which way?",
}

_DIGITS_5X7 = (
  (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
  ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
  (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
  ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
  ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
  ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
  ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
  ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
  (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
  (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
)
_DIGITS_3X5 = (
  ("###", "#.#", "#.#", "#.#", "###"),
  (".#.", "##.", ".#.", ".#.", "###"),
  ("###", "..#", "###", "#..", "###"),
  ("###", "..#", ".##", "..#", "###"),
  ("#.#", "#.#", "###", "..#", "..#"),
  ("###", "#..", "###", "..#", "###"),
  ("###", "#..", "###", "#.#", "###"),
  ("###", "..#", ".#.", ".#.", ".#."),
  ("###", "#.#", "###", "#.#", "###"),
  ("###", "#.#", "###", "..#", "###"),
)
# Haystack glyphs are letters only, so digits (codes) appear nowhere but in needles.
_LETTERS_5X7 = (
  (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),  # A
  ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),  # E
  ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),  # H
  ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),  # K
  ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),  # M
  ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),  # R
  ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),  # T
  ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),  # X
  ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),  # Z
)


def _bitmap(rows: tuple[str, ...]) -> np.ndarray:
  return np.array([[c == "#" for c in r] for r in rows], dtype=bool)


DIGITS_5X7 = tuple(_bitmap(g) for g in _DIGITS_5X7)
DIGITS_3X5 = tuple(_bitmap(g) for g in _DIGITS_3X5)
LETTERS_5X7 = tuple(_bitmap(g) for g in _LETTERS_5X7)


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
  """Nearest-neighbour resize of a bool bitmap [h0, w0] -> [h, w]."""
  ry = np.arange(h) * mask.shape[0] // h
  rx = np.arange(w) * mask.shape[1] // w
  return mask[np.ix_(ry, rx)]


@functools.lru_cache(maxsize=64)
def _shape_masks(size: int) -> tuple[np.ndarray, ...]:
  """Non-glyph sprite shapes of side `size`: box, disc, triangle, ring."""
  yy, xx = np.mgrid[:size, :size] + 0.5
  c = size / 2
  r2 = (yy - c) ** 2 + (xx - c) ** 2
  box = np.ones((size, size), bool)
  disc = r2 <= c * c
  tri = np.abs(xx - c) <= yy / 2  # apex up
  ring = disc & (r2 >= (0.55 * c) ** 2)
  return box, disc, tri, ring


def _blit(frame: np.ndarray, mask: np.ndarray, color: np.ndarray, y: int, x: int) -> None:
  """Paint `color` where `mask` [h, w] is set, top-left at (y, x), clipped to `frame` [H, W, 3] in place."""
  H, W = frame.shape[:2]
  h, w = mask.shape
  y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
  if y0 >= y1 or x0 >= x1:
    return
  frame[y0:y1, x0:x1][mask[y0 - y : y1 - y, x0 - x : x1 - x]] = color


class _Scene:
  """One shot: a scrolling periodic texture plus sprites on wrapping linear paths."""

  def __init__(self, rng: np.random.Generator, H: int, W: int):
    self.H, self.W = H, W
    gh, gw = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    base = rng.uniform(20, 200, size=3).astype(np.float32)
    grid = base + np.float32(rng.uniform(15, 60)) * rng.standard_normal((gh, gw, 3), dtype=np.float32)
    tex = grid[(np.arange(H) * gh // H)[:, None], (np.arange(W) * gw // W)[None, :]]
    if rng.random() < 0.5:  # diagonal or straight stripes
      period = int(rng.integers(3, 9))
      dy, dx = rng.integers(0, 2, size=2) * 2 - 1 if rng.random() < 0.5 else (1, 0)
      stripes = ((np.arange(H)[:, None] * dy + np.arange(W)[None, :] * dx) // period) % 2
      tex += stripes[..., None].astype(np.float32) * np.float32(rng.uniform(10, 40))
    tex += np.float32(6.0) * rng.standard_normal(tex.shape, dtype=np.float32)
    tex = np.clip(tex, 0, 255, out=tex).astype(np.uint8)
    self.big = np.tile(tex, (2, 2, 1))  # periodic, so any H x W window at offsets in [0, H) x [0, W) is valid
    speed = max(1, H // 32)
    self.off = rng.integers(0, (H, W))
    self.vel = rng.integers(-speed, speed + 1, size=2)
    self.sprites = []
    for _ in range(int(rng.integers(1, 4))):
      size = int(rng.integers(max(3, H // 8), max(4, H // 3) + 1))
      kind = int(rng.integers(0, 5))
      if kind == 4:
        glyph = LETTERS_5X7[int(rng.integers(len(LETTERS_5X7)))]
        mask = _resize_mask(glyph, size, max(3, size * 5 // 7))
      else:
        mask = _shape_masks(size)[kind]
      color = rng.integers(0, 256, size=3).astype(np.uint8)
      pos = rng.uniform((-size / 2, -size / 2), (H - size / 2, W - size / 2))
      vel = rng.uniform(-2.5, 2.5, size=2) * max(1.0, H / 32)
      self.sprites.append((mask, color, pos, vel))

  def render(self, t: int, out: np.ndarray) -> None:
    """Write frame t of this scene into `out` [H, W, 3]."""
    H, W = self.H, self.W
    oy, ox = (self.off + self.vel * t) % (H, W)
    out[:] = self.big[oy : oy + H, ox : ox + W]
    for mask, color, pos, vel in self.sprites:
      h, w = mask.shape
      # Wrap sprites around a slightly larger torus so they leave on one side and come back on the other.
      y, x = pos + vel * t
      y = (y + h) % (H + h) - h
      x = (x + w) % (W + w) - w
      _blit(out, mask, color, int(y), int(x))


def sample_cuts(rng: np.random.Generator, frames: int) -> list[int]:
  """Frames that start a new scene (hard cuts): each boundary cuts with probability 1 / MEAN_SCENE_FRAMES."""
  return [t for t in range(1, frames) if rng.random() < 1.0 / MEAN_SCENE_FRAMES]


def render_haystack(
  rng: np.random.Generator, frames: int, height: int, width: int, cuts: list[int]
) -> np.ndarray:
  """Haystack video uint8 [F, H, W, 3]: a fresh scene starts at frame 0 and at every frame in `cuts`."""
  video = np.empty((frames, height, width, 3), np.uint8)
  starts = [0, *cuts]
  ends = [*cuts, frames]
  for s, e in zip(starts, ends):
    scene = _Scene(rng, height, width)
    for t in range(s, e):
      scene.render(t - s, video[t])
  return video


def _patch_scale(height: int, width: int) -> int:
  """Largest integer scale of the tier-b patch (3x5 digits, 1-px gaps and border) within 10% of the frame."""
  ph, pw = 7, CODE_DIGITS * 4 + 1
  s = 0
  while ph * (s + 1) * pw * (s + 1) <= MAX_PATCH_FRACTION * height * width:
    s += 1
  return s


def _draw_full_frame_code(rng: np.random.Generator, out: np.ndarray, code: str) -> None:
  """Tier a: replace `out` [H, W, 3] with big digits, each filling half the frame (one digit per cell)."""
  H, W = out.shape[:2]
  bg = rng.integers(0, 50, size=3)
  out[:] = np.clip(bg + rng.normal(0, 4, size=out.shape), 0, 255).astype(np.uint8)
  fg = rng.integers(190, 256, size=3).astype(np.uint8)
  n = len(code)
  cell = W // n
  my, mx = max(1, H // 16), max(1, cell // 8)
  for i, ch in enumerate(code):
    mask = _resize_mask(DIGITS_5X7[int(ch)], H - 2 * my, cell - 2 * mx)
    _blit(out, mask, fg, my, i * cell + mx)


def _draw_patch_code(rng: np.random.Generator, out: np.ndarray, code: str) -> tuple[int, int, int, int]:
  """Tier b: paint a small white patch with black 3x5 digits; returns (y, x, h, w) of the patch."""
  H, W = out.shape[:2]
  s = _patch_scale(H, W)
  ph, pw = 7 * s, (len(code) * 4 + 1) * s
  y, x = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
  out[y : y + ph, x : x + pw] = rng.integers(225, 256, size=3).astype(np.uint8)
  ink = rng.integers(0, 40, size=3).astype(np.uint8)
  for i, ch in enumerate(code):
    mask = np.repeat(np.repeat(DIGITS_3X5[int(ch)], s, 0), s, 1)
    _blit(out, mask, ink, y + s, x + (1 + 4 * i) * s)
  return y, x, ph, pw


@functools.lru_cache(maxsize=64)
def _marker(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Tier c marker of side `size`: (black box mask, white cross mask)."""
  box = np.ones((size, size), bool)
  c = size // 2
  cross = np.zeros((size, size), bool)
  cross[c, 1:-1] = True
  cross[1:-1, c] = True
  return box, cross


def _marker_geometry(height: int, width: int) -> tuple[int, int]:
  size = max(3, (min(height, width) // 6) | 1)
  step = max(2, width // 8)
  return size, step


def _draw_motion(rng: np.random.Generator, video: np.ndarray, start: int, direction: str) -> None:
  """Tier c: the marker at 3 consecutive frames, stepping `direction` by a fixed stride, same row."""
  _, H, W, _ = video.shape
  size, step = _marker_geometry(H, W)
  span = 2 * step + size
  y = int(rng.integers(0, H - size + 1))
  x0 = int(rng.integers(0, W - span + 1))
  xs = [x0 + i * step for i in range(3)]
  if direction == "left":
    xs = xs[::-1]
  box, cross = _marker(size)
  black, white = np.zeros(3, np.uint8), np.full(3, 255, np.uint8)
  for i in range(3):
    _blit(video[start + i], box, black, y, xs[i])
    _blit(video[start + i], cross, white, y, xs[i])


def _place_needles(rng: np.random.Generator, frames: int, n: int, k: int, depth: float | None) -> tuple[list[int], int]:
  """Start frames (sorted) of k non-overlapping needles of length n, and which one `depth` pinned (or -1)."""
  if depth is None:
    # Stars and bars: k distinct picks among frames - k*n + k slots, spread by n - 1, never overlap.
    picks = np.sort(rng.choice(frames - k * n + k, size=k, replace=False))
    return [int(p) + i * (n - 1) for i, p in enumerate(picks)], -1
  pinned = round((frames - n) * depth)
  starts = [pinned]
  free = [s for s in rng.permutation(frames - n + 1).tolist() if abs(s - pinned) >= n]
  for s in free:
    if len(starts) == k:
      break
    if all(abs(s - o) >= n for o in starts):
      starts.append(int(s))
  if len(starts) < k:
    raise ValueError(f"cannot place {k} needles of {n} frames in {frames} frames with depth={depth}")
  starts.sort()
  return starts, starts.index(pinned)


def validate(*, frames: int, height: int, width: int, tier: str, num_needles: int, num_asked: int) -> None:
  """Raise ValueError naming the field when a combination cannot produce a valid example."""
  if tier not in TIERS:
    raise ValueError(f"data.tiers: unknown tier {tier!r} (choose from {', '.join(TIERS)})")
  if height < 8 or width < 8:
    raise ValueError(f"data.height/data.width: frames must be at least 8x8, got {height}x{width}")
  if not 1 <= num_asked <= num_needles:
    raise ValueError(f"data.num_asked={num_asked} must be in [1, data.num_needles={num_needles}]")
  n = NEEDLE_LEN[tier]
  if num_needles * n > frames:
    raise ValueError(f"data.frames={frames} cannot hold {num_needles} tier-{tier} needles of {n} frame(s)")
  if tier == "b" and _patch_scale(height, width) < 1:
    raise ValueError(f"data.height/data.width: tier 'b' needs a larger frame than {height}x{width} "
                     f"(the code patch must stay within {MAX_PATCH_FRACTION:.0%} of the area)")
  if tier == "c":
    size, step = _marker_geometry(height, width)
    if 2 * step + size > width:
      raise ValueError(f"data.width={width} is too narrow for the tier 'c' marker motion")


def split_seed(seed: int, split: str) -> int:
  """Seed of a split's examples: train uses `seed` itself, other splits an offset, so eval never repeats train."""
  return seed if split == "train" else seed + 1_000_003 * (1 + sum(map(ord, split)))


def make_example(
  seed: int,
  index: int,
  *,
  frames: int,
  height: int,
  width: int,
  tier: str = "a",
  depth: float | None = None,
  num_needles: int = 1,
  num_asked: int = 1,
  text_len: int = 32,
) -> dict:
  """One NIAVH example, a pure function of its arguments.

  Returns: frames uint8 [F, H, W, 3]; question, answer (str); needle_frames (all frames covered by inserted
  needles) and asked_frames (those of the asked needles), sorted list[int]; cut_frames (haystack cuts); tier;
  index; and tokens/targets int32 [text_len], loss_mask float32 [text_len] from `tokenizer.qa_arrays`.
  """
  return _build(seed, index, frames=frames, height=height, width=width, tier=tier, depth=depth,
                num_needles=num_needles, num_asked=num_asked, text_len=text_len)


def _build(seed: int, index: int, *, frames: int, height: int, width: int, tier: str, depth: float | None,
           num_needles: int, num_asked: int, text_len: int, keep_haystack: bool = False) -> dict:
  """make_example's body; keep_haystack=True adds the needle-free video (for tests that locate the needles)."""
  validate(frames=frames, height=height, width=width, tier=tier, num_needles=num_needles, num_asked=num_asked)
  if depth is not None and not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth={depth} must be in [0, 1]")
  rng = np.random.default_rng([seed, index, TIERS.index(tier)])
  n = NEEDLE_LEN[tier]
  cuts = sample_cuts(rng, frames)
  starts, pinned = _place_needles(rng, frames, n, num_needles, depth)
  if tier in ("b", "c"):
    # These needles live inside an ongoing scene: keep the scene running from the frame before the needle to
    # the frame after it, so no cut coincides with (or hides) the needle.
    cuts = [c for c in cuts if not any(s <= c <= s + n for s in starts)]
  video = render_haystack(rng, frames, height, width, cuts)
  haystack = video.copy() if keep_haystack else None
  if tier == "c":
    codes = [("left", "right")[int(rng.integers(2))] for _ in starts]
  else:
    codes = ["".join(str(d) for d in rng.integers(0, 10, size=CODE_DIGITS)) for _ in starts]
  for start, code in zip(starts, codes):
    if tier == "a":
      _draw_full_frame_code(rng, video[start], code)
    elif tier == "b":
      _draw_patch_code(rng, video[start], code)
    else:
      _draw_motion(rng, video, start, code)
  others = [i for i in range(num_needles) if i != pinned]
  forced = [pinned] if pinned >= 0 else []
  asked = sorted(forced + rng.choice(others, size=num_asked - len(forced), replace=False).tolist())
  if num_needles == 1:
    question = _QUESTIONS_ONE[tier]
  else:
    template = _QUESTIONS_MANY[tier] if num_asked > 1 else _QUESTIONS_PICK[tier]
    question = template.format(",".join(str(i + 1) for i in asked))
  answer = " ".join(codes[i] for i in asked)
  out = {
    "frames": video,
    "question": question,
    "answer": answer,
    "needle_frames": sorted(s + j for s in starts for j in range(n)),
    "asked_frames": sorted(starts[i] + j for i in asked for j in range(n)),
    "cut_frames": cuts,
    "tier": tier,
    "index": int(index),
    **tokenizer.qa_arrays(question, answer, text_len),
  }
  if keep_haystack:
    out["haystack"] = haystack
  return out


def example_from_config(data_cfg, split: str, index: int) -> dict:
  """Example `index` of `split` as `data_cfg` defines it (tiers cycle with the index, depth is random)."""
  tiers = tuple(data_cfg.tiers)
  return make_example(
    split_seed(data_cfg.seed, split),
    index,
    frames=data_cfg.frames,
    height=data_cfg.height,
    width=data_cfg.width,
    tier=tiers[index % len(tiers)],
    num_needles=data_cfg.num_needles,
    num_asked=data_cfg.num_asked,
    text_len=data_cfg.text_len,
  )
